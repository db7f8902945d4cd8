//! Soak: a ledger of transfers written by several clients, each on one connection through the
//! gateway for the whole run, across several consecutive failovers (the harness seeds a new
//! standby from each new primary). Money is neither created nor destroyed, every transfer a
//! client saw commit is there exactly once, nothing a client saw fail is there, and the only
//! errors clients get are the two the gateway promises (40001, 08007).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::{Client, SimpleQueryMessage};
use understudy_integration_tests::{
    metric_series, metric_total, roles, sqlstate, Cluster, TestGateway, PATIENCE,
};

const ACCOUNTS: i32 = 10;
const INITIAL_BALANCE: i64 = 1_000;
/// One client per role, so that every kind of kept credential logs in again after each
/// failover, and both ways drivers send statements.
const CLIENTS: [(&str, Style); 4] = [
    (roles::SCRAM, Style::Prepared),
    (roles::MD5, Style::Simple),
    (roles::CLEARTEXT, Style::Prepared),
    (roles::TRUST, Style::Simple),
];
const FAILOVERS: usize = 3;
/// Traffic before each kill, and after the last failover.
const BETWEEN_KILLS: Duration = Duration::from_millis(1_500);
/// Transfers per client that the clients together must acknowledge after a failover before
/// the next kill: proof that the sessions carried on.
const PROGRESS_AFTER_FAILOVER: usize = 5;

/// What one client saw.
#[derive(Debug, Default)]
struct ClientLog {
    /// Transfers whose COMMIT returned success.
    acknowledged: Vec<String>,
    /// Transfers whose COMMIT got 08007: they may or may not exist.
    in_doubt: Vec<String>,
    /// Transfers the client saw fail (any other error): they must not exist.
    failed: Vec<String>,
    /// Errors by SQLSTATE (`"none"` for an error without one).
    errors: BTreeMap<String, usize>,
    /// Set if the connection ended: sessions must survive every failover.
    connection_lost: Option<String>,
}

/// How a client sends its statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    /// Extended protocol: statements prepared once, then Bind/Execute with parameters (what
    /// drivers with a statement cache send).
    Prepared,
    /// Simple Query messages with the values written in.
    Simple,
}

/// Where in a transfer an error came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Body,
    Commit,
}

/// Runs transfers on `client` until `stop`; transfer ids are `c{index}-{n}`.
async fn run_client(
    client: Client,
    index: usize,
    style: Style,
    stop: Arc<AtomicBool>,
    acknowledged_total: Arc<AtomicUsize>,
) -> (Client, ClientLog) {
    let mut log = ClientLog::default();
    let mut rng = StdRng::seed_from_u64(0x5eed + index as u64);
    let adjust = client
        .prepare("UPDATE accounts SET balance = balance + $2 WHERE id = $1")
        .await
        .expect("prepare UPDATE");
    let record = client
        .prepare("INSERT INTO transfers (id, from_acc, to_acc, amount) VALUES ($1, $2, $3, $4)")
        .await
        .expect("prepare INSERT");
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let id = format!("c{index}-{n}");
        let from = rng.gen_range(1..=ACCOUNTS);
        let to = (from + rng.gen_range(1..ACCOUNTS) - 1) % ACCOUNTS + 1;
        let amount: i64 = rng.gen_range(1..=50);
        // Rows are locked in id order, so concurrent transfers (and their replays on a new
        // primary) never deadlock: 40P01 is not an error the gateway causes.
        let mut legs = [(from, -amount), (to, amount)];
        legs.sort_by_key(|(account, _)| *account);
        let transfer = async {
            client
                .batch_execute("BEGIN")
                .await
                .map_err(|e| (Stage::Body, e))?;
            for (account, delta) in legs {
                let updated = match style {
                    Style::Prepared => client.execute(&adjust, &[&account, &delta]).await,
                    Style::Simple => {
                        let sql = format!(
                            "UPDATE accounts SET balance = balance + {delta} WHERE id = {account}"
                        );
                        client.simple_query(&sql).await.map(|messages| {
                            messages
                                .iter()
                                .find_map(|m| match m {
                                    SimpleQueryMessage::CommandComplete(n) => Some(*n),
                                    _ => None,
                                })
                                .unwrap_or(0)
                        })
                    }
                }
                .map_err(|e| (Stage::Body, e))?;
                assert_eq!(updated, 1, "{id}: account {account} updated once");
            }
            match style {
                Style::Prepared => client
                    .execute(&record, &[&id, &from, &to, &amount])
                    .await
                    .map(drop),
                Style::Simple => {
                    client
                        .batch_execute(&format!(
                            "INSERT INTO transfers (id, from_acc, to_acc, amount) \
                             VALUES ('{id}', {from}, {to}, {amount})"
                        ))
                        .await
                }
            }
            .map_err(|e| (Stage::Body, e))?;
            client
                .batch_execute("COMMIT")
                .await
                .map_err(|e| (Stage::Commit, e))
        };
        match transfer.await {
            Ok(()) => {
                log.acknowledged.push(id);
                acknowledged_total.fetch_add(1, Ordering::Relaxed);
            }
            Err((stage, e)) => {
                let code = sqlstate(&e).unwrap_or("none").to_owned();
                *log.errors.entry(code.clone()).or_default() += 1;
                let fatal = e
                    .as_db_error()
                    .is_some_and(|d| d.severity().eq_ignore_ascii_case("FATAL"));
                if e.is_closed() || fatal || client.is_closed() {
                    log.failed.push(id);
                    log.connection_lost = Some(format!("transfer c{index}-{n}: {e:?}"));
                    break;
                }
                if stage == Stage::Commit && code == "08007" {
                    log.in_doubt.push(id);
                } else {
                    log.failed.push(id);
                }
                // In an aborted transaction (40001) this ends it; after an in-doubt COMMIT
                // there is none, and the warning is of no interest.
                let _ = client.batch_execute("ROLLBACK").await;
            }
        }
    }
    (client, log)
}

/// Waits until the standby the cluster knows has been promoted (by the gateway).
async fn wait_promoted(cluster: &Cluster) {
    let standby = cluster
        .pg
        .standby
        .as_ref()
        .expect("the cluster has a standby");
    let deadline = Instant::now() + PATIENCE;
    while standby.is_in_recovery().await.unwrap_or(true) {
        assert!(Instant::now() < deadline, "the gateway promoted no standby");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the gateway routes to the cluster's primary and has adopted the new standby
/// (unfenced), so that the next failover has somewhere to go.
async fn wait_gateway_follows(gw: &TestGateway, cluster: &Cluster) {
    let topology = &gw.handle.shared().topology;
    let primary_port = cluster.pg.primary.port();
    let standby_port = cluster.pg.standby.as_ref().expect("standby").port();
    let standby = topology
        .backends()
        .iter()
        .find(|b| b.port == standby_port)
        .expect("the new standby is on a configured port")
        .clone();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let routed = topology.current_primary().map(|b| b.port);
        if routed == Some(primary_port) && !topology.is_fenced(&standby) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "gateway routes to {routed:?} (want {primary_port}); standby {standby} fenced: {}",
            topology.is_fenced(&standby)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the clients together acknowledged `more` transfers past `from`.
async fn wait_progress(total: &AtomicUsize, from: usize, more: usize) {
    let deadline = Instant::now() + PATIENCE;
    while total.load(Ordering::Relaxed) < from + more {
        assert!(
            Instant::now() < deadline,
            "clients made no progress after the failover ({} acknowledged, want {})",
            total.load(Ordering::Relaxed),
            from + more
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Four clients transfer money between ten accounts, each over one gateway connection that
/// lives through three SIGKILLs of the primary (a new standby is seeded after each); two send
/// prepared statements (Bind/Execute), two simple Query messages. The cluster replicates
/// synchronously: with asynchronous replication a commit acknowledged in
/// the last instant before a kill may be lost with the old primary, and the gateway rightly
/// ends that session with 08007 — a different test (`replication.rs`). Here every
/// acknowledged commit is on the standby before the client hears of it, so the invariants
/// must hold exactly: the total is unchanged, each account's balance is what its transfers
/// say, every acknowledged transfer exists once, none the client saw fail exists, and every
/// client error is 40001 or 08007.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_survives_consecutive_failovers() {
    let started = Instant::now();
    let mut cluster = Cluster::build(|o| o.synchronous = true).await;
    cluster
        .superuser()
        .await
        .batch_execute(&format!(
            "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);
             INSERT INTO accounts SELECT i, {INITIAL_BALANCE} FROM generate_series(1, {ACCOUNTS}) i;
             CREATE TABLE transfers (id text PRIMARY KEY, from_acc int NOT NULL,
                                     to_acc int NOT NULL, amount bigint NOT NULL);
             GRANT ALL ON accounts, transfers TO PUBLIC;"
        ))
        .await
        .unwrap();
    cluster.pg.wait_standby_caught_up().await.unwrap();
    let gw = cluster.failover_gateway().await;
    let metrics_before = gw.admin_get("/metrics").await;

    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for (index, (role, style)) in CLIENTS.iter().enumerate() {
        let client = gw.connect(role).await;
        clients.push(tokio::spawn(run_client(
            client,
            index,
            *style,
            stop.clone(),
            acknowledged.clone(),
        )));
    }

    let mut failover_times = Vec::new();
    for round in 1..=FAILOVERS {
        tokio::time::sleep(BETWEEN_KILLS).await;
        // Synchronous replication already guarantees it for commits; this also covers the
        // commits acknowledged before `reseed` turned synchronous replication back on.
        cluster.pg.wait_standby_caught_up().await.unwrap();
        let killed_at = Instant::now();
        cluster.kill_primary().await;
        wait_promoted(&cluster).await;
        let promoted = killed_at.elapsed();
        let before_reseed = acknowledged.load(Ordering::Relaxed);
        cluster.reseed().await;
        wait_gateway_follows(&gw, &cluster).await;
        wait_progress(
            &acknowledged,
            before_reseed,
            PROGRESS_AFTER_FAILOVER * CLIENTS.len(),
        )
        .await;
        println!(
            "failover {round}: promoted after {promoted:?}, new standby adopted and clients \
             moving after {:?}",
            killed_at.elapsed()
        );
        failover_times.push(promoted);
    }
    tokio::time::sleep(BETWEEN_KILLS).await;
    stop.store(true, Ordering::Relaxed);

    let mut logs = Vec::new();
    for handle in clients {
        let (client, log) = tokio::time::timeout(PATIENCE, handle)
            .await
            .expect("clients stop")
            .expect("client task");
        if log.connection_lost.is_none() {
            let row = client
                .query_one("SELECT inet_server_port(), pg_is_in_recovery()", &[])
                .await
                .expect("the session is alive after every failover");
            assert_eq!(
                row.get::<_, i32>(0),
                i32::from(cluster.pg.primary.port()),
                "the session is on the last primary"
            );
            assert!(!row.get::<_, bool>(1));
        }
        logs.push(log);
    }

    // What the clients saw.
    let lost: Vec<&String> = logs
        .iter()
        .filter_map(|l| l.connection_lost.as_ref())
        .collect();
    let mut errors: BTreeMap<&str, usize> = BTreeMap::new();
    for log in &logs {
        for (code, n) in &log.errors {
            *errors.entry(code).or_default() += n;
        }
    }
    let acknowledged: Vec<&String> = logs.iter().flat_map(|l| &l.acknowledged).collect();
    let in_doubt: HashSet<&String> = logs.iter().flat_map(|l| &l.in_doubt).collect();
    let failed: HashSet<&String> = logs.iter().flat_map(|l| &l.failed).collect();

    // What the last primary has.
    let su = cluster.superuser().await;
    let total: i64 = su
        .query_one("SELECT sum(balance)::bigint FROM accounts", &[])
        .await
        .unwrap()
        .get(0);
    let rows = su
        .query("SELECT id, from_acc, to_acc, amount FROM transfers", &[])
        .await
        .unwrap();
    let mut stored: HashMap<String, usize> = HashMap::new();
    let mut expected_balance: HashMap<i32, i64> =
        (1..=ACCOUNTS).map(|a| (a, INITIAL_BALANCE)).collect();
    for row in &rows {
        *stored.entry(row.get(0)).or_default() += 1;
        let amount: i64 = row.get(3);
        *expected_balance.entry(row.get(1)).or_default() -= amount;
        *expected_balance.entry(row.get(2)).or_default() += amount;
    }
    let balances: HashMap<i32, i64> = su
        .query("SELECT id, balance FROM accounts", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let in_doubt_committed = in_doubt
        .iter()
        .filter(|id| stored.contains_key(id.as_str()))
        .count();

    let metrics = gw.admin_get("/metrics").await;
    let failovers = metric_total(&metrics, "understudy_failovers_total")
        - metric_total(&metrics_before, "understudy_failovers_total");
    println!(
        "--- soak: {FAILOVERS} kills of the primary, {} clients ---",
        CLIENTS.len()
    );
    for (index, log) in logs.iter().enumerate() {
        println!(
            "client {index} ({}, {:?}): {} acknowledged, {} in doubt, {} failed, errors {:?}",
            CLIENTS[index].0,
            CLIENTS[index].1,
            log.acknowledged.len(),
            log.in_doubt.len(),
            log.failed.len(),
            log.errors
        );
    }
    println!(
        "transfers acknowledged: {}; in doubt (08007 on COMMIT): {} ({} of them committed); \
         failed: {}; rows in transfers: {}",
        acknowledged.len(),
        in_doubt.len(),
        in_doubt_committed,
        failed.len(),
        rows.len()
    );
    println!("client errors by SQLSTATE: {errors:?}");
    println!("failovers (understudy_failovers_total): {failovers}");
    for name in [
        "understudy_session_moves_total",
        "understudy_replays_total",
        "understudy_in_doubt_commits_total",
        "understudy_lost_commits_total",
    ] {
        println!("{name}: {:?}", metric_series(&metrics, name));
    }
    println!(
        "promotion times: {failover_times:?}; total sum(balance) = {total}; runtime {:?}",
        started.elapsed()
    );

    assert!(lost.is_empty(), "sessions ended: {lost:?}");
    assert_eq!(
        total,
        i64::from(ACCOUNTS) * INITIAL_BALANCE,
        "money was created or destroyed"
    );
    assert_eq!(
        balances, expected_balance,
        "every account's balance is what its stored transfers say"
    );
    let acknowledged_set: HashSet<&String> = acknowledged.iter().copied().collect();
    assert_eq!(
        acknowledged_set.len(),
        acknowledged.len(),
        "a transfer id was acknowledged twice"
    );
    let mut missing: Vec<&String> = acknowledged
        .iter()
        .copied()
        .filter(|id| stored.get(id.as_str()) != Some(&1))
        .collect();
    missing.sort();
    assert!(
        missing.is_empty(),
        "acknowledged transfers missing on the last primary (ids are c<client>-<n>; see the \
         client styles above): {missing:?}"
    );
    let mut unexpected: Vec<(&String, bool)> = stored
        .keys()
        .filter(|id| !acknowledged_set.contains(id) && !in_doubt.contains(id))
        .map(|id| (id, failed.contains(id)))
        .collect();
    unexpected.sort();
    assert!(
        unexpected.is_empty(),
        "transfers that exist though their client never saw them commit or go in doubt \
         (id, seen failing): {unexpected:?}"
    );
    for code in errors.keys() {
        assert!(
            ["40001", "08007"].contains(code),
            "client error {code} is neither 40001 nor 08007: {errors:?}"
        );
    }
    assert_eq!(
        failovers, FAILOVERS as f64,
        "one failover per kill (understudy_failovers_total)"
    );
}
