//! With several backends the gateway routes every session to the one not in recovery, and
//! follows a promotion; the admin listener reports backends, sessions and metrics.

use std::time::Duration;

use understudy_integration_tests::{roles, sqlstate, Cluster, PATIENCE};

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
    assert_eq!(session["backend"], primary);
    c.batch_execute("COMMIT").await.unwrap();

    // Metrics count what went through.
    let e = c.batch_execute("SELECT * FROM nowhere").await.unwrap_err();
    assert_eq!(sqlstate(&e), Some("42P01"));
    let metrics = gw.admin_get("/metrics").await;
    let value = |prefix: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(value("understudy_sessions_total") >= 1.0, "{metrics}");
    assert!(value("understudy_queries_total") >= 3.0);
    assert!(value("understudy_transactions_total") >= 1.0);
    assert!(value("understudy_client_bytes_total") > 0.0);
    assert!(value("understudy_backend_bytes_total") > 0.0);
    assert!(value("understudy_sessions_open") >= 1.0);
    assert!(metrics.contains("sqlstate=\"42P01\""), "{metrics}");
    assert!(metrics.contains("understudy_backend_connect_seconds"));
    let missing = understudy::ctl::get(gw.admin(), "/nope").await.unwrap_err();
    assert!(missing.to_string().contains("404"), "{missing}");
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
}
