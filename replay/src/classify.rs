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
    for stmt in split_statements(sql) {
        let words = leading_words(stmt, 4);
        let w = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
        let statement = match w(0) {
            "" => continue,
            "BEGIN" | "START" => Statement::Begin,
            "COMMIT" | "END" if w(1) == "PREPARED" => {
                out.hazards.push(Hazard::Unreplayable("two-phase commit"));
                Statement::Write
            }
            "COMMIT" | "END" => Statement::Commit,
            "ROLLBACK" | "ABORT" if w(1) == "TO" || w(2) == "TO" => Statement::Savepoint,
            "ROLLBACK" if w(1) == "PREPARED" => {
                out.hazards.push(Hazard::Unreplayable("two-phase commit"));
                Statement::Write
            }
            "ROLLBACK" | "ABORT" => Statement::Rollback,
            "SAVEPOINT" | "RELEASE" => Statement::Savepoint,
            "SELECT" | "WITH" | "VALUES" | "TABLE" | "SHOW" | "EXPLAIN" | "FETCH" | "MOVE" => {
                if is_read_only_text(stmt) {
                    Statement::Read
                } else {
                    Statement::Write
                }
            }
            "SET" => match w(1) {
                "LOCAL" | "TRANSACTION" | "CONSTRAINTS" => Statement::TransactionSetting,
                _ => Statement::Session(SessionChange::Set(set_variable(stmt))),
            },
            "RESET" => Statement::Session(SessionChange::Reset(match w(1) {
                "ALL" | "" => None,
                _ => Some(name_after(stmt, 1)),
            })),
            "DISCARD" => Statement::Session(SessionChange::Discard),
            "PREPARE" if w(1) == "TRANSACTION" => {
                out.hazards.push(Hazard::Unreplayable("two-phase commit"));
                Statement::Write
            }
            "PREPARE" => Statement::Session(SessionChange::Prepare(name_after(stmt, 1))),
            "DEALLOCATE" => {
                let skip = if w(1) == "PREPARE" { 2 } else { 1 };
                Statement::Session(SessionChange::Deallocate(match w(skip) {
                    "ALL" | "" => None,
                    _ => Some(name_after(stmt, skip)),
                }))
            }
            "LISTEN" => Statement::Session(SessionChange::Listen(name_after(stmt, 1))),
            "UNLISTEN" => Statement::Session(SessionChange::Unlisten(match w(1) {
                "*" | "" => None,
                _ => Some(name_after(stmt, 1)),
            })),
            "DECLARE" => {
                if contains_words(stmt, &["WITH", "HOLD"]) {
                    out.hazards
                        .push(Hazard::Unmovable("a cursor declared WITH HOLD"));
                }
                Statement::Read
            }
            _ => Statement::Write,
        };
        scan_hazards(stmt, &words, &mut out.hazards);
        out.statements.push(statement);
    }
    out.hazards.dedup();
    out
}

/// Hazards visible in the statement's text.
fn scan_hazards(stmt: &str, words: &[String], hazards: &mut Vec<Hazard>) {
    let lower = stmt.to_ascii_lowercase();
    if words.first().map(String::as_str) == Some("CREATE")
        && words.iter().any(|w| w == "TEMP" || w == "TEMPORARY")
        || contains_words(stmt, &["INTO", "TEMP"])
        || contains_words(stmt, &["INTO", "TEMPORARY"])
    {
        hazards.push(Hazard::Unmovable("a temporary table"));
    }
    if ["pg_advisory_lock", "pg_try_advisory_lock"]
        .iter()
        .any(|f| lower.contains(f))
    {
        hazards.push(Hazard::Unmovable("a session-level advisory lock"));
    }
    if lower.contains("dblink") {
        hazards.push(Hazard::Unreplayable("dblink acts on another server"));
    }
    if words.first().map(String::as_str) == Some("COPY") && contains_words(stmt, &["PROGRAM"]) {
        hazards.push(Hazard::Unreplayable("COPY with an external program"));
    }
}

/// A SELECT-like statement reads only unless it locks rows or calls something known to write.
fn is_read_only_text(stmt: &str) -> bool {
    let upper_words = words(stmt);
    let writes = ["INSERT", "UPDATE", "DELETE", "MERGE", "FOR", "INTO"];
    if upper_words.iter().any(|w| writes.contains(&w.as_str())) {
        return false;
    }
    let lower = stmt.to_ascii_lowercase();
    ![
        "nextval",
        "setval",
        "pg_advisory",
        "lo_",
        "pg_notify",
        "txid_current",
        "pg_current_xact_id",
    ]
    .iter()
    .any(|f| lower.contains(f))
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

/// Splits a query string at top-level semicolons.
pub fn split_statements(sql: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut lex = Lexer::new(sql);
    while let Some(tok) = lex.next_token() {
        if tok == Token::Semicolon {
            out.push(&sql[start..lex.pos - 1]);
            start = lex.pos;
        }
    }
    if start < sql.len() {
        out.push(&sql[start..]);
    }
    out
}

/// The first `n` bare words, upper-cased.
fn leading_words(stmt: &str, n: usize) -> Vec<String> {
    let mut lex = Lexer::new(stmt);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match lex.next_token() {
            Some(Token::Word(w)) => out.push(w.to_ascii_uppercase()),
            Some(Token::Other('*')) => out.push("*".to_owned()),
            Some(Token::Quoted(_)) | Some(Token::Other(_)) => out.push(String::new()),
            Some(Token::Semicolon) | None => break,
        }
    }
    out
}

/// All bare words, upper-cased.
fn words(stmt: &str) -> Vec<String> {
    let mut lex = Lexer::new(stmt);
    let mut out = Vec::new();
    while let Some(tok) = lex.next_token() {
        if let Token::Word(w) = tok {
            out.push(w.to_ascii_uppercase());
        }
    }
    out
}

fn contains_words(stmt: &str, seq: &[&str]) -> bool {
    words(stmt)
        .windows(seq.len())
        .any(|w| w.iter().zip(seq).all(|(a, b)| a == b))
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

/// Skips whitespace, `--` and nested `/* */` comments, and string literals ('…', E'…', $tag$…$tag$).
struct Lexer<'a> {
    src: &'a str,
    pos: usize,
}

impl<'a> Lexer<'a> {
    fn new(src: &'a str) -> Self {
        Self { src, pos: 0 }
    }

    fn rest(&self) -> &'a [u8] {
        &self.src.as_bytes()[self.pos..]
    }

    fn next_token(&mut self) -> Option<Token<'a>> {
        loop {
            let b = *self.rest().first()?;
            match b {
                b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' => self.pos += 1,
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
                    self.skip_string(false);
                    return Some(Token::Other('\''));
                }
                b'E' | b'e' if self.rest().get(1) == Some(&b'\'') => {
                    self.pos += 1;
                    self.skip_string(true);
                    return Some(Token::Other('\''));
                }
                b'"' => {
                    let start = self.pos + 1;
                    let end = self.rest()[1..].iter().position(|&c| c == b'"');
                    self.pos = end.map_or(self.src.len(), |e| start + e + 1);
                    let content = &self.src[start..self.pos.saturating_sub(1).max(start)];
                    return Some(Token::Quoted(content));
                }
                b'$' if self.skip_dollar_quote() => return Some(Token::Other('$')),
                c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                    let start = self.pos;
                    while let Some(&c) = self.rest().first() {
                        if c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80 {
                            self.pos += 1;
                        } else {
                            break;
                        }
                    }
                    return Some(Token::Word(&self.src[start..self.pos]));
                }
                _ => {
                    let c = self.src[self.pos..].chars().next()?;
                    self.pos += c.len_utf8();
                    return Some(Token::Other(c));
                }
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
        ] {
            let _ = classify(sql);
        }
    }
}
