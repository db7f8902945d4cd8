//! The primary is SIGKILLed (or frozen) under live sessions; each session carries on, on the
//! same client connection, on the promoted standby: state restored, open transactions replayed
//! and checked, nothing applied twice, and precise SQLSTATEs where carrying on is impossible.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls, SimpleQueryMessage};
use understudy::config::BackendSslMode;
use understudy_integration_tests::nft::{Direction, Dropped};
use understudy_integration_tests::raw::{self, msg, query, tags, Msg, RawConn};
use understudy_integration_tests::tls::TestCa;
use understudy_integration_tests::{
    application_name_and_port, assert_gateway_error, backend_pid, backend_status,
    connect_with_messages, ending_fatal, errors_counted, int_column, metric_series, metric_total,
    pgbench_init, roles, run_program, simple_rows, sqlstate, Cluster, ConnectionEnd, Frozen,
    TestGateway, PATIENCE, SLOW_COMMIT,
};

/// Connects and forwards the connection's notifications to a channel.
async fn connect_listening(
    gw: &TestGateway,
    user: &str,
) -> (Client, mpsc::UnboundedReceiver<AsyncMessage>) {
    connect_with_messages(&gw.pg_config(user)).await
}

async fn values(cluster: &Cluster, table: &str) -> Vec<i32> {
    let sql = format!("SELECT a FROM {table} ORDER BY a");
    int_column(&cluster.superuser().await, &sql).await
}

/// Has the server end `c`'s backend while the primary is healthy, and checks the client gets
/// the server's FATAL (or, idle, a closed connection), not a failover; returns how long it took.
async fn server_ends_backend(cluster: &Cluster, c: &Client) -> Duration {
    let pid = backend_pid(c).await;
    cluster.terminate_backend(pid).await;
    let started = std::time::Instant::now();
    let e = c.query_one("SELECT 1", &[]).await.unwrap_err();
    assert!(
        sqlstate(&e) == Some("57P01") || e.is_closed(),
        "the server's FATAL reaches the client: {e:?}"
    );
    started.elapsed()
}

/// Runs `work` (requests the server takes a while to answer) in a task, SIGKILLs the primary
/// `after` it started, and returns what `work` came to.
async fn kill_primary_during<T: Send + 'static>(
    cluster: &mut Cluster,
    after: Duration,
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    let task = tokio::spawn(work);
    tokio::time::sleep(after).await;
    cluster.kill_primary().await;
    task.await.unwrap()
}

/// The table most tests write to, open to every test role.
const TABLE_T: &str = "CREATE TABLE t(a int PRIMARY KEY); GRANT ALL ON t TO PUBLIC";

async fn setup(cluster: &Cluster, sql: &str) {
    cluster.superuser().await.batch_execute(sql).await.unwrap();
    cluster.pg.wait_standby_caught_up().await.unwrap();
}

/// A primary and standby that ran `sql`, a failover gateway in front, and a session through
/// it as the SCRAM role.
async fn session_after(sql: &str) -> (Cluster, TestGateway, Client) {
    let cluster = Cluster::primary_and_standby().await;
    setup(&cluster, sql).await;
    let gw = cluster.failover_gateway().await;
    let c = gw.connect(roles::SCRAM).await;
    (cluster, gw, c)
}

/// As [`session_after`], through a gateway that settles autocommit commits in flight
/// (`failover.settle_in_flight_autocommit`).
async fn settling_session_after(sql: &str) -> (Cluster, TestGateway, Client) {
    let cluster = Cluster::primary_and_standby().await;
    setup(&cluster, sql).await;
    let gw = cluster
        .failover_gateway_with(|c| c.failover.settle_in_flight_autocommit = true)
        .await;
    let c = gw.connect(roles::SCRAM).await;
    (cluster, gw, c)
}

/// Prepares a statement with the extended protocol (Parse) and one with SQL (`PREPARE sq`);
/// neither goes away when the transaction they were made in ends, whatever its end.
async fn prepare_both_ways(c: &Client) -> tokio_postgres::Statement {
    c.batch_execute("PREPARE sq AS SELECT 40 + 2")
        .await
        .unwrap();
    c.prepare("SELECT $1::int + 1").await.unwrap()
}

/// Both statements of [`prepare_both_ways`] run.
async fn assert_prepared_both_ways(c: &Client, statement: &tokio_postgres::Statement) {
    let one: i32 = c.query_one(statement, &[&1]).await.unwrap().get(0);
    assert_eq!(one, 2);
    assert_eq!(
        simple_rows(&c.simple_query("EXECUTE sq").await.unwrap()),
        [["42"]]
    );
}

async fn next_notification(rx: &mut mpsc::UnboundedReceiver<AsyncMessage>) -> (i32, String) {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(AsyncMessage::Notification(n))) => {
                return (n.process_id(), n.payload().to_owned())
            }
            Ok(Some(_)) => {}
            other => panic!("no notification: {other:?}"),
        }
    }
}

/// Asks the gateway (not a session: a PID read in a transaction would not replay) that a
/// session is in a transaction and movable.
async fn assert_a_movable_session_in_a_transaction(gw: &TestGateway) {
    let status = gw.status().await;
    let sessions = status["sessions"].as_array().unwrap();
    assert!(
        sessions
            .iter()
            .any(|s| s["movable"] == "yes" && s["transaction"] == "in_transaction"),
        "{status:#}"
    );
}

/// Asserts that `client`'s session ended with the gateway's FATAL 08006, saying it held `why`.
async fn assert_ended_unmovable(client: &Client, end: ConnectionEnd, why: &str) {
    let db = ending_fatal(client, end).await;
    assert_eq!(db.code().code(), "08006");
    assert!(db.message().contains(why), "{}", db.message());
}

/// An idle session keeps its connection, search_path, SQL and protocol prepared statements,
/// LISTEN, and the PID it was told, across a failover.
#[tokio::test]
async fn idle_session_moves_with_its_state() {
    let mut cluster = Cluster::primary_and_standby().await;
    let standby_port = i32::from(cluster.pg.standby.as_ref().unwrap().port());
    setup(
        &cluster,
        "CREATE SCHEMA alpha; GRANT ALL ON SCHEMA alpha TO PUBLIC",
    )
    .await;
    let gw = cluster.failover_gateway().await;
    let (c, mut notes) = connect_listening(&gw, roles::SCRAM).await;
    c.batch_execute("SET search_path TO alpha, public; PREPARE q AS SELECT 42; LISTEN jobs")
        .await
        .unwrap();
    let stmt = c.prepare("SELECT $1::int * 2").await.unwrap();
    let pid_before = backend_pid(&c).await;

    cluster.kill_primary().await;

    let doubled: i32 = c.query_one(&stmt, &[&21]).await.unwrap().get(0);
    assert_eq!(doubled, 42, "protocol-level prepared statement survives");
    let row = c
        .query_one(
            "SELECT current_setting('search_path'), inet_server_port(), pg_is_in_recovery()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "alpha, public");
    assert_eq!(
        row.get::<_, i32>(1),
        standby_port,
        "now on the promoted standby"
    );
    assert!(!row.get::<_, bool>(2));
    let prepared = c.simple_query("EXECUTE q").await.unwrap();
    assert!(
        matches!(&prepared[1], tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("42"))
    );
    assert_ne!(
        backend_pid(&c).await,
        pid_before,
        "a new backend serves the session"
    );

    // LISTEN survived; a notification from this session carries the PID the client knows.
    c.batch_execute("NOTIFY jobs, 'self'").await.unwrap();
    assert_eq!(
        next_notification(&mut notes).await,
        (pid_before, "self".to_owned())
    );
    let other = gw.connect(roles::MD5).await;
    let other_pid = backend_pid(&other).await;
    other.batch_execute("NOTIFY jobs, 'other'").await.unwrap();
    assert_eq!(
        next_notification(&mut notes).await,
        (other_pid, "other".to_owned())
    );
}

/// Startup values that are not UTF-8 go to the new primary as the client sent them: a setting
/// of its own keeps its bytes after the move.
#[tokio::test]
async fn startup_values_that_are_not_utf8_move_with_the_session() {
    let mut cluster = Cluster::primary_and_standby().await;
    let standby_port = cluster.pg.standby.as_ref().unwrap().port();
    let gw = cluster.failover_gateway().await;
    let mut c = RawConn::open(gw.addr()).await;
    c.send(&raw::startup_bytes(
        0,
        &[
            (b"user", roles::TRUST.as_bytes()),
            (b"database", b"postgres"),
            (b"application_name", b"caf\xe9"),
            (b"understudy.note", b"\xe9t\xe9"),
        ],
    ))
    .await;
    let greeting = c.read_until(b'Z').await;
    assert!(greeting.iter().all(|m| m.tag != b'E'), "{greeting:?}");

    cluster.kill_primary().await;

    c.send(&query(
        "SELECT current_setting('understudy.note'), current_setting('application_name'), \
         inet_server_port()",
    ))
    .await;
    let answer = c.read_until(b'Z').await;
    let row = answer.iter().find(|m| m.tag == b'D').expect("a row");
    let port = standby_port.to_string();
    let mut expected = b"\0\x03\0\0\0\x03\xe9t\xe9\0\0\0\x04caf?".to_vec();
    expected.extend_from_slice(&(port.len() as i32).to_be_bytes());
    expected.extend_from_slice(port.as_bytes());
    assert_eq!(row.body, expected, "{answer:?}");
}

/// Session state set with the extended protocol (as JDBC and Npgsql send every statement)
/// moves too: a `search_path` set that way still picks the table it picked before, in the
/// replayed transaction and after it, and a LISTEN made that way still hears.
#[tokio::test]
async fn extended_protocol_session_state_moves() {
    let (mut cluster, gw, _) = session_after(
        "CREATE SCHEMA s2; GRANT ALL ON SCHEMA s2 TO PUBLIC;
         CREATE TABLE t2(a int); CREATE TABLE s2.t2(a int); GRANT ALL ON t2, s2.t2 TO PUBLIC",
    )
    .await;
    let (c, mut notes) = connect_listening(&gw, roles::SCRAM).await;
    // `execute` sends Parse/Bind/Execute/Sync.
    c.execute("SET search_path TO s2", &[]).await.unwrap();
    c.execute("LISTEN moved", &[]).await.unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    c.execute("INSERT INTO t2 VALUES (1)", &[]).await.unwrap();

    cluster.kill_primary().await;

    c.execute("INSERT INTO t2 VALUES (2)", &[]).await.unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    c.execute("INSERT INTO t2 VALUES (3)", &[]).await.unwrap();
    let su = cluster_on_new_primary(&mut cluster).await.superuser().await;
    assert_eq!(
        int_column(&su, "SELECT a FROM s2.t2 ORDER BY a").await,
        [1, 2, 3]
    );
    assert!(int_column(&su, "SELECT a FROM public.t2").await.is_empty());
    c.batch_execute("NOTIFY moved, 'here'").await.unwrap();
    assert_eq!(next_notification(&mut notes).await.1, "here");
}

/// Sessions move one by one, each as soon as it can; a notification committed on the new
/// primary reaches only the listeners whose LISTEN is issued there already. So a moved session,
/// or one logging in after the failover, goes on only once every listening session has issued
/// its LISTENs on the new primary (or left): notifications sent right after the failover, by
/// either, reach all of them.
#[tokio::test]
async fn listeners_move_before_a_notification_sent_after_the_failover() {
    const LISTENERS: usize = 16;
    let mut cluster = Cluster::primary_and_standby().await;
    let gw = cluster.failover_gateway().await;
    let mut listeners = Vec::new();
    for _ in 0..LISTENERS {
        let (c, notes) = connect_listening(&gw, roles::SCRAM).await;
        c.batch_execute("LISTEN moved").await.unwrap();
        listeners.push((c, notes));
    }
    let notifier = gw.connect(roles::TRUST).await;
    notifier.batch_execute("BEGIN; SELECT 1").await.unwrap();

    cluster.kill_primary().await;

    // Both sent at once: each waits in the gateway for its own session's move or login, not
    // for the listeners'.
    let config = gw.pg_config(roles::TRUST);
    let newcomer = tokio::spawn(async move {
        let (c, conn) = config.connect(NoTls).await.unwrap();
        tokio::spawn(conn);
        c.batch_execute("NOTIFY moved, 'newcomer'").await.unwrap();
        backend_pid(&c).await
    });
    notifier
        .batch_execute("NOTIFY moved, 'moved'")
        .await
        .unwrap();
    notifier.batch_execute("COMMIT").await.unwrap();
    // It names the notifier's new backend (the PID of a notifier's own session is what its
    // client was told only in the notifications it hears itself).
    let mut sent = vec![
        (backend_pid(&notifier).await, "moved".to_owned()),
        (newcomer.await.unwrap(), "newcomer".to_owned()),
    ];
    sent.sort();
    for (i, (_, notes)) in listeners.iter_mut().enumerate() {
        let mut heard = Vec::new();
        for _ in 0..2 {
            match tokio::time::timeout(Duration::from_secs(5), next_notification(notes)).await {
                Ok(n) => heard.push(n),
                Err(_) => panic!("listener {i} of {LISTENERS} heard only {heard:?} of {sent:?}"),
            }
        }
        heard.sort();
        assert_eq!(heard, sent, "listener {i}");
    }
}

/// A second crash right after a new standby was seeded in the old primary's place, before the
/// role probe adopted it back (it was fenced as the old primary): the failover looks for
/// candidates again each round and promotes it once adopted, instead of finding none at its
/// start and waiting `failover.timeout_ms` (20 s here) for nothing, ending the session.
#[tokio::test]
async fn a_crash_before_the_seeded_standby_is_adopted_still_fails_over() {
    let (mut cluster, _gw, c) = session_after(TABLE_T).await;
    c.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    cluster.kill_primary().await;
    c.batch_execute("INSERT INTO t VALUES (2)").await.unwrap();
    cluster.reseed().await;
    cluster.kill_primary().await;
    let started = std::time::Instant::now();
    tokio::time::timeout(
        Duration::from_secs(10),
        c.batch_execute("INSERT INTO t VALUES (3)"),
    )
    .await
    .expect("moved well within the failover timeout")
    .expect("the session carries on");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        int_column(&c, "SELECT a FROM t ORDER BY a").await,
        [1, 2, 3]
    );
}

/// A transaction open across the failover is replayed: the rows written before and after the
/// failover all commit, exactly once.
#[tokio::test]
async fn open_transaction_is_replayed() {
    let (mut cluster, _gw, c) = session_after(TABLE_T).await;
    c.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let stmt = c.prepare("INSERT INTO t VALUES ($1)").await.unwrap();
    c.execute(&stmt, &[&2]).await.unwrap();

    cluster.kill_primary().await;

    c.execute(&stmt, &[&3]).await.unwrap();
    c.batch_execute("INSERT INTO t VALUES (4); COMMIT")
        .await
        .unwrap();
    assert_eq!(
        values(cluster_on_new_primary(&mut cluster).await, "t").await,
        [1, 2, 3, 4]
    );
}

/// Settings made for the transaction only with `set_config(…, true)`, as PostgREST makes
/// them for every request (a Query, and a Parse with parameters), leave the session movable:
/// the replay makes them again, the transaction carries on with them, and they end with it
/// on the new backend as they would have on the old one. A session setting made that way
/// still makes the session unmovable.
#[tokio::test]
async fn settings_made_for_the_transaction_move_with_it() {
    let (mut cluster, gw, c) = session_after(TABLE_T).await;
    let (session_wide, session_wide_end) = gw.connect_watched(roles::SCRAM).await;
    session_wide
        .batch_execute("SELECT set_config('request.claims', '1', false)")
        .await
        .unwrap();
    assert_eq!(gw.session_status(&session_wide).await["movable"], "no");
    c.batch_execute(
        "BEGIN; SELECT set_config('search_path', 'pg_catalog, public', true); \
         INSERT INTO t VALUES ((current_setting('search_path') = 'pg_catalog, public')::int)",
    )
    .await
    .unwrap();
    let claims = c
        .query_one(
            "SELECT set_config($1, $2, true)",
            &[&"request.claims", &"7"],
        )
        .await
        .unwrap();
    assert_eq!(claims.get::<_, String>(0), "7");
    c.batch_execute("INSERT INTO t VALUES (current_setting('request.claims')::int)")
        .await
        .unwrap();
    assert_a_movable_session_in_a_transaction(&gw).await;

    cluster.kill_primary().await;

    let claims: String = c
        .query_one("SELECT current_setting('request.claims')", &[])
        .await
        .expect("the session moved, the transaction replayed")
        .get(0);
    assert_eq!(claims, "7");
    c.batch_execute("INSERT INTO t VALUES (current_setting('request.claims')::int + 1); COMMIT")
        .await
        .unwrap();
    // Ended with the transaction, as on the old backend.
    let after = simple_rows(
        &c.simple_query(
            "SELECT current_setting('request.claims', true), current_setting('search_path')",
        )
        .await
        .unwrap(),
    );
    assert_eq!(after, [["", "\"$user\", public"]]);
    assert_eq!(
        values(cluster_on_new_primary(&mut cluster).await, "t").await,
        [1, 7, 8]
    );
    assert_ended_unmovable(&session_wide, session_wide_end, "set_config()").await;
}

/// A temporary table made `ON COMMIT DROP` in a transaction (a staging table, filled and
/// merged from before the commit) leaves the session movable: the replay makes and fills it
/// again, the transaction carries on with it, and it is gone after the commit as it would
/// have been. One kept past the commit still makes the session unmovable.
#[tokio::test]
async fn a_temporary_table_dropped_at_commit_moves_with_its_transaction() {
    let (mut cluster, gw, c) = session_after(TABLE_T).await;
    let (kept, kept_end) = gw.connect_watched(roles::SCRAM).await;
    kept.batch_execute("CREATE TEMP TABLE scratch (a int) ON COMMIT DELETE ROWS")
        .await
        .unwrap();
    c.batch_execute(
        "BEGIN; CREATE TEMP TABLE stage (a int) ON COMMIT DROP; \
         INSERT INTO stage SELECT generate_series(1, 3)",
    )
    .await
    .unwrap();
    assert_a_movable_session_in_a_transaction(&gw).await;

    cluster.kill_primary().await;

    c.batch_execute("INSERT INTO stage VALUES (4); INSERT INTO t SELECT a FROM stage; COMMIT")
        .await
        .expect("the session moved, the transaction replayed");
    let stage = simple_rows(
        &c.simple_query("SELECT pg_catalog.to_regclass('pg_temp.stage') IS NULL")
            .await
            .unwrap(),
    );
    assert_eq!(stage, [["t"]], "dropped at the commit");
    assert_eq!(
        values(cluster_on_new_primary(&mut cluster).await, "t").await,
        [1, 2, 3, 4]
    );
    assert_ended_unmovable(&kept, kept_end, "temporary table").await;
}

/// A statement running when the primary dies is run again and its result returned; the
/// transaction then commits once.
#[tokio::test]
async fn statement_in_flight_completes() {
    let (mut cluster, _gw, c) = session_after(TABLE_T).await;
    c.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let (c, r) = kill_primary_during(&mut cluster, Duration::from_millis(400), async move {
        let r = c
            .query_one("SELECT 7 FROM pg_sleep(1.5)", &[])
            .await
            .map(|r| r.get::<_, i32>(0));
        (c, r)
    })
    .await;
    assert_eq!(r.unwrap(), 7);
    c.batch_execute("INSERT INTO t VALUES (2); COMMIT")
        .await
        .unwrap();
    assert_eq!(
        values(cluster_on_new_primary(&mut cluster).await, "t").await,
        [1, 2]
    );
}

/// A COMMIT in flight (held up by a deferred trigger) when the primary dies: the gateway
/// captured the xid, finds the transaction did not commit on the new primary, replays it, and
/// the client gets its COMMIT; the rows exist once. The writes come in one string, so the xid
/// is asked for just before the COMMIT.
#[tokio::test]
async fn commit_in_flight_is_resolved() {
    commit_in_flight(&["BEGIN; INSERT INTO t VALUES (1); INSERT INTO t VALUES (2)"]).await;
}

/// The same with each statement sent on its own: the xid rides along with the first write.
#[tokio::test]
async fn commit_in_flight_after_separate_writes_is_resolved() {
    commit_in_flight(&[
        "BEGIN",
        "INSERT INTO t VALUES (1)",
        "INSERT INTO t VALUES (2)",
    ])
    .await;
}

async fn commit_in_flight(statements: &[&str]) {
    let (mut cluster, _gw, c) = session_after(&format!(
        "CREATE TABLE t(a int PRIMARY KEY); GRANT ALL ON t TO PUBLIC; {SLOW_COMMIT}"
    ))
    .await;
    for sql in statements {
        c.batch_execute(sql).await.unwrap();
    }
    let (c, r) = kill_primary_during(&mut cluster, Duration::from_millis(500), async move {
        let r = c.batch_execute("COMMIT").await;
        (c, r)
    })
    .await;
    r.expect("COMMIT succeeds after the failover");
    assert_eq!(
        values(cluster_on_new_primary(&mut cluster).await, "t").await,
        [1, 2]
    );
    c.batch_execute("INSERT INTO t VALUES (3)").await.unwrap();
}

/// As [`commit_in_flight_is_resolved`], for a COMMIT sent with the extended protocol behind a
/// lone Flush (libpq sends one after a pipeline's Sync): the xid is still asked for before it.
/// (The Flush made the COMMIT look like the second message of its request, which is not asked
/// for, and the client got 08007.)
#[tokio::test]
async fn commit_in_flight_behind_a_flush_is_resolved() {
    let mut cluster = Cluster::primary_and_standby().await;
    setup(
        &cluster,
        &format!("CREATE TABLE t(a int PRIMARY KEY); GRANT ALL ON t TO PUBLIC; {SLOW_COMMIT}"),
    )
    .await;
    let gw = cluster.failover_gateway().await;
    let mut c = RawConn::login(gw.addr(), roles::TRUST).await;
    c.send(&query(
        "BEGIN; INSERT INTO t VALUES (1); INSERT INTO t VALUES (2)",
    ))
    .await;
    c.read_until(b'Z').await;
    c.send(&msg(b'H', b"")).await;
    let mut commit = msg(b'P', b"\0COMMIT\0\0\0");
    commit.extend(msg(b'B', b"\0\0\0\0\0\0\0\0"));
    commit.extend(msg(b'E', b"\0\0\0\0\0"));
    commit.extend(msg(b'S', b""));
    c.send(&commit).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.kill_primary().await;
    let answer = c.read_until(b'Z').await;
    let tags: Vec<u8> = answer.iter().map(|m| m.tag).collect();
    assert_eq!(tags, b"12CZ", "{answer:?}");
    assert_eq!(answer[2].body, b"COMMIT\0");
    assert_eq!(answer[3].body, b"I");
    assert_eq!(
        values(cluster_on_new_primary(&mut cluster).await, "t").await,
        [1, 2]
    );
}

/// Makes every commit on the primary wait for a synchronous standby that does not exist
/// (`synchronous_standby_names = 'nobody'`); returns once one does (a table `sync_probe(a int)`
/// takes the probing inserts). In force only then: a session's own SHOW changes before the
/// checkpointer tells the commits to wait.
async fn make_commits_wait(cluster: &Cluster) {
    let su = cluster.superuser().await;
    su.batch_execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
        .await
        .unwrap();
    su.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let probe = cluster.superuser().await;
        let waits = tokio::time::timeout(
            Duration::from_millis(300),
            probe.batch_execute("INSERT INTO sync_probe VALUES (1)"),
        )
        .await
        .is_err();
        if waits {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the reload never came"
        );
    }
}

/// What `task` came to, waited for at most [`PATIENCE`].
async fn answered<T>(task: tokio::task::JoinHandle<T>) -> T {
    tokio::time::timeout(PATIENCE, task)
        .await
        .expect("answered")
        .unwrap()
}

/// Waits until table `t` on the standby has `rows` rows: the commits the primary waits on reached it.
async fn wait_until_streamed(cluster: &Cluster, rows: usize) {
    let standby = cluster.pg.standby.as_ref().unwrap();
    let on_standby = standby.client(roles::SUPERUSER, "postgres").await.unwrap();
    let deadline = std::time::Instant::now() + PATIENCE;
    while int_column(&on_standby, "SELECT a FROM t").await.len() < rows {
        assert!(
            std::time::Instant::now() < deadline,
            "the commit never streamed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A COMMIT that committed on the old primary, and reached the standby, but was never
/// answered (the primary waits for a synchronous standby that does not exist): the gateway
/// finds its xid committed on the new primary and answers it as the server would have, for a
/// COMMIT sent as a Query and for one sent with the extended protocol (as JDBC sends it),
/// which used to get 08007. Nothing runs again.
#[tokio::test]
async fn a_committed_commit_whose_answer_was_lost_is_answered() {
    for extended in [false, true] {
        let (mut cluster, _gw, c) =
            session_after(&format!("{TABLE_T}; CREATE TABLE sync_probe(a int)")).await;
        c.batch_execute("PREPARE old AS SELECT 1").await.unwrap();
        c.batch_execute("BEGIN; DEALLOCATE old").await.unwrap();
        c.batch_execute("INSERT INTO t VALUES (1); SET application_name = 'committed'")
            .await
            .unwrap();
        let statement = prepare_both_ways(&c).await;
        make_commits_wait(&cluster).await;
        let commit = tokio::spawn(async move {
            let r = match extended {
                true => c.execute("COMMIT", &[]).await.map(drop),
                false => c.batch_execute("COMMIT").await,
            };
            (c, r)
        });
        wait_until_streamed(&cluster, 1).await;
        assert!(
            !commit.is_finished(),
            "the COMMIT waits for its synchronous standby"
        );
        cluster.kill_primary().await;
        let (c, r) = tokio::time::timeout(PATIENCE, commit)
            .await
            .unwrap()
            .unwrap();
        r.unwrap_or_else(|e| panic!("extended {extended}: {e:?}"));
        assert_prepared_both_ways(&c, &statement).await;
        c.batch_execute("PREPARE old AS SELECT 2")
            .await
            .expect("deallocated in the transaction");
        let standby_port = i32::from(cluster.pg.standby.as_ref().unwrap().port());
        assert_eq!(
            application_name_and_port(&c).await,
            ("committed".to_owned(), standby_port),
            "the transaction's setting, committed with it"
        );
        c.batch_execute("INSERT INTO t VALUES (2)").await.unwrap();
        assert_eq!(
            values(cluster_on_new_primary(&mut cluster).await, "t").await,
            [1, 2],
            "extended {extended}"
        );
    }
}

/// A client whose encoding is LATIN1 sends text that is not UTF-8: its write is still known
/// as a write, so the COMMIT in flight at the failover is resolved as for any other client
/// (not taken for a read-only transaction and answered without its rows), and the rows exist
/// once, with their text.
#[tokio::test]
async fn commit_in_flight_in_latin1_is_resolved() {
    commit_in_flight_in_encoding(
        &[
            b"SET client_encoding = 'LATIN1'",
            b"BEGIN",
            b"INSERT INTO t VALUES (1, 'caf\xe9')",
            b"INSERT INTO t VALUES (2, '\xfcber')",
        ],
        &[(1, "café"), (2, "über")],
    )
    .await;
}

/// In SJIS the second byte of 表 (0x95 0x5C) is a backslash: inside E'…' it must not be read
/// as escaping the quote after it, or the INSERT that follows in the same string would be
/// hidden inside a literal and the transaction taken for read-only.
#[tokio::test]
async fn commit_in_flight_in_sjis_is_resolved() {
    commit_in_flight_in_encoding(
        &[
            b"SET client_encoding = 'SJIS'",
            b"BEGIN",
            b"SELECT E'\x95\x5c' AS k; INSERT INTO t VALUES (1, '\x95\x5c')",
        ],
        &[(1, "表")],
    )
    .await;
}

/// Runs `statements` (raw bytes, each a Query), then kills the primary with the COMMIT in
/// flight: the client gets COMMIT, and the new primary has exactly `rows`.
async fn commit_in_flight_in_encoding(statements: &[&[u8]], rows: &[(i32, &str)]) {
    let mut cluster = Cluster::primary_and_standby().await;
    setup(
        &cluster,
        &format!(
            "CREATE TABLE t(a int PRIMARY KEY, s text); GRANT ALL ON t TO PUBLIC; {SLOW_COMMIT}"
        ),
    )
    .await;
    let gw = cluster.failover_gateway().await;
    let mut c = RawConn::login(gw.addr(), roles::TRUST).await;
    let ok = |msgs: &[Msg]| {
        assert!(msgs.iter().all(|m| m.tag != b'E'), "no error: {msgs:?}");
    };
    for sql in statements {
        let mut body = sql.to_vec();
        body.push(0);
        c.send(&msg(b'Q', &body)).await;
        ok(&c.read_until(b'Z').await);
    }
    c.send(&query("COMMIT")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.kill_primary().await;
    let answer = c.read_until(b'Z').await;
    ok(&answer);
    assert!(
        answer
            .iter()
            .any(|m| m.tag == b'C' && m.body == b"COMMIT\0"),
        "COMMIT answered: {answer:?}"
    );
    assert_eq!(answer.last().map(|m| m.body.clone()), Some(b"I".to_vec()));
    let found: Vec<(i32, String)> = cluster_on_new_primary(&mut cluster)
        .await
        .superuser()
        .await
        .query("SELECT a, s FROM t ORDER BY a", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let expected: Vec<(i32, String)> = rows.iter().map(|&(a, s)| (a, s.to_owned())).collect();
    assert_eq!(found, expected);
}

/// A replay that would not reproduce what the client saw (now() differs) gets 40001 inside an
/// aborted transaction, in the gateway's own words, whether the session was idle at the
/// failover or had a statement in flight: ROLLBACK works, nothing of the transaction persists,
/// and the session goes on.
#[tokio::test]
async fn diverging_replay_gets_40001() {
    let (mut cluster, gw, idle) = session_after(TABLE_T).await;
    let busy = gw.connect(roles::MD5).await;
    let counted_before = errors_counted(&gw.admin_get("/metrics").await, "40001", "gateway");
    let mut prepared = Vec::new();
    for (c, a) in [(&idle, 1), (&busy, 11)] {
        c.batch_execute(&format!("BEGIN; INSERT INTO t VALUES ({a})"))
            .await
            .unwrap();
        c.query_one("SELECT clock_timestamp()", &[]).await.unwrap();
        // After where the replay stops: made again only if the gateway makes them.
        prepared.push(prepare_both_ways(c).await);
    }
    let (busy, in_flight) =
        kill_primary_during(&mut cluster, Duration::from_millis(400), async move {
            let r = busy
                .batch_execute("INSERT INTO t SELECT 12 FROM pg_sleep(1.5)")
                .await;
            (busy, r)
        })
        .await;
    assert_gateway_error(&in_flight.unwrap_err(), "40001");
    let e = idle
        .batch_execute("INSERT INTO t VALUES (2)")
        .await
        .unwrap_err();
    assert_gateway_error(&e, "40001");
    for ((c, a), statement) in [(&idle, 3), (&busy, 13)].into_iter().zip(&prepared) {
        let e = c.batch_execute("SELECT 1").await.unwrap_err();
        assert_eq!(
            sqlstate(&e),
            Some("25P02"),
            "the transaction stays aborted until ROLLBACK"
        );
        c.batch_execute("ROLLBACK").await.unwrap();
        assert_prepared_both_ways(c, statement).await;
        c.batch_execute(&format!("INSERT INTO t VALUES ({a})"))
            .await
            .unwrap();
    }
    // The registry is the process's, shared with the tests running alongside: at least ours.
    let metrics = gw.admin_get("/metrics").await;
    assert!(errors_counted(&metrics, "40001", "gateway") - counted_before >= 2.0);
    assert_eq!(
        values(cluster_on_new_primary(&mut cluster).await, "t").await,
        [3, 13]
    );
}

/// A notice is part of what the client saw: a replay whose statement raises another one (a
/// value that differs on the new primary; a `CREATE TABLE IF NOT EXISTS` that skips, where
/// it had created the table) gets 40001, and one that raises the same notice moves.
#[tokio::test]
async fn a_replay_that_raises_another_notice_gets_40001() {
    let (mut cluster, gw, differs) = session_after(&format!(
        "{TABLE_T}; CREATE FUNCTION say(text) RETURNS void LANGUAGE plpgsql \
         AS $$ BEGIN RAISE NOTICE '%', $1; END $$"
    ))
    .await;
    let same = gw.connect(roles::MD5).await;
    for (c, said, a) in [
        (&differs, "pg_backend_pid()::text", 1),
        (&same, "'the same'", 11),
    ] {
        c.batch_execute(&format!(
            "BEGIN; INSERT INTO t VALUES ({a}); SELECT say({said})"
        ))
        .await
        .unwrap();
    }

    cluster.kill_primary().await;

    let e = differs
        .batch_execute("INSERT INTO t VALUES (2)")
        .await
        .unwrap_err();
    assert_gateway_error(&e, "40001");
    differs.batch_execute("ROLLBACK").await.unwrap();
    same.batch_execute("INSERT INTO t VALUES (12); COMMIT")
        .await
        .expect("the same notice: the transaction moved");
    assert_eq!(
        values(cluster_on_new_primary(&mut cluster).await, "t").await,
        [11, 12]
    );
}

/// A transaction that deallocates statements prepared before it (as psycopg does when its
/// statement cache is full) moves like any other: its replay runs the DEALLOCATEs on a new
/// backend that has the statements, and they are gone afterwards, as the client made them.
#[tokio::test]
async fn deallocate_in_a_transaction_moves() {
    let (mut cluster, _gw, c) = session_after(TABLE_T).await;
    let statement = prepare_both_ways(&c).await;
    c.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let rows = c
        .simple_query(
            "SELECT name FROM pg_prepared_statements WHERE statement = 'SELECT $1::int + 1'",
        )
        .await
        .unwrap();
    let parsed = &simple_rows(&rows)[0][0];
    c.batch_execute(&format!("DEALLOCATE sq; DEALLOCATE {parsed}"))
        .await
        .unwrap();
    cluster.kill_primary().await;
    c.batch_execute("INSERT INTO t VALUES (2)")
        .await
        .expect("the transaction moved");
    c.batch_execute("COMMIT").await.unwrap();
    let e = c.batch_execute("EXECUTE sq").await.unwrap_err();
    assert_eq!(sqlstate(&e), Some("26000"), "{e:?}");
    let e = c.query(&statement, &[&1]).await.unwrap_err();
    assert_eq!(sqlstate(&e), Some("26000"), "{e:?}");
    assert_eq!(
        values(cluster_on_new_primary(&mut cluster).await, "t").await,
        [1, 2]
    );
}

/// Requests larger than `failover.max_replay_bytes` are not kept. One in flight at a failover
/// that would be sent again ends its session with 08006 rather than reach the new backend in
/// part: a read, and a bulk COPY still streaming (which could not have committed, and would
/// be run again whole if it were kept). Nothing of the COPY exists, and other sessions go on.
#[tokio::test]
async fn requests_too_large_to_keep_at_a_failover() {
    let cluster = Cluster::primary_and_standby().await;
    setup(&cluster, TABLE_T).await;
    let mut cluster = cluster;
    let gw = cluster
        .failover_gateway_with(|c| c.failover.max_replay_bytes = 64 << 10)
        .await;
    let reader = gw.connect(roles::SCRAM).await;
    let loader = gw.connect(roles::MD5).await;
    let bystander = gw.connect(roles::TRUST).await;
    let big_read = format!(
        "SELECT length('{}') FROM pg_sleep(1.5)",
        "r".repeat(100 << 10)
    );
    let (loader, read, loaded) =
        kill_primary_during(&mut cluster, Duration::from_millis(600), async move {
            let load = async {
                let sink = loader.copy_in("COPY t FROM STDIN").await?;
                futures_util::pin_mut!(sink);
                for i in 0..40_000 {
                    sink.send(bytes::Bytes::from(format!("{i}\n"))).await?;
                    if i % 1000 == 0 {
                        tokio::time::sleep(Duration::from_millis(25)).await;
                    }
                }
                sink.finish().await
            };
            let (read, loaded) =
                futures_util::future::join(reader.simple_query(&big_read), load).await;
            (loader, read.map(drop), loaded)
        })
        .await;
    let read = read.unwrap_err();
    assert_eq!(sqlstate(&read), Some("08006"), "{read:?}");
    let loaded = loaded.unwrap_err();
    let ended = loaded.is_closed() || sqlstate(&loaded) == Some("08006");
    assert!(ended, "{loaded:?}");
    assert!(loader.is_closed());
    let rows = int_column(&bystander, "SELECT a FROM t").await;
    assert!(rows.is_empty(), "nothing of the COPY: {} rows", rows.len());
}

/// An autocommit write running when the primary dies may or may not have been applied: the
/// client gets 08007 and the session continues. So does a whole transaction sent as one string
/// (`BEGIN; …; COMMIT`), which commits as an autocommit write does, a SELECT of a function
/// that writes (run again, the write would be applied twice), and a Query of two INSERTs that
/// carries the xid query. None of them runs again.
#[tokio::test]
async fn autocommit_write_in_flight_gets_08007() {
    let (mut cluster, gw, c) = session_after(&format!(
        "{TABLE_T}; CREATE FUNCTION ins_fn(i int) RETURNS int LANGUAGE sql
           AS $$ INSERT INTO t SELECT i FROM pg_sleep(1.5); SELECT i $$"
    ))
    .await;
    let whole = gw.connect(roles::MD5).await;
    let call = gw.connect(roles::CLEARTEXT).await;
    let several = gw.connect(roles::TRUST).await;
    let counted_before = errors_counted(&gw.admin_get("/metrics").await, "08007", "gateway");
    let (c, whole, call, several, r, w, f, s) =
        kill_primary_during(&mut cluster, Duration::from_millis(400), async move {
            let (r, w, f, s) = futures_util::future::join4(
                c.batch_execute("INSERT INTO t SELECT 9 FROM pg_sleep(1.5)"),
                whole.batch_execute("BEGIN; INSERT INTO t SELECT 8 FROM pg_sleep(1.5); COMMIT"),
                call.batch_execute("SELECT ins_fn(7)"),
                // The first statement's answer is held until the next message shows it was
                // not the last; the client hears nothing of a Query whose commit is in doubt.
                several.simple_query(
                    "INSERT INTO t VALUES (6); INSERT INTO t SELECT 5 FROM pg_sleep(1.5)",
                ),
            )
            .await;
            (c, whole, call, several, r, w, f, s.map(|_| ()))
        })
        .await;
    for e in [r, w, f, s] {
        assert_gateway_error(&e.unwrap_err(), "08007");
    }
    // The registry is the process's, shared with the tests running alongside: at least ours,
    // and none from a server (no test's server sends 08007).
    let metrics = gw.admin_get("/metrics").await;
    assert!(errors_counted(&metrics, "08007", "gateway") - counted_before >= 4.0);
    assert_eq!(errors_counted(&metrics, "08007", "server"), 0.0);
    for session in [&c, &whole, &call, &several] {
        let one: i32 = session.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1);
    }
    assert!(
        c.query("SELECT a FROM t", &[]).await.unwrap().is_empty(),
        "no write ran again"
    );
}

/// Autocommit writes the old primary never read run on the new one: each session's backend
/// was stopped, its request waiting unread in its socket, when every process of the primary
/// was killed. The kernel resets a connection closed with data unread instead of ending it in
/// order, which proves the request unread: the client gets its answer, not 08007, and each row
/// is there once. A Query of one INSERT (sent as a batch), a prepared INSERT (extended
/// protocol), and a COMMIT whose transaction wrote. (All three got 08007; the requests of
/// [`autocommit_write_in_flight_gets_08007`], read and running when the primary died, still
/// do.)
#[tokio::test]
async fn writes_the_dead_primary_never_read_run_on_the_new_one() {
    let mut cluster = Cluster::primary_and_standby().await;
    setup(&cluster, TABLE_T).await;
    let gw = cluster.failover_gateway().await;
    let simple = gw.connect(roles::SCRAM).await;
    let extended = gw.connect(roles::MD5).await;
    let committing = gw.connect(roles::TRUST).await;
    let insert = extended.prepare("INSERT INTO t VALUES ($1)").await.unwrap();
    let mut pids = Vec::new();
    for c in [&simple, &extended, &committing] {
        pids.push(u32::try_from(backend_pid(c).await).unwrap());
    }
    committing
        .batch_execute("BEGIN; INSERT INTO t VALUES (3)")
        .await
        .unwrap();
    let stopped = Frozen::freeze(pids);
    let requests = tokio::spawn(async move {
        futures_util::future::join3(
            simple.simple_query("INSERT INTO t VALUES (1)"),
            extended.execute(&insert, &[&2i32]),
            committing.batch_execute("COMMIT"),
        )
        .await
    });
    // The requests reach the stopped backends' sockets.
    tokio::time::sleep(Duration::from_millis(10)).await;
    cluster.kill_primary().await;
    drop(stopped);
    let (by_query, by_prepared, by_commit) = tokio::time::timeout(PATIENCE, requests)
        .await
        .expect("answered by the new primary")
        .unwrap();
    by_query.expect("the Query ran on the new primary");
    assert_eq!(by_prepared.expect("the prepared INSERT ran there"), 1);
    by_commit.expect("the transaction was replayed and committed there");
    assert_eq!(
        values(cluster_on_new_primary(&mut cluster).await, "t").await,
        [1, 2, 3]
    );
    // The registry is the process's, shared with the tests running alongside: at least ours.
    let metrics = gw.admin_get("/metrics").await;
    assert!(metric_total(&metrics, "understudy_unread_requests_total") >= 3.0);
}

/// An autocommit write the gateway could not finish writing to the old primary (its backend
/// stopped, the socket buffers full) never ran there, whenever the primary dies: it runs on
/// the new one, not 08007, and its row is there once. The reset comes long after the request,
/// so it is not what tells. (It got 08007.)
#[tokio::test]
async fn a_write_not_all_written_to_the_dead_primary_runs_on_the_new_one() {
    let mut cluster = Cluster::primary_and_standby().await;
    setup(&cluster, TABLE_T).await;
    let gw = cluster
        .failover_gateway_with(|c| c.failover.max_replay_bytes = 64 << 20)
        .await;
    let c = gw.connect(roles::SCRAM).await;
    let pid = u32::try_from(backend_pid(&c).await).unwrap();
    let stopped = Frozen::freeze(vec![pid]);
    // Larger than the socket buffers of both ends can grow together (Linux's largest
    // defaults: 32 MiB to receive, 4 MiB to send), yet small enough to be kept for a move.
    let padding = "x".repeat(48 << 20);
    let insert = tokio::spawn(async move {
        c.simple_query(&format!("INSERT INTO t VALUES (1) -- {padding}"))
            .await
            .map(drop)
    });
    // Long past its arrival: the reset the kill brings says nothing of it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.kill_primary().await;
    drop(stopped);
    tokio::time::timeout(PATIENCE, insert)
        .await
        .expect("answered by the new primary")
        .unwrap()
        .expect("the INSERT ran on the new primary");
    assert_eq!(
        values(cluster_on_new_primary(&mut cluster).await, "t").await,
        [1]
    );
}

/// Autocommit writes that reached the old primary's host after their backends had closed the
/// connection, but were sent before that end (its FIN) reached the gateway, never ran there:
/// they run on the new primary, not 08007, and their rows are there once. On a network the
/// two cross in flight; here both are held back with nftables until the writes are out, so
/// the FIN comes when its kernel sends it again, acknowledging nothing of them. One INSERT,
/// and a Query of two, which the gateway follows with a WAL-position query of its own. (Both
/// got 08007: the connection ended in order, and the write went out before the end was seen.)
#[tokio::test]
async fn writes_that_crossed_the_dead_primarys_end_run_on_the_new_one() {
    let cluster = Cluster::primary_and_standby().await;
    let gw = cluster.failover_gateway().await;
    writes_cross_the_end(cluster, &gw).await;
}

/// The same over TLS to the backends, where what was acknowledged is counted in the records'
/// bytes. (Both got 08007: the proof was for plain TCP only.)
#[tokio::test]
async fn writes_that_crossed_the_dead_primarys_end_over_tls_run_on_the_new_one() {
    let ca = TestCa::new();
    let (cert, key) = (ca.server_cert.clone(), ca.server_key.clone());
    let cluster = Cluster::build(move |o| o.ssl = Some((cert, key))).await;
    let gw = cluster
        .failover_gateway_with(|c| c.backend_tls.sslmode = BackendSslMode::Require)
        .await;
    writes_cross_the_end(cluster, &gw).await;
}

/// Sends two writes through `gw` while the dead primary's FIN is held back (see
/// [`writes_that_crossed_the_dead_primarys_end_run_on_the_new_one`]), and checks that both
/// ran on the new primary, once.
async fn writes_cross_the_end(mut cluster: Cluster, gw: &TestGateway) {
    setup(&cluster, TABLE_T).await;
    let (one, two) = (gw.connect(roles::SCRAM).await, gw.connect(roles::MD5).await);
    let port = cluster.pg.primary.port();
    let held_back = Dropped::segments(Direction::From, port);
    let lost = Dropped::segments(Direction::To, port);
    cluster.kill_primary().await;
    let inserts = tokio::spawn(async move {
        futures_util::future::try_join(
            one.simple_query("INSERT INTO t VALUES (1)"),
            two.simple_query("INSERT INTO t VALUES (2); INSERT INTO t VALUES (3)"),
        )
        .await
        .map(drop)
    });
    // The writes are out (and lost); the FIN comes with its kernel's next try, within a
    // second or two. Until the gateway has it, the primary does not answer the gateway's
    // probes at all, which proves nothing: no failover begins without it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(held_back);
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(lost);
    tokio::time::timeout(PATIENCE, inserts)
        .await
        .expect("answered by the new primary")
        .unwrap()
        .expect("the INSERTs ran on the new primary");
    assert_eq!(
        values(cluster_on_new_primary(&mut cluster).await, "t").await,
        [1, 2, 3]
    );
    let metrics = gw.admin_get("/metrics").await;
    assert!(metric_total(&metrics, "understudy_unread_requests_total") >= 2.0);
}

/// The 08007 an in-doubt request gets comes from a query of the gateway's on the new backend,
/// which must leave the client's unnamed statement as the request, failing on its own, would
/// have: a client that parses it once and binds it again and again (libpq's `PQprepare(conn,
/// "", …)` then `PQexecPrepared`) binds it again after the 08007 and goes on.
#[tokio::test]
async fn the_unnamed_statement_outlives_an_in_doubt_write() {
    let (mut cluster, gw, _c) = session_after(TABLE_T).await;
    let mut c = RawConn::login(gw.addr(), roles::TRUST).await;
    let mut parse = raw::parse("", "INSERT INTO t SELECT $1::int FROM pg_sleep($2::float8)");
    parse.extend(raw::msg(b'S', b""));
    c.send(&parse).await;
    assert_eq!(tags(&c.read_until(b'Z').await), "1Z");
    c.send(&raw::bind_execute_sync("", &["1", "0"])).await;
    assert_eq!(tags(&c.read_until(b'Z').await), "2CZ");
    let (mut c, answer) =
        kill_primary_during(&mut cluster, Duration::from_millis(400), async move {
            c.send(&raw::bind_execute_sync("", &["2", "1.5"])).await;
            let answer = c.read_until(b'Z').await;
            (c, answer)
        })
        .await;
    assert_eq!(tags(&answer), "EZ", "{answer:?}");
    assert_eq!(answer[0].code(), "08007", "{answer:?}");
    c.send(&raw::bind_execute_sync("", &["3", "0"])).await;
    let again = c.read_until(b'Z').await;
    assert_eq!(tags(&again), "2CZ", "{again:?}");
    let su = cluster_on_new_primary(&mut cluster).await.superuser().await;
    assert_eq!(int_column(&su, "SELECT a FROM t ORDER BY a").await, [1, 3]);
}

/// Maintenance in flight when the primary dies (a VACUUM waiting for a lock another session
/// holds there) runs again on the new primary: it changes nothing a client reads, so it is no
/// in-doubt write (08007). The client gets its answer and the session goes on.
#[tokio::test]
async fn maintenance_in_flight_runs_again() {
    let (mut cluster, _gw, c) = session_after(TABLE_T).await;
    // Its own table: a VACUUM of another's skips it at once.
    c.batch_execute("CREATE TABLE m (a int); INSERT INTO m VALUES (1)")
        .await
        .unwrap();
    let locker = cluster.superuser().await;
    locker
        .batch_execute("BEGIN; LOCK TABLE m IN SHARE UPDATE EXCLUSIVE MODE")
        .await
        .unwrap();
    let (c, r) = kill_primary_during(&mut cluster, Duration::from_millis(400), async move {
        let r = c.simple_query("VACUUM (ANALYZE) m").await;
        (c, r)
    })
    .await;
    let answer = r.expect("run again on the new primary");
    assert!(
        matches!(answer[..], [SimpleQueryMessage::CommandComplete(0)]),
        "{answer:?}"
    );
    c.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    assert_eq!(
        values(cluster_on_new_primary(&mut cluster).await, "t").await,
        [1]
    );
}

/// A session-state change in flight when the primary dies runs again on the new primary: it
/// died with the old backend whether it ran there or not, so it is no in-doubt write (08007).
/// The client gets the whole answer and the session keeps the setting.
#[tokio::test]
async fn session_change_in_flight_runs_again() {
    let mut cluster = Cluster::primary_and_standby().await;
    let standby_port = i32::from(cluster.pg.standby.as_ref().unwrap().port());
    let gw = cluster.failover_gateway().await;
    let c = gw.connect(roles::SCRAM).await;
    let (c, r) = kill_primary_during(&mut cluster, Duration::from_millis(400), async move {
        let r = c
            .simple_query("SET application_name = 'moved'; SELECT 7 FROM pg_sleep(1.5)")
            .await;
        (c, r)
    })
    .await;
    let answer = r.expect("the statement runs again on the new primary");
    assert_eq!(simple_rows(&answer), [["7"]]);
    assert_eq!(
        application_name_and_port(&c).await,
        ("moved".to_owned(), standby_port)
    );
}

/// A pipeline of extended-protocol statements inside a transaction, in flight when the primary
/// dies, completes; every row is there once after COMMIT.
#[tokio::test]
async fn pipeline_in_flight_completes() {
    let (mut cluster, _gw, c) = session_after(TABLE_T).await;
    c.batch_execute("BEGIN").await.unwrap();
    let insert = c
        .prepare("INSERT INTO t SELECT $1 FROM pg_sleep(0.01)")
        .await
        .unwrap();
    let killer = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.kill_primary().await;
    };
    let work = futures_util::future::join_all((1..=100).map(|i| {
        let (c, insert) = (&c, &insert);
        async move { c.execute(insert, &[&i]).await }
    }));
    let (results, ()) = tokio::join!(work, killer);
    for r in results {
        assert_eq!(r.unwrap(), 1);
    }
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        values(cluster_on_new_primary(&mut cluster).await, "t").await,
        (1..=100).collect::<Vec<_>>()
    );
}

/// COPY FROM STDIN inside a transaction, interrupted by the failover mid-stream, finishes; the
/// transaction commits every row once.
#[tokio::test]
async fn copy_in_transaction_survives() {
    let (mut cluster, _gw, c) = session_after(TABLE_T).await;
    c.batch_execute("BEGIN; INSERT INTO t VALUES (0)")
        .await
        .unwrap();
    let sink = c.copy_in("COPY t FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    let chunk = |from: i32, to: i32| {
        bytes::Bytes::from((from..to).map(|i| format!("{i}\n")).collect::<String>())
    };
    sink.send(chunk(1, 500)).await.unwrap();
    sink.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    cluster.kill_primary().await;
    sink.send(chunk(500, 1000)).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 999);
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        values(cluster_on_new_primary(&mut cluster).await, "t").await,
        (0..1000).collect::<Vec<_>>()
    );
}

/// Killing only the postmaster (its backends end themselves with a FATAL) fails over too.
#[tokio::test]
async fn postmaster_only_kill_fails_over() {
    let (mut cluster, _gw, c) = session_after(TABLE_T).await;
    c.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    cluster.kill_primary_postmaster().await;
    c.batch_execute("INSERT INTO t VALUES (2)").await.unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        values(cluster_on_new_primary(&mut cluster).await, "t").await,
        [1, 2]
    );
}

/// A COMMIT answered 40001 because the replay diverged ends the transaction, as a COMMIT that
/// fails does directly: the session is idle after it (its next statement runs, no 25P02),
/// whether the COMMIT was in flight at the failover or came after it; neither transaction
/// persists.
#[tokio::test]
async fn a_commit_answered_40001_ends_the_transaction() {
    let (mut cluster, gw, in_flight) = session_after(&format!("{TABLE_T}; {SLOW_COMMIT}")).await;
    let later = gw.connect(roles::MD5).await;
    for (c, a) in [(&in_flight, 1), (&later, 11)] {
        c.batch_execute(&format!("BEGIN; INSERT INTO t VALUES ({a})"))
            .await
            .unwrap();
        c.query_one("SELECT clock_timestamp()", &[]).await.unwrap();
    }
    let (in_flight, r) =
        kill_primary_during(&mut cluster, Duration::from_millis(500), async move {
            let r = in_flight.batch_execute("COMMIT").await;
            (in_flight, r)
        })
        .await;
    assert_gateway_error(&r.unwrap_err(), "40001");
    assert_gateway_error(&later.batch_execute("COMMIT").await.unwrap_err(), "40001");
    for c in [&in_flight, &later] {
        let one: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1);
        let e = c.batch_execute("SAVEPOINT s").await.unwrap_err();
        assert_eq!(
            sqlstate(&e),
            Some("25P01"),
            "not in a transaction block: {e:?}"
        );
    }
    assert_eq!(
        values(cluster_on_new_primary(&mut cluster).await, "t").await,
        Vec::<i32>::new()
    );
}

/// A statement a driver keeps prepared whose table was dropped since (directly, only its
/// next use would fail) does not stop the move: it is left out on the new primary, and the
/// session's transaction is replayed and goes on. Using that statement then fails (26000),
/// as it would have (42P01) on the old backend.
#[tokio::test]
async fn a_prepared_statement_whose_table_is_gone_does_not_stop_the_move() {
    let (mut cluster, _gw, c) = session_after(&format!(
        "{TABLE_T}; CREATE TABLE dz(a int); GRANT ALL ON dz TO PUBLIC"
    ))
    .await;
    let counting = c.prepare("SELECT count(*) FROM dz").await.unwrap();
    let inserting = c.prepare("INSERT INTO t VALUES ($1)").await.unwrap();
    c.query_one(&counting, &[]).await.unwrap();
    cluster
        .superuser()
        .await
        .batch_execute("DROP TABLE dz")
        .await
        .unwrap();
    cluster.pg.wait_standby_caught_up().await.unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    c.execute(&inserting, &[&1]).await.unwrap();

    cluster.kill_primary().await;

    c.execute(&inserting, &[&2]).await.unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    let e = c.query_one(&counting, &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e), Some("26000"), "{e:?}");
    assert_eq!(
        values(cluster_on_new_primary(&mut cluster).await, "t").await,
        [1, 2]
    );
}

/// The unnamed prepared statement moves with its session, as PostgreSQL keeps it across Syncs
/// (pg8000 parses, describes and binds in separate round trips): parsed before the failover
/// and bound after it in autocommit; a COMMIT parsed as it in a transaction that wrote (the
/// transaction is replayed, then committed once); and a COPY FROM STDIN bound from it and
/// streaming when the primary dies, which completes with every row once.
#[tokio::test]
async fn the_unnamed_statement_moves_with_the_session() {
    let mut cluster = Cluster::primary_and_standby().await;
    setup(&cluster, TABLE_T).await;
    let gw = cluster.failover_gateway().await;
    let sync = msg(b'S', b"");
    let parse_sync = |sql: &str| [raw::parse("", sql), sync.clone()].concat();

    let mut autocommit = RawConn::login(gw.addr(), roles::TRUST).await;
    autocommit
        .send(&parse_sync("INSERT INTO t VALUES ($1)"))
        .await;
    assert_eq!(tags(&autocommit.read_until(b'Z').await), "1Z");

    let mut block = RawConn::login(gw.addr(), roles::TRUST).await;
    block.send(&query("BEGIN; INSERT INTO t VALUES (10)")).await;
    assert_eq!(tags(&block.read_until(b'Z').await), "CCZ");
    block.send(&parse_sync("COMMIT")).await;
    assert_eq!(tags(&block.read_until(b'Z').await), "1Z");

    let mut copy = RawConn::login(gw.addr(), roles::TRUST).await;
    copy.send(&parse_sync("COPY t FROM STDIN")).await;
    assert_eq!(tags(&copy.read_until(b'Z').await), "1Z");
    copy.send(&raw::bind_execute_sync("", &[])).await;
    assert_eq!(tags(&copy.read_until(b'G').await), "2G");
    copy.send(&msg(b'd', b"20\n")).await;

    cluster.kill_primary().await;

    copy.send(&msg(b'd', b"21\n")).await;
    copy.send(&[msg(b'c', b""), sync.clone()].concat()).await;
    let answer = copy.read_until(b'Z').await;
    assert_eq!(tags(&answer), "CZ", "{answer:?}");
    assert_eq!(answer[0].body, b"COPY 2\0");

    autocommit.send(&raw::bind_execute_sync("", &["1"])).await;
    let answer = autocommit.read_until(b'Z').await;
    assert_eq!(tags(&answer), "2CZ", "{answer:?}");
    autocommit.send(&raw::bind_execute_sync("", &["2"])).await;
    assert_eq!(tags(&autocommit.read_until(b'Z').await), "2CZ");

    block.send(&raw::bind_execute_sync("", &[])).await;
    let answer = block.read_until(b'Z').await;
    assert_eq!(tags(&answer), "2CZ", "{answer:?}");
    assert_eq!(
        (&answer[1].body[..], &answer[2].body[..]),
        (&b"COMMIT\0"[..], &b"I"[..])
    );

    assert_eq!(
        values(cluster_on_new_primary(&mut cluster).await, "t").await,
        [1, 2, 10, 20, 21]
    );
}

/// Bind and Execute of the statement `ins` for row `a`.
fn bind_execute(a: i32) -> Vec<u8> {
    let value = a.to_string();
    let mut bind = b"\0ins\0\0\0\0\x01".to_vec();
    bind.extend_from_slice(&(value.len() as i32).to_be_bytes());
    bind.extend_from_slice(value.as_bytes());
    bind.extend_from_slice(b"\0\0");
    let mut bytes = msg(b'B', &bind);
    bytes.extend(msg(b'E', b"\0\0\0\0\0"));
    bytes
}

/// Extended-protocol requests not yet synced or flushed whose answers the client got anyway:
/// a backend that sees its postmaster die ends with a FATAL and flushes what it had, the
/// answers included. The move sends them again and reads back what the client saw, which the
/// new primary sends only when asked to flush (the move waited for it, then dropped the
/// session). Autocommit (an implicit transaction never committed) and in a transaction block;
/// each row is inserted once.
#[tokio::test]
async fn answers_to_unsynced_requests_flushed_by_a_dying_backend() {
    for in_block in [false, true] {
        let mut cluster = Cluster::primary_and_standby().await;
        setup(&cluster, TABLE_T).await;
        let gw = cluster.failover_gateway().await;
        let mut c = RawConn::login(gw.addr(), roles::TRUST).await;
        if in_block {
            c.send(&query("BEGIN; INSERT INTO t VALUES (0)")).await;
            c.read_until(b'Z').await;
        }
        // Neither Sync nor Flush: the server answers them only when something makes it flush.
        let mut batch = msg(b'P', b"ins\0INSERT INTO t VALUES ($1::int)\0\0\0");
        (1..=3).for_each(|a| batch.extend(bind_execute(a)));
        c.send(&batch).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let backend = |status: serde_json::Value| status["sessions"][0]["backend"].clone();
        let before = backend(gw.status().await);
        cluster.kill_primary_postmaster().await;
        // ParseComplete, then BindComplete and CommandComplete for each row.
        let mut seen = Vec::new();
        while seen.iter().filter(|m: &&Msg| m.tag == b'C').count() < 3 {
            let m = c
                .read()
                .await
                .expect("the answers the dying backend flushed");
            assert_ne!(m.tag, b'E', "no error: {}", m.message());
            seen.push(m);
        }
        let tags: Vec<u8> = seen.iter().map(|m| m.tag).collect();
        assert_eq!(tags, b"12C2C2C", "{seen:?}");
        // Only once the session is on the new primary: the batch is still unsynced there.
        let started = std::time::Instant::now();
        while backend(gw.status().await) == before {
            assert!(started.elapsed() < PATIENCE, "the session moves");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // More of the same batch, then its Sync, now on the new primary.
        let mut rest = bind_execute(4);
        rest.extend(msg(b'S', b""));
        c.send(&rest).await;
        let answer = c.read_until(b'Z').await;
        let tags: Vec<u8> = answer.iter().map(|m| m.tag).collect();
        assert_eq!(tags, b"2CZ", "{answer:?}");
        let status = if in_block { b"T" } else { b"I" };
        assert_eq!(answer.last().unwrap().body, status);
        if in_block {
            c.send(&query("COMMIT")).await;
            c.read_until(b'Z').await;
        }
        let expected: Vec<i32> = if in_block {
            (0..=4).collect()
        } else {
            (1..=4).collect()
        };
        assert_eq!(
            values(cluster_on_new_primary(&mut cluster).await, "t").await,
            expected,
            "in a transaction block: {in_block}"
        );
    }
}

/// The cluster as seen after a failover: the promoted standby answers as `primary`.
async fn cluster_on_new_primary(cluster: &mut Cluster) -> &Cluster {
    if cluster.pg.primary.is_in_recovery().await.is_err() {
        cluster.reseed().await;
    }
    cluster
}

/// pgbench's transactions (`BEGIN; UPDATE; SELECT; INSERT; END`, in the simple and extended
/// protocol and as prepared statements) run on through a SIGKILL of the primary: none fails,
/// and every one pgbench counts is in `pgbench_history` once, on the new primary, with the
/// balances it wrote. (Replication is synchronous: with asynchronous replication the last
/// commits may be lost with the primary, and their sessions rightly end with 08007.)
#[tokio::test]
async fn pgbench_runs_through_a_crash_of_the_primary() {
    let mut cluster = Cluster::build(|o| o.synchronous = true).await;
    let gw = cluster.failover_gateway().await;
    let conn = gw.conn_str(roles::SCRAM, "postgres");
    let pgbench = cluster.program("pgbench");
    pgbench_init(&cluster, &conn).await;
    let run = |mode: &'static str| {
        let (pgbench, conn) = (pgbench.clone(), conn.clone());
        tokio::spawn(async move {
            // `-n`: no VACUUM and TRUNCATE of `pgbench_history` first, which one run would
            // otherwise do while another already commits into it.
            let args = [
                "-n", "-N", "-c", "2", "-j", "1", "-T", "6", "-M", mode, &conn,
            ];
            run_program(pgbench, &args, None).await
        })
    };
    let runs = [run("simple"), run("extended"), run("prepared")];
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.kill_primary().await;
    let mut processed = 0;
    for run in runs {
        let out = run.await.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "pgbench: {stdout}{stderr}");
        assert!(
            stdout.contains("number of failed transactions: 0 (0.000%)"),
            "{stdout}"
        );
        let count = stdout
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|n| n.parse::<i64>().ok())
            .unwrap_or_else(|| panic!("no count: {stdout}"));
        assert!(count > 0, "{stdout}");
        processed += count;
    }
    let su = cluster_on_new_primary(&mut cluster).await.superuser().await;
    let row = su
        .query_one(
            "SELECT count(*), (SELECT sum(abalance) FROM pgbench_accounts), sum(delta)::bigint
             FROM pgbench_history",
            &[],
        )
        .await
        .unwrap();
    // Balances first: a transaction lost or applied twice whole keeps them equal, history
    // rows gone or doubled alone do not.
    assert_eq!(row.get::<_, i64>(1), row.get::<_, i64>(2), "balances");
    assert_eq!(row.get::<_, i64>(0), processed, "each transaction once");
}

/// A cancel sent while the session is moving (its old backend gone, the new one not there yet)
/// is not lost: the statement, sent again on the new primary, is cancelled there (57014)
/// instead of running to its end; the session goes on.
#[tokio::test]
async fn a_cancel_sent_during_the_move_cancels_the_statement_sent_again() {
    let (mut cluster, _gw, c) = session_after(TABLE_T).await;
    let token = c.cancel_token();
    let running = tokio::spawn(async move {
        let r = c.batch_execute("SELECT pg_sleep(5)").await;
        (c, r)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.kill_primary().await;
    token.cancel_query(NoTls).await.unwrap();
    let (c, r) = running.await.unwrap();
    let e = r.expect_err("the statement was cancelled");
    assert_eq!(sqlstate(&e), Some("57014"), "{e:?}");
    let one: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

/// The client's cancel key, issued before the move, cancels a query on the new backend.
#[tokio::test]
async fn cancel_key_works_after_the_move() {
    let mut cluster = Cluster::primary_and_standby().await;
    let gw = cluster.failover_gateway().await;
    let c = gw.connect(roles::SCRAM).await;
    let token = c.cancel_token();
    cluster.kill_primary().await;
    c.query_one("SELECT 1", &[]).await.unwrap();
    let sleeper = tokio::spawn(async move { c.batch_execute("SELECT pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token.cancel_query(NoTls).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), sleeper)
        .await
        .expect("cancel takes effect quickly")
        .unwrap();
    assert_eq!(sqlstate(&r.unwrap_err()), Some("57014"));
}

/// A backend ended by the server while the primary is healthy (pg_terminate_backend) is not a
/// failover: the client gets the server's FATAL, and no promotion happens.
#[tokio::test]
async fn terminated_backend_is_no_failover() {
    let cluster = Cluster::primary_and_standby().await;
    let gw = cluster.failover_gateway().await;
    let c = gw.connect(roles::SCRAM).await;
    server_ends_backend(&cluster, &c).await;
    assert!(!cluster.pg.primary.is_in_recovery().await.unwrap());
    let standby = cluster.pg.standby.as_ref().unwrap();
    assert!(
        standby.is_in_recovery().await.unwrap(),
        "the standby was not promoted"
    );
    gw.connect(roles::SCRAM)
        .await
        .query_one("SELECT 1", &[])
        .await
        .unwrap();
}

/// A primary that answers but turns the control role away (its connection limit here, once
/// the kept control connection is gone; a full `max_connections` answers the same 53300) is
/// up, not failed: `/status` keeps it the routed
/// primary and shows why the probe failed, a backend the server ends is no failover, and
/// sessions carry on.
#[tokio::test]
async fn a_primary_turning_the_probe_away_is_no_failover() {
    let cluster = Cluster::primary_and_standby().await;
    let gw = cluster
        .gateway_with(|c| {
            c.control.user = roles::TRUST.to_owned();
            c.failover.promote = understudy::config::Promote::Auto;
            c.failover.probe_timeout_ms = 500;
            c.failover.timeout_ms = 20_000;
            c.topology_interval_ms = 100;
        })
        .await;
    let c = gw.connect(roles::SCRAM).await;
    c.batch_execute("CREATE TABLE kept(a int); INSERT INTO kept VALUES (1)")
        .await
        .unwrap();
    cluster
        .superuser()
        .await
        .batch_execute(&format!(
            "ALTER ROLE {} CONNECTION LIMIT 0;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE application_name = 'understudy-control'",
            roles::TRUST
        ))
        .await
        .unwrap();
    let primary = cluster.pg.primary.addr().to_string();
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let status = gw.status().await;
        let backend = backend_status(&status, &primary);
        if backend["error"]
            .as_str()
            .is_some_and(|e| e.contains("53300"))
        {
            assert_eq!(backend["role"], "primary", "{status:#}");
            assert_eq!(backend["routed"], true, "{status:#}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{status:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A session whose backend the server ends gets the server's FATAL at once, as when the
    // primary lets the probe in, not a wait of failover.timeout_ms for a promotion.
    let doomed = gw.connect(roles::SCRAM).await;
    let took = server_ends_backend(&cluster, &doomed).await;
    assert!(took < Duration::from_secs(5), "{took:?}");
    // Ten rounds of the health monitor later, nothing has moved.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status = gw.status().await;
    let routed: Vec<_> = status["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["routed"] == true)
        .map(|b| (b["address"].clone(), b["role"].clone()))
        .collect();
    assert_eq!(
        routed,
        [(primary.clone().into(), "primary".into())],
        "{status:#}"
    );
    let standby = cluster.pg.standby.as_ref().unwrap();
    assert!(standby.is_in_recovery().await.unwrap(), "standby promoted");
    let count: i64 = c
        .query_one("SELECT count(*) FROM kept", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1);
    let port: i32 = gw
        .connect(roles::SCRAM)
        .await
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(port, i32::from(cluster.pg.primary.port()));
}

/// A client that logs in while the primary is dead, before anything else has noticed, waits for
/// the failover its login sets off and gets a session on the new primary, one that can move
/// again (its secret was looked up there), rather than `57P03`.
#[tokio::test]
async fn a_login_during_the_failover_waits_for_the_new_primary() {
    let mut cluster = Cluster::primary_and_standby().await;
    setup(
        &cluster,
        &format!(
            "CREATE TABLE t(a int); INSERT INTO t VALUES (1); GRANT SELECT ON t TO {}",
            roles::SCRAM
        ),
    )
    .await;
    // No probe round and no health monitor round during the test: only the login can notice.
    let gw = cluster
        .failover_gateway_with(|c| c.topology_interval_ms = 600_000)
        .await;
    cluster.kill_primary().await;
    let standby_port = i32::from(cluster.pg.standby.as_ref().unwrap().port());
    let c = gw.connect(roles::SCRAM).await;
    let row = c
        .query_one("SELECT inet_server_port(), (SELECT count(*) FROM t)", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), standby_port);
    assert_eq!(row.get::<_, i64>(1), 1);
    let status = gw.status().await;
    let sessions = status["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1, "{status:#}");
    assert_eq!(sessions[0]["movable"], "yes", "{status:#}");
}

/// A session holding a temporary table cannot move: FATAL 08006 naming why; other sessions
/// move, and so does one that held a temporary table and an advisory lock until it ran
/// `DISCARD ALL` (as a connection pool does before handing a connection out again), which
/// dropped the table and released the lock.
#[tokio::test]
async fn unmovable_session_gets_08006() {
    let mut cluster = Cluster::primary_and_standby().await;
    let gw = cluster.failover_gateway().await;
    let (temp, temp_end) = gw.connect_watched(roles::SCRAM).await;
    temp.batch_execute("CREATE TEMP TABLE scratch(a int)")
        .await
        .unwrap();
    let plain = gw.connect(roles::SCRAM).await;
    let reset = gw.connect(roles::MD5).await;
    reset
        .batch_execute("CREATE TEMP TABLE scratch(a int); SELECT pg_advisory_lock(7)")
        .await
        .unwrap();
    assert_eq!(gw.session_status(&reset).await["movable"], "no");
    // Not narrower forms: the lock is still held.
    reset.batch_execute("DISCARD TEMP").await.unwrap();
    assert_eq!(gw.session_status(&reset).await["movable"], "no");
    reset.batch_execute("DISCARD ALL").await.unwrap();
    let session = gw.session_status(&reset).await;
    assert_eq!(session["movable"], "yes", "{session:#}");
    let status = gw.status().await;
    assert!(
        status["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["movable"] == "no"
                && s["reason"].as_str().unwrap_or("").contains("temporary")),
        "{status:#}"
    );
    cluster.kill_primary().await;
    assert_ended_unmovable(&temp, temp_end, "temporary table").await;
    plain.query_one("SELECT 1", &[]).await.unwrap();
    reset
        .batch_execute("CREATE TEMP TABLE scratch(a int)")
        .await
        .expect("the reset session moved, without its table");
}

/// A gateway with one backend has nowhere to move a session: when the primary dies, its
/// sessions end at once, as a direct connection would, not after `failover.timeout_ms` of
/// waiting for a primary that cannot come.
#[tokio::test]
async fn one_backend_sessions_end_at_once_when_the_primary_dies() {
    let mut cluster = Cluster::primary_only().await;
    let primary = cluster.pg.primary.addr().to_string();
    let gw = cluster
        .gateway_with(|c| {
            c.backends = vec![primary];
            c.failover.timeout_ms = 20_000;
        })
        .await;
    let c = gw.connect(roles::SCRAM).await;
    c.batch_execute("SELECT 1").await.unwrap();
    cluster.kill_primary().await;
    let started = std::time::Instant::now();
    let e = c.query_one("SELECT 1", &[]).await.unwrap_err();
    // What a direct connection gets, depending on when the client asks: the server's own
    // FATAL (passed on), the gateway's 08006 for the lost connection, or, for a FATAL that
    // reached the driver while idle, a closed connection.
    if let Some(db) = e.as_db_error() {
        assert!(
            ["08006", "57P01", "57P02"].contains(&db.code().code()),
            "{db:?}"
        );
    } else {
        assert!(e.is_closed(), "{e:?}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// With nobody to promote a standby (external promotion, no orchestrator), sessions wait
/// `failover.timeout_ms` and then get FATAL 08006 saying so.
#[tokio::test]
async fn no_new_primary_within_the_timeout_is_fatal() {
    let mut cluster = Cluster::primary_and_standby().await;
    let gw = cluster
        .failover_gateway_with(|c| {
            c.failover.promote = understudy::config::Promote::External;
            c.failover.timeout_ms = 1_500;
        })
        .await;
    let c = gw.connect(roles::SCRAM).await;
    cluster.kill_primary().await;
    let started = std::time::Instant::now();
    let e = c.query_one("SELECT 1", &[]).await.unwrap_err();
    let db = e.as_db_error().expect("a FATAL from the gateway");
    assert_eq!(db.code().code(), "08006");
    assert!(db.message().contains("no new primary"), "{}", db.message());
    assert!(started.elapsed() < Duration::from_secs(15));
}

/// External promotion with the old primary frozen (a hung host): the orchestrator promotes the
/// standby, and the gateway follows within its probe timeout. The old primary answers no probe,
/// and a connect timeout longer than the test's patience plays no part: neither noticing the
/// silence nor the rounds that look for the new primary wait for it. The open transaction is
/// replayed there and commits once.
#[tokio::test]
async fn external_promotion_past_a_frozen_primary_is_followed() {
    let cluster = Cluster::primary_and_standby().await;
    setup(&cluster, TABLE_T).await;
    let gw = cluster
        .failover_gateway_with(|c| {
            c.failover.promote = understudy::config::Promote::External;
            c.connect_timeout_ms = 2 * PATIENCE.as_millis() as u64;
        })
        .await;
    let c = gw.connect(roles::SCRAM).await;
    c.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let frozen = cluster.freeze_primary(&[]);
    cluster
        .pg
        .standby
        .as_ref()
        .unwrap()
        .promote()
        .await
        .unwrap();

    tokio::time::timeout(PATIENCE, c.batch_execute("INSERT INTO t VALUES (2)"))
        .await
        .expect("the session follows the promoted standby")
        .unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    let port: i32 = c
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(port, i32::from(cluster.pg.standby.as_ref().unwrap().port()));
    let rows = int_column(&c, "SELECT a FROM t ORDER BY a").await;
    assert_eq!(rows, [1, 2]);
    // Woken, the old primary (still one: nobody demoted it) lost the transaction with its
    // client connection.
    drop(frozen);
    assert_eq!(values(&cluster, "t").await, Vec::<i32>::new());
}

/// COPY TO STDOUT interrupted by the failover mid-stream: the client gets every row once, in
/// order, as if nothing happened (the new primary's copy is read past what the client had).
#[tokio::test]
async fn copy_out_in_flight_completes() {
    let (mut cluster, _gw, c) = session_after(
        "CREATE TABLE t(a int PRIMARY KEY, h text); GRANT ALL ON t TO PUBLIC;
         INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 200000) g",
    )
    .await;
    let stream = c
        .copy_out("COPY (SELECT a, h FROM t ORDER BY a) TO STDOUT")
        .await
        .unwrap();
    futures_util::pin_mut!(stream);
    let mut text = Vec::new();
    let mut killed = false;
    while let Some(chunk) = stream.next().await {
        text.extend_from_slice(&chunk.unwrap());
        if !killed && text.len() > 100_000 {
            killed = true;
            cluster.kill_primary().await;
        }
    }
    assert!(killed, "the copy outlasted the kill");
    let lines: Vec<&[u8]> = text
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(lines.len(), 200_000);
    for (i, line) in lines.iter().enumerate() {
        let a: i32 = std::str::from_utf8(line.split(|&b| b == b'\t').next().unwrap())
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(a, i as i32 + 1, "row {i} in order, once");
    }
}

/// An autocommit write whose answer the client was part way through when the primary died is
/// not run again: its answer ends in ERROR 08007 (as an answer may end in an error at any
/// message boundary), nothing of it is applied, and the session goes on.
#[tokio::test]
async fn autocommit_write_seen_in_part_gets_08007() {
    let (mut cluster, _gw, c) =
        session_after("CREATE TABLE t(a int PRIMARY KEY, pad text); GRANT ALL ON t TO PUBLIC")
            .await;
    // The server inserts every row before it sends the first RETURNING row, and commits
    // after the last: 30 MB of them cannot all fit in the socket buffers and the gateway's,
    // so the client has the first rows while the server, blocked sending, has not committed.
    let rows = c
        .query_raw(
            "INSERT INTO t SELECT g, repeat('x', 1000) FROM generate_series(1, 30000) g
             RETURNING a, pad",
            std::iter::empty::<i32>(),
        )
        .await
        .unwrap();
    futures_util::pin_mut!(rows);
    let mut seen = 0;
    let mut killed = false;
    let error = loop {
        match rows.next().await {
            Some(Ok(row)) => {
                seen += 1;
                assert_eq!(row.get::<_, i32>(0), seen);
                if !killed {
                    killed = true;
                    cluster.kill_primary().await;
                }
            }
            Some(Err(e)) => break e,
            None => panic!("the write finished although its primary was killed"),
        }
    };
    assert_eq!(sqlstate(&error), Some("08007"), "{error:?}");
    assert!(seen < 30_000);
    let n: i64 = c
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "the killed write is not applied on the new primary");
}

/// A string ending a transaction (`SELECT …; COMMIT`) whose first result the client was
/// receiving when the primary died: the transaction is replayed, the result continues where
/// the client stopped, and the COMMIT commits the transaction's write once.
#[tokio::test]
async fn commit_string_seen_in_part_completes() {
    let (mut cluster, _gw, c) = session_after(
        "CREATE TABLE t(a int PRIMARY KEY); GRANT ALL ON t TO PUBLIC;
         CREATE TABLE big(a int, pad text); GRANT ALL ON big TO PUBLIC;
         INSERT INTO big SELECT g, repeat('y', 500) FROM generate_series(1, 4000) g",
    )
    .await;
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    let stream = c
        .simple_query_raw(
            // No ORDER BY: a sort would hold every row back until the last was read. The
            // standby's copy of the table is the same pages, so a scan returns the same order.
            "SELECT a, pad FROM big WHERE pg_sleep(0.0005)::text = ''; COMMIT",
        )
        .await
        .unwrap();
    futures_util::pin_mut!(stream);
    let mut rows = Vec::new();
    let mut commands = 0;
    let mut killed = false;
    while let Some(m) = stream.next().await {
        match m.unwrap() {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                rows.push(r.get(0).unwrap().parse::<i32>().unwrap());
                if !killed {
                    killed = true;
                    cluster.kill_primary().await;
                }
            }
            tokio_postgres::SimpleQueryMessage::CommandComplete(_) => commands += 1,
            _ => {}
        }
    }
    assert!(killed);
    assert_eq!(rows, (1..=4000).collect::<Vec<_>>());
    assert_eq!(commands, 2, "the SELECT and the COMMIT complete");
    assert_eq!(
        values(cluster_on_new_primary(&mut cluster).await, "t").await,
        [1]
    );
}

/// The primary dies while a transaction that wrote much is open: the standby received the WAL
/// the primary had flushed, which ends in the middle of a record (only a commit would have
/// flushed the rest), so it never "replays all it received". It is promoted all the same, the
/// transaction is replayed there, and its COMMIT commits every row once.
#[tokio::test]
async fn large_open_write_fails_over() {
    let (mut cluster, _gw, c) =
        session_after("CREATE TABLE t(a int PRIMARY KEY, pad text); GRANT ALL ON t TO PUBLIC")
            .await;
    c.batch_execute(
        "BEGIN; INSERT INTO t SELECT g, repeat('z', 1000) FROM generate_series(1, 20000) g",
    )
    .await
    .unwrap();
    cluster.kill_primary().await;
    c.batch_execute("INSERT INTO t VALUES (0, ''); COMMIT")
        .await
        .unwrap();
    assert_eq!(
        values(cluster_on_new_primary(&mut cluster).await, "t").await,
        (0..=20_000).collect::<Vec<_>>()
    );
}

/// A transaction that only changed session state, its COMMIT in flight when the primary hangs
/// (frozen, so the COMMIT is never answered): whatever the old primary did with it, the new
/// backend has none of it, so the transaction is replayed and committed there. The client gets
/// its COMMIT and keeps the setting, not the 08007 of a transaction that wrote data. One whose
/// COMMIT string also writes (`INSERT …; COMMIT`) is in doubt all the same: 08007, nothing run.
#[tokio::test]
async fn commit_in_flight_of_session_changes_is_replayed() {
    let cluster = Cluster::primary_and_standby().await;
    setup(&cluster, TABLE_T).await;
    let standby_port = i32::from(cluster.pg.standby.as_ref().unwrap().port());
    let gw = cluster.failover_gateway().await;
    let c = gw.connect(roles::SCRAM).await;
    let writer = gw.connect(roles::MD5).await;
    for sql in ["BEGIN", "SET application_name = 'committed'", "SELECT 1"] {
        c.batch_execute(sql).await.unwrap();
        writer.batch_execute(sql).await.unwrap();
    }
    let replayed = prepare_both_ways(&c).await;
    let in_doubt = prepare_both_ways(&writer).await;
    let frozen = cluster.freeze_primary(&[]);
    let (committed, written) = tokio::time::timeout(
        PATIENCE,
        futures_util::future::join(
            c.batch_execute("COMMIT"),
            writer.batch_execute("INSERT INTO t VALUES (1); COMMIT"),
        ),
    )
    .await
    .expect("the COMMITs sent to the frozen primary are answered by the new one");
    committed.expect("the transaction commits on the new primary");
    assert_eq!(sqlstate(&written.unwrap_err()), Some("08007"));
    assert_eq!(
        application_name_and_port(&c).await,
        ("committed".to_owned(), standby_port)
    );
    let rows = c.query("SELECT a FROM t", &[]).await.unwrap();
    assert!(rows.is_empty(), "the in-doubt INSERT was not run again");
    assert_prepared_both_ways(&c, &replayed).await;
    assert_prepared_both_ways(&writer, &in_doubt).await;
    drop(frozen);
}

/// A cursor runs its query as it is fetched: a transaction whose cursor called a function that
/// writes wrote, though none of its statements reads like a write. Its COMMIT in flight when
/// the primary hangs (frozen, never committing it) is in doubt (08007); it was answered
/// `COMMIT` unchecked, as a read-only transaction's is, with the write lost.
#[tokio::test]
async fn a_cursor_over_a_writing_function_makes_its_transaction_a_write() {
    let cluster = Cluster::primary_and_standby().await;
    setup(
        &cluster,
        &format!(
            "{TABLE_T}; CREATE FUNCTION ins(a int) RETURNS int LANGUAGE sql \
             AS $$ INSERT INTO t VALUES (a) RETURNING a $$"
        ),
    )
    .await;
    let gw = cluster.failover_gateway().await;
    let c = gw.connect(roles::SCRAM).await;
    c.batch_execute("BEGIN; DECLARE c CURSOR FOR SELECT ins(1); FETCH ALL c")
        .await
        .unwrap();
    let frozen = cluster.freeze_primary(&[]);
    let committed = tokio::time::timeout(PATIENCE, c.batch_execute("COMMIT"))
        .await
        .expect("answered by the new primary");
    let e = committed.expect_err("the COMMIT of a write the new primary lacks is in doubt");
    assert_eq!(sqlstate(&e), Some("08007"), "{e:?}");
    let rows = c.query("SELECT a FROM t", &[]).await.unwrap();
    assert!(rows.is_empty(), "the frozen primary never committed it");
    drop(frozen);
}

/// A view over a function that inserts, a function of the user's named like a read-only
/// built-in (`public.abs(text)`), and a table whose row-level security policy inserts, for the
/// tests of writes a statement's text does not show.
const HIDDEN_WRITES: &str = "CREATE FUNCTION logged(a int) RETURNS int LANGUAGE sql \
     AS $$ INSERT INTO t VALUES (a) RETURNING a $$; \
     CREATE VIEW vw AS SELECT logged(1) AS one; \
     CREATE VIEW slow_vw AS SELECT logged(3) AS one FROM pg_sleep(1); \
     CREATE FUNCTION public.abs(text) RETURNS int LANGUAGE sql \
     AS $$ INSERT INTO t VALUES (2) RETURNING 2 $$; \
     CREATE FUNCTION audited() RETURNS boolean LANGUAGE sql \
     AS $$ INSERT INTO t VALUES (4) RETURNING true $$; \
     CREATE TABLE guarded (a int); INSERT INTO guarded VALUES (1); \
     ALTER TABLE guarded ENABLE ROW LEVEL SECURITY; \
     CREATE POLICY audit ON guarded USING (audited()); \
     GRANT SELECT ON vw, slow_vw, guarded TO PUBLIC";

/// Writes a statement's text does not show, learned from the catalog at login (see
/// [`HIDDEN_WRITES`]): a transaction that read the view or the guarded table, or called the
/// look-alike, wrote, so its COMMIT in flight when the primary hangs (frozen, never committing
/// it) is in doubt (08007). It was answered `COMMIT` unchecked, as a read-only transaction's
/// is, with the write lost.
#[tokio::test]
async fn a_transaction_that_wrote_through_a_view_or_a_look_alike_is_no_read() {
    let cluster = Cluster::primary_and_standby().await;
    setup(&cluster, &format!("{TABLE_T}; {HIDDEN_WRITES}")).await;
    let gw = cluster.failover_gateway().await;
    let sessions = HiddenWriters::connect(&gw).await;
    sessions.assert_commits_in_doubt(&cluster).await;
}

/// As [`a_transaction_that_wrote_through_a_view_or_a_look_alike_is_no_read`], for objects made
/// directly on the primary after the sessions logged in: the gateway reads the catalog again
/// while they are open (`failover.catalog_refresh_ms`), and each session classifies its next
/// statements knowing them. (A session knew only what its login had found: its COMMITs were
/// answered unchecked and the writes lost.)
#[tokio::test]
async fn hidden_writes_made_after_a_login_are_learned_by_its_session() {
    let (cluster, gw, sessions) = hidden_writers_before_their_objects(100).await;
    setup(&cluster, HIDDEN_WRITES).await;
    await_hidden_writes_learned(&gw).await;
    sessions.assert_commits_in_doubt(&cluster).await;
}

/// A statement prepared while its view only read, executed after the view was replaced by one
/// that writes (directly on the primary), makes its transaction a write: its COMMIT in flight
/// when the primary hangs is in doubt (08007). (The statement kept what its Parse had found:
/// COMMIT answered unchecked, the write lost.)
#[tokio::test]
async fn a_statement_prepared_before_its_view_wrote_writes_once_it_does() {
    let cluster = Cluster::primary_and_standby().await;
    setup(
        &cluster,
        &format!(
            "{TABLE_T}; CREATE FUNCTION logged(a int) RETURNS int LANGUAGE sql \
             AS $$ INSERT INTO t VALUES (a) RETURNING a $$; \
             CREATE VIEW vw AS SELECT 1 AS one; GRANT SELECT ON vw TO PUBLIC"
        ),
    )
    .await;
    let gw = cluster
        .failover_gateway_with(|c| c.failover.catalog_refresh_ms = 100)
        .await;
    let c = gw.connect(roles::SCRAM).await;
    let read = c.prepare("SELECT one FROM vw").await.unwrap();
    setup(
        &cluster,
        "CREATE OR REPLACE VIEW vw AS SELECT logged(1) AS one",
    )
    .await;
    await_suspects(&gw, &["vw"], &[]).await;
    c.batch_execute("BEGIN").await.unwrap();
    let rows = c.query(&read, &[]).await.unwrap();
    assert_eq!(rows[0].get::<_, i32>(0), 1);
    assert_commits_in_doubt(&cluster, &[&c]).await;
}

/// The same for objects made through the gateway, with the periodic reading an hour apart: a
/// session's DDL has the catalog read again at once, for the other sessions.
#[tokio::test]
async fn ddl_through_the_gateway_has_the_catalog_read_again() {
    let (cluster, gw, sessions) = hidden_writers_before_their_objects(3_600_000).await;
    let ddl = gw.connect(roles::SUPERUSER).await;
    ddl.batch_execute(HIDDEN_WRITES).await.unwrap();
    cluster.pg.wait_standby_caught_up().await.unwrap();
    await_hidden_writes_learned(&gw).await;
    sessions.assert_commits_in_doubt(&cluster).await;
}

/// The same for objects made directly on the primary just before it fails, the periodic
/// reading an hour apart: a session that moves with such a read in its transaction reads the
/// new primary's catalog before it judges the COMMIT in flight, and it is in doubt (08007).
/// (The COMMITs were answered unchecked and the writes lost.)
#[tokio::test]
async fn hidden_writes_made_just_before_a_failover_are_learned_by_the_move() {
    let (cluster, gw, sessions) = hidden_writers_before_their_objects(3_600_000).await;
    setup(&cluster, HIDDEN_WRITES).await;
    assert_eq!(
        gw.status().await["catalog"][0]["relations"],
        serde_json::json!([]),
        "not learned before the failover"
    );
    sessions.assert_commits_in_doubt(&cluster).await;
}

/// A primary and standby with [`TABLE_T`], a failover gateway that reads the catalog again
/// every `refresh_ms`, and [`HiddenWriters`] logged in before [`HIDDEN_WRITES`] made anything.
async fn hidden_writers_before_their_objects(
    refresh_ms: u64,
) -> (Cluster, TestGateway, HiddenWriters) {
    let cluster = Cluster::primary_and_standby().await;
    setup(&cluster, TABLE_T).await;
    let gw = cluster
        .failover_gateway_with(|c| c.failover.catalog_refresh_ms = refresh_ms)
        .await;
    let sessions = HiddenWriters::connect(&gw).await;
    (cluster, gw, sessions)
}

/// Waits until `/status` lists [`HIDDEN_WRITES`]'s objects as suspects.
async fn await_hidden_writes_learned(gw: &TestGateway) {
    await_suspects(gw, &["guarded", "slow_vw", "vw"], &["abs"]).await;
}

/// The catalog of a database is read again, on a control connection of its own, only while
/// sessions use that database: the last session's end ends it.
#[tokio::test]
async fn the_catalog_is_read_again_only_while_sessions_use_it() {
    let cluster = Cluster::primary_and_standby().await;
    let gw = cluster
        .failover_gateway_with(|c| c.failover.catalog_refresh_ms = 50)
        .await;
    let (a, b) = (gw.connect(roles::SCRAM).await, gw.connect(roles::MD5).await);
    cluster.wait_backends_named("understudy-catalog", 1).await;
    assert_eq!(gw.status().await["catalog"][0]["refreshed"], true);
    drop(a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(cluster.backends_named("understudy-catalog").await, 1);
    drop(b);
    cluster.wait_backends_named("understudy-catalog", 0).await;
    let status = gw.status().await;
    assert_eq!(status["catalog"][0]["refreshed"], false, "{status:#}");
    let _c = gw.connect(roles::TRUST).await;
    cluster.wait_backends_named("understudy-catalog", 1).await;
    let metrics = gw.admin_get("/metrics").await;
    let questions = metric_series(&metrics, "understudy_catalog_questions_total");
    assert!(
        questions.contains(&("{outcome=\"failed\"}", 0.0))
            && questions
                .iter()
                .any(|&(labels, n)| labels == "{outcome=\"answered\"}" && n >= 2.0),
        "{questions:?}"
    );
}

/// Waits until `/status` lists exactly `relations` and `functions` as a database's suspects.
async fn await_suspects(gw: &TestGateway, relations: &[&str], functions: &[&str]) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let status = gw.status().await;
        let learned = status["catalog"].as_array().is_some_and(|dbs| {
            dbs.iter().any(|db| {
                db["relations"] == serde_json::json!(relations)
                    && db["functions"] == serde_json::json!(functions)
            })
        });
        if learned {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "suspects never learned: {:#}",
            status["catalog"]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sessions whose transactions read [`HIDDEN_WRITES`]'s objects: the view, the look-alike,
/// the guarded table.
struct HiddenWriters {
    view: Client,
    look_alike: Client,
    policy: Client,
}

impl HiddenWriters {
    async fn connect(gw: &TestGateway) -> Self {
        Self {
            view: gw.connect(roles::SCRAM).await,
            look_alike: gw.connect(roles::MD5).await,
            policy: gw.connect(roles::TRUST).await,
        }
    }

    /// Each reads its object in a transaction; its COMMIT, in flight when the primary hangs,
    /// gets 08007, and nothing was written on the new primary.
    async fn assert_commits_in_doubt(self, cluster: &Cluster) {
        let Self {
            view,
            look_alike,
            policy,
        } = self;
        view.batch_execute("BEGIN; SELECT one FROM vw")
            .await
            .unwrap();
        look_alike
            .batch_execute("BEGIN; SELECT abs('5'::text)")
            .await
            .unwrap();
        policy
            .batch_execute("BEGIN; SELECT count(*) FROM guarded")
            .await
            .unwrap();
        assert_commits_in_doubt(cluster, &[&view, &look_alike, &policy]).await;
    }
}

/// Freezes the primary while `sessions` are each in a transaction that wrote unseen (a
/// frozen primary never commits), and checks that each COMMIT, in flight, gets 08007 and
/// that the new primary has nothing of them.
async fn assert_commits_in_doubt(cluster: &Cluster, sessions: &[&Client]) {
    let frozen = cluster.freeze_primary(&[]);
    let commits =
        futures_util::future::join_all(sessions.iter().map(|c| c.batch_execute("COMMIT")));
    let committed = tokio::time::timeout(PATIENCE, commits)
        .await
        .expect("answered by the new primary");
    for commit in committed {
        let e = commit.expect_err("the COMMIT of a write the new primary lacks is in doubt");
        assert_eq!(sqlstate(&e), Some("08007"), "{e:?}");
    }
    let rows = sessions[0].query("SELECT a FROM t", &[]).await.unwrap();
    assert!(rows.is_empty(), "the frozen primary never committed them");
    drop(frozen);
}

/// A read of a view over a function that inserts, in flight outside a transaction when the
/// primary dies, is not run again (08007): the old primary may have committed it. It was run
/// again, which applies its write twice where the old primary had.
#[tokio::test]
async fn a_read_that_writes_through_a_view_is_not_run_again() {
    let (mut cluster, _gw, c) = session_after(&format!("{TABLE_T}; {HIDDEN_WRITES}")).await;
    assert_slow_view_read_in_doubt(&mut cluster, c).await;
}

/// Kills the primary while `c` reads [`HIDDEN_WRITES`]'s slow view outside a transaction, and
/// checks that the read gets 08007 and that the new primary has nothing of it.
async fn assert_slow_view_read_in_doubt(cluster: &mut Cluster, c: Client) {
    let read = kill_primary_during(cluster, Duration::from_millis(400), async move {
        c.simple_query("SELECT one FROM slow_vw").await
    })
    .await;
    assert_gateway_error(&read.unwrap_err(), "08007");
    assert!(
        values(cluster_on_new_primary(cluster).await, "t")
            .await
            .is_empty(),
        "nothing run again"
    );
}

/// As [`a_read_that_writes_through_a_view_is_not_run_again`], for a view made directly on the
/// primary just before it dies, the periodic reading an hour apart: the move learns it from
/// the new primary's catalog. (The read was run again.)
#[tokio::test]
async fn a_read_through_a_view_made_just_before_a_failover_is_not_run_again() {
    let (mut cluster, _gw, sessions) = hidden_writers_before_their_objects(3_600_000).await;
    setup(&cluster, HIDDEN_WRITES).await;
    assert_slow_view_read_in_doubt(&mut cluster, sessions.view).await;
}

/// COMMITs in flight when the primary hangs (frozen) whose answer is no plain `COMMIT`: in a
/// failed transaction the server answers `ROLLBACK` (the replay fails the same way first), and
/// `COMMIT AND CHAIN` opens the next transaction, which the gateway cannot make up for a
/// read-only transaction as it does a plain COMMIT's answer: in doubt, `08007`. Either way the
/// client's next statement does not commit on its own where the client expects a transaction.
#[tokio::test]
async fn commits_in_flight_that_roll_back_or_chain() {
    let cluster = Cluster::primary_and_standby().await;
    setup(&cluster, TABLE_T).await;
    let gw = cluster.failover_gateway().await;
    let status = |msgs: &[Msg]| msgs.last().map(|z| z.body[0] as char);
    let mut failed = RawConn::login(gw.addr(), roles::TRUST).await;
    let mut chained = RawConn::login(gw.addr(), roles::TRUST).await;
    for c in [&mut failed, &mut chained] {
        c.send(&query("BEGIN; SELECT 1")).await;
        assert_eq!(status(&c.read_until(b'Z').await), Some('T'));
    }
    failed.send(&query("SELECT 1/0")).await;
    let error = failed.read_until(b'Z').await;
    assert_eq!(
        (error[0].code(), status(&error)),
        ("22012".into(), Some('E'))
    );
    let frozen = cluster.freeze_primary(&[]);
    failed.send(&query("COMMIT")).await;
    chained.send(&query("COMMIT AND CHAIN")).await;
    let rolled_back = tokio::time::timeout(PATIENCE, failed.read_until(b'Z'))
        .await
        .expect("answered by the new primary");
    assert_eq!(tags(&rolled_back), "CZ", "{rolled_back:?}");
    assert_eq!(rolled_back[0].body, b"ROLLBACK\0");
    assert_eq!(status(&rolled_back), Some('I'));
    let in_doubt = tokio::time::timeout(PATIENCE, chained.read_until(b'Z'))
        .await
        .expect("answered by the new primary");
    assert_eq!(in_doubt[0].code(), "08007", "{in_doubt:?}");
    let after = status(&in_doubt);
    chained.send(&query("INSERT INTO t VALUES (1)")).await;
    let inserted = chained.read_until(b'Z').await;
    assert_eq!(
        (after, status(&inserted)),
        (Some('I'), Some('I')),
        "the client is told no transaction is open: {inserted:?}"
    );
    drop(frozen);
}

/// A commit the client saw that never reached the standby (its WAL sender stuck, replication
/// asynchronous) is lost with the old primary, and the new primary gives its xid out again:
/// here to a client connected to the promoted standby directly, writing as soon as it can.
/// Found committed there, that xid is another transaction's; the gateway must not take it for
/// the session's, and ends the session with 08007 (a lost commit), never carrying on as if
/// the commit were there.
#[tokio::test]
async fn a_lost_commit_is_not_mistaken_for_a_direct_writer_s_with_the_same_xid() {
    let mut cluster = Cluster::primary_and_standby().await;
    setup(&cluster, TABLE_T).await;
    let gw = cluster.failover_gateway().await;
    let (c, c_end) = gw.connect_watched(roles::SCRAM).await;
    let stuck = Frozen::freeze(vec![cluster.wal_sender_pid().await]);
    for sql in ["BEGIN", "INSERT INTO t VALUES (1)", "COMMIT"] {
        c.batch_execute(sql).await.unwrap();
    }
    let standby = cluster.pg.standby.as_ref().unwrap();
    let direct = standby.client("postgres", "postgres").await.unwrap();
    let writer = tokio::spawn(async move {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let recovering: bool = direct
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .unwrap()
                .get(0);
            if !recovering {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never promoted");
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        for a in 100..150 {
            direct
                .execute("INSERT INTO t VALUES ($1)", &[&a])
                .await
                .unwrap();
        }
    });

    cluster.kill_primary().await;
    drop(stuck);

    writer.await.unwrap();
    let db = ending_fatal(&c, c_end).await;
    assert_eq!(db.code().code(), "08007", "{}", db.message());
    let rows = values(cluster_on_new_primary(&mut cluster).await, "t").await;
    assert_eq!(rows, (100..150).collect::<Vec<_>>(), "the commit was lost");
}

/// A COMMIT pipelined behind a write, neither answered when the primary hangs (frozen). A
/// transaction whose xid is known (an earlier write was answered) is looked up: never committed
/// on the new primary, so it is replayed and the client gets both answers. Without an xid the
/// old primary might have run both and committed with the answers lost on the way: the write
/// and the COMMIT get 08007, nothing is run again, and the session goes on.
#[tokio::test]
async fn pipelined_commit_behind_an_unanswered_write() {
    let cluster = Cluster::primary_and_standby().await;
    setup(&cluster, TABLE_T).await;
    let gw = cluster.failover_gateway().await;
    let known = gw.connect(roles::SCRAM).await;
    let unknown = gw.connect(roles::MD5).await;
    known.batch_execute("BEGIN").await.unwrap();
    known
        .batch_execute("INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    unknown.batch_execute("BEGIN").await.unwrap();
    let frozen = cluster.freeze_primary(&[]);
    let ((inserted, committed), (insert_unknown, commit_unknown)) = tokio::time::timeout(
        PATIENCE,
        futures_util::future::join(
            futures_util::future::join(
                known.batch_execute("INSERT INTO t VALUES (2)"),
                known.batch_execute("COMMIT"),
            ),
            futures_util::future::join(
                unknown.batch_execute("INSERT INTO t VALUES (3)"),
                unknown.batch_execute("COMMIT"),
            ),
        ),
    )
    .await
    .expect("the pipelines sent to the frozen primary are answered by the new one");
    inserted.expect("replayed: the transaction never committed there");
    committed.unwrap();
    assert_eq!(sqlstate(&insert_unknown.unwrap_err()), Some("08007"));
    assert_eq!(sqlstate(&commit_unknown.unwrap_err()), Some("08007"));
    let one: i32 = unknown.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    let rows = int_column(&known, "SELECT a FROM t ORDER BY a").await;
    assert_eq!(rows, [1, 2], "the in-doubt INSERT was not run again");
    drop(frozen);
}

/// A primary that stops answering without closing its connections (every process frozen, as
/// on a hung host: the kernel still ACKs, so no socket ever errors) is failed over by the
/// health monitor, and every session leaves it at once: a statement in flight gets its answer
/// from the new primary, an idle session's next query runs there, and the transaction open
/// across it commits there exactly once. The old primary, woken, applied none of it. The
/// role probe finds the silence within `failover.probe_timeout_ms`: a connect timeout longer
/// than the test's patience plays no part.
#[tokio::test]
async fn frozen_primary_fails_over_and_its_sessions_leave_it() {
    let mut cluster = Cluster::primary_and_standby().await;
    let standby_port = i32::from(cluster.pg.standby.as_ref().unwrap().port());
    setup(&cluster, TABLE_T).await;
    let gw = cluster
        .failover_gateway_with(|c| c.connect_timeout_ms = 2 * PATIENCE.as_millis() as u64)
        .await;
    let busy = gw.connect(roles::SCRAM).await;
    let idle = gw.connect(roles::SCRAM).await;
    idle.batch_execute("SET application_name = 'idle across'")
        .await
        .unwrap();
    busy.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    // No wait for the standby to catch up: the idle session's SET wrote no data, so whatever
    // WAL the standby lacks, none of it is a commit that session saw.

    let frozen = cluster.freeze_primary(&[]);

    let in_flight = tokio::time::timeout(PATIENCE, busy.batch_execute("INSERT INTO t VALUES (2)"))
        .await
        .expect("the statement sent to the frozen primary is answered by the new one");
    in_flight.unwrap();
    let row = tokio::time::timeout(
        PATIENCE,
        idle.query_one(
            "SELECT pg_is_in_recovery(), inet_server_port(), current_setting('application_name')",
            &[],
        ),
    )
    .await
    .expect("the idle session's next query runs on the new primary")
    .unwrap();
    assert!(!row.get::<_, bool>(0));
    assert_eq!(row.get::<_, i32>(1), standby_port);
    assert_eq!(row.get::<_, String>(2), "idle across");
    busy.batch_execute("INSERT INTO t VALUES (3); COMMIT")
        .await
        .unwrap();

    // Woken, the old primary finds its client connections gone: the transaction it held
    // rolls back there.
    frozen.thaw();
    let old = cluster
        .pg
        .primary
        .client("postgres", "postgres")
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let open: i64 = old
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
                &[&roles::SCRAM],
            )
            .await
            .unwrap()
            .get(0);
        if open == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the old primary still has the gateway's sessions"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let on_old: i64 = old
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(on_old, 0, "nothing was applied on the fenced primary");
    drop(old);
    cluster.kill_primary().await;
    assert_eq!(
        values(cluster_on_new_primary(&mut cluster).await, "t").await,
        [1, 2, 3]
    );
}

/// After a move the reported parameters are the session's, and what the client was told of
/// them is what the new backend has: `TimeZone` set with SET (which the new backend is given
/// again), `DateStyle` changed inside a function (where the gateway sees no SET, only the
/// server's report), and `IntervalStyle` set locally in the transaction open at the failover
/// (replayed). (The client used to be told the new backend's login values, before the SETs
/// were given back, and the function's change was lost.)
#[tokio::test]
async fn reported_parameters_follow_the_session() {
    let (mut cluster, gw, _c) = session_after(
        "CREATE FUNCTION german() RETURNS void LANGUAGE plpgsql
           AS $$ BEGIN SET DateStyle = 'German, DMY'; END $$",
    )
    .await;
    let mut c = RawConn::login(gw.addr(), roles::TRUST).await;
    let reported = |msgs: &[Msg]| {
        msgs.iter()
            .filter(|m| m.tag == b'S')
            .map(|m| String::from_utf8_lossy(&m.body).replace('\0', " "))
            .collect::<Vec<_>>()
    };
    c.send(&query("SET TimeZone = 'Asia/Tokyo'")).await;
    assert_eq!(
        reported(&c.read_until(b'Z').await),
        ["TimeZone Asia/Tokyo "]
    );
    c.send(&query("SELECT german()")).await;
    assert_eq!(
        reported(&c.read_until(b'Z').await),
        ["DateStyle German, DMY "]
    );
    c.send(&query("BEGIN; SET LOCAL IntervalStyle = 'iso_8601'"))
        .await;
    assert_eq!(
        reported(&c.read_until(b'Z').await),
        ["IntervalStyle iso_8601 "]
    );

    cluster.kill_primary().await;
    let show = "SELECT current_setting('TimeZone'), current_setting('DateStyle'), \
                current_setting('IntervalStyle'), inet_server_port()";
    c.send(&query(show)).await;
    let answer = c.read_until(b'Z').await;
    // Whatever the new backend reported and the gateway passed on must be the session's.
    for line in reported(&answer) {
        assert!(
            [
                "TimeZone Asia/Tokyo ",
                "DateStyle German, DMY ",
                "IntervalStyle iso_8601 "
            ]
            .contains(&line.as_str())
                || !["TimeZone", "DateStyle", "IntervalStyle"]
                    .iter()
                    .any(|p| line.starts_with(p)),
            "the client was told {line:?}: {answer:?}"
        );
    }
    let row = answer.iter().find(|m| m.tag == b'D').expect("a row");
    let text = String::from_utf8_lossy(&row.body);
    assert!(
        text.contains("Asia/Tokyo") && text.contains("German, DMY") && text.contains("iso_8601"),
        "{answer:?}"
    );
    let standby_port = cluster.pg.standby.as_ref().unwrap().port().to_string();
    assert!(text.contains(&standby_port), "moved: {text:?}");
    // The transaction's own setting ends with it, and the server says so.
    c.send(&query("ROLLBACK")).await;
    assert_eq!(
        reported(&c.read_until(b'Z').await),
        ["IntervalStyle postgres "]
    );
}

/// With `failover.settle_in_flight_autocommit`: autocommit extended-protocol writes whose
/// commits are in flight when the primary dies (a deferred trigger holds them up at the
/// commit): each client already has its write's answer but for the ReadyForQuery, and the
/// gateway has the xid (the xid query in front of the Sync ends with a Flush, so the server
/// sends all that before it commits). The new primary lacks
/// both commits, so both batches run there again: the one that answers the same is committed
/// and its client sees its write succeed, once; the one whose answer differs (RETURNING the
/// backend's PID) is rolled back, and its client gets 40001. Both sessions go on. The same for
/// two simple-protocol Queries (sent as batches; the gateway holds their CommandComplete), and
/// a batch that creates a table and writes to it, which runs again whole. (All five got 08007,
/// outcome unknown.)
#[tokio::test]
async fn autocommit_batches_whose_commit_was_cut_short_run_again() {
    let slow = SLOW_COMMIT.replace("NEW.a = 1", "NEW.a IN (1, 2, 5, 6, 10)");
    let (mut cluster, gw, same) = settling_session_after(&format!("{TABLE_T}; {slow}")).await;
    let differs = gw.connect(roles::MD5).await;
    let insert = same
        .prepare("INSERT INTO t VALUES ($1) RETURNING a")
        .await
        .unwrap();
    let insert_pid = differs
        .prepare("INSERT INTO t VALUES ($1) RETURNING pg_backend_pid()")
        .await
        .unwrap();
    let same_write = tokio::spawn(async move {
        let r = same.query(&insert, &[&1]).await;
        (same, r)
    });
    let differing_write = tokio::spawn(async move {
        let r = differs.query(&insert_pid, &[&2]).await;
        (differs, r)
    });
    let query = |c: Client, sql: &'static str| {
        tokio::spawn(async move {
            let r = c.simple_query(sql).await;
            (c, r)
        })
    };
    let same_query = query(
        gw.connect(roles::TRUST).await,
        "INSERT INTO t VALUES (5) RETURNING a",
    );
    let differing_query = query(
        gw.connect(roles::TRUST).await,
        "INSERT INTO t VALUES (6) RETURNING pg_backend_pid()",
    );
    let mut schema = RawConn::login(gw.addr(), roles::TRUST).await;
    schema
        .send(&raw::batch(&[
            "CREATE TABLE made (a int)",
            "INSERT INTO made VALUES (1)",
            "INSERT INTO t VALUES (10)",
        ]))
        .await;
    assert_eq!(tags(&schema.read_until(b'C').await), "12C");
    // All are in their commits, in the trigger's 1.5 s.
    let admin = cluster.superuser().await;
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let sleeping: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if sleeping == 5 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never all in commit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.kill_primary().await;

    let (same, r) = answered(same_write).await;
    let rows = r.expect("run again on the new primary, with the same answer, and committed");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, i32>(0), 1);
    let (differs, r) = answered(differing_write).await;
    let e = r.expect_err("answered otherwise when run again");
    assert_eq!(sqlstate(&e), Some("40001"), "{e:?}");
    same.execute("INSERT INTO t VALUES (3)", &[]).await.unwrap();
    differs
        .execute("INSERT INTO t VALUES (4)", &[])
        .await
        .unwrap();
    let (same, r) = answered(same_query).await;
    let answer = r.expect("run again, with the same answer, and committed");
    assert_eq!(simple_rows(&answer), [["5"]]);
    assert!(
        matches!(answer.last(), Some(SimpleQueryMessage::CommandComplete(1))),
        "{answer:?}"
    );
    let (differs, r) = answered(differing_query).await;
    let e = r.expect_err("answered otherwise when run again");
    assert_eq!(sqlstate(&e), Some("40001"), "{e:?}");
    same.batch_execute("INSERT INTO t VALUES (7)")
        .await
        .unwrap();
    differs
        .batch_execute("INSERT INTO t VALUES (8)")
        .await
        .unwrap();
    let answer = schema.read_until(b'Z').await;
    assert_eq!(
        tags(&answer),
        "12C12CZ",
        "run again and committed: {answer:?}"
    );
    schema
        .send(&raw::query("INSERT INTO made VALUES (2)"))
        .await;
    assert_eq!(tags(&schema.read_until(b'Z').await), "CZ");
    let new_primary = cluster_on_new_primary(&mut cluster).await;
    assert_eq!(values(new_primary, "made").await, [1, 2]);
    assert_eq!(values(new_primary, "t").await, [1, 3, 4, 5, 7, 8, 10]);
}

/// With `failover.settle_in_flight_autocommit`: an autocommit extended-protocol write that
/// committed on the old primary, and reached the standby, but was never answered (the primary waits for a synchronous standby that does not
/// exist): the client has its answer but for the ReadyForQuery, the gateway has its xid, finds
/// it committed on the new primary, and gives the client its ReadyForQuery. Nothing runs
/// again. The same for a simple-protocol Query sent as a batch: the client gets the
/// CommandComplete the gateway held too. (Both got 08007.)
#[tokio::test]
async fn an_autocommit_batch_committed_unanswered_is_answered() {
    let (mut cluster, gw, c) =
        settling_session_after(&format!("{TABLE_T}; CREATE TABLE sync_probe(a int)")).await;
    let insert = c
        .prepare("INSERT INTO t VALUES ($1) RETURNING a * 10")
        .await
        .unwrap();
    let simple = gw.connect(roles::TRUST).await;
    make_commits_wait(&cluster).await;
    let write = tokio::spawn(async move {
        let r = c.query(&insert, &[&7]).await;
        (c, r)
    });
    let query = tokio::spawn(async move {
        let r = simple.simple_query("INSERT INTO t VALUES (9)").await;
        (simple, r)
    });
    wait_until_streamed(&cluster, 2).await;
    assert!(
        !write.is_finished() && !query.is_finished(),
        "the commits wait for their standby"
    );
    cluster.kill_primary().await;
    let (c, r) = answered(write).await;
    let rows = r.expect("committed there");
    assert_eq!(rows[0].get::<_, i32>(0), 70);
    c.execute("INSERT INTO t VALUES (8)", &[]).await.unwrap();
    let (_simple, r) = answered(query).await;
    let answer = r.expect("committed there");
    assert!(
        matches!(answer[..], [SimpleQueryMessage::CommandComplete(1)]),
        "{answer:?}"
    );
    assert_eq!(
        values(cluster_on_new_primary(&mut cluster).await, "t").await,
        [7, 8, 9]
    );
}
