//! Gateway configuration: a TOML file, overridden by command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The whole configuration. Every field has a default, so an empty file is valid.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address clients connect to.
    pub listen: SocketAddr,
    /// Directory of a Unix-domain socket clients may connect to besides `listen`:
    /// `<dir>/.s.PGSQL.<listen's port>`, where libpq looks for it; none when unset.
    pub unix_socket_dir: Option<PathBuf>,
    /// Permissions of that socket (as PostgreSQL's `unix_socket_permissions`).
    pub unix_socket_mode: u32,
    /// Group that owns that socket, a name the system knows or a number (as PostgreSQL's
    /// `unix_socket_group`); none: the gateway's own.
    pub unix_socket_group: Option<String>,
    /// Address of the admin HTTP listener (`/metrics`, `/status`); none when unset.
    pub admin_listen: Option<SocketAddr>,
    /// A secret every admin request but the health probes must carry (`Authorization: Bearer
    /// …`); none: no check.
    pub admin_token: Option<String>,
    /// PostgreSQL servers (`host:port`); with several, the gateway routes to the one not in recovery.
    pub backends: Vec<String>,
    /// Most client connections served at once; more get SQLSTATE 53300.
    pub max_client_connections: usize,
    /// Largest client message accepted, in bytes; larger ones end the session with 54000.
    pub max_message_size: usize,
    /// Time allowed to open a backend connection (TCP and TLS), in milliseconds.
    pub connect_timeout_ms: u64,
    /// Backend connections kept open to the primary ahead of logins (0: none), so that a
    /// login does not wait for the server to start a process.
    pub spare_backends: usize,
    /// Age at which a spare is replaced, in ms; below the server's `authentication_timeout`.
    pub spare_max_age_ms: u64,
    /// Time allowed for a client to complete startup and authentication, in milliseconds.
    pub login_timeout_ms: u64,
    /// On SIGTERM/SIGINT, time open transactions get to finish before sessions are closed, in ms.
    pub shutdown_timeout_ms: u64,
    /// How often the backends' roles are re-checked when there are several, in milliseconds.
    pub topology_interval_ms: u64,
    /// TCP keepalive on client and backend sockets.
    pub tcp_keepalive: Keepalive,
    /// TLS offered to clients.
    pub tls: ClientTls,
    /// TLS used towards the backends.
    pub backend_tls: BackendTls,
    /// How clients are authenticated and how the gateway logs in to backends.
    pub auth: Auth,
    /// The gateway's own login for control-plane queries (role discovery, auth_query).
    pub control: Control,
    /// Moving sessions to a new primary when the primary fails.
    pub failover: Failover,
    /// Threads that run sessions; 0 means one per CPU.
    pub worker_threads: usize,
    /// Which log lines are written: a `tracing` filter (`info`, `warn,understudy::session=debug`);
    /// `RUST_LOG`, when set, decides instead.
    pub log_level: String,
    /// How log lines are written.
    pub log_format: LogFormat,
}

/// How log lines are written (to stderr).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// One line of text per event, for people.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields`), for collectors.
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 6432)),
            unix_socket_dir: None,
            unix_socket_mode: 0o777,
            unix_socket_group: None,
            admin_listen: None,
            admin_token: None,
            backends: vec!["127.0.0.1:5432".to_owned()],
            max_client_connections: 1000,
            max_message_size: 256 << 20,
            connect_timeout_ms: 5_000,
            spare_backends: 2,
            spare_max_age_ms: 30_000,
            login_timeout_ms: 15_000,
            shutdown_timeout_ms: 30_000,
            topology_interval_ms: 1_000,
            tcp_keepalive: Keepalive::default(),
            tls: ClientTls::default(),
            backend_tls: BackendTls::default(),
            auth: Auth::default(),
            control: Control::default(),
            failover: Failover::default(),
            worker_threads: 1,
            log_level: "info".to_owned(),
            log_format: LogFormat::Text,
        }
    }
}

/// TCP keepalive settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Keepalive {
    /// Idle seconds before the first probe; 0 turns keepalive off.
    pub idle_secs: u64,
    /// Seconds between probes.
    pub interval_secs: u64,
    /// Unanswered probes before the connection is dropped.
    pub retries: u32,
    /// How long sent data may go unacknowledged before the connection is dropped
    /// (TCP_USER_TIMEOUT), in ms; 0 leaves it to the kernel (~15 minutes of retransmits).
    /// Unset: what keepalive allows an idle peer, so a dead peer is dropped as fast
    /// whether or not data was in flight (keepalive does not probe a connection that has).
    pub user_timeout_ms: Option<u64>,
}

impl Default for Keepalive {
    fn default() -> Self {
        Self {
            idle_secs: 30,
            interval_secs: 10,
            retries: 3,
            user_timeout_ms: None,
        }
    }
}

impl Keepalive {
    /// The TCP_USER_TIMEOUT to set; `None` leaves the kernel's.
    pub fn user_timeout(&self) -> Option<Duration> {
        match self.user_timeout_ms {
            Some(0) => None,
            Some(ms) => Some(Duration::from_millis(ms)),
            None if self.idle_secs == 0 => None,
            None => Some(Duration::from_secs(
                self.idle_secs + self.interval_secs.max(1) * u64::from(self.retries.max(1)),
            )),
        }
    }
}

/// Server certificate for client TLS; without both files SSLRequest is answered `N`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientTls {
    /// PEM certificate chain.
    pub cert: Option<PathBuf>,
    /// PEM private key.
    pub key: Option<PathBuf>,
    /// Refuse clients that do not use TLS.
    pub required: bool,
    /// CA certificates (PEM) that client certificates are checked against; set, the gateway
    /// asks TLS clients for one.
    pub client_ca: Option<PathBuf>,
    /// What a TLS client's certificate must be, as `clientcert` in `pg_hba.conf`.
    pub client_cert: ClientCert,
}

/// What a TLS client's certificate must be (PostgreSQL's `clientcert`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientCert {
    /// None needed; one presented must be valid.
    #[default]
    Optional,
    /// A valid one (signed by `client_ca`) is needed.
    VerifyCa,
    /// A valid one whose common name is the role is needed.
    VerifyFull,
}

/// libpq-style sslmode for backend connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BackendSslMode {
    /// Plain TCP.
    Disable,
    /// TLS when the server offers it, without certificate checks.
    #[default]
    Prefer,
    /// TLS or nothing, without certificate checks.
    Require,
    /// TLS with the server certificate checked against `root_cert` and the host name.
    VerifyFull,
}

/// TLS towards the backends.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendTls {
    /// When to use TLS.
    pub sslmode: BackendSslMode,
    /// CA certificates (PEM) for `verify-full`.
    pub root_cert: Option<PathBuf>,
    /// The gateway's client certificate chain (PEM), for servers that ask for one (libpq's
    /// `sslcert`).
    pub cert: Option<PathBuf>,
    /// Its private key (PEM; libpq's `sslkey`).
    pub key: Option<PathBuf>,
}

/// Who authenticates the client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ClientAuth {
    /// Relay the login exchange between client and primary: PostgreSQL decides.
    #[default]
    Passthrough,
    /// The gateway lets everyone in and logs in to the backend with the auth file's secret.
    Trust,
    /// The gateway checks an md5 password against the auth file or auth_query.
    Md5,
    /// The gateway checks SCRAM-SHA-256 against the auth file or auth_query.
    #[serde(rename = "scram-sha-256")]
    #[value(name = "scram-sha-256")]
    ScramSha256,
    /// The client's operating-system user, as the kernel reports it, must be the role it logs
    /// in as (PostgreSQL's `peer`); the gateway's Unix-domain socket only.
    Peer,
    /// The client's TLS certificate, valid for `tls.client_ca`, must name the role as its
    /// common name (PostgreSQL's `cert`); TLS clients only.
    Cert,
}

/// Authentication settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    /// Who authenticates the client.
    pub client_auth: ClientAuth,
    /// PgBouncer-style userlist (`"user" "secret"` lines): SCRAM verifiers, md5 hashes, passwords.
    pub auth_file: Option<PathBuf>,
    /// Query run as the control role to fetch a role's secret; `$1` is the role name.
    pub auth_query: Option<String>,
    /// Who authenticates clients on the Unix-domain socket; unset, `client_auth` does.
    pub unix_socket_auth: Option<ClientAuth>,
    /// A user name map file in PostgreSQL's `pg_ident.conf` format.
    pub ident_file: Option<PathBuf>,
    /// The map of `ident_file` that `peer` and certificate checks use (PostgreSQL's `map=`):
    /// which operating-system users or common names may log in as which roles.
    pub ident_map: Option<String>,
}

/// The gateway's own control-plane login.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Control {
    /// Role name.
    pub user: String,
    /// Password, if the role needs one.
    pub password: Option<String>,
    /// Database to connect to.
    pub database: String,
}

impl Default for Control {
    fn default() -> Self {
        Self {
            user: "postgres".to_owned(),
            password: None,
            database: "postgres".to_owned(),
        }
    }
}

/// Who makes a standby the new primary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Promote {
    /// The gateway promotes the standby, once both it and the standby have lost the primary.
    Auto,
    /// Someone else promotes (Patroni, repmgr, a person); the gateway waits for a primary.
    #[default]
    External,
    /// No failover: sessions end when their backend fails.
    Off,
}

/// Failover settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Failover {
    /// Who promotes the standby.
    pub promote: Promote,
    /// Time a session may wait for a new primary before it is closed, in milliseconds.
    pub timeout_ms: u64,
    /// Largest open transaction (its requests, in bytes) the gateway keeps to replay.
    pub max_replay_bytes: usize,
    /// Time one health probe of a suspect primary may take, in milliseconds.
    pub probe_timeout_ms: u64,
    /// Consecutive failed probes before a primary that does not refuse connections is dead.
    pub probe_attempts: u32,
    /// How long past its own ping (`wal_receiver_timeout / 2`) the standby's WAL receiver may
    /// go without hearing the primary and still count as connected, in ms.
    pub standby_silence_ms: u64,
    /// Whether an autocommit batch's answer is sent ahead of its commit, so that a commit the
    /// primary died in is settled on the new primary instead of answered `08007`.
    pub settle_in_flight_autocommit: bool,
    /// How often the catalog of a database in use is read again for views and functions that
    /// write, in ms (0: only at logins, at most once a minute).
    pub catalog_refresh_ms: u64,
}

impl Default for Failover {
    fn default() -> Self {
        Self {
            promote: Promote::External,
            timeout_ms: 30_000,
            max_replay_bytes: 16 << 20,
            probe_timeout_ms: 1_000,
            probe_attempts: 3,
            standby_silence_ms: 2_000,
            settle_in_flight_autocommit: false,
            catalog_refresh_ms: 5_000,
        }
    }
}

impl Failover {
    /// Failover timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// Health probe timeout.
    pub fn probe_timeout(&self) -> Duration {
        Duration::from_millis(self.probe_timeout_ms.max(1))
    }

    /// How often the catalog of a database in use is read again; `None`: only at logins.
    pub fn catalog_refresh(&self) -> Option<Duration> {
        (self.catalog_refresh_ms > 0).then(|| Duration::from_millis(self.catalog_refresh_ms))
    }
}

/// Default auth_query, as PgBouncer's.
pub const DEFAULT_AUTH_QUERY: &str = "SELECT usename, passwd FROM pg_shadow WHERE usename = $1";

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid configuration in {path}: {source}")]
    Parse {
        /// File path.
        path: PathBuf,
        /// Cause.
        source: toml::de::Error,
    },
    /// Values that do not fit together.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Checks values that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |s: &str| Err(ConfigError::Invalid(s.to_owned()));
        if self.backends.is_empty() {
            return invalid("at least one backend is required");
        }
        if self.max_client_connections == 0 {
            return invalid("max_client_connections must be at least 1");
        }
        if self.max_message_size < 1024 {
            return invalid("max_message_size must be at least 1024 bytes");
        }
        if self.spare_backends > 0 && self.spare_max_age_ms < 1_000 {
            return invalid("spare_max_age_ms must be at least 1000");
        }
        if self.unix_socket_mode > 0o777 {
            return invalid("unix_socket_mode takes permission bits only (at most 0o777)");
        }
        if self
            .unix_socket_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return invalid("unix_socket_dir is empty");
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return invalid("tls.cert and tls.key go together");
        }
        if self.tls.required && self.tls.cert.is_none() {
            return invalid("tls.required needs tls.cert and tls.key");
        }
        if self.backend_tls.sslmode == BackendSslMode::VerifyFull
            && self.backend_tls.root_cert.is_none()
        {
            return invalid("backend_tls.sslmode = \"verify-full\" needs backend_tls.root_cert");
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            return invalid(&format!("log_level {:?}: {e}", self.log_level));
        }
        if self.auth.client_auth == ClientAuth::Peer {
            return invalid(
                "auth.client_auth = \"peer\": only a Unix-domain socket tells who the client is; set auth.unix_socket_auth = \"peer\" (with unix_socket_dir)",
            );
        }
        let cert_auth = self.auth.client_auth == ClientAuth::Cert;
        if (cert_auth || self.tls.client_cert != ClientCert::Optional)
            && self.tls.client_ca.is_none()
        {
            return invalid("auth.client_auth = \"cert\" and tls.client_cert need tls.client_ca");
        }
        if self
            .admin_token
            .as_deref()
            .is_some_and(|t| t.len() < 16 || t.contains(char::is_whitespace))
        {
            return invalid("admin_token: at least 16 characters, no spaces");
        }
        if self.backend_tls.cert.is_some() != self.backend_tls.key.is_some() {
            return invalid("backend_tls.cert and backend_tls.key go together");
        }
        if self.tls.client_ca.is_some() && self.tls.cert.is_none() {
            return invalid("tls.client_ca needs tls.cert and tls.key");
        }
        if self.auth.unix_socket_auth == Some(ClientAuth::Cert) {
            return invalid(
                "auth.unix_socket_auth = \"cert\": a Unix-domain socket carries no TLS, so no certificate",
            );
        }
        if cert_auth && self.unix_socket_dir.is_some() && self.auth.unix_socket_auth.is_none() {
            return invalid(
                "auth.client_auth = \"cert\" with unix_socket_dir: socket clients present no certificate; set auth.unix_socket_auth",
            );
        }
        if self.auth.unix_socket_auth.is_some() && self.unix_socket_dir.is_none() {
            return invalid("auth.unix_socket_auth needs unix_socket_dir");
        }
        if self.auth.ident_file.is_some() != self.auth.ident_map.is_some() {
            return invalid("auth.ident_file and auth.ident_map go together");
        }
        let names_checked = self.auth.unix_socket_auth == Some(ClientAuth::Peer)
            || cert_auth
            || self.tls.client_cert == ClientCert::VerifyFull;
        if self.auth.ident_map.is_some() && !names_checked {
            return invalid(
                "auth.ident_map maps the names peer and certificate checks compare: set auth.unix_socket_auth = \"peer\", auth.client_auth = \"cert\" or tls.client_cert = \"verify-full\"",
            );
        }
        for (key, mode) in [
            ("client_auth", Some(self.auth.client_auth)),
            ("unix_socket_auth", self.auth.unix_socket_auth),
        ] {
            let checks_passwords = matches!(mode, Some(ClientAuth::Md5 | ClientAuth::ScramSha256));
            if checks_passwords && self.auth.auth_file.is_none() && self.auth.auth_query.is_none() {
                return invalid(&format!(
                    "auth.{key} md5/scram-sha-256 needs auth.auth_file or auth.auth_query"
                ));
            }
        }
        Ok(())
    }

    /// Backend connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// Client login timeout.
    pub fn login_timeout(&self) -> Duration {
        Duration::from_millis(self.login_timeout_ms)
    }

    /// Graceful shutdown bound.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_default() {
        let c: Config = toml::from_str("").unwrap();
        assert_eq!(c.listen, Config::default().listen);
        c.validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(toml::from_str::<Config>("listn = \"127.0.0.1:1\"").is_err());
        assert!(toml::from_str::<Config>("[auth]\nclient_auth = \"scram\"").is_err());
    }

    #[test]
    fn full_file_parses() {
        let c: Config = toml::from_str(
            r#"
            listen = "0.0.0.0:6432"
            unix_socket_dir = "/run/understudy"
            unix_socket_mode = 0o770
            unix_socket_group = "understudy"
            admin_listen = "127.0.0.1:9187"
            backends = ["10.0.0.1:5432", "10.0.0.2:5432"]
            max_client_connections = 10
            [tls]
            cert = "a.pem"
            key = "a.key"
            [backend_tls]
            sslmode = "verify-full"
            root_cert = "ca.pem"
            [auth]
            client_auth = "scram-sha-256"
            auth_query = "SELECT 1"
            [control]
            user = "understudy"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.backends.len(), 2);
        assert_eq!(c.auth.client_auth, ClientAuth::ScramSha256);
        assert_eq!(c.unix_socket_dir, Some(PathBuf::from("/run/understudy")));
        assert_eq!(c.unix_socket_mode, 0o770);
        assert_eq!(c.unix_socket_group.as_deref(), Some("understudy"));
    }

    /// The configuration in TOML `text`, validated; a validation failure as its message.
    fn checked(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).expect("valid TOML");
        config
            .validate()
            .map(|()| config)
            .map_err(|e| e.to_string())
    }

    /// The validation failure of TOML `text`, which must fail.
    fn refusal(text: &str) -> String {
        checked(text).expect_err("refused")
    }

    #[test]
    fn unix_socket_settings_are_checked() {
        assert!(
            checked("unix_socket_mode = 0o1777").is_err(),
            "permission bits only"
        );
        assert!(
            checked("unix_socket_dir = \"\"").is_err(),
            "an empty directory"
        );
        assert_eq!(Config::default().unix_socket_mode, 0o777);
        assert_eq!(Config::default().unix_socket_dir, None);

        let dir = "unix_socket_dir = \"/run/understudy\"\n";
        let c = checked(&format!("{dir}[auth]\nunix_socket_auth = \"peer\"")).unwrap();
        assert_eq!(c.auth.unix_socket_auth, Some(ClientAuth::Peer));
        let e = refusal("[auth]\nunix_socket_auth = \"peer\"");
        assert!(e.contains("needs unix_socket_dir"), "{e}");
        let e = refusal("[auth]\nclient_auth = \"peer\"");
        assert!(e.contains("set auth.unix_socket_auth"), "{e}");
        let e = refusal(&format!("{dir}[auth]\nunix_socket_auth = \"md5\""));
        assert!(
            e.contains("auth.unix_socket_auth md5/scram-sha-256 needs"),
            "{e}"
        );

        let map = "ident_file = \"/etc/understudy/pg_ident.conf\"\nident_map = \"apps\"\n";
        let peer = format!("{dir}[auth]\nunix_socket_auth = \"peer\"\n");
        let c = checked(&format!("{peer}{map}")).unwrap();
        assert_eq!(c.auth.ident_map.as_deref(), Some("apps"));
        let e = refusal(&format!("{peer}ident_map = \"apps\"\n"));
        assert!(e.contains("go together"), "{e}");
        let e = refusal(&format!("[auth]\n{map}"));
        assert!(
            e.contains("maps the names peer and certificate checks"),
            "{e}"
        );
    }

    #[test]
    fn user_timeout_follows_keepalive_unless_set() {
        let mut k = Keepalive::default();
        assert_eq!(k.user_timeout(), Some(Duration::from_secs(60)));
        k.idle_secs = 0;
        assert_eq!(k.user_timeout(), None, "keepalive off: the kernel's");
        k.user_timeout_ms = Some(2_500);
        assert_eq!(k.user_timeout(), Some(Duration::from_millis(2_500)));
        k.idle_secs = 30;
        k.user_timeout_ms = Some(0);
        assert_eq!(k.user_timeout(), None, "0: the kernel's");
        let parsed: Config = toml::from_str("[tcp_keepalive]\nuser_timeout_ms = 4000").unwrap();
        assert_eq!(
            parsed.tcp_keepalive.user_timeout(),
            Some(Duration::from_secs(4))
        );
    }

    /// Every configuration key is documented in the README's reference table.
    #[test]
    fn readme_documents_every_key() {
        fn keys(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
            match v.as_object() {
                Some(map) => {
                    for (k, v) in map {
                        let path = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        keys(&path, v, out);
                    }
                }
                None => out.push(prefix.to_owned()),
            }
        }
        let readme = include_str!("../../README.md");
        let mut all = Vec::new();
        keys(
            "",
            &serde_json::to_value(Config::default()).unwrap(),
            &mut all,
        );
        let missing: Vec<_> = all
            .iter()
            .filter(|k| !readme.contains(&format!("| `{k}` |")))
            .collect();
        assert!(
            missing.is_empty(),
            "README config reference lacks {missing:?}"
        );
    }

    #[test]
    fn client_certificate_settings_are_checked() {
        let tls = "[tls]\ncert = \"s.pem\"\nkey = \"s.key\"\nclient_ca = \"ca.pem\"\n";
        let c = checked(&format!("{tls}client_cert = \"verify-full\"")).unwrap();
        assert_eq!(c.tls.client_cert, ClientCert::VerifyFull);
        assert!(checked(&format!("{tls}[auth]\nclient_auth = \"cert\"")).is_ok());
        let e = refusal("[auth]\nclient_auth = \"cert\"");
        assert!(e.contains("need tls.client_ca"), "{e}");
        assert!(
            checked("[tls]\nclient_cert = \"verify-ca\"").is_err(),
            "verify-ca without a CA"
        );
        let e = refusal("[backend_tls]\ncert = \"gw.pem\"");
        assert!(e.contains("go together"), "{e}");
        let e = refusal("[tls]\nclient_ca = \"ca.pem\"");
        assert!(e.contains("tls.client_ca needs tls.cert"), "{e}");
        let with_socket =
            format!("unix_socket_dir = \"/run/u\"\n{tls}[auth]\nclient_auth = \"cert\"");
        let e = refusal(&with_socket);
        assert!(e.contains("set auth.unix_socket_auth"), "{e}");
        assert!(checked(&format!("{with_socket}\nunix_socket_auth = \"peer\"")).is_ok());
        assert!(
            checked(&format!("{with_socket}\nunix_socket_auth = \"cert\"")).is_err(),
            "no certificate on a socket"
        );
    }

    #[test]
    fn an_admin_token_is_long_and_has_no_spaces() {
        let mut c = Config {
            admin_token: Some("0123456789abcdef".to_owned()),
            ..Config::default()
        };
        assert!(c.validate().is_ok());
        for bad in ["short", "0123456789 abcdef"] {
            c.admin_token = Some(bad.to_owned());
            assert!(c.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn log_settings_are_read_and_checked() {
        let c = checked("log_format = \"json\"\nlog_level = \"warn,understudy::session=debug\"")
            .unwrap();
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(Config::default().log_format, LogFormat::Text);
        assert_eq!(Config::default().log_level, "info");
        let e = refusal("log_level = \"understudy=loud\"");
        assert!(e.contains("log_level"), "{e}");
    }

    #[test]
    fn validation_catches_mismatches() {
        let mut c = Config::default();
        c.auth.client_auth = ClientAuth::Md5;
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.backend_tls.sslmode = BackendSslMode::VerifyFull;
        assert!(c.validate().is_err());
    }
}
