//! Graceful shutdown, broadcast to every task: first drain, then force.

use tokio::sync::watch;

/// How far the gateway is into shutting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Serving.
    Running,
    /// No new connections; sessions close at their next transaction boundary.
    Draining,
    /// Sessions close now, transaction or not.
    Force,
}

/// Sending side, held by whoever decides to shut down.
#[derive(Debug, Clone)]
pub struct ShutdownTrigger(watch::Sender<Phase>);

/// Receiving side, one per task.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<Phase>);

/// A connected trigger and listener.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(Phase::Running);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    /// Moves to `phase` (never backwards).
    pub fn advance(&self, phase: Phase) {
        self.0.send_if_modified(|p| {
            let later = phase > *p;
            if later {
                *p = phase;
            }
            later
        });
    }

    /// A new listener.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}

impl Shutdown {
    /// The phase now.
    pub fn phase(&self) -> Phase {
        *self.0.borrow()
    }

    /// Resolves once the phase is at least `phase` (or the trigger is gone).
    pub async fn reached(&mut self, phase: Phase) {
        let _ = self.0.wait_for(|p| *p >= phase).await;
    }

    /// Resolves once draining has begun.
    pub async fn draining(&mut self) {
        self.reached(Phase::Draining).await
    }

    /// Resolves at the next phase change after the current one.
    pub async fn changed(&mut self) {
        if self.0.changed().await.is_err() {
            std::future::pending::<()>().await
        }
    }
}

/// SIGINT and SIGTERM, listened for from creation on (a signal that arrives while the owner is
/// busy elsewhere is kept for its next `recv`).
pub struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    /// Starts listening.
    pub fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// Resolves at the next SIGINT or SIGTERM.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}
