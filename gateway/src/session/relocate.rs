//! Moving a session to a new primary on the same client connection: log in again, restore
//! session state, settle the open transaction (COMMIT outcome, or replay verified against what
//! the client saw), then hand the new backend to the data path.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use understudy_protocol::encode;
use understudy_protocol::inspect::ErrorView;
use understudy_protocol::startup::CancelKey;
use understudy_protocol::tags::backend;
use understudy_replay::journal::{
    completes_request, digested, Digest, DigestBuilder, Group, SessionState, Unreplayable,
};

use super::{AsBatch, Owner, Poison, RequestStart, Session, XID_QUERY, XID_TAIL_FLUSHED};
use crate::auth::login::login;
use crate::error::SessionError;
use crate::failover::{Committed, FailoverError, Promotion};
use crate::pump::Pipe;
use crate::sessions::CancelTarget;
use crate::stream::Stream;
use crate::wire::{read_message, send, ReadError};

/// How long one step of a move (a restore statement, a replayed request) may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a moved session, or one logging in meanwhile, waits for the sessions with LISTENs
/// to issue them on the new primary before it goes on (see `Session::await_listeners`).
const LISTENERS_WAIT: Duration = Duration::from_secs(2);

/// How often it looks.
const LISTENERS_POLL: Duration = Duration::from_millis(5);

/// A reset of the backend connection this soon after the last request was sent says the
/// server never read it (see `Session::reset_soon_after`): a host that took over a dead server's
/// address would reset it too, knowing nothing of it, but that takes longer after a crash (and
/// for a request sent before the crash, which the server may have read, the reset comes after
/// the takeover).
const RESET_WITHIN: Duration = Duration::from_millis(100);

/// Why a move failed, for the client (always FATAL: the session cannot continue).
fn cannot_move(code: &'static str, message: String) -> SessionError {
    SessionError::BackendUnavailable { code, message }
}

/// What the new primary says of the transaction whose COMMIT answer was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CommitOutcome {
    /// It committed there: the client gets its COMMIT.
    Committed,
    /// It did not: replay it.
    NotCommitted,
    /// Cannot be told (the xid may have been reused by someone else's transaction).
    InDoubt,
}

/// What running an autocommit batch again on the new primary came to.
enum Rerun {
    /// The answer the client has: the batch ran and, unless `answer` (the server's answer to
    /// its Sync) has an error, committed as `xid`.
    Same { xid: Option<u64>, answer: BytesMut },
    /// Another answer: rolled back.
    Diverged,
}

impl CommitOutcome {
    /// Counts a commit in flight at a failover by what became of it.
    fn count(self) {
        let outcome = match self {
            CommitOutcome::Committed => "committed",
            CommitOutcome::NotCommitted => "replayed",
            CommitOutcome::InDoubt => "unknown",
        };
        metrics::counter!("understudy_in_doubt_commits_total", "outcome" => outcome).increment(1);
    }
}

/// A new backend connection being brought up to date before it joins the data path.
struct Fresh {
    stream: Stream,
    buf: BytesMut,
    /// The parameters the new backend reported: at login, and as the move changed them.
    params: Vec<(String, String)>,
}

impl Fresh {
    /// The next whole message from the new backend (its parameter reports noted).
    async fn recv(&mut self) -> Result<(u8, Bytes), String> {
        let frame = crate::clock::timeout(
            STEP_TIMEOUT,
            read_message(&mut self.stream, &mut self.buf, usize::MAX >> 1),
        )
        .await
        .map_err(|_| "the new primary did not answer in time".to_owned())?
        .map_err(|e| match e {
            ReadError::Io(e) => e.to_string(),
            ReadError::Frame(e) => e.to_string(),
        })?;
        if frame.tag == backend::PARAMETER_STATUS {
            if let Some((name, value)) =
                understudy_protocol::inspect::parameter_status(&frame.raw[5..])
            {
                super::record_param(&mut self.params, name, value);
            }
        }
        Ok((frame.tag, frame.raw))
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        send(&mut self.stream, bytes)
            .await
            .map_err(|e| e.to_string())
    }

    /// Runs a statement of the gateway's own (leaving the unnamed statement the move gives the
    /// new backend as it is); returns the first column of the first row.
    async fn query(&mut self, sql: &str) -> Result<Option<String>, String> {
        let mut q = BytesMut::new();
        encode::internal_query(&mut q, sql);
        self.send(&q).await?;
        let mut value = None;
        let mut error = None;
        loop {
            let (tag, raw) = self.recv().await?;
            match tag {
                backend::DATA_ROW if value.is_none() => {
                    value = Some(
                        understudy_protocol::inspect::first_column(&raw[5..])
                            .map(|text| String::from_utf8_lossy(text).into_owned()),
                    )
                }
                backend::ERROR_RESPONSE => {
                    let e = ErrorView::parse(&raw[5..]);
                    error = Some(format!("{} {}", e.code, e.message));
                }
                backend::READY_FOR_QUERY => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(format!("{sql}: {e}")),
            None => Ok(value.flatten()),
        }
    }

    /// Runs what recreates `state`: its SQL statements, then its Parse messages, each synced
    /// on its own. A statement whose table, column, function, type or schema is gone (dropped
    /// since the client prepared it, as a driver's statement cache keeps them) cannot be made
    /// again; it is left out, as the old backend would have failed it at its next use, rather
    /// than keep the whole session from moving.
    async fn restore(&mut self, state: &SessionState) -> Result<(), String> {
        for sql in state.restore_sql() {
            self.query(&sql).await?;
        }
        let parses: Vec<&Bytes> = state.restore_parses().collect();
        if parses.is_empty() {
            return Ok(());
        }
        let mut batch = BytesMut::new();
        for parse in &parses {
            batch.extend_from_slice(parse);
            postgres_protocol::message::frontend::sync(&mut batch);
        }
        self.send(&batch).await?;
        let mut error = None;
        let mut synced = 0;
        while synced < parses.len() {
            let (tag, raw) = self.recv().await?;
            match tag {
                backend::ERROR_RESPONSE => {
                    let e = ErrorView::parse(&raw[5..]);
                    let mut body = parses[synced].get(5..).unwrap_or_default();
                    let name = crate::wire::cstr(&mut body).unwrap_or("?");
                    if OBJECT_GONE.contains(&e.code) {
                        tracing::warn!(
                            statement = name,
                            code = e.code,
                            error = e.message,
                            "a prepared statement could not be made again on the new primary; left out (the client gets 26000 if it uses it)"
                        );
                    } else if error.is_none() {
                        error = Some(format!("{} {}", e.code, e.message));
                    }
                }
                backend::READY_FOR_QUERY => synced += 1,
                _ => {}
            }
        }
        error.map_or(Ok(()), Err)
    }

    /// Runs again, up to its Sync, an autocommit batch (with the xid query behind it) whose
    /// commit the new primary lacks and whose answer the client has but for its
    /// ReadyForQuery (`seen`: its digest). The same answer commits it, and the server's answer
    /// to the Sync is returned with the new xid; any other is rolled back.
    async fn rerun_batch(&mut self, group: &Group, seen: Digest) -> Result<Rerun, String> {
        const SYNC: &[u8] = b"S\0\0\0\x04";
        let Some(requests) = group.request.strip_suffix(SYNC) else {
            return Err("the batch does not end with its Sync".to_owned());
        };
        let mut batch = BytesMut::from(requests);
        // Flushed: the answer is checked before the Sync commits it.
        batch.extend_from_slice(&XID_TAIL_FLUSHED);
        self.send(&batch).await?;
        let mut digest = DigestBuilder::default();
        let mut completions = 0;
        // The xid query's answer: a completion for each of its requests, and its one row.
        let tail_messages = encode::INTERNAL_REQUESTS + 1;
        let mut tail = 0;
        let mut xid = None;
        let mut same = true;
        while tail < tail_messages {
            let (tag, raw) = self.recv().await?;
            if tag == backend::ERROR_RESPONSE {
                // Failed this time, where it did not before; the server now waits for a Sync.
                same = false;
                break;
            }
            if completions < group.requests {
                if digested(tag, &raw) {
                    digest.update(&raw);
                }
                completions += u32::from(completes_request(tag));
            } else {
                tail += tail_answer(tag, &raw, &mut xid);
            }
        }
        self.end_rerun(same && digest.digest() == seen, xid, BytesMut::new())
            .await
    }

    /// Ends a batch run again up to its Sync: commits it if it answered the `same`, else
    /// rolls it back (an error before the Sync). Committed, the client is owed `owed` and the
    /// server's answer to the Sync, and `xid` is the commit's (none if the commit failed, as a
    /// deferred constraint's does).
    async fn end_rerun(
        &mut self,
        same: bool,
        xid: Option<u64>,
        mut owed: BytesMut,
    ) -> Result<Rerun, String> {
        let mut end = BytesMut::new();
        if !same {
            encode::internal_request(
                &mut end,
                "DO $understudy$ BEGIN RAISE EXCEPTION 'diverged'; END $understudy$",
            );
        }
        postgres_protocol::message::frontend::sync(&mut end);
        self.send(&end).await?;
        let mut answer = BytesMut::new();
        let mut failed = false;
        loop {
            let (tag, raw) = self.recv().await?;
            answer.extend_from_slice(&raw);
            failed |= tag == backend::ERROR_RESPONSE;
            if tag == backend::READY_FOR_QUERY {
                break;
            }
        }
        if !same {
            return Ok(Rerun::Diverged);
        }
        if failed {
            // What was owed never was: the error stands in its place.
            owed.clear();
        }
        owed.extend_from_slice(&answer);
        Ok(Rerun::Same {
            xid: xid.filter(|_| !failed),
            answer: owed,
        })
    }

    /// Runs again, as the batch it was sent as, an autocommit Query of one data change whose
    /// commit the new primary lacks and whose xid the gateway had (see `AsBatch`): the client
    /// has of its answer a RETURNING's RowDescription and rows (`seen`: their digest). The same
    /// answer commits it, and what the client is still owed is returned (the CommandComplete
    /// and the server's answer to the Sync, as a Query's answer ends) with the new xid; any
    /// other is rolled back.
    async fn rerun_query(&mut self, group: &Group, seen: Digest) -> Result<Rerun, String> {
        if group.request.first() != Some(&b'Q') {
            return Err("the request is not a Query".to_owned());
        }
        let mut batch = BytesMut::new();
        super::parse_of_query(&group.request, &mut batch);
        super::query_batch_run(&mut batch);
        // Flushed: the answer is checked before the Sync commits it.
        batch.extend_from_slice(&XID_TAIL_FLUSHED);
        self.send(&batch).await?;
        let mut digest = DigestBuilder::default();
        // What a Query would not have sent yet: the RowDescription before the statement ran,
        // the CommandComplete.
        let mut owed = BytesMut::new();
        let mut completed = false;
        let tail_messages = encode::INTERNAL_REQUESTS + 1;
        let mut tail = 0;
        let mut xid = None;
        let mut same = true;
        while tail < tail_messages {
            let (tag, raw) = self.recv().await?;
            match tag {
                backend::ERROR_RESPONSE => {
                    same = false;
                    break;
                }
                _ if completed => tail += tail_answer(tag, &raw, &mut xid),
                backend::ROW_DESCRIPTION => owed.extend_from_slice(&raw),
                backend::DATA_ROW => {
                    digest.update(&owed);
                    owed.clear();
                    digest.update(&raw);
                }
                backend::COMMAND_COMPLETE => {
                    // The statement ran: its RowDescription is passed on even with no row.
                    digest.update(&owed);
                    owed.clear();
                    owed.extend_from_slice(&raw);
                    completed = true;
                }
                _ => {}
            }
        }
        // Committed, the statement is complete.
        self.end_rerun(same && digest.digest() == seen, xid, owed)
            .await
    }

    /// Replays a request group whose full answer the client has seen; checks the answer.
    async fn replay_answered(&mut self, group: &Group) -> Result<bool, String> {
        self.send(&group.request).await?;
        let mut digest = DigestBuilder::default();
        loop {
            let (tag, raw) = self.recv().await?;
            if digested(tag, &raw) {
                digest.update(&raw);
            }
            if tag == backend::READY_FOR_QUERY {
                return Ok(digest.digest() == group.answer);
            }
        }
    }
}

/// Counts a message of the xid query's answer (1 if it is one, see `is_tail_answer`), noting
/// the xid from its row.
fn tail_answer(tag: u8, raw: &[u8], xid: &mut Option<u64>) -> usize {
    if tag == backend::DATA_ROW {
        *xid = super::parse_xid_row(&raw[5..]);
    }
    usize::from(super::is_tail_answer(tag))
}

/// The query for what became of transaction `xid` (its names qualified: the session's
/// `search_path` is restored by then).
fn xact_status(xid: u64) -> String {
    format!("SELECT pg_catalog.pg_xact_status('{xid}'::pg_catalog.xid8)")
}

/// Refuses the move when `g`, a request to be sent again, was too large to be kept.
fn resendable(g: &Group) -> Result<(), SessionError> {
    if g.truncated {
        return Err(cannot_move(
            "08006",
            "connection to the database server lost; a request in flight was larger than failover.max_replay_bytes and could not be sent again".to_owned(),
        ));
    }
    Ok(())
}

/// A request the new primary answers with an ERROR of `code`, in order with the requests
/// around it (the client hears it where it expects that request's answer): the gateway's own
/// query up to a Sync, whose ErrorResponse and ReadyForQuery go to the client (the rest is
/// dropped). Under the gateway's statement name, it leaves the client's unnamed statement as
/// the client's request, had it failed on its own, would have left it.
fn raise(code: &str, message: &str) -> BytesMut {
    let sql = format!(
        "DO $understudy$ BEGIN RAISE EXCEPTION USING ERRCODE = '{code}', MESSAGE = '{}'; END $understudy$",
        message.replace('\'', "''")
    );
    let mut q = BytesMut::new();
    encode::internal_query(&mut q, &sql);
    q
}

/// The parameters the server reports (`GUC_REPORT`) that a session can set: a move gives the
/// new backend the session's values of these, whatever changed them.
const SETTABLE_REPORTED: [&str; 7] = [
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "standard_conforming_strings",
    "default_transaction_read_only",
];

/// `value` as an SQL string literal, read the same whatever `standard_conforming_strings` is.
fn quote_literal(value: &str) -> String {
    format!("E'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// SQLSTATEs of a Parse whose statement refers to something that no longer exists:
/// undefined table, column, function, object, schema.
const OBJECT_GONE: [&str; 5] = ["42P01", "42703", "42883", "42704", "3F000"];

pub(super) const DIVERGED: &str = "could not serialize access: the transaction was interrupted by a failover and replaying it did not reproduce what the client saw; retry the transaction";
const IN_DOUBT: &str = "the outcome of this statement is unknown: the primary failed while it ran, and it may or may not have been applied; check before retrying";

impl Session {
    /// Handles a broken backend connection: forwards the server's FATAL if the primary is
    /// alive (the server ended the session), else moves the session to the new primary.
    pub(super) async fn relocate(&mut self, cause: std::io::Error) -> Result<(), SessionError> {
        let failed_at = Instant::now();
        let failed = self.relogin.backend.clone();
        let is_client = |o: Option<&Owner>| {
            matches!(
                o,
                Some(Owner::Client | Owner::ClientThenXid { .. } | Owner::ClientAsBatch)
            )
        };
        let client_last = is_client(self.wire.back());
        // The client's last request, then a WAL-position query of the gateway's.
        let client_then_lsn =
            self.wire.back() == Some(&Owner::Lsn) && is_client(self.wire.iter().rev().nth(1));
        // Bytes of it still waiting to be written never reached the server at all.
        let unwritten = self.pump.up.ready > 0;
        self.last_unread = (client_last && (unwritten || self.reset_soon_after(&cause, failed_at)))
            || ((client_last || client_then_lsn) && self.ended_before_acknowledging(&cause));
        tracing::debug!(
            session = self.guard.info().id,
            %cause,
            client_last,
            client_then_lsn,
            unwritten,
            since_request = ?self.last_request_at.map(|at| failed_at.saturating_duration_since(at)),
            unread = self.last_unread,
            "backend connection lost"
        );
        let promotion = match self.await_promotion(&failed).await {
            Ok(p) => p,
            Err(FailoverError::PrimaryAlive | FailoverError::Disabled(_)) => {
                return Err(self.release_fatal(cause))
            }
            Err(FailoverError::NoPrimary(why)) => {
                return Err(cannot_move(
                    "08006",
                    format!("connection to the database server lost; no new primary within the failover timeout: {why}"),
                ))
            }
        };
        if let Some(why) = self.journal.unmovable() {
            count_move("unmovable");
            return Err(cannot_move(
                "08006",
                format!("connection to the database server lost; the session could not be moved because it holds {why}"),
            ));
        }
        if let crate::auth::Credential::Missing(why) = &self.relogin.credential {
            count_move("no_credential");
            return Err(cannot_move(
                "08006",
                format!(
                    "connection to the database server lost; the session could not be moved: {why}"
                ),
            ));
        }
        // Everything the client was meant to get from the old backend it gets; anything the
        // old backend said past that (a FATAL, half a message) is dropped.
        let partial = self.flush_old_backend().await?;
        // The client has part of the answer to the only request in flight: the server read
        // it, whatever reset the connection (a kernel out of memory for sockets resets them).
        let in_flight = self.journal.groups().iter().filter(|g| !g.answered).count();
        if in_flight == 1 && (partial.is_some() || self.journal.answer_so_far().len > 0) {
            self.last_unread = false;
        }
        if self.last_unread {
            metrics::counter!("understudy_unread_requests_total").increment(1);
            tracing::info!(
                session = self.guard.info().id,
                "the old primary never read the last request in flight (its connection was reset, the request was not all written, or it arrived after the server closed the connection); it runs on the new primary"
            );
        }
        let mut fresh = self.log_in_again(&promotion).await?;
        self.learn_hidden_writes(&mut fresh, failed_at).await;
        self.restore_state(&mut fresh).await?;
        self.await_listeners(&promotion.primary).await;
        self.check_acknowledged_commit(&mut fresh, &promotion)
            .await?;
        let resumed = self
            .settle_transaction(&mut fresh, &promotion, partial)
            .await?;
        self.finish_move(fresh, resumed);
        let stall = failed_at.elapsed();
        metrics::histogram!("understudy_session_move_seconds").record(stall.as_secs_f64());
        count_move("moved");
        tracing::info!(
            session = self.guard.info().id,
            to = %promotion.primary,
            backend_pid = self.backend_pid,
            took_ms = stall.as_millis() as u64,
            "session moved to the new primary"
        );
        Ok(())
    }

    /// Whether the old server's kernel says it never read the last request sent to it (the
    /// caller knows that is a request of the client's, no query of the gateway's behind it):
    /// a connection its process closes (or dies) with data unread is reset (`ECONNRESET`)
    /// instead of ended in order. The data the gateway sends arrives in order, so what is
    /// unread is the end of it: the last request, which a server runs only once it has read
    /// it whole. So: the connection `failed_at` with a reset, within [`RESET_WITHIN`] of that
    /// request.
    fn reset_soon_after(&self, cause: &std::io::Error, failed_at: Instant) -> bool {
        cause.kind() == std::io::ErrorKind::ConnectionReset
            && self
                .last_request_at
                .is_some_and(|at| failed_at.saturating_duration_since(at) <= RESET_WITHIN)
    }

    /// Whether the old server's kernel says it never read the client's last request (the
    /// caller knows that is what was sent last, but for a query of the gateway's, which this
    /// counts too): a connection closed with everything read ends in order, with a FIN that
    /// acknowledges every byte the server's kernel had received, and bytes that arrive after
    /// it are answered with a reset, never acknowledged. So after an orderly end (EOF, or
    /// `EPIPE`: the reset behind it), a request none of whose bytes were acknowledged reached
    /// the server after its process had gone. Over TLS, none of the records written from the
    /// start of the write that began the request on (a record is read whole or not at all).
    /// (A reset behind an orderly end proves nothing by itself: a kernel short of memory for
    /// orphaned sockets resets them after their FIN, whatever was read.)
    fn ended_before_acknowledging(&self, cause: &std::io::Error) -> bool {
        if !matches!(
            cause.kind(),
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::BrokenPipe
        ) {
            return false;
        }
        let Some(from) = self.last_request_from else {
            return false;
        };
        let backend = &self.pump.backend;
        // Over TLS, in records' bytes: from where the write that began the request began.
        let sent = match backend {
            Stream::Plain(_) => Some(self.pump.up.written.saturating_sub(from)),
            Stream::ClientTls(_) => self
                .pump
                .up
                .records_from(from)
                .zip(backend.records_written())
                .map(|(start, now)| now.saturating_sub(start)),
            // A Unix-domain socket counts what its peer has not read yet, and forgets it all
            // when the peer's process dies: no sign that the server never had a request.
            Stream::ServerTls(_) | Stream::Unix(_) => None,
        };
        let Some(sent) = sent else {
            return false;
        };
        let unacknowledged = crate::sockopt::unacknowledged(&backend.fd());
        tracing::debug!(
            session = self.guard.info().id,
            sent,
            ?unacknowledged,
            "bytes of the last request (and after it) the old primary's kernel acknowledged"
        );
        sent > 0 && unacknowledged.is_ok_and(|n| n >= sent)
    }

    /// Judges the requests in flight, and the open transaction's, again with what the new
    /// primary's catalog says makes a read write, asked there unless another session of the
    /// database did since the connection `failed_at`: a view or function made on the old
    /// primary since the catalog was last read would count as a read, and a COMMIT of it in
    /// flight be answered unchecked, or a write in flight be run again. Only where such a
    /// request is kept; without an answer, what was known stands.
    async fn learn_hidden_writes(&mut self, fresh: &mut Fresh, failed_at: Instant) {
        if !self.journal.holds_reads() {
            return;
        }
        let Some(feed) = self.suspects.as_mut() else {
            return;
        };
        let ask = |sql| async move { fresh.query(sql).await.ok().flatten() };
        if let Some(suspects) = feed.since(failed_at, ask).await {
            self.journal.set_suspects(suspects);
        }
    }

    /// Waits for the coordinator, keeping the client's connection warm meanwhile.
    async fn await_promotion(
        &mut self,
        failed: &crate::topology::Backend,
    ) -> Result<Promotion, FailoverError> {
        let shared = self.shared.clone();
        let recover = shared.failover.recover(failed);
        tokio::pin!(recover);
        let mut tick = crate::clock::interval_at(
            tokio::time::Instant::now() + Duration::from_secs(1),
            Duration::from_secs(1),
        );
        loop {
            tokio::select! {
                r = &mut recover => return r,
                _ = tick.tick() => self.keepalive().await,
            }
        }
    }

    /// Re-sends a ParameterStatus the client already has (allowed at any message boundary), so
    /// a client waiting on a failover sees traffic.
    async fn keepalive(&mut self) {
        let Some((name, value)) = self.server_params.first().cloned() else {
            return;
        };
        if self.pump.flush_client().await.is_err() || !self.pump.down.scanner.at_boundary() {
            return;
        }
        let mut msg = BytesMut::new();
        encode::parameter_status(&mut msg, &name, &value);
        let _ = self.pump.client.write_all(&msg).await;
        let _ = self.pump.client.flush().await;
    }

    /// Writes what the client is owed from the old backend; returns the tag and remaining
    /// body bytes of a message the client got only part of.
    async fn flush_old_backend(&mut self) -> Result<Option<(u8, usize)>, SessionError> {
        self.held_fatal = None;
        self.pump
            .flush_client()
            .await
            .map_err(SessionError::ClientGone)?;
        let left = self.pump.down.scanner.body_left();
        self.pump.down = Pipe::from_server(BytesMut::new());
        // Until the move completes that message, the client is in the middle of it (so a
        // failed move closes the connection without writing a FATAL into it).
        self.pump.down.scanner.resume_body(left);
        // Scanned client bytes not yet written are in the journal; they go out again below.
        self.pump.up.discard_ready();
        self.wire.clear();
        // A write whose ReadyForQuery was held has no WAL position: it stays in flight.
        self.held_ready = None;
        self.xid_row = None;
        self.xid_suffix = super::SuffixAnswer::default();
        self.journal.forget_copy_sync();
        self.up_waits_copy = false;
        Ok((left > 0).then_some((self.down_tag, left)))
    }

    /// Connects and authenticates to the new primary with the kept credential.
    async fn log_in_again(&mut self, promotion: &Promotion) -> Result<Fresh, SessionError> {
        let lost = |why: String| {
            cannot_move(
                "08006",
                format!(
                    "could not log in to the new primary {}: {why}",
                    promotion.primary
                ),
            )
        };
        let params = self
            .relogin
            .params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()));
        let mut stream = self
            .shared
            .connector
            .open(&promotion.primary, params)
            .await
            .map_err(|e| lost(e.to_string()))?;
        let mut buf = BytesMut::new();
        login(
            &mut stream,
            &mut buf,
            &self.relogin.user,
            &self.relogin.credential,
        )
        .await
        .map_err(|e| lost(e.into_session_error().to_string()))?;
        let greeting = crate::backend::read_greeting(&mut stream, &mut buf)
            .await
            .map_err(|(_, e)| lost(e.to_string()))?;
        let addr = stream.peer_addr().map_err(|e| lost(e.to_string()))?;
        if let Some((pid, secret)) = greeting.key {
            // The client keeps its key; it now cancels on the new backend.
            self.guard.issue_cancel_key(CancelTarget {
                backend: addr.clone(),
                key: CancelKey { pid, secret },
            });
            self.guard.info().set_backend(addr, pid);
            self.backend_pid = pid;
        }
        self.relogin.backend = promotion.primary.clone();
        Ok(Fresh {
            stream,
            buf,
            params: greeting.params,
        })
    }

    /// Gives the new backend the session's SETs, prepared statements and LISTENs.
    async fn restore_state(&mut self, fresh: &mut Fresh) -> Result<(), SessionError> {
        let failed = |why: String| {
            cannot_move(
                "08006",
                format!("could not restore the session on the new primary: {why}"),
            )
        };
        let state = self.journal.state().before(self.journal.groups());
        fresh.restore(&state).await.map_err(failed)?;
        self.listening = !state.channels().is_empty();
        self.guard
            .set_listens_on(self.listening.then_some(&self.relogin.backend));
        // A function may have changed a reported setting (SET inside its body, set_config()
        // there) where the journal could not see it; the server's report of it, which the
        // client goes by, says what it was at the last transaction boundary.
        let before = self.params_before.as_ref().unwrap_or(&self.server_params);
        for name in SETTABLE_REPORTED {
            let Some((_, value)) = before.iter().find(|(n, _)| n == name) else {
                continue;
            };
            if fresh.params.iter().any(|(n, v)| n == name && v == value) {
                continue;
            }
            let sql = format!(
                "SELECT pg_catalog.set_config('{name}', {}, false)",
                quote_literal(value)
            );
            fresh.query(&sql).await.map_err(failed)?;
        }
        Ok(())
    }

    /// Waits, up to [`LISTENERS_WAIT`], until no session has LISTENs on a fenced server (each
    /// of those is moving to `primary`, or ending): sessions move one by one, and a
    /// notification committed on the new primary before a listener's LISTEN is issued there
    /// would never reach it. Listeners on a server that is not fenced are not moving, and are
    /// not waited for.
    pub(super) async fn await_listeners(&self, primary: &crate::topology::Backend) {
        let topology = &self.shared.topology;
        let moving = |b: &crate::topology::Backend| b != primary && topology.is_fenced(b);
        let deadline = Instant::now() + LISTENERS_WAIT;
        loop {
            let elsewhere = self.shared.registry.listeners_on(moving);
            if elsewhere == 0 {
                return;
            }
            if Instant::now() >= deadline {
                metrics::counter!("understudy_listener_waits_given_up_total").increment(1);
                tracing::warn!(
                    session = self.guard.info().id,
                    listeners = elsewhere,
                    "sessions with LISTENs are still not on the new primary; going on without them (notifications sent meanwhile miss them)"
                );
                return;
            }
            crate::clock::sleep(LISTENERS_POLL).await;
        }
    }

    /// Gives the new backend the prepared statements the client has, no more and no fewer,
    /// where a transaction that made or deallocated some was not replayed there (statements
    /// outlive the transaction they were changed in, whatever its end). The backend must not
    /// be in a transaction block.
    async fn restore_statements(&self, fresh: &mut Fresh) -> Result<(), String> {
        let state = self.journal.state();
        let present = fresh
            .query(
                "SELECT coalesce(pg_catalog.json_agg(name), '[]') \
                 FROM pg_catalog.pg_prepared_statements",
            )
            .await?
            .unwrap_or_default();
        let present: BTreeSet<String> =
            serde_json::from_str(&present).map_err(|e| e.to_string())?;
        for name in present.iter().filter(|n| !state.has_statement(n)) {
            fresh
                .query(&format!("DEALLOCATE \"{}\"", name.replace('"', "\"\"")))
                .await?;
        }
        fresh
            .restore(&state.statements_missing_from(&present))
            .await
    }

    /// The last commit this client saw succeed must be on the new primary; if asynchronous
    /// replication lost it, the session ends with 08007 rather than carry on as if nothing
    /// happened.
    async fn check_acknowledged_commit(
        &mut self,
        fresh: &mut Fresh,
        promotion: &Promotion,
    ) -> Result<(), SessionError> {
        if self.journal.commit_unchecked() {
            count_move("unchecked_commit");
            return Err(cannot_move(
                "08007",
                "connection to the database server lost; a write this session committed inside an extended-protocol batch closed by a Query before its Sync could not be checked on the new primary: it may have been lost with the old primary".to_owned(),
            ));
        }
        // Autocommit writes carry no xid; the WAL position taken right after each must be
        // within what the standby had replayed when it was promoted.
        if let (Some(acked), Some(end)) = (self.acked_lsn, promotion.wal_end) {
            if acked > end {
                return Err(self.lost_commit(format!(
                    "a write this session committed (WAL position {acked:X}) is missing on the new primary, which received WAL only up to {end:X}: it was lost with the old primary (asynchronous replication)"
                )));
            }
        }
        let Some(xid) = self.journal.last_committed_xid() else {
            return Ok(());
        };
        let beyond = promotion.xids.is_some_and(|x| x.after_promotion(xid));
        let status = if beyond {
            None
        } else {
            fresh.query(&xact_status(xid)).await.ok().flatten()
        };
        if status.as_deref() == Some("committed") {
            match promotion.xids.map(|x| x.committed(xid)) {
                Some(Committed::Unknown) => {
                    return Err(self.lost_commit(format!("a transaction this session committed (xid {xid}) cannot be told on the new primary from one given the same xid there after the promotion, by a client that wrote to it directly: it may have been lost with the old primary (asynchronous replication)")));
                }
                _ => return Ok(()),
            }
        }
        Err(self.lost_commit(format!("a transaction this session committed (xid {xid}, status there: {}) is missing on the new primary: it was lost with the old primary (asynchronous replication)", status.as_deref().unwrap_or("never assigned"))))
    }

    /// Counts, logs and reports a commit the client saw that the new primary lacks.
    fn lost_commit(&self, message: String) -> SessionError {
        metrics::counter!("understudy_lost_commits_total").increment(1);
        tracing::error!(session = self.guard.info().id, "{message}");
        count_move("lost_commit");
        cannot_move("08007", message)
    }

    /// What the new primary says of `xid`, the open transaction's, whose COMMIT was in flight.
    async fn commit_outcome(
        &self,
        fresh: &mut Fresh,
        xid: u64,
        promotion: &Promotion,
    ) -> CommitOutcome {
        if promotion.xids.is_some_and(|x| x.after_promotion(xid)) {
            // Handed out after the promotion, if at all: never ours.
            return CommitOutcome::NotCommitted;
        }
        let status = fresh.query(&xact_status(xid)).await;
        match status.as_ref().map(|s| s.as_deref()) {
            Ok(Some("committed")) => match promotion.xids.map(|x| x.committed(xid)) {
                Some(Committed::Yes) => CommitOutcome::Committed,
                Some(Committed::No) => CommitOutcome::NotCommitted,
                // Without the promotion's xids, or between them, "committed" may be another
                // transaction that was given the same xid after the promotion.
                Some(Committed::Unknown) | None => CommitOutcome::InDoubt,
            },
            Ok(Some(_)) => CommitOutcome::NotCommitted,
            // "in the future": never assigned on the new primary.
            Err(e) if e.contains("future") => CommitOutcome::NotCommitted,
            _ => CommitOutcome::InDoubt,
        }
    }

    /// Settles the open transaction and the unanswered requests on the new backend. Returns
    /// the bytes the new backend sent past what the client had already seen.
    async fn settle_transaction(
        &mut self,
        fresh: &mut Fresh,
        promotion: &Promotion,
        partial: Option<(u8, usize)>,
    ) -> Result<Resumed, SessionError> {
        let groups: Vec<Group> = self
            .journal
            .groups()
            .iter()
            .map(|g| (**g).clone())
            .collect();
        let answered: Vec<&Group> = groups.iter().filter(|g| g.answered).collect();
        let in_flight: Vec<&Group> = groups.iter().filter(|g| !g.answered).collect();
        // What the client has of the first in-flight group's answer.
        let seen_answer = self.journal.answer_so_far();
        let in_txn = self.journal.txn_status() != b'I';
        tracing::debug!(
            session = self.guard.info().id,
            answered = answered.len(),
            in_flight = ?in_flight.iter().map(|g| shape(g)).collect::<Vec<_>>(),
            seen = seen_answer.len,
            ?partial,
            in_txn,
            "settling the transaction on the new primary"
        );
        let mut resumed = Resumed::default();
        let fatal = |m: &str| cannot_move("40001", m.to_owned());
        let unknown = |e: String| cannot_move("08007", format!("{IN_DOUBT} ({e})"));

        // An autocommit batch whose answer the client has but for its ReadyForQuery (or a Query
        // sent as a batch, whose answer the gateway holds the rest of): the xid query in front
        // of its Sync gave the xid before the commit began.
        let tail_done = std::mem::take(&mut self.tail_done);
        let query_committing =
            std::mem::replace(&mut self.as_batch, AsBatch::None) == AsBatch::Committing;
        let held = std::mem::take(&mut self.held_answer);
        if let Some(first) = in_flight.first().filter(|g| {
            let settled = if g.queries {
                query_committing
            } else {
                g.tail && tail_done
            };
            // (A COPY's data is not run again here: it is in doubt, as before.)
            !in_txn && settled && !g.failed && !g.copies && partial.is_none()
        }) {
            if let Some(resumed) = self
                .settle_batch(fresh, promotion, first, seen_answer, &held, &in_flight[1..])
                .await?
            {
                return Ok(resumed);
            }
        }

        // A COMMIT in flight: look its outcome up before anything is replayed.
        if let Some(first) = in_flight.first().filter(|g| g.commits && in_txn) {
            let outcome = match self.journal.xid() {
                // A failed transaction never commits: its replay fails the same way, and the
                // server answers the COMMIT with ROLLBACK.
                _ if self.journal.txn_status() == b'E' => CommitOutcome::NotCommitted,
                // Nor does one whose COMMIT the old server never read.
                _ if self.last_unread && in_flight.len() == 1 => CommitOutcome::NotCommitted,
                Some(xid) => self.commit_outcome(fresh, xid, promotion).await,
                // No xid: the transaction wrote nothing, or its xid answer was lost with the
                // COMMIT's; either way the new primary has nothing of it unless replayed.
                None if !self.journal.txn_may_write() => CommitOutcome::Committed,
                // Only session state changed, which lives in the backend: the new one has it
                // only if the transaction runs and commits there, whatever the old one did.
                // (The string with the COMMIT may write data itself: that is in doubt.)
                None if !self.journal.txn_may_write_data() && !first.may_write_data => {
                    CommitOutcome::NotCommitted
                }
                None => CommitOutcome::InDoubt,
            };
            // A COMMIT alone has a known answer; a string that also did other things does not.
            let answer = match outcome {
                CommitOutcome::Committed if first.sole_commit => commit_answer(&first.request),
                _ => None,
            };
            let outcome = match outcome {
                CommitOutcome::Committed if answer.is_none() => CommitOutcome::InDoubt,
                o => o,
            };
            // Counted and logged as the client is answered.
            outcome.count();
            tracing::info!(session = self.guard.info().id, ?outcome, xid = ?self.journal.xid(), "COMMIT was in flight");
            match (outcome, answer) {
                (CommitOutcome::Committed, Some(answer)) => {
                    let seen = seen_answer.len as usize;
                    if seen > answer.len() || partial.is_some() && seen == 0 {
                        return Err(fatal(DIVERGED));
                    }
                    let mut check = DigestBuilder::default();
                    check.update(&answer[..seen]);
                    if check.digest() != seen_answer {
                        return Err(fatal(DIVERGED));
                    }
                    resumed.to_client.extend_from_slice(&answer[seen..]);
                    for sql in self.journal.settle_commit() {
                        fresh.query(&sql).await.map_err(unknown)?;
                    }
                    self.restore_statements(fresh).await.map_err(unknown)?;
                    self.txn_status = b'I';
                    // Requests pipelined after the COMMIT run as new ones.
                    self.resend_in_flight(&in_flight[1..], false, false, &mut resumed)?;
                    return Ok(resumed);
                }
                (CommitOutcome::NotCommitted, _) => {}
                _ => {
                    if seen_answer.len > 0 {
                        return Err(cannot_move("08007", IN_DOUBT.to_owned()));
                    }
                    self.restore_statements(fresh).await.map_err(unknown)?;
                    return self.give_up_in_doubt(1, &in_flight[1..], resumed);
                }
            }
        }

        // A COMMIT queued behind requests that may write data in its transaction, none of them
        // answered (a pipeline): the old primary may have run them all and committed, their
        // answers lost on the way, so running them again could apply them twice. Only an xid
        // the new primary has never committed says it is safe; otherwise every one of them, the
        // COMMIT included, is in doubt, as an autocommit write in flight is.
        if let Some((at, already_open)) = commit_behind_writes(&in_flight, in_txn) {
            // The xid is the transaction's that was open before them: one begun in the
            // pipeline has none known.
            let outcome = match self.journal.xid().filter(|_| already_open) {
                // The COMMIT, last, was never read: nothing of the transaction committed.
                _ if self.last_unread && at + 1 == in_flight.len() => CommitOutcome::NotCommitted,
                Some(xid) => self.commit_outcome(fresh, xid, promotion).await,
                None => CommitOutcome::InDoubt,
            };
            if outcome != CommitOutcome::NotCommitted {
                if seen_answer.len > 0 || partial.is_some() {
                    return Err(cannot_move("08007", IN_DOUBT.to_owned()));
                }
                metrics::counter!("understudy_in_doubt_commits_total", "outcome" => "unknown")
                    .increment(1);
                let doubtful = in_flight[..=at].iter().filter(|g| g.closed).count();
                self.restore_statements(fresh).await.map_err(unknown)?;
                return self.give_up_in_doubt(doubtful, &in_flight[at + 1..], resumed);
            }
        }

        if in_txn {
            let replayable = self.journal.unreplayable().is_none();
            let mut same = replayable;
            if same {
                for g in &answered {
                    match fresh.replay_answered(g).await {
                        Ok(true) => {}
                        Ok(false) => {
                            same = false;
                            break;
                        }
                        Err(e) => {
                            return Err(cannot_move(
                                "08006",
                                format!("replay on the new primary failed: {e}"),
                            ))
                        }
                    }
                }
            }
            if !same {
                let outcome = match self.journal.unreplayable() {
                    Some(Unreplayable::TooLarge(_)) | Some(Unreplayable::Hazard(_)) => {
                        "unreplayable"
                    }
                    None => "diverged",
                };
                metrics::counter!("understudy_replays_total", "outcome" => outcome).increment(1);
                tracing::warn!(
                    session = self.guard.info().id,
                    outcome,
                    "open transaction not carried over; client gets 40001"
                );
                return self.diverge(fresh, &in_flight, seen_answer, resumed).await;
            }
            metrics::counter!("understudy_replays_total", "outcome" => "ok").increment(1);
            // The replayed transaction has an xid of its own on the new primary, not known yet.
            self.journal.set_xid(None);
        }
        let first = match in_flight.first() {
            // Not run again: its 08007 ends the answer, as an error may at any message boundary.
            Some(g) if in_doubt(g, in_txn) && seen_answer.len > 0 => {
                if partial.is_some() {
                    return Err(cannot_move("08007", IN_DOUBT.to_owned()));
                }
                None
            }
            Some(_) => Some(seen_answer),
            None => None,
        };
        let first_seen = first.is_some_and(|d| d.len > 0);
        self.resend_in_flight(&in_flight, in_txn, first_seen, &mut resumed)?;
        self.consume_seen_prefix(fresh, first, partial, &mut resumed)
            .await?;
        Ok(resumed)
    }

    /// Settles an autocommit batch (or a Query sent as one) whose commit was in flight, its
    /// xid known (`None`: it wrote nothing): committed on the new primary, the client gets
    /// what the gateway `held` of its answer and its ReadyForQuery; not committed, the batch
    /// runs there again and commits if it answers as the client saw, else the client gets
    /// 40001 and it is rolled back. `None` when the outcome cannot be told. The `rest` go out
    /// as new requests.
    async fn settle_batch(
        &mut self,
        fresh: &mut Fresh,
        promotion: &Promotion,
        batch: &Group,
        seen: Digest,
        held: &[u8],
        rest: &[&Group],
    ) -> Result<Option<Resumed>, SessionError> {
        let unknown = |e: String| cannot_move("08007", format!("{IN_DOUBT} ({e})"));
        let outcome = match self.journal.xid() {
            Some(xid) => self.commit_outcome(fresh, xid, promotion).await,
            None => CommitOutcome::Committed,
        };
        outcome.count();
        tracing::info!(session = self.guard.info().id, ?outcome, xid = ?self.journal.xid(), "an autocommit batch's commit was in flight");
        let mut resumed = Resumed::default();
        match outcome {
            CommitOutcome::InDoubt => return Ok(None),
            CommitOutcome::Committed => {
                resumed.to_client.extend_from_slice(held);
                encode::ready_for_query(&mut resumed.to_client, b'I');
                self.journal.settle_commit();
            }
            // Too large to have been kept, or acting outside the database (dblink, COPY …
            // PROGRAM): it cannot run again.
            CommitOutcome::NotCommitted
                if batch.truncated || self.journal.unreplayable().is_some() =>
            {
                return Ok(None)
            }
            CommitOutcome::NotCommitted => {
                let rerun = if batch.queries {
                    fresh.rerun_query(batch, seen).await
                } else {
                    fresh.rerun_batch(batch, seen).await
                };
                match rerun.map_err(unknown)? {
                    Rerun::Same { xid, answer } => {
                        self.journal.set_xid(xid);
                        self.journal.settle_commit();
                        resumed.to_client.extend_from_slice(&answer);
                    }
                    Rerun::Diverged => {
                        metrics::counter!("understudy_replays_total", "outcome" => "diverged")
                            .increment(1);
                        tracing::warn!(
                            session = self.guard.info().id,
                            "autocommit batch answered otherwise when run again; rolled back, client gets 40001"
                        );
                        self.journal.set_xid(None);
                        self.journal.settle_commit();
                        super::diverged_error(&mut resumed.to_client);
                        encode::ready_for_query(&mut resumed.to_client, b'I');
                    }
                }
            }
        }
        self.restore_statements(fresh).await.map_err(unknown)?;
        self.txn_status = b'I';
        self.resend_in_flight(rest, false, false, &mut resumed)?;
        Ok(Some(resumed))
    }

    /// Forgets the open transaction; `doubtful` requests get 08007 from the new backend (so
    /// that answers stay in order) and the `rest` go out as new ones.
    fn give_up_in_doubt(
        &mut self,
        doubtful: usize,
        rest: &[&Group],
        mut resumed: Resumed,
    ) -> Result<Resumed, SessionError> {
        self.journal.abandon();
        self.txn_status = b'I';
        for _ in 0..doubtful {
            resumed
                .to_backend
                .extend_from_slice(&raise("08007", IN_DOUBT));
            resumed.owners.push(Owner::Raised);
        }
        self.resend_in_flight(rest, false, false, &mut resumed)?;
        Ok(resumed)
    }

    /// Queues the unanswered requests for the new backend. Outside a transaction a request
    /// that may have written cannot be re-run (the old primary may have applied it): the
    /// client gets 08007 in its place, from the new backend so that answers stay in order.
    /// `first_seen`: the client has part of the first one's answer, which is read again and
    /// checked before anything else the new backend says.
    fn resend_in_flight(
        &mut self,
        in_flight: &[&Group],
        in_txn: bool,
        first_seen: bool,
        resumed: &mut Resumed,
    ) -> Result<(), SessionError> {
        let mut in_txn = in_txn;
        let last = in_flight.len().saturating_sub(1);
        for (i, g) in in_flight.iter().enumerate() {
            // The old server never read the last request: it ran only if it runs here.
            let unread = i == last && self.last_unread && !g.truncated;
            let doubtful = in_doubt(g, in_txn) && !unread;
            if doubtful {
                metrics::counter!("understudy_in_doubt_statements_total").increment(1);
                resumed
                    .to_backend
                    .extend_from_slice(&raise("08007", IN_DOUBT));
            } else {
                resendable(g)?;
                // Not ahead of an answer being checked: the xid then stays unknown, and a
                // second failover during this COMMIT gives 08007.
                let checked = i == 0 && first_seen;
                if g.commits
                    && in_txn
                    && self.journal.txn_may_write_data()
                    && self.capture_xid
                    && !checked
                {
                    resumed.to_backend.extend_from_slice(&XID_QUERY);
                    resumed.owners.push(Owner::Xid);
                }
                resumed.to_backend.extend_from_slice(&g.request);
            }
            if g.closed {
                resumed.owners.push(if doubtful {
                    Owner::Raised
                } else {
                    Owner::Client
                });
            }
            in_txn = (in_txn || g.begins) && !g.commits;
        }
        Ok(())
    }

    /// Reads from the new backend the part of the first unanswered request's answer that the
    /// client already has (`first`: its digest, if a request is in flight), and checks it is
    /// the same.
    async fn consume_seen_prefix(
        &mut self,
        fresh: &mut Fresh,
        first: Option<Digest>,
        partial: Option<(u8, usize)>,
        resumed: &mut Resumed,
    ) -> Result<(), SessionError> {
        let seen = first.map_or(0, |d| d.len);
        if seen == 0 {
            if partial.is_some() {
                return Err(cannot_move(
                    "08006",
                    "connection to the database server lost in the middle of a message".to_owned(),
                ));
            }
            return Ok(());
        }
        let Some(first) = first else { return Ok(()) };
        // The requests go out first; their answers are read here up to what the client saw.
        // The client may have had answers to extended-protocol requests it never synced nor
        // flushed (a backend ending with a FATAL flushes what it had): the new primary sends
        // them only when asked to. A Flush is answered by nothing, so no owner waits on it.
        postgres_protocol::message::frontend::flush(&mut resumed.to_backend);
        fresh
            .send(&resumed.to_backend)
            .await
            .map_err(|e| cannot_move("08006", format!("replay on the new primary failed: {e}")))?;
        resumed.to_backend.clear();
        let mut digest = DigestBuilder::default();
        let mut consumed: u64 = 0;
        while consumed < seen {
            let (tag, raw) = fresh.recv().await.map_err(|e| {
                cannot_move("08006", format!("replay on the new primary failed: {e}"))
            })?;
            if tag == backend::READY_FOR_QUERY {
                // The answer ended before reaching what the client had.
                metrics::counter!("understudy_replays_total", "outcome" => "diverged").increment(1);
                return Err(cannot_move("40001", DIVERGED.to_owned()));
            }
            if !digested(tag, &raw) {
                continue;
            }
            let take = ((seen - consumed) as usize).min(raw.len());
            digest.update(&raw[..take]);
            consumed += take as u64;
            if take < raw.len() {
                // The client has the first part of this message; it gets the rest.
                resumed.to_client.extend_from_slice(&raw[take..]);
                resumed.split = Some((tag, raw.clone(), take));
            }
        }
        if digest.digest() != first {
            metrics::counter!("understudy_replays_total", "outcome" => "diverged").increment(1);
            return Err(cannot_move("40001", DIVERGED.to_owned()));
        }
        Ok(())
    }

    /// The replay did not reproduce what the client saw (or could not be tried): the new
    /// backend is left in an aborted transaction, so the client's ROLLBACK works, and the
    /// client hears 40001 for its request in flight, or its next one.
    async fn diverge(
        &mut self,
        fresh: &mut Fresh,
        in_flight: &[&Group],
        seen_answer: Digest,
        mut resumed: Resumed,
    ) -> Result<Resumed, SessionError> {
        let abort = |e: String| cannot_move("40001", format!("{DIVERGED} ({e})"));
        fresh.query("ROLLBACK").await.map_err(abort)?;
        self.restore_statements(fresh).await.map_err(abort)?;
        fresh.query("BEGIN").await.map_err(abort)?;
        let first_seen = if in_flight.is_empty() {
            0
        } else {
            seen_answer.len
        };
        if first_seen > 0 {
            return Err(cannot_move("40001", DIVERGED.to_owned()));
        }
        self.journal.abandon();
        // Housekeeping the driver sent on its own (Close, Describe) is answered as usual; the
        // 40001 goes to the first request that runs a statement, or the next one.
        let housekeeping = in_flight.iter().take_while(|g| !g.runs && g.closed).count();
        for g in &in_flight[..housekeeping] {
            resendable(g)?;
            fresh.send(&g.request).await.map_err(abort)?;
            loop {
                let (tag, raw) = fresh.recv().await.map_err(abort)?;
                resumed.to_client.extend_from_slice(&raw);
                if tag == backend::READY_FOR_QUERY {
                    break;
                }
            }
        }
        let rest = &in_flight[housekeeping..];
        tracing::debug!(
            in_flight = in_flight.len(),
            housekeeping,
            first_closed = rest.first().map(|g| g.closed),
            "aborting the replayed transaction"
        );
        match rest.first() {
            Some(first) if first.closed => {
                // Its answer comes from the new backend, which aborts the transaction; a
                // request that commits ends it instead, as a COMMIT that fails does directly.
                if first.commits {
                    fresh.query("ROLLBACK").await.map_err(abort)?;
                }
                resumed
                    .to_backend
                    .extend_from_slice(&raise("40001", DIVERGED));
                resumed.owners.push(Owner::Raised);
                for g in &rest[1..] {
                    resendable(g)?;
                    resumed.to_backend.extend_from_slice(&g.request);
                    if g.closed {
                        resumed.owners.push(Owner::Client);
                    }
                }
            }
            Some(_) => {
                // An extended batch still open: abort now, answer at its Sync.
                fresh.query_raise_silently().await.map_err(abort)?;
                super::diverged_error(&mut resumed.to_client);
                self.poison = Poison::UntilSync;
            }
            None => {
                fresh.query_raise_silently().await.map_err(abort)?;
                self.poison = Poison::Next;
            }
        }
        Ok(resumed)
    }

    /// Puts the new backend on the data path in the old one's place.
    fn finish_move(&mut self, fresh: Fresh, resumed: Resumed) {
        let Fresh {
            stream,
            buf,
            params,
        } = fresh;
        self.pump.replace_backend(stream, Pipe::from_server(buf));
        // The requests in flight were sent to the new backend again, and a request begun
        // before the move goes there otherwise than it came: where they begin is not known.
        self.last_request_from = None;
        if self.request_start != RequestStart::Between {
            self.request_start = RequestStart::Unknown;
        }
        // After the rest of a message the client got part of, never inside it.
        let mut to_client = resumed.to_client;
        // Parameters that differ on the new backend now are reported, as the server would.
        for (name, value) in &params {
            let known = self.server_params.iter().find(|(n, _)| n == name);
            if known.is_none_or(|(_, v)| v != value) {
                encode::parameter_status(&mut to_client, name, value);
                self.journal.on_parameter_status(name, value);
                super::record_param(&mut self.server_params, name, value);
            }
        }
        if !to_client.is_empty() {
            self.pump.down.insert_ready(&to_client);
        }
        if let Some((tag, raw, take)) = &resumed.split {
            // The rest of a message the journal has the first part of (from the old backend).
            self.journal.begin_server_message(*tag, raw);
            self.journal.on_server_body(&raw[*take..]);
        }
        self.wire = resumed.owners.iter().copied().collect();
        self.awaiting_ready = self.wire.iter().filter(|o| o.is_client()).count() as u32;
        let active = self.awaiting_ready > 0;
        self.guard
            .info()
            .active
            .store(active, std::sync::atomic::Ordering::Relaxed);
        self.pace();
        if !resumed.to_backend.is_empty() {
            // Goes out ahead of anything the client sends next.
            let unscanned = self.pump.up.buf.split_off(0);
            self.pump.up.buf.extend_from_slice(&resumed.to_backend);
            self.pump.up.ready = resumed.to_backend.len();
            self.pump.up.buf.unsplit(unscanned);
        }
    }
}

/// What the data path starts with after a move.
#[derive(Default)]
struct Resumed {
    /// Requests to send to the new backend first.
    to_backend: BytesMut,
    /// Who waits for each ReadyForQuery those requests will bring.
    owners: Vec<Owner>,
    /// Bytes the client is owed (the rest of a message it saw part of, a synthesized answer).
    to_client: BytesMut,
    /// A message split at what the client had seen: its tag, bytes, and the split point.
    split: Option<(u8, Bytes, usize)>,
}

impl Fresh {
    /// Leaves the backend in an aborted transaction, as the client's will be.
    async fn query_raise_silently(&mut self) -> Result<(), String> {
        let q = raise("40001", DIVERGED);
        self.send(&q).await?;
        loop {
            let (tag, _) = self.recv().await?;
            if tag == backend::READY_FOR_QUERY {
                return Ok(());
            }
        }
    }
}

/// What the server answers a request group that runs nothing but a COMMIT (not AND CHAIN, see
/// [`Group::sole_commit`]) that commits, outside a failed transaction: a
/// Query of it, or its Parse, Bind, Describe, Execute, Close, Flush and Sync messages; `None`
/// for anything else.
fn commit_answer(request: &[u8]) -> Option<BytesMut> {
    const COMMITTED: &[u8] = b"C\0\0\0\x0bCOMMIT\0";
    const NO_DATA: &[u8] = b"n\0\0\0\x04";
    let mut answer = BytesMut::new();
    let mut rest = request;
    while let Some((&tag, after)) = rest.split_first() {
        let len = i32::from_be_bytes(*after.first_chunk::<4>()?);
        let (message, next) = rest.split_at_checked(1 + usize::try_from(len).ok()?)?;
        match tag {
            b'Q' if next.is_empty() && answer.is_empty() => {
                answer.extend_from_slice(COMMITTED);
                encode::ready_for_query(&mut answer, b'I');
            }
            b'P' => answer.extend_from_slice(b"1\0\0\0\x04"),
            b'B' => answer.extend_from_slice(b"2\0\0\0\x04"),
            // A statement's: no parameters, no rows; a portal's: no rows.
            b'D' if message.get(5) == Some(&b'S') => {
                answer.extend_from_slice(b"t\0\0\0\x06\0\0");
                answer.extend_from_slice(NO_DATA);
            }
            b'D' => answer.extend_from_slice(NO_DATA),
            b'E' => answer.extend_from_slice(COMMITTED),
            b'C' => answer.extend_from_slice(b"3\0\0\0\x04"),
            b'S' => encode::ready_for_query(&mut answer, b'I'),
            b'H' => {}
            _ => return None,
        }
        rest = next;
    }
    (!answer.is_empty()).then_some(answer)
}

/// Whether an unanswered request must not run again: outside a transaction a request that may
/// have written data (on its own, or in a transaction it both begins and commits) may have been
/// applied by the old primary, so the client gets 08007 instead. A session-state change (SET,
/// PREPARE, LISTEN …) died with the old backend whether it ran there or not, and the restored
/// state does not hold it: it runs again.
fn in_doubt(g: &Group, in_txn: bool) -> bool {
    !in_txn && g.may_write_data && (!g.begins || g.commits) && g.closed
}

/// The first unanswered request, after the first, that commits a transaction in which it or
/// an earlier unanswered request may have written data, and whether that transaction was open
/// before the first of them (`in_txn` says whether one was; a COMMIT first in line is settled
/// on its own). Requests are judged whole, without the order of the statements inside a
/// string: one that writes and begins counts as writing inside the transaction, one that
/// commits and begins as leaving one open. More doubt, never less.
fn commit_behind_writes(in_flight: &[&Group], in_txn: bool) -> Option<(usize, bool)> {
    let mut open = in_txn;
    let mut already_open = in_txn;
    let mut wrote = false;
    for (i, g) in in_flight.iter().enumerate() {
        if g.commits && open && (wrote || i > 0 && g.may_write_data) {
            return Some((i, already_open));
        }
        if g.begins && !open {
            open = true;
            already_open = false;
        }
        wrote |= open && g.may_write_data;
        if g.commits {
            open = g.begins;
            already_open = false;
            wrote = false;
        }
    }
    None
}

fn count_move(outcome: &'static str) {
    metrics::counter!("understudy_session_moves_total", "outcome" => outcome).increment(1);
}

/// A group's message tags and flags, for the debug log (`BDEBDES closed`).
fn shape(g: &Group) -> String {
    let mut tags: String = understudy_protocol::frame::messages(&g.request)
        .map(|(tag, _)| char::from(tag))
        .collect();
    let flags = [
        (g.closed, "closed"),
        (g.truncated, "truncated"),
        (g.may_write_data, "writes"),
        (g.commits, "commits"),
    ];
    for (_, name) in flags.iter().filter(|(on, _)| *on) {
        tags.push(' ');
        tags.push_str(name);
    }
    tags
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use understudy_replay::journal::Journal;

    /// What `Session::reset_soon_after` and `Session::ended_before_acknowledging` rely on, as
    /// this machine's kernel does it: a connection closed with data unread is reset
    /// (`ECONNRESET`); one closed after all was read ends in order, and a request sent after
    /// that close is seen as that end (then `EPIPE`), not as a reset, and is never
    /// acknowledged.
    #[test]
    fn the_kernel_tells_data_its_peer_never_read() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let pair = || {
            let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (server, _) = listener.accept().unwrap();
            (client, server)
        };
        let settle = || std::thread::sleep(Duration::from_millis(50));
        let mut buf = [0u8; 16];

        // Closed with the request unread: reset.
        let (mut client, server) = pair();
        client.write_all(b"request").unwrap();
        settle();
        drop(server);
        settle();
        let e = client.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);

        // Read whole, then closed: an orderly end, nothing reset.
        let (mut client, mut server) = pair();
        client.write_all(b"request").unwrap();
        settle();
        assert_eq!(server.read(&mut buf).unwrap(), 7);
        drop(server);
        settle();
        assert_eq!(client.read(&mut buf).unwrap(), 0);
        assert_eq!(crate::sockopt::unacknowledged(&client).unwrap(), 0);

        // Closed first, the request sent after: the end of the stream comes first, and the
        // request stays unacknowledged (the reset that answers it acknowledges nothing).
        let (mut client, server) = pair();
        drop(server);
        settle();
        client.write_all(b"request").unwrap();
        settle();
        assert_eq!(client.read(&mut buf).unwrap(), 0);
        assert_eq!(crate::sockopt::unacknowledged(&client).unwrap(), 7);
        let e = client.write_all(b"more").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe);
    }

    /// The unanswered request groups of Query strings `sent` after `answered` ones (each
    /// answered with the status given), and whether a transaction was open in between.
    fn in_flight(answered: &[(&str, u8)], sent: &[&str]) -> (Vec<Group>, bool) {
        let query = |sql: &str| {
            let mut q = BytesMut::new();
            postgres_protocol::message::frontend::query(sql, &mut q).unwrap();
            q
        };
        let mut j = Journal::new(1 << 20);
        for (sql, status) in answered {
            j.on_client_message(b'Q', &query(sql));
            j.on_ready_for_query(*status);
        }
        for sql in sent {
            j.on_client_message(b'Q', &query(sql));
        }
        let groups = j.groups().iter().filter(|g| !g.answered);
        (
            groups.map(|g| (**g).clone()).collect(),
            j.txn_status() != b'I',
        )
    }

    fn behind(answered: &[(&str, u8)], sent: &[&str]) -> Option<(usize, bool)> {
        let (groups, in_txn) = in_flight(answered, sent);
        commit_behind_writes(&groups.iter().collect::<Vec<_>>(), in_txn)
    }

    #[test]
    fn a_commit_behind_unanswered_writes_is_found() {
        let open = [("BEGIN", b'T')];
        assert_eq!(
            behind(&open, &["INSERT INTO t VALUES (1)", "COMMIT"]),
            Some((1, true))
        );
        assert_eq!(behind(&open, &["SELECT 1", "SET a.b = 1", "COMMIT"]), None);
        // The COMMIT's own string writes.
        assert_eq!(
            behind(&open, &["SELECT 1", "INSERT INTO t VALUES (1); COMMIT"]),
            Some((1, true))
        );
        // First in line, it is settled on its own.
        assert_eq!(behind(&open, &["INSERT INTO t VALUES (1); COMMIT"]), None);
        assert_eq!(
            behind(&[], &["BEGIN", "INSERT INTO t VALUES (1)", "COMMIT"]),
            Some((2, false))
        );
        assert_eq!(
            behind(&[], &["BEGIN; INSERT INTO t VALUES (1)", "COMMIT"]),
            Some((1, false))
        );
        // A COMMIT first ends the open transaction; the one begun after it has no xid known.
        assert_eq!(
            behind(&open, &["COMMIT", "BEGIN", "UPDATE t SET a = 2", "COMMIT"]),
            Some((3, false))
        );
        // Autocommit writes are judged one by one (see `in_doubt`).
        assert_eq!(behind(&[], &["INSERT INTO t VALUES (1)", "COMMIT"]), None);
    }

    #[test]
    fn a_commit_alone_is_answered_as_the_server_answers_it() {
        let m = |tag: u8, body: &[u8]| {
            let mut v = vec![tag];
            v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
            v.extend_from_slice(body);
            v
        };
        let simple = m(b'Q', b"COMMIT\0");
        assert_eq!(
            commit_answer(&simple).as_deref(),
            Some(&b"C\0\0\0\x0bCOMMIT\0Z\0\0\0\x05I"[..])
        );
        let extended = [
            m(b'P', b"\0COMMIT\0\0\0"),
            m(b'B', b"\0\0\0\0\0\0\0\0"),
            m(b'D', b"P\0"),
            m(b'E', b"\0\0\0\0\0"),
            m(b'S', b""),
        ]
        .concat();
        assert_eq!(
            commit_answer(&extended).as_deref(),
            Some(&b"1\0\0\0\x042\0\0\0\x04n\0\0\0\x04C\0\0\0\x0bCOMMIT\0Z\0\0\0\x05I"[..])
        );
        // A FunctionCall, or a Query among other messages, has no known answer.
        assert_eq!(commit_answer(&m(b'F', b"\0\0\0\x01")), None);
        assert_eq!(commit_answer(&[simple.clone(), simple].concat()), None);
        assert_eq!(commit_answer(&extended[..7]), None, "cut short");
    }

    #[test]
    fn a_whole_transaction_in_one_string_is_in_doubt_like_an_autocommit_write() {
        let (groups, in_txn) = in_flight(&[], &["BEGIN; INSERT INTO t VALUES (1); COMMIT"]);
        assert!(in_doubt(&groups[0], in_txn));
        let (groups, in_txn) = in_flight(&[], &["BEGIN; INSERT INTO t VALUES (1)"]);
        assert!(
            !in_doubt(&groups[0], in_txn),
            "its transaction is still open"
        );
        let (groups, in_txn) = in_flight(&[], &["SET a.b = 1"]);
        assert!(!in_doubt(&groups[0], in_txn));
    }
}
