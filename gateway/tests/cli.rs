//! The `understudy` binary as scripts drive it: `run` with flags, `ctl status`, SIGTERM, `demo`.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use understudy::local_cluster::{free_port, ClusterOptions, LocalCluster, PgBinaries};

const BIN: &str = env!("CARGO_BIN_EXE_understudy");

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

async fn connect(port: u16, user: &str) -> tokio_postgres::Client {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let conn = format!("host=127.0.0.1 port={port} user={user} dbname=postgres");
        match tokio_postgres::connect(&conn, tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(conn);
                return client;
            }
            Err(e) if Instant::now() > deadline => panic!("gateway never accepted: {e}"),
            Err(_) => understudy::clock::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// A PostgreSQL primary of its own, without a standby.
async fn primary_only() -> LocalCluster {
    let bins = PgBinaries::find().expect("PostgreSQL binaries");
    let mut opts = ClusterOptions::in_temp_dir();
    opts.with_standby = false;
    LocalCluster::create(&bins, opts).await.expect("cluster")
}

/// All a child wrote to its piped stderr (read to its end: call once it has exited).
fn stderr_of(child: &mut Child) -> String {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr piped"), &mut text)
        .expect("stderr");
    text
}

/// SIGTERM to `child`, which must exit with success within 10 s.
fn stops_cleanly(child: &mut Child) {
    signal(child, "TERM");
    let status = wait_exit(child, Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "process did not exit within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `run --listen --backend --admin-listen` serves, `ctl status` shows the session, `ctl pause`
/// holds it and `ctl resume` lets it go on, SIGHUP reloads without disturbing it, and SIGTERM
/// closes an idle session with 57P01 and exits cleanly.
#[tokio::test]
async fn run_ctl_and_sigterm() {
    let mut pg = primary_only().await;
    let (port, admin) = (free_port().unwrap(), free_port().unwrap());
    let mut gw = Killed(
        Command::new(BIN)
            .args(["run", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--backend", &pg.primary.addr().to_string()])
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn understudy run"),
    );
    let client = connect(port, "postgres").await;
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);

    // A single backend is routed to without a probe; its role shows once the first probe (run
    // alongside, and slow on a loaded machine) has answered.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let out = Command::new(BIN)
            .args(["ctl", "--admin", &format!("127.0.0.1:{admin}"), "status"])
            .output()
            .expect("ctl status");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{text}");
        if text.contains("primary") || Instant::now() >= deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(text.contains("running, 1 session(s)"), "{text}");
    assert!(text.contains(&pid.to_string()), "{text}");
    assert!(text.contains("primary"), "{text}");

    let ctl = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(["ctl", "--admin", &format!("127.0.0.1:{admin}")])
            .args(args)
            .output()
            .expect("understudy ctl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, text) = ctl(&["pause", "--timeout-ms", "5000"]);
    assert!(
        ok && text.starts_with("paused: 1 session(s) held"),
        "{text}"
    );
    let (ok, text) = ctl(&["status"]);
    assert!(
        ok && text.contains("running (paused), 1 session(s)"),
        "{text}"
    );
    let (ok, text) = ctl(&["resume"]);
    assert!(ok && text == "resumed\n", "{text}");

    // SIGHUP reloads (with no files to read again here): the session goes on.
    signal(&gw.0, "HUP");
    understudy::clock::sleep(Duration::from_millis(200)).await;
    assert!(
        gw.0.try_wait().unwrap().is_none(),
        "the gateway ended at SIGHUP"
    );
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);

    stops_cleanly(&mut gw.0);
    let err = client.simple_query("SELECT 1").await.unwrap_err();
    let code = err.as_db_error().map(|e| e.code().code().to_owned());
    assert!(
        code.as_deref() == Some("57P01") || err.is_closed(),
        "idle session not closed as admin shutdown: {err}"
    );
    pg.shutdown().await;
}

/// `run --unix-socket-dir DIR --backend SOCKET_DIR:PORT`: a client connects by the gateway's
/// socket, its session runs on a server connection made by the server's socket, and the
/// gateway's socket file is gone once SIGTERM has stopped it.
#[tokio::test]
async fn run_with_unix_sockets_at_both_ends() {
    let mut pg = primary_only().await;
    let (port, admin) = (free_port().unwrap(), free_port().unwrap());
    let dir = pg.base_dir().join("gw");
    std::fs::create_dir_all(&dir).unwrap();
    let backend = format!(
        "{}:{}",
        pg.primary.socket_dir().display(),
        pg.primary.port()
    );
    let mut gw = Killed(
        Command::new(BIN)
            .args(["run", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--unix-socket-dir")
            .arg(&dir)
            .args(["--backend", &backend])
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn understudy run"),
    );
    let socket = dir.join(format!(".s.PGSQL.{port}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let client = loop {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&dir)
            .port(port)
            .user("postgres")
            .dbname("postgres");
        match config.connect(tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(conn);
                break client;
            }
            Err(e) if Instant::now() > deadline => panic!("never accepted on {socket:?}: {e}"),
            Err(_) => understudy::clock::sleep(Duration::from_millis(100)).await,
        }
    };
    let by_socket: bool = client
        .query_one("SELECT inet_client_addr() IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(by_socket, "the server sees a client on its socket");
    assert!(socket.exists());
    let out = Command::new(BIN)
        .args(["ctl", "--admin", &format!("127.0.0.1:{admin}"), "status"])
        .output()
        .expect("ctl status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("127.0.0.1:{port} and {}", socket.display())),
        "{text}"
    );
    assert!(text.contains(&backend), "{text}");
    stops_cleanly(&mut gw.0);
    assert!(!socket.exists(), "the socket file is removed at exit");
    pg.shutdown().await;
}

/// Under systemd (`Type=notify`, `WatchdogSec=`), as systemd hears it on `NOTIFY_SOCKET`:
/// `READY=1` once the gateway accepts clients, `WATCHDOG=1` at half the watchdog's interval,
/// `RELOADING=1` and `READY=1` again around a SIGHUP's reload, and `STOPPING=1` at SIGTERM.
#[tokio::test]
async fn systemd_hears_ready_watchdog_reload_and_stopping() {
    let mut pg = primary_only().await;
    let port = free_port().unwrap();
    let notify = pg.base_dir().join("notify.sock");
    let systemd = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    systemd
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut gw = Killed(
        Command::new(BIN)
            .args(["run", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--backend", &pg.primary.addr().to_string()])
            .env("NOTIFY_SOCKET", &notify)
            .env("WATCHDOG_USEC", "200000")
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn understudy run"),
    );
    // The next message that is not the watchdog's; counts those seen on the way.
    let mut fed = 0;
    let next = |fed: &mut u32| loop {
        let mut buf = [0; 4096];
        let n = systemd.recv(&mut buf).expect("a notification");
        let text = String::from_utf8(buf[..n].to_vec()).unwrap();
        if text == "WATCHDOG=1\n" {
            *fed += 1;
        } else {
            return text;
        }
    };
    let ready = next(&mut fed);
    assert_eq!(
        ready,
        format!("READY=1\nSTATUS=accepting connections on 127.0.0.1:{port}\n")
    );
    // Ready means accepting: a client gets in at once.
    let client = connect(port, "postgres").await;
    assert_eq!(
        client
            .simple_query("SELECT 1")
            .await
            .unwrap()
            .into_iter()
            .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
            .count(),
        1
    );
    std::thread::sleep(Duration::from_millis(500));
    signal(&gw.0, "HUP");
    let reloading = next(&mut fed);
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading:?}"
    );
    assert_eq!(
        next(&mut fed),
        "READY=1\nSTATUS=accepting connections; configuration reloaded\n"
    );
    assert!(fed >= 3, "the watchdog fed every 100 ms: {fed} times");
    signal(&gw.0, "TERM");
    assert!(next(&mut fed).starts_with("STOPPING=1\n"));
    drop(client);
    assert!(wait_exit(&mut gw.0, Duration::from_secs(10)).success());
    pg.shutdown().await;
}

/// Socket activation, driven by systemd's own `systemd-socket-activate`: it listens on the
/// client port, a Unix-domain socket and the admin port, and starts the gateway at the first
/// connection, which the gateway then serves (the client waits, it is not refused). The
/// passed sockets are served in place of binding (`ctl status` names them), and the Unix-domain
/// socket is left to its maker at exit, with no lock file. Two unnamed TCP sockets are refused
/// with a message saying how to name the admin one. (Skipped without the program.)
#[tokio::test]
async fn socket_activation_serves_the_sockets_systemd_passes() {
    let activate = "/usr/bin/systemd-socket-activate";
    if !std::path::Path::new(activate).exists() {
        eprintln!("skipped: no {activate} (Debian package systemd)");
        return;
    }
    let mut pg = primary_only().await;
    let (port, admin) = (free_port().unwrap(), free_port().unwrap());
    let dir = pg.base_dir().join("activated");
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join(format!(".s.PGSQL.{port}"));
    let backend = pg.primary.addr().to_string();
    let mut gw = Killed(
        Command::new(activate)
            .args(["-l", &format!("127.0.0.1:{port}")])
            .arg("-l")
            .arg(&socket)
            .args(["-l", &format!("127.0.0.1:{admin}")])
            .arg("--fdname=clients:unix:admin")
            // No --listen: the passed socket is served, whatever the configuration says.
            .args([BIN, "run", "--backend", &backend])
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn systemd-socket-activate"),
    );
    // The first connection starts the gateway, which answers it.
    let client = connect(port, "postgres").await;
    let rows = client.simple_query("SELECT 6 * 7").await.unwrap();
    let answer = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0),
        _ => None,
    });
    assert_eq!(answer, Some("42"));
    let mut by_socket = tokio_postgres::Config::new();
    by_socket
        .host_path(&dir)
        .port(port)
        .user("postgres")
        .dbname("postgres");
    let (unix_client, conn) = by_socket.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    unix_client.simple_query("SELECT 1").await.unwrap();
    let out = Command::new(BIN)
        .args(["ctl", "--admin", &format!("127.0.0.1:{admin}"), "status"])
        .output()
        .expect("ctl status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("on 127.0.0.1:{port} and {}", socket.display())),
        "{text}"
    );
    // Draining, the gateway leaves new clients in systemd's backlog for the next gateway
    // (no 57P03): the one that connects now gets no answer while a transaction holds the
    // drain open.
    client.batch_execute("BEGIN").await.unwrap();
    signal(&gw.0, "TERM");
    std::thread::sleep(Duration::from_millis(300));
    let mut waiting = tokio_postgres::Config::new();
    waiting
        .host("127.0.0.1")
        .port(port)
        .user("postgres")
        .dbname("postgres");
    let attempt = understudy::clock::timeout(
        Duration::from_secs(1),
        waiting.connect(tokio_postgres::NoTls),
    )
    .await;
    assert!(
        attempt.is_err(),
        "answered while draining: {:?}",
        attempt.map(|r| r.err())
    );
    // The transaction ends; its session is closed at that boundary, and the gateway exits.
    client.batch_execute("COMMIT").await.unwrap();
    drop((client, unix_client));
    assert!(wait_exit(&mut gw.0, Duration::from_secs(10)).success());
    assert!(socket.exists(), "systemd's socket is left to it");
    let mut lock = socket.clone().into_os_string();
    lock.push(".lock");
    assert!(
        !std::path::Path::new(&lock).exists(),
        "and has no lock file"
    );

    let (first, second) = (free_port().unwrap(), free_port().unwrap());
    let mut refused = Killed(
        Command::new(activate)
            .args(["-l", &format!("127.0.0.1:{first}")])
            .args(["-l", &format!("127.0.0.1:{second}")])
            .args([BIN, "run", "--backend", &backend])
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn systemd-socket-activate"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", first)).is_err() {
        assert!(Instant::now() < deadline, "never listened on {first}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!wait_exit(&mut refused.0, Duration::from_secs(10)).success());
    let stderr = stderr_of(&mut refused.0);
    assert!(
        stderr.contains("socket activation: a second TCP socket for clients")
            && stderr.contains("FileDescriptorName=admin"),
        "{stderr}"
    );
    pg.shutdown().await;
}

/// `log_format = "json"` writes one JSON object per line, and `log_level` filters them; a
/// reload (SIGHUP) puts a changed `log_level` in force without a restart: at `warn` the start
/// logs no info lines, after the reload to `info` the reload's own line and the shutdown's
/// are there.
#[tokio::test]
async fn json_logs_and_a_log_level_changed_by_a_reload() {
    let mut pg = primary_only().await;
    let port = free_port().unwrap();
    let file = pg.base_dir().join("understudy.toml");
    let config = |level: &str| {
        format!(
            "listen = \"127.0.0.1:{port}\"\nbackends = [\"{}\"]\nlog_format = \"json\"\nlog_level = \"{level}\"\n",
            pg.primary.addr()
        )
    };
    std::fs::write(&file, config("warn")).unwrap();
    let mut gw = Killed(
        Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(&file)
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn understudy run"),
    );
    let client = connect(port, "postgres").await;
    client.simple_query("SELECT 1").await.unwrap();
    std::fs::write(&file, config("info")).unwrap();
    signal(&gw.0, "HUP");
    // Time for the reload (a SIGHUP is handled on the runtime, in a few milliseconds).
    std::thread::sleep(Duration::from_millis(500));
    drop(client);
    stops_cleanly(&mut gw.0);
    let stderr = stderr_of(&mut gw.0);
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let messages: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["level"].as_str().unwrap_or_default(),
                l["fields"]["message"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert!(
        !messages.contains(&("INFO", "accepting connections")),
        "info lines at warn: {messages:?}"
    );
    let reloaded = messages
        .iter()
        .position(|m| *m == ("INFO", "configuration reloaded"))
        .unwrap_or_else(|| panic!("no reload line: {messages:?}"));
    assert!(
        messages[reloaded..].contains(&("INFO", "shut down")),
        "{messages:?}"
    );
    assert!(lines
        .iter()
        .all(|l| l["timestamp"].is_string() && l["target"].is_string()));
    pg.shutdown().await;
}

/// `ctl` sends the admin listener's token when given one (`--admin-token`, or
/// `UNDERSTUDY_ADMIN_TOKEN`), and without it says the listener wants one.
#[tokio::test]
async fn ctl_sends_the_admin_token() {
    let mut pg = primary_only().await;
    let (port, admin) = (free_port().unwrap(), free_port().unwrap());
    let file = pg.base_dir().join("understudy.toml");
    let token = "0123456789abcdef-admin";
    std::fs::write(
        &file,
        format!(
            "listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\nadmin_token = \"{token}\"\nbackends = [\"{}\"]\n",
            pg.primary.addr()
        ),
    )
    .unwrap();
    let mut gw = Killed(
        Command::new(BIN)
            .args(["run", "--config"])
            .arg(&file)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn understudy run"),
    );
    drop(connect(port, "postgres").await);
    let ctl = |extra: &[&str], env: Option<&str>| {
        let mut cmd = Command::new(BIN);
        cmd.args(["ctl", "--admin", &format!("127.0.0.1:{admin}")])
            .args(extra)
            .arg("status")
            .env_remove("UNDERSTUDY_ADMIN_TOKEN");
        if let Some(token) = env {
            cmd.env("UNDERSTUDY_ADMIN_TOKEN", token);
        }
        cmd.output().expect("ctl status")
    };
    let refused = ctl(&[], None);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("401") && stderr.contains("admin_token"),
        "{stderr}"
    );
    for out in [ctl(&["--admin-token", token], None), ctl(&[], Some(token))] {
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(&format!("127.0.0.1:{port}")),
            "{stdout}"
        );
    }
    stops_cleanly(&mut gw.0);
    pg.shutdown().await;
}

/// A PostgreSQL server started on the directory and port of a running gateway's socket, as
/// the same operating-system user, refuses to start (as it refuses a second postmaster on
/// its socket) instead of taking the socket over: the gateway's lock file stops it. Once the
/// gateway has stopped, lock file and socket are gone and the server starts. (As root, which
/// runs both as `postgres`; skipped otherwise.)
#[tokio::test]
async fn postgres_leaves_a_running_gateways_socket_alone() {
    let root = understudy::accounts::effective_uid() == 0;
    let Some(postgres) = understudy::accounts::user_named("postgres")
        .unwrap()
        .filter(|_| root)
    else {
        eprintln!("skipped: needs root and a postgres user");
        return;
    };
    let (uid, gid) = (postgres.uid, postgres.gid);
    let mut pg = primary_only().await;
    pg.primary.stop().await.unwrap();
    let (dir, port) = (pg.primary.socket_dir().to_owned(), pg.primary.port());
    // Where the postgres user may run it, whoever owns the checkout.
    let bin = pg.base_dir().join("understudy");
    std::fs::copy(BIN, &bin).unwrap();
    // On another loopback address, so that the server's own TCP listener (127.0.0.1) would
    // not clash; its backend is the stopped server, as no session is made.
    let mut gw = Killed(
        Command::new(&bin)
            .args(["run", "--listen", &format!("127.0.0.2:{port}")])
            .arg("--unix-socket-dir")
            .arg(&dir)
            .args(["--backend", &format!("127.0.0.1:{port}")])
            .uid(uid)
            .gid(gid)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn understudy run as postgres"),
    );
    let socket = dir.join(format!(".s.PGSQL.{port}"));
    let lock = dir.join(format!(".s.PGSQL.{port}.lock"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "no socket at {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let held = std::fs::read_to_string(&lock).expect("the gateway's lock file");
    assert_eq!(held.lines().next(), Some(gw.0.id().to_string().as_str()));

    let postgres = PgBinaries::find().unwrap().program("postgres");
    let mut server = Killed(
        Command::new(&postgres)
            .arg("-D")
            .arg(pg.primary.data_dir())
            .uid(uid)
            .gid(gid)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn postgres"),
    );
    let status = wait_exit(&mut server.0, Duration::from_secs(30));
    assert!(
        !status.success(),
        "PostgreSQL started on the gateway's socket"
    );
    let stderr = stderr_of(&mut server.0);
    assert!(
        stderr.contains(&format!(".s.PGSQL.{port}.lock\" already exists"))
            && stderr.contains(&format!("Is another postmaster (PID {})", gw.0.id())),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&lock).unwrap(), held);
    assert!(std::fs::symlink_metadata(&socket)
        .unwrap()
        .file_type()
        .is_socket());

    stops_cleanly(&mut gw.0);
    assert!(!socket.exists() && !lock.exists(), "both removed at exit");
    pg.primary.start().await.expect("the server starts now");
    pg.shutdown().await;
}

/// Connects as `user` with `password`, or says why not.
async fn try_login(
    port: u16,
    user: &str,
    password: &str,
) -> Result<tokio_postgres::Client, String> {
    let conn =
        format!("host=127.0.0.1 port={port} user={user} password={password} dbname=postgres");
    match tokio_postgres::connect(&conn, tokio_postgres::NoTls).await {
        Ok((client, conn)) => {
            tokio::spawn(conn);
            Ok(client)
        }
        Err(e) => Err(e
            .as_db_error()
            .map(|d| format!("{}: {}", d.code().code(), d.message()))
            .unwrap_or_else(|| e.to_string())),
    }
}

/// Logs in as `user`, trying again for up to 20 s (while the gateway starts, or a SIGHUP's
/// reload is under way).
async fn login_soon(port: u16, user: &str, password: &str) -> tokio_postgres::Client {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match try_login(port, user, password).await {
            Ok(c) => return c,
            Err(e) => assert!(Instant::now() < deadline, "{user} never logged in: {e}"),
        }
        understudy::clock::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `understudy ctl reload` against `admin`: (success, stdout).
fn ctl_reload(admin: u16) -> (bool, String) {
    let out = Command::new(BIN)
        .args(["ctl", "--admin", &format!("127.0.0.1:{admin}"), "reload"])
        .output()
        .expect("ctl reload");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// SIGHUP and `ctl reload` read the auth file again, with no restart: a role added to it logs
/// in, one taken out is refused while its open session carries on. A file that does not parse
/// changes nothing, and `ctl reload` says why and fails; a changed `listen` is named as taking
/// a restart and left as it is.
#[tokio::test]
async fn reload_reads_the_auth_file_again() {
    let mut pg = primary_only().await;
    pg.primary
        .client("postgres", "postgres")
        .await
        .unwrap()
        .batch_execute(
            "CREATE ROLE alice LOGIN PASSWORD 'alice-pw'; CREATE ROLE bob LOGIN PASSWORD 'bob-pw'",
        )
        .await
        .unwrap();
    let (port, admin) = (free_port().unwrap(), free_port().unwrap());
    let dir = std::env::temp_dir().join(format!("understudy-reload-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let (config, userlist) = (dir.join("understudy.toml"), dir.join("userlist.txt"));
    let write_config = |listen: u16| {
        let text = format!(
            "listen = \"127.0.0.1:{listen}\"\n\
             admin_listen = \"127.0.0.1:{admin}\"\n\
             backends = [\"{}\"]\n\
             [auth]\n\
             client_auth = \"scram-sha-256\"\n\
             auth_file = \"{}\"\n",
            pg.primary.addr(),
            userlist.display()
        );
        std::fs::write(&config, text).unwrap();
    };
    write_config(port);
    std::fs::write(&userlist, "\"alice\" \"alice-pw\"\n").unwrap();
    let mut gw = Killed(
        Command::new(BIN)
            .args(["run", "--config", &config.display().to_string()])
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn understudy run"),
    );
    let alice = login_soon(port, "alice", "alice-pw").await;
    let refused = try_login(port, "bob", "bob-pw").await.unwrap_err();
    assert!(refused.starts_with("28"), "{refused}");

    std::fs::write(&userlist, "\"alice\" \"alice-pw\"\n\"bob\" \"bob-pw\"\n").unwrap();
    signal(&gw.0, "HUP");
    let bob = login_soon(port, "bob", "bob-pw").await;

    std::fs::write(&userlist, "\"bob\" \"bob-pw\"\n").unwrap();
    let (ok, text) = ctl_reload(admin);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("reloaded; read again: {}", userlist.display())),
        "{text}"
    );
    let refused = try_login(port, "alice", "alice-pw").await.unwrap_err();
    assert!(refused.starts_with("28"), "{refused}");
    let one: i32 = alice.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1, "alice's open session carries on");

    std::fs::write(&userlist, "\"alice\" alice-pw\n").unwrap();
    let (ok, text) = ctl_reload(admin);
    assert!(!ok, "{text}");
    assert!(text.contains("reload failed, nothing changed"), "{text}");
    assert!(text.contains("expected a quoted password"), "{text}");
    try_login(port, "bob", "bob-pw").await.unwrap();
    try_login(port, "alice", "alice-pw").await.unwrap_err();

    std::fs::write(&userlist, "\"alice\" \"alice-pw\"\n").unwrap();
    write_config(free_port().unwrap());
    let (ok, text) = ctl_reload(admin);
    assert!(ok, "{text}");
    assert!(
        text.contains("changed, but only a restart applies them: listen"),
        "{text}"
    );
    try_login(port, "alice", "alice-pw").await.unwrap();
    let one: i32 = bob.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);

    signal(&gw.0, "TERM");
    wait_exit(&mut gw.0, Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
    pg.shutdown().await;
}

/// Out of file descriptors (an open-file limit it cannot raise), the gateway says so at
/// startup, and answers each client it has no room for with `FATAL 53300` at once instead of
/// leaving it in the listen queue unanswered; the sessions it has keep working, and once some
/// leave, new ones get in. Each session takes two descriptors, so limits of either parity run
/// out at a different step: with one, `accept` finds none left; with the other, the client got
/// in and its backend connection finds none (once answered with `08001` and a failover check).
#[tokio::test]
async fn out_of_file_descriptors_refuses_with_53300() {
    let mut pg = primary_only().await;
    for limit in [48, 49] {
        refuses_when_out_of_files(&pg, limit).await;
    }
    pg.shutdown().await;
}

async fn refuses_when_out_of_files(pg: &LocalCluster, limit: u32) {
    let port = free_port().unwrap();
    let log = std::env::temp_dir().join(format!("understudy-nofile-{port}.log"));
    let mut gw = Killed(
        Command::new("sh")
            .args([
                "-c",
                &format!("ulimit -n {limit} && exec \"$0\" \"$@\""),
                BIN,
                "run",
            ])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--backend", &pg.primary.addr().to_string()])
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn understudy run"),
    );
    let mut held = vec![connect(port, "postgres").await];
    let refused = loop {
        let conn =
            format!("host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=5");
        let attempt = tokio_postgres::connect(&conn, tokio_postgres::NoTls);
        match understudy::clock::timeout(Duration::from_secs(10), attempt).await {
            Err(_) => panic!("client left unanswered after {} sessions", held.len()),
            Ok(Ok((client, conn))) => {
                tokio::spawn(conn);
                held.push(client);
                assert!(
                    held.len() < limit as usize,
                    "more sessions than descriptors"
                );
            }
            Ok(Err(e)) => break e,
        }
    };
    let code = refused.as_db_error().map(|e| e.code().code());
    assert_eq!(
        code,
        Some("53300"),
        "limit {limit}, after {} sessions: {refused}",
        held.len()
    );
    assert!(held.len() >= 10, "only {} sessions", held.len());
    for client in &held {
        let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1);
    }
    held.truncate(held.len() - 3);
    let mut again = None;
    for _ in 0..50 {
        let conn = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
        if let Ok((client, conn)) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await {
            tokio::spawn(conn);
            again = Some(client);
            break;
        }
        understudy::clock::sleep(Duration::from_millis(100)).await;
    }
    assert!(again.is_some(), "no room again once sessions left");
    drop((held, again));
    signal(&gw.0, "TERM");
    wait_exit(&mut gw.0, Duration::from_secs(10));
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert!(
        text.contains("open-file limit leaves room for fewer sessions"),
        "{text}"
    );
    assert!(text.contains("out of file descriptors"), "{text}");
}

/// `demo` starts PostgreSQL and a gateway, prints a working psql command, and removes
/// everything on Ctrl-C.
#[tokio::test]
async fn demo_prints_a_working_psql_command_and_cleans_up() {
    let dir = std::env::temp_dir().join(format!("understudy-demo-test-{}", std::process::id()));
    let (port, admin) = (free_port().unwrap(), free_port().unwrap());
    let mut demo = Killed(
        Command::new(BIN)
            .args([
                "demo",
                "--port",
                &port.to_string(),
                "--admin-port",
                &admin.to_string(),
            ])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn demo"),
    );
    let stdout = demo.0.stdout.take().expect("stdout");
    // Read all along (the pipe must not fill), and shown if the demo gives no command.
    let mut stderr = demo.0.stderr.take().expect("stderr");
    let said = std::thread::spawn(move || {
        let mut said = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut said);
        said
    });
    let lines = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut seen = Vec::new();
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let ready = line.contains("Press Ctrl-C");
            seen.push(line);
            if ready {
                break;
            }
        }
        seen
    })
    .join()
    .expect("read demo output");
    let Some(psql_line) = lines.iter().find(|l| l.trim_start().starts_with("psql ")) else {
        let _ = demo.0.kill();
        // A server the demo started may hold the pipe open: five seconds at most.
        for _ in 0..50 {
            if said.is_finished() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let said = if said.is_finished() {
            said.join().unwrap_or_default()
        } else {
            "(its error output did not end)".to_owned()
        };
        panic!("no psql command in {lines:#?}; the demo said:\n{said}");
    };
    let conninfo = psql_line
        .trim()
        .trim_start_matches("psql ")
        .trim_matches('"');
    let psql = PgBinaries::find().unwrap().program("psql");
    let out = Command::new(psql)
        .args([
            "-X",
            "-At",
            conninfo,
            "-c",
            "SELECT current_user || ' ' || pg_is_in_recovery()",
        ])
        .output()
        .expect("psql");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "app false",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.exists());
    // The other command it prints: the same by the gateway's Unix-domain socket.
    let socket_line = lines
        .iter()
        .find(|l| l.trim_start().starts_with("psql -h "))
        .unwrap_or_else(|| panic!("no socket psql command in {lines:#?}"));
    let out = Command::new(PgBinaries::find().unwrap().program("psql"))
        .args(socket_line.split_whitespace().skip(1))
        .args(["-X", "-At", "-c", "SELECT inet_client_addr() IS NULL"])
        .env("PGPASSWORD", "app")
        .output()
        .expect("psql by the socket");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "f",
        "the gateway's own connection to the server is TCP: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The README's walkthrough: a transaction survives `ctl crash-primary` in its middle.
    let script = format!(
        "CREATE TABLE notes(id int PRIMARY KEY, body text);\n\
         BEGIN;\n\
         INSERT INTO notes VALUES (1, 'before');\n\
         \\! {BIN} ctl --admin 127.0.0.1:{admin} crash-primary\n\
         INSERT INTO notes VALUES (2, 'after');\n\
         COMMIT;\n\
         SELECT string_agg(id || ':' || body, ',' ORDER BY id), pg_is_in_recovery() FROM notes;\n"
    );
    let psql = PgBinaries::find().unwrap().program("psql");
    let out = Command::new(psql)
        .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", conninfo])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(script.as_bytes())?;
            child.wait_with_output()
        })
        .expect("psql with the walkthrough");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("crashed the primary"), "{stdout}");
    assert!(
        stdout.trim_end().ends_with("1:before,2:after|f"),
        "{stdout}"
    );

    signal(&demo.0, "INT");
    let status = wait_exit(&mut demo.0, Duration::from_secs(30));
    assert!(status.success(), "demo exit status {status}");
    assert!(!dir.exists(), "demo left {} behind", dir.display());
}

/// A gateway that cannot start says why in one line on stderr, each cause once, and exits
/// with failure: a missing config file, an unknown key, a port already taken.
#[test]
fn startup_errors_are_said_once() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let dir = std::env::temp_dir().join(format!("understudy-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let unknown_key = dir.join("unknown.toml");
    std::fs::write(&unknown_key, "listen = \"127.0.0.1:6432\"\nbogus = 1\n").unwrap();
    let missing = dir.join("missing.toml");
    let cases: [(Vec<&str>, &str); 3] = [
        (
            vec!["run", "--config", missing.to_str().unwrap()],
            "No such file or directory",
        ),
        (
            vec!["run", "--config", unknown_key.to_str().unwrap()],
            "unknown field `bogus`",
        ),
        (
            vec!["run", "--listen", &taken, "--backend", "127.0.0.1:1"],
            "Address already in use",
        ),
    ];
    for (args, cause) in cases {
        let out = Command::new(BIN)
            .args(&args)
            .output()
            .expect("run understudy");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        let lines = stderr
            .lines()
            .filter(|l| l.starts_with("understudy: "))
            .count();
        assert_eq!(lines, 1, "{args:?}: one line of its own: {stderr}");
        assert_eq!(stderr.matches(cause).count(), 1, "{args:?}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
