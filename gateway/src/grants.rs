//! Whether a role may run the gateway's xid capture (`EXECUTE` on
//! `pg_current_xact_id_if_assigned()`, which PUBLIC has unless it was revoked). Asked at login,
//! at most once a minute per database and login (role and startup `options`, which may name
//! another role): a session whose role may not does without the capture from its start,
//! instead of having its first write fail with the capture's `42501`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use understudy_protocol::encode;
use understudy_protocol::inspect::{self, ErrorView};
use understudy_protocol::tags::backend;

use crate::error::SessionError;
use crate::stream::Stream;
use crate::wire::{read_message, send, ReadError};

/// The question, asked on the session's own backend: privileges are per database, and the
/// answer is for the role the session runs as.
const GRANT_SQL: &str = "SELECT pg_catalog.has_function_privilege('pg_catalog.pg_current_xact_id_if_assigned()', 'EXECUTE')";

/// How long an answer stands before a login asks again (a GRANT or REVOKE since then shows).
const FRESH_FOR: Duration = Duration::from_secs(60);

/// How many answers one database keeps before the stale ones are dropped.
const PRUNE_ABOVE: usize = 1024;

/// Each login's answer in one database (see [`login_key`]), and when it was given.
type RoleAnswers = HashMap<String, (bool, Instant)>;

/// A login as the answers are kept by: the role, and the startup `options` (`-c role=…` runs
/// the session as another role).
pub fn login_key(user: &str, options: Option<&[u8]>) -> String {
    match options {
        Some(options) if !options.is_empty() => format!("{user}\0{}", options.escape_ascii()),
        _ => user.to_owned(),
    }
}

/// The answers known, by database and login.
#[derive(Debug, Default)]
pub struct CaptureGrants {
    answers: Mutex<HashMap<String, RoleAnswers>>,
}

impl CaptureGrants {
    /// Whether `login` may run the capture in `database`, if that was learned in the last minute.
    fn fresh(&self, database: &str, login: &str) -> Option<bool> {
        let answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        let (may, at) = answers.get(database)?.get(login)?;
        (at.elapsed() < FRESH_FOR).then_some(*may)
    }

    fn record(&self, database: &str, login: &str, may: bool) {
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        let logins = answers.entry(database.to_owned()).or_default();
        // Logins with `options` of their own each add one: the stale go before there are many.
        if logins.len() >= PRUNE_ABOVE {
            logins.retain(|_, (_, at)| at.elapsed() < FRESH_FOR);
        }
        logins.insert(login.to_owned(), (may, Instant::now()));
    }

    /// Forgets the answer for `login` in `database` (a capture of its session failed with
    /// `42501`), so that its next login asks again.
    pub fn forget(&self, database: &str, login: &str) {
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(logins) = answers.get_mut(database) {
            logins.remove(login);
        }
    }

    /// Whether the session that just logged in on `stream` may run the capture: known, or
    /// asked there (the backend is idle, its ReadyForQuery read; see [`ask`] for `buf`).
    /// Without an answer (the question failed) the capture is tried, as before there was a
    /// question.
    pub async fn may_capture(
        &self,
        database: &str,
        login: &str,
        stream: &mut Stream,
        buf: &mut BytesMut,
    ) -> Result<bool, SessionError> {
        if let Some(may) = self.fresh(database, login) {
            return Ok(may);
        }
        let answer = ask(stream, buf, GRANT_SQL)
            .await?
            .map(|value| value == b"t");
        if let Some(may) = answer {
            self.record(database, login, may);
        }
        Ok(answer.unwrap_or(true))
    }
}

/// Runs `sql`, a query of one row and column, on an idle backend just logged in; the value, if
/// it gave one. Messages the server sends the client meanwhile (a parameter report, a
/// notification, a FATAL) are left at the front of `buf` for the session to pass on; notices
/// are the question's (a `LOG` of it where `client_min_messages` shows those), dropped as for
/// the gateway's other queries.
pub async fn ask(
    stream: &mut Stream,
    buf: &mut BytesMut,
    sql: &str,
) -> Result<Option<Vec<u8>>, SessionError> {
    ask_on(stream, buf, sql).await.map_err(|e| match e {
        ReadError::Io(e) => SessionError::BackendLost(e),
        ReadError::Frame(e) => SessionError::BackendLost(std::io::Error::other(e)),
    })
}

async fn ask_on(
    stream: &mut Stream,
    buf: &mut BytesMut,
    sql: &str,
) -> Result<Option<Vec<u8>>, ReadError> {
    let mut question = BytesMut::new();
    encode::internal_query(&mut question, sql);
    send(stream, &question).await?;
    let mut answer = None;
    let mut passed = BytesMut::new();
    loop {
        let frame = read_message(stream, buf, usize::MAX >> 1).await?;
        let body = &frame.raw[5..];
        match frame.tag {
            backend::DATA_ROW => answer = inspect::first_column(body).map(<[u8]>::to_vec),
            backend::READY_FOR_QUERY => break,
            backend::ERROR_RESPONSE if ErrorView::parse(body).is_fatal() => {
                passed.extend_from_slice(&frame.raw);
                break;
            }
            backend::NOTIFICATION_RESPONSE | backend::PARAMETER_STATUS => {
                passed.extend_from_slice(&frame.raw)
            }
            // The completions of the question's own requests, its error, its notices.
            _ => {}
        }
    }
    if !passed.is_empty() {
        passed.extend_from_slice(buf);
        *buf = passed;
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers are kept per database and login (`options` included), and a forgotten one is
    /// asked again.
    #[test]
    fn answers_are_kept_per_database_and_login_until_forgotten() {
        let grants = CaptureGrants::default();
        let (plain, as_other) = (login_key("u", None), login_key("u", Some(b"-c role=v")));
        assert_eq!(login_key("u", Some(b"")), plain);
        assert_ne!(plain, as_other);
        grants.record("d", &plain, false);
        grants.record("d", &as_other, true);
        assert_eq!(grants.fresh("d", &plain), Some(false));
        assert_eq!(grants.fresh("d", &as_other), Some(true));
        assert_eq!(grants.fresh("other", &plain), None);
        grants.forget("d", &plain);
        assert_eq!(grants.fresh("d", &plain), None);
        assert_eq!(grants.fresh("d", &as_other), Some(true));
    }

    /// A database's stale answers are dropped once there are many; fresh ones stay.
    #[test]
    fn stale_answers_go_once_there_are_many() {
        let grants = CaptureGrants::default();
        let Some(stale) = Instant::now().checked_sub(FRESH_FOR * 2) else {
            return;
        };
        grants.record("d", "fresh", true);
        {
            let mut answers = grants.answers.lock().unwrap();
            let logins = answers.get_mut("d").unwrap();
            for i in 0..PRUNE_ABOVE {
                logins.insert(format!("old{i}"), (true, stale));
            }
        }
        grants.record("d", "new", false);
        let answers = grants.answers.lock().unwrap();
        let mut left: Vec<&str> = answers["d"].keys().map(String::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["fresh", "new"]);
    }
}
