//! Spare backend connections: connected (and TLS-negotiated) to the primary ahead of time, so
//! that a login does not wait for PostgreSQL to start a process for it.
//!
//! A PostgreSQL server starts a backend process for every connection it accepts, before the
//! StartupMessage arrives; on a small machine that is about 1.5 ms of the 4–5 ms a login takes.
//! A spare is a connection that process already waits on. The StartupMessage (user, database,
//! options) goes out only when a client logs in, so the backend is as fresh as one opened for
//! the client and nothing about the session differs; the server does not count it in
//! `max_connections` or list it in `pg_stat_activity` until then. A server drops a connection
//! that sends nothing for `authentication_timeout` (60 s by default), so spares are replaced
//! after `spare_max_age_ms`, and one found closed is given up for a connection made on the
//! spot. One that gets no answer to its StartupMessage within the connect timeout reads as an
//! unreachable server, as a connection attempt that timed out would. The process behind a spare
//! keeps the `pg_hba.conf` the server had when it forked it, so spares are replaced once the
//! role probe sees the server reload its configuration (within `topology_interval_ms`).

use std::collections::VecDeque;
use std::mem::MaybeUninit;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::backend::Connector;
use crate::shutdown::Shutdown;
use crate::stream::Stream;
use crate::topology::{Backend, Topology};

/// How long the keeper waits before trying again after a spare could not be opened.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// A connection to `backend` with nothing sent on it yet but the TLS negotiation.
struct Spare {
    backend: Backend,
    stream: Stream,
    born: Instant,
}

/// The spare connections kept open to the primary.
pub struct Spares {
    want: usize,
    max_age: Duration,
    ready: Mutex<VecDeque<Spare>>,
    taken: tokio::sync::Notify,
    /// Counts [`Spares::replace_all`] calls: a spare whose opening began before one is not kept.
    replaced: std::sync::atomic::AtomicU64,
}

impl Spares {
    /// Keeps `want` spares, each for at most `max_age`.
    pub fn new(want: usize, max_age: Duration) -> Self {
        Self {
            want,
            max_age,
            ready: Mutex::new(VecDeque::with_capacity(want)),
            taken: tokio::sync::Notify::new(),
            replaced: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn ready(&self) -> std::sync::MutexGuard<'_, VecDeque<Spare>> {
        self.ready.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A spare connected to `backend` that still looks open, if there is one.
    pub fn take(&self, backend: &Backend) -> Option<Stream> {
        let found = {
            let mut ready = self.ready();
            let mut found = None;
            while let Some(spare) = ready.pop_front() {
                if spare.backend == *backend
                    && spare.born.elapsed() < self.max_age
                    && looks_open(&spare.stream)
                {
                    found = Some(spare.stream);
                    break;
                }
            }
            publish(ready.len());
            found
        };
        self.taken.notify_one();
        found
    }

    /// Spares ready now.
    pub fn ready_count(&self) -> usize {
        self.ready()
            .iter()
            .filter(|s| looks_open(&s.stream))
            .count()
    }

    /// Drops spares that are too old or not for `primary`; returns when the oldest left
    /// must go.
    fn prune(&self, primary: Option<&Backend>) -> Option<Instant> {
        let mut ready = self.ready();
        ready.retain(|s| {
            Some(&s.backend) == primary && s.born.elapsed() < self.max_age && looks_open(&s.stream)
        });
        publish(ready.len());
        ready.front().map(|s| s.born + self.max_age)
    }

    fn close_all(&self) {
        self.ready().clear();
        publish(0);
    }

    /// Closes the spares ready now and has the keeper open new ones (after a reload changed
    /// how backend connections are opened).
    pub fn replace_all(&self) {
        self.replaced
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.close_all();
        self.taken.notify_one();
    }

    /// Opens spares to the current primary and replaces them as they are taken or age, until
    /// shutdown.
    pub async fn keep(
        self: Arc<Self>,
        connector: Connector,
        topology: Arc<Topology>,
        mut shutdown: Shutdown,
    ) {
        let mut primary_changes = topology.primary_changes();
        let mut reloads = topology.config_reloads();
        loop {
            let primary = topology.current_primary();
            let expiry = self.prune(primary.as_ref());
            let missing = primary.as_ref().filter(|_| self.ready_count() < self.want);
            let wait = if let Some(backend) = missing {
                let replaced = self.replaced.load(std::sync::atomic::Ordering::SeqCst);
                let opened = tokio::select! {
                    opened = connector.connect(backend) => opened,
                    _ = shutdown.draining() => return self.close_all(),
                };
                match opened {
                    // Opened with the settings a reload has just replaced.
                    Ok(_)
                        if self.replaced.load(std::sync::atomic::Ordering::SeqCst) != replaced =>
                    {
                        continue
                    }
                    Ok(stream) => {
                        let mut ready = self.ready();
                        ready.push_back(Spare {
                            backend: backend.clone(),
                            stream,
                            born: Instant::now(),
                        });
                        publish(ready.len());
                        continue;
                    }
                    Err(e) => {
                        tracing::debug!(%backend, error = %e, "spare backend connection not opened");
                        Some(Instant::now() + RETRY_AFTER)
                    }
                }
            } else {
                expiry
            };
            let until = wait.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            // Draining, or a trigger that is gone, ends the keeper.
            let woke = crate::clock::timeout_at(until, async {
                tokio::select! {
                    _ = self.taken.notified() => Woke::Taken,
                    _ = primary_changes.changed() => Woke::Taken,
                    _ = reloads.changed() => Woke::Reloaded,
                    _ = shutdown.draining() => Woke::Stop,
                }
            })
            .await
            .unwrap_or(Woke::Taken);
            match woke {
                Woke::Stop => return self.close_all(),
                // A server process forked before a reload authenticates with the pg_hba.conf
                // it was forked with: spares that old would let in whom the new one refuses.
                Woke::Reloaded => {
                    tracing::debug!("the server reloaded its configuration; spares replaced");
                    self.close_all();
                }
                Woke::Taken => {}
            }
        }
    }
}

/// Why the keeper woke.
enum Woke {
    /// A spare was taken, or the primary changed, or a spare aged: look again.
    Taken,
    /// The server reloaded its configuration: every spare is older than that.
    Reloaded,
    /// Shutdown.
    Stop,
}

/// Reports the number of spares ready.
fn publish(ready: usize) {
    metrics::gauge!("understudy_backend_spares").set(ready as f64);
}

/// Whether nothing has arrived on a spare: a server sends nothing before the StartupMessage,
/// so bytes or an end of stream mean it gave the connection up. (On TLS a server may send
/// session tickets after the handshake, so bytes there are not held against it.)
fn looks_open(stream: &Stream) -> bool {
    match peek(stream.fd()) {
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        Ok(0) => false,
        Ok(_) => stream.is_tls(),
    }
}

/// Peeks at one byte without waiting.
fn peek(socket: BorrowedFd<'_>) -> std::io::Result<usize> {
    let mut byte = [MaybeUninit::<u8>::uninit()];
    socket2::SockRef::from(&socket).peek(&mut byte)
}

/// What became of a StartupMessage sent on a spare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The server's answer has begun to arrive.
    Answered,
    /// The server had closed the connection (before reading the message).
    Closed,
    /// Nothing came back in time: the server's host is not answering.
    Silent,
}

/// Waits until the server answers on a spare, closes it, or `timeout` passes.
pub async fn answer(stream: &Stream, timeout: Duration) -> Answer {
    let wait = async {
        loop {
            stream.readable().await?;
            match stream.try_read_io(|| peek(stream.fd())) {
                Ok(0) => return Ok::<Answer, std::io::Error>(Answer::Closed),
                Ok(_) => return Ok(Answer::Answered),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    };
    match crate::clock::timeout(timeout, wait).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(_)) => Answer::Closed,
        Err(_) => Answer::Silent,
    }
}
