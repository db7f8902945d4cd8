//! The registry of live sessions: what `/status` shows and where cancel requests go.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use serde::Serialize;
use understudy_protocol::startup::CancelKey;

use crate::lock;
use crate::stream::PeerAddr;
use crate::topology::Backend;

/// Where a cancel for a session must go now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelTarget {
    /// The backend the session is connected to.
    pub backend: PeerAddr,
    /// The backend's own key.
    pub key: CancelKey,
}

/// Whether a session could be logged in again on another server without its client.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "movable", content = "reason", rename_all = "snake_case")]
pub enum Movability {
    /// The gateway holds what it needs to log in again.
    Yes,
    /// It does not, and why.
    No(String),
}

/// What the registry knows of one session.
#[derive(Debug)]
pub struct SessionInfo {
    /// Gateway-wide session number.
    pub id: u64,
    /// Client address (a Unix-domain socket's: the path of the gateway's socket).
    pub client: PeerAddr,
    /// Whether the client connection uses TLS.
    pub tls: bool,
    /// Role name.
    pub user: String,
    /// Database name.
    pub database: String,
    /// When the client connected.
    pub started: SystemTime,
    /// Last transaction status byte seen in ReadyForQuery (0 before the first).
    pub txn_status: AtomicU8,
    /// Whether a request is in flight (sent on, its ReadyForQuery not back yet).
    pub active: AtomicBool,
    /// Whether the session is held at a transaction boundary by the gateway's pause.
    pub held: AtomicBool,
    /// A cancel for the request in flight could not reach the backend (see
    /// [`Registry::note_missed_cancel`]); cleared when the session is idle again.
    pub missed_cancel: AtomicBool,
    detail: Mutex<Detail>,
}

#[derive(Debug, Default)]
struct Detail {
    backend: Option<PeerAddr>,
    backend_pid: Option<i32>,
    movable: Option<Movability>,
}

/// JSON form of a session for `/status`.
#[derive(Debug, Serialize)]
pub struct SessionStatus {
    /// Session number.
    pub id: u64,
    /// Client address.
    pub client: String,
    /// TLS in use.
    pub tls: bool,
    /// Role.
    pub user: String,
    /// Database.
    pub database: String,
    /// Seconds since connect.
    pub age_secs: u64,
    /// Backend address.
    pub backend: Option<String>,
    /// Backend process ID.
    pub backend_pid: Option<i32>,
    /// `idle`, `in_transaction`, `failed_transaction` or `starting`.
    pub transaction: &'static str,
    /// Whether a request is running (sent on, not answered yet), as `active` in
    /// `pg_stat_activity`.
    pub active: bool,
    /// Whether the gateway's pause holds it at a transaction boundary.
    pub held: bool,
    /// Whether the session could be moved, and why not.
    #[serde(flatten)]
    pub movable: Option<Movability>,
}

impl SessionInfo {
    fn lock(&self) -> MutexGuard<'_, Detail> {
        self.detail.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the backend the session now uses.
    pub fn set_backend(&self, addr: PeerAddr, pid: i32) {
        let mut d = self.lock();
        d.backend = Some(addr);
        d.backend_pid = Some(pid);
    }

    /// Records whether the session can be logged in again without its client.
    pub fn set_movable(&self, m: Movability) {
        self.lock().movable = Some(m);
    }

    /// Snapshot for `/status`.
    pub fn status(&self) -> SessionStatus {
        let d = self.lock();
        SessionStatus {
            id: self.id,
            client: self.client.to_string(),
            tls: self.tls,
            user: self.user.clone(),
            database: self.database.clone(),
            age_secs: self.started.elapsed().map(|d| d.as_secs()).unwrap_or(0),
            backend: d.backend.as_ref().map(|a| a.to_string()),
            backend_pid: d.backend_pid,
            transaction: match self.txn_status.load(Ordering::Relaxed) {
                b'I' => "idle",
                b'T' => "in_transaction",
                b'E' => "failed_transaction",
                _ => "starting",
            },
            active: self.active.load(Ordering::Relaxed),
            held: self.held.load(Ordering::Relaxed),
            movable: d.movable.clone(),
        }
    }
}

/// All live sessions and their cancel keys.
#[derive(Debug, Default)]
pub struct Registry {
    next_id: AtomicU64,
    /// Sessions with LISTENs in effect (so that a move looks for them only when there are).
    listening: AtomicUsize,
    /// How many of them have them in effect on each server.
    listeners: Mutex<HashMap<Backend, usize>>,
    sessions: Mutex<HashMap<u64, Arc<SessionInfo>>>,
    cancels: Mutex<HashMap<CancelKey, (CancelTarget, Arc<SessionInfo>)>>,
}

impl Registry {
    /// Adds a session; it leaves the registry when the returned guard drops.
    pub fn open(
        self: &Arc<Self>,
        client: PeerAddr,
        tls: bool,
        user: &str,
        database: &str,
    ) -> SessionGuard {
        let info = Arc::new(SessionInfo {
            id: self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            client,
            tls,
            user: user.to_owned(),
            database: database.to_owned(),
            started: SystemTime::now(),
            txn_status: AtomicU8::new(0),
            active: AtomicBool::new(false),
            held: AtomicBool::new(false),
            missed_cancel: AtomicBool::new(false),
            detail: Mutex::default(),
        });
        lock(&self.sessions).insert(info.id, info.clone());
        SessionGuard {
            registry: self.clone(),
            info,
            cancel_key: None,
            listens_on: None,
        }
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        lock(&self.sessions).len()
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Snapshots of all sessions, oldest first.
    pub fn statuses(&self) -> Vec<SessionStatus> {
        let mut v: Vec<_> = lock(&self.sessions).values().map(|s| s.status()).collect();
        v.sort_by_key(|s| s.id);
        v
    }

    /// The sessions not held by the pause (still in a transaction, or logging in).
    pub fn not_held(&self) -> Vec<u64> {
        let mut v: Vec<u64> = lock(&self.sessions)
            .values()
            .filter(|s| !s.held.load(Ordering::Relaxed))
            .map(|s| s.id)
            .collect();
        v.sort_unstable();
        v
    }

    /// How many sessions have LISTENs in effect on a server that `on` picks (a moved session
    /// waits for those on a fenced server to issue them on the new primary: see
    /// `Session::await_listeners`).
    pub fn listeners_on(&self, on: impl Fn(&Backend) -> bool) -> usize {
        if self.listening.load(Ordering::Acquire) == 0 {
            return 0;
        }
        lock(&self.listeners)
            .iter()
            .filter(|(server, _)| on(server))
            .map(|(_, n)| n)
            .sum()
    }

    /// Where a cancel quoting `key` must go, if the key is one the gateway issued.
    pub fn cancel_target(&self, key: &CancelKey) -> Option<CancelTarget> {
        lock(&self.cancels)
            .get(key)
            .map(|(target, _)| target.clone())
    }

    /// Notes that a cancel quoting `key` could not reach its backend (the session is moving
    /// off a primary that is gone): the session sends it to the new backend once moved.
    pub fn note_missed_cancel(&self, key: &CancelKey) {
        if let Some((_, info)) = lock(&self.cancels).get(key) {
            info.missed_cancel.store(true, Ordering::Relaxed);
        }
    }
}

/// A session's place in the registry; removes it (and its cancel key) on drop.
pub struct SessionGuard {
    registry: Arc<Registry>,
    info: Arc<SessionInfo>,
    cancel_key: Option<CancelKey>,
    /// The server where the session's LISTENs are in effect, if it has any.
    listens_on: Option<Backend>,
}

impl SessionGuard {
    /// The session's shared record.
    pub fn info(&self) -> &Arc<SessionInfo> {
        &self.info
    }

    /// Records that the session's LISTENs are in effect on `on` (`None`: it has none).
    pub fn set_listens_on(&mut self, on: Option<&Backend>) {
        if self.listens_on.as_ref() == on {
            return;
        }
        let mut listeners = lock(&self.registry.listeners);
        if let Some(was) = self.listens_on.take() {
            if let Some(n) = listeners.get_mut(&was) {
                *n -= 1;
                if *n == 0 {
                    listeners.remove(&was);
                }
            }
            self.registry.listening.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some(on) = on {
            *listeners.entry(on.clone()).or_default() += 1;
            self.registry.listening.fetch_add(1, Ordering::AcqRel);
            self.listens_on = Some(on.clone());
        }
    }

    /// The key the client was given, if any.
    pub fn cancel_key(&self) -> Option<CancelKey> {
        self.cancel_key
    }

    /// Issues the key the client will see: the backend's real PID and a fresh secret of the
    /// gateway's own, mapped to the backend's key. Re-issuing keeps the client's key and points
    /// it at the new target.
    pub fn issue_cancel_key(&mut self, target: CancelTarget) -> CancelKey {
        let mut cancels = lock(&self.registry.cancels);
        if let Some(key) = self.cancel_key {
            cancels.insert(key, (target, self.info.clone()));
            return key;
        }
        let key = loop {
            let key = CancelKey {
                pid: target.key.pid,
                secret: rand::random(),
            };
            if !cancels.contains_key(&key) {
                break key;
            }
        };
        cancels.insert(key, (target, self.info.clone()));
        self.cancel_key = Some(key);
        key
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.set_listens_on(None);
        if let Some(key) = self.cancel_key {
            lock(&self.registry.cancels).remove(&key);
        }
        lock(&self.registry.sessions).remove(&self.info.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    #[test]
    fn cancel_keys_map_and_vanish_with_the_session() {
        let reg = Arc::new(Registry::default());
        let client = PeerAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 1)));
        let backend = PeerAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 5432)));
        let mut g = reg.open(client, false, "u", "d");
        let target = CancelTarget {
            backend: backend.clone(),
            key: CancelKey { pid: 99, secret: 5 },
        };
        let key = g.issue_cancel_key(target.clone());
        assert_eq!(key.pid, 99, "the client sees the backend's real PID");
        assert_eq!(reg.cancel_target(&key), Some(target));
        let moved = CancelTarget {
            backend,
            key: CancelKey { pid: 7, secret: 8 },
        };
        assert_eq!(
            g.issue_cancel_key(moved.clone()),
            key,
            "the client's key survives a move"
        );
        assert_eq!(reg.cancel_target(&key), Some(moved));
        assert_eq!(reg.len(), 1);
        drop(g);
        assert_eq!(reg.cancel_target(&key), None);
        assert!(reg.is_empty());
    }

    /// Listeners are counted on the server they listen on, each once; sessions without
    /// LISTENs and sessions that left are not.
    #[test]
    fn listeners_are_counted_where_their_listens_are() {
        let reg = Arc::new(Registry::default());
        let client = PeerAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 1)));
        let (old, new) = (
            Backend::parse("127.0.0.1:5432").unwrap(),
            Backend::parse("127.0.0.1:5433").unwrap(),
        );
        let mut me = reg.open(client.clone(), false, "u", "d");
        let mut listener = reg.open(client.clone(), false, "u", "d");
        let _quiet = reg.open(client.clone(), false, "u", "d");
        let elsewhere = |than: &Backend| reg.listeners_on(|b| b != than);
        me.set_listens_on(Some(&old));
        listener.set_listens_on(Some(&old));
        assert_eq!(elsewhere(&new), 2);
        me.set_listens_on(Some(&new));
        me.set_listens_on(Some(&new));
        assert_eq!(elsewhere(&new), 1, "moved");
        assert_eq!(elsewhere(&old), 1);
        drop(listener);
        assert_eq!(elsewhere(&new), 0, "left");
        me.set_listens_on(None);
        me.set_listens_on(None);
        assert_eq!(elsewhere(&old), 0);
        assert_eq!(reg.listening.load(Ordering::Relaxed), 0);
    }
}
