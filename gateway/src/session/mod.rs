//! One client session on the data path: forwards both ways, tracks message and transaction
//! boundaries from the headers, journals what the client asked and saw, and, when the primary
//! fails, moves to the new one (`relocate`).

mod relocate;

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use understudy_protocol::encode::{self, Severity};
use understudy_protocol::frame::{FrameError, Step};
use understudy_protocol::inspect::{self, ErrorView};
use understudy_protocol::tags::{backend, frontend};
use understudy_replay::classify::{classify, Statement};
use understudy_replay::journal::{Before, Journal};

use crate::auth::Credential;
use crate::error::SessionError;
use crate::gateway::Shared;
use crate::pump::{Event, Pump, PumpError};
use crate::sessions::{SessionGuard, SessionInfo};
use crate::shutdown::{Phase, Shutdown};
use crate::telemetry::{count_error, Tally};
use crate::topology::Backend;
use crate::wake::Bell;

/// How long a closing session may take to hand its last bytes to a peer.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// The open transaction's xid, if it has one. Every name the gateway's queries use is
/// qualified: a client's `search_path` may put a function of the same name first.
const XID_SQL: &str = "SELECT pg_catalog.pg_current_xact_id_if_assigned()";

/// The query the gateway slips in before a COMMIT of a transaction that wrote, so that a COMMIT
/// whose answer is lost can be looked up on the new primary.
static XID_QUERY: LazyLock<Vec<u8>> = LazyLock::new(|| internal(XID_SQL));

/// `sql` as a query of the gateway's own (see [`encode::internal_query`]).
fn internal(sql: &str) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode::internal_query(&mut buf, sql);
    buf.to_vec()
}

/// The xid query as requests without a Sync, slipped in front of the Sync of an autocommit batch
/// that writes, so that it runs in the batch's transaction (see
/// [`Before::CommitXidBeforeSync`]): its answer comes last before the client's ReadyForQuery.
static XID_TAIL: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let mut buf = BytesMut::new();
    encode::internal_request(&mut buf, XID_SQL);
    buf.to_vec()
});

/// [`XID_TAIL`] and a Flush, so the server sends the batch's answer and the xid before it
/// commits: a primary that dies during the commit leaves the gateway knowing what to look up
/// (`failover.settle_in_flight_autocommit`).
static XID_TAIL_FLUSHED: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let mut buf = BytesMut::from(&XID_TAIL[..]);
    postgres_protocol::message::frontend::flush(&mut buf);
    buf.to_vec()
});

/// What a client's Query sent as a batch (see [`Before::QueryAsBatch`]) starts with: Close of
/// the unnamed statement, which a Query ends as it starts, and of the gateway's statement
/// ([`encode::INTERNAL_STATEMENT`]), which a batch that failed may have left. The Query's text
/// is parsed as that statement, not the unnamed one: the client could otherwise Bind it again
/// after the Query, where the server would have said it does not exist.
static QUERY_AS_BATCH_HEAD: LazyLock<Vec<u8>> = LazyLock::new(|| {
    use postgres_protocol::message::frontend as msg;
    let mut buf = BytesMut::new();
    // The names have no NUL: nothing can fail.
    let _ = msg::close(b'S', "", &mut buf);
    let _ = msg::close(b'S', encode::INTERNAL_STATEMENT, &mut buf);
    buf.to_vec()
});

/// Writes what follows the statement text of a client's Query sent as a batch once its type
/// byte, length and statement name make it a Parse: no parameter types, then Bind of the
/// unnamed portal (which a Query also ends), its Describe and Execute. The xid query behind
/// them closes the statement.
fn query_batch_run(buf: &mut BytesMut) {
    use postgres_protocol::message::frontend as msg;
    buf.extend_from_slice(&[0, 0]);
    // No parameters: nothing can fail.
    let _ = msg::bind(
        "",
        encode::INTERNAL_STATEMENT,
        std::iter::empty::<i16>(),
        std::iter::empty::<()>(),
        |(), _| Ok(postgres_protocol::IsNull::No),
        std::iter::empty::<i16>(),
        buf,
    );
    let _ = msg::describe(b'P', "", buf);
    let _ = msg::execute("", 0, buf);
}

/// [`query_batch_run`], the xid query `tail` and the Sync that commits.
fn query_batch_rest(tail: &[u8]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    query_batch_run(&mut buf);
    buf.extend_from_slice(tail);
    postgres_protocol::message::frontend::sync(&mut buf);
    buf.to_vec()
}

/// What follows the text of a Query sent as a batch: [`query_batch_rest`] with [`XID_TAIL`].
static QUERY_AS_BATCH_REST: LazyLock<Vec<u8>> = LazyLock::new(|| query_batch_rest(&XID_TAIL));

/// The same with [`XID_TAIL_FLUSHED`], where in-flight commits are settled.
static QUERY_AS_BATCH_REST_FLUSHED: LazyLock<Vec<u8>> =
    LazyLock::new(|| query_batch_rest(&XID_TAIL_FLUSHED));

/// Bytes a client's Query message grows by as the Parse it becomes: the statement name, its
/// NUL and the parameter count.
const PARSE_OF_QUERY_GROWTH: usize = encode::INTERNAL_STATEMENT.len() + 3;

/// Writes [`QUERY_AS_BATCH_HEAD`] and the Parse that a client's Query message becomes, up to its
/// text and the text's NUL (see [`query_batch_run`] for the rest).
fn parse_of_query(query: &[u8], buf: &mut BytesMut) {
    let len = u32::from_be_bytes([query[1], query[2], query[3], query[4]]);
    buf.extend_from_slice(&QUERY_AS_BATCH_HEAD);
    buf.extend_from_slice(&[frontend::PARSE]);
    buf.extend_from_slice(&(len + PARSE_OF_QUERY_GROWTH as u32).to_be_bytes());
    buf.extend_from_slice(encode::INTERNAL_STATEMENT.as_bytes());
    buf.extend_from_slice(b"\0");
    buf.extend_from_slice(&query[5..]);
}

/// The longest message PostgreSQL takes from a client (`PQ_LARGE_MESSAGE_LIMIT`), length word
/// included.
const SERVER_MESSAGE_LIMIT: usize = 0x3fff_ffff;

/// Where the answer to a client's Query sent as a batch is (see [`QUERY_AS_BATCH_REST`]). The
/// gateway takes out what a Query is not answered with, and holds back what it would not have
/// sent yet: a RETURNING's RowDescription until the statement has run (its first row, or its
/// CommandComplete), and the CommandComplete until the commit succeeded (what the server says
/// after the commit, ParameterStatus, a notification or the ReadyForQuery, follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AsBatch {
    /// No such Query is being answered.
    None,
    /// CloseComplete twice, ParseComplete, BindComplete, then the Describe's RowDescription
    /// (held) or NoData.
    Preamble,
    /// The RowDescription is held: the statement has not run yet (a Query describes its rows
    /// once it has; an error in between is all the client hears).
    Described,
    /// The statement's rows, up to its CommandComplete (held).
    Rows,
    /// The xid query's answer.
    Tail,
    /// The xid query's row and CommandComplete are in: an error now is the commit's.
    Committing,
    /// An error ended the batch: the server skips the rest up to the Sync.
    Failed,
}

impl AsBatch {
    /// Whether a server message of type `tag` is one the gateway must look at in this state.
    fn looks_at(self, tag: u8) -> bool {
        match self {
            AsBatch::Preamble => {
                matches!(tag, b'3' | b'1' | b'2' | b'n' | backend::ROW_DESCRIPTION)
            }
            // (A row is not: it may be too large to hold whole, see `before_first_row`.)
            AsBatch::Described => tag == backend::COMMAND_COMPLETE,
            AsBatch::Rows => tag == backend::COMMAND_COMPLETE,
            AsBatch::Tail => is_tail_answer(tag),
            // The xid query's statement and portal closed.
            AsBatch::Committing => tag == b'3',
            AsBatch::None | AsBatch::Failed => false,
        }
    }
}

/// Appended to a client's one-statement Query that writes in a transaction block, or to one of
/// several statements that writes outside a block: the xid comes back in the same answer. The
/// newline ends a trailing `--` comment; the alias tells its RowDescription from anything the
/// client's statements return.
static XID_SUFFIX: LazyLock<Vec<u8>> =
    LazyLock::new(|| format!("\n;{XID_SQL} AS understudy_xid\0").into_bytes());

/// Put in front of the COMMIT of a client's Query that is one whole transaction block (right
/// after the semicolon before it), so that the xid comes back in the same answer, before the
/// commit. The alias tells its RowDescription from anything the client's statements return.
static XID_BEFORE_COMMIT: LazyLock<Vec<u8>> =
    LazyLock::new(|| format!("{XID_SQL} AS understudy_xid;").into_bytes());

/// Where the answer to a Query with [`XID_SUFFIX`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum XidSuffix {
    /// No such Query is being answered.
    #[default]
    None,
    /// A statement of the client's is being answered.
    Statement,
    /// A statement of the client's completed; the xid query's answer may be next.
    Completed,
    /// Inside the xid query's answer (after its RowDescription).
    Answer,
    /// The xid query's answer is over; the ReadyForQuery is the client's.
    Done,
}

/// The answer to a Query with [`XID_SUFFIX`] as it goes by.
///
/// Outside a transaction block the server commits the Query's statements after the xid query,
/// where it would have committed them after the client's last one, before that one's
/// CommandComplete: so each of the client's CommandCompletes is held until the next message
/// shows whether it was the last (the xid query's RowDescription comes next), and the last one
/// until the xid query completes, which is once the commit succeeded. A commit that fails
/// answers with its error in the last CommandComplete's place, as it does directly.
#[derive(Debug, Clone, Copy, Default)]
struct SuffixAnswer {
    state: XidSuffix,
    /// The client's statements not completed yet.
    left: usize,
    /// Whether the CommandCompletes are held (outside a transaction block).
    holds: bool,
    /// Whether the xid query's row came.
    row_seen: bool,
}

/// What to do with a message of the answer to a Query with [`XID_SUFFIX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SuffixStep {
    /// The client's: handled as any other message.
    Pass,
    /// The xid query's: taken out.
    Consume,
    /// The client's CommandComplete: held (see [`SuffixAnswer`]).
    Hold,
    /// The CommandComplete held goes out first; then this message is looked at again.
    ReleaseFirst,
    /// The xid query's CommandComplete: taken out, and the one held goes out in its place.
    ConsumeAndRelease,
    /// The commit failed: the CommandComplete held is dropped, and the error passes.
    DropHeld,
}

/// The query the gateway slips in after an autocommit write: a WAL position at or past its
/// commit, to check against what a promoted standby had replayed. The write's ReadyForQuery
/// waits for its answer (see `Session::held_ready`). The commit was flushed before it was
/// answered (unless `synchronous_commit` is off), so the flush position covers it without
/// the WAL other sessions inserted but nobody flushed yet: counting that, a standby that had
/// everything this session committed read as one that lost some of it.
static LSN_QUERY: LazyLock<Vec<u8>> = LazyLock::new(|| {
    internal(
        "SELECT (CASE WHEN pg_catalog.current_setting('synchronous_commit') \
         OPERATOR(pg_catalog.=) 'off' THEN pg_catalog.pg_current_wal_insert_lsn() \
         ELSE pg_catalog.pg_current_wal_flush_lsn() END)::pg_catalog.text",
    )
});

/// Length of a ReadyForQuery message.
const READY_LEN: usize = 6;

/// Why the data path stopped.
enum End {
    /// The client sent Terminate (forwarded; `terminated`) or ended its stream.
    ClientDone { terminated: bool },
    /// The client sent a message PostgreSQL refuses (`error`, for the client); nothing of it
    /// or past it was forwarded. The requests before it are answered first, as the server
    /// answers them before it reads the bad one.
    ClientBroke(SessionError),
    /// Anything else; the client may need to be told.
    Failed(SessionError),
}

/// What the data path stopped for.
enum Wakeup {
    /// The session is over.
    End(End),
    /// The backend connection broke or closed.
    BackendLost(std::io::Error),
}

/// Bytes read from the server at a time while passing on the answers a departed client is owed.
const OWED_READ_CHUNK: usize = 8 * 1024;

/// How long a client the gateway ended the session of may go on sending before its connection
/// is closed under it (see [`Session::linger`]).
const LINGER: Duration = Duration::from_secs(2);

/// Socket events one wake-up may handle before the session yields to the others.
const EVENTS_PER_WAKE: usize = 64;

/// Requests sent on and not yet answered, past which the client is not read: each costs the
/// gateway a record, and a client that pipelines without reading its answers would otherwise
/// grow them without bound while the server's socket buffers hold its requests.
const MAX_IN_FLIGHT: usize = 4096;

/// The shutdown phase's bit in the session's record of what else woke it (see [`Bell`]).
const SHUTDOWN_BIT: u8 = 1;
/// The primary's changes' bit in that record.
const PRIMARY_BIT: u8 = 2;
/// [`Bell`] bit of the gateway's pause (`POST /pause`, `POST /resume`).
const HOLD_BIT: u8 = 4;

/// Who is waiting for each ReadyForQuery the backend owes, in wire order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// The client: forward.
    Client,
    /// The gateway's xid query: consume.
    Xid,
    /// The client, whose Query carries the xid query after `statements` of its statements:
    /// the answers to that are consumed (see [`SuffixAnswer`]), the rest forwarded. With
    /// `before_commit`, the string's COMMIT follows it (see [`XID_BEFORE_COMMIT`]).
    ClientThenXid {
        statements: usize,
        before_commit: bool,
    },
    /// The client, whose Query was sent as a batch with the xid query (see [`AsBatch`]).
    ClientAsBatch,
    /// The gateway's WAL position query: consume.
    Lsn,
    /// The client, answered with an error of the gateway's that the new backend raises in
    /// the request's place (so that its transaction state follows): the server's ErrorResponse
    /// is replaced by the gateway's own words, without PL/pgSQL's context.
    Raised,
}

impl Owner {
    /// Whether the client waits for this ReadyForQuery.
    fn is_client(self) -> bool {
        matches!(
            self,
            Owner::Client | Owner::ClientThenXid { .. } | Owner::ClientAsBatch | Owner::Raised
        )
    }
}

/// What the gateway needs to log in again for this session on another server.
pub struct Relogin {
    /// The backend the session uses now.
    pub backend: Backend,
    /// Startup parameters for the server, as the client sent them.
    pub params: Vec<(String, Vec<u8>)>,
    /// Role name.
    pub user: String,
    /// How to authenticate.
    pub credential: Credential,
}

/// Whether a `replication` startup parameter's value asks for a walsender (`true`, `on`,
/// `yes`, `1`, or `database` for logical replication), as PostgreSQL parses it.
pub fn asks_replication(value: &[u8]) -> bool {
    !matches!(
        value.to_ascii_lowercase().as_slice(),
        b"false" | b"off" | b"no" | b"0"
    )
}

impl Relogin {
    /// Whether the session is a replication connection (a walsender): it takes replication
    /// commands and no extended-protocol queries, so the gateway asks it nothing of its own
    /// and cannot move it.
    pub fn replication(&self) -> bool {
        self.params
            .iter()
            .any(|(k, v)| k == "replication" && asks_replication(v))
    }

    /// The login as [`crate::grants`] knows it.
    fn grants_key(&self) -> String {
        let options = self.params.iter().find(|(k, _)| k == "options");
        crate::grants::login_key(&self.user, options.map(|(_, v)| v.as_slice()))
    }
}

/// The answer the gateway owes a client request itself, after a replay diverged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Poison {
    /// Nothing owed.
    None,
    /// The next request gets 40001.
    Next,
    /// 40001 was sent; drop the rest of the extended batch and answer its Sync.
    UntilSync,
}

/// A logged-in session on the data path.
pub struct Session {
    pump: Pump,
    guard: SessionGuard,
    shared: Arc<Shared>,
    /// Bytes and queries not yet added to the shared counters.
    tally: Tally,
    relogin: Relogin,
    journal: Journal,
    wire: VecDeque<Owner>,
    /// Value of the DataRow the running xid query returned.
    xid_row: Option<Option<u64>>,
    /// WAL position at or past the last autocommit write the client saw succeed.
    acked_lsn: Option<u64>,
    /// The ReadyForQuery that ends an autocommit write, held back until the WAL position query
    /// behind it is answered: a client told of a commit before its position is known could
    /// carry on past that commit lost with a primary that died in between, unnoticed.
    held_ready: Option<[u8; READY_LEN]>,
    /// Type byte of the server message being streamed in pieces.
    down_tag: u8,
    /// The backend PID the client was told at login.
    client_pid: i32,
    /// The PID of the backend in use now.
    backend_pid: i32,
    /// Status byte of the last ReadyForQuery.
    txn_status: u8,
    /// Query, Sync and FunctionCall messages still waiting for their ReadyForQuery.
    awaiting_ready: u32,
    /// Shutdown asked sessions to close at their next transaction boundary.
    draining: bool,
    /// The gateway is paused (`POST /pause`): hold at the next transaction boundary.
    holding: bool,
    /// Held there now: the client's next request is not read until the pause ends.
    held: bool,
    /// LISTENs were in effect at the last transaction boundary (as the registry knows).
    listening: bool,
    /// A FATAL from the server, held back (not forwarded) until it is known whether the
    /// server ended the session or the primary died.
    held_fatal: Option<(String, String, usize)>,
    /// The last value of every ParameterStatus the server reported.
    server_params: Vec<(String, String)>,
    poison: Poison,
    /// Whether the session could move at all (failover on, another backend to move to): the
    /// journal's record and the xid and WAL position captures serve a move only, so without
    /// one the journal keeps nothing and the server is asked nothing the client did not send.
    can_move: bool,
    /// Whether the gateway captures xids (after lone writes, before COMMITs); off when the
    /// session cannot move, and once the capture failed in this session (e.g. EXECUTE on
    /// `pg_current_xact_id_if_assigned` revoked), so one failure is all.
    capture_xid: bool,
    /// The error of a failed xid query, or the gateway's 40001 after a replay diverged: the
    /// transaction is aborted, so the client's COMMIT behind it will be answered `ROLLBACK`;
    /// the client gets this error in its place. With its origin, for the error counts.
    doomed_commit: Option<(Vec<u8>, &'static str)>,
    /// Progress through the answer to a Query that carries the xid query.
    xid_suffix: SuffixAnswer,
    /// The client's next messages wait for the server to say what became of a Sync sent
    /// behind a COPY (see [`Journal::copy_sync_pending`]).
    up_waits_copy: bool,
    /// Progress through the answer to a client's Query sent as a batch.
    as_batch: AsBatch,
    /// What of that answer is held back (see [`AsBatch`]): whole server messages.
    held_answer: Vec<u8>,
    /// The answer to [`XID_TAIL`] in the batch being answered is complete (its
    /// CommandComplete passed): an error after it is the commit's, not the query's, and the
    /// client has all of the batch's answer but its ReadyForQuery.
    tail_done: bool,
    /// Why the journal says the session cannot move, as last shown in `/status`.
    shown_unmovable: Option<&'static str>,
    /// The reported parameters as they were at the last transaction boundary, kept from the
    /// first ParameterStatus since (until then `server_params` holds them).
    params_before: Option<Vec<(String, String)>>,
    /// The xid query an autocommit batch gets in front of its Sync: [`XID_TAIL`], or
    /// [`XID_TAIL_FLUSHED`] where in-flight commits are settled.
    tail_query: &'static [u8],
    /// What follows the text of a Query sent as a batch: [`QUERY_AS_BATCH_REST`], or
    /// [`QUERY_AS_BATCH_REST_FLUSHED`] where in-flight commits are settled.
    query_rest: &'static [u8],
    /// The database's suspects, as they are learned (a gateway that can move sessions).
    suspects: Option<crate::suspects::Feed>,
    /// When the last request that expects a ReadyForQuery was scanned (a session that can
    /// move): how long before its connection broke it was sent (see `Session::reset_soon_after`).
    last_request_at: Option<Instant>,
    /// Where the request being received began among the bytes written to the backend (a
    /// session that can move).
    request_start: RequestStart,
    /// Where the last request that expects a ReadyForQuery began, on the same count (`None`:
    /// not known); see `Session::ended_before_acknowledging`.
    last_request_from: Option<u64>,
    /// Found by a move: the old server never read the last request in flight, which runs on
    /// the new primary even where it would be in doubt.
    last_unread: bool,
}

/// Where the client's request being received began, among the bytes the pump wrote to the
/// backend ([`crate::pump::Pipe::written`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestStart {
    /// None is being received: the next client message begins one.
    Between,
    /// At this byte.
    At(u64),
    /// Before the session moved: its bytes went to the new backend otherwise.
    Unknown,
}

/// What a login learned of the session's role and database, for a gateway that can move
/// sessions (none of it otherwise).
#[derive(Debug, Default)]
pub struct Learned {
    /// Whether the role may run the xid capture (see [`crate::grants`]).
    pub may_capture: bool,
    /// What makes a statement write unseen there, kept fresh (see [`crate::suspects`]).
    pub suspects: Option<crate::suspects::Feed>,
}

impl Session {
    /// A session whose login just finished.
    pub fn new(
        pump: Pump,
        guard: SessionGuard,
        shared: Arc<Shared>,
        relogin: Relogin,
        backend_pid: i32,
        server_params: Vec<(String, String)>,
        learned: Learned,
    ) -> Self {
        guard.info().txn_status.store(b'I', Ordering::Relaxed);
        let can_move = shared.failover.disabled().is_none() && !relogin.replication();
        let mut journal = if can_move {
            Journal::new(shared.config.failover.max_replay_bytes)
        } else {
            Journal::boundaries_only()
        };
        let Learned {
            may_capture,
            mut suspects,
        } = learned;
        if let Some(feed) = &mut suspects {
            journal.set_suspects(feed.current());
        }
        for (name, value) in &server_params {
            journal.on_parameter_status(name, value);
        }
        let (tail_query, query_rest): (&'static [u8], &'static [u8]) =
            if shared.config.failover.settle_in_flight_autocommit {
                (&XID_TAIL_FLUSHED, &QUERY_AS_BATCH_REST_FLUSHED)
            } else {
                (&XID_TAIL, &QUERY_AS_BATCH_REST)
            };
        Self {
            pump,
            guard,
            tally: Tally::new(&shared.metrics),
            shared,
            relogin,
            journal,
            wire: VecDeque::new(),
            xid_row: None,
            acked_lsn: None,
            held_ready: None,
            down_tag: 0,
            client_pid: backend_pid,
            backend_pid,
            txn_status: b'I',
            awaiting_ready: 0,
            draining: false,
            holding: false,
            held: false,
            listening: false,
            held_fatal: None,
            server_params,
            poison: Poison::None,
            can_move,
            capture_xid: can_move && may_capture,
            doomed_commit: None,
            xid_suffix: SuffixAnswer::default(),
            up_waits_copy: false,
            as_batch: AsBatch::None,
            held_answer: Vec::new(),
            tail_done: false,
            shown_unmovable: None,
            params_before: None,
            tail_query,
            query_rest,
            suspects,
            last_request_at: None,
            request_start: RequestStart::Between,
            last_request_from: None,
            last_unread: false,
        }
    }

    /// Forwards until the client leaves, the server ends the session, or shutdown.
    pub async fn run(mut self, mut shutdown: Shutdown) -> Result<(), SessionError> {
        let end = self.forward(&mut shutdown).await;
        // Boxed, like the other cold paths: the poll of the data path should not carry
        // their state in its stack frame.
        Box::pin(self.close(end, &mut shutdown)).await
    }

    fn at_transaction_boundary(&self) -> bool {
        self.txn_status == b'I' && !self.client_mid_exchange()
    }

    async fn forward(&mut self, shutdown: &mut Shutdown) -> End {
        // Logged in right after a failover, the session waits for the listeners still moving,
        // as a moved one does (nothing to wait for otherwise: one atomic load).
        self.await_listeners(&self.relogin.backend).await;
        // Login may have left bytes of either side in the buffers.
        if let Some(end) = self.scan_up().or_else(|| self.scan_down()) {
            return end;
        }
        if shutdown.phase() >= Phase::Draining {
            self.draining = true;
        }
        // A failover that fences this session's primary moves the session even if its backend
        // connection never breaks (a frozen or partitioned host ACKs or drops silently).
        let mut primary_changes = self.shared.topology.primary_changes();
        // Looked at once straight away: a failover may have fenced the primary this session
        // logged in to before it got here.
        primary_changes.mark_changed();
        let mut holds = self.shared.hold.subscribe();
        holds.mark_changed();
        // The shutdown phase, the primary and the pause share one record of which of them woke the task:
        // one look at it per wake-up. The sockets wake the task directly (see `Pump`).
        let mut bell = Bell::new(0);
        loop {
            enum Wake {
                Data(Wakeup),
                Shutdown,
                PrimaryChanged,
                Hold,
            }
            let wake = {
                let mut shutdown_changed = shutdown.changed_on(bell.woken(), SHUTDOWN_BIT);
                let mut primary_changed =
                    crate::wake::changed_on(&mut primary_changes, bell.woken(), PRIMARY_BIT);
                let mut hold_changed = crate::wake::changed_on(&mut holds, bell.woken(), HOLD_BIT);
                // New watches, each looked at once to be registered with its channel.
                let mut rung = SHUTDOWN_BIT | PRIMARY_BIT | HOLD_BIT;
                // Not wrapped in `unconstrained`: tokio's cooperative budget counts only the
                // readiness waits of sockets that would block, and `poll_data` yields by itself
                // after EVENTS_PER_WAKE events.
                poll_fn(|cx| {
                    rung |= bell.take(cx);
                    if let Poll::Ready(w) = self.poll_data(cx) {
                        return Poll::Ready(Wake::Data(w));
                    }
                    // A source found ready ends this loop; the next one looks at all of them.
                    let looked = std::mem::take(&mut rung);
                    if shutdown_changed.poll_rung(looked).is_ready() {
                        return Poll::Ready(Wake::Shutdown);
                    }
                    if primary_changed.poll_rung(looked).is_ready() {
                        return Poll::Ready(Wake::PrimaryChanged);
                    }
                    if hold_changed.poll_rung(looked).is_ready() {
                        return Poll::Ready(Wake::Hold);
                    }
                    Poll::Pending
                })
                .await
            };
            let lost = match wake {
                Wake::Shutdown => match shutdown.phase() {
                    Phase::Force => return End::Failed(SessionError::Shutdown),
                    Phase::Draining => {
                        self.draining = true;
                        None
                    }
                    Phase::Running => None,
                },
                Wake::Data(Wakeup::End(end)) => return end,
                Wake::Data(Wakeup::BackendLost(e)) => Some(e),
                Wake::PrimaryChanged if self.shared.topology.is_fenced(&self.relogin.backend) => {
                    tracing::info!(
                        session = self.guard.info().id,
                        old = %self.relogin.backend,
                        "the session's primary was failed over; leaving it"
                    );
                    Some(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "the primary was failed over",
                    ))
                }
                Wake::PrimaryChanged => None,
                Wake::Hold => {
                    self.holding = *holds.borrow_and_update();
                    self.pace();
                    None
                }
            };
            let Some(cause) = lost else { continue };
            // A forced shutdown does not wait for the failover a move waits for.
            let end = tokio::select! {
                end = Box::pin(self.backend_failed(cause)) => end,
                _ = shutdown.reached(Phase::Force) => Some(End::Failed(SessionError::Shutdown)),
            };
            if let Some(end) = end {
                return end;
            }
        }
    }

    /// Moves bytes both ways and inspects them until both sockets would block, so one wake-up
    /// handles everything that is ready (a round trip is two wake-ups, not four).
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Wakeup> {
        for _ in 0..EVENTS_PER_WAKE {
            if self.draining && self.at_transaction_boundary() {
                return Poll::Ready(Wakeup::End(End::Failed(SessionError::Shutdown)));
            }
            let end = match ready!(self.pump.poll_event(cx)) {
                Ok(Event::FromClient(n)) => {
                    self.tally.client_bytes(n);
                    let end = self.scan_up();
                    self.pace();
                    end
                }
                Ok(Event::FromBackend(n)) => {
                    self.tally.backend_bytes(n);
                    let mut end = self.scan_down();
                    if end.is_none() && self.up_waits_copy && !self.journal.copy_sync_pending() {
                        // The server said what became of the Sync behind a COPY: the client's
                        // messages after it go on, behind that Sync's ReadyForQuery if owed.
                        self.owe_copy_sync_ready();
                        self.up_waits_copy = false;
                        end = self.scan_up();
                    }
                    self.pace();
                    end
                }
                Ok(Event::ClientEof) => Some(End::ClientDone { terminated: false }),
                Err(PumpError::Client(e)) => Some(End::Failed(SessionError::ClientGone(e))),
                Ok(Event::BackendEof) => {
                    return Poll::Ready(Wakeup::BackendLost(
                        std::io::ErrorKind::UnexpectedEof.into(),
                    ))
                }
                Err(PumpError::Backend(e)) => return Poll::Ready(Wakeup::BackendLost(e)),
            };
            if let Some(end) = end {
                return Poll::Ready(Wakeup::End(end));
            }
        }
        // A session that always has bytes ready yields to the others now and then.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Stops reading from the client while [`MAX_IN_FLIGHT`] requests await their answers
    /// (unless the server waits for the client's COPY data), and reads again once fewer do;
    /// and, while the gateway is paused, from the next transaction boundary until it resumes.
    fn pace(&mut self) {
        let held = self.holding && self.at_transaction_boundary();
        if held != self.held {
            self.held = held;
            self.guard.info().held.store(held, Ordering::Relaxed);
        }
        self.pump.up.paused = held
            || (self.wire.len() >= MAX_IN_FLIGHT && !self.journal.copy_in_pending())
            || self.up_waits_copy;
    }

    /// The backend connection ended: either the server ended the session (forward its word)
    /// or the primary is gone (move the session).
    async fn backend_failed(&mut self, cause: std::io::Error) -> Option<End> {
        match self.relocate(cause).await {
            Ok(()) => {
                self.pace();
                self.cancel_missed_during_the_move().await;
                // Bytes that arrived meanwhile, from either side, are inspected now.
                self.scan_up().or_else(|| self.scan_down())
            }
            Err(e) => Some(End::Failed(e)),
        }
    }

    /// A cancel the client sent while the session was moving reached only the old backend: the
    /// requests sent again on the new one are cancelled there, once they have been sent.
    async fn cancel_missed_during_the_move(&mut self) {
        let info = self.guard.info();
        if !info.missed_cancel.swap(false, Ordering::Relaxed) || self.awaiting_ready == 0 {
            return;
        }
        let Some(key) = self.guard.cancel_key() else {
            return;
        };
        let _ = crate::clock::timeout(CLOSE_FLUSH_TIMEOUT, self.pump.flush_backend()).await;
        tracing::info!(
            session = info.id,
            "a cancel sent during the move is forwarded to the new backend"
        );
        let registry = self.shared.registry.clone();
        tokio::spawn(async move {
            crate::cancel::forward(&registry, key, CLOSE_FLUSH_TIMEOUT).await;
        });
    }

    /// Lets a held FATAL through to the client; returns the session error it means.
    fn release_fatal(&mut self, cause: std::io::Error) -> SessionError {
        match self.held_fatal.take() {
            Some((code, message, len)) => {
                // A write's ReadyForQuery held for its WAL position: the write committed, and
                // the server ended the session after it, not during it.
                if let Some(ready) = self.held_ready.take() {
                    self.pump.down.insert_ready(&ready);
                }
                self.pump.down.ready += len;
                SessionError::ServerFatal { code, message }
            }
            None => SessionError::BackendLost(cause),
        }
    }

    /// Inspects new client bytes, whole message by whole message (the journal keeps them).
    fn scan_up(&mut self) -> Option<End> {
        // What the catalog says now counts for the requests about to be classified (one
        // atomic load when nothing changed).
        if let Some(newer) = self
            .suspects
            .as_mut()
            .and_then(crate::suspects::Feed::newer)
        {
            self.journal.set_suspects(newer);
        }
        loop {
            if self.journal.copy_sync_pending() {
                // Until the server answers the COPY in front of it: what follows goes in that
                // Sync's batch or after it, and the gateway's own queries with it.
                self.up_waits_copy = true;
                return None;
            }
            // The type byte is judged as soon as it arrives, as PostgreSQL does: a client that
            // sent an unknown one (a second startup packet, say) is not left waiting for the
            // body its length word promises.
            if let Some(&tag) = self.pump.up.unscanned().first() {
                if !frontend::is_known(tag) {
                    return Some(End::ClientBroke(SessionError::refused(
                        "08P01",
                        "protocol_violation",
                        format!("invalid frontend message type {tag}"),
                    )));
                }
                if let (Some(max), Some(len)) =
                    (frontend::max_len(tag), self.pump.up.unscanned().get(1..5))
                {
                    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]);
                    if len as usize > max {
                        return Some(End::ClientBroke(SessionError::refused(
                            "08P01",
                            "protocol_violation",
                            format!("invalid message length {len} for message type {tag}"),
                        )));
                    }
                }
            }
            let (step, n) = match self.pump.up.scan(|_| true) {
                Ok(s) => s,
                Err(e) => return Some(End::ClientBroke(client_frame_error(e))),
            };
            let tag = match step {
                Step::NeedMore => return None,
                Step::Whole { tag, .. } => tag,
                // Not reached: every message is asked for whole.
                Step::Streamed { .. } | Step::Body => {
                    self.pump.up.ready += n;
                    continue;
                }
            };
            if tag == frontend::TERMINATE {
                // Pass it on so the server ends the backend cleanly.
                self.pump.up.ready += n;
                return Some(End::ClientDone { terminated: true });
            }
            if self.poison != Poison::None && self.answer_poisoned(tag, n) {
                continue;
            }
            let at = self.pump.up.ready;
            if self.can_move && self.request_start == RequestStart::Between {
                self.request_start = RequestStart::At(self.pump.up.written + at as u64);
            }
            let raw = &self.pump.up.buf[at..at + n];
            let before = self.journal.on_client_message(tag, raw);
            if before == Before::CaptureXid && self.capture_xid {
                // A query of its own, not a statement in front of the COMMIT in the same
                // string: the server flushes its answer at its ReadyForQuery, so the xid is
                // known before the COMMIT runs, even if the primary dies during it.
                self.pump.up.insert_ready(&XID_QUERY);
                self.wire.push_back(Owner::Xid);
            }
            let tail = before == Before::CommitXidBeforeSync && self.capture_xid;
            if tail {
                self.pump.up.insert_ready(self.tail_query);
                self.journal.note_tail();
            }
            let suffixed = before == Before::CaptureXidAfter
                && self.capture_xid
                && tag == frontend::QUERY
                && self.splice_into_query(n, n - 1, 1, &XID_SUFFIX);
            if suffixed {
                self.journal.note_suffix();
            }
            let before_commit = before == Before::CaptureXidBeforeCommit
                && self.capture_xid
                && self.splice_into_query(n, 5 + self.journal.commit_at(), 0, &XID_BEFORE_COMMIT);
            let as_batch =
                before == Before::QueryAsBatch && self.capture_xid && self.send_query_as_batch(n);
            if self.journal.expects_ready() {
                if self.can_move {
                    self.last_request_at = Some(Instant::now());
                    self.last_request_from = match self.request_start {
                        RequestStart::At(byte) => Some(byte),
                        RequestStart::Between | RequestStart::Unknown => None,
                    };
                    self.request_start = RequestStart::Between;
                }
                self.owe_ready(if suffixed {
                    Owner::ClientThenXid {
                        statements: self.journal.last_statement_count(),
                        before_commit: false,
                    }
                } else if before_commit {
                    Owner::ClientThenXid {
                        statements: self.journal.last_statement_count() - 1,
                        before_commit: true,
                    }
                } else if as_batch {
                    Owner::ClientAsBatch
                } else {
                    Owner::Client
                });
            }
            if matches!(tag, frontend::QUERY | frontend::EXECUTE) {
                self.tally.query();
            }
            if !suffixed && !as_batch && !before_commit {
                self.pump.up.ready += n;
            }
            // Outside a block, a write whose xid was not asked for is checked by WAL position
            // (a COPY's after its data: the journal says when).
            let unasked = (before == Before::CommitXidBeforeSync && !tail)
                || (before == Before::QueryAsBatch && !as_batch)
                || (before == Before::CaptureXidBeforeCommit && !before_commit)
                || (before == Before::CaptureXidAfter
                    && !suffixed
                    && self.journal.txn_status() == b'I'
                    && !self.journal.copy_in_pending());
            if (before == Before::CaptureLsnAfter || unasked) && self.can_move {
                self.pump.up.insert_ready(&LSN_QUERY);
                self.wire.push_back(Owner::Lsn);
            }
        }
    }

    /// A Sync behind a COPY turned out to be answered (the COPY failed before its data): the
    /// client is owed its ReadyForQuery.
    fn owe_copy_sync_ready(&mut self) {
        if self.journal.take_copy_sync_answered() {
            self.owe_ready(Owner::Client);
            self.request_start = RequestStart::Between;
        }
    }

    /// Counts a ReadyForQuery the server owes, `owner` waiting for it.
    fn owe_ready(&mut self, owner: Owner) {
        if self.awaiting_ready == 0 {
            self.guard.info().active.store(true, Ordering::Relaxed);
        }
        self.awaiting_ready += 1;
        self.wire.push_back(owner);
    }

    /// Puts `text` in place of `remove` bytes at byte `at` of the client's Query of `n` bytes
    /// at `ready` (the xid query: [`XID_SUFFIX`] in place of the terminating NUL, or
    /// [`XID_BEFORE_COMMIT`] in front of a whole block's COMMIT) and passes the message over;
    /// its answer comes before the client's ReadyForQuery, with no flush of its own. Returns
    /// false (nothing done) if the message would grow past the protocol's limit.
    fn splice_into_query(&mut self, n: usize, at: usize, remove: usize, text: &[u8]) -> bool {
        // The length word counts itself but not the type byte.
        let Ok(len) = i32::try_from(n - 1 - remove + text.len()) else {
            return false;
        };
        let pipe = &mut self.pump.up;
        let start = pipe.ready;
        pipe.buf[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
        pipe.ready += at;
        pipe.splice_at_ready(remove, text);
        pipe.ready += n - at - remove;
        true
    }

    /// Sends the client's Query of `n` bytes at `ready` (one data-changing statement outside a
    /// transaction block) as a Parse of the same text (see [`parse_of_query`]) followed by
    /// [`QUERY_AS_BATCH_REST`], so that the xid query runs in its transaction; done in place.
    /// Returns false (nothing done) if the Parse would be longer than the server takes.
    fn send_query_as_batch(&mut self, n: usize) -> bool {
        // The length word counts itself, not the type byte.
        let len = n - 1 + PARSE_OF_QUERY_GROWTH;
        let Some(len) = (len < SERVER_MESSAGE_LIMIT)
            .then(|| i32::try_from(len).ok())
            .flatten()
        else {
            return false;
        };
        let pipe = &mut self.pump.up;
        pipe.splice_at_ready(0, &QUERY_AS_BATCH_HEAD);
        let at = pipe.ready;
        pipe.buf[at] = frontend::PARSE;
        pipe.buf[at + 1..at + 5].copy_from_slice(&len.to_be_bytes());
        pipe.ready += 5;
        pipe.splice_at_ready(0, encode::INTERNAL_STATEMENT.as_bytes());
        pipe.splice_at_ready(0, b"\0");
        // The text and its NUL.
        pipe.ready += n - 5;
        pipe.splice_at_ready(0, self.query_rest);
        true
    }

    /// After a diverged replay the client is owed a 40001 for its next request; the backend
    /// waits in an aborted transaction, so ROLLBACK goes through and anything else is answered
    /// here (a COMMIT must not reach the server: it would answer "ROLLBACK" without an error).
    /// Returns whether the message was consumed.
    fn answer_poisoned(&mut self, tag: u8, n: usize) -> bool {
        if self.poison == Poison::Next && tag == frontend::QUERY {
            let at = self.pump.up.ready;
            let body = &self.pump.up.buf[at + 5..at + n];
            let sql = std::str::from_utf8(&body[..body.len().saturating_sub(1)]).unwrap_or("");
            let statements = classify(sql).statements;
            if statements == [Statement::Rollback] {
                self.poison = Poison::None;
                return false;
            }
            if statements == [Statement::Commit] {
                // It ends the transaction, as a COMMIT that fails does directly: the server
                // answers it ROLLBACK (the transaction is aborted), which becomes the 40001.
                let mut err = BytesMut::new();
                encode::error_response(&mut err, Severity::Error, "40001", relocate::DIVERGED);
                self.doomed_commit = Some((err.to_vec(), "gateway"));
                self.poison = Poison::None;
                return false;
            }
        }
        self.pump.up.remove_at_ready(n);
        let mut reply = BytesMut::new();
        // Housekeeping a driver sends on its own (closing a cached statement) is answered as
        // the server would, so the 40001 reaches a request that runs a statement.
        if self.poison == Poison::Next
            && matches!(tag, frontend::CLOSE | frontend::FLUSH | frontend::SYNC)
        {
            match tag {
                frontend::CLOSE => reply.extend_from_slice(b"3\0\0\0\x04"),
                frontend::SYNC => encode::ready_for_query(&mut reply, b'T'),
                _ => {}
            }
            if !reply.is_empty() {
                self.pump.down.insert_ready(&reply);
            }
            return true;
        }
        if self.poison == Poison::Next {
            diverged_error(&mut reply);
            self.poison = Poison::UntilSync;
        }
        if frontend::expects_ready_for_query(tag) {
            encode::ready_for_query(&mut reply, b'E');
            self.poison = Poison::None;
        }
        if !reply.is_empty() {
            self.pump.down.insert_ready(&reply);
        }
        true
    }

    /// Inspects new server bytes up to the last complete header.
    fn scan_down(&mut self) -> Option<End> {
        let wanted = |t| {
            matches!(
                t,
                backend::READY_FOR_QUERY
                    | backend::ERROR_RESPONSE
                    | backend::PARAMETER_STATUS
                    | backend::NOTIFICATION_RESPONSE
                    | b'1'
            )
        };
        loop {
            if self.held_fatal.is_some() {
                return None;
            }
            self.owe_copy_sync_ready();
            let owner = self.wire.front().copied();
            let internal = owner.is_some_and(|o| !o.is_client());
            if let Some(Owner::ClientThenXid {
                statements,
                before_commit,
            }) = owner
            {
                if self.xid_suffix.state == XidSuffix::None {
                    self.xid_suffix = SuffixAnswer {
                        state: XidSuffix::Statement,
                        left: statements,
                        // The status the Query runs in: the last one the server reported. (A
                        // COMMIT after the xid query answers once it committed.)
                        holds: self.txn_status == b'I' && !before_commit,
                        row_seen: false,
                    };
                }
            }
            if owner == Some(Owner::ClientAsBatch) && self.as_batch == AsBatch::None {
                self.as_batch = AsBatch::Preamble;
            }
            let suffix = self.xid_suffix.state;
            let suffix_active = !matches!(suffix, XidSuffix::None | XidSuffix::Done);
            // A CommandComplete held: every message is looked at, whole, to know whether it
            // goes out before the next one.
            let holding = suffix_active && !self.held_answer.is_empty();
            let as_batch = self.as_batch;
            let doomed = self.doomed_commit.is_some();
            let tail = self.journal.answering_tail();
            let raised = owner == Some(Owner::Raised);
            let at = self.pump.down.ready;
            let down = &mut self.pump.down;
            // The messages to look into; any other comes whole only when small (see
            // `Pipe::from_server`), and is passed on like a streamed one.
            let look = |t| {
                internal
                    || wanted(t)
                    || doomed && t == backend::COMMAND_COMPLETE
                    || suffix_active && t == backend::COMMAND_COMPLETE
                    || suffix == XidSuffix::Completed && t == backend::ROW_DESCRIPTION
                    || suffix == XidSuffix::Answer && t == backend::DATA_ROW
                    || holding
                    || tail && is_tail_answer(t)
                    || as_batch.looks_at(t)
                    || raised && is_raise_completion(t)
            };
            let (step, n) = match down.scanner.next(&down.buf[at..], look) {
                Ok(s) => s,
                // The server's framing is trusted; a broken one means a broken connection.
                Err(e) => {
                    return Some(End::Failed(SessionError::BackendLost(
                        std::io::Error::other(e),
                    )))
                }
            };
            let suffix_step = match step {
                Step::Whole { tag, body } if suffix_active && look(tag) => on_xid_suffix(
                    &mut self.xid_suffix,
                    holding,
                    &mut self.journal,
                    &mut |err| {
                        capture_failed(
                            &mut self.capture_xid,
                            &self.shared,
                            self.guard.info(),
                            &self.relogin,
                            err,
                            "after a write",
                        )
                    },
                    tag,
                    body,
                ),
                _ => SuffixStep::Pass,
            };
            match suffix_step {
                SuffixStep::Pass => {}
                SuffixStep::Consume => {
                    self.pump.down.remove_at_ready(n);
                    continue;
                }
                SuffixStep::Hold => {
                    self.held_answer
                        .extend_from_slice(&self.pump.down.buf[at..at + n]);
                    self.pump.down.remove_at_ready(n);
                    continue;
                }
                SuffixStep::ReleaseFirst => {
                    self.release_held_answer();
                    continue;
                }
                SuffixStep::ConsumeAndRelease => {
                    self.pump.down.remove_at_ready(n);
                    self.release_held_answer();
                    continue;
                }
                SuffixStep::DropHeld => self.held_answer.clear(),
            }
            match step {
                Step::NeedMore => return None,
                Step::Whole { tag, .. } if !look(tag) => {
                    let at = self.before_first_row(tag, at);
                    self.journal
                        .on_server_bytes(tag, &self.pump.down.buf[at..at + n]);
                    self.journal.on_server_message(tag);
                    self.pump.down.ready += n;
                }
                Step::Whole { tag, .. } if raised && is_raise_completion(tag) => {
                    // The raising query's own requests: only its error is the client's.
                    self.pump.down.remove_at_ready(n);
                }
                Step::Whole { tag, body } if internal => {
                    if tag == backend::ERROR_RESPONSE {
                        let err = ErrorView::parse(body);
                        if err.is_fatal() {
                            // The server is ending the session: the client hears why.
                            self.wire.pop_front();
                            continue;
                        }
                        if owner == Some(Owner::Xid) {
                            capture_failed(
                                &mut self.capture_xid,
                                &self.shared,
                                self.guard.info(),
                                &self.relogin,
                                &err,
                                "before a COMMIT",
                            );
                            let len = (n as u32 - 1).to_be_bytes();
                            self.doomed_commit =
                                Some(([&[tag][..], &len, body].concat(), "server"));
                        }
                    }
                    match (tag, owner) {
                        (backend::DATA_ROW, Some(Owner::Xid)) => {
                            self.xid_row = Some(parse_xid_row(body))
                        }
                        // A write that failed committed nothing: its position (other sessions'
                        // WAL, maybe not on the standby yet) is not this session's to check.
                        (backend::DATA_ROW, _) if !self.journal.answering_failed() => {
                            if let Some(lsn) = first_text(body).and_then(parse_lsn) {
                                self.acked_lsn = Some(lsn);
                                self.journal.position_captured();
                            }
                        }
                        (backend::READY_FOR_QUERY, Some(Owner::Xid)) => {
                            self.wire.pop_front();
                            self.journal.set_xid(self.xid_row.take().flatten());
                        }
                        (backend::READY_FOR_QUERY, _) => {
                            self.wire.pop_front();
                        }
                        _ => {}
                    }
                    self.pump.down.remove_at_ready(n);
                    if tag == backend::READY_FOR_QUERY && owner == Some(Owner::Lsn) {
                        self.release_held_ready();
                    }
                }
                Step::Whole { tag, body } if as_batch.looks_at(tag) => {
                    let xid = (tag == backend::DATA_ROW).then(|| parse_xid_row(body));
                    self.on_batch_answer(tag, xid, n);
                }
                Step::Whole { tag, body } if tail && is_tail_answer(tag) => {
                    // The client's requests are answered: the rest is the xid query's.
                    match tag {
                        backend::DATA_ROW => self.journal.set_xid(parse_xid_row(body)),
                        backend::COMMAND_COMPLETE => self.tail_done = true,
                        _ => {}
                    }
                    self.pump.down.remove_at_ready(n);
                }
                Step::Whole {
                    tag: backend::COMMAND_COMPLETE,
                    body,
                } if doomed && body == b"ROLLBACK\0" && self.journal.answering_commit() => {
                    // The COMMIT the failed xid query (or the replay) doomed: answer it with
                    // that error.
                    let (err, origin) = self.doomed_commit.take().unwrap_or_default();
                    count_error(
                        ErrorView::parse(err.get(5..).unwrap_or_default()).code,
                        origin,
                    );
                    self.journal.on_server_message(backend::ERROR_RESPONSE);
                    self.pump.down.splice_at_ready(n, &err);
                }
                Step::Whole { tag, body } => {
                    match tag {
                        backend::READY_FOR_QUERY
                        | backend::PARAMETER_STATUS
                        | backend::NOTIFICATION_RESPONSE
                            if as_batch == AsBatch::Committing && !self.held_answer.is_empty() =>
                        {
                            // The commit succeeded: the Query's answer ends as it would have,
                            // before what the server says once a transaction is over.
                            self.release_held_answer();
                            // The message is looked at again, behind it.
                            continue;
                        }
                        backend::READY_FOR_QUERY => {
                            if n == READY_LEN && self.wire.get(1) == Some(&Owner::Lsn) {
                                let mut ready = [0; READY_LEN];
                                ready.copy_from_slice(&self.pump.down.buf[at..at + n]);
                                self.held_ready = Some(ready);
                                self.pump.down.remove_at_ready(n);
                                self.wire.pop_front();
                                continue;
                            }
                            let status = inspect::ready_for_query_status(body).unwrap_or(b'I');
                            self.on_ready_for_query(status, at, n);
                        }
                        backend::ERROR_RESPONSE => {
                            let err = ErrorView::parse(body);
                            if as_batch != AsBatch::None && !err.is_fatal() {
                                if as_batch == AsBatch::Tail {
                                    capture_failed(
                                        &mut self.capture_xid,
                                        &self.shared,
                                        self.guard.info(),
                                        &self.relogin,
                                        &err,
                                        "of a Query sent as a batch",
                                    );
                                }
                                // The Query failed, at its commit if it got that far: what is
                                // held never was (the server answers a Query's statement once
                                // it has run, and completes it once it is committed).
                                self.held_answer.clear();
                                self.as_batch = AsBatch::Failed;
                            }
                            // (Not the gateway's own error standing in for a request in doubt
                            // after a move.)
                            if tail
                                && !self.tail_done
                                && !err.is_fatal()
                                && owner != Some(Owner::Raised)
                            {
                                // As for the xid query after a lone write: the batch's
                                // transaction is aborted, and the client hears why.
                                capture_failed(
                                    &mut self.capture_xid,
                                    &self.shared,
                                    self.guard.info(),
                                    &self.relogin,
                                    &err,
                                    "before an autocommit batch's Sync",
                                );
                            }
                            if owner == Some(Owner::Raised) && !err.is_fatal() {
                                let mut own = BytesMut::new();
                                own_error(&mut own, err.code, err.message);
                                self.pump.down.splice_at_ready(n, &own);
                                self.journal.on_server_bytes(tag, &own);
                                self.journal.on_server_message(tag);
                                continue;
                            }
                            count_error(err.code, "server");
                            if err.is_fatal() {
                                self.held_fatal =
                                    Some((err.code.to_owned(), err.message.to_owned(), n));
                                return None;
                            }
                            self.journal
                                .on_server_bytes(tag, &self.pump.down.buf[at..at + n]);
                            self.journal.on_server_message(tag);
                        }
                        backend::PARAMETER_STATUS => {
                            if let Some((name, value)) = inspect::parameter_status(body) {
                                if self.params_before.is_none() {
                                    self.params_before = Some(self.server_params.clone());
                                }
                                self.journal.on_parameter_status(name, value);
                                record_param(&mut self.server_params, name, value);
                            }
                        }
                        backend::NOTIFICATION_RESPONSE => {
                            // The client knows its backend by the PID it was given at login.
                            if self.backend_pid != self.client_pid
                                && body.get(..4) == Some(&self.backend_pid.to_be_bytes()[..])
                            {
                                self.pump.down.buf[at + 5..at + 9]
                                    .copy_from_slice(&self.client_pid.to_be_bytes());
                            }
                        }
                        _ => {
                            self.journal
                                .on_server_bytes(tag, &self.pump.down.buf[at..at + n]);
                            self.journal.on_server_message(tag);
                        }
                    }
                    self.pump.down.ready += n;
                }
                Step::Streamed { tag, .. } => {
                    self.down_tag = tag;
                    let at = self.before_first_row(tag, at);
                    // A RowDescription too large to look into still completes a request.
                    self.journal.on_server_message(tag);
                    self.journal
                        .on_server_bytes(tag, &self.pump.down.buf[at..at + n]);
                    self.pump.down.ready += n;
                }
                Step::Body => {
                    self.journal.on_server_body(&self.pump.down.buf[at..at + n]);
                    self.pump.down.ready += n;
                }
            }
        }
    }

    /// Handles the message of type `tag`, `n` bytes at `ready`, of the answer to a client's
    /// Query sent as a batch that a Query is not answered with, or not there (see [`AsBatch`]);
    /// `xid` is a DataRow's value.
    fn on_batch_answer(&mut self, tag: u8, xid: Option<Option<u64>>, n: usize) {
        let at = self.pump.down.ready;
        match (self.as_batch, tag) {
            (AsBatch::Preamble, b'n') => self.as_batch = AsBatch::Rows,
            (AsBatch::Preamble, backend::ROW_DESCRIPTION) => {
                self.held_answer
                    .extend_from_slice(&self.pump.down.buf[at..at + n]);
                self.as_batch = AsBatch::Described;
            }
            (AsBatch::Described | AsBatch::Rows, _) => {
                // The statement ran: a RowDescription held goes out, even with no row.
                let at = if self.as_batch == AsBatch::Described {
                    self.release_held_answer();
                    self.pump.down.ready
                } else {
                    at
                };
                self.held_answer
                    .extend_from_slice(&self.pump.down.buf[at..at + n]);
                self.as_batch = AsBatch::Tail;
            }
            (AsBatch::Tail, backend::DATA_ROW) => self.journal.set_xid(xid.flatten()),
            (AsBatch::Tail, backend::COMMAND_COMPLETE) => self.as_batch = AsBatch::Committing,
            _ => {}
        }
        self.pump.down.remove_at_ready(n);
    }

    /// Before a server message of type `tag` at `at` (`ready`) is passed on: the first row of
    /// a Query sent as a batch shows its statement ran, so the RowDescription held goes first.
    /// Returns where the message is now.
    fn before_first_row(&mut self, tag: u8, at: usize) -> usize {
        if tag != backend::DATA_ROW || self.as_batch != AsBatch::Described {
            return at;
        }
        self.release_held_answer();
        self.as_batch = AsBatch::Rows;
        self.pump.down.ready
    }

    /// Passes on what is held of the answer to a Query sent as a batch, at `ready`.
    fn release_held_answer(&mut self) {
        let held = std::mem::take(&mut self.held_answer);
        let mut rest = &held[..];
        while let Some((&tag, after)) = rest.split_first() {
            let len = after
                .first_chunk::<4>()
                .map_or(0, |l| u32::from_be_bytes(*l) as usize);
            let (message, next) = rest.split_at((1 + len).min(rest.len()));
            self.journal.on_server_bytes(tag, message);
            self.journal.on_server_message(tag);
            rest = next;
        }
        self.pump.down.insert_ready(&held);
        self.held_answer = held;
        self.held_answer.clear();
    }

    /// Passes on the client's ReadyForQuery held back for a WAL position now known.
    fn release_held_ready(&mut self) {
        let Some(ready) = self.held_ready.take() else {
            return;
        };
        let at = self.pump.down.ready;
        self.pump.down.insert_ready(&ready);
        // Its owner, the client, was next in line until the WAL position query went first.
        self.wire.push_front(Owner::Client);
        self.on_ready_for_query(ready[READY_LEN - 1], at, READY_LEN);
    }

    fn on_ready_for_query(&mut self, status: u8, at: usize, n: usize) {
        self.xid_suffix = SuffixAnswer::default();
        self.as_batch = AsBatch::None;
        self.tail_done = false;
        if status == b'I' {
            self.params_before = None;
            self.doomed_commit = None;
            self.tally.flush();
        }
        if status == b'I' && self.txn_status != b'I' {
            self.shared.metrics.transactions.increment(1);
        }
        self.wire.pop_front();
        self.journal
            .on_server_bytes(backend::READY_FOR_QUERY, &self.pump.down.buf[at..at + n]);
        let committed_before = self.journal.last_committed_xid();
        // Requests the server skipped after a failed one (up to the Sync this answers) get no
        // ReadyForQuery of their own: no capture went among them, so they are the client's.
        let skipped = self.journal.on_ready_for_query(status);
        for _ in 0..skipped {
            self.wire.pop_front();
        }
        self.awaiting_ready = self.awaiting_ready.saturating_sub(skipped as u32);
        if self.journal.last_committed_xid() != committed_before {
            // A later commit whose xid is known: found on a new primary, it proves every WAL
            // position taken before it there too, and missing, it is reported itself.
            self.acked_lsn = None;
        }
        self.txn_status = status;
        self.awaiting_ready = self.awaiting_ready.saturating_sub(1);
        let info = self.guard.info();
        info.txn_status.store(status, Ordering::Relaxed);
        if self.awaiting_ready == 0 {
            info.active.store(false, Ordering::Relaxed);
            // A cancel that missed a request now answered is moot.
            info.missed_cancel.store(false, Ordering::Relaxed);
        }
        // DDL is read in the catalog once it is committed.
        if status == b'I' && self.journal.take_catalog_changed() {
            if let Some(feed) = &self.suspects {
                feed.catalog_changed();
            }
        }
        let unmovable = self.journal.unmovable();
        if unmovable != self.shown_unmovable {
            // `DISCARD ALL` clears it; the credential decides again then.
            self.guard.info().set_movable(match unmovable {
                Some(why) => crate::sessions::Movability::No(why.to_owned()),
                None => self.relogin.credential.movability(),
            });
            self.shown_unmovable = unmovable;
        }
        if status == b'I' {
            let listening = !self.journal.state().channels().is_empty();
            if listening != self.listening {
                self.listening = listening;
                self.guard
                    .set_listens_on(listening.then_some(&self.relogin.backend));
            }
        }
    }

    /// The client left with answers still owed (requests pipelined before its Terminate, or
    /// before the end of its stream, as a client that half-closes sends them): the server
    /// answers them, as it would a direct client, and they are passed on until the server
    /// closes, the client stops taking them, or shutdown is forced. Requests not yet synced
    /// in front of a Terminate count too: a Flush among them has the server send their
    /// answers before it ends.
    async fn pass_owed_answers(&mut self, terminated: bool, shutdown: &mut Shutdown) {
        if self.awaiting_ready == 0 && !(terminated && self.journal.has_open_batch()) {
            return;
        }
        if !terminated {
            // The server learns of the client's end as it would directly: its input ends.
            let _ = crate::clock::timeout(CLOSE_FLUSH_TIMEOUT, self.pump.backend.shutdown()).await;
        }
        let pass = async {
            loop {
                if self.scan_down().is_some() || self.pump.flush_client().await.is_err() {
                    return;
                }
                self.pump.down.buf.reserve(OWED_READ_CHUNK);
                match self.pump.backend.read_buf(&mut self.pump.down.buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            // The server's FATAL, if it ended the session with one, is its last word.
            if self.held_fatal.is_some() {
                let _ = self.release_fatal(std::io::ErrorKind::UnexpectedEof.into());
                let _ = self.pump.flush_client().await;
            }
        };
        tokio::select! {
            () = pass => {}
            () = shutdown.reached(Phase::Force) => {}
        }
    }

    /// Ends the session: pass on what is in flight, tell the client why if it must hear it,
    /// and close the backend at once (session mode: it lives and dies with its client).
    async fn close(mut self, end: End, shutdown: &mut Shutdown) -> Result<(), SessionError> {
        let _ = crate::clock::timeout(CLOSE_FLUSH_TIMEOUT, self.pump.flush_backend()).await;
        let result = match end {
            End::ClientDone { terminated } => {
                self.pass_owed_answers(terminated, shutdown).await;
                Ok(())
            }
            End::ClientBroke(e) => {
                // The backend runs what it was sent and ends, as the server would at the bad
                // message (an open transaction is rolled back); the client gets the answers
                // it is owed, then the error. (Not in the middle of a COPY FROM STDIN, which
                // would answer the Terminate as a message out of place.)
                let owed = self.awaiting_ready > 0 || self.journal.has_open_batch();
                if owed && !self.journal.copy_in_pending() {
                    // A Flush first: the server sends what it holds of requests not synced.
                    self.write_backend(&[frontend::FLUSH, 0, 0, 0, 4]).await;
                    self.terminate_backend().await;
                    self.pass_owed_answers(true, shutdown).await;
                }
                Err(e)
            }
            End::Failed(e) => Err(e),
        };
        if matches!(result, Err(SessionError::Shutdown)) && self.awaiting_ready > 0 {
            // A statement is still running: stop it, or it would commit after its client was
            // told the session is over.
            if let Some(key) = self.guard.cancel_key() {
                crate::cancel::forward(&self.shared.registry, key, CLOSE_FLUSH_TIMEOUT).await;
            }
        }
        if let Err(e) = &result {
            let _ = crate::clock::timeout(CLOSE_FLUSH_TIMEOUT, self.pump.flush_client()).await;
            // A client left in the middle of a message would read the FATAL as part of it.
            let report = e
                .client_report()
                .filter(|_| self.pump.down.scanner.at_boundary());
            if let Some((code, message)) = report {
                count_error(code, "gateway");
                let mut buf = BytesMut::new();
                encode::error_response(&mut buf, Severity::Fatal, code, &message);
                let _ = crate::clock::timeout(CLOSE_FLUSH_TIMEOUT, async {
                    self.pump.client.write_all(&buf).await?;
                    self.pump.client.flush().await
                })
                .await;
            }
            // A client that vanished ends its backend's input, as it would directly (the server
            // then reports its end, and during COPY would call a Terminate unexpected).
            if !matches!(
                e,
                SessionError::BackendLost(_)
                    | SessionError::ServerFatal { .. }
                    | SessionError::ClientGone(_)
            ) && self.pump.up.scanner.at_boundary()
            {
                self.terminate_backend().await;
            }
        }
        let _ = crate::clock::timeout(CLOSE_FLUSH_TIMEOUT, self.pump.client.shutdown()).await;
        if matches!(&result, Err(e) if !matches!(e, SessionError::ClientGone(_)))
            && self.client_mid_exchange()
        {
            self.linger(shutdown).await;
        }
        result
    }

    /// Sends the backend a Terminate of the gateway's own (best effort, bounded in time).
    async fn terminate_backend(&mut self) {
        self.write_backend(&[frontend::TERMINATE, 0, 0, 0, 4]).await;
    }

    /// Sends the backend a message of the gateway's own (best effort, bounded in time).
    async fn write_backend(&mut self, message: &[u8]) {
        let _ = crate::clock::timeout(CLOSE_FLUSH_TIMEOUT, async {
            self.pump.backend.write_all(message).await?;
            self.pump.backend.flush().await
        })
        .await;
    }

    /// Whether the client may still be sending: it waits for answers, has a batch not yet
    /// synced, or is in the middle of a message. (An idle one may not read for a long time,
    /// and nothing of it is unread.)
    fn client_mid_exchange(&self) -> bool {
        self.awaiting_ready > 0
            || self.journal.has_open_batch()
            || !self.pump.up.unscanned().is_empty()
            || !self.pump.up.scanner.at_boundary()
    }

    /// Reads and drops what the client still sends after the gateway ended its session, until
    /// it closes (or [`LINGER`] passes): closing a socket with unread bytes resets it, and a
    /// pipelining client whose write meets the reset may lose the FATAL it has not read yet.
    async fn linger(&mut self, shutdown: &mut Shutdown) {
        let mut sink = [0u8; OWED_READ_CHUNK];
        let drain = async {
            while let Ok(n) = self.pump.client.read(&mut sink).await {
                if n == 0 {
                    return;
                }
            }
        };
        tokio::select! {
            _ = crate::clock::timeout(LINGER, drain) => {}
            () = shutdown.reached(Phase::Force) => {}
        }
    }
}

/// The xid query `what` failed with `err`: the session does without the capture from now on.
/// Where it was for want of the privilege, the answer the gateway keeps for the session's
/// login is forgotten, so the next such login asks again (see [`crate::grants`]); not
/// recorded as a refusal, since the session may have changed its role.
fn capture_failed(
    capture_xid: &mut bool,
    shared: &Shared,
    session: &SessionInfo,
    relogin: &Relogin,
    err: &ErrorView,
    what: &str,
) {
    tracing::warn!(
        session = session.id,
        code = err.code,
        message = err.message,
        "the xid query {what} failed; this session does without it from now on"
    );
    *capture_xid = false;
    if err.code == "42501" {
        shared
            .capture_grants
            .forget(&session.database, &relogin.grants_key());
    }
}

/// Follows the answer to a Query that carries the xid query (see [`SuffixAnswer`]): what to do
/// with the message of type `tag` looked at, `holding` a CommandComplete or not.
fn on_xid_suffix(
    s: &mut SuffixAnswer,
    holding: bool,
    journal: &mut Journal,
    failed: &mut dyn FnMut(&ErrorView),
    tag: u8,
    body: &[u8],
) -> SuffixStep {
    let xid_row = || {
        tag == backend::ROW_DESCRIPTION && inspect::first_field_name(body) == Some("understudy_xid")
    };
    if holding {
        if s.state == XidSuffix::Answer
            && tag == backend::ERROR_RESPONSE
            && ErrorView::parse(body).is_fatal()
        {
            // The session ends before the commit: the last statement never completed.
            s.state = XidSuffix::Done;
            return SuffixStep::DropHeld;
        }
        if tag == backend::READY_FOR_QUERY {
            s.state = XidSuffix::Done;
            return SuffixStep::ReleaseFirst;
        }
        if s.state == XidSuffix::Completed && !xid_row() {
            // Another statement of the client's follows: the one held was not the last.
            s.state = XidSuffix::Statement;
            return SuffixStep::ReleaseFirst;
        }
    }
    match (s.state, tag) {
        (XidSuffix::Statement | XidSuffix::Completed, backend::COMMAND_COMPLETE) => {
            s.left = s.left.saturating_sub(1);
            s.state = XidSuffix::Completed;
            if s.holds {
                SuffixStep::Hold
            } else {
                SuffixStep::Pass
            }
        }
        (XidSuffix::Completed, backend::ROW_DESCRIPTION) if xid_row() => {
            s.state = XidSuffix::Answer;
            SuffixStep::Consume
        }
        (XidSuffix::Answer, backend::DATA_ROW) => {
            journal.set_xid(parse_xid_row(body));
            s.row_seen = true;
            SuffixStep::Consume
        }
        (XidSuffix::Answer, backend::COMMAND_COMPLETE) => {
            s.state = XidSuffix::Done;
            if holding {
                SuffixStep::ConsumeAndRelease
            } else {
                SuffixStep::Consume
            }
        }
        (XidSuffix::Answer, backend::ERROR_RESPONSE) if s.holds && s.row_seen => {
            // The commit failed (a deferred constraint, a serialization failure): its error
            // takes the last statement's CommandComplete's place, as it does directly.
            s.state = XidSuffix::Done;
            SuffixStep::DropHeld
        }
        (_, backend::ERROR_RESPONSE) => {
            // Once the client's statements all completed, the error is the xid query's: the
            // transaction is aborted, and the client must hear it with this error, after
            // what it did see. Before that, it is a statement's of the client's.
            if s.left == 0 {
                failed(&ErrorView::parse(body));
            }
            s.state = XidSuffix::Done;
            if holding {
                SuffixStep::ReleaseFirst
            } else {
                SuffixStep::Pass
            }
        }
        _ => SuffixStep::Pass,
    }
}

/// Whether `tag` completes one of the requests of the query that raises the gateway's error
/// in a client request's place (see `relocate::raise`).
fn is_raise_completion(tag: u8) -> bool {
    // ParseComplete, BindComplete, CloseComplete.
    matches!(tag, b'1' | b'2' | b'3')
}

/// Whether a server message of type `tag` belongs to the answer of [`XID_TAIL`] once it is being
/// answered: a completion of one of its requests, or its row.
fn is_tail_answer(tag: u8) -> bool {
    matches!(
        tag,
        b'1' | b'2' | b'3' | backend::DATA_ROW | backend::COMMAND_COMPLETE
    )
}

/// The first column of a DataRow as text (`None` for NULL).
fn first_text(body: &[u8]) -> Option<&str> {
    std::str::from_utf8(inspect::first_column(body)?).ok()
}

/// The xid in the gateway's xid query's DataRow (`None` for NULL: nothing was written).
fn parse_xid_row(body: &[u8]) -> Option<u64> {
    first_text(body)?.parse().ok()
}

/// A `pg_lsn` in its text form (`16/B374D848`) as a number.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// The ErrorResponse a client gets when its transaction could not be carried over.
fn diverged_error(buf: &mut BytesMut) {
    own_error(buf, "40001", relocate::DIVERGED);
}

/// Appends an ErrorResponse of the gateway's own and counts it.
fn own_error(buf: &mut BytesMut, code: &str, message: &str) {
    count_error(code, "gateway");
    encode::error_response(buf, Severity::Error, code, message);
}

fn client_frame_error(e: FrameError) -> SessionError {
    match e {
        FrameError::TooLong { .. } => {
            SessionError::refused("54000", "message_too_long", e.to_string())
        }
        FrameError::Malformed { .. } => {
            SessionError::refused("08P01", "protocol_violation", e.to_string())
        }
    }
}

/// Sets `name` to `value`, keeping the server's order of first report.
pub fn record_param(params: &mut Vec<(String, String)>, name: &str, value: &str) {
    match params.iter_mut().find(|(n, _)| n == name) {
        Some((_, v)) if v == value => {}
        Some((_, v)) => *v = value.to_owned(),
        None => params.push((name.to_owned(), value.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replication_is_asked_as_postgresql_parses_it() {
        for yes in ["true", "on", "yes", "1", "database", "TRUE", "Database"] {
            assert!(asks_replication(yes.as_bytes()), "{yes}");
        }
        for no in ["false", "off", "no", "0", "OFF"] {
            assert!(!asks_replication(no.as_bytes()), "{no}");
        }
    }

    /// The tags of the messages in `bytes`, each framed by its length.
    fn tags(mut bytes: &[u8]) -> String {
        let mut out = String::new();
        while let Some((&tag, rest)) = bytes.split_first() {
            let len = i32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            out.push(tag as char);
            bytes = &rest[len..];
        }
        out
    }

    #[test]
    fn internal_queries_are_one_extended_group() {
        for q in [&*XID_QUERY, &*LSN_QUERY] {
            assert_eq!(tags(q), "CCPBECCS");
        }
    }

    #[test]
    fn lsns_parse() {
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374_D848));
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("junk"), None);
    }

    #[test]
    fn xid_rows() {
        assert_eq!(parse_xid_row(b"\0\x01\0\0\0\x03742"), Some(742));
        assert_eq!(parse_xid_row(b"\0\x01\xff\xff\xff\xff"), None);
        assert_eq!(parse_xid_row(b"\0"), None);
    }
}
