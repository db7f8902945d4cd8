//! What in a database makes a statement write though its text does not show it (see
//! [`Suspects`]): asked of the catalog on a session's own backend at login, by a gateway that
//! can move sessions, at most once a minute per database. A session classifies its statements
//! knowing what its database had at its login (or up to a minute before).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use understudy_replay::classify::Suspects;

use crate::error::SessionError;
use crate::stream::Stream;

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

/// How long a database's answer stands before a login asks again.
const FRESH_FOR: Duration = Duration::from_secs(60);

/// The suspects known, by database, and when they were learned.
#[derive(Debug, Default)]
pub struct CatalogSuspects {
    known: Mutex<HashMap<String, (Arc<Suspects>, Instant)>>,
    /// When a failed question was last logged, by database.
    warned: Mutex<HashMap<String, Instant>>,
}

impl CatalogSuspects {
    /// The suspects of `database`: known from the last minute, or asked on `stream`, a backend
    /// just logged in there and idle (see [`crate::grants::ask`] for `buf`). Without an answer
    /// (the question failed: a `statement_timeout` of the login's, say) that session has none,
    /// as before there was a question, and the next login asks again (one login's failure
    /// does not stand for the others'); the warning is logged at most once a minute.
    pub async fn of(
        &self,
        database: &str,
        stream: &mut Stream,
        buf: &mut BytesMut,
    ) -> Result<Arc<Suspects>, SessionError> {
        if let Some(known) = self.fresh(database) {
            return Ok(known);
        }
        let answer = crate::grants::ask(stream, buf, SUSPECTS_SQL).await?;
        let Some(suspects) = answer.as_deref().and_then(parse) else {
            self.warn_unanswered(database);
            return Ok(Arc::default());
        };
        let suspects = Arc::new(suspects);
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        known.insert(database.to_owned(), (suspects.clone(), Instant::now()));
        Ok(suspects)
    }

    fn warn_unanswered(&self, database: &str) {
        let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        if warned
            .get(database)
            .is_some_and(|at| at.elapsed() < FRESH_FOR)
        {
            return;
        }
        warned.insert(database.to_owned(), Instant::now());
        tracing::warn!(
            database,
            "could not read from the catalog which views and functions may write; a session without that answer counts statements that read them as reads"
        );
    }

    fn fresh(&self, database: &str) -> Option<Arc<Suspects>> {
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let (suspects, at) = known.get(database)?;
        (at.elapsed() < FRESH_FOR).then(|| suspects.clone())
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
