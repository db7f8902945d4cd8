//! What a SQL string does, told from its leading keywords.
//!
//! A lexer skips whitespace, comments and quoted text and reads the first keywords of each
//! statement — a few hundred nanoseconds for a typical query. sqlparser (PostgreSQL dialect) is
//! consulted only for SET, to learn the variable's name; it fails on some valid PostgreSQL, so a
//! parse failure falls back to the conservative answer, never to an error.

use std::collections::HashSet;

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use crate::read_only_calls::READ_ONLY_CALLS;

/// What one statement does to the session and its transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Statement {
    /// Nothing but whitespace and comments.
    Empty,
    /// BEGIN / START TRANSACTION.
    Begin,
    /// COMMIT / END.
    Commit,
    /// ROLLBACK / ABORT (not ROLLBACK TO).
    Rollback,
    /// SAVEPOINT, RELEASE, ROLLBACK TO: replayable inside the transaction.
    Savepoint,
    /// Reads only (SELECT without locking or writing CTEs, SHOW, VALUES, TABLE, EXPLAIN,
    /// COPY … TO STDOUT of a table or such a query).
    Read,
    /// Anything that may write or whose effect is unknown.
    Write,
    /// Changes session state that a new backend must be given again.
    Session(SessionChange),
    /// Transaction-scoped settings (SET LOCAL, SET TRANSACTION, SET CONSTRAINTS).
    TransactionSetting,
    /// Maintenance that changes nothing a client reads (VACUUM, ANALYZE, CHECKPOINT): lost
    /// with a primary or run twice, it does no harm.
    Maintenance,
}

/// A session-state change, restorable by running the statement again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionChange {
    /// SET of a session variable (lower-cased name when sqlparser could tell it).
    Set(Option<String>),
    /// RESET of a variable, or RESET ALL (`None`).
    Reset(Option<String>),
    /// DISCARD ALL / PLANS / SEQUENCES / TEMP.
    Discard,
    /// SQL-level PREPARE.
    Prepare(String),
    /// DEALLOCATE of one statement, or ALL (`None`).
    Deallocate(Option<String>),
    /// LISTEN.
    Listen(String),
    /// UNLISTEN of one channel, or `*` (`None`).
    Unlisten(Option<String>),
}

/// Why replaying or moving would not give the client the same session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hazard {
    /// State tied to this backend that no statement can restore: the session cannot move.
    Unmovable(&'static str),
    /// Effects outside the database: the transaction must not be replayed.
    Unreplayable(&'static str),
}

/// Classification of a whole query string (which may hold several statements).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Classified {
    /// Each statement, in order.
    pub statements: Vec<Statement>,
    /// Hazards found anywhere in the string.
    pub hazards: Vec<Hazard>,
    /// Whether a statement is COPY … FROM STDIN: the client's data follows the query.
    pub copies: bool,
    /// Whether a statement is ROLLBACK TO SAVEPOINT, which undoes the transaction's settings
    /// since that savepoint.
    pub rolls_back_to: bool,
    /// Whether a COMMIT is `COMMIT AND CHAIN`, which opens the next transaction at once.
    pub chains: bool,
    /// Byte range in the query string of each [`Statement::Session`] statement, in order: the
    /// text a new backend is given to restore it.
    pub session_spans: Vec<std::ops::Range<usize>>,
    /// Whether every statement runs the same inside a transaction block as alone: a query or
    /// a data change (SELECT, INSERT, UPDATE, DELETE, MERGE and their WITH, VALUES, TABLE and
    /// EXPLAIN forms, TRUNCATE, COPY), or a schema or privilege change PostgreSQL does not
    /// refuse there (CREATE, ALTER, DROP, COMMENT, GRANT, REVOKE, REFRESH; not CONCURRENTLY,
    /// nor of a database, tablespace, subscription or the system); none a VACUUM, CALL or
    /// LOCK.
    pub block_safe: bool,
    /// Whether every statement is an INSERT, UPDATE, DELETE or MERGE (not in a WITH form):
    /// statements whose RETURNING rows, RowDescription first, are sent once they have run.
    pub changes_only: bool,
    /// Whether a statement may make a new [`Suspects`] entry: a CREATE of anything but a
    /// table, index or sequence, an ALTER, a DO block.
    pub changes_catalog: bool,
    /// Whether the text ends inside a string, quoted identifier, dollar quote or block
    /// comment, which would take in anything appended to it.
    pub ends_open: bool,
    /// Whether a statement begins, ends or prepares a transaction, finishes a prepared one,
    /// or sets or undoes to a savepoint.
    pub controls_transaction: bool,
    /// Where the last statement that is not empty starts: right after the semicolon before
    /// it (0 for the first).
    pub last_start: usize,
}

impl Classified {
    /// Whether any statement may write, counting session-state changes.
    pub fn may_write(&self) -> bool {
        self.statements
            .iter()
            .any(|s| matches!(s, Statement::Write | Statement::Session(_)))
    }

    /// Whether any statement may write data, which outlives the backend (session-state
    /// changes do not: a new backend has none of them until they are run again).
    pub fn may_write_data(&self) -> bool {
        self.statements.contains(&Statement::Write)
    }

    /// How many statements the server runs (and completes) for the string: all but the empty.
    pub fn statement_count(&self) -> usize {
        self.statements
            .iter()
            .filter(|s| **s != Statement::Empty)
            .count()
    }

    /// Whether the string ends a transaction block.
    pub fn ends_transaction(&self) -> bool {
        self.statements
            .iter()
            .any(|s| matches!(s, Statement::Commit | Statement::Rollback))
    }
}

/// Classifies every statement of `sql`.
pub fn classify(sql: &str) -> Classified {
    let mut out = Classified::default();
    classify_into(
        sql.as_bytes(),
        Strings::Standard,
        &Suspects::default(),
        &mut out,
    );
    out
}

/// Names whose mention may make a statement write though its text does not show it, learned
/// from the catalog of the session's database: relations whose reading runs a function that
/// may write (a view over one, a table whose row-level security policy calls one), and
/// functions of the user's named like read-only built-ins (`public.abs(text)`, called as
/// `abs(…)`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Suspects {
    /// Relation names, exactly as in the catalog.
    relations: HashSet<Box<[u8]>>,
    /// Function names, exactly as in the catalog.
    calls: HashSet<Box<[u8]>>,
}

impl Suspects {
    /// Suspects from the catalog's names of relations and functions.
    pub fn new(
        relations: impl IntoIterator<Item = String>,
        calls: impl IntoIterator<Item = String>,
    ) -> Self {
        let names = |n: String| n.into_bytes().into_boxed_slice();
        Self {
            relations: relations.into_iter().map(names).collect(),
            calls: calls.into_iter().map(names).collect(),
        }
    }

    /// Whether there are none (the common case: nothing to look words up in).
    pub fn is_empty(&self) -> bool {
        self.relations.is_empty() && self.calls.is_empty()
    }

    /// How many names there are.
    pub fn len(&self) -> usize {
        self.relations.len() + self.calls.len()
    }

    /// The relation names and the function names, each sorted.
    pub fn names(&self) -> (Vec<String>, Vec<String>) {
        let sorted = |names: &HashSet<Box<[u8]>>| {
            let mut v: Vec<String> = names
                .iter()
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .collect();
            v.sort_unstable();
            v
        };
        (sorted(&self.relations), sorted(&self.calls))
    }

    /// Whether `word`, as written (`quoted` or not), names a suspect relation.
    fn names_relation(&self, word: &[u8], quoted: bool) -> bool {
        !self.relations.is_empty() && Self::holds(&self.relations, word, quoted)
    }

    /// Whether `word`, as written, names a suspect function.
    fn names_call(&self, word: &[u8], quoted: bool) -> bool {
        !self.calls.is_empty() && Self::holds(&self.calls, word, quoted)
    }

    /// Whether `names` holds the identifier `word`: as it is when quoted, else folded to lower
    /// case, as PostgreSQL folds it; longer than 63 bytes, cut as PostgreSQL cuts it.
    fn holds(names: &HashSet<Box<[u8]>>, word: &[u8], quoted: bool) -> bool {
        let word = &word[..word.len().min(63)];
        if quoted {
            return names.contains(word);
        }
        let mut lower = [0u8; 63];
        let lower = &mut lower[..word.len()];
        for (l, c) in lower.iter_mut().zip(word) {
            *l = c.to_ascii_lowercase();
        }
        names.contains(&*lower)
    }
}

/// How `'…'` string literals read: PostgreSQL's `standard_conforming_strings`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Strings {
    /// `on`, the default: a backslash is an ordinary character (only `E'…'` has escapes).
    #[default]
    Standard,
    /// `off`: backslashes escape in every string, `\'` included.
    BackslashEscapes,
}

/// A word of up to 16 bytes as one number, upper-cased, so that telling which keyword it is
/// takes one comparison per candidate instead of a byte-string compare; 0 for longer words.
const fn key(word: &[u8]) -> u128 {
    if word.len() > 16 {
        return 0;
    }
    let mut k = 0u128;
    let mut i = 0;
    while i < word.len() {
        k = k << 8 | word[i].to_ascii_uppercase() as u128;
        i += 1;
    }
    k
}

/// The keywords a statement may start with that [`classify_into`] tells apart.
mod kw {
    use super::key;
    pub const ABORT: u128 = key(b"ABORT");
    pub const ALTER: u128 = key(b"ALTER");
    pub const ANALYSE: u128 = key(b"ANALYSE");
    pub const ANALYZE: u128 = key(b"ANALYZE");
    pub const BEGIN: u128 = key(b"BEGIN");
    pub const CHECKPOINT: u128 = key(b"CHECKPOINT");
    pub const COMMENT: u128 = key(b"COMMENT");
    pub const COMMIT: u128 = key(b"COMMIT");
    pub const COPY: u128 = key(b"COPY");
    pub const CREATE: u128 = key(b"CREATE");
    pub const DEALLOCATE: u128 = key(b"DEALLOCATE");
    pub const DECLARE: u128 = key(b"DECLARE");
    pub const DELETE: u128 = key(b"DELETE");
    pub const DISCARD: u128 = key(b"DISCARD");
    pub const DO: u128 = key(b"DO");
    pub const DROP: u128 = key(b"DROP");
    pub const END: u128 = key(b"END");
    pub const EXPLAIN: u128 = key(b"EXPLAIN");
    pub const FETCH: u128 = key(b"FETCH");
    pub const GRANT: u128 = key(b"GRANT");
    pub const INSERT: u128 = key(b"INSERT");
    pub const LISTEN: u128 = key(b"LISTEN");
    pub const MERGE: u128 = key(b"MERGE");
    pub const MOVE: u128 = key(b"MOVE");
    pub const PREPARE: u128 = key(b"PREPARE");
    pub const REFRESH: u128 = key(b"REFRESH");
    pub const RELEASE: u128 = key(b"RELEASE");
    pub const RESET: u128 = key(b"RESET");
    pub const REVOKE: u128 = key(b"REVOKE");
    pub const ROLLBACK: u128 = key(b"ROLLBACK");
    pub const SAVEPOINT: u128 = key(b"SAVEPOINT");
    pub const SELECT: u128 = key(b"SELECT");
    pub const SET: u128 = key(b"SET");
    pub const SHOW: u128 = key(b"SHOW");
    pub const START: u128 = key(b"START");
    pub const TABLE: u128 = key(b"TABLE");
    pub const TRUNCATE: u128 = key(b"TRUNCATE");
    pub const UNLISTEN: u128 = key(b"UNLISTEN");
    pub const UPDATE: u128 = key(b"UPDATE");
    pub const VACUUM: u128 = key(b"VACUUM");
    pub const VALUES: u128 = key(b"VALUES");
    pub const WITH: u128 = key(b"WITH");
}

/// Classifies every statement of `sql` (in the client's encoding, with the bytes of multi-byte
/// characters that may end in ASCII masked) into `out`, reusing its buffers.
pub fn classify_into(sql: &[u8], strings: Strings, suspects: &Suspects, out: &mut Classified) {
    out.statements.clear();
    out.hazards.clear();
    out.copies = false;
    out.rolls_back_to = false;
    out.chains = false;
    out.session_spans.clear();
    out.block_safe = true;
    out.changes_only = true;
    out.changes_catalog = false;
    out.ends_open = false;
    out.controls_transaction = false;
    out.last_start = 0;
    let mut lex = Lexer::new(sql);
    lex.backslash_strings = strings == Strings::BackslashEscapes;
    lex.suspects = (!suspects.is_empty()).then_some(suspects);
    while lex.pos < sql.len() {
        let start = lex.pos;
        let facts = Facts::scan(&mut lex);
        let stmt = &sql[start..facts.end];
        let w = |i: usize| facts.lead[i];
        let is = |i: usize, k: &str| w(i).eq_ignore_ascii_case(k.as_bytes());
        if w(0).is_empty() {
            continue;
        }
        out.last_start = start;
        let keyword = facts.keyword;
        // COPY of a table calls nothing: a word before parentheses there is the table, with
        // its column list, or an option list.
        let calls = facts.calls && (keyword != kw::COPY || w(1).is_empty());
        let statement = match keyword {
            kw::BEGIN | kw::START => Statement::Begin,
            kw::COMMIT | kw::END if is(1, "PREPARED") => {
                out.hazards.push(Hazard::Unreplayable("two-phase commit"));
                out.controls_transaction = true;
                Statement::Write
            }
            kw::COMMIT | kw::END => {
                out.chains |= is(1, "AND") && is(2, "CHAIN") || is(2, "AND") && is(3, "CHAIN");
                Statement::Commit
            }
            kw::ROLLBACK | kw::ABORT if is(1, "TO") || is(2, "TO") => {
                out.rolls_back_to = true;
                Statement::Savepoint
            }
            kw::ROLLBACK if is(1, "PREPARED") => {
                out.hazards.push(Hazard::Unreplayable("two-phase commit"));
                out.controls_transaction = true;
                Statement::Write
            }
            kw::ROLLBACK | kw::ABORT => Statement::Rollback,
            kw::SAVEPOINT | kw::RELEASE => Statement::Savepoint,
            kw::SELECT
            | kw::WITH
            | kw::VALUES
            | kw::TABLE
            | kw::SHOW
            | kw::EXPLAIN
            | kw::FETCH
            | kw::MOVE => {
                if facts.writes || calls {
                    Statement::Write
                } else {
                    Statement::Read
                }
            }
            kw::SET if is(1, "LOCAL") || is(1, "TRANSACTION") || is(1, "CONSTRAINTS") => {
                Statement::TransactionSetting
            }
            kw::SET => Statement::Session(SessionChange::Set(set_variable(stmt))),
            kw::RESET => {
                Statement::Session(SessionChange::Reset(if is(1, "ALL") || w(1).is_empty() {
                    None
                } else {
                    Some(name_after(stmt, 1))
                }))
            }
            kw::DISCARD => Statement::Session(SessionChange::Discard),
            kw::PREPARE if is(1, "TRANSACTION") => {
                out.hazards.push(Hazard::Unreplayable("two-phase commit"));
                out.controls_transaction = true;
                Statement::Write
            }
            kw::PREPARE => Statement::Session(SessionChange::Prepare(name_after(stmt, 1))),
            kw::DEALLOCATE => {
                let skip = if is(1, "PREPARE") { 2 } else { 1 };
                Statement::Session(SessionChange::Deallocate(
                    if is(skip, "ALL") || w(skip).is_empty() {
                        None
                    } else {
                        Some(name_after(stmt, skip))
                    },
                ))
            }
            kw::LISTEN => Statement::Session(SessionChange::Listen(name_after(stmt, 1))),
            kw::UNLISTEN => Statement::Session(SessionChange::Unlisten(
                if w(1) == b"*" || w(1).is_empty() {
                    None
                } else {
                    Some(name_after(stmt, 1))
                },
            )),
            kw::DECLARE => {
                if facts.with_hold {
                    out.hazards
                        .push(Hazard::Unmovable("a cursor declared WITH HOLD"));
                }
                // The cursor's query runs as it is fetched: a FETCH does what it does.
                match cursor_query(stmt) {
                    Some(query) if reads_only(query, strings, suspects) => Statement::Read,
                    _ => Statement::Write,
                }
            }
            kw::COPY if facts.to_stdout && !facts.writes && !calls && !facts.from_stdin => {
                Statement::Read
            }
            kw::VACUUM | kw::ANALYZE | kw::ANALYSE | kw::CHECKPOINT => Statement::Maintenance,
            _ => Statement::Write,
        };
        out.controls_transaction |= matches!(
            statement,
            Statement::Begin | Statement::Commit | Statement::Rollback | Statement::Savepoint
        );
        let copy = keyword == kw::COPY;
        out.copies |= copy && facts.from_stdin;
        out.block_safe &= match keyword {
            kw::SELECT
            | kw::WITH
            | kw::VALUES
            | kw::TABLE
            | kw::EXPLAIN
            | kw::INSERT
            | kw::UPDATE
            | kw::DELETE
            | kw::MERGE
            | kw::TRUNCATE
            | kw::COPY
            | kw::COMMENT
            | kw::GRANT
            | kw::REVOKE
            | kw::REFRESH => true,
            // What PostgreSQL refuses in a block: CREATE INDEX CONCURRENTLY and the like,
            // CREATE DATABASE, ALTER SYSTEM …
            kw::CREATE | kw::ALTER | kw::DROP => {
                !facts.concurrently
                    && !(1..4).any(|i| {
                        is(i, "DATABASE")
                            || is(i, "TABLESPACE")
                            || is(i, "SUBSCRIPTION")
                            || is(i, "SYSTEM")
                    })
            }
            _ => false,
        };
        out.changes_only &= matches!(keyword, kw::INSERT | kw::UPDATE | kw::DELETE | kw::MERGE);
        out.changes_catalog |= match keyword {
            kw::ALTER | kw::DO => true,
            kw::CREATE => !(1..4).any(|i| is(i, "TABLE") || is(i, "INDEX") || is(i, "SEQUENCE")),
            _ => false,
        };
        // A temporary table dropped at commit lives and dies with the transaction, which a
        // replay makes again.
        if keyword == kw::CREATE && facts.temp && !facts.on_commit_drop || facts.into_temp {
            out.hazards.push(Hazard::Unmovable("a temporary table"));
        }
        if keyword == kw::DO {
            out.hazards.push(Hazard::Unmovable(
                "a DO block (what it changed in the session cannot be followed)",
            ));
        }
        if facts.set_config {
            out.hazards
                .push(Hazard::Unmovable("a setting changed with set_config()"));
        }
        if facts.advisory_lock {
            out.hazards
                .push(Hazard::Unmovable("a session-level advisory lock"));
        }
        if facts.dblink {
            out.hazards
                .push(Hazard::Unreplayable("dblink acts on another server"));
        }
        if copy && facts.program {
            out.hazards
                .push(Hazard::Unreplayable("COPY with an external program"));
        }
        if matches!(statement, Statement::Session(_)) {
            out.session_spans.push(start..facts.end);
        }
        out.statements.push(statement);
    }
    out.ends_open = lex.open_at_end;
    out.hazards.dedup();
}

/// What one pass over a statement's tokens finds, without allocating.
#[derive(Default)]
struct Facts<'a> {
    /// The first four tokens (words as written, `*` for a star, empty for anything else).
    lead: [&'a [u8]; 4],
    /// The first token as a [`key`].
    keyword: u128,
    /// Where the statement's text ends (before its semicolon, if any).
    end: usize,
    /// A word or function that writes or locks: a SELECT with it is no read.
    writes: bool,
    /// A call of a function not known to be read-only (a user's function may write): a
    /// SELECT with one is no read either.
    calls: bool,
    /// A call of `set_config`, which changes a setting the journal cannot follow.
    set_config: bool,
    temp: bool,
    /// `ON COMMIT DROP`.
    on_commit_drop: bool,
    into_temp: bool,
    with_hold: bool,
    program: bool,
    advisory_lock: bool,
    dblink: bool,
    /// The word CONCURRENTLY, which PostgreSQL refuses in a transaction block.
    concurrently: bool,
    from_stdin: bool,
    to_stdout: bool,
}

impl<'a> Facts<'a> {
    /// Reads one statement from `lex`, up to and including its semicolon: its first tokens
    /// exactly, then only the words of the rest.
    fn scan(lex: &mut Lexer<'a>) -> Self {
        let mut f = Facts {
            end: lex.src.len(),
            ..Facts::default()
        };
        let mut prev: &[u8] = b"";
        // Calls matter only where they may turn a read into a write.
        let mut calls = false;
        for n in 0..f.lead.len() {
            let Some(tok) = lex.next_token() else {
                return f;
            };
            let word = match tok {
                Token::Word(w) => w,
                Token::Other(b'*') => b"*",
                Token::Semicolon => {
                    f.end = lex.pos - 1;
                    return f;
                }
                _ => b"",
            };
            f.lead[n] = word;
            if n == 0 {
                f.keyword = key(word);
                calls = may_read(f.keyword);
            } else if let Token::Quoted(q) = tok {
                f.note_quoted(q, lex, calls);
            }
            if word.is_empty() || word == b"*" {
                prev = b"";
                continue;
            }
            f.note(word, prev, lex);
            // The statement's own keyword is no call (`COPY (`, `EXPLAIN (`).
            if n > 0 && calls && lex.before_paren() {
                f.note_call(word, lex);
            }
            prev = word;
        }
        while let Some(skimmed) = lex.skim() {
            match skimmed {
                Skimmed::Word { word, adjacent } => {
                    f.note(word, if adjacent { prev } else { b"" }, lex);
                    if calls && lex.before_paren() {
                        f.note_call(word, lex);
                    }
                    prev = word;
                }
                Skimmed::Quoted { name } => f.note_quoted(name, lex, calls),
                Skimmed::Semicolon => {
                    f.end = lex.pos - 1;
                    break;
                }
            }
        }
        f
    }

    /// Notes a double-quoted identifier `name` that `lex` has just read: `"pg_temp"` as the
    /// temporary schema, and a call `"f"(…)` as the same call unquoted would be (a quoted name
    /// is exact, so this can only find more than there is), which in a statement that `calls`
    /// may write.
    fn note_quoted(&mut self, name: &[u8], lex: &Lexer, calls: bool) {
        self.temp |= name == b"pg_temp";
        let call = lex.before_paren();
        if let Some(suspects) = lex.suspects {
            self.writes |= !call && suspects.names_relation(name, true);
        }
        if call && !name.is_empty() {
            self.note(name, b"", lex);
            // Exact: `"SET_CONFIG"(…)` is some other function.
            self.calls |= calls && !(name == b"set_config" && lex.call_ends_in_true());
        }
    }

    /// Notes a call of `word(`: a keyword that takes parentheses, a type modifier, a
    /// read-only built-in function or a setting made for the transaction only is no write;
    /// anything else may be.
    #[inline(always)]
    fn note_call(&mut self, word: &[u8], lex: &Lexer) {
        let read_only =
            takes_parentheses(word) && !lex.suspects.is_some_and(|s| s.names_call(word, false));
        self.calls |= !read_only && !local_set_config(word, lex);
    }

    /// Notes what `word` (after `prev`, `lex` just past it) tells; dispatching on the first
    /// letter keeps the common case, a word that is none of these, to one comparison.
    #[inline(always)]
    fn note(&mut self, word: &[u8], prev: &[u8], lex: &Lexer) {
        if let Some(suspects) = lex.suspects {
            self.writes |= suspects.names_relation(word, false);
        }
        let is = |k: &str| word.eq_ignore_ascii_case(k.as_bytes());
        let starts =
            |k: &str| word.len() >= k.len() && word[..k.len()].eq_ignore_ascii_case(k.as_bytes());
        match word[0].to_ascii_lowercase() {
            b'c' => self.concurrently |= is("CONCURRENTLY"),
            b'd' => {
                self.writes |= is("DELETE");
                self.on_commit_drop |= is("DROP") && prev.eq_ignore_ascii_case(b"COMMIT");
                self.dblink |= starts("dblink");
            }
            b'f' => self.writes |= is("FOR"),
            b'h' => self.with_hold |= is("HOLD") && prev.eq_ignore_ascii_case(b"WITH"),
            b'i' => self.writes |= is("INSERT") || is("INTO"),
            b'l' => {
                self.writes |= ["lo_import", "lo_export", "lo_create", "lo_unlink", "lo_put"]
                    .iter()
                    .any(|k| is(k))
            }
            b'm' => self.writes |= is("MERGE"),
            b'n' => self.writes |= is("nextval"),
            b'p' => {
                self.program |= is("PROGRAM");
                // `CREATE TABLE pg_temp.t` is as temporary as `CREATE TEMP TABLE t`.
                self.temp |= is("pg_temp");
                if starts("pg_") {
                    self.writes |=
                        is("pg_notify") || is("pg_current_xact_id") || starts("pg_advisory");
                    self.advisory_lock |=
                        starts("pg_advisory_lock") || starts("pg_try_advisory_lock");
                }
            }
            b's' => {
                self.writes |= is("setval");
                self.set_config |= is("set_config") && !local_set_config(word, lex);
                self.from_stdin |= is("STDIN") && prev.eq_ignore_ascii_case(b"FROM");
                self.to_stdout |= is("STDOUT") && prev.eq_ignore_ascii_case(b"TO");
            }
            b't' => {
                self.writes |= is("txid_current");
                if is("TEMP") || is("TEMPORARY") {
                    self.temp = true;
                    self.into_temp |= prev.eq_ignore_ascii_case(b"INTO");
                }
            }
            b'u' => self.writes |= is("UPDATE"),
            _ => {}
        }
    }
}

/// Whether `word` is a `set_config` call, `lex` just past the name, that makes its setting
/// for the transaction only (`set_config(name, value, true)`, what PostgREST sends for every
/// request): that lasts as a `SET LOCAL` does, so a replay of the transaction makes it again
/// and nothing of it outlives the transaction. Any other form may change the session.
fn local_set_config(word: &[u8], lex: &Lexer) -> bool {
    word.eq_ignore_ascii_case(b"set_config") && lex.call_ends_in_true()
}

/// The query of `DECLARE name … CURSOR … FOR query`: the text after its first `FOR`.
fn cursor_query(stmt: &[u8]) -> Option<&[u8]> {
    let mut lex = Lexer::new(stmt);
    while let Some(tok) = lex.next_token() {
        if matches!(tok, Token::Word(w) if w.eq_ignore_ascii_case(b"FOR")) {
            return Some(&stmt[lex.pos..]);
        }
    }
    None
}

/// Whether `sql` is one statement that reads only.
fn reads_only(sql: &[u8], strings: Strings, suspects: &Suspects) -> bool {
    let mut query = Classified::default();
    classify_into(sql, strings, suspects, &mut query);
    query.statements == [Statement::Read]
}

/// The variable a session-level SET assigns, via sqlparser; `None` when it cannot tell.
fn set_variable(stmt: &[u8]) -> Option<String> {
    let stmt = std::str::from_utf8(stmt).ok()?;
    let parsed = Parser::parse_sql(&PostgreSqlDialect {}, stmt).ok()?;
    let [sqlparser::ast::Statement::Set(set)] = parsed.as_slice() else {
        return None;
    };
    match set {
        sqlparser::ast::Set::SingleAssignment { variable, .. } => {
            Some(variable.to_string().to_ascii_lowercase())
        }
        _ => None,
    }
}

/// The identifier after the first `skip` words: a bare word lower-cased, a quoted one as is.
fn name_after(stmt: &[u8], skip: usize) -> String {
    let mut lex = Lexer::new(stmt);
    let mut seen = 0;
    while let Some(tok) = lex.next_token() {
        match tok {
            Token::Word(w) if seen == skip => {
                return String::from_utf8_lossy(w).to_ascii_lowercase();
            }
            Token::Quoted(q) if seen == skip => return String::from_utf8_lossy(q).into_owned(),
            Token::Word(_) => seen += 1,
            _ => return String::new(),
        }
    }
    String::new()
}

#[derive(Debug, PartialEq, Eq)]
enum Token<'a> {
    Word(&'a [u8]),
    /// A double-quoted identifier's content.
    Quoted(&'a [u8]),
    Semicolon,
    Other(u8),
}

/// What [`Lexer::skim`] stops at.
enum Skimmed<'a> {
    /// A word; `adjacent` when only whitespace and comments separate it from the token before.
    Word {
        word: &'a [u8],
        adjacent: bool,
    },
    /// A quoted identifier that is a function called (`"f"(…)`) or the temporary schema (any,
    /// where the session has [`Suspects`]).
    Quoted {
        /// Its content.
        name: &'a [u8],
    },
    Semicolon,
}

/// What a [`SPECIAL`] byte turned out to start.
enum Special<'a> {
    /// A comment, skipped.
    Comment,
    Semicolon,
    /// A string or dollar-quoted literal, skipped.
    Literal,
    /// A double-quoted identifier's content.
    Quoted(&'a [u8]),
    /// A byte that is a token by itself.
    Other(u8),
}

const SPACE: u8 = 1;
const WORD: u8 = 2;
const DIGIT: u8 = 4;
const DOLLAR: u8 = 8;
/// A byte that may start a literal, a quoted identifier, a comment or the statement's end.
const SPECIAL: u8 = 16;

/// What each byte can be in a token: whitespace, the start of a word (a letter, `_`, or any
/// byte of a non-ASCII character), a digit, `$` (inside a word or a parameter), or special.
const CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        t[i] = if matches!(c, b' ' | b'\t' | b'\n' | b'\r' | b'\x0c') {
            SPACE
        } else if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
            WORD
        } else if c.is_ascii_digit() {
            DIGIT
        } else if c == b'$' {
            DOLLAR | SPECIAL
        } else if matches!(c, b'\'' | b'"' | b'-' | b'/' | b';') {
            SPECIAL
        } else {
            0
        };
        i += 1;
    }
    t
};

/// The first position at or after `from` whose byte is in none of the classes `mask`.
fn skip_while(bytes: &[u8], from: usize, mask: u8) -> usize {
    bytes[from..]
        .iter()
        .position(|&c| CLASS[usize::from(c)] & mask == 0)
        .map_or(bytes.len(), |p| from + p)
}

/// Skips whitespace, `--` and nested `/* */` comments, and string literals ('…', E'…', $tag$…$tag$).
///
/// It reads bytes in the client's encoding: every byte of a non-ASCII character counts as a
/// letter, which holds in UTF-8, the single-byte encodings and EUC, whose multi-byte
/// characters have no ASCII bytes. For the client-only encodings whose characters may end in
/// an ASCII byte (SJIS, BIG5, …) the journal hands over a copy in which those bytes are masked.
struct Lexer<'a> {
    src: &'a [u8],
    pos: usize,
    /// Whether backslashes escape in `'…'` too (see [`Strings`]).
    backslash_strings: bool,
    /// The session's suspects, if it has any: then every quoted identifier is looked at.
    suspects: Option<&'a Suspects>,
    /// Whether a literal, quoted identifier or block comment ran to the end of the text.
    open_at_end: bool,
}

impl<'a> Lexer<'a> {
    fn new(src: &'a [u8]) -> Self {
        Self {
            src,
            pos: 0,
            backslash_strings: false,
            suspects: None,
            open_at_end: false,
        }
    }

    fn rest(&self) -> &'a [u8] {
        &self.src[self.pos..]
    }

    /// Reads the word that starts at `pos`; `None` (and the literal skipped) if it is the `E`
    /// of an `E'…'` string instead.
    #[inline(always)]
    fn word(&mut self) -> Option<&'a [u8]> {
        let start = self.pos;
        self.pos = skip_while(self.src, start + 1, WORD | DIGIT | DOLLAR);
        if self.pos == start + 1
            && matches!(self.src[start], b'E' | b'e')
            && self.src.get(self.pos) == Some(&b'\'')
        {
            self.skip_string(true);
            return None;
        }
        Some(&self.src[start..self.pos])
    }

    /// Handles a [`SPECIAL`] byte at `pos`: skips the comment, literal or quoted identifier
    /// it starts (`Skip`), or says it is a token of its own.
    #[inline(always)]
    fn special(&mut self) -> Special<'a> {
        let b = self.src[self.pos];
        match b {
            b'-' if self.rest().starts_with(b"--") => {
                let end = self.rest().iter().position(|&c| c == b'\n');
                self.pos = end.map_or(self.src.len(), |e| self.pos + e + 1);
                Special::Comment
            }
            b'/' if self.rest().starts_with(b"/*") => {
                self.skip_block_comment();
                Special::Comment
            }
            b';' => {
                self.pos += 1;
                Special::Semicolon
            }
            b'\'' => {
                self.skip_string(self.backslash_strings);
                Special::Literal
            }
            b'"' => {
                let start = self.pos + 1;
                // An unclosed identifier runs to the end of the text.
                let (end, next) = match self.rest()[1..].iter().position(|&c| c == b'"') {
                    Some(e) => (start + e, start + e + 1),
                    None => {
                        self.open_at_end = true;
                        (self.src.len(), self.src.len())
                    }
                };
                self.pos = next;
                Special::Quoted(&self.src[start..end])
            }
            b'$' if self.skip_dollar_quote() => Special::Literal,
            b => {
                self.pos += 1;
                Special::Other(b)
            }
        }
    }

    #[inline(always)]
    fn next_token(&mut self) -> Option<Token<'a>> {
        loop {
            let b = *self.src.get(self.pos)?;
            let class = CLASS[usize::from(b)];
            if class == SPACE {
                self.pos += 1;
            } else if class == WORD {
                return Some(match self.word() {
                    Some(w) => Token::Word(w),
                    None => Token::Other(b'\''),
                });
            } else if class == DIGIT {
                // A number is one token, whatever its length.
                self.pos = skip_while(self.src, self.pos + 1, DIGIT);
                return Some(Token::Other(b'0'));
            } else {
                return Some(match self.special() {
                    Special::Comment => continue,
                    Special::Semicolon => Token::Semicolon,
                    Special::Literal => Token::Other(b),
                    Special::Quoted(q) => Token::Quoted(q),
                    Special::Other(b) => Token::Other(b),
                });
            }
        }
    }

    /// Moves to the next word, semicolon, quoted function name (`"f"(`) or quoted `"pg_temp"`;
    /// numbers, operators, literals and other quoted identifiers on the way only break the
    /// adjacency of the words around them.
    #[inline(always)]
    fn skim(&mut self) -> Option<Skimmed<'a>> {
        let mut adjacent = true;
        while let Some(&b) = self.src.get(self.pos) {
            let class = CLASS[usize::from(b)];
            if class & (WORD | SPECIAL) == 0 {
                // Whitespace keeps words adjacent; a number or an operator does not.
                adjacent &= class == SPACE;
                self.pos += 1;
            } else if class == WORD {
                match self.word() {
                    Some(word) => return Some(Skimmed::Word { word, adjacent }),
                    None => adjacent = false,
                }
            } else {
                match self.special() {
                    Special::Comment => {}
                    Special::Semicolon => return Some(Skimmed::Semicolon),
                    Special::Quoted(name)
                        if name == b"pg_temp" || self.suspects.is_some() || self.before_paren() =>
                    {
                        return Some(Skimmed::Quoted { name });
                    }
                    _ => adjacent = false,
                }
            }
        }
        None
    }

    /// Whether the next byte past whitespace is `(`: the word just read is called.
    #[inline(always)]
    fn before_paren(&self) -> bool {
        self.src[self.pos..]
            .iter()
            .find(|&&c| CLASS[usize::from(c)] != SPACE)
            == Some(&b'(')
    }

    /// Whether the call whose `(` comes next has exactly three arguments, the last a `true`
    /// constant (`true`, or a literal such as `'on'` that PostgreSQL reads as true).
    fn call_ends_in_true(&self) -> bool {
        let mut ahead = Lexer {
            src: self.src,
            pos: self.pos,
            backslash_strings: self.backslash_strings,
            suspects: None,
            open_at_end: false,
        };
        if ahead.next_token() != Some(Token::Other(b'(')) {
            return false;
        }
        let (mut depth, mut commas) = (0usize, 0);
        while commas < 2 {
            match ahead.next_token() {
                Some(Token::Other(b'(')) => depth += 1,
                Some(Token::Other(b')')) if depth == 0 => return false,
                Some(Token::Other(b')')) => depth -= 1,
                Some(Token::Other(b',')) if depth == 0 => commas += 1,
                None | Some(Token::Semicolon) => return false,
                Some(_) => {}
            }
        }
        ahead.skip_space();
        let start = ahead.pos;
        let is_true = match ahead.next_token() {
            Some(Token::Word(w)) => w.eq_ignore_ascii_case(b"true"),
            Some(Token::Other(b'\'')) => {
                let literal = &ahead.src[start..ahead.pos];
                ["'true'", "'t'", "'on'", "'yes'", "'y'", "'1'"]
                    .iter()
                    .any(|t| literal.eq_ignore_ascii_case(t.as_bytes()))
            }
            _ => false,
        };
        is_true && ahead.next_token() == Some(Token::Other(b')'))
    }

    /// Moves past whitespace and comments.
    fn skip_space(&mut self) {
        loop {
            self.pos = skip_while(self.src, self.pos, SPACE);
            if !(self.rest().starts_with(b"--") || self.rest().starts_with(b"/*")) {
                return;
            }
            self.special();
        }
    }

    fn skip_block_comment(&mut self) {
        let mut depth = 0usize;
        while !self.rest().is_empty() {
            if self.rest().starts_with(b"/*") {
                depth += 1;
                self.pos += 2;
            } else if self.rest().starts_with(b"*/") {
                depth -= 1;
                self.pos += 2;
                if depth == 0 {
                    return;
                }
            } else {
                self.pos += 1;
            }
        }
        self.open_at_end = true;
    }

    fn skip_string(&mut self, backslash_escapes: bool) {
        self.pos += 1;
        while let Some(&c) = self.rest().first() {
            self.pos += 1;
            match c {
                b'\\' if backslash_escapes => self.pos = (self.pos + 1).min(self.src.len()),
                b'\'' if self.rest().first() == Some(&b'\'') => self.pos += 1,
                b'\'' => return,
                _ => {}
            }
        }
        self.open_at_end = true;
    }

    /// Skips `$tag$ … $tag$` if one starts here; false for `$1`-style parameters.
    fn skip_dollar_quote(&mut self) -> bool {
        let rest = self.rest();
        let Some(close) = rest[1..].iter().position(|&c| c == b'$') else {
            return false;
        };
        let tag = &rest[..close + 2];
        let valid_tag = tag[1..tag.len() - 1]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80)
            && !tag.get(1).is_some_and(u8::is_ascii_digit);
        if !valid_tag {
            return false;
        }
        let body_start = self.pos + tag.len();
        let tag = &self.src[self.pos..body_start];
        self.pos = match memchr::memmem::find(&self.src[body_start..], tag) {
            Some(end) => body_start + end + tag.len(),
            None => {
                self.open_at_end = true;
                self.src.len()
            }
        };
        true
    }
}

/// Whether a statement that starts with `keyword` (see [`key`]) may be a read, which a call would make a write.
fn may_read(keyword: u128) -> bool {
    matches!(
        keyword,
        kw::SELECT | kw::WITH | kw::VALUES | kw::TABLE | kw::EXPLAIN | kw::COPY
    )
}

/// Whether `word(` is no call of a function that may write: a keyword or type name that takes
/// parentheses, or a built-in function that reads only. Anything else (a user's function,
/// which may write) makes a SELECT a write.
fn takes_parentheses(word: &[u8]) -> bool {
    // PostgreSQL's names are at most 63 bytes.
    let mut lower = [0u8; 64];
    let Some(lower) = lower.get_mut(..word.len()) else {
        return false;
    };
    for (l, c) in lower.iter_mut().zip(word) {
        *l = c.to_ascii_lowercase();
    }
    READ_ONLY_CALLS
        .binary_search_by(|f| f.as_bytes().cmp(lower))
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(sql: &str) -> Vec<Statement> {
        classify(sql).statements
    }

    /// Text that ends inside a literal, quoted identifier or block comment would take in
    /// whatever is appended to it; one that closes them, or ends in a line comment, would not.
    #[test]
    fn text_ending_inside_a_token_is_told() {
        for sql in [
            "select 'a",
            "select 'it''s",
            "select E'a\\'",
            "select $q$ a $$ b",
            "select \"a",
            "select 1 /* a /* b */",
            "select 1; select 'x",
        ] {
            assert!(classify(sql).ends_open, "{sql}");
        }
        for sql in [
            "select 'a'",
            "select 'it''s'",
            "select E'a\\''",
            "select $q$ a $$ b $q$",
            "select $1",
            "select \"a\"",
            "select 1 /* a /* b */ */",
            "select 1 -- 'a",
        ] {
            assert!(!classify(sql).ends_open, "{sql}");
        }
    }

    #[test]
    fn dml_only_strings() {
        for sql in [
            "insert into t values (1)",
            "UPDATE t SET a = 2; delete from t",
            "WITH d AS (DELETE FROM t RETURNING *) INSERT INTO u SELECT * FROM d",
            "merge into t using u on t.a = u.a when matched then delete",
            "select nextval('s')",
            "explain analyze insert into t values (1)",
        ] {
            let c = classify(sql);
            assert!(c.block_safe, "{sql}");
            assert_eq!(
                c.changes_only,
                ["insert", "UPDATE", "merge"]
                    .iter()
                    .any(|k| sql.starts_with(k)),
                "{sql}"
            );
        }
        // COPY, and schema and privilege changes PostgreSQL runs in a transaction block.
        for sql in [
            "COPY t FROM STDIN",
            "copy t (a) from stdin with (format csv); copy u to stdout",
            "CREATE TABLE u (a int); CREATE INDEX ON u (a)",
            "alter table t add column b int; comment on column t.b is 'b'",
            "DROP TABLE IF EXISTS u CASCADE",
            "truncate t; grant select on t to public; revoke all on t from r",
            "CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$",
            "ALTER TYPE e ADD VALUE 'b'",
            "ALTER TABLE t SET TABLESPACE ts",
            "REFRESH MATERIALIZED VIEW CONCURRENTLY mv",
        ] {
            let c = classify(sql);
            assert!(c.block_safe && !c.changes_only, "{sql}");
        }
        for sql in [
            "VACUUM t",
            "CREATE INDEX CONCURRENTLY i ON t(a)",
            "create unique index concurrently on t(a)",
            "DROP INDEX CONCURRENTLY i",
            "ALTER TABLE p DETACH PARTITION p2 CONCURRENTLY",
            "CREATE DATABASE d",
            "drop database if exists d",
            "ALTER DATABASE d SET TABLESPACE ts",
            "CREATE TABLESPACE ts LOCATION '/x'",
            "DROP SUBSCRIPTION s",
            "ALTER SYSTEM SET work_mem = '4MB'",
            "CREATE TABLE u (a int); VACUUM u",
            "CLUSTER",
            "REINDEX TABLE t",
            "ANALYZE t",
            "DISCARD ALL",
            "CHECKPOINT",
            "LOCK TABLE t",
            "CALL p()",
            "INSERT INTO t VALUES (1); COMMIT",
            "insert into t values (1); savepoint s",
            "DO $$ BEGIN PERFORM 1; END $$",
            "SET x = 1",
        ] {
            let c = classify(sql);
            assert!(!c.block_safe && !c.changes_only, "{sql}");
        }
    }

    #[test]
    fn transaction_control() {
        assert_eq!(kinds("BEGIN"), [Statement::Begin]);
        assert_eq!(
            kinds("start transaction isolation level serializable"),
            [Statement::Begin]
        );
        assert_eq!(
            kinds("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE"),
            [Statement::Begin]
        );
        assert_eq!(kinds("  /* c */ commit"), [Statement::Commit]);
        assert_eq!(kinds("END"), [Statement::Commit]);
        assert_eq!(kinds("rollback"), [Statement::Rollback]);
        assert_eq!(kinds("ROLLBACK TO SAVEPOINT a"), [Statement::Savepoint]);
        assert_eq!(kinds("rollback transaction to a"), [Statement::Savepoint]);
        assert_eq!(
            kinds("SAVEPOINT a; RELEASE a"),
            [Statement::Savepoint, Statement::Savepoint]
        );
        let two_pc = classify("PREPARE TRANSACTION 'x'");
        assert_eq!(two_pc.hazards, [Hazard::Unreplayable("two-phase commit")]);
        for sql in [
            "INSERT INTO t VALUES (1); COMMIT",
            "begin",
            "select 1; rollback to a",
            "PREPARE TRANSACTION 'x'",
            "commit prepared 'x'",
        ] {
            assert!(classify(sql).controls_transaction, "{sql}");
        }
        for sql in [
            "INSERT INTO t VALUES (1); SET x = 1",
            "PREPARE p AS SELECT 1",
        ] {
            assert!(!classify(sql).controls_transaction, "{sql}");
        }
    }

    #[test]
    fn reads_and_writes() {
        assert_eq!(kinds("select 1"), [Statement::Read]);
        assert_eq!(kinds("SELECT * FROM t FOR UPDATE"), [Statement::Write]);
        assert_eq!(kinds("select nextval('s')"), [Statement::Write]);
        assert_eq!(
            kinds("WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x"),
            [Statement::Write]
        );
        assert_eq!(kinds("insert into t values (1)"), [Statement::Write]);
        for sql in [
            "VACUUM ANALYZE t",
            "analyse",
            "vacuum (full, verbose) t",
            "CHECKPOINT",
        ] {
            assert_eq!(kinds(sql), [Statement::Maintenance], "{sql}");
            assert!(!classify(sql).may_write(), "{sql}");
        }
        // A persistent mark (CLUSTER … USING), a tablespace (REINDEX (TABLESPACE …)).
        assert_eq!(kinds("CLUSTER t USING i"), [Statement::Write]);
        assert_eq!(kinds("REINDEX TABLE t"), [Statement::Write]);
        assert_eq!(kinds("DO $$ BEGIN PERFORM 1; END $$"), [Statement::Write]);
        assert_eq!(kinds("select 'commit; begin'"), [Statement::Read]);
        assert_eq!(kinds("select $a$ ; $a$, $1"), [Statement::Read]);
        assert_eq!(kinds("-- only a comment\n"), Vec::<Statement>::new());
        assert!(classify("UPDATE t SET a = 1; SELECT 1").may_write());
    }

    /// A user's function may write, so a SELECT that calls one is no read: run again after a
    /// failover, its write would be applied twice. Built-in functions that read, and keywords
    /// and types written before parentheses, leave a SELECT a read.
    #[test]
    fn calls_of_functions_that_may_write() {
        for sql in [
            "SELECT ins_fn(1)",
            "select /* c */ public.ins_fn(id) from t",
            "SELECT (ins_fn(1))",
            "SELECT * FROM t, LATERAL ins_fn(t.a) AS f",
            "VALUES (ins_fn(2))",
            "SELECT \"InsFn\"(1)",
            "select count(*), ins_fn (x) from t",
            "COPY (SELECT ins_fn(1)) TO STDOUT",
            "WITH x AS (SELECT f()) SELECT * FROM x",
            "SELECT txid_current()",
            "SELECT lo_import('/tmp/x')",
            "SELECT pg_catalog.set_config('a.b', '1', false)",
        ] {
            assert_eq!(kinds(sql), [Statement::Write], "{sql}");
        }
        for sql in [
            "SELECT count(*), max(a), lower(b) FROM t WHERE a IN (1, 2) AND EXISTS (SELECT 1)",
            "SELECT CAST(a AS numeric(10, 2)), coalesce(b, 'x')::varchar(3) FROM t",
            "SELECT * FROM generate_series(1, 10) g JOIN (SELECT 1) s ON (true)",
            "SELECT now(), pg_sleep(0.1), date_trunc('day', now()), extract(epoch FROM now())",
            "SELECT row_number() OVER (PARTITION BY a ORDER BY b) FROM t",
            "SELECT json_build_object('a', 1), string_agg(x, ',') FILTER (WHERE x <> '') FROM t",
            "COPY t (a, b) TO STDOUT",
            "COPY (SELECT lower(b) FROM t) TO STDOUT",
            "EXPLAIN (COSTS OFF) SELECT 1",
            "SELECT inet_server_port(), pg_is_in_recovery(), pg_backend_pid()",
            "SELECT pg_stat_get_xact_function_self_time(1), pg_size_pretty(pg_database_size('x'))",
            "SELECT 'ins_fn(1)', $$ ins_fn(1) $$",
        ] {
            assert_eq!(kinds(sql), [Statement::Read], "{sql}");
        }
        assert!(READ_ONLY_CALLS.windows(2).all(|w| w[0] < w[1]), "sorted");
        assert!(takes_parentheses(b"lower"), "lower");
        assert!(takes_parentheses(b"LOWER"), "LOWER");
    }

    /// What a DO block or `set_config()` changes in the session, or a temporary table made by
    /// schema, cannot be given to a new backend: the session cannot move.
    #[test]
    fn untracked_session_changes_make_a_session_unmovable() {
        for sql in [
            "DO $$ BEGIN EXECUTE 'CREATE TEMP TABLE tt (a int)'; END $$",
            "SELECT set_config('search_path', 's2', false)",
            "CREATE TABLE pg_temp.tt (a int)",
        ] {
            assert!(
                classify(sql)
                    .hazards
                    .iter()
                    .any(|h| matches!(h, Hazard::Unmovable(_))),
                "{sql}"
            );
        }
        assert!(classify("SELECT * FROM pg_temp.tt").hazards.is_empty());
        // Kept past the commit: the session holds the table.
        for sql in [
            "CREATE TEMP TABLE tt (a int) ON COMMIT DELETE ROWS",
            "CREATE TEMP TABLE tt (a int) ON COMMIT PRESERVE ROWS",
            "CREATE TEMP TABLE tt AS SELECT 1 AS commit, 2 AS \"drop\"",
            "CREATE TEMP TABLE tt (commit int, drop_it int)",
        ] {
            assert_eq!(
                classify(sql).hazards,
                [Hazard::Unmovable("a temporary table")],
                "{sql}"
            );
        }
    }

    /// A temporary table dropped at commit lives only as long as its transaction, which a
    /// replay makes again: it leaves the session movable.
    #[test]
    fn temporary_tables_dropped_at_commit_leave_the_session_movable() {
        for sql in [
            "CREATE TEMP TABLE stage (a int) ON COMMIT DROP",
            "create temporary table stage (like t including defaults) on commit drop",
            "CREATE TABLE pg_temp.stage (a int) ON COMMIT DROP",
            "CREATE TEMP TABLE stage ON COMMIT DROP AS SELECT * FROM t",
            "CREATE TEMP TABLE stage (a int) ON /* c */ COMMIT\n DROP",
        ] {
            let c = classify(sql);
            assert_eq!(c.statements, [Statement::Write], "{sql}");
            assert!(c.hazards.is_empty(), "{sql}: {:?}", c.hazards);
        }
    }

    /// `set_config(name, value, true)` makes its setting for the transaction only, as
    /// `SET LOCAL` does (PostgREST sends one per request): no data written, nothing the session
    /// keeps. Every other form, or a third argument that is not a `true` constant, may change
    /// the session.
    #[test]
    fn transaction_local_set_config_is_no_session_change() {
        for sql in [
            "SELECT set_config('request.jwt.claims', '{\"sub\":\"a\"}', true), \
             set_config('search_path', 'app', TRUE)",
            "select pg_catalog.set_config($1, $2, true)",
            "SELECT set_config('a.b', (SELECT lower('X')), 'on'), current_setting('a.b')",
            "SELECT set_config('a.b', format('%s,%s', 1, 2), /* local */ 't')",
            r#"SELECT "set_config"('a.b', 'c', true)"#,
        ] {
            let c = classify(sql);
            assert_eq!(c.statements, [Statement::Read], "{sql}");
            assert!(c.hazards.is_empty(), "{sql}: {:?}", c.hazards);
        }
        let write = classify("UPDATE t SET a = 1 WHERE set_config('a.b', 'c', true) <> ''");
        assert_eq!(write.statements, [Statement::Write]);
        assert!(write.hazards.is_empty());
        let write = classify("SELECT set_config('a.b', 'c', true), ins_fn(1)");
        assert_eq!(write.statements, [Statement::Write]);
        assert!(write.hazards.is_empty());
        // Some other function, written exactly: it may write, and change what it likes.
        let other = classify(r#"SELECT "SET_CONFIG"('a.b', 'c', true)"#);
        assert_eq!(other.statements, [Statement::Write]);
        for sql in [
            "SELECT set_config('a.b', 'c', false)",
            "SELECT set_config('a.b', 'c', $3)",
            "SELECT set_config('a.b', 'c', 'off')",
            "SELECT set_config('a.b', 'c', true AND x)",
            "SELECT set_config('a.b', 'c', true::bool)",
            "SELECT set_config('a.b', 'c', E'true')",
            "SELECT set_config('a.b', f('c', true), false)",
            "SELECT set_config('a.b', 'c', true), set_config('d.e', 'f', false)",
            "SELECT set_config('a.b', 'c', (true))",
            "SELECT set_config('a.b', 'c')",
            "SELECT set_config('a.b', 'c', true",
            "SELECT set_config('a.b', 'c', true, 1)",
        ] {
            assert_eq!(
                classify(sql).hazards,
                [Hazard::Unmovable("a setting changed with set_config()")],
                "{sql}"
            );
        }
    }

    /// A statement that names a relation whose reading may write, or calls a function of the
    /// user's named like a read-only built-in, is a write: the session's [`Suspects`] say
    /// which. Names compare as PostgreSQL compares identifiers.
    #[test]
    fn suspects_make_reads_writes() {
        let suspects = Suspects::new(
            ["vw".into(), "Logged".into(), "guarded".into()],
            ["abs".into()],
        );
        let kinds = |sql: &str, suspects: &Suspects| {
            let mut out = Classified::default();
            classify_into(sql.as_bytes(), Strings::Standard, suspects, &mut out);
            out.statements
        };
        for sql in [
            "SELECT * FROM vw",
            "select one from public.VW",
            r#"SELECT * FROM "Logged""#,
            "TABLE vw",
            "SELECT abs('5'::text)",
            "SELECT count(*) FROM t WHERE a = ABS(b)",
            "DECLARE c CURSOR FOR SELECT * FROM vw",
            "COPY (SELECT * FROM vw) TO STDOUT",
            "WITH x AS (SELECT * FROM guarded) SELECT * FROM x",
            "EXPLAIN ANALYZE SELECT * FROM vw",
        ] {
            assert_eq!(kinds(sql, &suspects), [Statement::Write], "{sql}");
            assert_eq!(kinds(sql, &Suspects::default()), [Statement::Read], "{sql}");
        }
        for sql in [
            "SELECT * FROM logged",
            r#"SELECT * FROM "VW""#,
            "SELECT 'vw', $$ vw $$",
            "SELECT vw_count FROM t",
            "SELECT lower(a) FROM t",
        ] {
            assert_eq!(kinds(sql, &suspects), [Statement::Read], "{sql}");
        }
        assert_eq!(suspects.len(), 4);
        assert!(Suspects::default().is_empty());
    }

    /// DDL that may make a view, policy or function that writes is told apart from DDL that
    /// makes storage.
    #[test]
    fn statements_that_may_make_suspects() {
        for sql in [
            "CREATE VIEW v AS SELECT f()",
            "create or replace function f() returns int language sql as 'select 1'",
            "CREATE TEMP VIEW v AS SELECT 1",
            "CREATE POLICY p ON t USING (f(a))",
            "CREATE RULE r AS ON SELECT TO t DO INSTEAD SELECT 1",
            "CREATE EXTENSION pgcrypto",
            "ALTER TABLE t ENABLE ROW LEVEL SECURITY",
            "ALTER FUNCTION f() VOLATILE",
            "DO $$ BEGIN EXECUTE 'CREATE VIEW v AS SELECT 1'; END $$",
            "SELECT 1; CREATE VIEW v AS SELECT 1",
        ] {
            assert!(classify(sql).changes_catalog, "{sql}");
        }
        for sql in [
            "CREATE TABLE t (a int)",
            "CREATE TEMP TABLE s (a int) ON COMMIT DROP",
            "CREATE GLOBAL TEMPORARY TABLE s (a int)",
            "CREATE UNIQUE INDEX i ON t (a)",
            "CREATE SEQUENCE s",
            "DROP VIEW v",
            "SELECT 'CREATE VIEW v'",
            "INSERT INTO t VALUES (1)",
        ] {
            assert!(!classify(sql).changes_catalog, "{sql}");
        }
    }

    /// A cursor runs its query as it is fetched: DECLARE is what the query is.
    #[test]
    fn a_cursor_is_what_its_query_is() {
        for sql in [
            "DECLARE c CURSOR FOR SELECT * FROM t",
            "declare c binary no scroll cursor without hold for select lower(a) from t",
        ] {
            assert_eq!(kinds(sql), [Statement::Read], "{sql}");
        }
        for sql in [
            "DECLARE c CURSOR FOR SELECT ins_fn(1)",
            "DECLARE c CURSOR FOR SELECT * FROM t FOR UPDATE",
            "DECLARE c CURSOR FOR SELECT nextval('s') FROM t",
            "DECLARE c CURSOR",
        ] {
            assert_eq!(kinds(sql), [Statement::Write], "{sql}");
        }
        let held = classify("DECLARE c CURSOR WITH HOLD FOR SELECT 1");
        assert_eq!(held.statements, [Statement::Read]);
        assert_eq!(
            held.hazards,
            [Hazard::Unmovable("a cursor declared WITH HOLD")]
        );
    }

    #[test]
    fn commit_and_chain() {
        for sql in [
            "COMMIT AND CHAIN",
            "commit work and chain",
            "END TRANSACTION AND CHAIN",
        ] {
            let c = classify(sql);
            assert_eq!(c.statements, [Statement::Commit], "{sql}");
            assert!(c.chains, "{sql}");
        }
        for sql in [
            "COMMIT",
            "COMMIT AND NO CHAIN",
            "END WORK",
            "ROLLBACK AND CHAIN",
        ] {
            assert!(!classify(sql).chains, "{sql}");
        }
    }

    #[test]
    fn session_state() {
        assert_eq!(
            kinds("SET search_path TO app, public"),
            [Statement::Session(SessionChange::Set(Some(
                "search_path".into()
            )))]
        );
        assert_eq!(
            kinds("set session statement_timeout = 5"),
            [Statement::Session(SessionChange::Set(Some(
                "statement_timeout".into()
            )))]
        );
        assert_eq!(
            kinds("SET LOCAL work_mem = '1MB'"),
            [Statement::TransactionSetting]
        );
        assert_eq!(
            kinds("SET TRANSACTION READ ONLY"),
            [Statement::TransactionSetting]
        );
        assert_eq!(
            kinds("RESET ALL"),
            [Statement::Session(SessionChange::Reset(None))]
        );
        assert_eq!(
            kinds("reset Work_Mem"),
            [Statement::Session(SessionChange::Reset(Some(
                "work_mem".into()
            )))]
        );
        assert_eq!(
            kinds("DISCARD ALL"),
            [Statement::Session(SessionChange::Discard)]
        );
        assert_eq!(
            kinds("PREPARE q (int) AS SELECT $1"),
            [Statement::Session(SessionChange::Prepare("q".into()))]
        );
        assert_eq!(
            kinds("DEALLOCATE PREPARE q"),
            [Statement::Session(SessionChange::Deallocate(Some(
                "q".into()
            )))]
        );
        assert_eq!(
            kinds("deallocate all"),
            [Statement::Session(SessionChange::Deallocate(None))]
        );
        assert_eq!(
            kinds("LISTEN \"Jobs\""),
            [Statement::Session(SessionChange::Listen("Jobs".into()))]
        );
        assert_eq!(
            kinds("UNLISTEN *"),
            [Statement::Session(SessionChange::Unlisten(None))]
        );
    }

    #[test]
    fn strings_read_as_standard_conforming_strings_says() {
        let mut out = Classified::default();
        let mut kinds = |sql: &str, strings| {
            classify_into(sql.as_bytes(), strings, &Suspects::default(), &mut out);
            out.statements.clone()
        };
        // `off`: the backslash escapes the quote, the literal is "it's", the INSERT is seen.
        let escaped = r"SELECT 'it\'s'; INSERT INTO t VALUES (1)";
        assert_eq!(
            kinds(escaped, Strings::BackslashEscapes),
            [Statement::Read, Statement::Write]
        );
        // `on`: the literal is `a\`, then comes the INSERT, as the server reads it.
        let plain = r"SELECT 'a\'; INSERT INTO t VALUES (1)";
        assert_eq!(
            kinds(plain, Strings::Standard),
            [Statement::Read, Statement::Write]
        );
        assert_eq!(kinds(plain, Strings::BackslashEscapes), [Statement::Read]);
    }

    #[test]
    fn hazards() {
        assert_eq!(
            classify("CREATE TEMP TABLE x (a int)").hazards,
            [Hazard::Unmovable("a temporary table")]
        );
        assert_eq!(
            classify("select pg_advisory_lock(1)").hazards,
            [Hazard::Unmovable("a session-level advisory lock")]
        );
        assert!(classify("select pg_advisory_xact_lock(1)")
            .hazards
            .is_empty());
        // Quoted names are the same functions and schema.
        for sql in [
            r#"select "pg_advisory_lock"(1)"#,
            r#"select pg_catalog."pg_try_advisory_lock" (1)"#,
        ] {
            assert_eq!(
                classify(sql).hazards,
                [Hazard::Unmovable("a session-level advisory lock")],
                "{sql}"
            );
        }
        assert_eq!(
            classify(r#"CREATE TABLE "pg_temp".x (a int)"#).hazards,
            [Hazard::Unmovable("a temporary table")]
        );
        assert_eq!(
            classify(r#"SELECT "set_config"('a.b', 'c', false)"#).hazards,
            [Hazard::Unmovable("a setting changed with set_config()")]
        );
        assert!(classify(r#"SELECT "nextval"('s')"#).may_write());
        let read = classify(r#"SELECT "insert", "pg_temp" FROM "update""#);
        assert!(!read.may_write() && read.hazards.is_empty());
        assert_eq!(
            classify("DECLARE c CURSOR WITH HOLD FOR SELECT 1").hazards,
            [Hazard::Unmovable("a cursor declared WITH HOLD")]
        );
        assert_eq!(
            classify("COPY t TO PROGRAM 'gzip > /tmp/x'").hazards,
            [Hazard::Unreplayable("COPY with an external program")]
        );
    }

    #[test]
    fn words_past_the_first_four_are_read_with_their_neighbours() {
        assert!(classify("COPY public.t (a, b) FROM STDIN").copies);
        assert!(classify("COPY t (a, b) FROM -- from where\n /* here */ STDIN").copies);
        assert!(!classify("SELECT a FROM t WHERE b = 'FROM' || stdin").copies);
        assert_eq!(kinds("COPY public.t (a, b) TO STDOUT"), [Statement::Read]);
        assert_eq!(
            kinds("COPY (SELECT a FROM t ORDER BY a) TO /* out */ stdout (FORMAT binary)"),
            [Statement::Read]
        );
        assert_eq!(
            kinds("COPY (INSERT INTO t VALUES (1) RETURNING a) TO STDOUT"),
            [Statement::Write]
        );
        assert_eq!(
            kinds("COPY (SELECT nextval('s')) TO STDOUT"),
            [Statement::Write]
        );
        assert_eq!(kinds("COPY t TO '/tmp/t.csv'"), [Statement::Write]);
        assert_eq!(kinds("COPY t FROM STDIN"), [Statement::Write]);
        assert_eq!(
            classify("SELECT a, b, c INTO TEMP t FROM x").hazards,
            [Hazard::Unmovable("a temporary table")]
        );
        assert!(classify("SELECT a, b FROM t, u INTO TEMP").hazards.len() == 1);
        assert!(classify("SELECT a, b FROM t INTO 'x' TEMP")
            .hazards
            .is_empty());
        assert_eq!(
            kinds("SELECT a, b FROM t /* x */ FOR UPDATE"),
            [Statement::Write]
        );
        assert_eq!(
            kinds(r"SELECT a, b, E'\'; INSERT', $q$; DELETE$q$ FROM t; VALUES (1)"),
            [Statement::Read, Statement::Read]
        );
        assert_eq!(
            classify("SELECT a, b, c, pg_try_advisory_lock(1)").hazards,
            [Hazard::Unmovable("a session-level advisory lock")]
        );
        assert_eq!(
            classify("SELECT a, \"pg_advisory_lock\", 'pg_advisory_lock(1)' FROM t").hazards,
            []
        );
    }

    #[test]
    fn never_panics_on_odd_text() {
        for sql in [
            "",
            ";",
            ";;;",
            "'",
            "E'\\",
            "$",
            "$$",
            "$a",
            "\"",
            "/*",
            "/* /* */",
            "--",
            "select 'x",
            "é; ü",
            "SET",
            "PREPARE",
            "DEALLOCATE PREPARE",
            "$1$",
            "\u{0}",
            "LISTEN \"é",
            "STDIN \" é",
        ] {
            let _ = classify(sql);
        }
    }
}
