//! Graceful shutdown, broadcast to every task: first drain, then force.

use std::future::Future;
use std::sync::Arc;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;

use crate::wake::{Change, Changed, Woken};

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

    /// Resolves at the next phase change after the current one; cheap to poll again and
    /// again (a session polls it at every socket wake-up).
    pub fn changed(&mut self) -> Changed<impl Future<Output = ()> + '_> {
        crate::wake::changed(&mut self.0)
    }

    /// The next phase change as source `bit` of a shared `woken` (see [`crate::wake::changed_on`]).
    pub fn changed_on(
        &mut self,
        woken: &Arc<Woken>,
        bit: u8,
    ) -> Change<impl Future<Output = ()> + '_> {
        crate::wake::changed_on(&mut self.0, woken, bit)
    }
}

/// SIGINT and SIGTERM, and SIGHUP (a closed terminal) where asked, listened for from creation
/// on (a signal that arrives while the owner is busy elsewhere is kept for its next `recv`).
pub struct Signals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Option<Signal>,
}

impl Signals {
    /// Starts listening for SIGINT and SIGTERM.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: None,
        })
    }

    /// Starts listening for SIGINT, SIGTERM and SIGHUP.
    pub fn with_hangup() -> std::io::Result<Self> {
        Ok(Self {
            hangup: Some(signal(SignalKind::hangup())?),
            ..Self::new()?
        })
    }

    /// Resolves at the next signal listened for.
    pub async fn recv(&mut self) {
        let hangup = async {
            match &mut self.hangup {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
            _ = hangup => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};

    use super::*;

    #[tokio::test]
    async fn changed_fires_at_each_phase_change_and_not_before() {
        let (trigger, mut shutdown) = channel();
        {
            let mut changed = std::pin::pin!(shutdown.changed());
            // Polled many times with nothing sent: still pending.
            for _ in 0..3 {
                assert!(futures_poll(changed.as_mut()).is_pending());
            }
            trigger.advance(Phase::Draining);
            crate::clock::timeout(std::time::Duration::from_secs(5), changed)
                .await
                .expect("the change wakes the task");
        }
        assert_eq!(shutdown.phase(), Phase::Draining);
        // Not backwards, and a repeated phase is no change.
        let waiting = tokio::spawn(async move {
            shutdown.changed().await;
            shutdown.phase()
        });
        trigger.advance(Phase::Running);
        trigger.advance(Phase::Draining);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        trigger.advance(Phase::Force);
        let woken = crate::clock::timeout(std::time::Duration::from_secs(5), waiting).await;
        assert_eq!(
            woken.expect("the change wakes the task").unwrap(),
            Phase::Force
        );
    }

    fn futures_poll<F: Future>(f: Pin<&mut F>) -> Poll<F::Output> {
        let waker = Waker::noop();
        f.poll(&mut Context::from_waker(waker))
    }
}
