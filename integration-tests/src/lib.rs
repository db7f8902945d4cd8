//! Test harness: real PostgreSQL (primary + streaming standby from the installed binaries),
//! gateways started in-process, and real clients (tokio-postgres, psql, pgbench).
//!
//! ```ignore
//! let cluster = Cluster::primary_and_standby().await;
//! let gw = cluster.gateway().await;
//! let client = gw.connect("scram_user").await;
//! ```

pub mod netns;
pub mod nft;
pub mod raw;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use tokio_postgres::{Client, NoTls};
use understudy::config::Config;
use understudy::local_cluster::{signal_processes, ClusterOptions, LocalCluster, PgBinaries};
use understudy::GatewayHandle;

/// Roles every test cluster has, with the pg_hba method that applies to each.
pub mod roles {
    /// Superuser, trusted on loopback.
    pub const SUPERUSER: &str = "postgres";
    /// SCRAM-SHA-256 role.
    pub const SCRAM: &str = "scram_user";
    /// Its password.
    pub const SCRAM_PASSWORD: &str = "scram-secret";
    /// md5 role (stored as an md5 hash, md5 in pg_hba).
    pub const MD5: &str = "md5_user";
    /// Its password.
    pub const MD5_PASSWORD: &str = "md5-secret";
    /// Role that logs in with a cleartext password (`password` in pg_hba).
    pub const CLEARTEXT: &str = "cleartext_user";
    /// Its password.
    pub const CLEARTEXT_PASSWORD: &str = "clear-secret";
    /// Role trusted in pg_hba.
    pub const TRUST: &str = "trust_user";

    /// Password of `role`, if it has one.
    pub fn password(role: &str) -> Option<&'static str> {
        match role {
            SCRAM => Some(SCRAM_PASSWORD),
            MD5 => Some(MD5_PASSWORD),
            CLEARTEXT => Some(CLEARTEXT_PASSWORD),
            _ => None,
        }
    }
}

/// How long anything in a test may take before it counts as hung.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// SQL that makes the COMMIT of a transaction that inserted `a = 1` into table `t` take 1.5 s
/// (a deferred constraint trigger), so a test can kill the primary while that COMMIT runs.
pub const SLOW_COMMIT: &str = "
    CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS
      $$ BEGIN PERFORM pg_sleep(1.5); RETURN NULL; END $$;
    CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON t DEFERRABLE INITIALLY DEFERRED
      FOR EACH ROW WHEN (NEW.a = 1) EXECUTE FUNCTION slow_commit();";

/// A PostgreSQL primary, optionally with a streaming standby, removed on drop.
pub struct Cluster {
    /// The servers.
    pub pg: LocalCluster,
    /// Where psql, pgbench and the server live.
    pub bins: PgBinaries,
}

/// Environment variable that makes [`Cluster::gateway_config`] leave a cluster without a
/// standby with its one backend (a gateway that cannot move sessions and keeps no journal).
pub const ONE_BACKEND_ENV: &str = "UNDERSTUDY_TEST_ONE_BACKEND";

/// Environment variable that makes every gateway of [`Cluster::gateway_config`] listen on a
/// Unix-domain socket too, and the tests' tokio-postgres, psql and pgbench clients connect by
/// it ([`TestGateway::conn_str`]), to run the same tests over a socket (raw byte-level clients,
/// and clients of a gateway that offers TLS, stay on TCP).
pub const UNIX_SOCKET_ENV: &str = "UNDERSTUDY_TEST_UNIX_SOCKET";

/// A standby that is down: a privileged loopback port nothing listens on (connections are
/// refused at once, and no test server can take it).
pub const DOWN_STANDBY: &str = "127.0.0.1:1";

impl Cluster {
    /// A primary alone (fast; most gateway tests need no standby).
    pub async fn primary_only() -> Self {
        Self::build(|o| o.with_standby = false).await
    }

    /// A primary and a streaming hot standby.
    pub async fn primary_and_standby() -> Self {
        Self::build(|_| {}).await
    }

    /// A cluster with adjusted options (the test roles' pg_hba lines are added first).
    pub async fn build(adjust: impl FnOnce(&mut ClusterOptions)) -> Self {
        let bins = PgBinaries::find().expect("PostgreSQL server binaries");
        let mut opts = ClusterOptions::in_temp_dir();
        opts.hba = vec![
            format!("host all {} 127.0.0.1/32 md5", roles::MD5),
            format!("host all {} 127.0.0.1/32 password", roles::CLEARTEXT),
            format!("host all {} 127.0.0.1/32 trust", roles::TRUST),
        ];
        opts.max_connections = 100;
        adjust(&mut opts);
        let pg = LocalCluster::create(&bins, opts)
            .await
            .expect("local PostgreSQL cluster");
        let cluster = Self { pg, bins };
        cluster.create_roles().await;
        cluster
    }

    async fn create_roles(&self) {
        let su = self.superuser().await;
        su.batch_execute(&format!(
            "CREATE ROLE {scram} LOGIN PASSWORD '{scram_pw}';
             SET password_encryption = 'md5';
             CREATE ROLE {md5} LOGIN PASSWORD '{md5_pw}';
             RESET password_encryption;
             CREATE ROLE {clear} LOGIN PASSWORD '{clear_pw}';
             CREATE ROLE {trust} LOGIN;
             GRANT ALL ON SCHEMA public TO PUBLIC;",
            scram = roles::SCRAM,
            scram_pw = roles::SCRAM_PASSWORD,
            md5 = roles::MD5,
            md5_pw = roles::MD5_PASSWORD,
            clear = roles::CLEARTEXT,
            clear_pw = roles::CLEARTEXT_PASSWORD,
            trust = roles::TRUST,
        ))
        .await
        .expect("test roles");
        if self.pg.standby.is_some() {
            self.pg
                .wait_standby_caught_up()
                .await
                .expect("standby catches up");
        }
    }

    /// A superuser connection straight to the primary.
    pub async fn superuser(&self) -> Client {
        self.pg
            .primary
            .client(roles::SUPERUSER, "postgres")
            .await
            .expect("superuser connection to the primary")
    }

    /// The PID of the primary's WAL sender (the one standby's).
    pub async fn wal_sender_pid(&self) -> u32 {
        let pid: i32 = self
            .superuser()
            .await
            .query_one("SELECT pid FROM pg_stat_replication", &[])
            .await
            .expect("one WAL sender")
            .get(0);
        pid.unsigned_abs()
    }

    /// Ends server process `pid` on the primary (`pg_terminate_backend`).
    pub async fn terminate_backend(&self, pid: i32) {
        self.superuser()
            .await
            .execute("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .expect("pg_terminate_backend");
    }

    /// Gateway configuration for this cluster: ephemeral ports, every node as a backend. A
    /// cluster without a standby gets a second backend that refuses connections
    /// ([`DOWN_STANDBY`]), so its gateway is armed for failover as a production one is (it
    /// journals and captures xids) rather than a one-backend gateway, which can move nothing;
    /// with [`ONE_BACKEND_ENV`] set it does not, to run the same tests against that one.
    pub fn gateway_config(&self) -> Config {
        let mut backends: Vec<String> = self.pg.nodes().map(|n| n.addr().to_string()).collect();
        if backends.len() < 2 && std::env::var_os(ONE_BACKEND_ENV).is_none() {
            backends.push(DOWN_STANDBY.to_owned());
        }
        let mut c = Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            backends,
            topology_interval_ms: 200,
            shutdown_timeout_ms: 5_000,
            ..Config::default()
        };
        c.connect_timeout_ms = 3_000;
        if std::env::var_os(UNIX_SOCKET_ENV).is_some() {
            let dir = self.pg.base_dir().join("gateway-sockets");
            std::fs::create_dir_all(&dir).expect("the gateways' socket directory");
            c.unix_socket_dir = Some(dir);
        }
        c
    }

    /// A gateway with the default test configuration.
    pub async fn gateway(&self) -> TestGateway {
        self.gateway_with(|_| {}).await
    }

    /// A gateway with an adjusted configuration.
    pub async fn gateway_with(&self, adjust: impl FnOnce(&mut Config)) -> TestGateway {
        let mut config = self.gateway_config();
        adjust(&mut config);
        TestGateway::start(config).await
    }

    /// [`Cluster::gateway_with`] without waiting for the gateway to find its primary.
    pub async fn unrouted_gateway_with(&self, adjust: impl FnOnce(&mut Config)) -> TestGateway {
        let mut config = self.gateway_config();
        adjust(&mut config);
        TestGateway::spawn(config).await
    }

    /// A gateway that fails over by itself (`promote = "auto"`), reading verifiers with
    /// auth_query so that every test role's sessions can move.
    pub async fn failover_gateway(&self) -> TestGateway {
        self.failover_gateway_with(|_| {}).await
    }

    /// [`Cluster::failover_gateway`] with adjustments.
    pub async fn failover_gateway_with(&self, adjust: impl FnOnce(&mut Config)) -> TestGateway {
        self.gateway_with(|c| {
            c.failover.promote = understudy::config::Promote::Auto;
            c.failover.timeout_ms = 20_000;
            c.failover.probe_timeout_ms = 500;
            c.auth.auth_query = Some(understudy::config::DEFAULT_AUTH_QUERY.to_owned());
            adjust(c);
        })
        .await
    }

    /// SIGKILLs the primary's postmaster and all its children at once, and waits until they
    /// are gone.
    pub async fn kill_primary(&mut self) {
        self.pg.primary.kill_all().await;
        let _ = self.pg.primary.wait_gone().await;
    }

    /// Freezes every process of the primary but `keep` with SIGSTOP, the postmaster first (so
    /// it forks nothing that escapes): a hung host, whose kernel still ACKs and never closes a
    /// connection. Thawed when the result is dropped.
    pub fn freeze_primary(&self, keep: &[u32]) -> Frozen {
        let primary = &self.pg.primary;
        let mut pids: Vec<u32> = primary.postmaster_pid().into_iter().collect();
        pids.extend(primary.server_processes());
        pids.retain(|pid| !keep.contains(pid));
        Frozen::freeze(pids)
    }

    /// SIGKILLs only the primary's postmaster (its backends notice and exit on their own).
    pub async fn kill_primary_postmaster(&mut self) {
        self.pg.primary.kill_postmaster().await;
    }

    /// After a failover: the promoted standby becomes `primary` and a new standby is seeded
    /// from it (on the old primary's port, so gateways keep their backend list).
    pub async fn reseed(&mut self) {
        self.pg.reseed_standby().await.expect("reseed a standby");
    }

    /// Path of a PostgreSQL client program (psql, pgbench).
    pub fn program(&self, name: &str) -> PathBuf {
        self.bins.program(name)
    }

    /// Counts backends of `application_name` on the primary.
    pub async fn backends_named(&self, application_name: &str) -> i64 {
        let su = self.superuser().await;
        su.query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&application_name],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
    }

    /// Waits until `application_name` has exactly `n` backends on the primary.
    pub async fn wait_backends_named(&self, application_name: &str, n: i64) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let seen = self.backends_named(application_name).await;
            if seen == n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{application_name}: {seen} backends, expected {n}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A gateway running in this process, on a runtime of its own built as `understudy run` builds
/// it (no time driver: a timer not made through `understudy::clock` panics here too).
pub struct TestGateway {
    /// Its handle.
    pub handle: GatewayHandle,
    /// Dropped with the gateway: its runtime thread then ends, and every task on it.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl TestGateway {
    /// Binds and starts a gateway, and waits until it knows its primary.
    pub async fn start(config: Config) -> Self {
        let this = Self::spawn(config).await;
        this.wait_routed().await;
        this
    }

    /// Starts a gateway without waiting for it to find its primary.
    pub async fn spawn(config: Config) -> Self {
        understudy::telemetry::init_test_logging();
        let (started, handle) = tokio::sync::oneshot::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("test-gateway".into())
            .spawn(move || {
                let runtime = understudy::runtime(1).expect("gateway runtime");
                runtime.block_on(async move {
                    let bound = understudy::Gateway::bind(config).await;
                    let _ = started.send(bound.map(understudy::Gateway::spawn));
                    let _ = stopped.await;
                });
            })
            .expect("gateway thread");
        let handle = handle
            .await
            .expect("the gateway thread answers")
            .expect("gateway binds");
        Self {
            handle,
            _stop: stop,
        }
    }

    /// Waits until the gateway knows its primary.
    pub async fn wait_routed(&self) {
        let found = self.handle.shared().topology.primary(PATIENCE).await;
        assert!(found.is_some(), "gateway found no primary");
    }

    /// Client address.
    pub fn addr(&self) -> SocketAddr {
        self.handle.addr
    }

    /// Admin address.
    pub fn admin(&self) -> SocketAddr {
        self.handle.admin_addr.expect("admin listener configured")
    }

    /// A libpq-style connection string to the gateway: by its Unix-domain socket when it has
    /// one, offers no TLS and [`UNIX_SOCKET_ENV`] is set, else over TCP.
    pub fn conn_str(&self, user: &str, dbname: &str) -> String {
        let shared = self.handle.shared();
        // A gateway that offers TLS is tested over TCP: a socket carries none, as PostgreSQL's.
        let by_socket =
            std::env::var_os(UNIX_SOCKET_ENV).is_some() && shared.config.tls.cert.is_none();
        let host = match &shared.unix_socket {
            Some(socket) if by_socket => socket
                .parent()
                .expect("a socket's directory")
                .display()
                .to_string(),
            _ => "127.0.0.1".to_owned(),
        };
        let mut s = format!(
            "host={host} port={} user={user} dbname={dbname} application_name=it_{user}",
            self.addr().port()
        );
        if let Some(p) = roles::password(user) {
            s.push_str(&format!(" password={p}"));
        }
        s
    }

    /// tokio-postgres config for `user` on database postgres.
    pub fn pg_config(&self, user: &str) -> tokio_postgres::Config {
        self.conn_str(user, "postgres")
            .parse()
            .expect("valid connection string")
    }

    /// Connects as `user` (password from [`roles`]) and drives the connection in a task.
    pub async fn connect(&self, user: &str) -> Client {
        self.try_connect(self.pg_config(user))
            .await
            .unwrap_or_else(|e| panic!("connect as {user}: {e}"))
    }

    /// Connects with `config`, returning the error instead of panicking.
    pub async fn try_connect(
        &self,
        config: tokio_postgres::Config,
    ) -> Result<Client, tokio_postgres::Error> {
        let (client, conn) = config.connect(NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// Connects as `user`, keeping the connection's end (see [`ending_fatal`]).
    pub async fn connect_watched(&self, user: &str) -> (Client, ConnectionEnd) {
        connect_watched(self.pg_config(user)).await
    }

    /// The admin listener with its token, if it has one.
    pub fn admin_with_token(&self) -> understudy::ctl::Admin {
        understudy::ctl::Admin {
            addr: self.admin(),
            token: self.handle.shared().config.admin_token.clone(),
        }
    }

    /// GET from the admin listener.
    pub async fn admin_get(&self, path: &str) -> String {
        understudy::ctl::get(self.admin_with_token(), path)
            .await
            .expect("admin GET")
    }

    /// POSTs to `path` on the admin listener: the HTTP status and the body.
    pub async fn admin_post(&self, path: &str) -> (u16, String) {
        understudy::ctl::post(self.admin_with_token(), path)
            .await
            .expect("admin POST")
    }

    /// What `/status` says of a session that could move: `"yes"`, or `"no"` where failover is
    /// off (a one-backend gateway, [`ONE_BACKEND_ENV`]).
    pub async fn movable_word(&self) -> &'static str {
        if self.status().await["failover"] == "off" {
            "no"
        } else {
            "yes"
        }
    }

    /// The `/status` document.
    pub async fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.admin_get("/status").await).expect("status JSON")
    }

    /// The `/status` entry of `client`'s session, found by its backend PID.
    pub async fn session_status(&self, client: &Client) -> serde_json::Value {
        self.session_status_by_pid(backend_pid(client).await).await
    }

    /// The `/status` entry of the session whose backend PID is `pid` (asked without a query
    /// on the session, which a held or busy session would not answer).
    pub async fn session_status_by_pid(&self, pid: i32) -> serde_json::Value {
        let status = self.status().await;
        status["sessions"]
            .as_array()
            .expect("sessions array")
            .iter()
            .find(|s| s["backend_pid"] == serde_json::json!(pid))
            .unwrap_or_else(|| panic!("no session with backend_pid {pid} in {status:#}"))
            .clone()
    }

    /// Stops gracefully and waits.
    pub async fn shutdown(self) {
        self.handle.shutdown().await
    }
}

/// The value of every series of metric `name` in Prometheus text, with its labels.
pub fn metric_series<'a>(text: &'a str, name: &str) -> Vec<(&'a str, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let labels = series.strip_prefix(name)?;
            if !labels.is_empty() && !labels.starts_with('{') {
                return None;
            }
            Some((labels, value.parse().ok()?))
        })
        .collect()
}

/// The sum of every series of metric `name` in Prometheus text.
pub fn metric_total(text: &str, name: &str) -> f64 {
    metric_series(text, name).iter().map(|(_, v)| v).sum()
}

/// The entry for backend `address` in a `/status` document.
pub fn backend_status<'a>(status: &'a serde_json::Value, address: &str) -> &'a serde_json::Value {
    status["backends"]
        .as_array()
        .expect("backends in /status")
        .iter()
        .find(|b| b["address"] == address)
        .unwrap_or_else(|| panic!("{address} not in /status: {status:#}"))
}

/// The first column of every row `sql` returns, as integers.
pub async fn int_column(client: &Client, sql: &str) -> Vec<i32> {
    client
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Connects with `config` (no TLS) and forwards the connection's notifications and notices
/// to a channel.
pub async fn connect_with_messages(
    config: &tokio_postgres::Config,
) -> (
    Client,
    tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::AsyncMessage>,
) {
    use futures_util::StreamExt;
    let (client, mut conn) = config.connect(NoTls).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            let _ = tx.send(m);
        }
    });
    (client, rx)
}

/// How a connection ended: the error it ended with, if any.
pub type ConnectionEnd = tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>;

/// Connects with `config` (no TLS), keeping the connection's end: a FATAL sent while the
/// client is idle ends the connection with that error, which no request gets.
pub async fn connect_watched(config: tokio_postgres::Config) -> (Client, ConnectionEnd) {
    let (client, conn) = config.connect(NoTls).await.expect("connect");
    (client, tokio::spawn(conn))
}

/// The FATAL that ends `client`'s session: the answer to a query sent now or, where it came
/// while the session was idle, the error the connection ended with.
pub async fn ending_fatal(client: &Client, end: ConnectionEnd) -> tokio_postgres::error::DbError {
    let e = client
        .simple_query("SELECT 1")
        .await
        .expect_err("the session has ended");
    fatal_of(&e, end).await
}

/// The FATAL behind `e`, a request's error: its own, or, where the FATAL came first and the
/// request found the connection closed, the error the connection `end`ed with.
pub async fn fatal_of(
    e: &tokio_postgres::Error,
    end: ConnectionEnd,
) -> tokio_postgres::error::DbError {
    if let Some(db) = e.as_db_error() {
        return db.clone();
    }
    let ended = tokio::time::timeout(PATIENCE, end)
        .await
        .expect("the connection ends")
        .unwrap();
    let end_error = ended.expect_err("a FATAL ended the connection");
    end_error
        .as_db_error()
        .unwrap_or_else(|| panic!("no FATAL: {e:?}, connection: {end_error:?}"))
        .clone()
}

/// The PID of `c`'s backend, asked over the simple protocol: a prepared statement would be
/// closed by the driver in the background, and a FATAL that crosses that Close is taken as its
/// answer rather than the connection's end.
pub async fn backend_pid(c: &Client) -> i32 {
    let messages = c.simple_query("SELECT pg_backend_pid()").await.unwrap();
    simple_rows(&messages)[0][0].parse().unwrap()
}

/// The session's `application_name` and the port of the server it is on.
pub async fn application_name_and_port(c: &Client) -> (String, i32) {
    let row = c
        .query_one(
            "SELECT current_setting('application_name'), inet_server_port()",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// The rows of a simple-protocol answer as text, `NULL` for a null.
pub fn simple_rows(messages: &[tokio_postgres::SimpleQueryMessage]) -> Vec<Vec<String>> {
    messages
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL").to_owned())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// Runs a PostgreSQL client program with a timeout; returns its output.
pub async fn run_program(program: PathBuf, args: &[&str], stdin: Option<&[u8]>) -> Output {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(&program);
    cmd.args(args)
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn client program");
    let mut input = child.stdin.take().expect("stdin piped");
    let data = stdin.map(<[u8]>::to_vec).unwrap_or_default();
    tokio::spawn(async move {
        let _ = input.write_all(&data).await;
    });
    tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("client program finishes")
        .expect("client program output")
}

/// Runs `pgbench -i -s 1` on `conn` (a libpq connection string).
pub async fn pgbench_init(cluster: &Cluster, conn: &str) {
    let init = run_program(
        cluster.program("pgbench"),
        &["-i", "-s", "1", "-q", conn],
        None,
    )
    .await;
    assert!(
        init.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&init.stderr)
    );
}

/// SQLSTATE of a tokio-postgres error, if the server (or gateway) sent one.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<&str> {
    e.as_db_error().map(|d| d.code().code())
}

/// Asserts that `e` is an ErrorResponse of the gateway's own with SQLSTATE `code`: none of the
/// context a server error carries (where, source file, routine).
pub fn assert_gateway_error(e: &tokio_postgres::Error, code: &str) {
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("not an ErrorResponse: {e:?}"));
    assert_eq!(db.code().code(), code, "{db:?}");
    assert!(
        db.where_().is_none() && db.file().is_none() && db.routine().is_none(),
        "the gateway's own words, without a server's context: {db:?}"
    );
}

/// The sum of the `understudy_errors_total` series for `code` from `origin`.
pub fn errors_counted(metrics: &str, code: &str, origin: &str) -> f64 {
    let (code, origin) = (
        format!("sqlstate=\"{code}\""),
        format!("origin=\"{origin}\""),
    );
    metric_series(metrics, "understudy_errors_total")
        .iter()
        .filter(|(labels, _)| labels.contains(&code) && labels.contains(&origin))
        .map(|(_, v)| v)
        .sum()
}

/// Processes stopped with SIGSTOP, continued with SIGCONT when thawed or dropped (so a failing
/// test never leaves a frozen server process behind).
pub struct Frozen(Vec<u32>);

impl Frozen {
    /// Stops `pids`, in order, in one kill(1) call.
    pub fn freeze(pids: Vec<u32>) -> Self {
        signal_processes("STOP", &pids);
        Self(pids)
    }

    /// Continues them now.
    pub fn thaw(self) {}
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal_processes("CONT", &self.0);
    }
}

/// What an [`autocommit_writer`] came to: the rows it saw inserted, and those that got an
/// error, with its SQLSTATE.
pub type Writes = (Vec<i32>, Vec<(i32, Option<String>)>);

/// Inserts `first`, `first + 1`, … into `t(a)` on `client`, one autocommit statement at a time,
/// until the returned sender says stop; the task returns what each insert came to.
pub fn autocommit_writer(
    client: Client,
    first: i32,
) -> (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<Writes>,
) {
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let writes = tokio::spawn(async move {
        let (mut acked, mut failed) = (Vec::new(), Vec::new());
        for a in first.. {
            if *stopped.borrow_and_update() {
                break;
            }
            match client.execute("INSERT INTO t VALUES ($1)", &[&a]).await {
                Ok(_) => acked.push(a),
                Err(e) => failed.push((a, sqlstate(&e).map(str::to_owned))),
            }
        }
        (acked, failed)
    });
    (stop, writes)
}
