//! With several backends the gateway routes every session to the one not in recovery, and
//! follows a promotion; the admin listener reports backends, sessions and metrics.

use std::time::{Duration, Instant};

use understudy_integration_tests::{
    backend_status, int_column, metric_series, metric_total, roles, sqlstate, Cluster, Frozen,
    PATIENCE,
};

/// Sessions go to the primary whatever the order of the backends, and `/status` says so.
#[tokio::test]
async fn routes_to_the_primary_and_reports_it() {
    let cluster = Cluster::primary_and_standby().await;
    let standby = cluster
        .pg
        .standby
        .as_ref()
        .expect("standby")
        .addr()
        .to_string();
    let primary = cluster.pg.primary.addr().to_string();
    let gw = cluster
        .gateway_with(|c| c.backends = vec![standby.clone(), primary.clone()])
        .await;
    let c = gw.connect(roles::SCRAM).await;
    let row = c
        .query_one(
            "SELECT pg_is_in_recovery(), inet_server_port(), pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert!(!row.get::<_, bool>(0), "routed to a standby");
    assert_eq!(row.get::<_, i32>(1), i32::from(cluster.pg.primary.port()));
    let pid: i32 = row.get(2);

    c.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let status = gw.status().await;
    let backends = status["backends"].as_array().unwrap();
    let role_of = |addr: &str| {
        backends
            .iter()
            .find(|b| b["address"] == addr)
            .map(|b| {
                (
                    b["role"].as_str().unwrap().to_owned(),
                    b["routed"].as_bool().unwrap(),
                )
            })
            .unwrap()
    };
    assert_eq!(role_of(&primary), ("primary".to_owned(), true));
    assert_eq!(role_of(&standby), ("standby".to_owned(), false));
    // The default promotion mode, armed: there is a second backend to move to.
    assert_eq!(status["failover"], "external", "{status:#}");
    assert!(status.get("failover_off").is_none(), "{status:#}");
    let session = status["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["backend_pid"] == pid)
        .expect("session listed with its backend PID");
    assert_eq!(session["user"], roles::SCRAM);
    assert_eq!(session["transaction"], "in_transaction");
    assert_eq!(session["active"], false, "idle in its transaction");
    assert_eq!(session["backend"], primary);
    c.batch_execute("COMMIT").await.unwrap();

    // A statement running is `active`, as pg_stat_activity says, and `ctl status` says so.
    let busy = gw.connect(roles::MD5).await;
    let running = tokio::spawn(async move { busy.batch_execute("SELECT pg_sleep(1)").await });
    let deadline = Instant::now() + PATIENCE;
    let table = loop {
        let status = gw.status().await;
        let listed =
            status["sessions"].as_array().unwrap().iter().any(|s| {
                s["user"] == roles::MD5 && s["active"] == true && s["transaction"] == "idle"
            });
        if listed {
            break understudy::ctl::render_status(&status);
        }
        assert!(Instant::now() < deadline, "never active: {status:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        table
            .lines()
            .any(|l| l.contains(roles::MD5) && l.contains(" active ")),
        "{table}"
    );
    running.await.unwrap().unwrap();

    // Metrics count what went through.
    let e = c.batch_execute("SELECT * FROM nowhere").await.unwrap_err();
    assert_eq!(sqlstate(&e), Some("42P01"));
    let metrics = gw.admin_get("/metrics").await;
    let value = |name: &str| metric_total(&metrics, name);
    assert!(value("understudy_sessions_total") >= 1.0, "{metrics}");
    assert!(value("understudy_queries_total") >= 3.0);
    assert!(value("understudy_transactions_total") >= 1.0);
    assert!(value("understudy_client_bytes_total") > 0.0);
    assert!(value("understudy_backend_bytes_total") > 0.0);
    assert!(value("understudy_sessions_open") >= 1.0);
    assert!(metrics.contains("sqlstate=\"42P01\""), "{metrics}");
    assert!(metrics.contains("understudy_backend_connect_seconds"));
    // What alerts watch is exported before it first happens, every outcome at 0.
    for (name, series) in [
        ("understudy_failovers_total", 1),
        ("understudy_failover_failures_total", 1),
        ("understudy_lost_commits_total", 1),
        ("understudy_in_doubt_statements_total", 1),
        ("understudy_in_doubt_commits_total", 3),
        ("understudy_replays_total", 3),
        ("understudy_session_moves_total", 4),
        ("understudy_cancel_requests_total", 4),
    ] {
        assert_eq!(
            metric_series(&metrics, name).len(),
            series,
            "{name}: {metrics}"
        );
    }
    let missing = understudy::ctl::get(gw.admin(), "/nope").await.unwrap_err();
    assert!(missing.to_string().contains("404"), "{missing}");
}

/// With `admin_token` set, every admin request must carry it (`Authorization: Bearer`):
/// without it, or with another, `/status`, `/metrics` and `POST /pause` get `401` with
/// `WWW-Authenticate`, and nothing is paused; with it they are served.
#[tokio::test]
async fn the_admin_token_guards_every_admin_request() {
    let cluster = Cluster::primary_only().await;
    let token = "a-long-enough-admin-token";
    let gw = cluster
        .gateway_with(|c| c.admin_token = Some(token.to_owned()))
        .await;
    let as_given = |token: Option<&str>| understudy::ctl::Admin {
        addr: gw.admin(),
        token: token.map(str::to_owned),
    };
    for given in [None, Some("a-long-enough-admin-tokeN"), Some("")] {
        for (method, path) in [
            (understudy::ctl::Method::GET, "/status"),
            (understudy::ctl::Method::GET, "/metrics"),
            (understudy::ctl::Method::POST, "/pause?timeout_ms=1000"),
            (understudy::ctl::Method::GET, "/nope"),
        ] {
            let (status, body) = understudy::ctl::exchange(as_given(given), method, path)
                .await
                .unwrap();
            assert_eq!(status.as_u16(), 401, "{given:?} {path}: {body}");
            assert!(body.contains("admin_token"), "{body}");
        }
    }
    let status = gw.status().await;
    assert_eq!(status["paused"], false, "an unauthorized pause did nothing");
    // Load balancers' and orchestrators' probes need no token.
    for (path, says) in [("/health", "ok\n"), ("/ready", "ready: sessions go to ")] {
        let (status, body) =
            understudy::ctl::exchange(as_given(None), understudy::ctl::Method::GET, path)
                .await
                .unwrap();
        assert_eq!(status.as_u16(), 200, "{path}: {body}");
        assert!(body.starts_with(says), "{path}: {body}");
    }
    let (status, _) = understudy::ctl::exchange(
        as_given(Some(token)),
        understudy::ctl::Method::POST,
        "/ready",
    )
    .await
    .unwrap();
    assert_eq!(status.as_u16(), 405);
    let metrics = understudy::ctl::get(as_given(Some(token)), "/metrics")
        .await
        .unwrap();
    assert!(metrics.contains("understudy_sessions_total"));
    let (code, body) = understudy::ctl::post(as_given(Some(token)), "/resume")
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
}

/// `GET /ready` answers 503 while no backend is a primary it can route to, and 200 once one
/// is (the probe an orchestrator or load balancer asks before sending clients).
#[tokio::test]
async fn ready_says_whether_a_primary_is_routed() {
    let mut cluster = Cluster::primary_only().await;
    cluster.pg.primary.stop().await.unwrap();
    let gw = cluster.unrouted_gateway_with(|_| {}).await;
    let ready = || understudy::ctl::exchange(gw.admin(), understudy::ctl::Method::GET, "/ready");
    let (status, body) = ready().await.unwrap();
    assert_eq!(status.as_u16(), 503, "{body}");
    assert_eq!(body, "no primary known\n");
    cluster.pg.primary.start().await.unwrap();
    gw.wait_routed().await;
    let (status, body) = ready().await.unwrap();
    assert_eq!(status.as_u16(), 200, "{body}");
}

/// After the primary stops and the standby is promoted, new sessions go to the new primary.
#[tokio::test]
async fn follows_a_promotion_for_new_sessions() {
    let mut cluster = Cluster::primary_and_standby().await;
    let gw = cluster.gateway().await;
    let before = gw.connect(roles::SCRAM).await;
    before
        .batch_execute("CREATE TABLE p(a int); INSERT INTO p VALUES (1)")
        .await
        .unwrap();
    cluster.pg.wait_standby_caught_up().await.unwrap();
    drop(before);

    cluster.pg.primary.kill_all().await;
    let standby = cluster.pg.standby.as_ref().unwrap();
    standby.promote().await.unwrap();
    let new_port = i32::from(standby.port());

    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Ok(c) = gw.try_connect(gw.pg_config(roles::SCRAM)).await {
            let row = c
                .query_one("SELECT inet_server_port(), (SELECT count(*) FROM p)", &[])
                .await
                .unwrap();
            assert_eq!(row.get::<_, i32>(0), new_port);
            assert_eq!(
                row.get::<_, i64>(1),
                1,
                "the committed row is on the new primary"
            );
            c.batch_execute("INSERT INTO p VALUES (2)").await.unwrap();
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never routed to the new primary"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The spares now wait on the new primary.
    wait_spares(&gw, 2).await;
    let su = standby
        .client(roles::SUPERUSER, "postgres")
        .await
        .expect("superuser connection to the new primary");
    let mark = server_clock(&su).await;
    let c = gw.connect(roles::SCRAM).await;
    assert!(
        started_before(&su, &c, mark).await,
        "no spare on the new primary"
    );
}

/// PIDs of the gateway's kept control connections on the primary.
async fn control_pids(cluster: &Cluster) -> Vec<i32> {
    int_column(
        &cluster.superuser().await,
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'understudy-control'
          ORDER BY pid",
    )
    .await
}

/// Waits until the primary has exactly one kept control connection, other than `not`.
async fn one_control_pid(cluster: &Cluster, not: &[i32]) -> i32 {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let [pid] = control_pids(cluster).await[..] {
            if !not.contains(&pid) {
                return pid;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{:?}",
            control_pids(cluster).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Role probes and auth_query look-ups share one kept control connection per backend instead
/// of logging in (a server process started) each time.
#[tokio::test]
async fn control_connection_is_kept_for_probes_and_auth_query() {
    let cluster = Cluster::primary_and_standby().await;
    let gw = cluster
        .gateway_with(|c| {
            c.topology_interval_ms = 100;
            c.auth.auth_query = Some(understudy::config::DEFAULT_AUTH_QUERY.to_owned());
        })
        .await;
    let pid = one_control_pid(&cluster, &[]).await;
    let mut sessions = Vec::new();
    for _ in 0..3 {
        let c = gw.connect(roles::SCRAM).await;
        c.query_one("SELECT 1", &[]).await.unwrap();
        sessions.push(c);
    }
    let status = gw.status().await;
    let listed = status["sessions"].as_array().unwrap();
    assert_eq!(listed.len(), 3, "{status:#}");
    assert!(
        listed.iter().all(|s| s["movable"] == "yes"),
        "auth_query found the verifier for every login: {status:#}"
    );
    // Five probe rounds later, still the same server process.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(control_pids(&cluster).await, [pid]);
}

/// A kept control connection that an administrator terminates is replaced without the
/// backend ever reading as unreachable; one whose server process hangs is given up after the
/// connect timeout and replaced too.
#[tokio::test]
async fn a_terminated_or_hung_control_connection_is_replaced() {
    let cluster = Cluster::primary_and_standby().await;
    let gw = cluster
        .gateway_with(|c| {
            c.topology_interval_ms = 50;
            c.connect_timeout_ms = 1_000;
        })
        .await;
    let primary = cluster.pg.primary.addr().to_string();
    let first = one_control_pid(&cluster, &[]).await;

    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let admin = gw.admin();
    let watcher = tokio::spawn(async move {
        let mut roles = Vec::new();
        while !*stopped.borrow() {
            let text = understudy::ctl::get(admin, "/status").await.unwrap();
            let status: serde_json::Value = serde_json::from_str(&text).unwrap();
            let role = &backend_status(&status, &primary)["role"];
            roles.push(role.as_str().unwrap().to_owned());
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                _ = stopped.changed() => {}
            }
        }
        roles
    });
    cluster.terminate_backend(first).await;
    let second = one_control_pid(&cluster, &[first]).await;
    // A few more probe rounds on the new connection.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.send(true).unwrap();
    let roles = watcher.await.unwrap();
    assert!(roles.len() > 5, "{roles:?}");
    assert!(roles.iter().all(|r| r == "primary"), "{roles:?}");

    let signal = |sig: &str, pid: i32| {
        let status = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    signal("-STOP", second);
    let third = tokio::time::timeout(PATIENCE, async {
        loop {
            let pids = control_pids(&cluster).await;
            if let Some(&p) = pids.iter().find(|&&p| p != second) {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    signal("-CONT", second);
    let third = third.expect("no new control connection while the kept one hung");
    // The hung one was closed by the gateway: continued, its server process sees EOF and ends.
    assert_eq!(one_control_pid(&cluster, &[second]).await, third);
    gw.connect(roles::SCRAM)
        .await
        .query_one("SELECT 1", &[])
        .await
        .unwrap();
}

/// Waits until the gateway reports `n` spare backend connections.
async fn wait_spares(gw: &understudy_integration_tests::TestGateway, n: u64) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while gw.status().await["spare_backends"] != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never {n} spares: {}",
            gw.status().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether the backend behind `c` was started before `mark` (the server's clock, in seconds).
async fn started_before(
    su: &tokio_postgres::Client,
    c: &tokio_postgres::Client,
    mark: f64,
) -> bool {
    let pid = understudy_integration_tests::backend_pid(c).await;
    su.query_one(
        "SELECT extract(epoch FROM backend_start)::float8 < $2 FROM pg_stat_activity WHERE pid = $1",
        &[&pid, &mark],
    )
    .await
    .unwrap()
    .get(0)
}

/// The server's clock, in seconds since the epoch.
async fn server_clock(su: &tokio_postgres::Client) -> f64 {
    su.query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
        .await
        .unwrap()
        .get(0)
}

/// Logins get a backend the server started before the client came (a spare), with the
/// client's own user, database and parameters, and each spare taken is replaced.
#[tokio::test]
async fn logins_use_spare_backend_connections() {
    let cluster = Cluster::primary_only().await;
    let su = cluster.superuser().await;
    let gw = cluster.gateway_with(|c| c.spare_backends = 2).await;
    for round in 0..4 {
        wait_spares(&gw, 2).await;
        let mark = server_clock(&su).await;
        let mut config = gw.pg_config(roles::SCRAM);
        config.application_name(format!("spare-{round}"));
        let (c, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        assert!(
            started_before(&su, &c, mark).await,
            "round {round}: the backend was started for this login, not ahead of it"
        );
        let row = c
            .query_one(
                "SELECT current_user::text, current_database()::text, current_setting('application_name')",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), roles::SCRAM);
        assert_eq!(row.get::<_, String>(1), "postgres");
        assert_eq!(row.get::<_, String>(2), format!("spare-{round}"));
        // A wrong password on a spare is still the server's verdict.
        let mut wrong = gw.pg_config(roles::SCRAM);
        wrong.password("not-the-password");
        let e = gw.try_connect(wrong).await.unwrap_err();
        assert_eq!(sqlstate(&e), Some("28P01"), "{e}");
    }
    // Without spares the backend is started for the login.
    let plain = cluster.gateway_with(|c| c.spare_backends = 0).await;
    assert_eq!(plain.status().await["spare_backends"], 0);
    let mark = server_clock(&su).await;
    let c = plain.connect(roles::SCRAM).await;
    assert!(!started_before(&su, &c, mark).await);
}

/// Spares the server has dropped (here its `authentication_timeout` ran out) are noticed at
/// login and replaced: the login gets a new connection and never sees the dead one. (Both
/// spares show in `/status` only until the server drops them: the timeout leaves the wait for
/// them two seconds, which a busy machine needs.)
#[tokio::test]
async fn spares_the_server_dropped_are_replaced() {
    let cluster = Cluster::primary_only().await;
    let su = cluster.superuser().await;
    for sql in [
        "ALTER SYSTEM SET authentication_timeout = '2s'",
        "SELECT pg_reload_conf()",
    ] {
        su.batch_execute(sql).await.unwrap();
    }
    let gw = cluster
        .gateway_with(|c| {
            c.spare_backends = 2;
            c.spare_max_age_ms = 600_000;
        })
        .await;
    for _ in 0..3 {
        wait_spares(&gw, 2).await;
        // Both spares outlive the server's patience.
        tokio::time::sleep(Duration::from_millis(3_000)).await;
        let mark = server_clock(&su).await;
        let c = gw.connect(roles::SCRAM).await;
        assert!(
            !started_before(&su, &c, mark).await,
            "a dead spare was used"
        );
        let n: i32 = c.query_one("SELECT 41 + 1", &[]).await.unwrap().get(0);
        assert_eq!(n, 42);
    }
}

/// The server processes waiting on spares: those that still carry the postmaster's command
/// line (a backend retitles itself once it has read its StartupMessage).
fn spare_processes(cluster: &Cluster) -> Vec<u32> {
    let primary = &cluster.pg.primary;
    let cmdline = |pid: u32| std::fs::read(format!("/proc/{pid}/cmdline")).ok();
    let own = cmdline(primary.postmaster_pid().expect("postmaster"));
    assert!(own.is_some(), "postmaster command line");
    primary
        .server_processes()
        .into_iter()
        .filter(|&pid| cmdline(pid) == own)
        .collect()
}

/// A spare whose server process does not answer the StartupMessage reads as an unreachable
/// server (57P03 after connect_timeout_ms), as a connection attempt that times out does, not as
/// a login that hangs until its own timeout (57014); once the server answers again, so do logins.
#[tokio::test]
async fn a_silent_spare_reads_as_an_unreachable_server() {
    let cluster = Cluster::primary_only().await;
    let gw = cluster
        .gateway_with(|c| {
            c.spare_backends = 2;
            c.connect_timeout_ms = 1_000;
        })
        .await;
    wait_spares(&gw, 2).await;
    let spares = spare_processes(&cluster);
    assert_eq!(spares.len(), 2, "spare server processes: {spares:?}");
    let frozen = Frozen::freeze(spares);
    let e = gw
        .try_connect(gw.pg_config(roles::SCRAM))
        .await
        .unwrap_err();
    frozen.thaw();
    assert_eq!(sqlstate(&e), Some("57P03"), "{e}");
    let c = gw.connect(roles::SCRAM).await;
    let n: i32 = c.query_one("SELECT 6 * 7", &[]).await.unwrap().get(0);
    assert_eq!(n, 42);
}

/// An admin client that sends half a request and stops does not hold its connection for ever:
/// the gateway closes it within seconds, and requests keep being answered meanwhile.
#[tokio::test]
async fn stalled_admin_connections_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;
    let mut stalled = Vec::new();
    for _ in 0..20 {
        let mut tcp = tokio::net::TcpStream::connect(gw.admin()).await.unwrap();
        tcp.write_all(b"GET /met").await.unwrap();
        stalled.push(tcp);
    }
    assert!(gw
        .admin_get("/metrics")
        .await
        .contains("understudy_sessions_open"));
    for mut tcp in stalled {
        let mut rest = Vec::new();
        let end = tokio::time::timeout(Duration::from_secs(30), tcp.read_to_end(&mut rest)).await;
        assert!(
            end.is_ok(),
            "a stalled admin connection still open after 30 s"
        );
    }
}

/// The admin listener answers HEAD as GET without the body, a method a path does not take
/// with 405 and the methods it does take in `Allow`, and an unknown path with 404.
#[tokio::test]
async fn admin_methods_get_their_http_answers() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;
    let admin = gw.admin();
    let ask = |method: &'static str, path: &'static str| async move {
        let mut tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
        let request = format!("{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await.unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").expect("a header block");
        (head.to_ascii_lowercase(), body.to_owned())
    };
    let (head, body) = ask("HEAD", "/status").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: application/json"), "{head}");
    assert!(body.is_empty(), "HEAD has no body: {body:?}");
    let (head, body) = ask("HEAD", "/metrics").await;
    assert!(
        head.starts_with("http/1.1 200") && body.is_empty(),
        "{head}"
    );
    for (method, path, allow) in [
        ("POST", "/status", "get, head"),
        ("DELETE", "/metrics", "get, head"),
        ("GET", "/demo/crash-primary", "post"),
        ("GET", "/reload", "post"),
    ] {
        let (head, _) = ask(method, path).await;
        assert!(head.starts_with("http/1.1 405"), "{method} {path}: {head}");
        assert!(
            head.contains(&format!("allow: {allow}")),
            "{method} {path}: {head}"
        );
    }
    let (head, _) = ask("GET", "/nothing").await;
    assert!(head.starts_with("http/1.1 404"), "{head}");
}

/// Spares whose server is gone are not counted: with the primary killed, `/status` reports no
/// spare connections (it counted the dead ones).
#[tokio::test]
async fn dead_spares_are_not_counted() {
    let mut cluster = Cluster::primary_only().await;
    let gw = cluster
        .gateway_with(|c| {
            c.spare_backends = 2;
            c.spare_max_age_ms = 600_000;
        })
        .await;
    wait_spares(&gw, 2).await;
    cluster.kill_primary().await;
    wait_spares(&gw, 0).await;
}
