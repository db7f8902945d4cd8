//! The gateway process: listeners, shared state, graceful shutdown.

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::auth::Secrets;
use crate::backend::Connector;
use crate::config::Config;
use crate::reload::{ConfigSource, Swappable};
use crate::sessions::Registry;
use crate::shutdown::{self, Phase, ShutdownTrigger};
use crate::spares::Spares;
use crate::stream::{PeerAddr, Stream};
use crate::telemetry::Metrics;
use crate::topology::Topology;

/// State every session and listener shares.
pub struct Shared {
    /// The configuration in force.
    pub config: Config,
    /// Backends and the current primary.
    pub topology: Arc<Topology>,
    /// Live sessions and cancel keys.
    pub registry: Arc<Registry>,
    /// How backend connections are opened.
    pub connector: Connector,
    /// TLS offered to clients; a reload replaces it.
    pub client_tls: Swappable<Option<Arc<crate::tls::ServerTls>>>,
    /// Role secrets (auth file, auth_query).
    pub secrets: Secrets,
    /// The user name map of `auth.ident_map`; a reload replaces it.
    pub ident: Swappable<Option<Arc<crate::auth::ident::IdentMap>>>,
    /// Hot-path metric handles.
    pub metrics: Metrics,
    /// One permit per client session (`max_client_connections`).
    pub limit: Arc<Semaphore>,
    /// Shutdown broadcast.
    pub shutdown: ShutdownTrigger,
    /// Counts the sessions past startup: draining waits for these, not for clients that
    /// have not sent a StartupMessage yet.
    pub sessions: TaskTracker,
    /// Runs failovers.
    pub failover: crate::failover::Coordinator,
    /// Which roles may run the xid capture, as learned at login.
    pub capture_grants: crate::grants::CaptureGrants,
    /// What in each database makes a statement write unseen, as learned at login and kept fresh.
    pub catalog_suspects: crate::suspects::CatalogSuspects,
    /// Whether the gateway is paused: sessions hold at their next transaction boundary.
    pub hold: tokio::sync::watch::Sender<bool>,
    /// Where a reload reads the configuration; without one it re-reads the files the
    /// running configuration names.
    pub config_source: Option<ConfigSource>,
    /// The address clients connect to over TCP, as bound (or as systemd passed it).
    pub listen: SocketAddr,
    /// The Unix-domain socket clients may connect to, if one was asked for.
    pub unix_socket: Option<PathBuf>,
    /// Set by `understudy demo` only: where `POST /demo/crash-primary` asks for a crash.
    pub demo_crash: Option<tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<()>>>,
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Bad TLS material.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The Unix-domain socket could not be made.
    #[error("cannot listen on {}: {source}", path.display())]
    BindUnix {
        /// The socket's path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Anything else that is wrong with the setup.
    #[error("{0}")]
    Setup(String),
}

/// A gateway with its listeners bound, ready to run.
pub struct Gateway {
    shared: Arc<Shared>,
    listener: TcpListener,
    unix: Option<UnixSocket>,
    admin: Option<TcpListener>,
    /// The client listener is systemd's (socket activation): it outlives this process.
    tcp_from_systemd: bool,
}

impl Gateway {
    /// Validates `config`, loads TLS and auth material, and binds the listeners.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        Self::bind_with(config, Activated::default()).await
    }

    /// [`Gateway::bind`], taking the listeners systemd passed in (socket activation) in place
    /// of binding those the configuration names.
    pub async fn bind_with(config: Config, activated: Activated) -> Result<Self, StartError> {
        config.validate()?;
        let connector = Connector {
            sslmode: config.backend_tls.sslmode,
            tls: Arc::new(Swappable::new(crate::tls::backend_config(
                &config.backend_tls,
            )?)),
            timeout: config.connect_timeout(),
            keepalive: config.tcp_keepalive.clone(),
            spares: (config.spare_backends > 0).then(|| {
                Arc::new(Spares::new(
                    config.spare_backends,
                    Duration::from_millis(config.spare_max_age_ms),
                ))
            }),
        };
        let topology =
            Arc::new(Topology::new(&config, connector.clone()).map_err(StartError::Setup)?);
        let secrets = Secrets::load(&config.auth, topology.clone(), config.connect_timeout())
            .map_err(StartError::Setup)?;
        let client_tls = crate::tls::server_config(&config.tls)?;
        let ident = crate::auth::ident::IdentMap::load(&config.auth).map_err(StartError::Setup)?;
        let tcp_from_systemd = activated.clients.is_some();
        let listener = match activated.clients {
            Some(listener) => {
                TcpListener::from_std(listener).map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?
            }
            None => TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?,
        };
        let unix = match (activated.unix, &config.unix_socket_dir) {
            (Some((listener, path)), _) => Some(
                UnixSocket::adopt(listener, &path)
                    .map_err(|source| StartError::BindUnix { path, source })?,
            ),
            (None, Some(dir)) => {
                let port = listener
                    .local_addr()
                    .map_or(config.listen.port(), |a| a.port());
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let group = match &config.unix_socket_group {
                    Some(name) => Some(crate::accounts::group_id(name).map_err(|source| {
                        StartError::BindUnix {
                            path: path.clone(),
                            source,
                        }
                    })?),
                    None => None,
                };
                Some(
                    UnixSocket::bind(&path, config.unix_socket_mode, group)
                        .await
                        .map_err(|source| StartError::BindUnix { path, source })?,
                )
            }
            (None, None) => None,
        };
        let admin = match (activated.admin, config.admin_listen) {
            (Some(admin), addr) => {
                Some(
                    TcpListener::from_std(admin).map_err(|source| StartError::Bind {
                        addr: addr.unwrap_or(config.listen),
                        source,
                    })?,
                )
            }
            (None, Some(addr)) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Bind { addr, source })?,
            ),
            (None, None) => None,
        };
        let listen = listener.local_addr().unwrap_or(config.listen);
        let (trigger, _) = shutdown::channel();
        let shared = Arc::new(Shared {
            limit: Arc::new(Semaphore::new(config.max_client_connections)),
            failover: crate::failover::Coordinator::new(topology.clone(), config.failover.clone()),
            capture_grants: crate::grants::CaptureGrants::default(),
            catalog_suspects: crate::suspects::CatalogSuspects::new(
                topology.clone(),
                config.failover.catalog_refresh(),
                config.connect_timeout(),
            ),
            config,
            topology,
            registry: Arc::new(Registry::default()),
            connector,
            client_tls: Swappable::new(client_tls),
            ident: Swappable::new(ident),
            secrets,
            config_source: None,
            metrics: Metrics::new(),
            shutdown: trigger,
            sessions: TaskTracker::new(),
            listen,
            unix_socket: unix.as_ref().map(|u| u.path.clone()),
            demo_crash: None,
            hold: tokio::sync::watch::Sender::new(false),
        });
        Ok(Self {
            shared,
            listener,
            unix,
            admin,
            tcp_from_systemd,
        })
    }

    /// Lets the admin listener's `POST /demo/crash-primary` ask `understudy demo` to crash
    /// its primary (only the demo owns the servers it may crash).
    pub fn enable_demo_crash(
        &mut self,
        tx: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<()>>,
    ) {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.demo_crash = Some(tx);
        }
    }

    /// Makes reloads read the configuration from `source` (the file and flags it started
    /// from) rather than re-read only the files the running configuration names.
    pub fn reload_from(&mut self, source: ConfigSource) {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.config_source = Some(source);
        }
    }

    /// Address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or(self.shared.config.listen)
    }

    /// Address of the admin listener.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The handle that starts a graceful shutdown.
    pub fn shutdown_trigger(&self) -> ShutdownTrigger {
        self.shared.shutdown.clone()
    }

    /// Shared state (for embedding and tests).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Serves until shutdown: on Draining answers new clients 57P03, lets sessions finish their
    /// transactions for `shutdown_timeout`, then forces the rest closed; clients still before
    /// their startup are closed once no session is left.
    pub async fn run(self) {
        let Gateway {
            shared,
            listener,
            unix,
            admin,
            tcp_from_systemd,
        } = self;
        let tracker = TaskTracker::new();
        let mut shutdown = shared.shutdown.subscribe();
        tracker.spawn(shared.topology.clone().run(shutdown.clone()));
        tracker.spawn(crate::failover::monitor(shared.clone(), shutdown.clone()));
        if let Some(spares) = shared.connector.spares.clone() {
            tracker.spawn(spares.keep(
                shared.connector.clone(),
                shared.topology.clone(),
                shutdown.clone(),
            ));
        }
        // The admin listener keeps answering while sessions drain; it stops with the gateway.
        let admin = admin.map(|admin| {
            tokio::spawn(crate::admin::serve(admin, shared.clone(), shutdown.clone()))
        });
        tracing::info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "accepting connections");
        if let Some(unix) = &unix {
            tracing::info!(socket = %unix.path.display(), "accepting connections");
        }
        let touching = unix.as_ref().map(UnixSocket::files).map(|files| {
            tokio::spawn(async move {
                loop {
                    crate::clock::sleep(TOUCH_EVERY).await;
                    for (path, made) in &files {
                        touch(path, *made);
                    }
                }
            })
        });
        if let Some(why) = shared.failover.disabled() {
            tracing::info!(why, "failover is off: sessions end with their backend");
        }
        // While sessions drain the listener stays open, and a new client hears 57P03 (as
        // PostgreSQL's postmaster answers while shutting down) instead of finding nobody there
        // or, had the listener closed with it in the kernel's backlog, a reset. A socket that
        // systemd passed outlives this process: a client is left in its backlog for the
        // gateway systemd starts next (a restart), which serves it; it waits, it is not refused.
        let unix_from_systemd = unix.as_ref().is_some_and(|u| u.inode.is_none());
        let mut force = None;
        let mut out_of_files = OutOfFiles::new();
        loop {
            tokio::select! {
                accepted = listener.accept(), if force.is_none() || !tcp_from_systemd => match accepted {
                    Ok((tcp, peer)) => {
                        if let Err(e) = crate::stream::tune_socket(&tcp, &shared.config.tcp_keepalive) {
                            tracing::debug!(%peer, error = %e, "socket options not set");
                        }
                        tracker.spawn(crate::connection::serve(shared.clone(), Stream::Plain(tcp), PeerAddr::Tcp(peer)));
                    }
                    Err(e) => {
                        let accept = async { listener.accept().await.map(|(tcp, _)| Stream::Plain(tcp)) };
                        if !out_of_files.refuse_one(accept, &e).await {
                            // Something else: back off instead of spinning.
                            crate::clock::sleep(Duration::from_millis(50)).await;
                        }
                    }
                },
                accepted = UnixSocket::accept(unix.as_ref()), if force.is_none() || !unix_from_systemd => match accepted {
                    Ok((socket, peer)) => {
                        tracker.spawn(crate::connection::serve(shared.clone(), socket, peer));
                    }
                    Err(e) => {
                        if !out_of_files.refuse_one(async { UnixSocket::accept(unix.as_ref()).await.map(|(s, _)| s) }, &e).await {
                            crate::clock::sleep(Duration::from_millis(50)).await;
                        }
                    }
                },
                _ = shutdown.draining(), if force.is_none() => {
                    tracing::info!(
                        sessions = shared.registry.len(),
                        "shutting down: closing sessions at their transaction boundaries"
                    );
                    let trigger = shared.shutdown.clone();
                    let timeout = shared.config.shutdown_timeout();
                    force = Some(tokio::spawn(async move {
                        crate::clock::sleep(timeout).await;
                        trigger.advance(Phase::Force);
                    }));
                    tracker.close();
                    shared.sessions.close();
                }
                // Every session is done: a client that has not sent its startup yet (a TCP
                // health check, say) would only hold the gateway up, so it goes now.
                _ = shared.sessions.wait(), if force.is_some() && shutdown.phase() < Phase::Force => {
                    shared.shutdown.advance(Phase::Force);
                }
                // Every connection, and every refusal since, is done.
                _ = tracker.wait(), if force.is_some() => break,
            }
        }
        drop(listener);
        if let Some(unix) = unix {
            unix.remove();
        }
        if let Some(force) = force {
            force.abort();
        }
        if let Some(admin) = admin {
            admin.abort();
        }
        if let Some(touching) = touching {
            touching.abort();
        }
        tracing::info!("shut down");
    }

    /// Runs in a background task; the handle stops it.
    pub fn spawn(self) -> GatewayHandle {
        let addr = self.local_addr();
        let admin_addr = self.admin_addr();
        let trigger = self.shutdown_trigger();
        let shared = self.shared.clone();
        let task = tokio::spawn(self.run());
        GatewayHandle {
            addr,
            admin_addr,
            trigger,
            shared,
            task,
        }
    }
}

/// A gateway running in the background.
pub struct GatewayHandle {
    /// Client address.
    pub addr: SocketAddr,
    /// Admin address.
    pub admin_addr: Option<SocketAddr>,
    trigger: ShutdownTrigger,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl GatewayHandle {
    /// Shared state.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Starts a graceful shutdown.
    pub fn begin_shutdown(&self) {
        self.trigger.advance(Phase::Draining);
    }

    /// Shuts down gracefully and waits until every session is closed.
    pub async fn shutdown(self) {
        self.begin_shutdown();
        let _ = self.task.await;
    }

    /// Whether the gateway has stopped.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits for the gateway to stop.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// What the accept loop does when the process is out of file descriptors: a client waiting in
/// the listen queue would otherwise wait there unanswered until it gave up. One descriptor is
/// held in reserve; freed, it lets one client in to hear `53300`, and is taken again.
struct OutOfFiles {
    reserve: Option<std::fs::File>,
    refused: u64,
    said: Option<std::time::Instant>,
}

/// Refusals for want of descriptors are logged at most this often, with their count.
const OUT_OF_FILES_LOG_EVERY: Duration = Duration::from_secs(10);

impl OutOfFiles {
    fn new() -> Self {
        Self {
            reserve: std::fs::File::open("/dev/null").ok(),
            refused: 0,
            said: None,
        }
    }

    /// Handles an accept error; returns false if it is not the lack of descriptors (or no
    /// descriptor could be freed to answer with).
    async fn refuse_one(
        &mut self,
        accept: impl std::future::Future<Output = std::io::Result<Stream>>,
        e: &std::io::Error,
    ) -> bool {
        if !crate::error::out_of_files(e) {
            tracing::warn!(error = %e, "accept failed");
            return false;
        }
        let Some(reserve) = self.reserve.take() else {
            // Taken by another socket when last freed: held again when one is free.
            self.reserve = std::fs::File::open("/dev/null").ok();
            self.log(e);
            return false;
        };
        drop(reserve);
        // Polled once, not awaited: no other task may take the descriptor just freed.
        let mut accept = std::pin::pin!(accept);
        let accepted = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::future::Future::poll(accept.as_mut(), cx))
        })
        .await;
        if let std::task::Poll::Ready(Ok(socket)) = accepted {
            let mut buf = bytes::BytesMut::new();
            understudy_protocol::encode::error_response(
                &mut buf,
                understudy_protocol::encode::Severity::Fatal,
                "53300",
                crate::error::OUT_OF_FILES,
            );
            // A fresh socket's buffer takes it whole; the client hears it whatever it sent.
            let _ = match &socket {
                Stream::Unix(s) => s.try_write(&buf),
                other => other.tcp().map_or(Ok(0), |tcp| tcp.try_write(&buf)),
            };
            crate::telemetry::count_error("53300", "gateway");
        }
        self.refused += 1;
        self.log(e);
        self.reserve = std::fs::File::open("/dev/null").ok();
        true
    }

    fn log(&mut self, e: &std::io::Error) {
        if self
            .said
            .is_none_or(|t| t.elapsed() >= OUT_OF_FILES_LOG_EVERY)
        {
            tracing::warn!(error = %e, refused = self.refused, "out of file descriptors: clients refused with 53300 (raise the open-file limit)");
            self.said = Some(std::time::Instant::now());
            self.refused = 0;
        }
    }
}

/// Raises the process's soft limit on open files to its hard limit, and warns when even that
/// leaves no room for `max_client_connections` sessions (each holds two sockets).
pub fn raise_open_file_limit(config: &Config) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            // The listeners, the runtime's own, the spare and control connections.
            let spare = config.spare_backends as u64 + 16;
            let room = limit.saturating_sub(spare) / 2;
            if room < config.max_client_connections as u64 {
                tracing::warn!(
                    limit,
                    sessions = room,
                    max_client_connections = config.max_client_connections,
                    "the open-file limit leaves room for fewer sessions than max_client_connections; raise it (ulimit -n, LimitNOFILE=) or lower max_client_connections"
                );
            } else {
                tracing::debug!(limit, "open-file limit");
            }
        }
        Err(e) => tracing::warn!(error = %e, "the open-file limit could not be raised"),
    }
}

/// Listening sockets systemd passed in (socket activation), which the gateway serves in place
/// of binding those its configuration names: at most one TCP socket for clients, one
/// Unix-domain socket for clients, and one TCP socket named `admin`
/// (`FileDescriptorName=admin`) for the admin listener. Any other is refused; a listener not
/// passed is bound as configured.
#[derive(Debug, Default)]
pub struct Activated {
    clients: Option<std::net::TcpListener>,
    unix: Option<(std::os::unix::net::UnixListener, PathBuf)>,
    admin: Option<std::net::TcpListener>,
}

impl Activated {
    /// The sockets systemd passed to this process; none outside socket activation.
    pub fn from_systemd() -> Result<Self, StartError> {
        let sockets = crate::sockopt::activated_sockets()
            .map_err(|e| StartError::Setup(format!("socket activation: {e}")))?;
        let activated = Self::sort(sockets)
            .map_err(|e| StartError::Setup(format!("socket activation: {e}")))?;
        if activated.clients.is_some() || activated.unix.is_some() || activated.admin.is_some() {
            tracing::info!(listen = ?activated.clients.as_ref().and_then(|c| c.local_addr().ok()), unix = ?activated.unix.as_ref().map(|u| &u.1), admin = ?activated.admin.as_ref().and_then(|a| a.local_addr().ok()), "listening sockets passed by systemd");
        }
        Ok(activated)
    }

    /// Sorts passed sockets by kind and name.
    fn sort(sockets: Vec<(socket2::Socket, String)>) -> Result<Self, String> {
        let mut this = Self::default();
        for (socket, name) in sockets {
            let addr = socket
                .local_addr()
                .map_err(|e| format!("socket {name:?}: {e}"))?;
            let listening = socket.r#type().is_ok_and(|t| t == socket2::Type::STREAM)
                && socket.is_listener().unwrap_or(false);
            if !listening {
                return Err(format!(
                    "socket {name:?} is not a listening stream socket (ListenStream=, Accept=no)"
                ));
            }
            socket
                .set_nonblocking(true)
                .map_err(|e| format!("socket {name:?}: {e}"))?;
            if let Some(inet) = addr.as_socket() {
                let slot = if name == "admin" {
                    &mut this.admin
                } else {
                    &mut this.clients
                };
                if slot.is_some() {
                    return Err(format!(
                        "a second TCP socket for {} ({inet}); name the admin listener's \"admin\" (FileDescriptorName=admin)",
                        if name == "admin" { "the admin listener" } else { "clients" }
                    ));
                }
                *slot = Some(socket.into());
            } else if let Some(path) = addr.as_pathname().map(Path::to_owned) {
                if this.unix.is_some() {
                    return Err(format!("a second Unix-domain socket ({})", path.display()));
                }
                let fd = std::os::fd::OwnedFd::from(socket);
                this.unix = Some((fd.into(), path));
            } else {
                return Err(format!(
                    "socket {name:?} is neither TCP nor a Unix-domain socket with a path"
                ));
            }
        }
        Ok(this)
    }
}

/// The Unix-domain socket clients may connect to besides TCP (`unix_socket_dir`), named as
/// PostgreSQL names its own so that libpq finds it from a directory and a port.
struct UnixSocket {
    listener: UnixListener,
    /// Where it is.
    path: PathBuf,
    /// Its peers' address: the socket's own path (a client's end has none).
    peer: PeerAddr,
    /// The inode made, so that only this socket is removed at the end; `None` for one systemd
    /// made, which stays its to remove.
    inode: Option<(u64, u64)>,
    /// The lock file beside it, removed when this is dropped; systemd's socket has none.
    lock: Option<SocketLock>,
}

impl UnixSocket {
    /// Makes the socket at `path` with permissions `mode`, owned by `group` if given, after
    /// taking its lock file. A socket already there that nothing answers on is left from a
    /// process that died, and is replaced; one something answers on, or a file of another
    /// kind, is not touched.
    async fn bind(path: &Path, mode: u32, group: Option<u32>) -> std::io::Result<Self> {
        let lock = SocketLock::take(path)?;
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "a file that is not a socket is in the way",
                ))
            }
            Ok(_) => match tokio::net::UnixStream::connect(path).await {
                Ok(_) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        "another server is listening on it",
                    ))
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    tracing::info!(socket = %path.display(), "removing a socket nothing listens on");
                    std::fs::remove_file(path)?;
                }
                Err(e) => return Err(e),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        let made = file_id(path)?;
        let settled = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .and_then(|()| std::os::unix::fs::chown(path, None, group));
        if let Err(e) = settled {
            // Nobody may connect through a socket whose permissions are not as asked.
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Ok(Self {
            listener,
            path: path.to_owned(),
            peer: PeerAddr::Unix(path.into()),
            inode: Some(made),
            lock: Some(lock),
        })
    }

    /// A socket systemd made and passed in (socket activation): served as it is, neither
    /// locked nor removed at the end, as systemd keeps it across the gateway's restarts.
    fn adopt(listener: std::os::unix::net::UnixListener, path: &Path) -> std::io::Result<Self> {
        Ok(Self {
            listener: UnixListener::from_std(listener)?,
            path: path.to_owned(),
            peer: PeerAddr::Unix(path.into()),
            inode: None,
            lock: None,
        })
    }

    /// The next client, or never without a socket.
    async fn accept(socket: Option<&Self>) -> std::io::Result<(Stream, PeerAddr)> {
        match socket {
            Some(s) => {
                let (unix, _) = s.listener.accept().await?;
                Ok((Stream::Unix(unix), s.peer.clone()))
            }
            None => std::future::pending().await,
        }
    }

    /// The files the gateway made (the socket and its lock file), each with its device and
    /// inode; none for systemd's socket.
    fn files(&self) -> Vec<(PathBuf, (u64, u64))> {
        let Some(made) = self.inode else {
            return Vec::new();
        };
        let mut files = vec![(self.path.clone(), made)];
        files.extend(self.lock.as_ref().map(|l| (l.path.clone(), l.inode)));
        files
    }

    /// Removes the socket's file, unless another process has put its own in its place.
    fn remove(self) {
        if self
            .inode
            .is_some_and(|made| file_id(&self.path).is_ok_and(|now| now == made))
        {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(socket = %self.path.display(), error = %e, "the socket file could not be removed");
            }
        }
    }
}

/// How often the socket and its lock file get a new modification time, as PostgreSQL's own
/// (every 58 minutes), so that a cleaner of old files in `/tmp` (systemd-tmpfiles, tmpreaper)
/// does not remove them while the gateway runs.
const TOUCH_EVERY: Duration = Duration::from_secs(58 * 60);

/// Sets the access and modification times of the file at `path` to now, if it is still the
/// file `made` (device and inode) and not one another process has put in its place.
fn touch(path: &Path, made: (u64, u64)) {
    if !file_id(path).is_ok_and(|now| now == made) {
        return;
    }
    let now = nix::sys::time::TimeSpec::UTIME_NOW;
    if let Err(e) = nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &now,
        &now,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    ) {
        tracing::warn!(file = %path.display(), error = %e, "could not touch the file");
    }
}

/// The device and inode of the file at `path`.
fn file_id(path: &Path) -> std::io::Result<(u64, u64)> {
    let meta = std::fs::symlink_metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

/// The lock file beside a socket (`.s.PGSQL.<port>.lock`), written as PostgreSQL writes its
/// own, so that a PostgreSQL server started on the same directory and port refuses to start
/// instead of taking the socket over (when it may signal the gateway's process: the same
/// operating-system user, or root), and the gateway in turn refuses a socket whose lock a
/// live process holds, a PostgreSQL server still starting included.
struct SocketLock {
    path: PathBuf,
    inode: (u64, u64),
}

impl SocketLock {
    /// How often a lock file that vanishes while it is looked at is tried again (PostgreSQL's
    /// figure).
    const ATTEMPTS: usize = 100;

    /// Takes the lock of `socket`: makes its lock file, or replaces one whose process has
    /// ended. One a process that exists holds, or that names no process, is left alone.
    fn take(socket: &Path) -> std::io::Result<Self> {
        let mut path = socket.as_os_str().to_owned();
        path.push(".lock");
        let path = PathBuf::from(path);
        let own = std::process::id();
        // PostgreSQL's layout: PID, data directory (a gateway has none), start time, port,
        // socket directory.
        let port = socket
            .file_name()
            .and_then(|name| name.to_str()?.rsplit('.').next())
            .unwrap_or_default();
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let dir = socket.parent().unwrap_or(Path::new(""));
        let contents = format!("{own}\n\n{started}\n{port}\n{}\n", dir.display());
        for _ in 0..Self::ATTEMPTS {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(mut file) => {
                    use std::io::Write;
                    let Ok(meta) = file.metadata() else {
                        let _ = std::fs::remove_file(&path);
                        return Err(std::io::Error::other("the lock file made cannot be read"));
                    };
                    let lock = Self {
                        path,
                        inode: (meta.dev(), meta.ino()),
                    };
                    // On failure `lock` is dropped, which removes the file.
                    file.write_all(contents.as_bytes())?;
                    file.sync_all()?;
                    return Ok(lock);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                // Its holder removed it meanwhile: try again.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let holder = lock_holder(&text).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!(
                        "its lock file {} names no process (another server may be starting; remove the file if none is)",
                        path.display()
                    ),
                )
            })?;
            if holder != own && crate::sockopt::process_exists(holder) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!(
                        "its lock file {} is held by process {holder}, which is running (a PostgreSQL server or another gateway on this directory and port?)",
                        path.display()
                    ),
                ));
            }
            tracing::info!(lock = %path.display(), holder, "removing a lock file whose process has ended");
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other(format!(
            "its lock file {} could not be made",
            path.display()
        )))
    }
}

impl Drop for SocketLock {
    /// Removes the lock file, unless another process has put its own in its place.
    fn drop(&mut self) {
        if file_id(&self.path).is_ok_and(|now| now == self.inode) {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(lock = %self.path.display(), error = %e, "the socket's lock file could not be removed");
            }
        }
    }
}

/// The process a socket lock file names on its first line, as PostgreSQL reads it (a
/// negative number is a single-user server's PID); `None` when it names none.
fn lock_holder(text: &str) -> Option<u32> {
    let pid: i64 = text.lines().next()?.trim().parse().ok()?;
    u32::try_from(pid.unsigned_abs())
        .ok()
        .filter(|&pid| pid > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sets the modification time of `path` back a day; returns that time.
    fn age(path: &Path) -> std::time::SystemTime {
        let then = std::time::SystemTime::now() - Duration::from_secs(86_400);
        let file = std::fs::File::options().write(true).open(path).unwrap();
        file.set_modified(then).unwrap();
        std::fs::metadata(path).unwrap().modified().unwrap()
    }

    #[test]
    fn touching_renews_only_the_file_made() {
        let dir = std::env::temp_dir().join(format!("understudy-touch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lock = dir.join(".s.PGSQL.5432.lock");
        std::fs::write(&lock, "1\n").unwrap();
        let made = file_id(&lock).unwrap();
        let aged = age(&lock);
        touch(&lock, made);
        let touched = std::fs::metadata(&lock).unwrap().modified().unwrap();
        assert!(touched > aged + Duration::from_secs(3_600), "{touched:?}");

        // Another file put in its place (made while it still exists: another inode) is left
        // as it is.
        let replacement = dir.join("replacement");
        std::fs::write(&replacement, "2\n").unwrap();
        std::fs::rename(&replacement, &lock).unwrap();
        let other = age(&lock);
        touch(&lock, made);
        assert_eq!(std::fs::metadata(&lock).unwrap().modified().unwrap(), other);
        // A socket is touched as it is (no open, which a socket refuses).
        let socket = dir.join(".s.PGSQL.5432");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let before = std::fs::symlink_metadata(&socket)
            .unwrap()
            .modified()
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
        touch(&socket, file_id(&socket).unwrap());
        let after = std::fs::symlink_metadata(&socket)
            .unwrap()
            .modified()
            .unwrap();
        assert!(after > before, "{before:?} {after:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn activated_sockets_are_sorted_by_kind_and_name() {
        let tcp = || socket2::Socket::from(std::net::TcpListener::bind("127.0.0.1:0").unwrap());
        let dir = std::env::temp_dir().join(format!("understudy-activated-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(".s.PGSQL.6432");
        let _ = std::fs::remove_file(&path);
        let unix = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let unix = socket2::Socket::from(std::os::fd::OwnedFd::from(unix));
        let sorted = Activated::sort(vec![
            (tcp(), "understudy.socket".into()),
            (unix, "unix".into()),
            (tcp(), "admin".into()),
        ])
        .unwrap();
        assert!(sorted.clients.is_some() && sorted.admin.is_some());
        assert_eq!(sorted.unix.as_ref().map(|u| &u.1), Some(&path));
        let nothing = Activated::sort(Vec::new()).unwrap();
        assert!(nothing.clients.is_none() && nothing.unix.is_none() && nothing.admin.is_none());

        let e = Activated::sort(vec![(tcp(), "a".into()), (tcp(), "b".into())]).unwrap_err();
        assert!(e.contains("a second TCP socket for clients"), "{e}");
        let udp = socket2::Socket::from(std::net::UdpSocket::bind("127.0.0.1:0").unwrap());
        let e = Activated::sort(vec![(udp, "udp".into())]).unwrap_err();
        assert!(e.contains("not a listening stream socket"), "{e}");
        let idle =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        idle.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let e = Activated::sort(vec![(idle, "idle".into())]).unwrap_err();
        assert!(e.contains("not a listening stream socket"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_lock_files_holder_is_read_as_postgresql_reads_it() {
        assert_eq!(
            lock_holder("4242\n/var/lib/postgresql/15/main\n0\n5432\n/tmp\n"),
            Some(4242)
        );
        assert_eq!(
            lock_holder("-4242\n/data\n"),
            Some(4242),
            "a single-user server"
        );
        assert_eq!(lock_holder(" 17 \n"), Some(17));
        for none in ["", "\n4242\n", "0\n", "postmaster\n", "99999999999\n"] {
            assert_eq!(lock_holder(none), None, "{none:?}");
        }
    }
}
