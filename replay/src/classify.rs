//! What a SQL string does, told from its leading keywords.
//!
//! A lexer skips whitespace, comments and quoted text and reads the first keywords of each
//! statement — a few hundred nanoseconds for a typical query. sqlparser (PostgreSQL dialect) is
//! consulted only for SET, to learn the variable's name; it fails on some valid PostgreSQL, so a
//! parse failure falls back to the conservative answer, never to an error.

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

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
    /// Reads only (SELECT without locking or writing CTEs, SHOW, VALUES, TABLE, EXPLAIN).
    Read,
    /// Anything that may write or whose effect is unknown.
    Write,
    /// Changes session state that a new backend must be given again.
    Session(SessionChange),
    /// Transaction-scoped settings (SET LOCAL, SET TRANSACTION, SET CONSTRAINTS).
    TransactionSetting,
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
    /// Byte range in the query string of each [`Statement::Session`] statement, in order: the
    /// text a new backend is given to restore it.
    pub session_spans: Vec<std::ops::Range<usize>>,
}

impl Classified {
    /// Whether any statement may write.
    pub fn may_write(&self) -> bool {
        self.statements
            .iter()
            .any(|s| matches!(s, Statement::Write | Statement::Session(_)))
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
    classify_into(sql, Strings::Standard, &mut out);
    out
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

/// Classifies every statement of `sql` into `out`, reusing its buffers.
pub fn classify_into(sql: &str, strings: Strings, out: &mut Classified) {
    out.statements.clear();
    out.hazards.clear();
    out.copies = false;
    out.session_spans.clear();
    let mut lex = Lexer::new(sql);
    lex.backslash_strings = strings == Strings::BackslashEscapes;
    while lex.pos < sql.len() {
        let start = lex.pos;
        let facts = Facts::scan(&mut lex);
        let stmt = &sql[start..facts.end];
        let w = |i: usize| facts.lead[i];
        let is = |i: usize, k: &str| w(i).eq_ignore_ascii_case(k);
        if w(0).is_empty() {
            continue;
        }
        let mut upper = [0u8; 10];
        let first = w(0).as_bytes();
        let keyword = if first.len() <= upper.len() {
            upper[..first.len()].copy_from_slice(first);
            upper[..first.len()].make_ascii_uppercase();
            &upper[..first.len()]
        } else {
            // Longer than any keyword below.
            &[]
        };
        let statement = match keyword {
            b"BEGIN" | b"START" => Statement::Begin,
            b"COMMIT" | b"END" if is(1, "PREPARED") => {
                out.hazards.push(Hazard::Unreplayable("two-phase commit"));
                Statement::Write
            }
            b"COMMIT" | b"END" => Statement::Commit,
            b"ROLLBACK" | b"ABORT" if is(1, "TO") || is(2, "TO") => Statement::Savepoint,
            b"ROLLBACK" if is(1, "PREPARED") => {
                out.hazards.push(Hazard::Unreplayable("two-phase commit"));
                Statement::Write
            }
            b"ROLLBACK" | b"ABORT" => Statement::Rollback,
            b"SAVEPOINT" | b"RELEASE" => Statement::Savepoint,
            b"SELECT" | b"WITH" | b"VALUES" | b"TABLE" | b"SHOW" | b"EXPLAIN" | b"FETCH"
            | b"MOVE" => {
                if facts.writes {
                    Statement::Write
                } else {
                    Statement::Read
                }
            }
            b"SET" if is(1, "LOCAL") || is(1, "TRANSACTION") || is(1, "CONSTRAINTS") => {
                Statement::TransactionSetting
            }
            b"SET" => Statement::Session(SessionChange::Set(set_variable(stmt))),
            b"RESET" => {
                Statement::Session(SessionChange::Reset(if is(1, "ALL") || w(1).is_empty() {
                    None
                } else {
                    Some(name_after(stmt, 1))
                }))
            }
            b"DISCARD" => Statement::Session(SessionChange::Discard),
            b"PREPARE" if is(1, "TRANSACTION") => {
                out.hazards.push(Hazard::Unreplayable("two-phase commit"));
                Statement::Write
            }
            b"PREPARE" => Statement::Session(SessionChange::Prepare(name_after(stmt, 1))),
            b"DEALLOCATE" => {
                let skip = if is(1, "PREPARE") { 2 } else { 1 };
                Statement::Session(SessionChange::Deallocate(
                    if is(skip, "ALL") || w(skip).is_empty() {
                        None
                    } else {
                        Some(name_after(stmt, skip))
                    },
                ))
            }
            b"LISTEN" => Statement::Session(SessionChange::Listen(name_after(stmt, 1))),
            b"UNLISTEN" => {
                Statement::Session(SessionChange::Unlisten(if w(1) == "*" || w(1).is_empty() {
                    None
                } else {
                    Some(name_after(stmt, 1))
                }))
            }
            b"DECLARE" => {
                if facts.with_hold {
                    out.hazards
                        .push(Hazard::Unmovable("a cursor declared WITH HOLD"));
                }
                Statement::Read
            }
            _ => Statement::Write,
        };
        let copy = keyword == b"COPY";
        out.copies |= copy && facts.from_stdin;
        if keyword == b"CREATE" && facts.temp || facts.into_temp {
            out.hazards.push(Hazard::Unmovable("a temporary table"));
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
    out.hazards.dedup();
}

/// What one pass over a statement's tokens finds, without allocating.
#[derive(Default)]
struct Facts<'a> {
    /// The first four tokens (words as written, `*` for a star, empty for anything else).
    lead: [&'a str; 4],
    /// Where the statement's text ends (before its semicolon, if any).
    end: usize,
    /// A word or function that writes or locks: a SELECT with it is no read.
    writes: bool,
    temp: bool,
    into_temp: bool,
    with_hold: bool,
    program: bool,
    advisory_lock: bool,
    dblink: bool,
    from_stdin: bool,
}

impl<'a> Facts<'a> {
    /// Reads one statement from `lex`, up to and including its semicolon.
    fn scan(lex: &mut Lexer<'a>) -> Self {
        let mut f = Facts {
            end: lex.src.len(),
            ..Facts::default()
        };
        let mut n = 0;
        let mut prev = "";
        while let Some(tok) = lex.next_token() {
            let word = match tok {
                Token::Word(w) => w,
                Token::Other('*') => "*",
                Token::Semicolon => {
                    f.end = lex.pos - 1;
                    break;
                }
                _ => "",
            };
            if n < f.lead.len() {
                f.lead[n] = word;
                n += 1;
            }
            if word.is_empty() || word == "*" {
                prev = "";
                continue;
            }
            f.note(word, prev);
            prev = word;
        }
        f
    }

    /// Notes what `word` (after `prev`) tells; dispatching on the first letter keeps the
    /// common case, a word that is none of these, to one comparison.
    fn note(&mut self, word: &str, prev: &str) {
        let is = |k: &str| word.eq_ignore_ascii_case(k);
        let starts = |k: &str| {
            word.len() >= k.len() && word.as_bytes()[..k.len()].eq_ignore_ascii_case(k.as_bytes())
        };
        match word.as_bytes()[0].to_ascii_lowercase() {
            b'd' => {
                self.writes |= is("DELETE");
                self.dblink |= starts("dblink");
            }
            b'f' => self.writes |= is("FOR"),
            b'h' => self.with_hold |= is("HOLD") && prev.eq_ignore_ascii_case("WITH"),
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
                if starts("pg_") {
                    self.writes |=
                        is("pg_notify") || is("pg_current_xact_id") || starts("pg_advisory");
                    self.advisory_lock |=
                        starts("pg_advisory_lock") || starts("pg_try_advisory_lock");
                }
            }
            b's' => {
                self.writes |= is("setval");
                self.from_stdin |= is("STDIN") && prev.eq_ignore_ascii_case("FROM");
            }
            b't' => {
                self.writes |= is("txid_current");
                if is("TEMP") || is("TEMPORARY") {
                    self.temp = true;
                    self.into_temp |= prev.eq_ignore_ascii_case("INTO");
                }
            }
            b'u' => self.writes |= is("UPDATE"),
            _ => {}
        }
    }
}

/// The variable a session-level SET assigns, via sqlparser; `None` when it cannot tell.
fn set_variable(stmt: &str) -> Option<String> {
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
fn name_after(stmt: &str, skip: usize) -> String {
    let mut lex = Lexer::new(stmt);
    let mut seen = 0;
    while let Some(tok) = lex.next_token() {
        match tok {
            Token::Word(w) if seen == skip => return w.to_ascii_lowercase(),
            Token::Quoted(q) if seen == skip => return q.to_owned(),
            Token::Word(_) => seen += 1,
            _ => return String::new(),
        }
    }
    String::new()
}

#[derive(Debug, PartialEq, Eq)]
enum Token<'a> {
    Word(&'a str),
    /// A double-quoted identifier's content.
    Quoted(&'a str),
    Semicolon,
    Other(char),
}

const SPACE: u8 = 1;
const WORD: u8 = 2;
const DIGIT: u8 = 4;
const DOLLAR: u8 = 8;

/// What each byte can be in a token: whitespace, the start of a word (a letter, `_`, or any
/// byte of a non-ASCII character), a digit, or `$` (inside a word or a parameter).
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
            DOLLAR
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
struct Lexer<'a> {
    src: &'a str,
    pos: usize,
    /// Whether backslashes escape in `'…'` too (see [`Strings`]).
    backslash_strings: bool,
}

impl<'a> Lexer<'a> {
    fn new(src: &'a str) -> Self {
        Self {
            src,
            pos: 0,
            backslash_strings: false,
        }
    }

    fn rest(&self) -> &'a [u8] {
        &self.src.as_bytes()[self.pos..]
    }

    #[inline(always)]
    fn next_token(&mut self) -> Option<Token<'a>> {
        let bytes = self.src.as_bytes();
        loop {
            let b = *bytes.get(self.pos)?;
            match CLASS[usize::from(b)] {
                SPACE => self.pos += 1,
                WORD => {
                    let start = self.pos;
                    self.pos = skip_while(bytes, start + 1, WORD | DIGIT | DOLLAR);
                    // E'…' is a string with backslash escapes, not a word.
                    if self.pos == start + 1
                        && (b == b'E' || b == b'e')
                        && bytes.get(self.pos) == Some(&b'\'')
                    {
                        self.skip_string(true);
                        return Some(Token::Other('\''));
                    }
                    return Some(Token::Word(&self.src[start..self.pos]));
                }
                // A number is one token, whatever its length.
                DIGIT => {
                    self.pos = skip_while(bytes, self.pos + 1, DIGIT);
                    return Some(Token::Other('0'));
                }
                _ => match b {
                    b'-' if self.rest().starts_with(b"--") => {
                        let end = self.rest().iter().position(|&c| c == b'\n');
                        self.pos = end.map_or(self.src.len(), |e| self.pos + e + 1);
                    }
                    b'/' if self.rest().starts_with(b"/*") => self.skip_block_comment(),
                    b';' => {
                        self.pos += 1;
                        return Some(Token::Semicolon);
                    }
                    b'\'' => {
                        self.skip_string(self.backslash_strings);
                        return Some(Token::Other('\''));
                    }
                    b'"' => {
                        let start = self.pos + 1;
                        // An unclosed identifier runs to the end of the text.
                        let (end, next) = match self.rest()[1..].iter().position(|&c| c == b'"') {
                            Some(e) => (start + e, start + e + 1),
                            None => (self.src.len(), self.src.len()),
                        };
                        self.pos = next;
                        return Some(Token::Quoted(&self.src[start..end]));
                    }
                    b'$' if self.skip_dollar_quote() => return Some(Token::Other('$')),
                    // Every byte of a non-ASCII character is a word byte, so this is ASCII.
                    _ => {
                        self.pos += 1;
                        return Some(Token::Other(char::from(b)));
                    }
                },
            }
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
        self.pos = match self.src[body_start..].find(tag) {
            Some(end) => body_start + end + tag.len(),
            None => self.src.len(),
        };
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(sql: &str) -> Vec<Statement> {
        classify(sql).statements
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
        assert_eq!(kinds("VACUUM ANALYZE t"), [Statement::Write]);
        assert_eq!(kinds("DO $$ BEGIN PERFORM 1; END $$"), [Statement::Write]);
        assert_eq!(kinds("select 'commit; begin'"), [Statement::Read]);
        assert_eq!(kinds("select $a$ ; $a$, $1"), [Statement::Read]);
        assert_eq!(kinds("-- only a comment\n"), Vec::<Statement>::new());
        assert!(classify("UPDATE t SET a = 1; SELECT 1").may_write());
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
            classify_into(sql, strings, &mut out);
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
