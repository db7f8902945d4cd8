//! Failover under both replication modes. Synchronous: nothing a client saw commit can be lost,
//! so every session carries on, and a write whose answer was lost is resolved (or reported
//! 08007), never invented nor applied twice. Asynchronous: a commit the client saw succeed can
//! be lost with the old primary; the gateway must say so (08007, FATAL) instead of carrying on
//! as if it had not happened. The standby's WAL receiver is frozen with SIGSTOP to choose
//! exactly which WAL the standby gets. And the standby as a witness: a primary it still hears
//! is never promoted away from, however idle.

use std::time::{Duration, Instant};

use tokio_postgres::{Client, SimpleQueryMessage};
use understudy_integration_tests::raw::{self, tags, RawConn};
use understudy_integration_tests::{
    fatal_of, int_column, metric_total, roles, simple_rows, sqlstate, Cluster, ConnectionEnd,
    Frozen, TestGateway, PATIENCE, SLOW_COMMIT,
};

async fn setup(cluster: &Cluster, sql: &str) {
    cluster.superuser().await.batch_execute(sql).await.unwrap();
    cluster.pg.wait_standby_caught_up().await.unwrap();
}

async fn values(client: &Client) -> Vec<i32> {
    int_column(client, "SELECT a FROM t ORDER BY a").await
}

async fn server_port(client: &Client) -> u16 {
    let port: i32 = client
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    u16::try_from(port).expect("a TCP port")
}

/// The cluster as seen after the gateway's failover: the promoted standby is `primary`.
async fn cluster_on_new_primary(cluster: &mut Cluster) -> &Cluster {
    if cluster.pg.primary.is_in_recovery().await.is_err() {
        cluster.reseed().await;
    }
    cluster
}

/// The standby's WAL receiver, frozen: what the primary writes from now on waits in the
/// receiver's socket. With asynchronous replication commits are acknowledged to clients
/// meanwhile; with synchronous replication they wait.
struct WalGap {
    receiver: Frozen,
    /// Superuser connection straight to the standby.
    on_standby: Client,
    standby_port: u16,
}

impl WalGap {
    async fn open(cluster: &Cluster) -> Self {
        cluster.pg.wait_standby_caught_up().await.unwrap();
        let standby = cluster.pg.standby.as_ref().unwrap();
        let on_standby = standby.client(roles::SUPERUSER, "postgres").await.unwrap();
        let pid: i32 = on_standby
            .query_one("SELECT pid FROM pg_stat_wal_receiver", &[])
            .await
            .unwrap()
            .get(0);
        Self {
            receiver: Frozen::freeze(vec![pid.unsigned_abs()]),
            on_standby,
            standby_port: standby.port(),
        }
    }

    /// Opens the gap, then commits `100` into `t` straight on the primary: a commit the standby
    /// will not have, which the primary's WAL positions from then on count.
    async fn open_past_a_direct_commit(cluster: &Cluster) -> Self {
        let gap = Self::open(cluster).await;
        cluster
            .superuser()
            .await
            .batch_execute("INSERT INTO t VALUES (100)")
            .await
            .unwrap();
        gap
    }

    /// Continues the receiver at once (after the primary was killed, before the gateway can
    /// promote): it reads and applies the WAL waiting in its socket, so nothing is lost.
    fn close_now(self) {
        self.receiver.thaw();
    }

    /// After the primary was killed: waits until the gateway's `pg_promote()` on the standby
    /// (once the receiver has been silent past its ping and `standby_silence_ms`) has told the
    /// receiver to stop (its shared state reads `stopping`, set just before the SIGTERM; the
    /// frozen receiver cannot change it itself), then continues the receiver. It exits on the
    /// pending SIGTERM without reading the WAL waiting in its socket; continued any earlier, it
    /// would read and apply that WAL and nothing would be lost (tried: the row is then on the
    /// new primary).
    async fn close_after_promotion_began(self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let stopping: i64 = self
                .on_standby
                .query_one(
                    "SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'stopping'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if stopping > 0 {
                // The SIGTERM follows the state change at once.
                tokio::time::sleep(Duration::from_millis(50)).await;
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the gateway never called pg_promote()"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.receiver.thaw();
    }
}

/// Runs `sql` on `client` in a task (sent at once; answered when the gateway is done with the
/// failover).
fn spawn_statement(
    client: Client,
    sql: &'static str,
) -> tokio::task::JoinHandle<(Client, Result<(), tokio_postgres::Error>)> {
    tokio::spawn(async move {
        let r = client.simple_query(sql).await.map(drop);
        (client, r)
    })
}

/// Asserts that a session ended with FATAL 08007 naming a commit lost with the old primary:
/// as the answer to `next`, its statement, or (had the FATAL come first) as its connection's
/// end.
/// Loads `data` into `t` with an extended-protocol COPY (tokio-postgres's); returns the rows.
async fn copy_rows(c: &Client, data: &'static str) -> u64 {
    use futures_util::SinkExt;
    let sink = c.copy_in("COPY t FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    if !data.is_empty() {
        sink.send(bytes::Bytes::from_static(data.as_bytes()))
            .await
            .unwrap();
    }
    sink.finish().await.unwrap()
}

async fn assert_lost_commit_fatal(
    next: tokio::task::JoinHandle<(Client, Result<(), tokio_postgres::Error>)>,
    conn_end: ConnectionEnd,
) {
    let (client, r) = tokio::time::timeout(PATIENCE, next)
        .await
        .expect("the session's next statement is answered")
        .unwrap();
    let e = r.expect_err("the session cannot carry on past a lost commit");
    let db = fatal_of(&e, conn_end).await;
    assert_eq!(db.code().code(), "08007", "{db:?}");
    assert_eq!(db.severity(), "FATAL", "{db:?}");
    assert!(
        db.message().contains("missing on the new primary") && db.message().contains("lost"),
        "the message names the lost commit: {}",
        db.message()
    );
    // The driver sees the connection end after the FATAL it answered the statement with; the
    // gateway runs on a thread of its own, so that may come a moment later.
    let closed = async {
        while !client.is_closed() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(PATIENCE, closed)
        .await
        .expect("the session is over");
}

/// Waits until the gateway routes new sessions to the backend on `port`.
async fn wait_routed_to(gw: &TestGateway, port: u16) {
    let deadline = Instant::now() + PATIENCE;
    while gw
        .handle
        .shared()
        .topology
        .current_primary()
        .map(|b| b.port)
        != Some(port)
    {
        assert!(
            Instant::now() < deadline,
            "the gateway never routed to {port}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn lost_commits_counted(gw: &TestGateway) -> f64 {
    metric_total(
        &gw.admin_get("/metrics").await,
        "understudy_lost_commits_total",
    )
}

/// Synchronous replication: a session with an open transaction and an idle one that had just
/// committed both carry on, on their own connections, on the promoted standby; the idle
/// session's acknowledged commit is found there, the open transaction is replayed, and every
/// commit lands exactly once.
#[tokio::test]
async fn synchronous_sessions_continue() {
    let mut cluster = Cluster::build(|o| o.synchronous = true).await;
    let standby_port = cluster.pg.standby.as_ref().unwrap().port();
    setup(
        &cluster,
        "CREATE TABLE t(a int PRIMARY KEY); GRANT ALL ON t TO PUBLIC",
    )
    .await;
    let gw = cluster.failover_gateway().await;
    let idle = gw.connect(roles::SCRAM).await;
    let open = gw.connect(roles::MD5).await;
    // Separate statements, so that the gateway captures the xid before COMMIT: after the
    // failover it checks that this acknowledged commit is on the new primary.
    for sql in ["BEGIN", "INSERT INTO t VALUES (1)", "COMMIT"] {
        idle.batch_execute(sql).await.unwrap();
    }
    open.batch_execute("BEGIN").await.unwrap();
    open.batch_execute("INSERT INTO t VALUES (10)")
        .await
        .unwrap();
    let insert = open.prepare("INSERT INTO t VALUES ($1)").await.unwrap();
    open.execute(&insert, &[&11]).await.unwrap();

    cluster.kill_primary().await;

    idle.batch_execute("INSERT INTO t VALUES (2)")
        .await
        .expect("the idle session carries on");
    for sql in ["BEGIN", "INSERT INTO t VALUES (3)", "COMMIT"] {
        idle.batch_execute(sql).await.unwrap();
    }
    open.execute(&insert, &[&12])
        .await
        .expect("the open transaction carries on");
    assert_eq!(
        values(&open).await,
        [1, 2, 3, 10, 11, 12],
        "inside the replayed transaction"
    );
    open.batch_execute("COMMIT").await.unwrap();
    assert_eq!(server_port(&idle).await, standby_port);
    assert_eq!(server_port(&open).await, standby_port);

    let cluster = cluster_on_new_primary(&mut cluster).await;
    assert_eq!(
        values(&cluster.superuser().await).await,
        [1, 2, 3, 10, 11, 12]
    );
}

/// Synchronous replication while another session writes much and has not committed: that
/// WAL is inserted but not yet flushed, so the standby has not received it. An autocommit write
/// through the gateway is acknowledged (so it is on the standby), the primary dies, and the
/// session carries on: the WAL position taken after the write is the flushed one, which its
/// commit is within. (The insert position, taken before, counted the other session's WAL, and
/// the session was ended with a FATAL 08007 for a commit that was not lost: in 1 of 3 runs of
/// this test, whenever the other session inserted WAL between the write's commit and the
/// position query.)
#[tokio::test]
async fn another_sessions_unflushed_wal_is_no_lost_commit() {
    let mut cluster = Cluster::build(|o| o.synchronous = true).await;
    setup(
        &cluster,
        "CREATE TABLE t(a int PRIMARY KEY); CREATE TABLE big(a int, pad text);
         GRANT ALL ON t, big TO PUBLIC",
    )
    .await;
    let gw = cluster.failover_gateway().await;
    let writer = gw.connect(roles::SCRAM).await;
    let bulk = cluster.superuser().await;
    let bulk_task = tokio::spawn(async move {
        let _ = bulk
            .batch_execute(
                // In the select list the series streams; in FROM it would be built first.
                "INSERT INTO big SELECT generate_series(1, 50000000), repeat('b', 200)",
            )
            .await;
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    for a in 1..=20 {
        writer
            .execute("INSERT INTO t VALUES ($1)", &[&a])
            .await
            .unwrap();
    }

    cluster.kill_primary().await;
    bulk_task.abort();

    writer
        .batch_execute("INSERT INTO t VALUES (21)")
        .await
        .expect("the session carries on: nothing it saw commit was lost");
    assert_eq!(values(&writer).await, (1..=21).collect::<Vec<_>>());
}

/// Synchronous replication, a COMMIT in flight (held up by a deferred trigger) when the primary
/// dies, in a transaction whose writes were all Bind/Execute of a statement prepared earlier
/// (what drivers with a statement cache send). The old primary never committed it. The client
/// may hear COMMIT only if the rows are on the new primary; otherwise it must get 08007.
#[tokio::test]
async fn synchronous_commit_in_flight_after_prepared_writes() {
    let mut cluster = Cluster::build(|o| o.synchronous = true).await;
    setup(
        &cluster,
        &format!("CREATE TABLE t(a int PRIMARY KEY); GRANT ALL ON t TO PUBLIC; {SLOW_COMMIT}"),
    )
    .await;
    let gw = cluster.failover_gateway().await;
    let c = gw.connect(roles::SCRAM).await;
    let insert = c.prepare("INSERT INTO t VALUES ($1)").await.unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    c.execute(&insert, &[&1]).await.unwrap();
    c.execute(&insert, &[&2]).await.unwrap();
    let commit = tokio::spawn(async move {
        let r = c.batch_execute("COMMIT").await;
        (c, r)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.kill_primary().await;
    let (c, r) = commit.await.unwrap();

    let rows = values(&c).await;
    match r {
        Ok(()) => assert_eq!(rows, [1, 2], "COMMIT acknowledged: the rows must exist"),
        Err(e) => assert_eq!(
            sqlstate(&e),
            Some("08007"),
            "a COMMIT whose outcome is unknown gets 08007: {e:?}"
        ),
    }
    let cluster = cluster_on_new_primary(&mut cluster).await;
    assert_eq!(values(&cluster.superuser().await).await, rows);
}

/// Synchronous replication, an autocommit INSERT (Bind/Execute of a statement prepared earlier)
/// in flight when the primary dies after committing it: the commit waits for the standby,
/// whose WAL receiver is frozen, and the receiver is continued once the primary is dead, so
/// the standby has the row but the client never got the answer. The gateway cannot know
/// whether the write was applied (by default its answer and xid come with the commit's, see
/// `failover.settle_in_flight_autocommit`): the client must get 08007, and the row must exist
/// once.
#[tokio::test]
async fn synchronous_autocommit_write_in_flight_is_not_applied_twice() {
    let mut cluster = Cluster::build(|o| o.synchronous = true).await;
    setup(&cluster, "CREATE TABLE t(a int); GRANT ALL ON t TO PUBLIC").await;
    let gw = cluster.failover_gateway().await;
    let c = gw.connect(roles::SCRAM).await;
    let insert = c.prepare("INSERT INTO t VALUES ($1)").await.unwrap();
    let gap = WalGap::open(&cluster).await;
    let write = tokio::spawn(async move {
        let r = c.execute(&insert, &[&7]).await;
        (c, r)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !write.is_finished(),
        "the commit waits for the frozen standby"
    );
    cluster.kill_primary().await;
    gap.close_now();
    let (c, r) = write.await.unwrap();

    let rows = values(&c).await;
    assert_eq!(rows, [7], "the committed INSERT exists exactly once");
    match r {
        Ok(n) => panic!("the gateway ran the in-flight write again (INSERT 0 {n})"),
        Err(e) => assert_eq!(sqlstate(&e), Some("08007"), "{e:?}"),
    }
}

/// Synchronous replication, a transaction's INSERT and COMMIT sent together (pipelined): the
/// INSERT is answered, the COMMIT waits for the standby, whose WAL receiver is frozen and
/// continued once the primary is dead, so the commit is on the standby but its answer never
/// came. The gateway looks the xid up on the new primary, finds it committed, and answers the
/// COMMIT itself: nothing runs again (the table has no key, so a replay would be a second row).
#[tokio::test]
async fn synchronous_commit_in_flight_that_committed_is_not_run_again() {
    let mut cluster = Cluster::build(|o| o.synchronous = true).await;
    setup(&cluster, "CREATE TABLE t(a int); GRANT ALL ON t TO PUBLIC").await;
    let gw = cluster.failover_gateway().await;
    let c = gw.connect(roles::SCRAM).await;
    c.batch_execute("BEGIN").await.unwrap();
    let gap = WalGap::open(&cluster).await;
    let pipelined = tokio::spawn(async move {
        let (insert, commit) = futures_util::future::join(
            c.batch_execute("INSERT INTO t VALUES (7)"),
            c.batch_execute("COMMIT"),
        )
        .await;
        (c, insert, commit)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !pipelined.is_finished(),
        "the commit waits for the frozen standby"
    );
    cluster.kill_primary().await;
    gap.close_now();
    let (c, insert, commit) = tokio::time::timeout(PATIENCE, pipelined)
        .await
        .expect("the pipeline is answered")
        .unwrap();
    insert.unwrap();
    commit.expect("the commit is found on the new primary");
    assert_eq!(
        values(&c).await,
        [7],
        "the committed INSERT exists exactly once"
    );
}

/// Asynchronous replication, table `t(a int PRIMARY KEY)`, and a gateway that promotes once
/// the standby has been silent for its ping time plus 1 s.
async fn asynchronous_with_table() -> (Cluster, TestGateway) {
    let cluster = Cluster::primary_and_standby().await;
    setup(
        &cluster,
        "CREATE TABLE t(a int PRIMARY KEY); GRANT ALL ON t TO PUBLIC",
    )
    .await;
    let gw = cluster
        .failover_gateway_with(|c| c.failover.standby_silence_ms = 1_000)
        .await;
    (cluster, gw)
}

/// An autocommit write that fails (a duplicate key) commits nothing, so the WAL position taken
/// after it is not checked at a failover: it may hold another session's commit that the
/// standby never received (here, a superuser's insert straight to the primary while the
/// standby's receiver is frozen). The session carries on; its own commit is there. (It was
/// ended with FATAL 08007 for a commit it never made.)
#[tokio::test]
async fn a_failed_write_is_no_lost_commit() {
    let (mut cluster, gw) = asynchronous_with_table().await;
    let c = gw.connect(roles::SCRAM).await;
    c.execute("INSERT INTO t VALUES (1)", &[]).await.unwrap();

    let gap = WalGap::open_past_a_direct_commit(&cluster).await;
    let e = c
        .execute("INSERT INTO t VALUES (1)", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), Some("23505"), "{e:?}");

    cluster.kill_primary().await;
    let next = spawn_statement(c, "INSERT INTO t VALUES (2)");
    gap.close_after_promotion_began().await;

    let (c, r) = next.await.unwrap();
    r.expect("the session carries on: the only commit it saw is on the new primary");
    assert_eq!(values(&c).await, [1, 2]);
}

/// Asynchronous replication loses a commit: the standby's WAL receiver is frozen (SIGSTOP),
/// a transaction commits through the gateway (the client sees success), and the primary is
/// killed; the receiver is continued only once the gateway's `pg_promote()` runs (see
/// [`WalGap::close_after_promotion_began`]). The session that saw the commit gets FATAL 08007
/// naming the lost commit on its next statement, `understudy_lost_commits_total` counts it, and
/// a new connection works and indeed lacks the row.
#[tokio::test]
async fn lost_commit_ends_the_session_with_08007() {
    let (mut cluster, gw) = asynchronous_with_table().await;
    let (c, conn_end) = gw.connect_watched(roles::SCRAM).await;
    for sql in ["BEGIN", "INSERT INTO t VALUES (1)", "COMMIT"] {
        c.batch_execute(sql).await.unwrap();
    }

    let gap = WalGap::open(&cluster).await;
    // Separate statements: the gateway captures the xid before COMMIT.
    for sql in ["BEGIN", "INSERT INTO t VALUES (2)", "COMMIT"] {
        c.batch_execute(sql).await.unwrap();
    }
    assert_eq!(
        values(&gap.on_standby).await,
        [1],
        "the standby has not received the second commit"
    );
    let standby_port = gap.standby_port;

    cluster.kill_primary().await;
    // Sent while the gateway waits for the promotion: its answer is how the session ends.
    let next = spawn_statement(c, "SELECT 1");
    gap.close_after_promotion_began().await;

    assert_lost_commit_fatal(next, conn_end).await;
    assert!(lost_commits_counted(&gw).await >= 1.0);
    let fresh = gw.connect(roles::SCRAM).await;
    assert_eq!(values(&fresh).await, [1], "the second commit is gone");
    fresh
        .batch_execute("INSERT INTO t VALUES (3)")
        .await
        .unwrap();
    assert_eq!(server_port(&fresh).await, standby_port);
    assert_eq!(values(&fresh).await, [1, 3]);
}

/// As [`lost_commit_ends_the_session_with_08007`], for the other ways the gateway learns of a
/// commit: an autocommit INSERT as a simple Query (sent as a batch with the xid query) and as
/// an extended-protocol batch (its xid asked for in front of its Sync), `BEGIN; INSERT;
/// COMMIT` sent as one Query string (its xid asked for before the COMMIT), the same with a
/// SELECT after it (a WAL position), two INSERTs in one Query string (its xid asked for after
/// them, in the same string), a transaction whose only write is Bind/Execute of a statement
/// prepared earlier, a CREATE TABLE with an INSERT in one Query string (its xid asked for
/// after them), a simple-protocol COPY (its xid asked for after it, in the same string), and
/// an extended-protocol one (its xid asked for in front of the Sync after its data). All nine
/// were acknowledged and all are lost, so all nine sessions must end with FATAL 08007
/// (DESIGN.md, Failover step 6: "detect, count, log, report, never hide").
#[tokio::test]
async fn lost_commits_of_every_kind_end_their_sessions() {
    let (mut cluster, gw) = asynchronous_with_table().await;
    let (autocommit, autocommit_end) = gw.connect_watched(roles::SCRAM).await;
    let (batch, batch_end) = gw.connect_watched(roles::TRUST).await;
    let (one_string, one_string_end) = gw.connect_watched(roles::MD5).await;
    let (prepared, prepared_end) = gw.connect_watched(roles::CLEARTEXT).await;
    let (two, two_end) = gw.connect_watched(roles::SCRAM).await;
    let (ddl, ddl_end) = gw.connect_watched(roles::TRUST).await;
    let (block_then, block_then_end) = gw.connect_watched(roles::MD5).await;
    let mut copier = RawConn::login(gw.addr(), roles::TRUST).await;
    let (copy_ext, copy_ext_end) = gw.connect_watched(roles::SCRAM).await;
    let insert = prepared.prepare("INSERT INTO t VALUES ($1)").await.unwrap();
    let batch_insert = batch.prepare("INSERT INTO t VALUES ($1)").await.unwrap();
    autocommit
        .batch_execute("INSERT INTO t VALUES (1)")
        .await
        .unwrap();

    let gap = WalGap::open(&cluster).await;
    autocommit
        .batch_execute("INSERT INTO t VALUES (2)")
        .await
        .unwrap();
    batch.execute(&batch_insert, &[&5]).await.unwrap();
    one_string
        .batch_execute("BEGIN; INSERT INTO t VALUES (3); COMMIT")
        .await
        .unwrap();
    prepared.batch_execute("BEGIN").await.unwrap();
    prepared.execute(&insert, &[&4]).await.unwrap();
    prepared.batch_execute("COMMIT").await.unwrap();
    two.batch_execute("INSERT INTO t VALUES (6); INSERT INTO t VALUES (7)")
        .await
        .unwrap();
    ddl.batch_execute("CREATE TABLE u (a int); INSERT INTO t VALUES (8)")
        .await
        .unwrap();
    block_then
        .batch_execute("BEGIN; INSERT INTO t VALUES (9); COMMIT; SELECT 1")
        .await
        .unwrap();
    let copy = [
        raw::query("COPY t FROM STDIN"),
        raw::msg(b'd', b"10\n"),
        raw::msg(b'c', b""),
    ];
    copier.send(&copy.concat()).await;
    assert_eq!(tags(&copier.read_until(b'Z').await), "GCZ");
    assert_eq!(copy_rows(&copy_ext, "11\n").await, 1);
    let lost_before = lost_commits_counted(&gw).await;

    cluster.kill_primary().await;
    let next_autocommit = spawn_statement(autocommit, "SELECT 1");
    let next_batch = spawn_statement(batch, "SELECT 1");
    let next_one_string = spawn_statement(one_string, "SELECT 1");
    let next_prepared = spawn_statement(prepared, "SELECT 1");
    let next_two = spawn_statement(two, "SELECT 1");
    let next_ddl = spawn_statement(ddl, "SELECT 1");
    let next_block_then = spawn_statement(block_then, "SELECT 1");
    let next_copy_ext = spawn_statement(copy_ext, "SELECT 1");
    let standby_port = gap.standby_port;
    gap.close_after_promotion_began().await;

    wait_routed_to(&gw, standby_port).await;
    let fresh = gw.connect(roles::TRUST).await;
    assert_eq!(values(&fresh).await, [1], "the nine commits are lost");
    let u = fresh
        .query_one("SELECT to_regclass('u') IS NULL", &[])
        .await;
    assert!(u.unwrap().get::<_, bool>(0), "the table is lost too");
    assert_lost_commit_fatal(next_autocommit, autocommit_end).await;
    assert_lost_commit_fatal(next_batch, batch_end).await;
    assert_lost_commit_fatal(next_one_string, one_string_end).await;
    assert_lost_commit_fatal(next_prepared, prepared_end).await;
    assert_lost_commit_fatal(next_two, two_end).await;
    assert_lost_commit_fatal(next_ddl, ddl_end).await;
    assert_lost_commit_fatal(next_block_then, block_then_end).await;
    assert_lost_commit_fatal(next_copy_ext, copy_ext_end).await;
    copier.send(&raw::query("SELECT 1")).await;
    let answer = tokio::time::timeout(PATIENCE, copier.read_to_end())
        .await
        .expect("the COPY's session is answered");
    let fatal = answer.iter().find(|m| m.tag == b'E').expect("an error");
    assert_eq!(
        (fatal.severity(), fatal.code()),
        ("FATAL".into(), "08007".into())
    );
    assert!(lost_commits_counted(&gw).await >= lost_before + 9.0);
}

/// A client hears that its autocommit write succeeded only once the gateway holds a WAL
/// position past its commit (the query for it follows the write): told earlier, a client whose
/// primary died in between would carry on past a commit lost with it, unseen. Here that query
/// is held up (another session locks `pg_proc`, where a fresh backend looks up its function),
/// so the write's answer waits; the primary dies meanwhile, its commit not replicated, and the
/// client gets 08007 for the write instead of its success. The session goes on. (A
/// `BEGIN; …; COMMIT` with a statement after it in one Query: an extended-protocol batch, a
/// Query of one data change sent as one, and other autocommit Queries that write ask for their
/// xid in their own transaction instead, see [`a_write_that_changed_nothing_is_no_lost_commit`].)
#[tokio::test]
async fn autocommit_write_is_answered_after_its_wal_position() {
    let (mut cluster, gw) = asynchronous_with_table().await;
    // A fresh backend: it has never looked up the WAL position function.
    let writer = gw.connect(roles::SCRAM).await;
    let gap = WalGap::open(&cluster).await;
    let locker = cluster.superuser().await;
    locker
        .batch_execute("BEGIN; LOCK TABLE pg_catalog.pg_proc IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let write = spawn_statement(writer, "BEGIN; INSERT INTO t VALUES (2); COMMIT; SELECT 1");
    let deadline = Instant::now() + PATIENCE;
    while values(&locker).await.is_empty() {
        assert!(Instant::now() < deadline, "the INSERT never committed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !write.is_finished(),
        "the write was answered before the gateway knew a WAL position past its commit"
    );

    cluster.kill_primary().await;
    let standby_port = gap.standby_port;
    gap.close_after_promotion_began().await;
    let (writer, r) = tokio::time::timeout(PATIENCE, write)
        .await
        .expect("the write is answered by the new primary")
        .unwrap();
    assert_eq!(sqlstate(&r.unwrap_err()), Some("08007"));
    assert_eq!(server_port(&writer).await, standby_port);
    // Usually lost; the standby may still have read that WAL as its promotion began (see
    // `close_after_promotion_began`), and 08007 allows either. Never twice.
    let before = values(&writer).await;
    assert!(before.is_empty() || before == [2], "{before:?}");
    writer
        .batch_execute("INSERT INTO t VALUES (3)")
        .await
        .unwrap();
    assert_eq!(values(&writer).await, [&before[..], &[3]].concat());
}

/// Asynchronous replication. An autocommit write that changes nothing (an UPDATE of no rows),
/// in the extended protocol, a simple Query, or a Query of several statements, or schema
/// changes that find nothing to do (`IF NOT EXISTS`, `IF EXISTS`), or a `SET` with such a
/// write, or a whole `BEGIN; …; COMMIT` of one, or a COPY of no row (either protocol), or
/// maintenance (VACUUM,
/// ANALYZE: what it changes no client reads), commits nothing
/// that could be lost; a superuser's commit straight on the primary, made just before them
/// while the standby's receiver is frozen, is lost with the primary. The sessions carry on
/// after the failover: their xids were asked for inside their own transactions (the Query sent
/// as a batch; the xid query after the statements, in the same string), and none was assigned.
/// (The gateway took the primary's WAL position after each autocommit write instead; that
/// position counted the superuser's commit, and the sessions were ended with FATAL 08007 for a
/// commit they never made. The same position counted any commit of another session flushed
/// between a write's commit and the position query, which under synchronous replication the
/// standby need not have had yet.)
#[tokio::test]
async fn a_write_that_changed_nothing_is_no_lost_commit() {
    let (mut cluster, gw) = asynchronous_with_table().await;
    let c = gw.connect(roles::MD5).await;
    c.execute("INSERT INTO t VALUES ($1)", &[&10])
        .await
        .unwrap();
    let nothing = c.prepare("UPDATE t SET a = a WHERE a = $1").await.unwrap();
    let simple = gw.connect(roles::SCRAM).await;
    simple
        .batch_execute("INSERT INTO t VALUES (30)")
        .await
        .unwrap();
    let several = gw.connect(roles::TRUST).await;
    several
        .batch_execute("INSERT INTO t VALUES (50); INSERT INTO t VALUES (51)")
        .await
        .unwrap();
    let ddl = gw.connect(roles::TRUST).await;
    ddl.batch_execute("CREATE TABLE u (a int); INSERT INTO t VALUES (70)")
        .await
        .unwrap();
    let mut copier = RawConn::login(gw.addr(), roles::TRUST).await;

    let gap = WalGap::open_past_a_direct_commit(&cluster).await;
    assert_eq!(c.execute(&nothing, &[&-1]).await.unwrap(), 0);
    assert_eq!(copy_rows(&c, "").await, 0);
    let answer = simple
        .simple_query("UPDATE t SET a = a WHERE a = -1")
        .await
        .unwrap();
    assert!(
        matches!(answer[..], [SimpleQueryMessage::CommandComplete(0)]),
        "{answer:?}"
    );
    let answer = several
        .simple_query("UPDATE t SET a = a WHERE a = -1; DELETE FROM t WHERE a = -2")
        .await
        .unwrap();
    assert!(
        matches!(
            answer[..],
            [
                SimpleQueryMessage::CommandComplete(0),
                SimpleQueryMessage::CommandComplete(0)
            ]
        ),
        "{answer:?}"
    );
    // Schema changes that found nothing to do (notices say so), a setting made with a write
    // of no row, a whole transaction block of one, and maintenance.
    for (sql, statements) in [
        (
            "CREATE TABLE IF NOT EXISTS u (a int); DROP TABLE IF EXISTS nothere",
            2,
        ),
        (
            "SET application_name = 'still'; UPDATE t SET a = a WHERE a = -3",
            2,
        ),
        ("BEGIN; DELETE FROM t WHERE a = -4; COMMIT", 3),
        ("VACUUM u", 1),
        ("ANALYZE u", 1),
    ] {
        let answer = ddl.simple_query(sql).await.unwrap();
        assert_eq!(answer.len(), statements, "{answer:?}");
    }
    copier
        .send(&[raw::query("COPY t FROM STDIN"), raw::msg(b'c', b"")].concat())
        .await;
    assert_eq!(tags(&copier.read_until(b'Z').await), "GCZ");

    cluster.kill_primary().await;
    let insert = |c: Client, a: i32| {
        tokio::spawn(async move {
            let r = c.execute("INSERT INTO t VALUES ($1)", &[&a]).await;
            (c, r)
        })
    };
    let (next, next_simple) = (insert(c, 20), insert(simple, 40));
    let (next_several, next_ddl) = (insert(several, 60), insert(ddl, 80));
    let standby_port = gap.standby_port;
    gap.close_after_promotion_began().await;

    copier.send(&raw::query("INSERT INTO t VALUES (90)")).await;
    for next in [next, next_simple, next_several, next_ddl] {
        let (c, r) = tokio::time::timeout(PATIENCE, next)
            .await
            .expect("answered")
            .unwrap();
        r.expect("the session carries on: its commits are on the new primary");
        assert_eq!(server_port(&c).await, standby_port);
    }
    let answer = tokio::time::timeout(PATIENCE, copier.read_until(b'Z'))
        .await
        .expect("the COPY's session is answered");
    // (A ParameterStatus the client has comes every second of the wait, as a keepalive.)
    let answer = tags(&answer).replace('S', "");
    assert_eq!(answer, "CZ", "it carries on");
    let c = gw.connect(roles::MD5).await;
    assert_eq!(
        values(&c).await,
        [10, 20, 30, 40, 50, 51, 60, 70, 80, 90],
        "every acknowledged write once; the superuser's was lost"
    );
}

/// Asynchronous replication loses one session's commit; another session whose statements since
/// then only changed its own state (SET, PREPARE, LISTEN) committed nothing that could be lost,
/// and carries on, with that state, on the new primary. The first session gets 08007. (Each
/// autocommit session change used to be followed by the WAL-position check; the position then
/// included the other session's commit, and the second session was ended with 08007 too.)
#[tokio::test]
async fn session_changes_lose_no_commit() {
    let (mut cluster, gw) = asynchronous_with_table().await;
    let (writer, writer_end) = gw.connect_watched(roles::SCRAM).await;
    let setter = gw.connect(roles::MD5).await;

    let gap = WalGap::open(&cluster).await;
    writer
        .batch_execute("INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    for sql in [
        "SET application_name = 'kept'",
        "PREPARE two AS SELECT 2",
        "LISTEN moved",
    ] {
        setter.batch_execute(sql).await.unwrap();
    }
    let standby_port = gap.standby_port;

    cluster.kill_primary().await;
    let next_writer = spawn_statement(writer, "SELECT 1");
    let next_setter = tokio::spawn(async move {
        // Its first statement after the move; a FATAL would end the connection.
        let r = setter.simple_query("SHOW application_name").await;
        (setter, r)
    });
    gap.close_after_promotion_began().await;

    assert_lost_commit_fatal(next_writer, writer_end).await;
    let (setter, r) = tokio::time::timeout(PATIENCE, next_setter)
        .await
        .expect("the session that changed only its state is answered")
        .unwrap();
    let shown = r.expect("the session that changed only its state carries on");
    assert_eq!(simple_rows(&shown), [["kept"]]);
    assert_eq!(server_port(&setter).await, standby_port);
    let two = setter.simple_query("EXECUTE two").await.unwrap();
    assert_eq!(simple_rows(&two), [["2"]], "the prepared statement moved");
    assert_eq!(
        values(&setter).await,
        Vec::<i32>::new(),
        "the commit is gone"
    );
}

/// A partition between the gateway and a healthy, idle primary makes no second primary. Here
/// every primary process but its WAL sender is frozen: the gateway's probes go unanswered, so
/// it fails over, while the standby still hears the primary. An idle primary sends nothing
/// until the receiver pings it (after `wal_receiver_timeout / 2`, 30 s here), and the
/// standby's silence before then is no witness: the standby stays a standby, and once the
/// primary answers again the session carries on there.
#[tokio::test]
async fn a_primary_the_standby_still_hears_is_not_promoted_away_from() {
    let cluster = Cluster::primary_and_standby().await;
    let primary_port = cluster.pg.primary.port();
    let on_standby = cluster
        .pg
        .standby
        .as_ref()
        .unwrap()
        .client("postgres", "postgres")
        .await
        .unwrap();
    for sql in [
        "ALTER SYSTEM SET wal_receiver_timeout = '60s'",
        "SELECT pg_reload_conf()",
    ] {
        on_standby.batch_execute(sql).await.unwrap();
    }
    let gw = cluster.failover_gateway().await;
    let c = gw.connect(roles::SCRAM).await;
    assert_eq!(server_port(&c).await, primary_port);
    let frozen = cluster.freeze_primary(&[cluster.wal_sender_pid().await]);

    // Long enough for the gateway to find the primary gone and try to promote, several times
    // longer than a promotion takes once the standby has lost the primary.
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        let in_recovery: bool = on_standby
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .unwrap()
            .get(0);
        assert!(
            in_recovery,
            "the standby was promoted while it still heard the primary"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = gw.admin_get("/metrics").await;
    assert!(
        metric_total(&metrics, "understudy_failovers_total") >= 1.0,
        "the gateway found the primary gone and tried to fail over"
    );
    let receiver: String = on_standby
        .query_one("SELECT status FROM pg_stat_wal_receiver", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(receiver, "streaming");

    frozen.thaw();
    let row = tokio::time::timeout(PATIENCE, c.query_one("SELECT inet_server_port()", &[]))
        .await
        .expect("the session carries on once the primary answers")
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), i32::from(primary_port));
}
