//! Graceful shutdown of an in-process gateway: new connections are refused, idle sessions close
//! at once with 57P01, sessions inside a transaction (or a statement) finish it first, and
//! whatever is still open when `shutdown_timeout_ms` runs out is closed, its transaction rolled
//! back; then the gateway task ends.

use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};
use understudy_integration_tests::raw::{msg, startup, RawConn};
use understudy_integration_tests::{
    metric_total, roles, simple_rows, sqlstate, Cluster, TestGateway, PATIENCE,
};

/// A session's client and its connection task, whose result is the FATAL that ended it.
struct Watched {
    client: Client,
    conn: JoinHandle<Result<(), tokio_postgres::Error>>,
}

async fn connect_watched(gw: &TestGateway, user: &str) -> Watched {
    let (client, conn) = gw.pg_config(user).connect(NoTls).await.expect("connect");
    Watched {
        client,
        conn: tokio::spawn(conn),
    }
}

/// Waits at most `within` for the connection to end; returns the SQLSTATE it ended with.
async fn ended_with(
    conn: JoinHandle<Result<(), tokio_postgres::Error>>,
    within: Duration,
) -> String {
    let ended = tokio::time::timeout(within, conn)
        .await
        .unwrap_or_else(|_| panic!("connection still open after {within:?}"))
        .expect("connection task");
    match ended {
        Ok(()) => panic!("connection ended without an error"),
        Err(e) => sqlstate(&e)
            .unwrap_or_else(|| panic!("connection ended without a SQLSTATE: {e}"))
            .to_owned(),
    }
}

/// A table every role may write, created directly on the primary.
async fn create_table(cluster: &Cluster, name: &str) {
    cluster
        .superuser()
        .await
        .batch_execute(&format!(
            "CREATE TABLE {name} (id int); GRANT ALL ON {name} TO PUBLIC"
        ))
        .await
        .expect("table");
}

async fn count_rows(cluster: &Cluster, table: &str) -> i64 {
    cluster
        .superuser()
        .await
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .expect("count")
        .get(0)
}

/// Asserts a new client cannot start a session while the gateway drains, and hears why: 57P03,
/// as from PostgreSQL shutting down (the listener stays open until the gateway exits).
async fn assert_refuses_new_sessions(gw: &TestGateway) {
    match gw.try_connect(gw.pg_config(roles::TRUST)).await {
        Ok(_) => panic!("a new session was accepted during shutdown"),
        Err(e) => assert_eq!(sqlstate(&e), Some("57P03"), "{e:?}"),
    }
}

async fn wait_finished(gw: &TestGateway, within: Duration) {
    let deadline = Instant::now() + within;
    while !gw.handle.is_finished() {
        assert!(
            Instant::now() < deadline,
            "gateway task still running after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// On `begin_shutdown` an idle session gets 57P01 at once and new clients are refused, while a
/// session inside a transaction keeps working until COMMIT (its rows are kept) and a running
/// statement finishes; each then gets 57P01 and the gateway task ends without waiting for
/// `shutdown_timeout_ms`.
#[tokio::test]
async fn shutdown_closes_idle_sessions_and_lets_transactions_finish() {
    let cluster = Cluster::primary_only().await;
    create_table(&cluster, "drained").await;
    let gw = cluster.gateway().await; // shutdown_timeout_ms = 5000
    let idle = connect_watched(&gw, roles::TRUST).await;
    let in_txn = connect_watched(&gw, roles::SCRAM).await;
    let busy = connect_watched(&gw, roles::MD5).await;
    in_txn
        .client
        .batch_execute("BEGIN; INSERT INTO drained VALUES (1)")
        .await
        .unwrap();
    let busy_client = std::sync::Arc::new(busy.client);
    let statement = {
        let c = busy_client.clone();
        // Over the simple protocol: a prepared statement would be closed by the driver in the
        // background right after its answer, and the 57P01 that follows would be taken as the
        // answer to that Close instead of as the connection's end.
        tokio::spawn(async move {
            c.simple_query("SELECT pg_sleep(1), 'finished'")
                .await
                .map(|messages| simple_rows(&messages)[0][1].clone())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    gw.handle.begin_shutdown();
    assert_eq!(
        ended_with(idle.conn, Duration::from_secs(1)).await,
        "57P01",
        "the idle session is closed at once"
    );
    assert_refuses_new_sessions(&gw).await;

    // The transaction goes on, and commits.
    in_txn
        .client
        .batch_execute("INSERT INTO drained VALUES (2)")
        .await
        .expect("statements run inside the open transaction");
    let n: i64 = in_txn
        .client
        .query_one("SELECT count(*) FROM drained", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    in_txn.client.batch_execute("COMMIT").await.expect("COMMIT");
    assert_eq!(
        ended_with(in_txn.conn, Duration::from_secs(2)).await,
        "57P01",
        "closed once its transaction is over"
    );
    assert_eq!(
        count_rows(&cluster, "drained").await,
        2,
        "committed rows kept"
    );

    // The running statement delivers its result before the session is closed.
    assert_eq!(
        statement.await.unwrap().expect("the statement finishes"),
        "finished"
    );
    assert_eq!(ended_with(busy.conn, Duration::from_secs(2)).await, "57P01");

    wait_finished(&gw, Duration::from_secs(3)).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "finished after {:?}, not at the 5 s shutdown timeout",
        started.elapsed()
    );
    for app in ["it_trust_user", "it_scram_user", "it_md5_user"] {
        cluster.wait_backends_named(app, 0).await;
    }
}

/// With `shutdown_timeout_ms = 1000`, a transaction left open is closed with 57P01 once the
/// timeout runs out and its row is rolled back; idle sessions went first; the gateway ends.
#[tokio::test]
async fn shutdown_timeout_closes_open_transactions_and_rolls_them_back() {
    let cluster = Cluster::primary_only().await;
    create_table(&cluster, "abandoned").await;
    let gw = cluster
        .gateway_with(|cfg| cfg.shutdown_timeout_ms = 1_000)
        .await;
    let idle = connect_watched(&gw, roles::TRUST).await;
    let in_txn = connect_watched(&gw, roles::SCRAM).await;
    in_txn
        .client
        .batch_execute("BEGIN; INSERT INTO abandoned VALUES (1)")
        .await
        .unwrap();

    let started = Instant::now();
    gw.handle.begin_shutdown();
    assert_eq!(
        ended_with(idle.conn, Duration::from_millis(800)).await,
        "57P01",
        "the idle session is closed before the 1 s timeout"
    );
    assert_refuses_new_sessions(&gw).await;
    assert_eq!(ended_with(in_txn.conn, PATIENCE).await, "57P01");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "open transaction closed after {waited:?} with a 1 s shutdown timeout"
    );

    cluster.wait_backends_named("it_scram_user", 0).await;
    assert_eq!(
        count_rows(&cluster, "abandoned").await,
        0,
        "the open transaction was rolled back"
    );
    wait_finished(&gw, Duration::from_secs(3)).await;
}

/// Clients still in startup or login when shutdown begins (one silent, one stalled inside its
/// SCRAM exchange) do not hold the gateway up, however long the login and shutdown timeouts
/// are: a login has no transaction to finish, so it is ended at once with 57P01, and the
/// gateway task ends.
#[tokio::test]
async fn clients_still_logging_in_do_not_hold_up_shutdown() {
    let cluster = Cluster::primary_only().await;
    let gw = cluster
        .gateway_with(|cfg| {
            cfg.shutdown_timeout_ms = 30_000;
            cfg.login_timeout_ms = 20_000;
        })
        .await;
    let mut silent = RawConn::open(gw.addr()).await;
    let mut stalled = RawConn::open(gw.addr()).await;
    stalled
        .send(&startup(
            0,
            &[("user", roles::SCRAM), ("database", "postgres")],
        ))
        .await;
    let sasl = stalled.read().await.expect("an authentication request");
    assert_eq!(sasl.tag, b'R');

    gw.handle.begin_shutdown();
    let fatal = tokio::time::timeout(Duration::from_secs(5), stalled.read())
        .await
        .expect("the stalled login is ended at once, not at shutdown_timeout_ms")
        .expect("a word for the stalled login");
    assert_eq!((fatal.tag, fatal.code()), (b'E', "57P01".to_owned()));
    assert!(stalled.closed().await, "stalled login closed");
    wait_finished(&gw, Duration::from_secs(4)).await;
    assert!(silent.closed().await, "silent client closed");
}

/// An idle client that does not read (a pooled connection waiting for work) does not hold a
/// shutdown up: its session gets 57P01 and is closed at once, and the gateway ends. (Waiting
/// for such a client to close, as one still sending is waited for, held every shutdown up.)
#[tokio::test]
async fn an_idle_client_not_reading_does_not_hold_up_shutdown() {
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;
    let mut idle = RawConn::login(gw.addr(), roles::TRUST).await;
    gw.handle.begin_shutdown();
    wait_finished(&gw, Duration::from_secs(1)).await;
    let fatal = idle
        .read()
        .await
        .expect("the shutdown FATAL, read afterwards");
    assert_eq!((fatal.tag, fatal.code().as_str()), (b'E', "57P01"));
    assert!(idle.closed().await, "then the end of the stream");
}

/// A client that connected but sent nothing (a TCP health check, say) does not hold the
/// gateway up once the sessions are done: with 30 s login and shutdown timeouts, the gateway
/// ends as soon as its last transaction commits. Until then such a client is still answered:
/// a startup sent during the drain hears 57P03.
#[tokio::test]
async fn a_silent_client_does_not_hold_up_a_drained_gateway() {
    let cluster = Cluster::primary_only().await;
    let gw = cluster
        .gateway_with(|cfg| {
            cfg.shutdown_timeout_ms = 30_000;
            cfg.login_timeout_ms = 30_000;
        })
        .await;
    let mut silent = RawConn::open(gw.addr()).await;
    let mut late = RawConn::open(gw.addr()).await;
    let in_txn = connect_watched(&gw, roles::MD5).await;
    in_txn.client.batch_execute("BEGIN").await.unwrap();

    let started = Instant::now();
    gw.handle.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !gw.handle.is_finished(),
        "the open transaction holds the gateway"
    );
    late.send(&startup(
        0,
        &[("user", roles::TRUST), ("database", "postgres")],
    ))
    .await;
    let refused = late.expect_error().await;
    assert_eq!(
        (refused.severity(), refused.code()),
        ("FATAL".into(), "57P03".into())
    );
    assert!(late.closed().await, "the refused client is closed");

    in_txn.client.batch_execute("COMMIT").await.expect("COMMIT");
    assert_eq!(
        ended_with(in_txn.conn, Duration::from_secs(2)).await,
        "57P01"
    );
    wait_finished(&gw, Duration::from_secs(3)).await;
    assert!(silent.closed().await, "the silent client is closed");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "finished after {:?}, not at a 30 s timeout",
        started.elapsed()
    );
}

/// When `shutdown_timeout_ms` runs out during a statement, the statement is aborted, not left
/// to finish: 57P01 means "your work was stopped", so the row the autocommit INSERT was about to
/// write must not appear later, and the backend goes at once (it is not left running the query).
#[tokio::test]
async fn forced_shutdown_aborts_a_running_statement() {
    let cluster = Cluster::primary_only().await;
    create_table(&cluster, "interrupted").await;
    let gw = cluster
        .gateway_with(|cfg| cfg.shutdown_timeout_ms = 1_000)
        .await;
    let session = connect_watched(&gw, roles::TRUST).await;
    let client = std::sync::Arc::new(session.client);
    let statement = {
        let c = client.clone();
        tokio::spawn(async move {
            c.execute("INSERT INTO interrupted SELECT 1 FROM pg_sleep(4)", &[])
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = Instant::now();
    gw.handle.begin_shutdown();
    let e = tokio::time::timeout(PATIENCE, statement)
        .await
        .expect("the statement ends")
        .unwrap()
        .expect_err("the statement is interrupted");
    assert_eq!(sqlstate(&e), Some("57P01"), "{e}");
    let told = started.elapsed();
    assert!(told < Duration::from_secs(3), "told after {told:?}");
    wait_finished(&gw, Duration::from_secs(3)).await;

    cluster.wait_backends_named("it_trust_user", 0).await;
    let backend_gone = started.elapsed();
    assert_eq!(
        count_rows(&cluster, "interrupted").await,
        0,
        "the INSERT committed after its client was told 57P01 (backend gone after {backend_gone:?})"
    );
    assert!(
        backend_gone < Duration::from_secs(3),
        "backend kept running the statement for {backend_gone:?} after shutdown began"
    );
}

/// A session between Execute and Sync of an extended-protocol exchange is inside an (implicit)
/// transaction, not at a boundary: shutdown lets the Sync through, the INSERT commits, and only
/// then is the session closed with 57P01.
#[tokio::test]
async fn shutdown_waits_for_sync_after_execute() {
    let cluster = Cluster::primary_only().await;
    create_table(&cluster, "piped").await;
    let gw = cluster.gateway().await; // shutdown_timeout_ms = 5000
    let mut c = RawConn::open(gw.addr()).await;
    c.send(&startup(
        0,
        &[("user", roles::TRUST), ("database", "postgres")],
    ))
    .await;
    c.read_until(b'Z').await;

    // Parse, Bind, Execute and Flush (libpq pipeline mode, pgjdbc batches): no Sync yet.
    let mut batch = msg(b'P', b"\0INSERT INTO piped VALUES (1)\0\0\0");
    batch.extend(msg(b'B', b"\0\0\0\0\0\0\0\0"));
    batch.extend(msg(b'E', b"\0\0\0\0\0"));
    batch.extend(msg(b'H', b""));
    c.send(&batch).await;
    let executed = c.read_until(b'C').await;
    let tags: Vec<u8> = executed.iter().map(|m| m.tag).collect();
    assert_eq!(tags, b"12C", "ParseComplete, BindComplete, CommandComplete");

    gw.handle.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.send(&msg(b'S', b"")).await;
    let first = c.read().await.expect("an answer to Sync");
    assert_eq!(
        first.tag as char,
        'Z',
        "closed before its Sync: {} {}",
        first.code(),
        first.message()
    );
    let last = c.read().await.expect("then the shutdown FATAL");
    assert_eq!((last.tag, last.code().as_str()), (b'E', "57P01"));
    assert_eq!(
        count_rows(&cluster, "piped").await,
        1,
        "the INSERT committed"
    );
    wait_finished(&gw, Duration::from_secs(3)).await;
}

/// A Flush after the Sync (libpq's pipeline sync followed by a flush request, as psycopg sends
/// at the end of every pipeline) opens no batch: the session, idle, is closed with 57P01 as
/// soon as shutdown begins, not when the drain runs out.
#[tokio::test]
async fn a_flush_after_the_sync_leaves_the_session_idle() {
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await; // shutdown_timeout_ms = 5000
    let mut c = RawConn::login(gw.addr(), roles::TRUST).await;
    let mut batch = msg(b'P', b"\0SELECT 1\0\0\0");
    batch.extend(msg(b'B', b"\0\0\0\0\0\0\0\0"));
    batch.extend(msg(b'E', b"\0\0\0\0\0"));
    batch.extend(msg(b'S', b""));
    batch.extend(msg(b'H', b""));
    c.send(&batch).await;
    c.read_until(b'Z').await;
    let started = Instant::now();
    gw.handle.begin_shutdown();
    let fatal = c.read().await.expect("the shutdown FATAL");
    assert_eq!((fatal.tag, fatal.code().as_str()), (b'E', "57P01"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "closed {:?} after shutdown began: an idle session is closed at once, not when the drain runs out",
        started.elapsed()
    );
    wait_finished(&gw, Duration::from_secs(3)).await;
}

/// A failover waiting for an external promotion that never comes does not hold a shutdown up
/// beyond `shutdown_timeout_ms`: with no session the gateway ends at once (the health monitor
/// stops waiting), and a session waiting for a new primary to move to is closed with 57P01 when
/// the drain runs out, not at `failover.timeout_ms`. (Each used to wait for the failover's
/// 20 s; the monitor could start a new one after each.)
#[tokio::test]
async fn a_pending_failover_does_not_hold_up_shutdown() {
    for with_session in [false, true] {
        let mut cluster = Cluster::primary_and_standby().await;
        let gw = cluster
            .failover_gateway_with(|c| {
                c.failover.promote = understudy::config::Promote::External;
                c.shutdown_timeout_ms = 1_000;
            })
            .await;
        let session = match with_session {
            true => Some(connect_watched(&gw, roles::SCRAM).await),
            false => None,
        };
        cluster.kill_primary().await;
        let waiting = session.map(|s| {
            let client = s.client;
            (
                tokio::spawn(async move { client.simple_query("SELECT 1").await.map(drop) }),
                s.conn,
            )
        });
        // The health monitor has begun the failover, which waits for a promotion.
        let deadline = Instant::now() + PATIENCE;
        while metric_total(
            &gw.admin_get("/metrics").await,
            "understudy_failovers_total",
        ) < 1.0
        {
            assert!(Instant::now() < deadline, "no failover began");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let started = Instant::now();
        gw.handle.begin_shutdown();
        wait_finished(&gw, Duration::from_secs(4)).await;
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "with a session: {with_session}"
        );
        if let Some((statement, conn)) = waiting {
            let e = statement.await.unwrap().expect_err("the session is closed");
            assert_eq!(sqlstate(&e), Some("57P01"), "{e}");
            // The FATAL was the statement's answer; the connection then just ends.
            let _ = tokio::time::timeout(PATIENCE, conn)
                .await
                .expect("the connection ends");
        }
    }
}
