//! The per-session journal: what the client asked since its transaction began, a digest of what
//! it was answered, and the session state a new backend must be given.
//!
//! Requests are grouped by the ReadyForQuery that answers them: a Query (with any COPY data that
//! follows it), an extended-protocol batch up to its Sync, or a FunctionCall. Responses arrive in
//! request order, so the oldest unanswered group owns every response byte.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt::Write;

use bytes::{Bytes, BytesMut};
use understudy_protocol::inspect::ErrorView;
use understudy_protocol::tags::{backend, frontend};
use xxhash_rust::xxh3::Xxh3;

use crate::classify::{
    classify_into, Classified, Hazard, SessionChange, Statement, Strings, Suspects,
};

/// A digest of response bytes: length and xxh3 of the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Digest {
    /// Bytes covered.
    pub len: u64,
    /// xxh3-64 of those bytes.
    pub hash: u64,
}

/// Streaming digest over the response bytes that count (see [`digested`]).
#[derive(Clone)]
pub struct DigestBuilder {
    hasher: Xxh3,
    len: u64,
}

impl Default for DigestBuilder {
    fn default() -> Self {
        Self {
            hasher: Xxh3::new(),
            len: 0,
        }
    }
}

impl std::fmt::Debug for DigestBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DigestBuilder")
            .field("len", &self.len)
            .finish()
    }
}

impl DigestBuilder {
    /// Adds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// Starts over, as if new.
    fn reset(&mut self) {
        self.hasher.reset();
        self.len = 0;
    }

    /// The digest so far.
    pub fn digest(&self) -> Digest {
        Digest {
            len: self.len,
            hash: self.hasher.digest(),
        }
    }
}

/// Whether a response message counts towards the digest, told by its type and its first
/// bytes (`message`, from the type byte on). ParameterStatus and notifications do not: they may
/// differ between servers. Nor do notices that are about the server or the connection rather
/// than the statement: echoes of the server log (severity LOG or DEBUG: a statement's text and
/// duration, the gateway's own queries') and SQLSTATE class 57 (a backend told to stop). Other
/// notices count: `relation … already exists, skipping`, a value a function raised, are what
/// the statement did, and the client saw them.
pub fn digested(tag: u8, message: &[u8]) -> bool {
    match tag {
        backend::PARAMETER_STATUS | backend::NOTIFICATION_RESPONSE => false,
        backend::NOTICE_RESPONSE => {
            let notice = ErrorView::parse(message.get(5..).unwrap_or_default());
            !(matches!(notice.severity, "LOG" | "DEBUG") || notice.code.starts_with("57"))
        }
        _ => true,
    }
}

/// One request group and what came back for it.
#[derive(Debug, Clone)]
pub struct Group {
    /// The exact request messages, as sent (none of them once `truncated`).
    pub request: BytesMut,
    /// Whether it grew past the journal's limit and is not kept: it can be neither replayed
    /// nor sent again.
    pub truncated: bool,
    /// Digest of the response, once answered (until then, see [`Journal::answer_so_far`]).
    pub answer: Digest,
    /// Whether a message that expects a ReadyForQuery (Query, Sync, FunctionCall) ended it.
    pub closed: bool,
    /// Whether that message was a Sync.
    synced: bool,
    /// Whether its ReadyForQuery arrived.
    pub answered: bool,
    /// Whether the server reported an error in it.
    pub failed: bool,
    /// Whether it may write, session-state changes included.
    pub may_write: bool,
    /// Whether it may write data, which a new backend would see (see
    /// [`crate::classify::Classified::may_write_data`]).
    pub may_write_data: bool,
    /// Whether it holds a COMMIT (or END).
    pub commits: bool,
    /// Whether it opens a transaction block (BEGIN).
    pub begins: bool,
    /// Whether it runs nothing but a COMMIT (a Query of it alone, or one Bind of a statement
    /// that is it alone; not `COMMIT AND CHAIN`), whose answer is known.
    pub sole_commit: bool,
    /// Whether a Bind came in it.
    bound: bool,
    /// Whether every message in it so far is a Flush, which opens no batch (libpq sends one
    /// after a pipeline's Sync).
    only_flushes: bool,
    /// Whether it holds a COPY … FROM STDIN, whose data follows the query.
    pub copies: bool,
    /// COPY data is expected and has not ended (CopyDone/CopyFail) yet; meanwhile the server
    /// discards Sync and Flush (docs 55.2.6).
    copy_in_pending: bool,
    /// The server answered its COPY with CopyInResponse: it takes the data now.
    copy_started: bool,
    /// A Sync came while its COPY data was expected but before the server said whether it
    /// takes it: discarded if it does, answered if the COPY failed first (see
    /// [`Journal::copy_sync_pending`]).
    copy_sync_pending: bool,
    /// Whether it runs statements (Query, Execute, FunctionCall), as opposed to housekeeping
    /// such as Close or Describe that a driver sends on its own.
    pub runs: bool,
    /// Session changes that apply when the group succeeds (and, for transactional ones, when
    /// the transaction commits).
    changes: Vec<PendingChange>,
    /// Names of the Parse messages in it, in order; `None` for the unnamed statement.
    parses: Vec<(Option<String>, Bytes)>,
    /// ParseComplete messages seen so far.
    parses_done: usize,
    /// Statements closed by it (`""`: the unnamed one).
    closes: Vec<String>,
    /// Whether it holds a simple Query, which ends the unnamed statement.
    pub queries: bool,
    /// What its statements were before it changed them (Parse, Close, PREPARE, DEALLOCATE),
    /// in the order it changed them.
    undo: Vec<Undo>,
    /// Whether every statement it binds runs the same in a transaction block as alone (see
    /// [`crate::classify::Classified::block_safe`]); for a Query, whether it is one INSERT,
    /// UPDATE, DELETE or MERGE with no `$` (see [`Before::QueryAsBatch`]).
    block_safe: bool,
    /// Its Parse, Bind, Close, Describe and Execute messages: each is answered by one
    /// completion message unless an error ends the group first.
    pub requests: u32,
    /// Completion messages of its answer so far (see [`completes_request`]).
    completions: u32,
    /// Whether the gateway's xid query follows its requests, before its Sync (see
    /// [`Before::CommitXidBeforeSync`]).
    pub tail: bool,
    /// Whether the gateway's xid query is in its Query's string (see
    /// [`Before::CaptureXidAfter`]).
    suffixed: bool,
}

/// Whether `sql` is one whole transaction block: BEGIN first, COMMIT last (its statement
/// starts at [`Classified::last_start`]), no BEGIN, COMMIT or ROLLBACK between, and the COMMIT
/// plain (no AND CHAIN, no comment), so that nothing put in front of it can shift the
/// position of a syntax error the server reports.
fn whole_block(classified: &Classified, sql: &[u8]) -> bool {
    let mut statements = classified
        .statements
        .iter()
        .filter(|s| **s != Statement::Empty);
    if statements.next() != Some(&Statement::Begin)
        || statements.next_back() != Some(&Statement::Commit)
        || statements.any(|s| {
            matches!(
                s,
                Statement::Begin | Statement::Commit | Statement::Rollback
            )
        })
    {
        return false;
    }
    let mut commit = sql[classified.last_start..].trim_ascii();
    while let Some(rest) = commit.strip_suffix(b";") {
        commit = rest.trim_ascii();
    }
    const PLAIN: [&[u8]; 6] = [
        b"COMMIT",
        b"COMMIT WORK",
        b"COMMIT TRANSACTION",
        b"END",
        b"END WORK",
        b"END TRANSACTION",
    ];
    PLAIN.iter().any(|p| commit.eq_ignore_ascii_case(p))
}

/// A prepared statement's slot as it was before a change: `None`, it did not exist.
#[derive(Debug, Clone)]
enum Undo {
    /// A protocol-level statement and its Parse message.
    Parsed(String, Option<Bytes>),
    /// An SQL-level statement and its PREPARE.
    Prepared(String, Option<String>),
    /// The unnamed protocol-level statement's Parse message.
    Unnamed(Option<Bytes>),
}

impl Group {
    fn new() -> Self {
        Self {
            request: BytesMut::new(),
            truncated: false,
            answer: Digest::default(),
            closed: false,
            synced: false,
            answered: false,
            failed: false,
            may_write: false,
            may_write_data: false,
            commits: false,
            begins: false,
            sole_commit: false,
            bound: false,
            only_flushes: true,
            copies: false,
            copy_in_pending: false,
            copy_started: false,
            copy_sync_pending: false,
            runs: false,
            changes: Vec::new(),
            parses: Vec::new(),
            parses_done: 0,
            closes: Vec::new(),
            queries: false,
            undo: Vec::new(),
            block_safe: true,
            requests: 0,
            completions: 0,
            tail: false,
            suffixed: false,
        }
    }

    /// Empties this group for reuse by the next request, keeping its buffers.
    fn recycle(&mut self) {
        self.request.clear();
        self.truncated = false;
        self.answer = Digest::default();
        self.closed = false;
        self.synced = false;
        self.answered = false;
        self.failed = false;
        self.may_write = false;
        self.may_write_data = false;
        self.commits = false;
        self.begins = false;
        self.sole_commit = false;
        self.bound = false;
        self.only_flushes = true;
        self.copies = false;
        self.copy_in_pending = false;
        self.copy_started = false;
        self.copy_sync_pending = false;
        self.runs = false;
        self.changes.clear();
        self.parses.clear();
        self.parses_done = 0;
        self.closes.clear();
        self.queries = false;
        self.undo.clear();
        self.block_safe = true;
        self.requests = 0;
        self.completions = 0;
        self.tail = false;
        self.suffixed = false;
    }
}

/// At most this many answered groups are kept for the next requests (a transaction's worth of
/// small ones)...
const SPARE_GROUPS: usize = 8;
/// ...holding at most this many request bytes together, so an idle session stays small (most
/// requests are far smaller; a bulk load's buffer is freed).
const SPARE_BYTES: usize = 4096;

#[derive(Debug, Clone)]
struct PendingChange {
    change: SessionChange,
    sql: String,
}

/// Session state a new backend must be given before it can stand in for the old one.
#[derive(Debug, Clone, Default)]
pub struct SessionState {
    /// Session-level SETs by variable, in first-set order; unnamed ones keep their own slot.
    sets: Vec<(Option<String>, String)>,
    /// SQL-level PREPAREs by name.
    sql_prepared: BTreeMap<String, String>,
    /// Protocol-level named statements: their Parse messages.
    parsed: BTreeMap<String, Bytes>,
    /// The unnamed statement's Parse message: it lasts until the next unnamed Parse, a Close
    /// of it or a simple Query (not through DEALLOCATE ALL, which drops only named ones).
    unnamed: Option<Bytes>,
    /// LISTEN channels.
    channels: BTreeSet<String>,
}

impl SessionState {
    /// SQL statements that recreate the state, in order.
    pub fn restore_sql(&self) -> Vec<String> {
        let mut out: Vec<String> = self.sets.iter().map(|(_, s)| s.clone()).collect();
        out.extend(self.sql_prepared.values().cloned());
        out.extend(
            self.channels
                .iter()
                .map(|c| format!("LISTEN \"{}\"", c.replace('"', "\"\""))),
        );
        out
    }

    /// Parse messages of the protocol-level statements, the unnamed one last (nothing the
    /// gateway sends ends it, but a simple Query would).
    pub fn restore_parses(&self) -> impl Iterator<Item = &Bytes> {
        self.parsed.values().chain(&self.unnamed)
    }

    /// Whether the session has a prepared statement `name` (protocol or SQL level).
    pub fn has_statement(&self, name: &str) -> bool {
        self.parsed.contains_key(name) || self.sql_prepared.contains_key(name)
    }

    /// Only the prepared statements not named in `present` (a backend's
    /// `pg_prepared_statements`, which never lists the unnamed statement).
    pub fn statements_missing_from(&self, present: &BTreeSet<String>) -> SessionState {
        SessionState {
            sql_prepared: not_in(&self.sql_prepared, present),
            parsed: not_in(&self.parsed, present),
            unnamed: self.unnamed.clone(),
            ..SessionState::default()
        }
    }

    /// The state as it was before `groups` ran: replaying them makes it what it is now (the
    /// statements they prepare must not exist yet, those they deallocate must).
    pub fn before(&self, groups: &VecDeque<Box<Group>>) -> SessionState {
        let mut state = self.clone();
        for undo in groups.iter().rev().flat_map(|g| g.undo.iter().rev()) {
            match undo {
                Undo::Parsed(name, was) => restore_slot(&mut state.parsed, name, was),
                Undo::Prepared(name, was) => restore_slot(&mut state.sql_prepared, name, was),
                Undo::Unnamed(was) => state.unnamed.clone_from(was),
            }
        }
        state
    }

    /// Applies what a group's `parses`, then its `closes`, then its simple Query if it
    /// `queries`, did, noting in `undo` what each replaced.
    fn parse_and_close(
        &mut self,
        parses: &[(Option<String>, Bytes)],
        closes: &[String],
        queries: bool,
        undo: &mut Vec<Undo>,
    ) {
        for (name, parse) in parses {
            match name {
                Some(name) => {
                    let was = self.parsed.insert(name.clone(), parse.clone());
                    undo.push(Undo::Parsed(name.clone(), was));
                }
                None => undo.push(Undo::Unnamed(self.unnamed.replace(parse.clone()))),
            }
        }
        for name in closes {
            self.close(name, undo);
        }
        if queries {
            self.close("", undo);
        }
    }

    /// Closes the protocol-level statement `name` (`""`: the unnamed one), noting in `undo`
    /// what it was.
    fn close(&mut self, name: &str, undo: &mut Vec<Undo>) {
        if name.is_empty() {
            if let Some(was) = self.unnamed.take() {
                undo.push(Undo::Unnamed(Some(was)));
            }
        } else if let Some(was) = self.parsed.remove(name) {
            undo.push(Undo::Parsed(name.to_owned(), Some(was)));
        }
    }

    /// LISTEN channels.
    pub fn channels(&self) -> &BTreeSet<String> {
        &self.channels
    }

    /// Applies `change` (made by `sql`), noting in `undo` what it did to prepared statements.
    fn apply(&mut self, change: &SessionChange, sql: &str, undo: &mut Vec<Undo>) {
        match change {
            SessionChange::Set(name) => match name {
                Some(n) => match self.sets.iter_mut().find(|(k, _)| k.as_deref() == Some(n)) {
                    Some(slot) => slot.1 = sql.to_owned(),
                    None => self.sets.push((Some(n.clone()), sql.to_owned())),
                },
                None => self.sets.push((None, sql.to_owned())),
            },
            SessionChange::Reset(Some(n)) => {
                self.sets.retain(|(k, _)| k.as_deref() != Some(n.as_str()));
                // A SET that could not be named might have set it: keep the RESET too.
                if self.sets.iter().any(|(k, _)| k.is_none()) {
                    self.sets.push((None, sql.to_owned()));
                }
            }
            SessionChange::Reset(None) => self.sets.clear(),
            SessionChange::Discard => {
                // DISCARD ALL resets everything; the narrower forms reset less, and dropping
                // more here only makes the restored session start closer to a fresh one.
                if discards_all(sql) {
                    *self = SessionState::default();
                }
            }
            SessionChange::Prepare(name) => {
                let was = self.sql_prepared.insert(name.clone(), sql.to_owned());
                undo.push(Undo::Prepared(name.clone(), was));
            }
            SessionChange::Deallocate(Some(name)) => {
                if let Some(was) = self.sql_prepared.remove(name) {
                    undo.push(Undo::Prepared(name.clone(), Some(was)));
                }
                self.close(name, undo);
            }
            SessionChange::Deallocate(None) => {
                for (name, was) in std::mem::take(&mut self.sql_prepared) {
                    undo.push(Undo::Prepared(name, Some(was)));
                }
                for (name, was) in std::mem::take(&mut self.parsed) {
                    undo.push(Undo::Parsed(name, Some(was)));
                }
            }
            SessionChange::Listen(c) => {
                self.channels.insert(c.clone());
            }
            SessionChange::Unlisten(Some(c)) => {
                self.channels.remove(c);
            }
            SessionChange::Unlisten(None) => self.channels.clear(),
        }
    }

    fn transactional(change: &SessionChange) -> bool {
        !matches!(
            change,
            SessionChange::Prepare(_) | SessionChange::Deallocate(_)
        )
    }
}

/// The entries of `map` whose names are not in `present`.
fn not_in<V: Clone>(map: &BTreeMap<String, V>, present: &BTreeSet<String>) -> BTreeMap<String, V> {
    map.iter()
        .filter(|(name, _)| !present.contains(*name))
        .map(|(name, v)| (name.clone(), v.clone()))
        .collect()
}

/// Puts `name`'s slot in `map` back to `was`.
fn restore_slot<V: Clone>(map: &mut BTreeMap<String, V>, name: &str, was: &Option<V>) {
    match was {
        Some(v) => {
            map.insert(name.to_owned(), v.clone());
        }
        None => {
            map.remove(name);
        }
    }
}

/// What running a prepared statement does, remembered from its Parse.
#[derive(Debug, Clone, Copy, Default)]
struct Effects {
    may_write: bool,
    may_write_data: bool,
    commits: bool,
    begins: bool,
    copies: bool,
    /// It changes session state (see `Journal::statement_changes`).
    changes: bool,
    /// It rolls back to a savepoint.
    rolls_back_to: bool,
    /// It is a COMMIT and nothing else.
    sole_commit: bool,
    /// It runs the same in a transaction block as alone (see
    /// [`crate::classify::Classified::block_safe`]).
    block_safe: bool,
    /// Why running it again could act twice outside the database, if so.
    unreplayable: Option<&'static str>,
}

/// Why the open transaction cannot be replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unreplayable {
    /// Its requests exceeded `max_replay_bytes`.
    TooLarge(usize),
    /// It did something with effects outside the database.
    Hazard(&'static str),
}

/// What the gateway must do around a client message it forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Before {
    /// Forward it.
    Forward,
    /// Capture the transaction's xid first: the message commits a transaction that wrote.
    CaptureXid,
    /// The message is a Query of one writing statement inside a transaction block whose xid is
    /// not known yet, or a Query that writes outside one: of one statement that runs the same
    /// in a block as alone (see [`crate::classify::Classified::block_safe`]; but a lone data
    /// change is sent as a batch), or of several, none of them transaction control. Ask for
    /// the xid in the same string, right after the statements (outside a block, should that
    /// not be done, capture the WAL position after it instead, as for
    /// [`Before::CaptureLsnAfter`]; a COPY's after its data).
    CaptureXidAfter,
    /// Capture the WAL position right after it: it ends an autocommit write (or a whole
    /// transaction in one string) whose xid is not captured, and a position at or past its
    /// commit is what tells later whether a failover lost it.
    CaptureLsnAfter,
    /// The message is a Query outside a transaction block that is one whole block that writes,
    /// `BEGIN; …; COMMIT`, its COMMIT plain and last: ask for the xid in the same string,
    /// right before the COMMIT (at [`Journal::commit_at`]), whose answer then comes after the
    /// commit as directly; failing that, capture the WAL position after it.
    CaptureXidBeforeCommit,
    /// The message is a Query of one INSERT, UPDATE, DELETE or MERGE outside a transaction
    /// block (no `$`, which a Parse would take for a parameter): it can be sent as the batch
    /// Parse, Bind, Describe, Execute with the xid query in front of its Sync, whose answer the
    /// gateway turns back into the Query's (see [`Before::CommitXidBeforeSync`]); failing that,
    /// capture the WAL position after it.
    QueryAsBatch,
    /// The message is a Sync ending a batch that writes outside a transaction block, of
    /// statements that run the same in one as alone, which the server commits at the Sync:
    /// ask for the xid in front of it, inside the
    /// batch's transaction (see [`Journal::note_tail`]); failing that, capture the WAL
    /// position after it.
    CommitXidBeforeSync,
}

/// Whether a server message of type `tag` completes one extended-protocol request: ParseComplete,
/// BindComplete, CloseComplete, RowDescription or NoData (a Describe's last message; a
/// statement's ParameterDescription comes before it), and CommandComplete, EmptyQueryResponse or
/// PortalSuspended (an Execute's).
pub fn completes_request(tag: u8) -> bool {
    matches!(tag, b'1' | b'2' | b'3' | b'T' | b'n' | b'C' | b'I' | b's')
}

/// The journal of one session.
#[derive(Debug)]
pub struct Journal {
    state: SessionState,
    /// Boxed, so that taking a spare and handing it back moves a pointer, not the group; a
    /// deque, so that clearing the oldest of a long pipeline's groups moves none of the rest.
    groups: VecDeque<Box<Group>>,
    /// How many of `groups` are answered: the first ones, as the server answers in order.
    answered: usize,
    /// Answered groups kept for the next requests, so a request costs no allocation.
    #[expect(clippy::vec_box, reason = "as `groups`")]
    spares: Vec<Box<Group>>,
    /// Digest of the answer so far of the oldest unanswered group (the one the server is
    /// answering: responses come in request order).
    live: DigestBuilder,
    /// Whether the server message being read counts towards the digest.
    digesting: bool,
    /// Names that make a statement a write (see [`Suspects`]).
    suspects: std::sync::Arc<Suspects>,
    /// Whether a statement seen since [`Journal::take_catalog_changed`] may have made a
    /// suspect ([`Classified::changes_catalog`]).
    catalog_changed: bool,
    /// The last classification, kept for its buffers.
    classified: Classified,
    journal_bytes: usize,
    max_bytes: usize,
    /// Transaction status of the last ReadyForQuery.
    txn_status: u8,
    /// Whether the open transaction may have written.
    txn_may_write: bool,
    /// Whether the open transaction may have written data (see [`Group::may_write_data`]).
    txn_may_write_data: bool,
    /// The open transaction's xid, once captured before its COMMIT.
    xid: Option<u64>,
    unreplayable: Option<Unreplayable>,
    unmovable: Option<&'static str>,
    /// Committed transactions' xid, the last one acknowledged to the client.
    last_committed_xid: Option<u64>,
    /// Changes waiting for the open transaction to commit.
    pending: Vec<PendingChange>,
    /// What each prepared statement (by its name's bytes; empty for the unnamed one) does when
    /// executed.
    statements: HashMap<Vec<u8>, Effects, foldhash::fast::RandomState>,
    /// The session-state changes (SET, LISTEN, PREPARE …) of the prepared statements that make
    /// them, by name as in `statements`: each execution applies them as a Query would.
    statement_changes: HashMap<Vec<u8>, Vec<PendingChange>, foldhash::fast::RandomState>,
    /// Whether the last client message will be answered with a ReadyForQuery.
    expects_ready: bool,
    /// The client encoding, when its multi-byte characters may contain ASCII bytes.
    multibyte: Option<MultiByte>,
    /// Whether the client encoding is UTF-8.
    utf8: bool,
    /// How string literals read (`standard_conforming_strings`).
    strings: Strings,
    /// Whether requests, answers and session state are kept for a move; a journal of a session
    /// that cannot move follows only message boundaries and COPY.
    keeps: bool,
    /// A Query or FunctionCall closed a group of extended-protocol requests, and no Sync has
    /// been sent since: should one of those requests fail, the server skips every message up
    /// to the Sync, Queries included, and answers them all with one ReadyForQuery.
    unsynced: bool,
    /// An error in such a group: the next ReadyForQuery is the Sync's.
    skipping: bool,
    /// A commit the gateway could not ask about (see [`Journal::commit_unchecked`]).
    unchecked: bool,
    /// See [`Journal::take_copy_sync_answered`].
    copy_sync_answered: bool,
}

impl Journal {
    /// An empty journal bounded to `max_bytes` of requests per transaction.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            state: SessionState::default(),
            groups: VecDeque::new(),
            answered: 0,
            spares: Vec::new(),
            live: DigestBuilder::default(),
            digesting: false,
            suspects: Default::default(),
            catalog_changed: false,
            classified: Classified::default(),
            journal_bytes: 0,
            max_bytes,
            txn_status: b'I',
            txn_may_write: false,
            txn_may_write_data: false,
            xid: None,
            unreplayable: None,
            unmovable: None,
            last_committed_xid: None,
            pending: Vec::new(),
            statements: HashMap::default(),
            statement_changes: HashMap::default(),
            expects_ready: false,
            multibyte: None,
            utf8: true,
            strings: Strings::Standard,
            keeps: true,
            unsynced: false,
            skipping: false,
            unchecked: false,
            copy_sync_answered: false,
        }
    }

    /// A journal for a session that cannot move: it keeps no requests, answers or session
    /// state, and reads SQL text only where it may hold a COPY (whose data and Syncs change
    /// which messages get a ReadyForQuery).
    pub fn boundaries_only() -> Self {
        Self {
            keeps: false,
            ..Self::new(0)
        }
    }

    /// The restorable session state.
    pub fn state(&self) -> &SessionState {
        &self.state
    }

    /// Request groups not yet cleared (open transaction and unanswered requests).
    pub fn groups(&self) -> &VecDeque<Box<Group>> {
        &self.groups
    }

    /// Status byte of the last ReadyForQuery.
    pub fn txn_status(&self) -> u8 {
        self.txn_status
    }

    /// Why the session cannot move, if so.
    pub fn unmovable(&self) -> Option<&'static str> {
        self.unmovable
    }

    /// Why the open transaction cannot be replayed, if so.
    pub fn unreplayable(&self) -> Option<&Unreplayable> {
        self.unreplayable.as_ref()
    }

    /// The open transaction's xid, if captured.
    pub fn xid(&self) -> Option<u64> {
        self.xid
    }

    /// The xid of the last commit the client saw succeed.
    pub fn last_committed_xid(&self) -> Option<u64> {
        self.last_committed_xid
    }

    /// Whether the last message passed to [`Journal::on_client_message`] will be answered with
    /// a ReadyForQuery (Query, FunctionCall, and a Sync the server does not discard).
    pub fn expects_ready(&self) -> bool {
        self.expects_ready
    }

    /// Whether the client is to send COPY data next: a COPY … FROM STDIN sent on, its data
    /// not ended.
    pub fn copy_in_pending(&self) -> bool {
        self.groups
            .back()
            .is_some_and(|g| g.copy_in_pending && !g.answered)
    }

    /// Whether the client has sent extended-protocol messages not yet closed by a Sync
    /// (Flushes alone are no batch).
    pub fn has_open_batch(&self) -> bool {
        self.groups
            .back()
            .is_some_and(|g| !g.closed && !g.only_flushes)
    }

    /// Whether the open transaction may have written (answered requests only).
    pub fn txn_may_write(&self) -> bool {
        self.txn_may_write
    }

    /// Whether the open transaction may have written data, not only changed session state
    /// (answered requests only).
    pub fn txn_may_write_data(&self) -> bool {
        self.txn_may_write_data
    }

    /// Whether the open transaction (or an unanswered autocommit request) may have written.
    pub fn may_have_written(&self) -> bool {
        self.txn_may_write || self.groups.iter().any(|g| g.may_write)
    }

    /// Records a whole client message; says whether the xid must be captured first.
    pub fn on_client_message(&mut self, tag: u8, raw: &[u8]) -> Before {
        let body = raw.get(5..).unwrap_or_default();
        // CopyData/CopyDone/CopyFail after a Query belong to that Query's group, and so do a
        // Sync or Flush sent while its COPY data is still expected (the server ignores them).
        let attach_to_last = self.groups.back().is_some_and(|g| {
            g.closed
                && !g.answered
                && (matches!(
                    tag,
                    frontend::COPY_DATA | frontend::COPY_DONE | frontend::COPY_FAIL
                ) || g.copy_in_pending && matches!(tag, frontend::SYNC | frontend::FLUSH))
        });
        if !attach_to_last && self.groups.back().is_none_or(|g| g.closed) {
            let group = self.spares.pop().unwrap_or_else(|| Box::new(Group::new()));
            self.groups.push_back(group);
        }
        let mut before = Before::Forward;
        let mut rolls_back_to = false;
        let Some(group) = self.groups.back_mut() else {
            return before;
        };
        // Nothing but Flushes before it (libpq sends one after a pipeline's Sync).
        let first = group.only_flushes;
        group.only_flushes &= tag == frontend::FLUSH;
        group.runs |= matches!(
            tag,
            frontend::QUERY | frontend::EXECUTE | frontend::FUNCTION_CALL
        );
        if matches!(
            tag,
            frontend::PARSE
                | frontend::BIND
                | frontend::CLOSE
                | frontend::DESCRIBE
                | frontend::EXECUTE
        ) {
            group.requests += 1;
        }
        match tag {
            frontend::QUERY | frontend::PARSE if !self.keeps => {
                let (name, rest) = match tag {
                    frontend::QUERY => (&b""[..], body),
                    _ => cstr(body),
                };
                let sql = cstr(rest).0;
                let copies = mentions_copy(sql) && {
                    classify_into(
                        &lexable(sql, self.multibyte),
                        self.strings,
                        &self.suspects,
                        &mut self.classified,
                    );
                    self.classified.copies
                };
                if tag == frontend::QUERY {
                    group.copies |= copies;
                    group.copy_in_pending |= copies;
                } else {
                    // What else the statement does matters only to a move.
                    let effects = Effects {
                        copies,
                        ..Effects::default()
                    };
                    set_effects(&mut self.statements, name, effects);
                }
            }
            frontend::QUERY => {
                group.queries = true;
                let sql = cstr(body).0;
                classify_into(
                    &lexable(sql, self.multibyte),
                    self.strings,
                    &self.suspects,
                    &mut self.classified,
                );
                let classified = &self.classified;
                self.catalog_changed |= classified.changes_catalog;
                let commits = classified.statements.contains(&Statement::Commit);
                group.may_write |= classified.may_write();
                group.may_write_data |= classified.may_write_data();
                group.commits |= commits;
                group.begins |= classified.statements.contains(&Statement::Begin);
                group.copies |= classified.copies;
                group.copy_in_pending |= classified.copies;
                group.sole_commit =
                    first && classified.statements == [Statement::Commit] && !classified.chains;
                // The xid is assigned at a transaction's first write, so asking just before the
                // string that commits gives it whenever an earlier request wrote; a single
                // writing statement inside the block can carry the question itself, for free.
                // A transaction that only changed session state needs none: after a failover
                // it is replayed whatever became of it.
                if commits
                    && self.txn_status == b'T'
                    && self.xid.is_none()
                    && (self.txn_may_write_data || group.may_write_data)
                {
                    before = Before::CaptureXid;
                } else if self.txn_status == b'T'
                    && self.xid.is_none()
                    && first
                    && classified.statements == [Statement::Write]
                    && !classified.copies
                    && !classified.ends_open
                {
                    before = Before::CaptureXidAfter;
                } else if self.txn_status == b'I'
                    && first
                    && (classified.block_safe
                        || classified.statement_count() > 1 && !classified.controls_transaction)
                    && classified.may_write_data()
                    && (classified.statement_count() > 1
                        || !classified.changes_only
                        || sql.contains(&b'$'))
                    && sql.len() + 1 == body.len()
                    && !classified.ends_open
                {
                    // Outside a block, statements of one string run in one transaction,
                    // committed after the last: one more statement asks for its xid before that
                    // commit, which no other session's WAL can confuse as a WAL position can.
                    // Two or more already run in an implicit block, so one more changes
                    // nothing for them (unless one ends it); a lone
                    // statement must be one that runs the same in a block as alone: not
                    // VACUUM, CALL (whose procedure may commit) or CREATE INDEX CONCURRENTLY.
                    // (A lone data change with no `$` is sent as a batch instead, see
                    // `Before::QueryAsBatch`.)
                    before = Before::CaptureXidAfter;
                } else if self.txn_status == b'I'
                    && first
                    && classified.may_write_data()
                    && classified.hazards.is_empty()
                    && !classified.copies
                    && sql.len() + 1 == body.len()
                    && !classified.ends_open
                    && whole_block(classified, sql)
                {
                    before = Before::CaptureXidBeforeCommit;
                }
                // (A text without its NUL, or with one inside, is the server's to refuse as
                // it was sent.)
                group.block_safe &= first
                    && classified.changes_only
                    && classified.statements.len() == 1
                    && !sql.contains(&b'$')
                    && sql.len() + 1 == body.len();
                record_hazards(
                    &classified.hazards,
                    &mut self.unmovable,
                    &mut self.unreplayable,
                );
                for change in pending_changes(classified, sql, self.utf8, &mut self.unmovable) {
                    group.changes.push(change);
                }
                rolls_back_to |= classified.rolls_back_to;
            }
            frontend::PARSE => {
                let (raw_name, rest) = cstr(body);
                let name = name_key(raw_name);
                classify_into(
                    &lexable(cstr(rest).0, self.multibyte),
                    self.strings,
                    &self.suspects,
                    &mut self.classified,
                );
                let classified = &self.classified;
                self.catalog_changed |= classified.changes_catalog;
                // Parsing runs nothing; what the statement does counts when it is executed.
                let changes =
                    pending_changes(classified, cstr(rest).0, self.utf8, &mut self.unmovable);
                let effects = Effects {
                    may_write: classified.may_write(),
                    may_write_data: classified.may_write_data(),
                    commits: classified.statements.contains(&Statement::Commit),
                    begins: classified.statements.contains(&Statement::Begin),
                    copies: classified.copies,
                    changes: !changes.is_empty(),
                    rolls_back_to: classified.rolls_back_to,
                    sole_commit: classified.statements == [Statement::Commit] && !classified.chains,
                    block_safe: classified.block_safe,
                    unreplayable: classified.hazards.iter().find_map(|h| match h {
                        Hazard::Unreplayable(why) => Some(*why),
                        Hazard::Unmovable(_) => None,
                    }),
                };
                if effects.changes {
                    self.statement_changes.insert(raw_name.to_vec(), changes);
                } else if !self.statement_changes.is_empty() {
                    self.statement_changes.remove(raw_name);
                }
                if effects.commits
                    && first
                    && self.txn_status == b'T'
                    && self.txn_may_write_data
                    && self.xid.is_none()
                {
                    before = Before::CaptureXid;
                }
                record_hazards(
                    &classified.hazards,
                    &mut self.unmovable,
                    &mut self.unreplayable,
                );
                set_effects(&mut self.statements, raw_name, effects);
                let name = (!name.is_empty()).then(|| name.into_owned());
                group.parses.push((name, Bytes::copy_from_slice(raw)));
            }
            frontend::BIND => {
                let statement = cstr(cstr(body).1).0;
                // A statement the journal never saw parsed may do anything.
                let effects = self.statements.get(statement).copied().unwrap_or(Effects {
                    may_write: true,
                    may_write_data: true,
                    ..Effects::default()
                });
                group.may_write |= effects.may_write;
                group.may_write_data |= effects.may_write_data;
                group.commits |= effects.commits;
                group.begins |= effects.begins;
                group.copies |= effects.copies;
                group.copy_in_pending |= effects.copies;
                group.block_safe &= effects.block_safe;
                // Parsed in an earlier transaction, whose hazards are forgotten: each run of
                // it counts.
                if let Some(why) = effects.unreplayable {
                    self.unreplayable.get_or_insert(Unreplayable::Hazard(why));
                }
                group.sole_commit = !group.runs && !group.bound && effects.sole_commit;
                group.bound = true;
                if effects.changes {
                    for change in self.statement_changes.get(statement).into_iter().flatten() {
                        group.changes.push(change.clone());
                    }
                }
                rolls_back_to |= effects.rolls_back_to;
                if effects.commits
                    && first
                    && self.txn_status == b'T'
                    && self.txn_may_write_data
                    && self.xid.is_none()
                {
                    before = Before::CaptureXid;
                }
            }
            frontend::CLOSE if self.keeps && body.first() == Some(&b'S') => {
                group.closes.push(name_key(cstr(&body[1..]).0).into_owned());
            }
            frontend::FUNCTION_CALL => {
                group.may_write = true;
                group.may_write_data = true;
            }
            _ => {}
        }
        if self.keeps && !group.truncated {
            if self.journal_bytes + raw.len() > self.max_bytes {
                // Neither replayed nor sent again past the limit: none of it is kept (a bulk
                // load would otherwise be held whole).
                self.journal_bytes -= group.request.len();
                group.request = BytesMut::new();
                group.truncated = true;
                if self.unreplayable.is_none() {
                    self.unreplayable = Some(Unreplayable::TooLarge(self.max_bytes));
                }
            } else {
                group.request.extend_from_slice(raw);
                self.journal_bytes += raw.len();
            }
        }
        let copy_end = matches!(tag, frontend::COPY_DONE | frontend::COPY_FAIL);
        // A Sync sent while COPY data is still expected is discarded by the server.
        let closes = frontend::expects_ready_for_query(tag)
            && !(tag == frontend::SYNC && group.copy_in_pending);
        if tag == frontend::SYNC && group.copy_in_pending && !group.copy_started {
            group.copy_sync_pending = true;
        }
        if copy_end {
            group.copy_in_pending = false;
        }
        if closes {
            group.closed = true;
            group.synced = tag == frontend::SYNC;
        }
        self.expects_ready = closes;
        let opens_skippable = closes && tag != frontend::SYNC && group.requests > 0;
        // After the message that ends an autocommit write: for a simple-query COPY that is the
        // end of its data (a query slipped in earlier would land inside the COPY).
        let ends_write = (closes && !group.copy_in_pending) || (copy_end && group.closed);
        // Outside a transaction block, unless this very request opens one it leaves open.
        let autocommit = self.txn_status == b'I' && (!group.begins || group.commits);
        // Session-state changes commit nothing the new primary could lack.
        // (A group that already failed, its COPY refused before the data, committed nothing.)
        if ends_write
            && autocommit
            && group.may_write_data
            && before == Before::Forward
            && !group.suffixed
            && !group.failed
        {
            // A batch runs in one transaction up to its Sync, so a query slipped in before the
            // Sync is in it (one with COMMIT, BEGIN or anything that commits on its own, as
            // VACUUM, may end that transaction earlier, or refuse to run in it).
            // (A COPY's Sync is the one after its data: one sent before is discarded.)
            let block_safe = group.block_safe && !group.commits && !group.begins;
            before = if tag == frontend::SYNC && block_safe && !group.queries {
                Before::CommitXidBeforeSync
            } else if tag == frontend::QUERY && block_safe && !group.copies {
                Before::QueryAsBatch
            } else {
                Before::CaptureLsnAfter
            };
        }
        if before == Before::QueryAsBatch && self.begun_ahead() {
            // A BEGIN pipelined ahead of it, not answered yet, puts it in a block after all:
            // there, as a batch, it would fail otherwise (an error names the Parse).
            before = Before::CaptureLsnAfter;
        }
        if self.unsynced || opens_skippable {
            // The server may be skipping to the Sync: a query of the gateway's would go
            // unanswered (a Query) or end the skipping early (a Sync of its own). What was to
            // be captured is captured after the Sync instead.
            if tag == frontend::SYNC && closes {
                before = if self.unchecked || before != Before::Forward {
                    self.unchecked = true;
                    Before::CaptureLsnAfter
                } else {
                    Before::Forward
                };
            } else if before != Before::Forward {
                // (A write in a block asks for the xid again before the COMMIT; a Query
                // outside one commits unchecked.)
                self.unchecked |= before != Before::CaptureXidAfter || self.txn_status == b'I';
                before = Before::Forward;
            }
        }
        if closes {
            self.unsynced = tag != frontend::SYNC && (self.unsynced || opens_skippable);
        }
        if rolls_back_to {
            self.note_rollback_to();
        }
        before
    }

    /// Whether a group before the newest one, not answered yet, opens a transaction block.
    fn begun_ahead(&self) -> bool {
        self.groups
            .range(self.answered..self.groups.len().saturating_sub(1))
            .any(|g| g.begins)
    }

    /// Whether a commit the client was told of since the last one checked (by xid or WAL
    /// position) could not be asked about: it went inside an extended-protocol batch that a
    /// Query or FunctionCall closed before its Sync, where no query of the gateway's can go.
    /// A failover then cannot tell whether the new primary has it.
    pub fn commit_unchecked(&self) -> bool {
        self.unchecked
    }

    /// How many statements the server runs for the Query last given to
    /// [`Journal::on_client_message`] (see [`Classified::statement_count`]).
    pub fn last_statement_count(&self) -> usize {
        self.classified.statement_count()
    }

    /// Where the COMMIT of the Query last given to [`Journal::on_client_message`] starts in
    /// its text, right after the semicolon before it (see
    /// [`Before::CaptureXidBeforeCommit`]).
    pub fn commit_at(&self) -> usize {
        self.classified.last_start
    }

    /// A WAL position taken after every commit so far is known.
    pub fn position_captured(&mut self) {
        self.unchecked = false;
    }

    /// The group that owns the next response bytes.
    fn answering(&mut self) -> Option<&mut Group> {
        self.groups.get_mut(self.answered).map(|g| &mut **g)
    }

    /// A ROLLBACK TO SAVEPOINT undoes the settings made since that savepoint, which the journal
    /// does not tell apart from those made before it: with any made in the transaction, the
    /// session state is no longer known and the session cannot move.
    fn note_rollback_to(&mut self) {
        let unanswered = self.groups.range(self.answered..);
        let settings = !self.pending.is_empty()
            || unanswered
                .flat_map(|g| &g.changes)
                .any(|c| SessionState::transactional(&c.change));
        if settings {
            self.unmovable = self.unmovable.or(Some(
                "a setting made in a transaction rolled back to a savepoint",
            ));
        }
    }

    /// Notes a parameter the server reports (at login and on change): the client encoding and
    /// `standard_conforming_strings` decide how later SQL text is read.
    pub fn on_parameter_status(&mut self, name: &str, value: &str) {
        match name {
            "client_encoding" => {
                self.multibyte = MultiByte::from_name(value);
                self.utf8 = value.eq_ignore_ascii_case("UTF8");
            }
            "standard_conforming_strings" => {
                self.strings = if value.eq_ignore_ascii_case("off") {
                    Strings::BackslashEscapes
                } else {
                    Strings::Standard
                }
            }
            _ => {}
        }
    }

    /// Digest of what the client has received so far of the oldest unanswered group's answer.
    pub fn answer_so_far(&self) -> Digest {
        self.live.digest()
    }

    /// Whether the request group now being answered holds a COMMIT.
    pub fn answering_commit(&self) -> bool {
        self.groups.get(self.answered).is_some_and(|g| g.commits)
    }

    /// Whether the request group being answered has had an ErrorResponse.
    pub fn answering_failed(&self) -> bool {
        self.groups.get(self.answered).is_some_and(|g| g.failed)
    }

    /// Adds a response message of type `tag` (all of it, or its first part, from the type byte
    /// on) to the digest, if it counts (see [`digested`]).
    pub fn on_server_bytes(&mut self, tag: u8, bytes: &[u8]) {
        self.begin_server_message(tag, bytes);
        self.on_server_body(bytes);
    }

    /// Notes whether the response message of type `tag` that begins with `first` (from the
    /// type byte on) counts towards the digest, before any of it is added.
    pub fn begin_server_message(&mut self, tag: u8, first: &[u8]) {
        self.digesting = self.keeps && digested(tag, first);
    }

    /// Adds more bytes of the message [`Journal::on_server_bytes`] began.
    pub fn on_server_body(&mut self, bytes: &[u8]) {
        if self.digesting && self.answered < self.groups.len() {
            self.live.update(bytes);
        }
    }

    /// Notes a whole server message that changes what the journal knows.
    pub fn on_server_message(&mut self, tag: u8) {
        let Some(g) = self.answering() else {
            return;
        };
        if completes_request(tag) {
            g.completions += 1;
        }
        match tag {
            backend::COPY_IN_RESPONSE => {
                g.copy_started = true;
                g.copy_sync_pending = false;
            }
            backend::ERROR_RESPONSE if g.copy_sync_pending => {
                // The COPY failed before taking data: the Sync sent behind it is no COPY's to
                // discard, and ends the group; the server answers it.
                g.failed = true;
                g.copy_sync_pending = false;
                g.copy_in_pending = false;
                g.closed = true;
                g.synced = true;
                self.copy_sync_answered = true;
            }
            backend::ERROR_RESPONSE => {
                g.failed = true;
                // An extended-protocol request failed (not the Query or FunctionCall after them,
                // answered only once they all are): the server skips to the next Sync.
                if !g.synced && g.completions < g.requests {
                    self.skipping = true;
                }
            }
            b'1' => g.parses_done += 1,
            _ => {}
        }
    }

    /// Whether a Sync the client sent behind a COPY waits for the server to say whether it
    /// takes the COPY's data (then it discards the Sync) or failed first (then it answers the
    /// Sync): until then the gateway sends nothing more, so that the requests after it are
    /// known to be in that Sync's batch or after it.
    pub fn copy_sync_pending(&self) -> bool {
        self.groups
            .back()
            .is_some_and(|g| g.copy_sync_pending && !g.answered)
    }

    /// Takes every such Sync to be discarded, as it is once the COPY runs (after a move,
    /// whose new backend answers the requests sent again itself).
    pub fn forget_copy_sync(&mut self) {
        for g in &mut self.groups {
            g.copy_sync_pending = false;
        }
        self.copy_sync_answered = false;
    }

    /// Whether such a Sync turned out to be answered (the COPY failed before its data) since
    /// last asked: a ReadyForQuery more is owed to the client.
    pub fn take_copy_sync_answered(&mut self) -> bool {
        std::mem::take(&mut self.copy_sync_answered)
    }

    /// Records that the gateway's xid query went in front of the Sync just passed (see
    /// [`Before::CommitXidBeforeSync`]).
    pub fn note_tail(&mut self) {
        if let Some(g) = self.groups.back_mut() {
            g.tail = true;
        }
    }

    /// Records that the gateway's xid query went into the string of the Query just passed
    /// (see [`Before::CaptureXidAfter`]): a COPY in it is then checked by that xid, not by the
    /// WAL position after its data.
    pub fn note_suffix(&mut self) {
        if let Some(g) = self.groups.back_mut() {
            g.suffixed = true;
        }
    }

    /// Whether the answer being read is the gateway's xid query's, in front of the client's
    /// ReadyForQuery: the group's requests are all answered, without an error.
    pub fn answering_tail(&self) -> bool {
        self.groups
            .get(self.answered)
            .is_some_and(|g| g.tail && !g.failed && g.completions == g.requests)
    }

    /// A ReadyForQuery ends the oldest unanswered group; returning to idle ends the transaction.
    /// Returns how many more groups it ended: the server skipped those after a failed
    /// extended-protocol request, up to the Sync this answers.
    pub fn on_ready_for_query(&mut self, status: u8) -> usize {
        let skipped = if std::mem::take(&mut self.skipping) {
            self.drop_skipped()
        } else {
            0
        };
        // Nothing is pipelined behind the group answered: a hazard recorded for a request sent
        // after it would otherwise be forgotten with the ones it ended.
        let last = self.answered + 1 == self.groups.len();
        if let Some(g) = self.groups.get_mut(self.answered) {
            self.answered += 1;
            g.answered = true;
            if self.keeps {
                g.answer = self.live.digest();
                self.live.reset();
            }
            // Protocol-level statements are not transactional: they exist once parsed. A simple
            // Query ends the unnamed statement as it starts, whatever becomes of it.
            let closes: &[String] = if g.failed { &[] } else { &g.closes };
            self.state.parse_and_close(
                &g.parses[..g.parses_done.min(g.parses.len())],
                closes,
                g.queries,
                &mut g.undo,
            );
            let (may_write, may_write_data, failed) = (g.may_write, g.may_write_data, g.failed);
            let changes = std::mem::take(&mut g.changes);
            if !failed {
                for c in changes {
                    if last && is_discard_all(&c) {
                        // It drops temporary tables, releases advisory locks, closes cursors
                        // and resets every setting: nothing that kept the session in place
                        // is left, and its state is known again (none).
                        self.unmovable = None;
                    }
                    if SessionState::transactional(&c.change) && status != b'I' {
                        self.pending.push(c);
                    } else {
                        self.state.apply(&c.change, &c.sql, &mut g.undo);
                    }
                }
            }
            self.txn_may_write |= may_write && status != b'I';
            self.txn_may_write_data |= may_write_data && status != b'I';
        }
        let was_in_txn = self.txn_status != b'I';
        // A COMMIT of a failed transaction is answered ROLLBACK, without an error.
        let was_failed = self.txn_status == b'E';
        self.txn_status = status;
        if status == b'I' {
            let committed = was_in_txn
                && !was_failed
                && self
                    .answered
                    .checked_sub(1)
                    .is_some_and(|i| self.groups[i].commits && !self.groups[i].failed);
            if committed {
                // Transactional changes: none touches a prepared statement.
                let mut undo = Vec::new();
                for c in std::mem::take(&mut self.pending) {
                    self.state.apply(&c.change, &c.sql, &mut undo);
                }
                if self.xid.is_some() {
                    // Found on a new primary, it proves every commit before it there too.
                    self.last_committed_xid = self.xid;
                    self.unchecked = false;
                }
            } else if !was_in_txn
                && self.xid.is_some()
                && self
                    .answered
                    .checked_sub(1)
                    .is_some_and(|i| !self.groups[i].failed)
            {
                // An autocommit write whose xid was asked for in its own transaction.
                self.last_committed_xid = self.xid;
                self.unchecked = false;
            }
            self.pending.clear();
            self.clear_answered();
        }
        skipped
    }

    /// Removes the groups after the one being answered up to the first that a Sync closed
    /// (none if that is the one being answered): the server skipped them. Returns how many.
    fn drop_skipped(&mut self) -> usize {
        let Some(sync) = (self.answered..self.groups.len()).find(|&i| self.groups[i].synced) else {
            return 0;
        };
        let mut dropped = 0;
        for g in self.groups.drain(self.answered + 1..=sync) {
            self.journal_bytes -= g.request.len();
            dropped += 1;
        }
        dropped
    }

    /// Forgets the open transaction and every unanswered request (the session continues
    /// without them: they were answered with an error, or the transaction is gone).
    pub fn abandon(&mut self) {
        self.groups.clear();
        self.answered = 0;
        self.live.reset();
        self.pending.clear();
        self.journal_bytes = 0;
        self.txn_may_write = false;
        self.txn_may_write_data = false;
        self.xid = None;
        self.unreplayable = None;
        self.txn_status = b'I';
        self.copy_sync_answered = false;
    }

    /// The in-flight COMMIT turned out to have committed: the transaction is over and its xid
    /// is the last one the client saw commit. Returns the SQL of the session changes the
    /// transaction made (SET, LISTEN …), in order: a backend that did not run it lacks them.
    pub fn settle_commit(&mut self) -> Vec<String> {
        if self.xid.is_some() {
            self.last_committed_xid = self.xid;
        }
        // The client is told that the Parses and Closes sent with the COMMIT were done; the
        // transaction is over, so what they replaced is of no more use.
        let mut undo = Vec::new();
        if let Some(g) = self.groups.get(self.answered) {
            self.state
                .parse_and_close(&g.parses, &g.closes, g.queries, &mut undo);
        }
        let mut committed = Vec::with_capacity(self.pending.len());
        for c in std::mem::take(&mut self.pending) {
            self.state.apply(&c.change, &c.sql, &mut undo);
            committed.push(c.sql);
        }
        self.abandon();
        committed
    }

    /// Classifies statements from now on knowing `suspects`, the session's database's; a
    /// statement prepared before that names one of them writes from now on too, and so do the
    /// requests kept (see [`Journal::judge_kept_again`]).
    pub fn set_suspects(&mut self, suspects: std::sync::Arc<Suspects>) {
        self.suspects = suspects;
        if self.suspects.is_empty() {
            return;
        }
        let open = self
            .groups
            .iter()
            .flat_map(|g| g.parses.iter().map(|(_, raw)| raw));
        for raw in self
            .state
            .parsed
            .values()
            .chain(&self.state.unnamed)
            .chain(open)
        {
            let (name, rest) = cstr(raw.get(5..).unwrap_or_default());
            let Some(effects) = self.statements.get_mut(name) else {
                continue;
            };
            if effects.may_write_data {
                continue;
            }
            classify_into(
                &lexable(cstr(rest).0, self.multibyte),
                self.strings,
                &self.suspects,
                &mut self.classified,
            );
            if self.classified.may_write_data() {
                effects.may_write = true;
                effects.may_write_data = true;
            }
        }
        self.judge_kept_again();
    }

    /// Whether a request kept (in flight, or answered in the open transaction) runs statements
    /// judged not to write data, which suspects learned later may show to write (see
    /// [`Journal::set_suspects`]).
    pub fn holds_reads(&self) -> bool {
        self.groups
            .iter()
            .any(|g| g.runs && !g.may_write_data && !g.truncated)
    }

    /// Judges the requests kept (in flight, or answered in the open transaction) again with
    /// the suspects known now, their statements judged again first: one that reads a relation
    /// or calls a function now known to write may write data, and so does the open
    /// transaction it was answered in. A move's decisions about what was in flight rest on
    /// these, and a COMMIT of such a transaction captures its xid. Requests and the
    /// transaction only ever gain writes.
    fn judge_kept_again(&mut self) {
        let in_txn = self.txn_status != b'I';
        for g in &mut self.groups {
            if g.may_write_data || g.truncated {
                continue;
            }
            let mut writes = false;
            for (tag, body) in understudy_protocol::frame::messages(&g.request) {
                writes |= match tag {
                    frontend::QUERY => {
                        classify_into(
                            &lexable(cstr(body).0, self.multibyte),
                            self.strings,
                            &self.suspects,
                            &mut self.classified,
                        );
                        self.classified.may_write_data()
                    }
                    // Its statement was judged again before.
                    frontend::BIND => self
                        .statements
                        .get(cstr(cstr(body).1).0)
                        .is_none_or(|e| e.may_write_data),
                    _ => false,
                };
            }
            if writes {
                g.may_write = true;
                g.may_write_data = true;
                if g.answered && in_txn {
                    self.txn_may_write = true;
                    self.txn_may_write_data = true;
                }
            }
        }
    }

    /// Whether a statement seen since the last call may have made a view, policy or function
    /// that writes (a CREATE, ALTER or DO); the flag is cleared.
    pub fn take_catalog_changed(&mut self) -> bool {
        std::mem::take(&mut self.catalog_changed)
    }

    /// Records the open transaction's xid as captured (`None`: none assigned yet).
    pub fn set_xid(&mut self, xid: Option<u64>) {
        self.xid = xid;
    }

    /// Drops the answered groups once the transaction is over.
    fn clear_answered(&mut self) {
        let answered = std::mem::take(&mut self.answered);
        let mut kept: usize = self.spares.iter().map(|g| g.request.capacity()).sum();
        for mut g in self.groups.drain(..answered) {
            self.journal_bytes -= g.request.len();
            if self.spares.len() < SPARE_GROUPS && kept + g.request.capacity() <= SPARE_BYTES {
                kept += g.request.capacity();
                g.recycle();
                self.spares.push(g);
            }
        }
        self.txn_may_write = false;
        self.txn_may_write_data = false;
        self.xid = None;
        if self.groups.is_empty() {
            self.unreplayable = None;
        }
    }
}

/// The session-state changes among `classified`'s statements, with the text that restores
/// each; text that would not restore what the client sent makes the session unmovable.
fn pending_changes(
    classified: &Classified,
    sql: &[u8],
    utf8: bool,
    unmovable: &mut Option<&'static str>,
) -> Vec<PendingChange> {
    let sessions = classified.statements.iter().filter_map(|s| match s {
        Statement::Session(change) => Some(change),
        _ => None,
    });
    sessions
        .zip(&classified.session_spans)
        .map(|(change, span)| {
            let text = String::from_utf8_lossy(&sql[span.clone()]);
            if matches!(text, Cow::Owned(_)) || !utf8 && !text.is_ascii() {
                // The text to restore it would not be the text the client sent, or would be
                // read in whatever encoding the restore runs under.
                *unmovable = unmovable.or(Some(NOT_UTF8));
            }
            PendingChange {
                change: change.clone(),
                sql: text.trim().to_owned(),
            }
        })
        .collect()
}

/// Records what the statement `name` does; a name seen before keeps its key (no allocation for
/// the unnamed statement parsed again and again).
fn set_effects(
    statements: &mut HashMap<Vec<u8>, Effects, foldhash::fast::RandomState>,
    name: &[u8],
    effects: Effects,
) {
    match statements.get_mut(name) {
        Some(known) => *known = effects,
        None => {
            statements.insert(name.to_vec(), effects);
        }
    }
}

/// Whether `c` is `DISCARD ALL`.
fn is_discard_all(c: &PendingChange) -> bool {
    matches!(c.change, SessionChange::Discard) && discards_all(&c.sql)
}

/// Whether the text of a DISCARD statement is `DISCARD ALL` rather than a narrower form.
fn discards_all(sql: &str) -> bool {
    sql.to_ascii_uppercase().contains("ALL")
}

/// Keeps the first reason a session cannot move and the first reason its transaction cannot be
/// replayed.
fn record_hazards(
    hazards: &[Hazard],
    unmovable: &mut Option<&'static str>,
    unreplayable: &mut Option<Unreplayable>,
) {
    for hazard in hazards {
        match hazard {
            Hazard::Unmovable(why) => *unmovable = unmovable.or(Some(why)),
            Hazard::Unreplayable(why) => {
                unreplayable.get_or_insert(Unreplayable::Hazard(why));
            }
        }
    }
}

/// The NUL-terminated string at the start of `b`, and what follows its NUL.
fn cstr(b: &[u8]) -> (&[u8], &[u8]) {
    let end = memchr::memchr(0, b).unwrap_or(b.len());
    (&b[..end], b.get(end + 1..).unwrap_or_default())
}

/// Whether `sql` has the letters `copy` in a row, in any case: no COPY statement is without
/// them (in SJIS-like encodings a character's second byte may add a false alarm, never hide one).
/// Found by their `y`, the rarest of the four in SQL.
fn mentions_copy(sql: &[u8]) -> bool {
    memchr::memchr2_iter(b'y', b'Y', sql)
        .any(|i| i >= 3 && sql[i - 3..i].eq_ignore_ascii_case(b"cop"))
}

/// SQL text as the classifier reads it: as sent, in the client's encoding, unless that is an
/// encoding whose characters may end in an ASCII byte: then a copy in which every byte of
/// each such character is 0x80, which reads as a letter, so that a `\` inside one does not
/// escape the quote after it. Positions in both are the same.
fn lexable(b: &[u8], multibyte: Option<MultiByte>) -> Cow<'_, [u8]> {
    let Some(mb) = multibyte.filter(|_| !b.is_ascii()) else {
        return Cow::Borrowed(b);
    };
    let mut text = b.to_vec();
    let mut i = 0;
    while i < text.len() {
        if text[i].is_ascii() {
            i += 1;
        } else {
            let end = i + mb.char_len(&text[i..]);
            text[i..end].fill(0x80);
            i = end;
        }
    }
    Cow::Owned(text)
}

/// A statement's name as a map key: itself when UTF-8, else a NUL (never in a name) and its
/// bytes in hex, so that different names stay different.
fn name_key(b: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(b) {
        Ok(name) => Cow::Borrowed(name),
        Err(_) => {
            let mut key = String::from("\0");
            for c in b {
                let _ = write!(key, "{c:02x}");
            }
            Cow::Owned(key)
        }
    }
}

/// A client-only encoding (PostgreSQL cannot store it) whose multi-byte characters may
/// contain ASCII bytes such as `\` or `;`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MultiByte {
    /// SJIS, SHIFT_JIS_2004: two bytes, but 0xA1–0xDF (half-width kana) stand alone.
    Sjis,
    /// BIG5, GBK, UHC: two bytes.
    TwoByte,
    /// GB18030: two bytes, or four when the second is a digit.
    Gb18030,
    /// JOHAB: two bytes (three after 0x8F).
    Johab,
}

impl MultiByte {
    /// The encoding a `client_encoding` value names, if it is one of these.
    fn from_name(name: &str) -> Option<Self> {
        match name.to_ascii_uppercase().as_str() {
            "SJIS" | "SHIFT_JIS_2004" => Some(Self::Sjis),
            "BIG5" | "GBK" | "UHC" => Some(Self::TwoByte),
            "GB18030" => Some(Self::Gb18030),
            "JOHAB" => Some(Self::Johab),
            _ => None,
        }
    }

    /// The length of the non-ASCII character `b` starts with, as the server counts it, cut to
    /// what is there.
    fn char_len(self, b: &[u8]) -> usize {
        let len = match self {
            Self::Sjis if (0xa1..=0xdf).contains(&b[0]) => 1,
            Self::Gb18030 if b.get(1).is_some_and(u8::is_ascii_digit) => 4,
            Self::Johab if b[0] == 0x8f => 3,
            _ => 2,
        };
        len.min(b.len())
    }
}

/// Why a session cannot move when it changed its state in non-ASCII text that is not UTF-8.
const NOT_UTF8: &str = "session state set in text that is not UTF-8";

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn query(sql: &str) -> Vec<u8> {
        let mut b = sql.as_bytes().to_vec();
        b.push(0);
        msg(b'Q', &b)
    }

    /// Sends each of `sqls` as a Query answered outside a block; checks what comes first.
    fn each_query_gets(j: &mut Journal, sqls: &[&str], want: Before) {
        for sql in sqls {
            assert_eq!(j.on_client_message(b'Q', &query(sql)), want, "{sql}");
            j.on_ready_for_query(b'I');
        }
    }

    fn answer(j: &mut Journal, bytes: &[u8], status: u8) {
        j.on_server_bytes(b'C', bytes);
        j.on_ready_for_query(status);
    }

    /// Parses a statement (`parse`: the Parse body) and answers ParseComplete and the
    /// ReadyForQuery status given.
    fn parsed(j: &mut Journal, parse: &[u8], status: u8) {
        j.on_client_message(b'P', &msg(b'P', parse));
        j.on_client_message(b'S', &msg(b'S', b""));
        j.on_server_message(b'1');
        j.on_ready_for_query(status);
    }

    /// Sends each Query and answers it with the ReadyForQuery status given.
    fn queries(j: &mut Journal, steps: &[(&str, u8)]) {
        for (sql, status) in steps {
            j.on_client_message(b'Q', &query(sql));
            answer(j, b"", *status);
        }
    }

    #[test]
    fn answered_groups_are_reused_clean_and_bounded() {
        let mut j = Journal::new(1 << 20);
        for round in 0..3 {
            j.on_client_message(b'Q', &query("BEGIN"));
            answer(&mut j, b"BEGIN", b'T');
            // Twelve writes, one of them larger than all spares may hold together.
            for i in 0..12 {
                let pad = if i == 5 {
                    "x".repeat(SPARE_BYTES)
                } else {
                    String::new()
                };
                j.on_client_message(
                    b'Q',
                    &query(&format!("INSERT INTO t VALUES ({i}) -- {pad}")),
                );
                answer(&mut j, b"INSERT 0 1", b'T');
            }
            j.on_client_message(b'Q', &query("COMMIT"));
            answer(&mut j, b"COMMIT", b'I');
            assert!(j.groups().is_empty(), "round {round}");
            assert!(j.spares.len() <= SPARE_GROUPS);
            let kept: usize = j.spares.iter().map(|g| g.request.capacity()).sum();
            assert!(kept <= SPARE_BYTES, "round {round}: {kept} bytes kept");
        }
        // A reused group starts empty: a read after all those writes is a read.
        j.on_client_message(b'Q', &query("SELECT 1"));
        let g = &j.groups()[0];
        assert!(!g.may_write && !g.commits && !g.begins && !g.answered);
        assert_eq!(&g.request[..], &query("SELECT 1")[..]);
    }

    #[test]
    fn answers_go_to_the_oldest_unanswered_group_however_long_the_transaction() {
        let mut j = Journal::new(1 << 20);
        j.on_client_message(b'Q', &query("BEGIN"));
        answer(&mut j, b"BEGIN", b'T');
        for i in 0..100 {
            j.on_client_message(b'Q', &query(&format!("INSERT INTO t VALUES ({i})")));
            answer(&mut j, b"INSERT 0 1", b'T');
        }
        // Three pipelined requests; the second one fails.
        for sql in ["SELECT 1", "SELECT 1/0", "SELECT 2"] {
            j.on_client_message(b'Q', &query(sql));
        }
        answer(&mut j, b"SELECT 1", b'T');
        j.on_server_message(backend::ERROR_RESPONSE);
        j.on_ready_for_query(b'E');
        let g = j.groups();
        assert_eq!(g.len(), 104);
        assert!(g[101].answered && !g[101].failed);
        assert!(g[102].answered && g[102].failed);
        assert!(!g[103].answered && !g[103].failed);
        j.on_server_message(backend::ERROR_RESPONSE);
        j.on_ready_for_query(b'E');
        assert!(j.groups()[103].failed);
        j.on_client_message(b'Q', &query("ROLLBACK"));
        answer(&mut j, b"ROLLBACK", b'I');
        assert!(j.groups().is_empty());
        // The next requests are answered from the first group on again.
        for sql in ["SELECT 3", "SELECT 4"] {
            j.on_client_message(b'Q', &query(sql));
        }
        j.on_server_message(backend::ERROR_RESPONSE);
        assert!(j.groups()[0].failed && !j.groups()[1].failed);
        j.on_ready_for_query(b'I');
        assert_eq!(j.groups().len(), 1);
        assert!(!j.groups()[0].answered);
    }

    #[test]
    fn transaction_groups_are_kept_until_idle() {
        let mut j = Journal::new(1 << 20);
        assert_eq!(j.on_client_message(b'Q', &query("BEGIN")), Before::Forward);
        answer(&mut j, b"BEGIN", b'T');
        j.on_client_message(b'Q', &query("INSERT INTO t VALUES (1)"));
        answer(&mut j, b"INSERT 0 1", b'T');
        assert_eq!(j.groups().len(), 2);
        assert!(j.may_have_written());
        assert_eq!(
            j.on_client_message(b'Q', &query("COMMIT")),
            Before::CaptureXid
        );
        j.set_xid(Some(742));
        answer(&mut j, b"COMMIT", b'I');
        assert!(j.groups().is_empty());
        assert_eq!(j.last_committed_xid(), Some(742));
    }

    #[test]
    fn a_lone_write_in_a_block_asks_for_the_xid_and_commit_then_need_not() {
        let mut j = Journal::new(1 << 20);
        // Outside a block no: a string of one statement would become one of two, whose
        // CommandComplete comes before the commit (see `CaptureLsnAfter`); it is sent as a
        // batch instead.
        assert_eq!(
            j.on_client_message(b'Q', &query("INSERT INTO t VALUES (1)")),
            Before::QueryAsBatch
        );
        j.set_xid(Some(700));
        answer(&mut j, b"INSERT 0 1", b'I');
        assert_eq!(j.last_committed_xid(), Some(700));
        j.on_client_message(b'Q', &query("BEGIN"));
        answer(&mut j, b"BEGIN", b'T');
        for sql in [
            "SELECT 1",
            "INSERT INTO t VALUES (2); SELECT 1",
            "COPY t FROM STDIN",
        ] {
            assert_eq!(
                j.on_client_message(b'Q', &query(sql)),
                Before::Forward,
                "{sql}"
            );
            answer(&mut j, b"", b'T');
        }
        assert_eq!(
            j.on_client_message(b'Q', &query("UPDATE t SET a = 3")),
            Before::CaptureXidAfter
        );
        // The statement touched no row: no xid yet, so the next write asks again.
        j.set_xid(None);
        answer(&mut j, b"UPDATE 0", b'T');
        assert_eq!(
            j.on_client_message(b'Q', &query("INSERT INTO t VALUES (4)")),
            Before::CaptureXidAfter
        );
        j.set_xid(Some(900));
        answer(&mut j, b"INSERT 0 1", b'T');
        assert_eq!(
            j.on_client_message(b'Q', &query("INSERT INTO t VALUES (5)")),
            Before::Forward
        );
        answer(&mut j, b"INSERT 0 1", b'T');
        assert_eq!(j.on_client_message(b'Q', &query("COMMIT")), Before::Forward);
        answer(&mut j, b"COMMIT", b'I');
        assert_eq!(j.last_committed_xid(), Some(900));
    }

    #[test]
    fn read_only_commit_needs_no_xid() {
        let mut j = Journal::new(1 << 20);
        j.on_client_message(b'Q', &query("BEGIN"));
        answer(&mut j, b"BEGIN", b'T');
        j.on_client_message(b'Q', &query("SELECT 1"));
        answer(&mut j, b"1", b'T');
        assert_eq!(j.on_client_message(b'Q', &query("COMMIT")), Before::Forward);
    }

    /// A NoticeResponse of `severity`, SQLSTATE `code` and `text`, whole.
    fn notice(severity: &str, code: &str, text: &str) -> Vec<u8> {
        let mut body = Vec::new();
        for (field, value) in [
            (b'S', severity),
            (b'V', severity),
            (b'C', code),
            (b'M', text),
        ] {
            body.push(field);
            body.extend_from_slice(value.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut m = vec![b'N'];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(&body);
        m
    }

    /// Log echoes and a backend's notice that it is told to stop are about the server, not
    /// the statement: one server may send them where another does not. Other notices say
    /// what the statement did, and count.
    #[test]
    fn digests_cover_counted_bytes_only() {
        let mut a = Journal::new(1 << 20);
        let mut b = Journal::new(1 << 20);
        for j in [&mut a, &mut b] {
            j.on_client_message(b'Q', &query("SELECT 1"));
        }
        a.on_server_bytes(b'D', b"row");
        for extra in [
            notice("LOG", "00000", "statement: SELECT 1"),
            notice("DEBUG", "00000", "StartTransaction(1)"),
            notice(
                "WARNING",
                "57P02",
                "terminating connection because of crash",
            ),
            b"S\0\0\0\x0fTimeZone\0UTC\0".to_vec(),
        ] {
            b.on_server_bytes(extra[0], &extra);
        }
        b.on_server_bytes(b'D', b"row");
        assert_eq!(a.answer_so_far(), b.answer_so_far());
        for counted in [
            notice("NOTICE", "42P07", "relation \"t\" already exists, skipping"),
            notice("WARNING", "01000", "kv rows 0"),
            notice("INFO", "00000", "v now 11"),
        ] {
            let mut c = Journal::new(1 << 20);
            c.on_client_message(b'Q', &query("SELECT 1"));
            c.on_server_bytes(b'N', &counted[..9]);
            c.on_server_body(&counted[9..]);
            c.on_server_bytes(b'D', b"row");
            assert_ne!(a.answer_so_far(), c.answer_so_far(), "{counted:?}");
        }
    }

    #[test]
    fn session_state_follows_commit_and_rollback() {
        let mut j = Journal::new(1 << 20);
        j.on_client_message(b'Q', &query("SET search_path TO a"));
        answer(&mut j, b"SET", b'I');
        j.on_client_message(b'Q', &query("BEGIN; SET search_path TO b; LISTEN x"));
        answer(&mut j, b"", b'T');
        j.on_client_message(b'Q', &query("ROLLBACK"));
        answer(&mut j, b"ROLLBACK", b'I');
        assert_eq!(j.state().restore_sql(), ["SET search_path TO a"]);
        j.on_client_message(
            b'Q',
            &query("BEGIN; SET search_path TO c; LISTEN x; PREPARE p AS SELECT 1"),
        );
        answer(&mut j, b"", b'T');
        j.on_client_message(b'Q', &query("COMMIT"));
        answer(&mut j, b"COMMIT", b'I');
        assert_eq!(
            j.state().restore_sql(),
            [
                "SET search_path TO c",
                "PREPARE p AS SELECT 1",
                "LISTEN \"x\""
            ]
        );
        j.on_client_message(b'Q', &query("DISCARD ALL"));
        answer(&mut j, b"DISCARD ALL", b'I');
        assert!(j.state().restore_sql().is_empty());
    }

    #[test]
    fn empty_statements_do_not_shift_session_text() {
        let mut j = Journal::new(1 << 20);
        j.on_client_message(
            b'Q',
            &query(";; /* c */ ; SET search_path TO a; SELECT 1;; SET work_mem = '8MB';"),
        );
        answer(&mut j, b"SET", b'I');
        assert_eq!(
            j.state().restore_sql(),
            ["SET search_path TO a", "SET work_mem = '8MB'"]
        );
    }

    #[test]
    fn a_commit_found_committed_keeps_its_statements_and_settings() {
        let mut j = Journal::new(1 << 20);
        queries(
            &mut j,
            &[
                ("BEGIN", b'T'),
                ("PREPARE sq AS SELECT 1", b'T'),
                ("SET application_name = 'x'", b'T'),
            ],
        );
        parsed(&mut j, b"s1\0SELECT 1\0\0\0", b'T');
        // The COMMIT in flight carries a Parse of its own; it is found committed.
        j.on_client_message(b'P', &msg(b'P', b"s2\0COMMIT\0\0\0"));
        j.on_client_message(b'B', &msg(b'B', b"\0s2\0\0\0\0\0\0\0"));
        j.on_client_message(b'E', &msg(b'E', b"\0\0\0\0\0"));
        j.on_client_message(b'S', &msg(b'S', b""));
        assert_eq!(j.settle_commit(), ["SET application_name = 'x'"]);
        let state = j.state();
        assert!(state.has_statement("s2") && state.has_statement("sq"));
        assert!(!state.has_statement("s3"));
        let names = |s: &SessionState| {
            let sql = s.restore_sql();
            let parses: Vec<_> = s.restore_parses().map(|p| p[5..7].to_vec()).collect();
            (sql, parses)
        };
        assert_eq!(
            names(state),
            (
                vec![
                    "SET application_name = 'x'".to_owned(),
                    "PREPARE sq AS SELECT 1".to_owned()
                ],
                vec![b"s1".to_vec(), b"s2".to_vec()]
            )
        );
        let present = BTreeSet::from(["s1".to_owned()]);
        assert_eq!(
            names(&state.statements_missing_from(&present)),
            (
                vec!["PREPARE sq AS SELECT 1".to_owned()],
                vec![b"s2".to_vec()]
            )
        );
        let all = BTreeSet::from(["s1".to_owned(), "s2".to_owned(), "sq".to_owned()]);
        assert_eq!(
            names(&state.statements_missing_from(&all)),
            (vec![], vec![])
        );
    }

    #[test]
    fn the_state_before_a_transaction_undoes_its_statement_changes() {
        let mut j = Journal::new(1 << 20);
        queries(&mut j, &[("PREPARE a AS SELECT 1", b'I')]);
        parsed(&mut j, b"s1\0SELECT 1\0\0\0", b'I');
        let start = j.state().clone();
        queries(
            &mut j,
            &[
                ("BEGIN", b'T'),
                ("DEALLOCATE a", b'T'),
                ("PREPARE b AS SELECT 2", b'T'),
            ],
        );
        j.on_client_message(b'C', &msg(b'C', b"Ss1\0"));
        j.on_client_message(b'S', &msg(b'S', b""));
        j.on_ready_for_query(b'T');
        parsed(&mut j, b"s1\0SELECT 3\0\0\0", b'T');
        parsed(&mut j, b"s2\0SELECT 4\0\0\0", b'T');
        let now = j.state();
        assert_eq!(now.restore_sql(), ["PREPARE b AS SELECT 2"]);
        assert_eq!(now.restore_parses().count(), 2);
        let before = now.before(j.groups());
        assert_eq!(before.restore_sql(), start.restore_sql());
        assert_eq!(
            before.restore_parses().collect::<Vec<_>>(),
            start.restore_parses().collect::<Vec<_>>()
        );
    }

    #[test]
    fn named_parse_is_kept_once_parsed() {
        let mut j = Journal::new(1 << 20);
        parsed(&mut j, b"s1\0SELECT $1\0\0\0", b'I');
        assert_eq!(j.state().restore_parses().count(), 1);
        j.on_client_message(b'C', &msg(b'C', b"Ss1\0"));
        j.on_client_message(b'S', &msg(b'S', b""));
        j.on_ready_for_query(b'I');
        assert_eq!(j.state().restore_parses().count(), 0);
    }

    #[test]
    fn the_unnamed_statement_lasts_until_replaced_closed_or_a_simple_query() {
        let unnamed = |j: &Journal| {
            let parses: Vec<Bytes> = j.state().restore_parses().cloned().collect();
            parses
                .iter()
                .find(|p| p[5] == 0)
                .map(|p| String::from_utf8_lossy(&p[6..p.len() - 3]).into_owned())
        };
        let mut j = Journal::new(1 << 20);
        parsed(&mut j, b"\0SELECT 1\0\0\0", b'I');
        parsed(&mut j, b"s1\0SELECT 2\0\0\0", b'I');
        assert_eq!(unnamed(&j).as_deref(), Some("SELECT 1"));
        // Restored last, after the named ones.
        let last = j.state().restore_parses().last().cloned().unwrap();
        assert_eq!(last[5], 0);
        // DEALLOCATE ALL drops only named statements.
        queries(&mut j, &[("BEGIN", b'T')]);
        assert_eq!(unnamed(&j), None, "a simple Query ends it");
        parsed(&mut j, b"\0SELECT 3\0\0\0", b'T');
        j.on_client_message(b'P', &msg(b'P', b"\0DEALLOCATE ALL\0\0\0"));
        j.on_client_message(b'B', &msg(b'B', b"\0\0\0\0\0\0\0\0"));
        j.on_client_message(b'E', &msg(b'E', b"\0\0\0\0\0"));
        j.on_client_message(b'S', &msg(b'S', b""));
        j.on_server_message(b'1');
        answer(&mut j, b"DEALLOCATE ALL\0", b'T');
        assert_eq!(unnamed(&j).as_deref(), Some("DEALLOCATE ALL"));
        assert!(!j.state().has_statement("s1"));
        // Before the open transaction (its BEGIN ended the first unnamed statement), s1 and
        // that statement: replaying the transaction from there gives what the client has.
        let before = j.state().before(j.groups());
        let parses: Vec<&[u8]> = before.restore_parses().map(|p| &p[5..]).collect();
        assert_eq!(
            parses,
            [&b"s1\0SELECT 2\0\0\0"[..], &b"\0SELECT 1\0\0\0"[..]]
        );
        j.on_client_message(b'C', &msg(b'C', b"S\0"));
        j.on_client_message(b'S', &msg(b'S', b""));
        j.on_ready_for_query(b'T');
        assert_eq!(unnamed(&j), None, "closed");
    }

    #[test]
    fn which_messages_get_a_ready_for_query_with_or_without_a_record() {
        let parse = |sql: &str| msg(b'P', format!("s1\0{sql}\0\0\0").as_bytes());
        let bind = msg(b'B', b"\0s1\0\0\0\0\0\0\0");
        // Each message, whether it is owed a ReadyForQuery, and the one the server sends next.
        let script: Vec<(Vec<u8>, bool, Option<u8>)> = vec![
            (query("BEGIN; SET work_mem = '8MB'"), true, Some(b'T')),
            (query("INSERT INTO t VALUES (1)"), true, Some(b'T')),
            (query("COMMIT"), true, Some(b'I')),
            // COPY in the simple protocol: a Sync or Flush sent during its data is ignored.
            (query("copy t from stdin"), true, None),
            (msg(b'd', b"1\n"), false, None),
            (msg(b'S', b""), false, None),
            (msg(b'H', b""), false, None),
            (msg(b'c', b""), false, Some(b'I')),
            // And in the extended protocol, with the Sync right behind the Execute.
            (parse("COPY t FROM STDIN"), false, None),
            (bind.clone(), false, None),
            (msg(b'E', b"\0\0\0\0\0"), false, None),
            (msg(b'S', b""), false, None),
            (msg(b'd', b"2\n"), false, None),
            (msg(b'c', b""), false, None),
            (msg(b'S', b""), true, Some(b'I')),
            // The same statement name, re-parsed as something else, copies nothing.
            (parse("SELECT 'copy'"), false, None),
            (bind, false, None),
            (msg(b'S', b""), true, Some(b'I')),
        ];
        let mut full = Journal::new(1 << 20);
        let mut bare = Journal::boundaries_only();
        for (i, (raw, owed, ready)) in script.iter().enumerate() {
            let mut expects = [false; 2];
            for (j, journal) in [&mut full, &mut bare].into_iter().enumerate() {
                journal.on_client_message(raw[0], raw);
                expects[j] = journal.expects_ready();
                journal.on_server_bytes(b'C', b"C\0\0\0\x0bINSERT\0");
                if raw[0] == b'P' {
                    journal.on_server_message(b'1');
                }
                if let Some(status) = ready {
                    journal.on_ready_for_query(*status);
                }
            }
            assert_eq!(expects[0], expects[1], "message {i}");
            assert_eq!(expects[0], *owed, "message {i}");
            if bare.has_open_batch() || !bare.groups().is_empty() {
                assert!(
                    bare.groups().iter().all(|g| g.request.is_empty()),
                    "message {i}"
                );
            }
            assert_eq!(bare.answer_so_far(), DigestBuilder::default().digest());
        }
        assert_eq!(full.state().restore_sql(), ["SET work_mem = '8MB'"]);
        assert!(bare.state().restore_sql().is_empty());
        assert_eq!(full.state().restore_parses().count(), 1);
        assert_eq!(bare.state().restore_parses().count(), 0);
    }

    #[test]
    fn copy_is_never_missed() {
        for sql in [
            "COPY t FROM STDIN",
            "copy",
            "x; copy",
            "SELECT 1;CoPy t",
            "xcopyx",
            "cOpY",
            "yy copy yy",
        ] {
            assert!(mentions_copy(sql.as_bytes()), "{sql}");
        }
        for sql in [
            "SELECT 1",
            "co py",
            "cop",
            "c",
            "y",
            "opy",
            "xopy",
            "cpy",
            "UPDATE accounts SET c = 1",
            "INSERT INTO pgbench_history VALUES (1)",
        ] {
            assert!(!mentions_copy(sql.as_bytes()), "{sql}");
        }
    }

    #[test]
    fn copy_data_joins_its_query_and_bounds_apply() {
        let mut j = Journal::new(64);
        j.on_client_message(b'Q', &query("COPY t FROM STDIN"));
        j.on_client_message(b'd', &msg(b'd', &[b'x'; 40]));
        j.on_client_message(b'c', &msg(b'c', b""));
        assert_eq!(j.groups().len(), 1);
        assert_eq!(j.unreplayable(), Some(&Unreplayable::TooLarge(64)));
        let g = &j.groups()[0];
        assert!(g.truncated && g.request.is_empty(), "none of it is kept");
        j.on_server_message(b'C');
        j.on_ready_for_query(b'I');
        // The next request is kept again.
        j.on_client_message(b'Q', &query("SELECT 1"));
        assert_eq!(j.unreplayable(), None);
        let g = &j.groups()[0];
        assert!(!g.truncated && g.request[..] == query("SELECT 1")[..]);
    }

    #[test]
    fn executing_a_prepared_write_counts_as_writing() {
        let mut j = Journal::new(1 << 20);
        j.on_client_message(b'Q', &query("BEGIN"));
        answer(&mut j, b"BEGIN", b'T');
        j.on_client_message(b'P', &msg(b'P', b"ins\0INSERT INTO t VALUES ($1)\0\0\0"));
        j.on_client_message(b'S', &msg(b'S', b""));
        j.on_ready_for_query(b'T');
        assert!(!j.txn_may_write(), "parsing writes nothing");
        j.on_client_message(b'B', &msg(b'B', b"\0ins\0\0\0\0\0\0\0"));
        j.on_client_message(b'E', &msg(b'E', b"\0\0\0\0\0"));
        j.on_client_message(b'S', &msg(b'S', b""));
        j.on_ready_for_query(b'T');
        assert!(j.txn_may_write());
        // A prepared COMMIT, bound first in its batch, gets the xid captured before it.
        j.on_client_message(b'P', &msg(b'P', b"c\0COMMIT\0\0\0"));
        j.on_client_message(b'S', &msg(b'S', b""));
        j.on_ready_for_query(b'T');
        assert_eq!(
            j.on_client_message(b'B', &msg(b'B', b"\0c\0\0\0\0\0\0\0")),
            Before::CaptureXid
        );
        // An unknown statement is assumed to write.
        let mut k = Journal::new(1 << 20);
        k.on_client_message(b'B', &msg(b'B', b"\0nobody\0\0\0\0\0\0\0"));
        assert!(k.groups()[0].may_write);
    }

    /// A statement prepared before its view was known to write writes once it is: executing
    /// it makes the transaction a write.
    #[test]
    fn statements_prepared_before_a_suspect_was_known_write_once_it_is() {
        let mut j = Journal::new(1 << 20);
        parsed(&mut j, b"old\0SELECT * FROM vw\0\0\0", b'I');
        parsed(&mut j, b"\0SELECT abs('5'::text)\0\0\0", b'I');
        parsed(&mut j, b"other\0SELECT * FROM t\0\0\0", b'I');
        j.set_suspects(std::sync::Arc::new(Suspects::new(
            ["vw".into()],
            ["abs".into()],
        )));
        for (statement, writes) in [(&b"old"[..], true), (b"", true), (b"other", false)] {
            j.on_client_message(b'Q', &query("BEGIN"));
            answer(&mut j, b"BEGIN", b'T');
            let mut bind = statement.to_vec();
            bind.insert(0, 0);
            bind.extend_from_slice(b"\0\0\0\0\0\0\0");
            j.on_client_message(b'B', &msg(b'B', &bind));
            j.on_client_message(b'E', &msg(b'E', b"\0\0\0\0\0"));
            j.on_client_message(b'S', &msg(b'S', b""));
            j.on_ready_for_query(b'T');
            assert_eq!(j.txn_may_write_data(), writes, "{statement:?}");
            j.on_client_message(b'Q', &query("ROLLBACK"));
            answer(&mut j, b"ROLLBACK", b'I');
        }
    }

    /// Requests kept are judged again when suspects are learned: the open transaction's
    /// answered reads, and those in flight, simple or bound.
    #[test]
    fn requests_kept_are_judged_again_with_suspects_learned_later() {
        let mut j = Journal::new(1 << 20);
        parsed(&mut j, b"old\0SELECT * FROM vw\0\0\0", b'I');
        j.on_client_message(b'Q', &query("SELECT 1"));
        answer(&mut j, b"SELECT 1", b'I');
        assert!(!j.holds_reads(), "nothing kept outside a transaction");
        j.on_client_message(b'Q', &query("BEGIN"));
        answer(&mut j, b"BEGIN", b'T');
        j.on_client_message(b'Q', &query("SELECT one FROM vw"));
        answer(&mut j, b"SELECT 1", b'T');
        j.on_client_message(b'Q', &query("SELECT * FROM t"));
        j.on_client_message(b'B', &msg(b'B', b"\0old\0\0\0\0\0\0\0"));
        j.on_client_message(b'E', &msg(b'E', b"\0\0\0\0\0"));
        j.on_client_message(b'S', &msg(b'S', b""));
        assert!(j.holds_reads() && !j.txn_may_write_data());
        j.set_suspects(std::sync::Arc::new(Suspects::new(["vw".into()], [])));
        assert!(
            j.txn_may_write_data(),
            "the answered read of the view wrote"
        );
        let writes: Vec<bool> = j.groups().iter().map(|g| g.may_write_data).collect();
        assert_eq!(writes, [false, true, false, true]);
        assert!(j.holds_reads(), "the read of the table still reads");
    }

    /// A statement prepared with an effect outside the database makes each transaction that
    /// runs it unreplayable, however long after its Parse.
    #[test]
    fn a_prepared_hazard_counts_where_it_runs() {
        let mut j = Journal::new(1 << 20);
        parsed(
            &mut j,
            b"remote\0SELECT dblink_exec('other', 'DELETE FROM t')\0\0\0",
            b'I',
        );
        assert_eq!(j.unreplayable(), None, "parsing runs nothing");
        j.on_client_message(b'B', &msg(b'B', b"\0remote\0\0\0\0\0\0\0"));
        j.on_client_message(b'E', &msg(b'E', b"\0\0\0\0\0"));
        j.on_client_message(b'S', &msg(b'S', b""));
        assert!(
            matches!(j.unreplayable(), Some(Unreplayable::Hazard(_))),
            "{:?}",
            j.unreplayable()
        );
        j.on_ready_for_query(b'I');
        assert_eq!(j.unreplayable(), None, "over with its transaction");
    }

    /// `DISCARD ALL` answered without an error, with nothing pipelined behind it, leaves nothing
    /// that kept the session in place; narrower forms, a failed one or one with a request sent
    /// behind it before its answer do not clear it.
    #[test]
    fn discard_all_makes_the_session_movable_again() {
        let mut j = Journal::new(1 << 20);
        j.on_client_message(b'Q', &query("CREATE TEMP TABLE s(a int)"));
        answer(&mut j, b"CREATE TABLE", b'I');
        assert!(j.unmovable().is_some());
        j.on_client_message(b'Q', &query("DISCARD TEMP"));
        answer(&mut j, b"DISCARD TEMP", b'I');
        assert!(j.unmovable().is_some());
        j.on_client_message(b'Q', &query("DISCARD ALL"));
        j.on_server_message(b'E');
        answer(&mut j, b"", b'I');
        assert!(j.unmovable().is_some(), "it failed");
        j.on_client_message(b'Q', &query("DISCARD ALL"));
        j.on_client_message(b'Q', &query("SELECT pg_advisory_lock(1)"));
        answer(&mut j, b"DISCARD ALL", b'I');
        assert!(j.unmovable().is_some(), "the lock taken behind it");
        answer(&mut j, b"SELECT 1", b'I');
        j.on_client_message(b'Q', &query("discard all"));
        answer(&mut j, b"DISCARD ALL", b'I');
        assert_eq!(j.unmovable(), None);
    }

    /// A Query after extended-protocol requests without a Sync: the server skips it (and all
    /// up to the Sync) when one of those requests fails, so nothing of the gateway's may go
    /// among them; the writes there are captured by a WAL position after the Sync, and until
    /// then are unchecked. One ReadyForQuery, the Sync's, ends every group it skipped.
    #[test]
    fn a_query_closing_an_extended_batch_may_be_skipped_to_its_sync() {
        let mut j = Journal::new(1 << 20);
        let bind = msg(b'B', b"\0nosuch\0\0\0\0\0\0\0");
        let execute = msg(b'E', b"\0\0\0\0\0");
        j.on_client_message(b'B', &bind);
        j.on_client_message(b'E', &execute);
        assert_eq!(
            j.on_client_message(b'Q', &query("INSERT INTO t VALUES (1)")),
            Before::Forward
        );
        assert!(j.commit_unchecked());
        assert_eq!(
            j.on_client_message(b'Q', &query("INSERT INTO t VALUES (2)")),
            Before::Forward,
            "still before the Sync"
        );
        assert_eq!(
            j.on_client_message(b'S', &msg(b'S', b"")),
            Before::CaptureLsnAfter
        );
        assert_eq!(j.groups().len(), 3);
        // The Bind fails: the two Queries are skipped; the Sync's answer ends all three.
        j.on_server_message(b'E');
        assert_eq!(j.on_ready_for_query(b'I'), 2);
        assert!(j.groups().is_empty());
        j.position_captured();
        assert!(!j.commit_unchecked());
        // Synced again: an autocommit write is asked about as usual.
        assert_eq!(
            j.on_client_message(b'Q', &query("INSERT INTO t VALUES (3)")),
            Before::QueryAsBatch
        );
        assert_eq!(j.on_ready_for_query(b'I'), 0);
        // Without an error each is answered: one ReadyForQuery each.
        j.on_client_message(b'B', &bind);
        j.on_client_message(b'E', &execute);
        j.on_client_message(b'Q', &query("SELECT 1"));
        j.on_client_message(b'S', &msg(b'S', b""));
        for _ in 0..2 {
            assert_eq!(j.on_ready_for_query(b'I'), 0);
        }
        assert!(j.groups().is_empty());
    }

    /// An autocommit batch of data changes gets the xid query in front of its Sync; its answer
    /// follows every request's completion, and the xid counts as committed once the batch is
    /// answered without an error.
    #[test]
    fn an_autocommit_batch_asks_for_its_xid_before_its_sync() {
        let mut j = Journal::new(1 << 20);
        j.on_client_message(b'P', &msg(b'P', b"ins\0INSERT INTO t VALUES ($1)\0\0\0"));
        assert_eq!(j.on_client_message(b'S', &msg(b'S', b"")), Before::Forward);
        j.on_server_message(b'1');
        j.on_ready_for_query(b'I');
        let batch = |j: &mut Journal| {
            j.on_client_message(b'B', &msg(b'B', b"\0ins\0\0\0\0\0\0\0"));
            j.on_client_message(b'D', &msg(b'D', b"P\0"));
            j.on_client_message(b'E', &msg(b'E', b"\0\0\0\0\0"));
            j.on_client_message(b'S', &msg(b'S', b""))
        };
        assert_eq!(batch(&mut j), Before::CommitXidBeforeSync);
        j.note_tail();
        for tag in [b'2', b'n'] {
            j.on_server_message(tag);
            assert!(!j.answering_tail());
        }
        j.on_server_message(b'N');
        assert!(!j.answering_tail(), "a notice completes nothing");
        j.on_server_message(b'C');
        assert!(j.answering_tail());
        j.set_xid(Some(900));
        j.on_ready_for_query(b'I');
        assert_eq!(j.last_committed_xid(), Some(900));
        // A batch that failed committed nothing, and its xid query never ran.
        assert_eq!(batch(&mut j), Before::CommitXidBeforeSync);
        j.note_tail();
        j.on_server_message(b'2');
        j.on_server_message(b'E');
        assert!(!j.answering_tail());
        j.on_ready_for_query(b'I');
        assert_eq!(j.last_committed_xid(), Some(900));
        // No xid assigned (nothing changed): nothing to look up.
        assert_eq!(batch(&mut j), Before::CommitXidBeforeSync);
        j.set_xid(None);
        j.on_ready_for_query(b'I');
        assert_eq!(j.last_committed_xid(), Some(900));
        // A schema change runs in the batch's transaction as well, unless PostgreSQL refuses
        // it there.
        let unnamed = |j: &mut Journal, sql: &str| {
            j.on_client_message(b'P', &msg(b'P', format!("\0{sql}\0\0\0").as_bytes()));
            j.on_client_message(b'B', &msg(b'B', b"\0\0\0\0\0\0\0\0"));
            j.on_client_message(b'E', &msg(b'E', b"\0\0\0\0\0"));
            j.on_client_message(b'S', &msg(b'S', b""))
        };
        assert_eq!(
            unnamed(&mut j, "CREATE TABLE u (a int)"),
            Before::CommitXidBeforeSync
        );
        j.set_xid(None);
        j.on_ready_for_query(b'I');
        assert_eq!(
            unnamed(&mut j, "CREATE INDEX CONCURRENTLY ON u (a)"),
            Before::CaptureLsnAfter
        );
        j.on_ready_for_query(b'I');
        // A COMMIT in the batch, or a statement the journal never saw: the WAL position.
        j.on_client_message(b'P', &msg(b'P', b"c\0COMMIT\0\0\0"));
        j.on_client_message(b'B', &msg(b'B', b"\0ins\0\0\0\0\0\0\0"));
        j.on_client_message(b'E', &msg(b'E', b"\0\0\0\0\0"));
        j.on_client_message(b'B', &msg(b'B', b"\0c\0\0\0\0\0\0\0"));
        j.on_client_message(b'E', &msg(b'E', b"\0\0\0\0\0"));
        assert_eq!(
            j.on_client_message(b'S', &msg(b'S', b"")),
            Before::CaptureLsnAfter
        );
        j.on_ready_for_query(b'I');
        j.on_client_message(b'B', &msg(b'B', b"\0nobody\0\0\0\0\0\0\0"));
        j.on_client_message(b'E', &msg(b'E', b"\0\0\0\0\0"));
        assert_eq!(
            j.on_client_message(b'S', &msg(b'S', b"")),
            Before::CaptureLsnAfter
        );
    }

    #[test]
    fn wal_position_follows_autocommit_writes_and_copy_data() {
        let mut j = Journal::new(1 << 20);
        // A Query outside a block that can neither be sent as a batch nor carry the xid query:
        // a statement other than a query or a data change, a NUL inside, text ending inside a
        // literal or comment (which would take the query in, and the server's error about it
        // show it).
        assert_eq!(
            j.on_client_message(b'Q', &query("INSERT INTO t VALUES (1)")),
            Before::QueryAsBatch
        );
        j.on_ready_for_query(b'I');
        // Behind a BEGIN not answered yet: in a block after all.
        j.on_client_message(b'Q', &query("BEGIN"));
        assert_eq!(
            j.on_client_message(b'Q', &query("INSERT INTO t VALUES (1)")),
            Before::CaptureLsnAfter
        );
        j.on_ready_for_query(b'T');
        j.on_ready_for_query(b'T');
        j.on_client_message(b'Q', &query("ROLLBACK"));
        j.on_ready_for_query(b'I');
        // Malformed: the server refuses it as sent.
        for body in [
            &b"INSERT INTO t VALUES (1)"[..],
            b"INSERT INTO t VALUES (1)\0x\0",
        ] {
            assert_eq!(
                j.on_client_message(b'Q', &msg(b'Q', body)),
                Before::CaptureLsnAfter
            );
            j.on_ready_for_query(b'I');
        }
        let position = [
            "REINDEX TABLE t",
            "DROP INDEX CONCURRENTLY i",
            "CREATE DATABASE d",
            "INSERT INTO t VALUES (1); SAVEPOINT s",
            "INSERT INTO t VALUES (1); PREPARE TRANSACTION 'x'",
            "INSERT INTO t VALUES ('$x",
            "INSERT INTO t VALUES ($$x",
            "SELECT ins_fn(1) /* x",
            "UPDATE t SET a = 1; SELECT \"t",
            "BEGIN; INSERT INTO t VALUES (1); COMMIT; SELECT 1",
            "CREATE INDEX CONCURRENTLY i ON t(a)",
            "CALL p()",
        ];
        each_query_gets(&mut j, &position, Before::CaptureLsnAfter);
        // Nor is anything checked after a read or maintenance.
        let unchecked = ["SELECT 1", "VACUUM t", "ANALYZE t", "CHECKPOINT"];
        each_query_gets(&mut j, &unchecked, Before::Forward);
        // A COPY from the client: the xid query can go in its string; where it did not, the
        // WAL position is taken after the data, not in the middle of it.
        for (sql, suffixed) in [
            ("INSERT INTO t VALUES (1); COPY t FROM STDIN", false),
            ("COPY t FROM STDIN", false),
            ("COPY t FROM STDIN", true),
        ] {
            assert_eq!(
                j.on_client_message(b'Q', &query(sql)),
                Before::CaptureXidAfter
            );
            if suffixed {
                j.note_suffix();
            }
            assert!(j.copy_in_pending());
            assert_eq!(
                j.on_client_message(b'd', &msg(b'd', b"1\n")),
                Before::Forward
            );
            assert_eq!(
                j.on_client_message(b'c', &msg(b'c', b"")),
                if suffixed {
                    Before::Forward
                } else {
                    Before::CaptureLsnAfter
                },
                "{sql}"
            );
            j.on_ready_for_query(b'I');
        }
        // Extended protocol: the Sync sent right after Execute is discarded during COPY; the
        // one after the data ends the batch, and the xid query goes in front of it.
        j.on_client_message(b'P', &msg(b'P', b"\0COPY t FROM STDIN\0\0\0"));
        j.on_client_message(b'B', &msg(b'B', b"\0\0\0\0\0\0\0\0"));
        j.on_client_message(b'E', &msg(b'E', b"\0\0\0\0\0"));
        assert_eq!(j.on_client_message(b'S', &msg(b'S', b"")), Before::Forward);
        assert!(!j.expects_ready());
        j.on_client_message(b'd', &msg(b'd', b"1\n"));
        assert_eq!(j.on_client_message(b'c', &msg(b'c', b"")), Before::Forward);
        assert_eq!(
            j.on_client_message(b'S', &msg(b'S', b"")),
            Before::CommitXidBeforeSync
        );
        assert!(j.expects_ready());
        assert_eq!(j.groups().len(), 1);
    }

    /// A Sync sent right behind a COPY's Execute is discarded if the server takes the COPY's
    /// data, answered if the COPY failed first; which, only the server's answer tells.
    #[test]
    fn a_sync_behind_a_copy_waits_for_the_server() {
        let mut j = Journal::new(1 << 20);
        let copy = |j: &mut Journal| {
            j.on_client_message(b'P', &msg(b'P', b"\0COPY t FROM STDIN\0\0\0"));
            j.on_client_message(b'B', &msg(b'B', b"\0\0\0\0\0\0\0\0"));
            j.on_client_message(b'E', &msg(b'E', b"\0\0\0\0\0"));
            assert_eq!(j.on_client_message(b'S', &msg(b'S', b"")), Before::Forward);
            assert!(!j.expects_ready());
            assert!(j.copy_sync_pending());
            j.on_server_message(b'1');
            j.on_server_message(b'2');
        };
        // Taken: the Sync was discarded; the one after the data ends the batch.
        copy(&mut j);
        j.on_server_message(b'G');
        assert!(!j.copy_sync_pending() && !j.take_copy_sync_answered());
        j.on_client_message(b'd', &msg(b'd', b"1\n"));
        j.on_client_message(b'c', &msg(b'c', b""));
        assert_eq!(
            j.on_client_message(b'S', &msg(b'S', b"")),
            Before::CommitXidBeforeSync
        );
        j.on_server_message(b'C');
        j.on_ready_for_query(b'I');
        // Refused: the Sync ends the batch and is answered; the data after it is ignored,
        // and the next Sync is a batch of its own, which wrote nothing.
        copy(&mut j);
        j.on_server_message(b'E');
        assert!(!j.copy_sync_pending());
        assert!(j.take_copy_sync_answered());
        assert!(!j.take_copy_sync_answered());
        assert_eq!(
            j.on_client_message(b'd', &msg(b'd', b"1\n")),
            Before::Forward
        );
        assert_eq!(j.on_client_message(b'c', &msg(b'c', b"")), Before::Forward);
        j.on_ready_for_query(b'I');
        assert_eq!(j.on_client_message(b'S', &msg(b'S', b"")), Before::Forward);
        assert!(j.expects_ready());
        j.on_ready_for_query(b'I');
        assert!(j.groups().is_empty());
    }

    /// A Query that is one whole transaction block that writes gets the xid query right before
    /// its COMMIT, which must be plain and last; the xid counts as committed once the Query is
    /// answered without an error.
    #[test]
    fn a_whole_block_in_one_query_asks_for_its_xid_before_its_commit() {
        let mut j = Journal::new(1 << 20);
        for (sql, commit) in [
            ("BEGIN; INSERT INTO t VALUES (1); COMMIT", " COMMIT"),
            (
                "begin isolation level serializable;\nupdate t set a = 2;;\n  end work ;\n",
                "\n  end work ;\n",
            ),
            (
                "START TRANSACTION; SAVEPOINT s; DELETE FROM t; RELEASE s; COMMIT TRANSACTION",
                " COMMIT TRANSACTION",
            ),
        ] {
            assert_eq!(
                j.on_client_message(b'Q', &query(sql)),
                Before::CaptureXidBeforeCommit,
                "{sql}"
            );
            assert_eq!(&sql[j.commit_at()..], commit);
            j.set_xid(Some(800));
            j.on_ready_for_query(b'I');
            assert_eq!(j.last_committed_xid(), Some(800));
            assert!(!j.commit_unchecked());
            j.set_xid(None);
        }
        // A failed COMMIT committed nothing.
        j.on_client_message(b'Q', &query("BEGIN; INSERT INTO t VALUES (1); COMMIT"));
        j.set_xid(Some(801));
        j.on_server_message(b'E');
        j.on_ready_for_query(b'I');
        assert_eq!(j.last_committed_xid(), Some(800));
        j.set_xid(None);
        let position = [
            "BEGIN; INSERT INTO t VALUES (1); COMMIT AND CHAIN",
            "BEGIN; INSERT INTO t VALUES (1); COMMIT -- done",
            "BEGIN; INSERT INTO t VALUES (1); COMMIT; SELECT 1",
            "BEGIN; INSERT INTO t VALUES (1); COMMIT; BEGIN; INSERT INTO t VALUES (2); COMMIT",
            "INSERT INTO t VALUES (0); BEGIN; INSERT INTO t VALUES (1); COMMIT",
            "BEGIN; CREATE TEMP TABLE u (a int); COMMIT",
        ];
        each_query_gets(&mut j, &position, Before::CaptureLsnAfter);
        for sql in [
            "BEGIN; SELECT 1; COMMIT",
            "BEGIN; INSERT INTO t VALUES (1); ROLLBACK",
            "BEGIN; COPY t FROM STDIN; COMMIT",
        ] {
            assert_ne!(
                j.on_client_message(b'Q', &query(sql)),
                Before::CaptureXidBeforeCommit,
                "{sql}"
            );
            j.on_ready_for_query(b'I');
        }
    }

    /// A Query that writes outside a block carries the xid query after its statements: one
    /// statement that runs the same in a block as alone (but a lone data change a batch can
    /// carry), or several of any kind but transaction control and COPY FROM STDIN; the xid it
    /// gives is the commit's to check. One that only reads, or has a NUL inside, does not.
    #[test]
    fn autocommit_writing_queries_carry_the_xid_query() {
        let mut j = Journal::new(1 << 20);
        for (sql, statements) in [
            // Alone, what cannot be sent as a batch: a `$` a Parse would take for a
            // parameter, a WITH form, a call of a function that may write.
            ("INSERT INTO t VALUES ('$1')", 1),
            ("INSERT INTO t VALUES ($$x$$)", 1),
            (
                "WITH d AS (DELETE FROM t RETURNING a) SELECT count(*) FROM d",
                1,
            ),
            ("SELECT ins_fn(1)", 1),
            ("INSERT INTO t VALUES (1); INSERT INTO t VALUES (2)", 2),
            (";INSERT INTO t VALUES (1);; SELECT ins_fn(1); -- end", 2),
            ("SELECT 1; UPDATE t SET a = 2 RETURNING a; DELETE FROM t", 3),
            // Schema changes PostgreSQL runs in a block.
            ("CREATE TABLE u (a int)", 1),
            ("INSERT INTO t VALUES (1); CREATE TABLE u()", 2),
            (
                "ALTER TABLE u ADD b int; CREATE INDEX ON u (b); TRUNCATE u",
                3,
            ),
            ("DROP TABLE IF EXISTS u; GRANT SELECT ON t TO PUBLIC", 2),
            // Two or more of any kind but transaction control and COPY FROM STDIN: they run
            // in an implicit block already.
            ("INSERT INTO t VALUES (1); ANALYZE t", 2),
            ("SET search_path = s; INSERT INTO t VALUES (1)", 2),
            ("LOCK TABLE t; UPDATE t SET a = 1; NOTIFY ch", 3),
            ("CALL p(); COPY t TO STDOUT", 2),
        ] {
            assert_eq!(
                j.on_client_message(b'Q', &query(sql)),
                Before::CaptureXidAfter,
                "{sql}"
            );
            assert_eq!(j.last_statement_count(), statements, "{sql}");
            j.on_ready_for_query(b'I');
        }
        j.on_client_message(b'Q', &query("UPDATE t SET a = 1; UPDATE t SET a = 2"));
        j.set_xid(Some(700));
        j.on_ready_for_query(b'I');
        assert_eq!(j.last_committed_xid(), Some(700));
        assert!(!j.commit_unchecked());
        assert_eq!(
            j.on_client_message(b'Q', &query("SELECT 1; SELECT 2")),
            Before::Forward
        );
        j.on_ready_for_query(b'I');
        assert_eq!(
            j.on_client_message(
                b'Q',
                &msg(
                    b'Q',
                    b"INSERT INTO t VALUES (1); INSERT INTO t VALUES (2)\0x\0"
                )
            ),
            Before::CaptureLsnAfter
        );
        j.on_ready_for_query(b'I');
        // After extended-protocol requests not synced, the server may be skipping to the
        // Sync: nothing is appended, and the commit goes unchecked.
        j.on_client_message(b'P', &msg(b'P', b"\0SELECT 1\0\0\0"));
        assert_eq!(
            j.on_client_message(
                b'Q',
                &query("INSERT INTO t VALUES (1); INSERT INTO t VALUES (2)")
            ),
            Before::Forward
        );
        assert!(j.commit_unchecked());
    }

    /// Extended-protocol SET, LISTEN, PREPARE and DEALLOCATE change the session as a Query
    /// would, each time the statement runs; a transaction's settings count only once it
    /// commits, not when its COMMIT is answered ROLLBACK; a ROLLBACK TO SAVEPOINT after
    /// settings in the transaction leaves their state unknown, and the session unmovable.
    #[test]
    fn session_changes_follow_the_extended_protocol_and_the_transaction() {
        let extended = |j: &mut Journal, sql: &str| {
            j.on_client_message(b'P', &msg(b'P', format!("\0{sql}\0\0\0").as_bytes()));
            j.on_client_message(b'B', &msg(b'B', b"\0\0\0\0\0\0\0\0"));
            j.on_client_message(b'E', &msg(b'E', b"\0\0\0\0\0"));
            j.on_client_message(b'S', &msg(b'S', b""));
        };
        let mut j = Journal::new(1 << 20);
        for sql in [
            "SET search_path TO s2",
            "LISTEN ch",
            "PREPARE p AS SELECT 1",
            "PREPARE q AS SELECT 2",
            "DEALLOCATE q",
        ] {
            extended(&mut j, sql);
            answer(&mut j, b"", b'I');
        }
        let restore = j.state().restore_sql();
        assert!(
            restore.iter().any(|s| s == "SET search_path TO s2"),
            "{restore:?}"
        );
        assert!(restore.iter().any(|s| s.contains("LISTEN")), "{restore:?}");
        assert!(
            restore.iter().any(|s| s == "PREPARE p AS SELECT 1"),
            "{restore:?}"
        );
        assert!(
            !restore.iter().any(|s| s.contains("PREPARE q")),
            "{restore:?}"
        );

        // A failed transaction's SET: its COMMIT is answered ROLLBACK.
        queries(
            &mut j,
            &[
                ("BEGIN", b'T'),
                ("SET work_mem = '64MB'", b'T'),
                ("SELECT 1/0", b'E'),
                ("COMMIT", b'I'),
            ],
        );
        let restore = j.state().restore_sql();
        assert!(
            !restore.iter().any(|s| s.contains("work_mem")),
            "{restore:?}"
        );
        assert_eq!(j.unmovable(), None);

        queries(
            &mut j,
            &[
                ("BEGIN", b'T'),
                ("SAVEPOINT a", b'T'),
                ("SET work_mem = '64MB'", b'T'),
                ("ROLLBACK TO SAVEPOINT a", b'T'),
            ],
        );
        assert!(j.unmovable().is_some());
    }

    #[test]
    fn session_changes_write_no_data() {
        let mut j = Journal::new(1 << 20);
        for sql in [
            "SET application_name = 'x'",
            "RESET ALL",
            "PREPARE p AS INSERT INTO t VALUES (1)",
            "DEALLOCATE p",
            "LISTEN c",
            "UNLISTEN *",
            "SET search_path = s; SELECT 1",
        ] {
            assert_eq!(
                j.on_client_message(b'Q', &query(sql)),
                Before::Forward,
                "{sql}: no WAL position to check after a move"
            );
            let g = &j.groups()[0];
            assert!(g.may_write && !g.may_write_data, "{sql}");
            answer(&mut j, b"", b'I');
        }
        // Extended protocol: known from the Parse.
        j.on_client_message(b'P', &msg(b'P', b"s\0SET work_mem = '8MB'\0\0\0"));
        j.on_client_message(b'B', &msg(b'B', b"\0s\0\0\0\0\0\0\0"));
        j.on_client_message(b'E', &msg(b'E', b"\0\0\0\0\0"));
        assert_eq!(j.on_client_message(b'S', &msg(b'S', b"")), Before::Forward);
        assert!(!j.groups()[0].may_write_data);
        answer(&mut j, b"", b'I');
        // A data write beside one is still a write.
        assert_eq!(
            j.on_client_message(b'Q', &query("SET a.b = 1; INSERT INTO t VALUES (1)")),
            Before::CaptureXidAfter
        );
        assert!(j.groups()[0].may_write_data);
        answer(&mut j, b"", b'I');
        // So are a function call and a statement the journal never saw parsed.
        j.on_client_message(b'F', &msg(b'F', b"\0\0\0\x01\0\0\0\0\0\0"));
        assert!(j.groups()[0].may_write_data);
        answer(&mut j, b"", b'I');
        j.on_client_message(b'B', &msg(b'B', b"\0nobody\0\0\0\0\0\0\0"));
        assert!(j.groups()[0].may_write_data);
    }

    #[test]
    fn a_transaction_of_session_changes_needs_no_xid() {
        let mut j = Journal::new(1 << 20);
        j.on_client_message(b'Q', &query("BEGIN"));
        answer(&mut j, b"BEGIN", b'T');
        j.on_client_message(b'Q', &query("SET application_name = 'x'"));
        answer(&mut j, b"SET", b'T');
        assert!(j.txn_may_write() && !j.txn_may_write_data());
        assert_eq!(
            j.on_client_message(b'Q', &query("COMMIT")),
            Before::Forward,
            "nothing to look up after a failover: it is replayed"
        );
        answer(&mut j, b"COMMIT", b'I');
        assert!(!j.txn_may_write() && !j.txn_may_write_data());
        j.on_client_message(b'Q', &query("BEGIN"));
        answer(&mut j, b"BEGIN", b'T');
        j.on_client_message(b'Q', &query("SET a.b = 1; UPDATE t SET a = 1"));
        answer(&mut j, b"UPDATE 1", b'T');
        assert!(j.txn_may_write_data());
        assert_eq!(
            j.on_client_message(b'Q', &query("COMMIT")),
            Before::CaptureXid
        );
    }

    #[test]
    fn hazards_are_recorded() {
        let mut j = Journal::new(1 << 20);
        j.on_client_message(b'Q', &query("CREATE TEMP TABLE x (a int)"));
        assert_eq!(j.unmovable(), Some("a temporary table"));
    }

    fn raw_query(sql: &[u8]) -> Vec<u8> {
        let mut b = sql.to_vec();
        b.push(0);
        msg(b'Q', &b)
    }

    #[test]
    fn backslash_bytes_inside_characters_and_escaping_strings_are_read_as_the_server_does() {
        // SJIS 表 is 0x95 0x5C: its second byte is a backslash, which must not escape the quote.
        let sql = b"SELECT E'\x95\x5c' AS k; INSERT INTO t VALUES (1, '\x95\x5c')";
        let writes = |j: &mut Journal| {
            j.on_client_message(b'Q', &query("BEGIN"));
            answer(j, b"BEGIN", b'T');
            j.on_client_message(b'Q', &raw_query(sql));
            answer(j, b"INSERT 0 1", b'T');
            let wrote = j.txn_may_write();
            j.on_client_message(b'Q', &query("ROLLBACK"));
            answer(j, b"ROLLBACK", b'I');
            wrote
        };
        let mut j = Journal::new(1 << 20);
        j.on_parameter_status("client_encoding", "SJIS");
        assert!(writes(&mut j), "the INSERT after E'表' is seen");
        // Half-width kana stand alone: the quote after one is a quote.
        j.on_client_message(b'Q', &raw_query(b"SELECT '\xb1'; INSERT INTO t VALUES (2)"));
        assert!(j.groups()[0].may_write);
        answer(&mut j, b"INSERT 0 1", b'I');
        for (encoding, bytes) in [
            ("BIG5", &b"\xa5\x5c"[..]),
            ("GBK", b"\x81\x5c"),
            ("GB18030", b"\x81\x30\x81\x30\x81\x5c"),
            ("JOHAB", b"\x88\x5c"),
        ] {
            j.on_parameter_status("client_encoding", encoding);
            let mut sql = b"SELECT E'".to_vec();
            sql.extend_from_slice(bytes);
            sql.extend_from_slice(b"'; DELETE FROM t");
            j.on_client_message(b'Q', &raw_query(&sql));
            assert!(j.groups()[0].may_write, "{encoding}");
            answer(&mut j, b"DELETE 1", b'I');
        }
        // With standard_conforming_strings off, '\'' does not end a literal.
        j.on_parameter_status("client_encoding", "UTF8");
        j.on_parameter_status("standard_conforming_strings", "off");
        j.on_client_message(b'Q', &query(r"SELECT 'it\'s'; DELETE FROM t"));
        assert!(j.groups()[0].may_write);
        answer(&mut j, b"DELETE 1", b'I');
    }

    #[test]
    fn text_in_other_client_encodings_is_still_classified() {
        // 'café' in LATIN1: not UTF-8, still a write, inside a block and in autocommit.
        let mut j = Journal::new(1 << 20);
        j.on_client_message(b'Q', &query("BEGIN"));
        answer(&mut j, b"BEGIN", b'T');
        assert_eq!(
            j.on_client_message(b'Q', &raw_query(b"INSERT INTO t VALUES ('caf\xe9')")),
            Before::CaptureXidAfter
        );
        answer(&mut j, b"INSERT 0 1", b'T');
        assert!(j.txn_may_write());
        j.on_client_message(b'Q', &query("COMMIT"));
        answer(&mut j, b"COMMIT", b'I');
        assert_eq!(
            j.on_client_message(b'Q', &raw_query(b"UPDATE t SET a = '\xe9'")),
            Before::QueryAsBatch
        );
        answer(&mut j, b"UPDATE 1", b'I');
        assert_eq!(j.unmovable(), None);
        // Its session state could not be given back as sent: the session stays put.
        j.on_client_message(b'Q', &raw_query(b"SET application_name = 'caf\xe9'"));
        answer(&mut j, b"SET", b'I');
        assert_eq!(j.unmovable(), Some(NOT_UTF8));
    }

    #[test]
    fn session_state_in_non_ascii_text_moves_only_in_utf8() {
        // 0xC3 0xA9 is 'é' in UTF-8 and "Ã©" in LATIN1: only in UTF-8 can the gateway vouch
        // for what a restore would set.
        let set = raw_query(b"SET application_name = 'caf\xc3\xa9'");
        let mut j = Journal::new(1 << 20);
        j.on_parameter_status("client_encoding", "UTF8");
        j.on_client_message(b'Q', &set);
        answer(&mut j, b"SET", b'I');
        assert_eq!(j.unmovable(), None);
        j.on_client_message(b'Q', &query("SET client_encoding = 'LATIN1'"));
        answer(&mut j, b"SET", b'I');
        j.on_parameter_status("client_encoding", "LATIN1");
        j.on_client_message(b'Q', &query("SET application_name = 'ascii'"));
        answer(&mut j, b"SET", b'I');
        assert_eq!(
            j.unmovable(),
            None,
            "ASCII reads the same in every encoding"
        );
        j.on_client_message(b'Q', &set);
        answer(&mut j, b"SET", b'I');
        assert_eq!(j.unmovable(), Some(NOT_UTF8));
    }

    #[test]
    fn statement_names_in_other_encodings_stay_apart() {
        let mut j = Journal::new(1 << 20);
        j.on_client_message(b'P', &msg(b'P', b"\xe9\0UPDATE t SET a = 1\0\0\0"));
        j.on_client_message(b'P', &msg(b'P', b"\xe8\0SELECT 1\0\0\0"));
        j.on_client_message(b'P', &msg(b'P', b"\0SELECT 2\0\0\0"));
        j.on_client_message(b'S', &msg(b'S', b""));
        answer(&mut j, b"", b'I');
        j.on_client_message(b'B', &msg(b'B', b"\0\xe9\0\0\0\0\0\0\0"));
        j.on_client_message(b'E', &msg(b'E', b"\0\0\0\0\0"));
        j.on_client_message(b'S', &msg(b'S', b""));
        assert!(
            j.may_have_written(),
            "the UPDATE under a LATIN1 name writes"
        );
        answer(&mut j, b"UPDATE 1", b'I');
        j.on_client_message(b'B', &msg(b'B', b"\0\xe8\0\0\0\0\0\0\0"));
        j.on_client_message(b'S', &msg(b'S', b""));
        assert!(
            !j.may_have_written(),
            "the SELECT under another one does not"
        );
    }
}
