//! What in a database makes a statement write though its text does not show it (see
//! [`Suspects`]), for a gateway that can move sessions. A login asks the catalog on its own
//! backend unless its database's answer is fresh; while sessions use a database, a task asks
//! again every `failover.catalog_refresh_ms` on a control connection, and soon after a session
//! runs DDL that may have made a suspect; each session takes the newest answer at its next
//! ReadyForQuery. A session that moves with requests whose judgement rests on the answer asks
//! the new primary again (see [`Feed::since`]).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::sync::{watch, Notify};
use understudy_replay::classify::Suspects;

use crate::error::SessionError;
use crate::lock;
use crate::stream::Stream;
use crate::topology::{control_client, Backend, Topology};

/// The question: relations whose reading may run a function that may write (views, through
/// their rules; tables, through their row-level security policies; views over those in
/// turn), and functions outside `pg_catalog` named like one in it. A function may write if it
/// is volatile: a stable or immutable one promises not to (PostgreSQL's own views and schemas
/// are left out: their volatile functions read statistics). Every name and operator is
/// qualified, so that nothing of a `search_path` runs in their place.
const SUSPECTS_SQL: &str = "\
WITH RECURSIVE writers AS (
  SELECT p.oid FROM pg_catalog.pg_proc p WHERE p.provolatile OPERATOR(pg_catalog.=) 'v'
), suspect(rel) AS (
  SELECT r.ev_class FROM pg_catalog.pg_depend d
    JOIN pg_catalog.pg_rewrite r ON r.oid OPERATOR(pg_catalog.=) d.objid
   WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_rewrite'::pg_catalog.regclass
     AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass
     AND d.refobjid IN (SELECT oid FROM writers)
  UNION
  SELECT p.polrelid FROM pg_catalog.pg_depend d
    JOIN pg_catalog.pg_policy p ON p.oid OPERATOR(pg_catalog.=) d.objid
   WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_policy'::pg_catalog.regclass
     AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass
     AND d.refobjid IN (SELECT oid FROM writers)
  UNION
  SELECT r.ev_class FROM suspect s
    JOIN pg_catalog.pg_depend d
      ON d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
     AND d.refobjid OPERATOR(pg_catalog.=) s.rel
     AND d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_rewrite'::pg_catalog.regclass
    JOIN pg_catalog.pg_rewrite r ON r.oid OPERATOR(pg_catalog.=) d.objid
), system AS (
  SELECT n.oid FROM pg_catalog.pg_namespace n
   WHERE n.nspname OPERATOR(pg_catalog.=) ANY ('{pg_catalog,information_schema}')
)
SELECT pg_catalog.json_build_array(
  (SELECT COALESCE(pg_catalog.json_agg(DISTINCT c.relname), '[]')
     FROM pg_catalog.pg_class c
    WHERE c.oid IN (SELECT rel FROM suspect)
      AND c.relnamespace NOT IN (SELECT oid FROM system)),
  (SELECT COALESCE(pg_catalog.json_agg(DISTINCT p.proname), '[]')
     FROM pg_catalog.pg_proc p
    WHERE p.provolatile OPERATOR(pg_catalog.=) 'v'
      AND p.pronamespace NOT IN (SELECT oid FROM system)
      AND EXISTS (SELECT FROM pg_catalog.pg_proc b
                   WHERE b.proname OPERATOR(pg_catalog.=) p.proname
                     AND b.pronamespace OPERATOR(pg_catalog.=) 'pg_catalog'::pg_catalog.regnamespace))
)::text";

/// How long a database's answer stands before a login asks again (a refresh keeps it fresh).
const FRESH_FOR: Duration = Duration::from_secs(60);

/// The shortest time between two refreshes of a database's answer, however often sessions
/// run DDL: the question costs the primary a few milliseconds.
const MIN_GAP: Duration = Duration::from_millis(250);

/// How long a moving session waits for another session's question at the same move before
/// it asks on its own backend (see [`Feed::since`]).
const OTHERS_QUESTION_WAIT: Duration = Duration::from_secs(1);

/// How long a refresh's question may take.
const QUESTION_TIMEOUT: Duration = Duration::from_secs(10);

/// The suspects known, by database.
pub struct CatalogSuspects {
    databases: Mutex<HashMap<String, Arc<Entry>>>,
    topology: Arc<Topology>,
    /// How often a database's answer is refreshed while sessions use it; `None`: at logins.
    every: Option<Duration>,
    connect_timeout: Duration,
}

/// One database's answer.
#[derive(Debug)]
struct Entry {
    database: String,
    /// The newest answer; sessions hold its receivers.
    latest: watch::Sender<Arc<Suspects>>,
    /// When the question `latest` answers was asked, if one was answered.
    learned_at: Mutex<Option<Instant>>,
    /// Held by the session asking at a move (see [`Feed::since`]).
    asking: tokio::sync::Mutex<()>,
    /// Whether a task refreshes the answer.
    refreshed: AtomicBool,
    /// Woken by a session that ran DDL which may have made a suspect.
    changed: Notify,
    /// When a failed question was last logged.
    warned: Mutex<Option<Instant>>,
}

impl Entry {
    fn fresh(&self) -> bool {
        lock(&self.learned_at).is_some_and(|at| at.elapsed() < FRESH_FOR)
    }

    /// Publishes the answer to a question `asked` then.
    fn publish(&self, suspects: Suspects, asked: Instant) {
        metrics::counter!("understudy_catalog_questions_total", "outcome" => "answered")
            .increment(1);
        *lock(&self.learned_at) = Some(asked);
        self.latest.send_if_modified(|latest| {
            let modified = **latest != suspects;
            if modified {
                *latest = Arc::new(suspects);
            }
            modified
        });
    }

    /// Publishes `answer`, to a question `asked` then, if it is one; else counts and logs the
    /// failure of the question asked `how`. Whether it was.
    fn take(&self, answer: Option<&[u8]>, asked: Instant, how: &str) -> bool {
        match answer.and_then(parse) {
            Some(suspects) => {
                self.publish(suspects, asked);
                true
            }
            None => {
                self.unanswered(how, "the question failed", true);
                false
            }
        }
    }

    /// Counts a failed question, and if `log`, logs it (at most once a minute per database).
    fn unanswered(&self, how: &str, why: &str, log: bool) {
        metrics::counter!("understudy_catalog_questions_total", "outcome" => "failed").increment(1);
        if !log {
            tracing::debug!(
                database = self.database,
                how,
                why,
                "catalog question failed"
            );
            return;
        }
        let mut warned = lock(&self.warned);
        if warned.is_some_and(|at| at.elapsed() < FRESH_FOR) {
            return;
        }
        *warned = Some(Instant::now());
        tracing::warn!(
            database = self.database,
            how,
            why,
            "could not read from the catalog which views and functions may write; statements that read them count as reads until an answer comes"
        );
    }
}

/// What the gateway knows of one database's suspects (`/status`).
#[derive(Debug, serde::Serialize)]
pub struct CatalogStatus {
    /// The database.
    pub database: String,
    /// How long ago the answer was learned, in ms; none if no question succeeded.
    pub learned_ms_ago: Option<u64>,
    /// Whether a task refreshes the answer (sessions use the database).
    pub refreshed: bool,
    /// Relations whose reading may write.
    pub relations: Vec<String>,
    /// Functions named like read-only built-ins that may write.
    pub functions: Vec<String>,
}

/// A session's line to its database's suspects.
#[derive(Debug)]
pub struct Feed {
    rx: watch::Receiver<Arc<Suspects>>,
    entry: Arc<Entry>,
}

impl Feed {
    /// The suspects now.
    pub fn current(&mut self) -> Arc<Suspects> {
        self.rx.borrow_and_update().clone()
    }

    /// The suspects, if they changed since the session last took them.
    pub fn newer(&mut self) -> Option<Arc<Suspects>> {
        self.rx
            .has_changed()
            .unwrap_or(false)
            .then(|| self.current())
    }

    /// Has the catalog read again soon: the session ran DDL that may have made a suspect.
    pub fn catalog_changed(&self) {
        self.entry.changed.notify_one();
    }

    /// The suspects as the catalog has had them since `since`: the answer to a question asked
    /// since then, or else to the catalog question, run by `ask` (on the session's new backend
    /// at a move, say). The database's sessions ask one at a time, so that those moving together
    /// take the first one's answer (waiting for it a second at most). `None` if the question
    /// failed.
    pub async fn since<F: Future<Output = Option<String>>>(
        &mut self,
        since: Instant,
        ask: impl FnOnce(&'static str) -> F,
    ) -> Option<Arc<Suspects>> {
        let entry = self.entry.clone();
        let _one_at_a_time = crate::clock::timeout(OTHERS_QUESTION_WAIT, entry.asking.lock())
            .await
            .ok();
        if lock(&entry.learned_at).is_none_or(|at| at < since) {
            let asked = Instant::now();
            let answer = ask(SUSPECTS_SQL).await;
            if !entry.take(answer.as_deref().map(str::as_bytes), asked, "at a move") {
                return None;
            }
        }
        Some(self.current())
    }
}

impl CatalogSuspects {
    /// Suspects read at logins and, every `every` if given, by a task per database in use
    /// (connecting to the primary of `topology` as its control role).
    pub fn new(
        topology: Arc<Topology>,
        every: Option<Duration>,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            databases: Mutex::default(),
            topology,
            every,
            connect_timeout,
        }
    }

    /// The suspects of `database`, for a session: the answer known if it is fresh, or asked on
    /// `stream`, a backend just logged in there and idle (see [`crate::grants::ask`] for `buf`).
    /// Without an answer (the question failed: a `statement_timeout` of the login's, say) the
    /// session has what was known before, and the next login asks again (one login's failure
    /// does not stand for the others').
    pub async fn of(
        &self,
        database: &str,
        stream: &mut Stream,
        buf: &mut BytesMut,
    ) -> Result<Feed, SessionError> {
        let entry = self.entry(database);
        if !entry.fresh() {
            let asked = Instant::now();
            let answer = crate::grants::ask(stream, buf, SUSPECTS_SQL).await?;
            entry.take(answer.as_deref(), asked, "at login");
        }
        let feed = Feed {
            rx: entry.latest.subscribe(),
            entry: entry.clone(),
        };
        self.keep_fresh(entry);
        Ok(feed)
    }

    /// What is known of each database, for `/status`.
    pub fn statuses(&self) -> Vec<CatalogStatus> {
        let entries: Vec<Arc<Entry>> = lock(&self.databases).values().cloned().collect();
        let mut statuses: Vec<CatalogStatus> = entries
            .iter()
            .map(|e| {
                let (relations, functions) = e.latest.borrow().names();
                CatalogStatus {
                    database: e.database.clone(),
                    learned_ms_ago: lock(&e.learned_at)
                        .map(|at| u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX)),
                    refreshed: e.refreshed.load(Ordering::Acquire),
                    relations,
                    functions,
                }
            })
            .collect();
        statuses.sort_unstable_by(|a, b| a.database.cmp(&b.database));
        statuses
    }

    fn entry(&self, database: &str) -> Arc<Entry> {
        lock(&self.databases)
            .entry(database.to_owned())
            .or_insert_with(|| {
                Arc::new(Entry {
                    database: database.to_owned(),
                    latest: watch::Sender::new(Arc::default()),
                    learned_at: Mutex::new(None),
                    refreshed: AtomicBool::new(false),
                    asking: tokio::sync::Mutex::new(()),
                    changed: Notify::new(),
                    warned: Mutex::new(None),
                })
            })
            .clone()
    }

    /// Starts the refresh of `entry` unless it runs.
    fn keep_fresh(&self, entry: Arc<Entry>) {
        let Some(every) = self.every else { return };
        if entry.refreshed.swap(true, Ordering::AcqRel) {
            return;
        }
        let refresh = Refresh {
            entry,
            topology: self.topology.clone(),
            connect_timeout: self.connect_timeout,
            client: None,
        };
        tokio::spawn(refresh.run(every));
    }
}

/// The task that keeps one database's answer fresh while sessions use it.
struct Refresh {
    entry: Arc<Entry>,
    topology: Arc<Topology>,
    connect_timeout: Duration,
    /// The control connection to the database, and the backend it goes to.
    client: Option<(Backend, tokio_postgres::Client)>,
}

impl Refresh {
    async fn run(mut self, every: Duration) {
        let mut failures = 0u32;
        loop {
            tokio::select! {
                () = crate::clock::sleep(every) => {}
                () = self.entry.changed.notified() => {}
            }
            if !self.in_use() {
                return;
            }
            match self.ask().await {
                Ok(()) => failures = 0,
                Err(why) => {
                    self.client = None;
                    failures += 1;
                    // One failure is a connection a failover or a restart broke: the next
                    // round connects again.
                    self.entry
                        .unanswered("on a control connection", &why, failures > 1);
                }
            }
            crate::clock::sleep(MIN_GAP).await;
        }
    }

    /// Whether a session still takes this database's answer; if none does, the task is over
    /// (the next login starts another).
    fn in_use(&self) -> bool {
        let entry = &self.entry;
        if entry.latest.receiver_count() > 0 {
            return true;
        }
        entry.refreshed.store(false, Ordering::Release);
        // A login that subscribed meanwhile found this task running: unless one started
        // another since, this one goes on.
        entry.latest.receiver_count() > 0 && !entry.refreshed.swap(true, Ordering::AcqRel)
    }

    /// Asks the primary's catalog, connecting first if need be.
    async fn ask(&mut self) -> Result<(), String> {
        let Some(primary) = self.topology.current_primary() else {
            return Ok(());
        };
        if self.client.as_ref().is_none_or(|(b, _)| *b != primary) {
            let mut control = self.topology.control().clone();
            control.login.database.clone_from(&self.entry.database);
            let client = control_client(
                &primary,
                &control,
                "understudy-catalog",
                self.connect_timeout,
            )
            .await?;
            self.client = Some((primary, client));
        }
        let Some((_, client)) = &self.client else {
            return Ok(());
        };
        let asked = Instant::now();
        let messages = crate::clock::timeout(QUESTION_TIMEOUT, client.simple_query(SUSPECTS_SQL))
            .await
            .map_err(|_| format!("no answer within {QUESTION_TIMEOUT:?}"))?
            .map_err(|e| crate::topology::error_text(&e))?;
        let suspects = messages
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0),
                _ => None,
            })
            .and_then(|answer| parse(answer.as_bytes()))
            .ok_or("the answer could not be read")?;
        self.entry.publish(suspects, asked);
        Ok(())
    }
}

/// Reads the question's answer: `[[relation, …], [function, …]]`.
fn parse(answer: &[u8]) -> Option<Suspects> {
    let (relations, calls): (Vec<String>, Vec<String>) = serde_json::from_slice(answer).ok()?;
    Some(Suspects::new(relations, calls))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read() {
        let s = parse(br#"[["vw", "Logged View"], ["abs"]]"#).unwrap();
        assert_eq!(
            s,
            Suspects::new(["vw".into(), "Logged View".into()], ["abs".into()])
        );
        assert_eq!(parse(b"[[], []]"), Some(Suspects::default()));
        assert_eq!(parse(b"not json"), None);
    }
}
