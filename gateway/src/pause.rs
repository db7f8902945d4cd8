//! Pausing the gateway (`POST /pause`, `understudy ctl pause`): every session is held at its
//! next transaction boundary, so that nothing is in flight while an operator restarts or
//! switches over the primary; `POST /resume` lets the held requests through (to the new
//! primary, if the sessions moved meanwhile).

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::gateway::Shared;

/// How often a pause looks whether every session is held.
const POLL: Duration = Duration::from_millis(10);

/// What a pause came to.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// Whether the gateway is paused now (every session held).
    pub paused: bool,
    /// Sessions held.
    pub held: usize,
    /// Sessions still in a transaction (or logging in) when the pause gave up.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub busy_sessions: Vec<u64>,
    /// Why the gateway is not paused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Holds every session at its next transaction boundary and waits, up to `timeout`, until all
/// are held. A pause that cannot finish in time is lifted again, so the gateway is either
/// paused with nothing in flight or running as before.
pub async fn pause(shared: &Shared, timeout: Duration) -> Outcome {
    let deadline = Instant::now() + timeout;
    let mut holds = shared.hold.subscribe();
    shared.hold.send_replace(true);
    holds.mark_unchanged();
    tracing::info!(
        ?timeout,
        "pausing: holding every session at its next transaction boundary"
    );
    loop {
        let busy = shared.registry.not_held();
        if busy.is_empty() {
            let held = shared.registry.len();
            tracing::info!(held, "paused");
            return Outcome {
                paused: true,
                held,
                busy_sessions: busy,
                error: None,
            };
        }
        let error = if holds.has_changed().unwrap_or(true) && !*holds.borrow() {
            Some("resumed before every session was held".to_owned())
        } else if Instant::now() >= deadline {
            shared.hold.send_replace(false);
            Some(format!(
                "{} session(s) did not reach a transaction boundary within {timeout:?}; resumed",
                busy.len()
            ))
        } else {
            None
        };
        if let Some(error) = error {
            tracing::warn!(%error, busy = ?busy, "pause not completed");
            return Outcome {
                paused: false,
                held: shared.registry.len().saturating_sub(busy.len()),
                busy_sessions: busy,
                error: Some(error),
            };
        }
        crate::clock::sleep(POLL).await;
    }
}

/// Lets every held session go on; returns whether the gateway was paused.
pub fn resume(shared: &Shared) -> bool {
    let was = shared.hold.send_replace(false);
    tracing::info!(was_paused = was, "resumed");
    was
}
