//! CancelRequests: the client quotes the gateway's key; the backend gets its own.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpStream, UnixStream};
use understudy_protocol::startup::CancelKey;

use crate::sessions::Registry;
use crate::stream::{PeerAddr, Stream};
use crate::wire::send;

/// Forwards a cancel to the backend the session uses now; unknown keys are ignored, as
/// PostgreSQL ignores them, so a guessed key learns nothing.
pub async fn forward(registry: &Registry, key: CancelKey, timeout: Duration) {
    let Some(target) = registry.cancel_target(&key) else {
        metrics::counter!("understudy_cancel_requests_total", "outcome" => "unknown_key")
            .increment(1);
        tracing::debug!(pid = key.pid, "cancel request with an unknown key ignored");
        return;
    };
    let work = async {
        let mut socket = match &target.backend {
            PeerAddr::Tcp(addr) => Stream::Plain(TcpStream::connect(addr).await?),
            PeerAddr::Unix(path) => Stream::Unix(UnixStream::connect(path).await?),
        };
        let mut buf = BytesMut::with_capacity(16);
        postgres_protocol::message::frontend::cancel_request(
            target.key.pid,
            target.key.secret,
            &mut buf,
        );
        send(&mut socket, &buf).await?;
        // The server closes once it has signalled the backend; waiting for that keeps the
        // cancel ordered before our own close of the client's cancel connection.
        let mut sink = [0u8; 64];
        while socket.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    let outcome = match crate::clock::timeout(timeout, work).await {
        Ok(Ok(())) => "forwarded",
        Ok(Err(e)) => {
            tracing::warn!(backend = %target.backend, error = %e, "cancel request could not be forwarded; the session sends it again if it moves");
            registry.note_missed_cancel(&key);
            "failed"
        }
        Err(_) => {
            registry.note_missed_cancel(&key);
            "timeout"
        }
    };
    metrics::counter!("understudy_cancel_requests_total", "outcome" => outcome).increment(1);
}
