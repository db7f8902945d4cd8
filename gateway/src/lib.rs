//! Understudy, a PostgreSQL failover gateway: clients connect here instead of to PostgreSQL, and
//! each session is forwarded to the current primary over the native wire protocol.
// `deny`, not `forbid`: `sockopt` alone is allowed `unsafe`, for the kernel queries std lacks.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod accounts;
pub mod admin;
pub mod auth;
pub mod backend;
pub mod cancel;
pub mod clock;
pub mod config;
pub mod connection;
pub mod ctl;
pub mod demo;
pub mod error;
pub mod failover;
pub mod gateway;
pub mod grants;
pub mod handshake;
pub mod local_cluster;
pub mod pause;
pub mod pump;
pub mod reload;
pub mod session;
pub mod sessions;
pub mod shutdown;
#[allow(unsafe_code)]
pub mod sockopt;
pub mod spares;
pub mod stream;
pub mod suspects;
pub mod systemd;
pub mod telemetry;
pub mod tls;
pub mod topology;
pub mod wake;
pub mod wire;

pub use config::Config;
pub use gateway::{Gateway, GatewayHandle};

/// The runtime the gateway runs on: `threads` workers (0: one per CPU), I/O only.
///
/// One thread suits a gateway sharing a small machine with PostgreSQL: no cross-thread
/// wake-ups on the data path. It has no time driver: timers come from [`clock`].
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if threads > 1 {
            b.worker_threads(threads);
        }
        b
    };
    builder.enable_io().build()
}

/// Locks `m`, taking over a lock poisoned by a panic elsewhere (what it guards stays usable).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
