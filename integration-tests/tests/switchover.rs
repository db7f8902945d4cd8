//! Planned switchovers: a fast shutdown of the primary, and pausing the gateway (`POST /pause`,
//! `POST /resume`) first, which holds sessions at their next transaction boundary, nothing in
//! flight, so that the switchover costs the clients a wait and no error.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;
use understudy_integration_tests::{
    application_name_and_port, autocommit_writer, backend_pid, backend_status, int_column, roles,
    Cluster, TestGateway, PATIENCE,
};

const TABLE_T: &str = "CREATE TABLE t(a int PRIMARY KEY); GRANT ALL ON t TO PUBLIC";

/// Creates table `t` on the primary, open to every role.
async fn create_t(cluster: &Cluster) {
    cluster
        .superuser()
        .await
        .batch_execute(TABLE_T)
        .await
        .unwrap();
}

/// `POST /pause` with `timeout_ms`, run in a task: (HTTP status, answer).
fn pause(admin: SocketAddr, timeout_ms: u64) -> tokio::task::JoinHandle<(u16, serde_json::Value)> {
    tokio::spawn(async move {
        let (status, body) =
            understudy::ctl::post(admin, &format!("/pause?timeout_ms={timeout_ms}"))
                .await
                .expect("POST /pause");
        (
            status,
            serde_json::from_str(&body).expect("pause answer JSON"),
        )
    })
}

/// Whether `/status` says the session whose backend PID is `pid` is held (asked of the
/// gateway only: a query on a held session would wait for the resume).
async fn held(gw: &TestGateway, pid: i32) -> bool {
    gw.session_status_by_pid(pid).await["held"] == true
}

/// Runs `SELECT count(*) FROM t` on `client` in a task.
fn count_rows(client: &Arc<Client>) -> tokio::task::JoinHandle<i64> {
    let client = client.clone();
    tokio::spawn(async move {
        client
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap()
            .get(0)
    })
}

/// A primary with table `t`, a gateway, an idle session and one with a transaction open that
/// inserted 1.
async fn idle_and_busy() -> (Cluster, TestGateway, Arc<Client>, Arc<Client>) {
    let cluster = Cluster::primary_only().await;
    create_t(&cluster).await;
    let gw = cluster.gateway().await;
    let idle = Arc::new(gw.connect(roles::TRUST).await);
    let busy = Arc::new(gw.connect(roles::SCRAM).await);
    busy.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    (cluster, gw, idle, busy)
}

/// A pause waits for the open transaction to end (and lets it end), then holds every session:
/// a statement sent meanwhile is answered only after `POST /resume`. `/status` says who is
/// held, and that the gateway is paused.
#[tokio::test]
async fn a_pause_holds_sessions_at_transaction_boundaries() {
    let (_cluster, gw, idle, busy) = idle_and_busy().await;
    let (idle_pid, busy_pid) = (backend_pid(&idle).await, backend_pid(&busy).await);

    let pausing = pause(gw.admin(), 20_000);
    let deadline = std::time::Instant::now() + PATIENCE;
    while !held(&gw, idle_pid).await {
        assert!(
            std::time::Instant::now() < deadline,
            "idle session never held"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !held(&gw, busy_pid).await,
        "a session in a transaction runs on"
    );
    assert!(
        !pausing.is_finished(),
        "the pause waits for the transaction"
    );
    assert_eq!(gw.status().await["paused"], true);
    tokio::time::timeout(
        PATIENCE,
        busy.batch_execute("INSERT INTO t VALUES (2); COMMIT"),
    )
    .await
    .expect("the transaction is let end")
    .unwrap();
    let (status, answer) = tokio::time::timeout(PATIENCE, pausing)
        .await
        .expect("the pause answers")
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["paused"], true, "{answer}");
    assert_eq!(answer["held"], 2, "{answer}");

    let waiting = [count_rows(&idle), count_rows(&busy)];
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        waiting.iter().all(|w| !w.is_finished()),
        "held sessions' statements wait"
    );
    let (status, body) = gw.admin_post("/resume").await;
    assert_eq!(
        (status, body.contains("\"was_paused\": true")),
        (200, true),
        "{body}"
    );
    for (which, w) in ["idle", "busy"].into_iter().zip(waiting) {
        match tokio::time::timeout(PATIENCE, w).await {
            Ok(count) => assert_eq!(count.unwrap(), 2),
            Err(_) => panic!(
                "the {which} session was not let go after the resume: {:#}",
                gw.status().await
            ),
        }
    }
    assert_eq!(gw.status().await["paused"], false);
    assert!(!held(&gw, idle_pid).await);
}

/// A pause that a transaction outlasts gives up: 503 naming the busy session, and the gateway
/// runs on unpaused (the sessions it held meanwhile are let go).
#[tokio::test]
async fn a_pause_a_transaction_outlasts_is_lifted() {
    let (_cluster, gw, idle, busy) = idle_and_busy().await;
    let busy_id = gw.session_status(&busy).await["id"].clone();

    let (status, answer) = pause(gw.admin(), 300).await.unwrap();
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["paused"], false, "{answer}");
    assert_eq!(
        answer["busy_sessions"],
        serde_json::json!([busy_id]),
        "{answer}"
    );
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("resumed")),
        "{answer}"
    );
    assert_eq!(gw.status().await["paused"], false);
    let count = tokio::time::timeout(PATIENCE, count_rows(&idle))
        .await
        .expect("not held after the pause gave up")
        .unwrap();
    assert_eq!(count, 0);
    busy.batch_execute("COMMIT").await.unwrap();

    let (status, body) = gw.admin_post("/pause?timeout_ms=soon").await;
    assert_eq!(status, 400, "{body}");
}

/// A primary and standby with table `t`, a failover gateway, and a session through it that set
/// its `application_name` to `kept`.
async fn kept_setting_session() -> (Cluster, TestGateway, Client) {
    let cluster = Cluster::primary_and_standby().await;
    create_t(&cluster).await;
    cluster.pg.wait_standby_caught_up().await.unwrap();
    let gw = cluster.failover_gateway().await;
    let idle = gw.connect(roles::SCRAM).await;
    idle.batch_execute("SET application_name = 'kept'")
        .await
        .unwrap();
    (cluster, gw, idle)
}

/// A switchover under a pause: sessions held with nothing in flight, the primary stopped (fast
/// shutdown), the standby promoted by the gateway, the pause lifted. A client writing in
/// autocommit all along sees no error at all (compare
/// `a_fast_shutdown_of_the_primary_is_a_switchover`, where a write caught in flight may get
/// `08007`), an idle session keeps its settings, and every write is on the new primary once.
#[tokio::test]
async fn a_switchover_under_a_pause_costs_no_error() {
    let (mut cluster, gw, idle) = kept_setting_session().await;
    let (stop, writes) = autocommit_writer(gw.connect(roles::TRUST).await, 1);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (status, answer) = pause(gw.admin(), 10_000).await.unwrap();
    assert_eq!(status, 200, "{answer}");
    cluster.pg.primary.stop().await.unwrap();
    let standby = cluster.pg.standby.as_ref().unwrap().addr().to_string();
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let status = gw.status().await;
        if backend_status(&status, &standby)["routed"] == true {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{status:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = gw.admin_post("/resume").await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.send(true).unwrap();
    let (acked, failed) = writes.await.unwrap();

    assert!(failed.is_empty(), "{failed:?}");
    let standby = cluster.pg.standby.as_ref().unwrap().port();
    assert_eq!(
        application_name_and_port(&idle).await,
        ("kept".to_owned(), i32::from(standby))
    );
    assert!(acked.len() > 10, "only {} writes", acked.len());
    assert_eq!(int_column(&idle, "SELECT a FROM t ORDER BY a").await, acked);
}

/// A planned switchover: the primary stopped with a fast shutdown (`pg_ctl stop -m fast`: every
/// backend ends with FATAL 57P01, and the standby is sent all the WAL before the server exits),
/// and the gateway promotes the standby. An idle session carries its settings over, a
/// transaction open across the shutdown is replayed and commits, and every write acknowledged
/// before the shutdown is on the new primary once. A client writing in autocommit all along sees
/// at most `08007` for a write the shutdown caught in flight (the server may end a backend with
/// a FATAL after its commit), and every write it saw succeed is there once.
#[tokio::test]
async fn a_fast_shutdown_of_the_primary_is_a_switchover() {
    let (mut cluster, gw, idle) = kept_setting_session().await;
    let open = gw.connect(roles::MD5).await;
    open.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let insert = idle.prepare("INSERT INTO t VALUES ($1)").await.unwrap();
    for a in 100..300 {
        idle.execute(&insert, &[&a]).await.unwrap();
    }
    let (stop, writes) = autocommit_writer(gw.connect(roles::TRUST).await, 1000);
    tokio::time::sleep(Duration::from_millis(100)).await;

    cluster.pg.primary.stop().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(true).unwrap();
    let (acked, failed) = writes.await.unwrap();
    assert!(
        failed
            .iter()
            .all(|(_, code)| code.as_deref() == Some("08007")),
        "{failed:?}"
    );
    assert!(
        failed.len() <= 1,
        "one write at most was in flight: {failed:?}"
    );

    open.batch_execute("INSERT INTO t VALUES (2); COMMIT")
        .await
        .unwrap();
    idle.execute(&insert, &[&300]).await.unwrap();
    let standby = cluster.pg.standby.as_ref().unwrap().port();
    assert_eq!(
        application_name_and_port(&idle).await,
        ("kept".to_owned(), i32::from(standby))
    );
    let mut expected = vec![1, 2];
    expected.extend(100..=300);
    expected.extend(&acked);
    let mut present = int_column(&idle, "SELECT a FROM t ORDER BY a").await;
    // A write answered 08007 may or may not have been applied.
    present.retain(|a| !failed.iter().any(|(f, _)| f == a));
    assert_eq!(present, expected);
}
