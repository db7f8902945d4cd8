//! The configured backends, their roles, and which one is the primary now.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{watch, Notify};

use crate::backend::Connector;
use crate::config::{Config, Control};
use crate::shutdown::Shutdown;
use crate::stream::Stream;

/// A configured PostgreSQL server.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Backend {
    /// Host name or address, as configured (also the TLS server name).
    pub host: String,
    /// Port.
    pub port: u16,
}

impl Backend {
    /// Parses `host:port` (or `[v6]:port`; port defaults to 5432).
    pub fn parse(s: &str) -> Result<Self, String> {
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') => (
                h.trim_start_matches('[').trim_end_matches(']'),
                p.parse()
                    .map_err(|_| format!("invalid port in backend {s:?}"))?,
            ),
            _ => (s, 5432),
        };
        if host.is_empty() {
            return Err(format!("empty host in backend {s:?}"));
        }
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }

    /// The Unix-domain socket to connect to when `host` is a directory (an absolute path, as
    /// libpq reads it): `<host>/.s.PGSQL.<port>`.
    pub fn socket_path(&self) -> Option<PathBuf> {
        self.host
            .starts_with('/')
            .then(|| Path::new(&self.host).join(format!(".s.PGSQL.{}", self.port)))
    }

    /// Resolves the host: every address, in the resolver's order.
    pub async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await?
            .collect();
        if addrs.is_empty() {
            return Err(std::io::Error::other(format!(
                "{} does not resolve",
                self.host
            )));
        }
        Ok(addrs)
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// What the last probe found a backend to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Not probed yet, or up but turning the probe away since it was last unreachable.
    Unknown,
    /// Accepts writes.
    Primary,
    /// In recovery (hot standby).
    Standby,
    /// Could not be reached or queried.
    Unreachable,
}

/// JSON form of a backend for `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct BackendStatus {
    /// `host:port`.
    pub address: String,
    /// Last known role.
    pub role: Role,
    /// Whether sessions are routed here.
    pub routed: bool,
    /// Seconds since the last probe, if any.
    pub probed_secs_ago: Option<f64>,
    /// Last probe error.
    pub error: Option<String>,
}

#[derive(Debug, Clone)]
struct Probe {
    role: Role,
    at: Option<Instant>,
    error: Option<String>,
    /// `pg_conf_load_time()` as the last probe that read it found it.
    conf_loaded: Option<String>,
}

/// Backends and the current primary.
#[derive(Debug)]
pub struct Topology {
    backends: Vec<Backend>,
    probes: Mutex<Vec<Probe>>,
    /// Old primaries a failover moved away from: never routed to as primaries again, until
    /// they come back in recovery (as standbys of the new primary).
    fenced: Mutex<Vec<bool>>,
    primary: watch::Sender<Option<usize>>,
    /// Told when a probe finds the routed primary, or the one it just routed away from,
    /// unreachable.
    primary_lost: Notify,
    /// Counts the configuration reloads the probes have seen on any backend.
    reloads: watch::Sender<u64>,
    control: ControlPlane,
    /// One control-plane connection per backend, kept between role probes and `auth_query`
    /// look-ups so that neither makes the server start a process each time.
    kept: Vec<Mutex<Option<Kept>>>,
    interval: Duration,
    /// Bound on an `auth_query` look-up (a login waits on it).
    timeout: Duration,
    /// Bound on a role probe (opening the kept connection when there is none, and the query):
    /// a server that does not answer within it is unreachable, and a routed primary in that
    /// state is probed again by the failover coordinator.
    probe_timeout: Duration,
}

/// A kept control-plane connection.
#[derive(Clone)]
struct Kept {
    client: Arc<tokio_postgres::Client>,
    /// Its connection task, aborted when the connection is given up as broken or hung.
    task: tokio::task::AbortHandle,
}

impl std::fmt::Debug for Kept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kept")
            .field("closed", &self.client.is_closed())
            .finish()
    }
}

/// How the gateway opens its own control-plane connections (role probes, `auth_query`,
/// health probes, promotion): as the control role, with the TLS of the session connections.
#[derive(Clone)]
pub struct ControlPlane {
    /// The role and database.
    pub login: Control,
    /// TCP and TLS as `backend_tls` says, without spares.
    pub connector: Connector,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("user", &self.login.user)
            .field("database", &self.login.database)
            .field("sslmode", &self.connector.sslmode)
            .finish()
    }
}

impl Topology {
    /// Backends from the configuration; a single backend is the primary without a probe.
    /// Control-plane connections are opened with `connector`.
    pub fn new(config: &Config, connector: Connector) -> Result<Self, String> {
        let backends = config
            .backends
            .iter()
            .map(|b| Backend::parse(b))
            .collect::<Result<Vec<_>, _>>()?;
        let single = (backends.len() == 1).then_some(0);
        let probes = vec![
            Probe {
                role: Role::Unknown,
                at: None,
                error: None,
                conf_loaded: None,
            };
            backends.len()
        ];
        Ok(Self {
            fenced: Mutex::new(vec![false; backends.len()]),
            kept: backends.iter().map(|_| Mutex::new(None)).collect(),
            backends,
            probes: Mutex::new(probes),
            primary: watch::Sender::new(single),
            primary_lost: Notify::new(),
            reloads: watch::Sender::new(0),
            control: ControlPlane {
                login: config.control.clone(),
                connector: Connector {
                    spares: None,
                    ..connector
                },
            },
            interval: Duration::from_millis(config.topology_interval_ms.max(50)),
            timeout: config.connect_timeout(),
            probe_timeout: config.failover.probe_timeout(),
        })
    }

    /// The primary, waiting up to `timeout` for one to be known.
    pub async fn primary(&self, timeout: Duration) -> Option<Backend> {
        let mut rx = self.primary.subscribe();
        let found = crate::clock::timeout(timeout, rx.wait_for(|p| p.is_some())).await;
        let index = (*found.ok()?.ok()?)?;
        self.backends.get(index).cloned()
    }

    /// The configured backends.
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// The primary sessions are routed to now.
    pub fn current_primary(&self) -> Option<Backend> {
        (*self.primary.borrow()).and_then(|i| self.backends.get(i).cloned())
    }

    /// Notices each change of the primary sessions are routed to.
    pub fn primary_changes(&self) -> watch::Receiver<Option<usize>> {
        self.primary.subscribe()
    }

    /// Changes each time a probe finds a backend has reloaded its configuration (`pg_hba.conf`
    /// among it) since the probe before.
    pub fn config_reloads(&self) -> watch::Receiver<u64> {
        self.reloads.subscribe()
    }

    /// Waits until the primary is known and differs from `old`.
    pub async fn primary_other_than(&self, old: &Backend, timeout: Duration) -> Option<Backend> {
        let mut rx = self.primary.subscribe();
        let found = crate::clock::timeout(
            timeout,
            rx.wait_for(|p| p.is_some_and(|i| self.backends.get(i) != Some(old))),
        )
        .await;
        let index = (*found.ok()?.ok()?)?;
        self.backends.get(index).cloned()
    }

    /// Routes sessions to `new` and fences `old` (a failover's outcome).
    pub fn switch_primary(&self, old: &Backend, new: &Backend) {
        let find = |b: &Backend| self.backends.iter().position(|x| x == b);
        if let Some(i) = find(old) {
            self.fenced.lock().unwrap_or_else(|e| e.into_inner())[i] = true;
        }
        if let Some(i) = find(new) {
            self.primary.send_replace(Some(i));
        }
    }

    /// Whether `b` is fenced.
    pub fn is_fenced(&self, b: &Backend) -> bool {
        let fenced = self.fenced.lock().unwrap_or_else(|e| e.into_inner());
        self.backends
            .iter()
            .position(|x| x == b)
            .is_some_and(|i| fenced[i])
    }

    /// Whether the last probe of `b` failed to reach it.
    pub fn unreachable(&self, b: &Backend) -> bool {
        self.backends
            .iter()
            .position(|x| x == b)
            .is_some_and(|i| probes_unreachable(&self.probes, i))
    }

    /// How the gateway opens control-plane connections.
    pub fn control(&self) -> &ControlPlane {
        &self.control
    }

    /// Why the last probes found no primary: each backend with its probe error, or its role
    /// when it answered (`"db1:5432: standby; db2:5432: connection refused"`).
    pub fn why_no_primary(&self) -> String {
        let probes = self.probes.lock().unwrap_or_else(|e| e.into_inner());
        let fenced = self.fenced.lock().unwrap_or_else(|e| e.into_inner());
        let mut text = String::new();
        for (i, (backend, probe)) in self.backends.iter().zip(probes.iter()).enumerate() {
            if !text.is_empty() {
                text.push_str("; ");
            }
            let what = match (&probe.error, probe.role) {
                (Some(error), _) => error.as_str(),
                (None, Role::Primary) if fenced[i] => "the old primary, fenced",
                (None, Role::Primary) => "primary",
                (None, Role::Standby) => "standby",
                (None, Role::Unknown) => "not probed yet",
                (None, Role::Unreachable) => "unreachable",
            };
            text.push_str(&format!("{backend}: {what}"));
        }
        text
    }

    /// Backends and roles for `/status`.
    pub fn statuses(&self) -> Vec<BackendStatus> {
        let probes = self
            .probes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let routed = *self.primary.borrow();
        self.backends
            .iter()
            .zip(probes)
            .enumerate()
            .map(|(i, (b, p))| BackendStatus {
                address: b.to_string(),
                role: p.role,
                routed: routed == Some(i),
                probed_secs_ago: p.at.map(|t| t.elapsed().as_secs_f64()),
                error: p.error,
            })
            .collect()
    }

    /// Probes every backend once and updates the primary.
    pub async fn probe_all(self: &Arc<Self>) {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..self.backends.len() {
            let topology = self.clone();
            set.spawn(async move { (i, topology.probe_kept(i).await) });
        }
        let mut results = vec![Err(ProbeError::down("probe did not finish")); self.backends.len()];
        while let Some(joined) = set.join_next().await {
            if let Ok((i, r)) = joined {
                results[i] = r;
            }
        }
        let now = Instant::now();
        let mut primaries = Vec::new();
        let mut reloaded = false;
        {
            let mut fenced = self.fenced.lock().unwrap_or_else(|e| e.into_inner());
            let mut probes = self.probes.lock().unwrap_or_else(|e| e.into_inner());
            for (i, result) in results.into_iter().enumerate() {
                let mut conf_loaded = probes[i].conf_loaded.take();
                if let Ok((_, Some(loaded))) = &result {
                    reloaded |= conf_loaded.as_ref().is_some_and(|seen| seen != loaded);
                    conf_loaded = Some(loaded.clone());
                }
                let (role, error) = match result {
                    Ok((true, _)) => (Role::Standby, None),
                    Ok((false, _)) => (Role::Primary, None),
                    // A server that turns the probe away is up: a full primary is still the
                    // primary (demotion takes a restart), not a failover. A standby's promotion
                    // shows once the probe gets in again.
                    Err(e) if e.server_up => match probes[i].role {
                        Role::Unreachable => (Role::Unknown, Some(e.text)),
                        known => (known, Some(e.text)),
                    },
                    Err(e) => (Role::Unreachable, Some(e.text)),
                };
                match role {
                    Role::Primary if !fenced[i] => primaries.push(i),
                    // A fenced old primary back in recovery follows the new primary: adopt it.
                    Role::Standby if fenced[i] => {
                        tracing::info!(backend = %self.backends[i], "fenced backend is back as a standby");
                        fenced[i] = false;
                    }
                    _ => {}
                }
                probes[i] = Probe {
                    role,
                    at: Some(now),
                    error,
                    conf_loaded,
                };
            }
        }
        if reloaded {
            self.reloads.send_modify(|n| *n += 1);
        }
        if self.backends.len() == 1 {
            return;
        }
        let current = *self.primary.borrow();
        let next = match primaries.as_slice() {
            [] => current,
            [one] => Some(*one),
            many => {
                tracing::warn!(
                    backends = ?many.iter().map(|&i| self.backends[i].to_string()).collect::<Vec<_>>(),
                    "more than one backend is out of recovery; keeping the current primary"
                );
                current.filter(|c| many.contains(c)).or(Some(many[0]))
            }
        };
        if next != current {
            if let Some(i) = next {
                tracing::info!(primary = %self.backends[i], "primary found");
            }
            self.primary.send_replace(next);
        }
        // The routed primary, or the one just routed away from, stopped answering.
        if [current, next]
            .into_iter()
            .flatten()
            .any(|i| probes_unreachable(&self.probes, i))
        {
            self.primary_lost.notify_one();
        }
    }

    /// Completes once a probe has found the routed primary, or the one it just routed away
    /// from, unreachable (at once if one did since the last call).
    pub async fn primary_lost(&self) {
        self.primary_lost.notified().await;
    }

    /// Asks backend `i` over the kept control connection whether it is in recovery, and when
    /// it last loaded its configuration.
    async fn probe_kept(&self, i: usize) -> Result<(bool, Option<String>), ProbeError> {
        let rows = self
            .control_query(
                i,
                "SELECT pg_is_in_recovery(), pg_conf_load_time()::text",
                &[],
                self.probe_timeout,
            )
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| ProbeError::down("pg_is_in_recovery() returned no row"))?;
        let in_recovery = row
            .try_get::<_, bool>(0)
            .map_err(|e| ProbeError::from(&e))?;
        Ok((in_recovery, row.try_get(1).ok()))
    }

    /// Runs `query` on the kept control connection to backend `i` within `timeout`, opening
    /// the connection first when there is none. A kept connection found broken (the server
    /// restarted, or someone terminated it) is replaced and the query sent once more, so a
    /// stale connection never reads as a backend that is down.
    async fn control_query(
        &self,
        i: usize,
        query: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        timeout: Duration,
    ) -> Result<Vec<tokio_postgres::Row>, ProbeError> {
        let work = async {
            let mut retried = false;
            loop {
                let (kept, fresh) = self.kept_connection(i).await?;
                let e = match kept.client.query(query, params).await {
                    Ok(rows) => return Ok(rows),
                    Err(e) => ProbeError::from(&e),
                };
                if e.server_up && !kept.client.is_closed() {
                    return Err(e);
                }
                self.give_up(i, &kept);
                if fresh || retried {
                    return Err(e);
                }
                retried = true;
            }
        };
        match crate::clock::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => {
                // A hung server: do not wait on that connection again.
                if let Some(kept) = self.kept_now(i) {
                    self.give_up(i, &kept);
                }
                Err(ProbeError::down(format!("no answer within {timeout:?}")))
            }
        }
    }

    /// The kept connection to backend `i`, and whether it was opened just now.
    async fn kept_connection(&self, i: usize) -> Result<(Kept, bool), ProbeError> {
        if let Some(kept) = self.kept_now(i).filter(|k| !k.client.is_closed()) {
            return Ok((kept, false));
        }
        let (client, conn) = open_control(
            &self.backends[i],
            &self.control,
            "understudy-control",
            self.timeout,
        )
        .await?;
        let kept = Kept {
            client: Arc::new(client),
            task: tokio::spawn(conn).abort_handle(),
        };
        let mut slot = self.kept[i].lock().unwrap_or_else(|e| e.into_inner());
        // Another task (a role probe, a login's auth_query) may have opened one meanwhile:
        // keep that one, or the query it is running would lose its connection.
        if let Some(other) = slot.as_ref().filter(|k| !k.client.is_closed()) {
            kept.task.abort();
            return Ok((other.clone(), true));
        }
        if let Some(old) = slot.replace(kept.clone()) {
            old.task.abort();
        }
        Ok((kept, true))
    }

    fn kept_now(&self, i: usize) -> Option<Kept> {
        self.kept[i]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Closes `kept` and forgets it, unless another task has replaced it already.
    fn give_up(&self, i: usize, kept: &Kept) {
        let mut slot = self.kept[i].lock().unwrap_or_else(|e| e.into_inner());
        if slot
            .as_ref()
            .is_some_and(|k| Arc::ptr_eq(&k.client, &kept.client))
        {
            *slot = None;
        }
        kept.task.abort();
    }

    /// Runs `query` on `backend` (one of the configured ones) over its kept control
    /// connection within the connect timeout, reconnecting once if that connection is broken.
    pub async fn query_backend(
        &self,
        backend: &Backend,
        query: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, ProbeError> {
        let i = self
            .backends
            .iter()
            .position(|b| b == backend)
            .ok_or_else(|| ProbeError::down(format!("{backend} is not a configured backend")))?;
        self.control_query(i, query, params, self.timeout).await
    }

    /// Re-probes every `topology_interval_ms` until shutdown.
    pub async fn run(self: Arc<Self>, mut shutdown: Shutdown) {
        loop {
            tokio::select! {
                () = self.probe_all() => {}
                _ = shutdown.draining() => return,
            }
            tokio::select! {
                _ = crate::clock::sleep(self.interval) => {}
                _ = shutdown.draining() => return,
            }
        }
    }
}

/// Whether the last probe of backend `i` failed to reach it.
fn probes_unreachable(probes: &Mutex<Vec<Probe>>, i: usize) -> bool {
    probes.lock().unwrap_or_else(|e| e.into_inner())[i].role == Role::Unreachable
}

/// A control-plane connection to `backend` as the control role; its connection task ends
/// when the client is dropped.
pub async fn control_client(
    backend: &Backend,
    control: &ControlPlane,
    application_name: &str,
    timeout: Duration,
) -> Result<tokio_postgres::Client, String> {
    let (client, conn) = open_control(backend, control, application_name, timeout)
        .await
        .map_err(|e| e.text)?;
    tokio::spawn(conn);
    Ok(client)
}

type ControlConnection = tokio_postgres::Connection<Stream, tokio_postgres::tls::NoTlsStream>;

async fn open_control(
    backend: &Backend,
    control: &ControlPlane,
    application_name: &str,
    timeout: Duration,
) -> Result<(tokio_postgres::Client, ControlConnection), ProbeError> {
    let login = &control.login;
    let mut cfg = tokio_postgres::Config::new();
    cfg.user(&login.user)
        .dbname(&login.database)
        .application_name(application_name)
        // TLS, when wanted, is the connector's, negotiated before tokio-postgres starts.
        .ssl_mode(tokio_postgres::config::SslMode::Disable);
    if let Some(p) = &login.password {
        cfg.password(p);
    }
    let connect = async {
        let socket = control
            .connector
            .dial(backend)
            .await
            .map_err(|e| ProbeError::dial(&e))?;
        let stream = control
            .connector
            .secure(backend, socket)
            .await
            .map_err(|e| ProbeError::tls(&e))?;
        cfg.connect_raw(stream, tokio_postgres::NoTls)
            .await
            .map_err(|e| ProbeError::from(&e))
    };
    crate::clock::timeout(timeout, connect)
        .await
        .map_err(|_| ProbeError::down(format!("no answer within {timeout:?}")))?
}

/// Why a probe learned no role.
#[derive(Debug, Clone)]
pub struct ProbeError {
    /// What happened, for logs and `/status`.
    pub text: String,
    /// The server answered with an error that it sends while running (too many connections,
    /// a login it rejects, a statement timeout): it is up, whatever its role. Also set when
    /// the gateway could not even try for want of file descriptors: that is no sign of a
    /// server down, and its last known role stands.
    pub server_up: bool,
}

impl ProbeError {
    fn down(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            server_up: false,
        }
    }

    /// No TCP connection could be opened.
    fn dial(e: &std::io::Error) -> Self {
        if crate::error::out_of_files(e) {
            return Self {
                text: format!("the gateway is out of file descriptors: {e}"),
                server_up: true,
            };
        }
        Self::down(format!("could not connect: {e}"))
    }

    /// TLS could not be set up as `backend_tls` says. A server that declined TLS or whose
    /// certificate failed the check answered, so it is up; one that closed the connection
    /// or went silent is not known to be.
    fn tls(e: &std::io::Error) -> Self {
        use std::io::ErrorKind::{InvalidData, Other};
        Self {
            text: format!("TLS (backend_tls): {e}"),
            server_up: matches!(e.kind(), InvalidData | Other),
        }
    }
}

/// SQLSTATEs a server sends as it stops or before it is up: admin_shutdown, crash_shutdown,
/// cannot_connect_now (starting up, shutting down, in crash recovery).
const GOING_AWAY: [&str; 3] = ["57P01", "57P02", "57P03"];

impl From<&tokio_postgres::Error> for ProbeError {
    fn from(e: &tokio_postgres::Error) -> Self {
        Self {
            text: error_text(e),
            server_up: e
                .as_db_error()
                .is_some_and(|db| !GOING_AWAY.contains(&db.code().code())),
        }
    }
}

impl std::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// A tokio-postgres error with its cause (its Display alone says only "db error").
pub fn error_text(e: &tokio_postgres::Error) -> String {
    match (e.as_db_error(), std::error::Error::source(e)) {
        (Some(db), _) => format!("{}: {}", db.code().code(), db.message()),
        (None, Some(cause)) => format!("{e}: {cause}"),
        (None, None) => e.to_string(),
    }
}

/// `Ok(in_recovery)` or the reason the backend could not be asked.
pub async fn probe(
    backend: &Backend,
    control: &ControlPlane,
    timeout: Duration,
) -> Result<bool, ProbeError> {
    let work = async {
        let (client, conn) = open_control(backend, control, "understudy-probe", timeout).await?;
        tokio::spawn(conn);
        let row = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map_err(|e| ProbeError::from(&e))?;
        row.try_get::<_, bool>(0).map_err(|e| ProbeError::from(&e))
    };
    match crate::clock::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError::down(format!("no answer within {timeout:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_backend_addresses() {
        assert_eq!(
            Backend::parse("db1:5433").unwrap(),
            Backend {
                host: "db1".into(),
                port: 5433
            }
        );
        assert_eq!(Backend::parse("db1").unwrap().port, 5432);
        assert_eq!(Backend::parse("[::1]:6000").unwrap().host, "::1");
        assert_eq!(
            Backend::parse("[::1]:6000").unwrap().to_string(),
            "[::1]:6000"
        );
        assert!(Backend::parse("db:x").is_err());
        let socket = Backend::parse("/var/run/postgresql:5433").unwrap();
        assert_eq!(socket.host, "/var/run/postgresql");
        assert_eq!(
            socket.socket_path().unwrap(),
            Path::new("/var/run/postgresql/.s.PGSQL.5433")
        );
        assert_eq!(socket.to_string(), "/var/run/postgresql:5433");
        assert_eq!(
            Backend::parse("/tmp").unwrap().socket_path().unwrap(),
            Path::new("/tmp/.s.PGSQL.5432")
        );
        assert_eq!(Backend::parse("db1").unwrap().socket_path(), None);
        assert!(Backend::parse(":5432").is_err());
    }
}
