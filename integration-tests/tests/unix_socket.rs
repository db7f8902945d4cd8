//! Unix-domain sockets at both ends: clients that connect to the gateway by a socket
//! directory, as libpq does by default, and a gateway that reaches its PostgreSQL server by the
//! server's own socket.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_postgres::{Client, NoTls};
use understudy_integration_tests::raw::{startup, RawConn};
use understudy_integration_tests::tls::TestCa;
use understudy_integration_tests::{
    backend_status, pgbench_init, roles, run_program, simple_rows, sqlstate, Cluster, TestGateway,
    DOWN_STANDBY,
};

/// A directory of the cluster's for the gateway's socket (removed with the cluster).
fn socket_dir(cluster: &Cluster) -> PathBuf {
    let dir = cluster.pg.base_dir().join("gw");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The gateway's socket, as its shared state names it.
fn socket_of(gw: &TestGateway) -> PathBuf {
    gw.handle
        .shared()
        .unix_socket
        .clone()
        .expect("the gateway has a Unix-domain socket")
}

/// tokio-postgres to the gateway by its socket directory and port, as libpq would.
async fn connect_by_socket(gw: &TestGateway, user: &str) -> Client {
    let mut config = tokio_postgres::Config::new();
    config
        .host_path(socket_of(gw).parent().unwrap())
        .port(gw.addr().port())
        .user(user)
        .dbname("postgres");
    if let Some(p) = roles::password(user) {
        config.password(p);
    }
    let (client, conn) = config.connect(NoTls).await.expect("connects by the socket");
    tokio::spawn(conn);
    client
}

/// Runs `sql` with psql by the gateway's socket (its directory and port, as libpq finds it)
/// as role `user` with `password`, as the operating-system user `os_user` when given.
async fn psql_by_socket(
    cluster: &Cluster,
    gw: &TestGateway,
    os_user: Option<&str>,
    user: &str,
    password: &str,
    sql: &str,
) -> std::process::Output {
    let psql = cluster.program("psql");
    let mut cmd = match os_user {
        Some(os_user) => {
            let mut cmd = tokio::process::Command::new("runuser");
            cmd.args(["-u", os_user, "--"]).arg(psql);
            cmd
        }
        None => tokio::process::Command::new(psql),
    };
    cmd.args(["-X", "-A", "-t", "-h"])
        .arg(socket_of(gw).parent().unwrap())
        .args(["-p", &gw.addr().port().to_string()])
        .args(["-U", user, "-d", "postgres", "-c", sql])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("psql finishes")
        .expect("psql runs")
}

/// Cancels a `pg_sleep` of `c`'s from another connection (the cancel goes where `c` went),
/// and checks the query ends with `57014` soon after.
async fn cancel_a_sleep(c: Client) {
    let token = c.cancel_token();
    let sleeping = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    token
        .cancel_query(NoTls)
        .await
        .expect("the cancel is passed on");
    let cancelled = tokio::time::timeout(Duration::from_secs(10), sleeping)
        .await
        .expect("the query ends soon after the cancel")
        .unwrap();
    assert_eq!(sqlstate(&cancelled.unwrap_err()), Some("57014"));
}

/// libpq and tokio-postgres find the gateway's socket from a directory and the listen port;
/// every login the server decides (SCRAM, md5, a wrong password with its own 28P01) works
/// there as over TCP; the session shows the socket as its client in `/status`; a cancel sent
/// over the socket cancels the query; the socket has PostgreSQL's default permissions and is
/// gone once the gateway stops.
#[tokio::test]
async fn clients_connect_by_the_gateways_socket() {
    let cluster = Cluster::primary_only().await;
    let dir = socket_dir(&cluster);
    let gw = cluster
        .gateway_with(|c| c.unix_socket_dir = Some(dir.clone()))
        .await;
    let socket = socket_of(&gw);
    assert_eq!(
        socket,
        dir.join(format!(".s.PGSQL.{}", gw.addr().port())),
        "named as PostgreSQL names its socket, after the TCP port"
    );
    let meta = std::fs::metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o777);
    let lock = lock_of(&socket);
    let held = std::fs::read_to_string(&lock).expect("a lock file beside the socket");
    let lines: Vec<&str> = held.lines().collect();
    assert_eq!(lines.len(), 5, "PostgreSQL's layout: {held:?}");
    assert_eq!(
        lines[0],
        std::process::id().to_string(),
        "the gateway's PID"
    );
    assert_eq!(lines[3], gw.addr().port().to_string());
    assert_eq!(lines[4], dir.display().to_string());
    assert_eq!(
        std::fs::metadata(&lock).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let psql = |user, password, sql| psql_by_socket(&cluster, &gw, None, user, password, sql);
    for (user, password) in [
        (roles::SCRAM, roles::SCRAM_PASSWORD),
        (roles::MD5, roles::MD5_PASSWORD),
    ] {
        let out = psql(user, password, "SELECT current_user || ' ' || 6 * 7").await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "psql as {user}: {stderr}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{user} 42\n"));
    }
    let out = psql(roles::SCRAM, "wrong", "SELECT 1").await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("password authentication failed for user"),
        "the server's own refusal: {stderr}"
    );

    let c = connect_by_socket(&gw, roles::SCRAM).await;
    let pid: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        gw.status().await["unix_socket"],
        socket.display().to_string()
    );
    let session = gw.session_status_by_pid(pid).await;
    assert_eq!(session["client"], socket.display().to_string());
    assert_eq!(session["tls"], false);

    cancel_a_sleep(c).await;

    gw.shutdown().await;
    assert!(
        !socket.exists(),
        "the socket file is removed when the gateway stops"
    );
    assert!(!lock.exists(), "and so is its lock file");
}

/// The lock file beside `socket`, as PostgreSQL names it.
fn lock_of(socket: &Path) -> PathBuf {
    let mut lock = socket.as_os_str().to_owned();
    lock.push(".lock");
    lock.into()
}

/// PostgreSQL offers no TLS on its socket, and neither does the gateway, whose TCP clients
/// must use TLS (`tls.required`): an SSLRequest on the socket is answered `N` and the session
/// goes on unencrypted, while the same client over TCP without TLS is refused with 28000.
#[tokio::test]
async fn the_socket_answers_an_ssl_request_with_no() {
    let cluster = Cluster::primary_only().await;
    let ca = TestCa::new();
    let (cert, key) = (ca.server_cert.clone(), ca.server_key.clone());
    let dir = socket_dir(&cluster);
    let gw = cluster
        .gateway_with(|c| {
            c.unix_socket_dir = Some(dir.clone());
            c.tls.cert = Some(cert);
            c.tls.key = Some(key);
            c.tls.required = true;
        })
        .await;

    let mut socket = RawConn::open_unix(&socket_of(&gw)).await;
    let mut request = bytes::BytesMut::new();
    postgres_protocol::message::frontend::ssl_request(&mut request);
    socket.send(&request).await;
    assert_eq!(socket.read_byte().await, b'N');
    socket
        .send(&startup(
            0,
            &[("user", roles::TRUST), ("database", "postgres")],
        ))
        .await;
    let login = socket.read_until(b'Z').await;
    assert!(
        login.iter().all(|m| m.tag != b'E'),
        "the login goes on unencrypted: {login:?}"
    );
    drop(socket);
    let c = connect_by_socket(&gw, roles::SCRAM).await;
    assert_eq!(
        c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );

    let refused = gw
        .try_connect(gw.pg_config(roles::SCRAM))
        .await
        .expect_err("TCP without TLS is refused");
    assert_eq!(sqlstate(&refused), Some("28000"));
}

/// A free loopback port, for a gateway whose socket's name must be known before it starts.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Binds a gateway on `port` with its socket in `dir`; the error if it does not start.
async fn bind_on(cluster: &Cluster, dir: &Path, port: u16) -> Result<(), String> {
    let mut config = cluster.gateway_config();
    config.listen.set_port(port);
    config.unix_socket_dir = Some(dir.to_owned());
    config.admin_listen = None;
    match understudy::Gateway::bind(config).await {
        Ok(gateway) => {
            gateway.spawn().shutdown().await;
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// A socket file left by a process that died is replaced; one a live server answers on, or a
/// file of another kind, stops the gateway from starting and is left as it was. So for lock
/// files: one whose process has ended is replaced, and one a running process holds, or one
/// that names no process, stops the start and stays.
#[tokio::test]
async fn a_stale_socket_or_lock_is_replaced_and_a_live_one_kept() {
    let cluster = Cluster::primary_only().await;
    let dir = socket_dir(&cluster);

    let port = free_port();
    let path = dir.join(format!(".s.PGSQL.{port}"));
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists(), "a stale socket file");
    bind_on(&cluster, &dir, port)
        .await
        .expect("a stale socket is replaced");
    assert!(!path.exists(), "and removed at the end");

    let port = free_port();
    let path = dir.join(format!(".s.PGSQL.{port}"));
    let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let e = bind_on(&cluster, &dir, port).await.unwrap_err();
    assert!(e.contains("another server is listening on it"), "{e}");
    assert!(path.exists());
    drop(live);

    let port = free_port();
    let path = dir.join(format!(".s.PGSQL.{port}"));
    std::fs::write(&path, b"keep me").unwrap();
    let e = bind_on(&cluster, &dir, port).await.unwrap_err();
    assert!(e.contains("not a socket"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    assert!(!lock_of(&path).exists(), "the lock taken is given back");

    // A process that has ended: its PID is free (the kernel hands PIDs out in turn).
    let mut ended = std::process::Command::new("true").spawn().unwrap();
    ended.wait().unwrap();
    let port = free_port();
    let lock = lock_of(&dir.join(format!(".s.PGSQL.{port}")));
    std::fs::write(&lock, format!("{}\n/data\n0\n{port}\n/tmp\n", ended.id())).unwrap();
    bind_on(&cluster, &dir, port)
        .await
        .expect("the lock of a process that ended is replaced");
    assert!(!lock.exists(), "and removed at the end");

    let mut running = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let held = format!("-{}\n/data\n0\n{port}\n/tmp\n", running.id());
    std::fs::write(&lock, &held).unwrap();
    let e = bind_on(&cluster, &dir, port).await.unwrap_err();
    assert!(
        e.contains(&format!(
            "is held by process {}, which is running",
            running.id()
        )),
        "{e}"
    );
    assert_eq!(std::fs::read_to_string(&lock).unwrap(), held);
    running.kill().unwrap();
    running.wait().unwrap();

    for bogus in ["", "postmaster\n"] {
        std::fs::write(&lock, bogus).unwrap();
        let e = bind_on(&cluster, &dir, port).await.unwrap_err();
        assert!(e.contains("names no process"), "{bogus:?}: {e}");
        assert_eq!(std::fs::read_to_string(&lock).unwrap(), bogus);
    }
    std::fs::remove_file(&lock).unwrap();

    // PostgreSQL's own socket, by its lock (on another loopback address, so that the TCP
    // listener does not clash first).
    let primary = &cluster.pg.primary;
    let mut config = cluster.gateway_config();
    config.listen = std::net::SocketAddr::from(([127, 0, 0, 2], primary.port()));
    config.unix_socket_dir = Some(primary.socket_dir().to_owned());
    config.admin_listen = None;
    let Err(e) = understudy::Gateway::bind(config).await else {
        panic!("a gateway started on PostgreSQL's own socket");
    };
    let postmaster = primary.postmaster_pid().unwrap();
    assert!(
        e.to_string().contains(&format!(
            "is held by process {postmaster}, which is running"
        )),
        "{e}"
    );
    let mut config = tokio_postgres::Config::new();
    config
        .host_path(primary.socket_dir())
        .port(primary.port())
        .user("postgres")
        .dbname("postgres");
    let (server, conn) = config.connect(NoTls).await.expect("the server's socket");
    tokio::spawn(conn);
    assert!(server.simple_query("SELECT 1").await.is_ok());
}

/// The primary's backend address as its socket directory and port.
fn socket_backend(cluster: &Cluster) -> String {
    let primary = &cluster.pg.primary;
    format!("{}:{}", primary.socket_dir().display(), primary.port())
}

/// A cluster whose server asks the password roles for their passwords on its socket too.
async fn cluster_with_socket_passwords(standby: bool) -> Cluster {
    Cluster::build(|o| {
        o.with_standby = standby;
        o.hba.push(format!("local all {} md5", roles::MD5));
        o.hba
            .push(format!("local all {} scram-sha-256", roles::SCRAM));
    })
    .await
}

/// A backend named by its socket directory: sessions log in there (SCRAM, md5), run on a
/// server connection that is no TCP one (`inet_client_addr()` is null), copy data both ways,
/// and a cancel reaches the query over the server's socket; `/status` names the socket.
#[tokio::test]
async fn sessions_reach_a_server_by_its_socket() {
    let cluster = cluster_with_socket_passwords(false).await;
    let backend = socket_backend(&cluster);
    let gw = cluster
        .gateway_with(|c| c.backends = vec![backend.clone(), DOWN_STANDBY.to_owned()])
        .await;
    let status = gw.status().await;
    assert_eq!(backend_status(&status, &backend)["role"], "primary");

    for user in [roles::SCRAM, roles::MD5] {
        let c = gw.connect(user).await;
        let row = c
            .query_one("SELECT current_user::text, inet_client_addr() IS NULL", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), user);
        assert!(row.get::<_, bool>(1), "the server sees a socket client");
    }

    let c = gw.connect(roles::SCRAM).await;
    c.batch_execute("CREATE TEMP TABLE copied (a int, b text)")
        .await
        .unwrap();
    let sink = c.copy_in("COPY copied FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    use futures_util::SinkExt;
    let rows: String = (0..5000).map(|i| format!("{i}\trow {i}\n")).collect();
    sink.send(bytes::Bytes::from(rows.clone())).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 5000);
    let out = c.copy_out("COPY copied TO STDOUT").await.unwrap();
    use futures_util::TryStreamExt;
    let chunks: Vec<bytes::Bytes> = out.try_collect().await.unwrap();
    assert_eq!(chunks.concat(), rows.into_bytes());

    let pid: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let session = gw.session_status_by_pid(pid).await;
    assert_eq!(
        session["backend"],
        format!(
            "{}/.s.PGSQL.{}",
            cluster.pg.primary.socket_dir().display(),
            cluster.pg.primary.port()
        )
    );
    cancel_a_sleep(c).await;

    pgbench_init(&cluster, &gw.conn_str(roles::SCRAM, "postgres")).await;
    let out = run_program(
        cluster.program("pgbench"),
        &[
            "-n",
            "-c",
            "4",
            "-t",
            "100",
            &gw.conn_str(roles::SCRAM, "postgres"),
        ],
        None,
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let history: i64 = cluster
        .superuser()
        .await
        .query_one("SELECT count(*) FROM pgbench_history", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(history, 400, "every transaction once");
}

/// A primary reached by its socket fails over like any other: its sessions move to the
/// standby, reached over TCP, with their open transaction replayed, and every row the client
/// saw written is there once.
#[tokio::test]
async fn a_session_moves_off_a_primary_reached_by_its_socket() {
    let mut cluster = cluster_with_socket_passwords(true).await;
    cluster
        .superuser()
        .await
        .batch_execute("CREATE TABLE t(a int PRIMARY KEY); GRANT ALL ON t TO PUBLIC")
        .await
        .unwrap();
    cluster.pg.wait_standby_caught_up().await.unwrap();
    let backends = vec![
        socket_backend(&cluster),
        cluster.pg.standby.as_ref().unwrap().addr().to_string(),
    ];
    let gw = cluster
        .failover_gateway_with(|c| c.backends = backends)
        .await;
    let c = gw.connect(roles::SCRAM).await;
    // Asked before the transaction: a replay could not reproduce the old backend's PID.
    let pid: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    c.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    c.batch_execute("BEGIN; INSERT INTO t VALUES (2)")
        .await
        .unwrap();
    assert_eq!(gw.session_status_by_pid(pid).await["movable"], "yes");

    cluster.kill_primary().await;

    c.batch_execute("INSERT INTO t VALUES (3); COMMIT")
        .await
        .expect("the session moved and its transaction was replayed");
    let rows: Vec<i32> = c
        .query("SELECT a FROM t ORDER BY a", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, [1, 2, 3]);
    let on_tcp: bool = c
        .query_one("SELECT inet_client_addr() IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(on_tcp, "the session now runs on the standby, over TCP");
}

/// Bad input on the socket is answered as on TCP: bytes that are no startup packet get
/// `08P01` and a closed connection, a client past `max_client_connections` gets `53300`, and a
/// session of the socket next to them is untouched.
#[tokio::test]
async fn bad_input_on_the_socket_is_refused_as_on_tcp() {
    let cluster = Cluster::primary_only().await;
    let dir = socket_dir(&cluster);
    let gw = cluster
        .gateway_with(|c| {
            c.unix_socket_dir = Some(dir.clone());
            c.max_client_connections = 2;
        })
        .await;
    let neighbour = connect_by_socket(&gw, roles::TRUST).await;
    for garbage in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ],
        &4i32.to_be_bytes(),
    ] {
        let mut socket = RawConn::open_unix(&socket_of(&gw)).await;
        socket.send(garbage).await;
        let refusal = socket
            .read()
            .await
            .expect("an ErrorResponse before the close");
        assert_eq!((refusal.tag, refusal.code().as_str()), (b'E', "08P01"));
        assert!(socket.closed().await, "then closed");
    }

    let _second = gw.connect(roles::TRUST).await;
    let mut third = RawConn::open_unix(&socket_of(&gw)).await;
    third
        .send(&startup(
            0,
            &[("user", roles::TRUST), ("database", "postgres")],
        ))
        .await;
    let refusal = third.read().await.expect("a refusal");
    assert_eq!((refusal.tag, refusal.code().as_str()), (b'E', "53300"));
    assert!(third.closed().await);

    let rows = neighbour.simple_query("SELECT 7").await.unwrap();
    assert_eq!(simple_rows(&rows), [["7"]]);
}

/// `unix_socket_mode` and `unix_socket_group` decide who may connect, as PostgreSQL's
/// `unix_socket_permissions` and `unix_socket_group` do: with `0o770` and the group
/// `postgres`, psql run as `postgres` gets in, and psql run as `nobody` is refused by the
/// kernel before the gateway hears of it. (As root, which these tests run as; skipped
/// otherwise.)
#[tokio::test]
async fn the_sockets_mode_and_group_decide_who_connects() {
    if !root_or_skip() {
        return;
    }
    let cluster = Cluster::primary_only().await;
    let dir = open_dir("mode");
    let gw = cluster
        .gateway_with(|c| {
            c.unix_socket_dir = Some(dir.clone());
            c.unix_socket_mode = 0o770;
            c.unix_socket_group = Some("postgres".to_owned());
        })
        .await;
    let meta = std::fs::metadata(socket_of(&gw)).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o770);
    let postgres_gid = std::fs::read_to_string("/etc/group")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("postgres:x:"))
        .and_then(|rest| rest.split(':').next()?.parse::<u32>().ok())
        .expect("a postgres group");
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), postgres_gid);

    let psql_as = |os_user| {
        psql_by_socket(
            &cluster,
            &gw,
            Some(os_user),
            roles::TRUST,
            "",
            "SELECT 'in'",
        )
    };
    let member = psql_as("postgres").await;
    assert_eq!(
        String::from_utf8_lossy(&member.stdout),
        "in\n",
        "{}",
        String::from_utf8_lossy(&member.stderr)
    );
    let stranger = psql_as("nobody").await;
    assert!(!stranger.status.success());
    let stderr = String::from_utf8_lossy(&stranger.stderr);
    assert!(stderr.contains("Permission denied"), "{stderr}");
    gw.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether this process runs as root (and so may run psql as other users).
fn running_as_root() -> bool {
    understudy::accounts::effective_uid() == 0
}

/// Asserts that psql's `out` printed `role` alone (its `SELECT current_user`).
fn assert_logged_in_as(out: &std::process::Output, role: &str) {
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{role}\n"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// [`running_as_root`], saying that the test is skipped when not.
fn root_or_skip() -> bool {
    if !running_as_root() {
        eprintln!("skipped: needs root to run psql as other users");
    }
    running_as_root()
}

/// A directory every user may enter (so that only the socket's own permissions decide who
/// connects), named after `what` and this process.
fn open_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("understudy-socket-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// A gateway whose socket, in a fresh directory named after `what`, authenticates by `peer`,
/// with `role` made on the server with `password`, which the auth file holds too (so the
/// gateway logs in for it, and its sessions can move); `adjust` changes the rest of its
/// configuration. Returns it and the directory.
async fn peer_gateway(
    cluster: &Cluster,
    what: &str,
    role: &str,
    password: &str,
    adjust: impl FnOnce(&mut understudy::config::Config, &Path),
) -> (TestGateway, PathBuf) {
    let su = cluster.superuser().await;
    su.batch_execute(&format!("CREATE ROLE {role} LOGIN PASSWORD '{password}'"))
        .await
        .unwrap();
    let dir = open_dir(what);
    let userlist = dir.join("userlist.txt");
    std::fs::write(&userlist, format!("\"{role}\" \"{password}\"\n")).unwrap();
    let gw = cluster
        .gateway_with(|c| {
            c.unix_socket_dir = Some(dir.clone());
            c.auth.unix_socket_auth = Some(understudy::config::ClientAuth::Peer);
            c.auth.auth_file = Some(userlist.clone());
            adjust(c, &dir);
        })
        .await;
    (gw, dir)
}

/// `auth.unix_socket_auth = "peer"`, PostgreSQL's `peer` on the gateway's socket: a client
/// whose operating-system user has the role's name gets in with no password, and the gateway
/// logs in to the server for it with the auth file's password (so the session can move); any
/// other gets PostgreSQL's `28000` `Peer authentication failed`. TCP clients stay under
/// `client_auth` (here the server decides). (As root, which runs psql as other users; skipped
/// otherwise.)
#[tokio::test]
async fn peer_authentication_on_the_socket() {
    if !root_or_skip() {
        return;
    }
    let cluster = Cluster::primary_only().await;
    let (gw, dir) = peer_gateway(&cluster, "peer", "nobody", "nobody-secret", |_, _| {}).await;
    let psql = |os_user, user| {
        psql_by_socket(
            &cluster,
            &gw,
            os_user,
            user,
            "",
            "SELECT current_user, inet_client_addr() IS NOT NULL",
        )
    };

    // The server sees the gateway's TCP connection, logged in with the auth file's password
    // (its pg_hba line for that asks for SCRAM).
    let nobody = psql(Some("nobody"), "nobody").await;
    let stdout = String::from_utf8_lossy(&nobody.stdout);
    assert!(
        stdout == "nobody|t\n",
        "{stdout}{}",
        String::from_utf8_lossy(&nobody.stderr)
    );
    let postgres = psql(Some("postgres"), roles::SUPERUSER).await;
    let stdout = String::from_utf8_lossy(&postgres.stdout);
    assert!(
        stdout == "postgres|t\n",
        "{stdout}{}",
        String::from_utf8_lossy(&postgres.stderr)
    );

    for (os_user, user) in [
        (Some("postgres"), "nobody"),
        (Some("nobody"), roles::SUPERUSER),
        (None, roles::SUPERUSER),
    ] {
        let refused = psql(os_user, user).await;
        assert!(!refused.status.success(), "{os_user:?} as {user}");
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            stderr.contains(&format!("Peer authentication failed for user \"{user}\"")),
            "{os_user:?} as {user}: {stderr}"
        );
    }
    // 28000, as PostgreSQL's own refusal.
    let mut config = tokio_postgres::Config::new();
    config
        .host_path(&dir)
        .port(gw.addr().port())
        .user(roles::SUPERUSER)
        .dbname("postgres");
    let refused = config
        .connect(NoTls)
        .await
        .err()
        .expect("root is not postgres");
    assert_eq!(sqlstate(&refused), Some("28000"));

    // The session can move (where the gateway moves any): it can log in for it again.
    let sleeper = psql_by_socket(
        &cluster,
        &gw,
        Some("nobody"),
        "nobody",
        "",
        "SELECT pg_sleep(2)",
    );
    let watch = async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let status = gw.status().await;
            let sessions = status["sessions"].as_array().unwrap();
            // Once logged in (the session is listed from its startup on).
            let logged_in =
                |s: &&serde_json::Value| s["user"] == "nobody" && !s["backend_pid"].is_null();
            if let Some(s) = sessions.iter().find(logged_in) {
                break s.clone();
            }
            assert!(tokio::time::Instant::now() < deadline, "{status:#}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (slept, session) = tokio::join!(sleeper, watch);
    assert!(slept.status.success());
    assert_eq!(session["movable"], gw.movable_word().await, "{session:#}");
    assert_eq!(session["client"], socket_of(&gw).display().to_string());
    gw.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// `peer` with a user name map (`auth.ident_file`, `auth.ident_map`: PostgreSQL's `map=`): the
/// map decides which operating-system users log in as which roles, a user's own name included
/// only where a line says so; a reload reads the file again. (As root; skipped otherwise.)
#[tokio::test]
async fn peer_follows_the_user_name_map() {
    if !root_or_skip() {
        return;
    }
    let cluster = Cluster::primary_only().await;
    let lines = "# MAPNAME SYSTEM-USERNAME PG-USERNAME\napps  nobody  peer_app\n";
    let (gw, dir) = peer_gateway(&cluster, "peer-map", "peer_app", "app-secret", |c, dir| {
        let file = dir.join("pg_ident.conf");
        std::fs::write(&file, lines).unwrap();
        c.auth.ident_file = Some(file);
        c.auth.ident_map = Some("apps".to_owned());
    })
    .await;
    let login = |os_user, role| {
        psql_by_socket(
            &cluster,
            &gw,
            Some(os_user),
            role,
            "",
            "SELECT current_user",
        )
    };
    assert_logged_in_as(&login("nobody", "peer_app").await, "peer_app");
    for (os_user, role) in [("postgres", "peer_app"), ("postgres", roles::SUPERUSER)] {
        let refused = login(os_user, role).await;
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            stderr.contains(&format!("Peer authentication failed for user \"{role}\"")),
            "{os_user} as {role}: {stderr}"
        );
    }

    // A line added, and read again at a reload.
    let file = dir.join("pg_ident.conf");
    std::fs::write(&file, format!("{lines}apps  /^post(gres)$  peer_app\n")).unwrap();
    let (status, body) = gw.admin_post("/reload").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("pg_ident.conf"), "{body}");
    assert_logged_in_as(&login("postgres", "peer_app").await, "peer_app");

    // A file that does not parse is not taken: the reload says where, and the map stays.
    std::fs::write(&file, "apps nobody\n").unwrap();
    let (status, body) = gw.admin_post("/reload").await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("pg_ident.conf: line 1"), "{body}");
    assert_logged_in_as(&login("postgres", "peer_app").await, "peer_app");
    gw.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A user record in systemd's user database (`/run/userdb`), which the C library's name
/// service reads through nss-systemd: an account `/etc/passwd` does not have, as LDAP (sssd)
/// users are. Removed when dropped.
struct NameServiceUser {
    files: [PathBuf; 2],
}

impl NameServiceUser {
    /// Adds user `name` with id `uid`; `None` when the name service does not find it then
    /// (no nss-systemd in `/etc/nsswitch.conf`).
    fn add(name: &str, uid: u32) -> Option<Self> {
        let dir = Path::new("/run/userdb");
        std::fs::create_dir_all(dir).unwrap();
        let record = dir.join(format!("{name}.user"));
        let by_uid = dir.join(format!("{uid}.user"));
        std::fs::write(
            &record,
            format!(
                r#"{{"userName":"{name}","uid":{uid},"gid":{uid},"homeDirectory":"/nonexistent","shell":"/usr/sbin/nologin","disposition":"regular"}}"#
            ),
        )
        .unwrap();
        let _ = std::fs::remove_file(&by_uid);
        std::os::unix::fs::symlink(&record, &by_uid).unwrap();
        let user = NameServiceUser {
            files: [by_uid, record],
        };
        let getent = std::process::Command::new("getent")
            .args(["passwd", &uid.to_string()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&getent.stdout)
            .starts_with(&format!("{name}:"))
            .then_some(user)
    }
}

impl Drop for NameServiceUser {
    fn drop(&mut self) {
        for file in &self.files {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// `peer` finds the client's operating-system user as PostgreSQL does, through the name
/// service, so a user that only a directory service knows (here systemd's user database,
/// read by nss-systemd) logs in by its name; one that only `/etc/passwd` was read for would be
/// refused as a stranger. (As root; skipped where nss-systemd is not configured.)
#[tokio::test]
async fn peer_finds_users_the_name_service_knows() {
    if !running_as_root() {
        eprintln!("skipped: needs root to add a user and run psql as it");
        return;
    }
    // An id neither /etc/passwd nor the name service has.
    let uid = 61_000 + std::process::id() % 1_000;
    let name = format!("understudy_nss_{uid}");
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    assert!(!passwd.contains(&format!(":{uid}:")), "uid {uid} is taken");
    let Some(_user) = NameServiceUser::add(&name, uid) else {
        eprintln!("skipped: the name service does not read /run/userdb (no nss-systemd)");
        return;
    };
    let cluster = Cluster::primary_only().await;
    let (gw, dir) = peer_gateway(&cluster, "peer-nss", &name, "nss-secret", |_, _| {}).await;
    let out = psql_by_socket(&cluster, &gw, Some(&name), &name, "", "SELECT current_user").await;
    assert_logged_in_as(&out, &name);
    let refused = psql_by_socket(&cluster, &gw, Some(&name), "nobody", "", "SELECT 1").await;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("Peer authentication failed for user \"nobody\""),
        "{stderr}"
    );
    gw.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
