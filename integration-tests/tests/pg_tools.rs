//! PostgreSQL's own tools through the gateway: `pg_dump` (plain, and directory format with
//! parallel workers sharing the leader's exported snapshot) and `pg_restore -j`, which use COPY,
//! large objects, `SET TRANSACTION SNAPSHOT` and many sessions at once; `pg_basebackup`, whose
//! replication connections stream a base backup and WAL (CopyOut, CopyBoth); logical decoding
//! and a subscription with the gateway as the publisher's address; the maintenance programs.

use std::process::Output;

use understudy_integration_tests::{roles, run_program, Cluster};

/// A database with what a dump has to carry: several column types, a sequence, a view, a
/// materialized view, a function, a partitioned table, comments and a large object.
const SCHEMA: &str = r#"
    CREATE TABLE items (
        id bigserial PRIMARY KEY,
        name text NOT NULL,
        tags text[],
        doc jsonb,
        raw bytea,
        at timestamptz DEFAULT '2026-01-01 00:00:00+00'
    );
    INSERT INTO items (name, tags, doc, raw)
        SELECT 'item ' || i || E' \t tab, "quote", back\\slash, é',
               ARRAY['a' || i % 7, 'b'],
               jsonb_build_object('i', i, 'even', i % 2 = 0),
               decode(md5(i::text), 'hex')
        FROM generate_series(1, 20000) i;
    CREATE INDEX items_name ON items (name);
    CREATE VIEW even_items AS SELECT id, name FROM items WHERE (doc->>'even')::boolean;
    CREATE MATERIALIZED VIEW tag_counts AS
        SELECT t, count(*) FROM items, unnest(tags) t GROUP BY t;
    CREATE FUNCTION item_name(bigint) RETURNS text LANGUAGE plpgsql STABLE AS
        $$ BEGIN RETURN (SELECT name FROM items WHERE id = $1); END $$;
    CREATE TABLE events (at date NOT NULL, what text) PARTITION BY RANGE (at);
    CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
    INSERT INTO events SELECT '2026-01-01'::date + i % 300, 'event ' || i FROM generate_series(1, 5000) i;
    COMMENT ON TABLE items IS 'things, with a comment';
    SELECT lo_from_bytea(424242, convert_to(repeat('large object ', 10000), 'UTF8'));
"#;

/// Runs PostgreSQL program `name` with `args`, and says what it said when it fails.
async fn run_ok(cluster: &Cluster, name: &str, args: &[&str]) -> Output {
    let out = run_program(cluster.program(name), args, None).await;
    assert!(
        out.status.success(),
        "{name} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A plain dump's text without what differs between two runs of the same dump: the random
/// key of `\restrict` (PostgreSQL 15.14 and later).
fn comparable(dump: &[u8]) -> String {
    String::from_utf8_lossy(dump)
        .lines()
        .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `pg_dump` through the gateway writes the same dump as directly; a parallel directory-format
/// dump through it (two workers on the leader's snapshot) restored with `pg_restore -j 2`
/// through it makes a database whose dump is the original's, large object included.
#[tokio::test]
async fn pg_dump_and_pg_restore_through_the_gateway() {
    let cluster = Cluster::primary_only().await;
    let su = cluster.superuser().await;
    su.batch_execute("CREATE DATABASE src").await.unwrap();
    let primary = &cluster.pg.primary;
    let (src, _conn) = {
        let (c, conn) = tokio_postgres::connect(
            &primary.conn_string(roles::SUPERUSER, "src"),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        (c, tokio::spawn(conn))
    };
    src.batch_execute(SCHEMA).await.unwrap();
    drop(src);
    let gw = cluster.gateway().await;
    let through = |db: &str| gw.conn_str(roles::SUPERUSER, db);
    let direct = |db: &str| primary.conn_string(roles::SUPERUSER, db);

    let plain_direct = run_ok(&cluster, "pg_dump", &["-d", &direct("src")]).await;
    let plain_through = run_ok(&cluster, "pg_dump", &["-d", &through("src")]).await;
    let original = comparable(&plain_direct.stdout);
    assert!(original.contains("COPY public.items"), "{original}");
    assert!(original.contains("SELECT pg_catalog.lo_create('424242')"));
    assert_eq!(comparable(&plain_through.stdout), original);

    let dir = cluster.pg.base_dir().join("dump.d");
    let dir = dir.to_str().unwrap();
    run_ok(
        &cluster,
        "pg_dump",
        &["-Fd", "-j", "2", "-f", dir, "-d", &through("src")],
    )
    .await;
    run_ok(
        &cluster,
        "psql",
        &[
            "-X",
            "-d",
            &through("postgres"),
            "-c",
            "CREATE DATABASE dst",
        ],
    )
    .await;
    run_ok(
        &cluster,
        "pg_restore",
        &["-j", "2", "-d", &through("dst"), dir],
    )
    .await;
    let restored = run_ok(&cluster, "pg_dump", &["-d", &direct("dst")]).await;
    assert_eq!(comparable(&restored.stdout), original);
    gw.shutdown().await;
}

/// `pg_basebackup -X stream` through the gateway: a replication connection streams the base
/// backup while a second one streams WAL (CopyBoth), and `pg_verifybackup` finds every file
/// as its manifest says and the WAL the backup needs.
#[tokio::test]
async fn pg_basebackup_through_the_gateway() {
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;
    let target = cluster.pg.base_dir().join("basebackup");
    let target = target.to_str().unwrap();
    run_ok(
        &cluster,
        "pg_basebackup",
        &[
            "-d",
            &gw.conn_str(roles::SUPERUSER, "postgres"),
            "-D",
            target,
            "-X",
            "stream",
            "-c",
            "fast",
        ],
    )
    .await;
    let verified = run_ok(&cluster, "pg_verifybackup", &[target]).await;
    let said = String::from_utf8_lossy(&verified.stdout);
    assert!(said.contains("successfully verified"), "{said}");
    gw.shutdown().await;
}

/// Runs `pg_recvlogical` with `args`, which must succeed.
async fn recvlogical(cluster: &Cluster, args: Vec<String>) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_ok(cluster, "pg_recvlogical", &args).await;
}

/// A primary without a standby whose WAL carries logical decoding (`wal_level = logical`).
async fn logical_primary() -> Cluster {
    Cluster::build(|o| {
        o.with_standby = false;
        o.extra_conf.push("wal_level = logical".to_owned());
    })
    .await
}

/// Logical decoding through the gateway (`replication=database`): `pg_recvlogical` makes a
/// slot there, and streams the rows written through the gateway up to a given position.
#[tokio::test]
async fn pg_recvlogical_through_the_gateway() {
    let cluster = logical_primary().await;
    let gw = cluster.gateway().await;
    let conn = gw.conn_str(roles::SUPERUSER, "postgres");
    // pg_recvlogical's arguments for the test's slot through the gateway, then `rest`.
    let slot = |rest: &[&'static str]| {
        let mut args = vec![
            "-d".to_owned(),
            conn.clone(),
            "--slot".to_owned(),
            "understudy_test".to_owned(),
        ];
        args.extend(rest.iter().map(|a| a.to_string()));
        args
    };
    recvlogical(&cluster, slot(&["--create-slot", "-P", "test_decoding"])).await;
    let client = gw.connect(roles::SUPERUSER).await;
    client
        .batch_execute("CREATE TABLE decoded (a int); INSERT INTO decoded VALUES (1), (2), (3)")
        .await
        .unwrap();
    let end: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let out = cluster.pg.base_dir().join("decoded.txt");
    let mut start = slot(&["--start", "--no-loop", "-f"]);
    start.extend([out.display().to_string(), "--endpos".to_owned(), end]);
    recvlogical(&cluster, start).await;
    let decoded = std::fs::read_to_string(&out).unwrap();
    for a in 1..=3 {
        assert!(
            decoded.contains(&format!("table public.decoded: INSERT: a[integer]:{a}")),
            "{decoded}"
        );
    }
    recvlogical(&cluster, slot(&["--drop-slot"])).await;
    gw.shutdown().await;
}

/// Logical replication with the gateway as the publisher's address: a subscription on another
/// server connects through it (a walsender session plus its table-sync workers' ones), copies
/// the table's rows, and streams the rows inserted after.
#[tokio::test]
async fn a_subscription_through_the_gateway() {
    let publisher = logical_primary().await;
    let subscriber = Cluster::primary_only().await;
    let gw = publisher.gateway().await;
    let table = "CREATE TABLE replicated (a int PRIMARY KEY, b text)";
    let source = gw.connect(roles::SUPERUSER).await;
    source
        .batch_execute(&format!(
            "{table}; INSERT INTO replicated SELECT i, 'row ' || i FROM generate_series(1, 100) i;
             CREATE PUBLICATION everything FOR TABLE replicated"
        ))
        .await
        .unwrap();
    let target = subscriber.superuser().await;
    target.batch_execute(table).await.unwrap();
    let through = gw.conn_str(roles::SUPERUSER, "postgres");
    target
        .batch_execute(&format!(
            "CREATE SUBSCRIPTION through_gateway CONNECTION '{through}' PUBLICATION everything"
        ))
        .await
        .unwrap();
    source
        .batch_execute(
            "INSERT INTO replicated SELECT i, 'row ' || i FROM generate_series(101, 150) i",
        )
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + understudy_integration_tests::PATIENCE;
    loop {
        let row = target
            .query_one("SELECT count(*), coalesce(sum(a), 0) FROM replicated", &[])
            .await
            .unwrap();
        let (count, sum): (i64, i64) = (row.get(0), row.get(1));
        if count == 150 {
            assert_eq!(sum, 150 * 151 / 2, "every row once");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{count} rows replicated"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    target
        .batch_execute("DROP SUBSCRIPTION through_gateway")
        .await
        .unwrap();
    gw.shutdown().await;
}

/// The maintenance programs through the gateway, several sessions each: `createdb`,
/// `vacuumdb -j 2 --analyze`, `reindexdb -j 2`, `clusterdb`, `pg_dumpall --globals-only`,
/// `dropdb`; what they did is seen on the server.
#[tokio::test]
async fn maintenance_programs_through_the_gateway() {
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;
    let to = |db: &str| gw.conn_str(roles::SUPERUSER, db);
    let maint_db = format!("--maintenance-db={}", to("postgres"));
    run_ok(&cluster, "createdb", &[&maint_db, "kept"]).await;
    let kept = gw
        .try_connect(to("kept").parse().unwrap())
        .await
        .expect("the new database through the gateway");
    kept.batch_execute(
        "CREATE TABLE t (a int PRIMARY KEY, b text);
         INSERT INTO t SELECT i, md5(i::text) FROM generate_series(1, 5000) i;
         CREATE TABLE u (a int PRIMARY KEY); INSERT INTO u SELECT generate_series(1, 100);
         CLUSTER t USING t_pkey",
    )
    .await
    .unwrap();
    run_ok(
        &cluster,
        "vacuumdb",
        &["-j", "2", "--analyze", "-d", &to("kept")],
    )
    .await;
    run_ok(&cluster, "reindexdb", &["-j", "2", "-d", &to("kept")]).await;
    run_ok(&cluster, "clusterdb", &["-d", &to("kept")]).await;
    let analyzed: i64 = kept
        .query_one(
            "SELECT count(*) FROM pg_stat_user_tables WHERE last_vacuum IS NOT NULL AND last_analyze IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(analyzed, 2, "both tables vacuumed and analyzed");
    let globals = run_ok(
        &cluster,
        "pg_dumpall",
        &["--globals-only", "-d", &to("postgres")],
    )
    .await;
    let globals = String::from_utf8_lossy(&globals.stdout);
    assert!(
        globals.contains(&format!("CREATE ROLE {}", roles::SCRAM)),
        "{globals}"
    );
    drop(kept);
    run_ok(&cluster, "dropdb", &[&maint_db, "kept"]).await;
    let left: i64 = cluster
        .superuser()
        .await
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = 'kept'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    gw.shutdown().await;
}
