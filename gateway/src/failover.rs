//! The failover coordinator: decides that the primary is gone, gets a new one (promoting the
//! standby itself with `promote = "auto"`, or waiting for an orchestrator), and fences the old.
//!
//! Every session whose backend breaks asks here; the first runs the procedure and the others
//! wait for its outcome, so a failover happens once however many sessions notice it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{Failover, Promote};
use crate::topology::{control_client, probe, Backend, Topology};

/// A new primary and what the gateway knows of how it became one.
#[derive(Debug, Clone)]
pub struct Promotion {
    /// The primary to move sessions to.
    pub primary: Backend,
    /// The primary that failed.
    pub failed: Backend,
    /// Where the new primary's transaction IDs stood, when the gateway promoted it itself.
    pub xids: Option<XidBounds>,
    /// How far the standby had replayed when the gateway promoted it: WAL past this point
    /// (commits clients saw) did not reach the new primary.
    pub wal_end: Option<u64>,
    /// When the coordinator started on this failover.
    pub started: Instant,
}

/// The transaction IDs of a standby the gateway promoted, which tell an xid the old primary
/// gave a transaction from one the new primary gave another after its promotion (xids are
/// given out again from where the standby's replay left them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XidBounds {
    /// One past the newest transaction the standby's replay had seen end, once it had
    /// replayed what it received, read before it was promoted: no xid below it is given out
    /// again, so the status there of one below it is the old primary's transaction's.
    pub replayed: u64,
    /// The same, read right after the promotion: no transaction of the old primary's at or
    /// above it committed there. Between the two, a committed xid may be another transaction's
    /// (a client connected to the new primary directly may write before this is read).
    pub promoted: u64,
}

impl XidBounds {
    /// What the status `committed` of `xid` on the new primary says of the old primary's
    /// transaction with that xid.
    pub fn committed(&self, xid: u64) -> Committed {
        if xid < self.replayed {
            Committed::Yes
        } else if xid < self.promoted {
            Committed::Unknown
        } else {
            Committed::No
        }
    }

    /// Whether `xid` was given out by the new primary, if at all: never the old primary's
    /// commit.
    pub fn after_promotion(&self, xid: u64) -> bool {
        xid >= self.promoted
    }
}

/// Whether the old primary's transaction committed, as far as the new primary tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// It did.
    Yes,
    /// It did not.
    No,
    /// The new primary's answer may be about another transaction.
    Unknown,
}

/// Why no new primary is coming.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FailoverError {
    /// The old primary answers as a primary: the session ended for another reason.
    #[error("the primary is still up")]
    PrimaryAlive,
    /// No session can move (see [`Coordinator::disabled`]).
    #[error("failover is disabled: {0}")]
    Disabled(&'static str),
    /// No primary within the timeout, or promotion failed.
    #[error("no new primary: {0}")]
    NoPrimary(String),
}

/// Runs failovers, one at a time.
pub struct Coordinator {
    topology: Arc<Topology>,
    config: Failover,
    last: tokio::sync::Mutex<Option<Promotion>>,
}

impl Coordinator {
    /// A coordinator over `topology`.
    pub fn new(topology: Arc<Topology>, config: Failover) -> Self {
        Self {
            topology,
            config,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// The failover settings.
    pub fn config(&self) -> &Failover {
        &self.config
    }

    /// Why no session can move, if none can: failover is turned off, or no other backend is
    /// configured to move to. Such sessions keep no journal and capture no xid or WAL position.
    pub fn disabled(&self) -> Option<&'static str> {
        if self.config.promote == Promote::Off {
            Some("failover.promote = \"off\"")
        } else if self.topology.backends().len() < 2 {
            Some("only one backend is configured, so there is no server to move to")
        } else {
            None
        }
    }

    /// Whether `backend` is up as a primary (the health probe, with retries for a saturated
    /// machine: a refused connection is conclusive at once, a slow answer is not). A server
    /// that answers but turns the probe away (too many connections, say) is up: a primary
    /// does not change role without a restart.
    pub async fn primary_alive(&self, backend: &Backend) -> bool {
        self.primary_answers(backend, self.config.probe_attempts.max(1))
            .await
    }

    /// Whether `backend` answers as a primary within `attempts` health probes.
    async fn primary_answers(&self, backend: &Backend, attempts: u32) -> bool {
        let control = self.topology.control();
        for attempt in 0..attempts {
            match probe(backend, control, self.config.probe_timeout()).await {
                Ok(in_recovery) => return !in_recovery,
                Err(e) if e.server_up => {
                    tracing::warn!(%backend, error = %e, "the primary turns the health probe away but is up; no failover");
                    return true;
                }
                Err(e) if refused(&e.text) => return false,
                Err(e) => {
                    tracing::debug!(%backend, attempt, error = %e, "health probe failed");
                    crate::clock::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        false
    }

    /// The primary to move to after `failed` broke a session.
    pub async fn recover(&self, failed: &Backend) -> Result<Promotion, FailoverError> {
        if let Some(why) = self.disabled() {
            return Err(FailoverError::Disabled(why));
        }
        let mut last = self.last.lock().await;
        if let Some(p) = last.as_ref() {
            if p.failed == *failed && self.topology.current_primary().as_ref() == Some(&p.primary) {
                return Ok(p.clone());
            }
        }
        let started = Instant::now();
        if self.primary_alive(failed).await {
            return Err(FailoverError::PrimaryAlive);
        }
        tracing::warn!(primary = %failed, mode = ?self.config.promote, "primary is down; failing over");
        metrics::counter!("understudy_failovers_total").increment(1);
        let deadline = started + self.config.timeout();
        let result = match self.config.promote {
            Promote::Auto => self.promote_standby(failed, deadline).await,
            _ => self.await_external(failed, deadline).await,
        };
        let (primary, (xids, wal_end)) = match result {
            Ok(r) => r,
            Err(e) => {
                metrics::counter!("understudy_failover_failures_total").increment(1);
                tracing::error!(error = %e, "failover failed");
                return Err(e);
            }
        };
        self.topology.switch_primary(failed, &primary);
        let took = started.elapsed();
        metrics::histogram!("understudy_failover_promotion_seconds").record(took.as_secs_f64());
        tracing::info!(%primary, old = %failed, ?xids, took_ms = took.as_millis() as u64, "new primary; old one fenced");
        let promotion = Promotion {
            primary,
            failed: failed.clone(),
            xids,
            wal_end,
            started,
        };
        *last = Some(promotion.clone());
        Ok(promotion)
    }

    /// `promote = "auto"`: with two witnesses that the primary is gone (this gateway cannot
    /// reach it, and the standby's WAL receiver has lost it), promote the standby (which first
    /// replays all it received), reading its xids before and after (see [`XidBounds`]) and
    /// where replay ended. Standbys that still hear the primary are asked again every
    /// [`WITNESS_POLL`], each over a connection kept for the whole failover.
    async fn promote_standby(
        &self,
        failed: &Backend,
        deadline: Instant,
    ) -> Result<(Backend, (Option<XidBounds>, Option<u64>)), FailoverError> {
        let control = self.topology.control();
        let timeout = self.config.probe_timeout();
        let backends = self.topology.backends();
        let mut clients: Vec<Option<tokio_postgres::Client>> =
            backends.iter().map(|_| None).collect();
        // The primary may come back meanwhile: then this is no failover. One answer says so
        // (its absence was confirmed already). Watched only between attempts, never during
        // one: a promotion under way is not abandoned.
        let came_back = async {
            while !self.primary_answers(failed, 1).await {
                crate::clock::sleep(WITNESS_POLL).await;
            }
        };
        tokio::pin!(came_back);
        let mut last_error = String::from("no standby to promote (none configured, or fenced)");
        while Instant::now() < deadline {
            // Looked at again each round: a fenced old primary the topology adopts back as a
            // standby (seeded again after an earlier failover) is a candidate from then on.
            for (standby, slot) in backends.iter().zip(&mut clients) {
                if standby == failed || self.topology.is_fenced(standby) {
                    continue;
                }
                if slot.as_ref().is_none_or(|c| c.is_closed()) {
                    match control_client(standby, control, "understudy-failover", timeout).await {
                        Ok(c) => *slot = Some(c),
                        Err(e) => {
                            last_error = format!("{standby}: {e}");
                            continue;
                        }
                    }
                }
                let Some(client) = slot.as_ref() else {
                    continue;
                };
                match self.try_promote(client, standby).await {
                    Ok(Some(known)) => return Ok((standby.clone(), known)),
                    Ok(None) => last_error = format!("{standby} still hears the primary"),
                    Err(e) => {
                        last_error = format!("{standby}: {e}");
                        *slot = None;
                    }
                }
            }
            tokio::select! {
                _ = &mut came_back => return Err(FailoverError::PrimaryAlive),
                _ = crate::clock::sleep(WITNESS_POLL) => {}
            }
        }
        Err(FailoverError::NoPrimary(last_error))
    }

    /// One attempt on one standby: `Ok(None)` means "not yet" (it still hears the primary);
    /// `Ok(Some(..))` means it is the primary now, with its xids and where its replay ended
    /// when the gateway promoted it.
    async fn try_promote(
        &self,
        client: &tokio_postgres::Client,
        standby: &Backend,
    ) -> Result<Option<(Option<XidBounds>, Option<u64>)>, String> {
        let e = |e: tokio_postgres::Error| e.to_string();
        let timeout = self.config.probe_timeout();
        let witness = client.query_one(
            "SELECT pg_is_in_recovery(), r.pid IS NOT NULL, r.status,
                    (extract(epoch FROM now() - r.last_msg_receipt_time) * 1000)::float8,
                    (SELECT setting::int8 FROM pg_settings WHERE name = 'wal_receiver_timeout')
               FROM (SELECT) AS one LEFT JOIN pg_stat_wal_receiver AS r ON true",
            &[],
        );
        let row = crate::clock::timeout(timeout, witness)
            .await
            .map_err(|_| format!("no answer within {timeout:?}"))?
            .map_err(e)?;
        let in_recovery: bool = row.get(0);
        if !in_recovery {
            // Promoted by someone else: accept it, but its xids are not ours to know.
            return Ok(Some((None, None)));
        }
        let receiver = WalReceiver {
            running: row.get(1),
            status: row.get(2),
            silence_ms: row.get(3),
            timeout_ms: row.get::<_, Option<i64>>(4).unwrap_or(0),
        };
        if receiver.hears_primary(self.config.standby_silence_ms)? {
            tracing::debug!(%standby, ?receiver, "standby still hears the primary; not promoting");
            return Ok(None);
        }
        let replayed = replayed_xid_bound(client).await?;
        // Before it ends recovery the standby replays every whole record it received. Its
        // end is polled for: pg_promote(true) looks only every 100 ms.
        let signalled: bool = client
            .query_one("SELECT pg_promote(false)", &[])
            .await
            .map_err(e)?
            .get(0);
        if !signalled {
            return Err("pg_promote() could not signal the standby".to_owned());
        }
        let give_up = Instant::now() + PROMOTE_TIMEOUT;
        loop {
            let in_recovery: bool = client
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .map_err(e)?
                .get(0);
            if !in_recovery {
                break;
            }
            if Instant::now() >= give_up {
                return Err(format!(
                    "still in recovery {PROMOTE_TIMEOUT:?} after pg_promote()"
                ));
            }
            crate::clock::sleep(PROMOTE_POLL).await;
        }
        let wal_end: Option<String> = client
            .query_one("SELECT pg_last_wal_replay_lsn()::text", &[])
            .await
            .map_err(e)?
            .get(0);
        let wal_end = wal_end.as_deref().and_then(crate::session::parse_lsn);
        let promoted = xid_bound(client).await?;
        Ok(Some((Some(XidBounds { replayed, promoted }), wal_end)))
    }

    /// `promote = "external"`: wait until an orchestrator has made another backend primary.
    async fn await_external(
        &self,
        failed: &Backend,
        deadline: Instant,
    ) -> Result<(Backend, (Option<XidBounds>, Option<u64>)), FailoverError> {
        while Instant::now() < deadline {
            self.topology.probe_all().await;
            if let Some(p) = self.topology.current_primary().filter(|p| p != failed) {
                return Ok((p, (None, None)));
            }
            crate::clock::sleep(Duration::from_millis(100)).await;
        }
        Err(FailoverError::NoPrimary(format!(
            "no backend other than {failed} became primary within {:?}",
            self.config.timeout()
        )))
    }
}

/// Pause between promotion attempts on standbys that still hear the primary.
const WITNESS_POLL: Duration = Duration::from_millis(50);

/// What a standby's `pg_stat_wal_receiver` says of its connection to the primary.
#[derive(Debug, Clone, PartialEq)]
struct WalReceiver {
    /// A WAL receiver process exists.
    running: bool,
    /// Its status; `None` when the role may not see it (or there is no receiver).
    status: Option<String>,
    /// Time since it last heard the primary, in ms.
    silence_ms: Option<f64>,
    /// The standby's `wal_receiver_timeout`, in ms (0: off).
    timeout_ms: i64,
}

impl WalReceiver {
    /// Whether the receiver still hears the primary: streaming, and heard from more recently
    /// than its own ping plus `grace_ms`. A receiver pings the primary after
    /// `wal_receiver_timeout / 2` of silence (an idle primary sends nothing before that), so
    /// only silence past the ping's answer is a witness; with the timeout off it never pings,
    /// and only a receiver that stopped streaming is one.
    fn hears_primary(&self, grace_ms: u64) -> Result<bool, String> {
        if !self.running {
            return Ok(false);
        }
        let Some(status) = &self.status else {
            return Err("the control role may not read pg_stat_wal_receiver (grant it pg_read_all_stats), so the standby cannot witness that the primary is gone".to_owned());
        };
        if status != "streaming" {
            return Ok(false);
        }
        if self.timeout_ms <= 0 {
            return Ok(true);
        }
        let bound = self.timeout_ms as f64 / 2.0 + grace_ms as f64;
        Ok(self.silence_ms.is_none_or(|silence| silence < bound))
    }
}

/// [`XidBounds::replayed`] of a standby, read once its replay has caught up with the WAL it
/// received (the primary is gone: no more comes), before it is promoted. Replay that stops
/// short of what was received (a record the primary died in the middle of sending is never
/// whole) is taken as done once it has not moved for [`REPLAY_STILL`]; after
/// [`REPLAY_SETTLE`] the bound is read as it stands (commits replayed later are then in doubt,
/// never taken for another's).
async fn replayed_xid_bound(client: &tokio_postgres::Client) -> Result<u64, String> {
    let give_up = Instant::now() + REPLAY_SETTLE;
    let mut still_since: Option<(String, Instant)> = None;
    loop {
        let row = client
            .query_one(
                "SELECT pg_last_wal_replay_lsn() >= pg_last_wal_receive_lsn(),
                        pg_last_wal_replay_lsn()::text,
                        pg_snapshot_xmax(pg_current_snapshot())::text",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?;
        let caught_up: Option<bool> = row.get(0);
        let replay: Option<String> = row.get(1);
        let xmax: String = row.get(2);
        let replay = replay.unwrap_or_default();
        let still = match &still_since {
            Some((at, since)) if *at == replay => since.elapsed() >= REPLAY_STILL,
            _ => {
                still_since = Some((replay, Instant::now()));
                false
            }
        };
        if caught_up != Some(false) || still || Instant::now() >= give_up {
            return xmax.parse().map_err(|e| format!("xid bound {xmax:?}: {e}"));
        }
        crate::clock::sleep(PROMOTE_POLL).await;
    }
}

/// How often a standby's replay, and the end of its promotion, are looked at.
const PROMOTE_POLL: Duration = Duration::from_millis(5);

/// How long replay must stand still to count as done with what was received.
const REPLAY_STILL: Duration = Duration::from_millis(20);

/// Longest wait for a standby's replay to catch up before it is promoted.
const REPLAY_SETTLE: Duration = Duration::from_secs(1);

/// Longest wait for a promoted standby to leave recovery.
const PROMOTE_TIMEOUT: Duration = Duration::from_secs(60);

/// One past the newest transaction the server has seen end, read without assigning an xid.
async fn xid_bound(client: &tokio_postgres::Client) -> Result<u64, String> {
    let text: String = client
        .query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text", &[])
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    text.parse().map_err(|e| format!("xid bound {text:?}: {e}"))
}

fn refused(error: &str) -> bool {
    error.contains("Connection refused") || error.contains("connection refused")
}

/// The health monitor: when the routed primary stops answering the periodic role probe, it
/// runs the failover even if no session has noticed (idle gateways fail over too). The
/// coordinator re-probes before acting, so one missed probe on a busy machine does nothing.
pub async fn monitor(shared: Arc<crate::gateway::Shared>, mut shutdown: crate::shutdown::Shutdown) {
    if shared.failover.disabled().is_some() {
        return;
    }
    let interval = Duration::from_millis(shared.config.topology_interval_ms.max(50));
    let topology = &shared.topology;
    let mut routed = topology.current_primary();
    loop {
        tokio::select! {
            // First: a lost primary stays lost, and must not win every draw against shutdown.
            biased;
            _ = shutdown.draining() => return,
            _ = crate::clock::sleep(interval) => {}
            // Straight from the probe that found it, rather than up to an interval later.
            _ = topology.primary_lost() => {}
        }
        let before = std::mem::replace(&mut routed, topology.current_primary());
        let Some(primary) = routed.clone() else {
            continue;
        };
        // The routed primary stopped answering; or the probes found another primary (promoted
        // by an orchestrator) while the old one stopped answering, which is a failover too: its
        // sessions must leave it, and only a fenced primary makes them.
        let failed = if topology.unreachable(&primary) {
            primary
        } else {
            match before {
                Some(old)
                    if old != primary
                        && topology.unreachable(&old)
                        && !topology.is_fenced(&old) =>
                {
                    old
                }
                _ => continue,
            }
        };
        // A failover waiting for an external promotion would hold a shutdown up for as long
        // as `failover.timeout_ms`; sessions that still need it run their own.
        let recovered = tokio::select! {
            r = shared.failover.recover(&failed) => r,
            _ = shutdown.draining() => return,
        };
        match recovered {
            Ok(p) => tracing::info!(primary = %p.primary, "health monitor: failed over"),
            Err(FailoverError::PrimaryAlive) => {}
            Err(e) => tracing::warn!(error = %e, "health monitor: failover did not complete"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receiver(status: Option<&str>, silence_ms: f64, timeout_ms: i64) -> WalReceiver {
        WalReceiver {
            running: true,
            status: status.map(str::to_owned),
            silence_ms: Some(silence_ms),
            timeout_ms,
        }
    }

    #[test]
    fn silence_witnesses_only_past_the_receivers_ping() {
        // An idle, healthy primary: 20 s of silence is normal before a 60 s timeout's ping.
        assert_eq!(
            receiver(Some("streaming"), 20_000.0, 60_000).hears_primary(2_000),
            Ok(true)
        );
        assert_eq!(
            receiver(Some("streaming"), 31_900.0, 60_000).hears_primary(2_000),
            Ok(true)
        );
        assert_eq!(
            receiver(Some("streaming"), 32_100.0, 60_000).hears_primary(2_000),
            Ok(false)
        );
        assert_eq!(
            receiver(Some("streaming"), 4_600.0, 5_000).hears_primary(2_000),
            Ok(false)
        );
        // Timeout off: the receiver never pings, so silence proves nothing.
        assert_eq!(
            receiver(Some("streaming"), 1e9, 0).hears_primary(2_000),
            Ok(true)
        );
    }

    #[test]
    fn a_receiver_that_stopped_streaming_or_is_gone_has_lost_the_primary() {
        assert_eq!(
            receiver(Some("waiting"), 0.0, 5_000).hears_primary(2_000),
            Ok(false)
        );
        let gone = WalReceiver {
            running: false,
            status: None,
            silence_ms: None,
            timeout_ms: 5_000,
        };
        assert_eq!(gone.hears_primary(2_000), Ok(false));
    }

    #[test]
    fn a_receiver_the_role_may_not_see_is_no_witness() {
        let hidden = receiver(None, 0.0, 5_000);
        assert!(hidden
            .hears_primary(2_000)
            .unwrap_err()
            .contains("pg_read_all_stats"));
    }
}
