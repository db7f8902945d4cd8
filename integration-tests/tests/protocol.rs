//! The wire protocol through the gateway is what it is directly: simple and extended query,
//! pipelining, portals, COPY, notifications, notices, errors, large results, Terminate.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt, TryStreamExt};
use tokio_postgres::binary_copy::{BinaryCopyInWriter, BinaryCopyOutStream};
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, NoTls, SimpleQueryMessage};
use understudy_integration_tests::raw::{self, RawConn};
use understudy_integration_tests::{
    backend_pid, connect_with_messages, int_column, pgbench_init, roles, run_program, simple_rows,
    sqlstate, Cluster,
};

/// Simple query with several statements, errors in and out of transactions, and recovery.
#[tokio::test]
async fn simple_query_and_errors() {
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;
    let c = gw.connect(roles::SCRAM).await;

    let msgs = c
        .simple_query("CREATE TABLE s(a int); INSERT INTO s VALUES (1),(2); SELECT a FROM s ORDER BY a; SELECT 'x' AS y")
        .await
        .unwrap();
    assert_eq!(simple_rows(&msgs), [["1"], ["2"], ["x"]]);
    let completes = msgs
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .collect::<Vec<_>>();
    assert_eq!(completes, [0, 2, 2, 1]);

    // An empty query string is answered with EmptyQueryResponse, not an error.
    let empty = c.simple_query("").await.unwrap();
    assert!(simple_rows(&empty).is_empty());

    // Outside a transaction an error leaves the session usable.
    let e = c.simple_query("SELECT * FROM missing").await.unwrap_err();
    assert_eq!(sqlstate(&e), Some("42P01"));
    // Inside one, the transaction is aborted (25P02) until ROLLBACK.
    c.batch_execute("BEGIN; INSERT INTO s VALUES (3)")
        .await
        .unwrap();
    assert_eq!(
        sqlstate(&c.batch_execute("SELECT 1/0").await.unwrap_err()),
        Some("22012")
    );
    assert_eq!(
        sqlstate(&c.batch_execute("SELECT 1").await.unwrap_err()),
        Some("25P02")
    );
    c.batch_execute("ROLLBACK").await.unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM s", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2, "the rolled-back insert is not there");
}

/// Named statements, parameters, many queries pipelined before one Sync, and a portal read
/// with a row limit (PortalSuspended).
#[tokio::test]
async fn extended_query_pipelining_and_portals() {
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;
    let c = gw.connect(roles::SCRAM).await;

    let stmt = c.prepare("SELECT $1::int + $2::int").await.unwrap();
    let r: i32 = c.query_one(&stmt, &[&40, &2]).await.unwrap().get(0);
    assert_eq!(r, 42);

    // tokio-postgres pipelines concurrent queries on one connection.
    let futs = (0..200).map(|i| {
        let c = &c;
        let stmt = &stmt;
        async move {
            c.query_one(stmt, &[&i, &1])
                .await
                .map(|r| r.get::<_, i32>(0))
        }
    });
    let results = futures_util::future::join_all(futs).await;
    for (i, r) in results.into_iter().enumerate() {
        assert_eq!(r.unwrap(), i as i32 + 1);
    }

    let mut c = c;
    let tx = c.transaction().await.unwrap();
    let all = tx
        .prepare("SELECT g FROM generate_series(1, 25) g")
        .await
        .unwrap();
    let portal = tx.bind(&all, &[]).await.unwrap();
    let mut seen = Vec::new();
    loop {
        let rows = tx.query_portal(&portal, 10).await.unwrap();
        if rows.is_empty() {
            break;
        }
        seen.extend(rows.iter().map(|r| r.get::<_, i32>(0)));
    }
    assert_eq!(seen, (1..=25).collect::<Vec<_>>());
    tx.commit().await.unwrap();

    // Unnamed statements through the raw protocol: Parse/Bind/Describe/Execute/Close/Sync.
    let mut rc = RawConn::login(gw.addr(), roles::TRUST).await;
    let mut batch = Vec::new();
    batch.extend(raw::msg(b'P', b"s1\0SELECT 7\0\0\0"));
    batch.extend(raw::msg(b'B', b"\0s1\0\0\0\0\0\0\0"));
    batch.extend(raw::msg(b'D', b"P\0"));
    batch.extend(raw::msg(b'E', b"\0\0\0\0\0"));
    batch.extend(raw::msg(b'C', b"Ss1\0"));
    batch.extend(raw::msg(b'H', b""));
    batch.extend(raw::msg(b'S', b""));
    rc.send(&batch).await;
    assert_eq!(raw::tags(&rc.read_until(b'Z').await), "12TDC3Z");
}

/// COPY FROM STDIN and TO STDOUT, text and binary.
#[tokio::test]
async fn copy_in_and_out_text_and_binary() {
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;
    let c = gw.connect(roles::SCRAM).await;
    c.batch_execute("CREATE TABLE c(id int, v text)")
        .await
        .unwrap();

    let sink = c.copy_in("COPY c FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut text = String::new();
    for i in 0..10_000 {
        text.push_str(&format!("{i}\tv{i}\n"));
    }
    sink.send(bytes::Bytes::from(text.clone())).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 10_000);

    let out: Vec<u8> = c
        .copy_out("COPY (SELECT * FROM c ORDER BY id) TO STDOUT")
        .await
        .unwrap()
        .try_fold(Vec::new(), |mut acc, chunk| async move {
            acc.extend_from_slice(&chunk);
            Ok(acc)
        })
        .await
        .unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), text);

    let sink = c
        .copy_in("COPY c FROM STDIN (FORMAT binary)")
        .await
        .unwrap();
    let writer = BinaryCopyInWriter::new(sink, &[Type::INT4, Type::TEXT]);
    futures_util::pin_mut!(writer);
    for i in 10_000..10_100i32 {
        writer
            .as_mut()
            .write(&[&i, &format!("b{i}")])
            .await
            .unwrap();
    }
    assert_eq!(writer.finish().await.unwrap(), 100);

    let stream = c
        .copy_out(
            "COPY (SELECT id, v FROM c WHERE id >= 10000 ORDER BY id) TO STDOUT (FORMAT binary)",
        )
        .await
        .unwrap();
    let rows: Vec<(i32, String)> = BinaryCopyOutStream::new(stream, &[Type::INT4, Type::TEXT])
        .map(|r| {
            let r = r.unwrap();
            (r.get::<i32>(0), r.get::<String>(1))
        })
        .collect()
        .await;
    assert_eq!(rows.len(), 100);
    assert_eq!(rows[99], (10_099, "b10099".to_owned()));

    // A failed COPY (bad data) reports the server's error and leaves the session usable.
    let sink = c.copy_in("COPY c FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"not-a-number\tx\n"))
        .await
        .unwrap();
    let e = sink.finish().await.unwrap_err();
    assert_eq!(sqlstate(&e), Some("22P02"));
    let n: i64 = c
        .query_one("SELECT count(*) FROM c", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 10_100);
}

/// Notifications arrive while the client is idle, with the notifying backend's real PID;
/// notices are passed on.
#[tokio::test]
async fn notifications_while_idle_and_notices() {
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;
    let (listener, mut rx) = connect_with_messages(&gw.pg_config(roles::SCRAM)).await;
    listener.batch_execute("LISTEN jobs").await.unwrap();

    let notifier = gw.connect(roles::MD5).await;
    let notifier_pid: i32 = notifier
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    notifier
        .batch_execute("NOTIFY jobs, 'one'; SELECT pg_notify('jobs', 'two')")
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(AsyncMessage::Notification(n))) => {
                assert_eq!(n.channel(), "jobs");
                assert_eq!(n.process_id(), notifier_pid);
                got.push(n.payload().to_owned());
            }
            Ok(Some(_)) => {}
            other => panic!("no notification while idle: {other:?}"),
        }
    }
    assert_eq!(got, ["one", "two"]);

    listener
        .batch_execute("DO $$ BEGIN RAISE NOTICE 'hello %', 42; END $$")
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(AsyncMessage::Notice(n))) => {
                assert_eq!(n.message(), "hello 42");
                break;
            }
            Ok(Some(_)) => {}
            other => panic!("no notice: {other:?}"),
        }
    }
}

/// Startup parameters reach the server as sent; ParameterStatus values are the server's
/// spelling; BackendKeyData carries the real backend PID.
#[tokio::test]
async fn startup_parameters_and_parameter_status() {
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;
    let mut cfg = gw.pg_config(roles::SCRAM);
    cfg.options("-c statement_timeout=1234 -c search_path=alpha,public")
        .application_name("my app");
    let c = gw.try_connect(cfg).await.unwrap();
    let row = c
        .query_one(
            "SELECT current_setting('statement_timeout'), current_setting('search_path'), current_setting('application_name')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "1234ms");
    assert_eq!(row.get::<_, String>(1), "alpha,public");
    assert_eq!(row.get::<_, String>(2), "my app");

    let mut rc = RawConn::open(gw.addr()).await;
    rc.send(&raw::startup(
        0,
        &[
            ("user", roles::TRUST),
            ("database", "postgres"),
            ("client_encoding", "utf8"),
            ("DateStyle", "iso, dmy"),
        ],
    ))
    .await;
    let greeting = rc.read_until(b'Z').await;
    let param = |name: &str| {
        greeting.iter().filter(|m| m.tag == b'S').find_map(|m| {
            let mut parts = m.body.split(|&b| b == 0);
            if parts.next()? != name.as_bytes() {
                return None;
            }
            Some(String::from_utf8_lossy(parts.next()?).into_owned())
        })
    };
    assert_eq!(param("client_encoding").as_deref(), Some("UTF8"));
    assert_eq!(param("DateStyle").as_deref(), Some("ISO, DMY"));
    let key = greeting
        .iter()
        .find(|m| m.tag == b'K')
        .expect("BackendKeyData");
    let pid = i32::from_be_bytes([key.body[0], key.body[1], key.body[2], key.body[3]]);
    rc.send(&raw::query("SELECT pg_backend_pid()")).await;
    let rows = rc.read_until(b'Z').await;
    let data = rows.iter().find(|m| m.tag == b'D').expect("DataRow");
    assert_eq!(String::from_utf8_lossy(&data.body[6..]), pid.to_string());
}

/// Startup values that are not UTF-8 (a LATIN1 client's `application_name`, a setting of its
/// own) reach the server as sent, and the server answers as it does directly, with psql too.
/// A role or database name that is not UTF-8 is refused with its own SQLSTATE and message.
#[tokio::test]
async fn startup_values_that_are_not_utf8_reach_the_server_as_sent() {
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;
    let params: [(&[u8], &[u8]); 4] = [
        (b"user", roles::TRUST.as_bytes()),
        (b"database", b"postgres"),
        (b"application_name", b"caf\xe9"),
        (b"understudy.note", b"\xe9t\xe9"),
    ];
    let answers = |addr| async move {
        let mut rc = RawConn::open(addr).await;
        rc.send(&raw::startup_bytes(0, &params)).await;
        let greeting = rc.read_until(b'Z').await;
        assert!(greeting.iter().all(|m| m.tag != b'E'), "{greeting:?}");
        rc.send(&raw::query(
            "SELECT current_setting('application_name'), current_setting('understudy.note')",
        ))
        .await;
        let rows = rc.read_until(b'Z').await;
        let reported = greeting
            .into_iter()
            .filter(|m| m.tag == b'S' && m.body.starts_with(b"application_name\0"))
            .map(|m| m.body);
        let data = rows.into_iter().filter(|m| m.tag == b'D').map(|m| m.body);
        reported.chain(data).collect::<Vec<_>>()
    };
    let through = answers(gw.addr()).await;
    assert_eq!(through, answers(cluster.pg.primary.addr()).await);
    // PostgreSQL 15 shows a non-ASCII application_name with '?'s; a placeholder keeps its bytes.
    assert_eq!(
        through,
        [
            b"application_name\0caf?\0".to_vec(),
            b"\0\x02\0\0\0\x04caf?\0\0\0\x03\xe9t\xe9".to_vec()
        ]
    );

    let mut psql = tokio::process::Command::new(cluster.program("psql"));
    let port = gw.addr().port().to_string();
    psql.args([
        "-X",
        "-A",
        "-t",
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-U",
        roles::TRUST,
    ])
    .args(["-d", "postgres", "-c", "SHOW application_name"])
    .env(
        "PGAPPNAME",
        <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"psql-\xe9"),
    )
    .env("PGCONNECT_TIMEOUT", "10")
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), psql.output())
        .await
        .expect("psql finishes")
        .expect("psql runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "psql failed: {stderr}");
    assert_eq!(out.stdout, b"psql-?\n", "{stderr}");

    for (name, what) in [(&b"user"[..], "user"), (b"database", "database")] {
        let mut params = vec![(&b"user"[..], roles::TRUST.as_bytes())];
        params.retain(|(k, _)| *k != name);
        params.push((name, b"jos\xe9"));
        let mut rc = RawConn::open(gw.addr()).await;
        rc.send(&raw::startup_bytes(0, &params)).await;
        let err = rc.expect_error().await;
        assert_eq!(err.code(), "0A000", "{what}");
        assert_eq!(
            err.message(),
            format!("the gateway takes only UTF-8 {what} names")
        );
        assert!(rc.closed().await, "{what}: the connection is closed");
    }
    // The refusals left the gateway serving.
    let c = gw.connect(roles::TRUST).await;
    assert_eq!(int_column(&c, "SELECT 1").await, [1]);
}

/// Everything the server says at login and in answer to SET, RESET and a rolled-back SET
/// reaches the client verbatim and in the server's order, as it does on a direct connection:
/// ParameterStatus included (only BackendKeyData's secret is the gateway's own).
#[tokio::test]
async fn server_messages_match_a_direct_connection_byte_for_byte() {
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;
    let params = [
        ("user", roles::TRUST),
        ("database", "postgres"),
        ("application_name", "verbatim"),
        ("client_encoding", "latin1"),
        ("DateStyle", "sql, dmy"),
        (
            "options",
            "-c TimeZone=Europe/Vienna -c standard_conforming_strings=on",
        ),
    ];
    let script = [
        "SET TimeZone = 'Asia/Tokyo'; SET application_name = 'renamed'",
        "BEGIN; SET DateStyle = 'german'; SHOW DateStyle; ROLLBACK",
        "RESET ALL",
        "SELECT 1/0",
        "SHOW TimeZone",
    ];
    let transcript = |addr| async move {
        let mut rc = RawConn::open(addr).await;
        rc.send(&raw::startup(0, &params)).await;
        let mut all = rc.read_until(b'Z').await;
        for sql in script {
            rc.send(&raw::query(sql)).await;
            all.extend(rc.read_until(b'Z').await);
        }
        // The secret differs by design; the PID is the backend's own, checked elsewhere.
        for m in &mut all {
            if m.tag == b'K' {
                m.body.truncate(0);
            }
        }
        all.into_iter()
            .map(|m| (m.tag as char, String::from_utf8_lossy(&m.body).into_owned()))
            .collect::<Vec<_>>()
    };
    let direct = transcript(cluster.pg.primary.addr()).await;
    let through = transcript(gw.addr()).await;
    assert!(
        direct.iter().filter(|(t, _)| *t == 'S').count() > 10,
        "the server reported its parameters: {direct:?}"
    );
    assert_eq!(through, direct);
}

/// A result far larger than the gateway's buffers streams through with backpressure: while
/// the client does not read, the gateway does not buffer the result.
#[tokio::test]
async fn large_result_streams_with_bounded_memory() {
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;
    let mut rc = RawConn::login(gw.addr(), roles::TRUST).await;
    let rss_before = rss_kib();
    // ~200 MB of rows.
    rc.send(&raw::query(
        "SELECT repeat('x', 2000) FROM generate_series(1, 100000)",
    ))
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let grown = rss_kib().saturating_sub(rss_before);
    assert!(
        grown < 32 * 1024,
        "gateway grew by {grown} KiB while its client was not reading"
    );
    let mut rows = 0;
    loop {
        let m = rc.read().await.expect("result continues");
        match m.tag {
            b'D' => {
                rows += 1;
                assert_eq!(m.body.len(), 2 + 4 + 2000);
            }
            b'Z' => break,
            _ => {}
        }
    }
    assert_eq!(rows, 100_000);
}

/// A client that pipelines a million requests and reads no answer for a while does not make
/// the gateway keep a record of each request the server's socket buffers hold: it stops reading
/// from the client while thousands await their answers, as a full buffer makes it stop. A COPY
/// deep in such a pipeline still gets its data. Every answer then arrives, in order.
#[tokio::test]
async fn deep_pipeline_keeps_gateway_memory_bounded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const N: usize = 1_000_000;
    const COPY_AT: usize = 900_000;
    let cluster = Cluster::primary_only().await;
    cluster
        .superuser()
        .await
        .batch_execute("CREATE TABLE piped(a int); GRANT ALL ON piped TO PUBLIC")
        .await
        .unwrap();
    let gw = cluster.gateway().await;
    let mut rc = RawConn::login(gw.addr(), roles::TRUST).await;
    let mut pipeline = raw::query(";").repeat(COPY_AT);
    pipeline.extend(raw::query("COPY piped FROM STDIN"));
    pipeline.extend(raw::msg(b'd', b"7\n"));
    pipeline.extend(raw::msg(b'c', b""));
    pipeline.extend(raw::query(";").repeat(N - COPY_AT - 1));
    let rss_before = rss_kib();
    let (mut rd, mut wr) = rc.socket.split();
    let write = async { wr.write_all(&pipeline).await.unwrap() };
    let read = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let grown = rss_kib().saturating_sub(rss_before);
        // Answer tags in order: EmptyQueryResponse per ';', CopyInResponse and
        // CommandComplete for the COPY, a ReadyForQuery after each request.
        let (mut tags, mut buf) = (Vec::with_capacity(2 * N + 2), Vec::new());
        let mut chunk = vec![0u8; 1 << 16];
        while tags.iter().filter(|&&t| t == b'Z').count() < N {
            let n = rd.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed after {} answers", tags.len());
            buf.extend_from_slice(&chunk[..n]);
            let mut at = 0;
            while buf.len() - at >= 5 {
                let len = i32::from_be_bytes(buf[at + 1..at + 5].try_into().unwrap()) as usize;
                if buf.len() - at < 1 + len {
                    break;
                }
                tags.push(buf[at]);
                at += 1 + len;
            }
            buf.drain(..at);
        }
        (grown, tags)
    };
    let ((), (grown, tags)) = tokio::time::timeout(Duration::from_secs(120), async {
        tokio::join!(write, read)
    })
    .await
    .expect("the pipeline is answered");
    assert!(
        grown < 32 * 1024,
        "gateway grew by {grown} KiB while its client pipelined without reading"
    );
    let mut expected = [b'I', b'Z'].repeat(COPY_AT);
    expected.extend([b'G', b'C', b'Z']);
    expected.extend([b'I', b'Z'].repeat(N - COPY_AT - 1));
    assert!(tags == expected, "answers out of order");
    let rows = int_column(&gw.connect(roles::TRUST).await, "SELECT a FROM piped").await;
    assert_eq!(rows, [7]);
}

/// A bulk load through a gateway armed for failover is not kept for replay past
/// `failover.max_replay_bytes`: the journal gives up on a request group that large (it would
/// not be replayed anyway) instead of holding all of it, in autocommit and in a transaction.
#[tokio::test]
async fn bulk_copy_is_not_kept_past_max_replay_bytes() {
    const CHUNKS: usize = 96;
    let cluster = Cluster::primary_only().await;
    cluster
        .superuser()
        .await
        .batch_execute("CREATE TABLE bulk(a text); GRANT ALL ON bulk TO PUBLIC")
        .await
        .unwrap();
    let gw = cluster
        .gateway_with(|c| c.failover.max_replay_bytes = 1 << 20)
        .await;
    let c = gw.connect(roles::TRUST).await;
    // 1 MiB a chunk: 1,024 lines of 1,023 characters.
    let line = format!("{}\n", "b".repeat(1023));
    let chunk = bytes::Bytes::from(line.repeat(1024));
    for in_transaction in [false, true] {
        if in_transaction {
            c.batch_execute("BEGIN").await.unwrap();
        }
        let rss_before = rss_kib();
        let sink = c.copy_in("COPY bulk FROM STDIN").await.unwrap();
        futures_util::pin_mut!(sink);
        for _ in 0..CHUNKS {
            sink.send(chunk.clone()).await.unwrap();
        }
        let rows = sink.finish().await.unwrap();
        assert_eq!(rows, (CHUNKS * 1024) as u64);
        let grown = rss_kib().saturating_sub(rss_before);
        assert!(
            grown < 32 * 1024,
            "in transaction {in_transaction}: gateway grew by {grown} KiB over a {CHUNKS} MiB COPY"
        );
        if in_transaction {
            c.batch_execute("COMMIT").await.unwrap();
        }
    }
    let count: i64 = c
        .query_one("SELECT count(*) FROM bulk", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, (2 * CHUNKS * 1024) as i64);
}

/// Terminate closes the session and its backend at once.
#[tokio::test]
async fn terminate_closes_backend() {
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;
    let mut rc = RawConn::login(gw.addr(), roles::TRUST).await;
    cluster.wait_backends_named("raw", 1).await;
    rc.send(&raw::msg(b'X', b"")).await;
    assert!(rc.closed().await, "gateway closes after Terminate");
    cluster.wait_backends_named("raw", 0).await;
}

/// Requests a client sends just before it leaves (in one write with its Terminate, or before
/// it half-closes its socket) are answered as the server answers them directly, and then the
/// connection ends; each write lands once. So are extended-protocol requests flushed but not
/// synced in front of a Terminate. (The gateway used to close at once, answering nothing,
/// though the server still ran them.)
#[tokio::test]
async fn answers_owed_when_the_client_leaves_are_delivered() {
    let cluster = Cluster::primary_only().await;
    cluster
        .superuser()
        .await
        .batch_execute("CREATE TABLE owed(a int); GRANT ALL ON owed TO PUBLIC")
        .await
        .unwrap();
    let gw = cluster.gateway().await;
    let transcript = |addr, n: i32, half_close: bool, flushed_only: bool| async move {
        let mut rc = RawConn::login(addr, roles::TRUST).await;
        let mut requests = Vec::new();
        if !flushed_only {
            requests.extend(raw::query(&format!("INSERT INTO owed VALUES ({n})")));
            requests.extend(raw::query("SELECT 'last words'"));
        }
        if half_close {
            rc.send(&requests).await;
            rc.shutdown_write().await;
        } else {
            // Flushed, never synced: answered, but not committed.
            requests.extend(raw::parse("", "SELECT 'flushed words'"));
            requests.extend(raw::bind("", &[]));
            requests.extend(raw::msg(b'E', b"\0\0\0\0\0"));
            requests.extend(raw::msg(b'H', b""));
            requests.extend(raw::msg(b'X', b""));
            rc.send(&requests).await;
        }
        rc.read_to_end()
            .await
            .into_iter()
            .map(|m| (m.tag as char, String::from_utf8_lossy(&m.body).into_owned()))
            .collect::<Vec<_>>()
    };
    for (n, half_close, flushed_only) in [(1, false, false), (2, true, false), (3, false, true)] {
        let direct = transcript(cluster.pg.primary.addr(), n, half_close, flushed_only).await;
        assert_eq!(
            direct
                .iter()
                .any(|(t, b)| *t == 'D' && b.contains("last words")),
            !flushed_only,
            "{direct:?}"
        );
        assert_eq!(
            direct
                .iter()
                .any(|(t, b)| *t == 'D' && b.contains("flushed words")),
            !half_close,
            "{direct:?}"
        );
        let through = transcript(gw.addr(), n + 10, half_close, flushed_only).await;
        assert_eq!(
            through, direct,
            "half-closed: {half_close}, flushed only: {flushed_only}"
        );
    }
    let su = cluster.superuser().await;
    let rows = int_column(&su, "SELECT a FROM owed ORDER BY a").await;
    assert_eq!(rows, [1, 2, 11, 12]);
    cluster.wait_backends_named("raw", 0).await;
}

/// psql works through the gateway, including libpq's large-object API (FunctionCall) and
/// \copy; pgbench's transactions all land exactly once.
#[tokio::test]
async fn psql_large_objects_and_pgbench() {
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;
    let dir = std::env::temp_dir().join(format!("understudy-lo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let blob: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let src = dir.join("in.bin");
    let dst = dir.join("out.bin");
    std::fs::write(&src, &blob).unwrap();
    let conn = gw.conn_str(roles::SCRAM, "postgres");
    let script = format!(
        "\\lo_import {src}\n\\set oid :LASTOID\n\\lo_export :oid {dst}\nSELECT count(*) AS los FROM pg_largeobject_metadata;\n",
        src = src.display(),
        dst = dst.display()
    );
    let out = run_program(
        cluster.program("psql"),
        &["-X", "-v", "ON_ERROR_STOP=1", &conn],
        Some(script.as_bytes()),
    )
    .await;
    assert!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(&dst).unwrap(),
        blob,
        "large object round trip"
    );
    let _ = std::fs::remove_dir_all(&dir);

    let pgbench = cluster.program("pgbench");
    pgbench_init(&cluster, &conn).await;
    let run = run_program(
        pgbench,
        &[
            "-N", "-c", "4", "-j", "2", "-t", "200", "-M", "extended", &conn,
        ],
        None,
    )
    .await;
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "pgbench: {stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("number of transactions actually processed: 800/800"),
        "{stdout}"
    );
    let su = cluster.superuser().await;
    let history: i64 = su
        .query_one("SELECT count(*) FROM pgbench_history", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        history, 800,
        "every pgbench transaction landed exactly once"
    );
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A primary with a streaming standby, `sql` run there by the superuser (whose connection is
/// returned), and a gateway that could move sessions to the standby, so that it journals and
/// captures as in production.
async fn armed_after(
    sql: &str,
) -> (
    Cluster,
    tokio_postgres::Client,
    understudy_integration_tests::TestGateway,
) {
    let cluster = Cluster::primary_and_standby().await;
    let admin = cluster.superuser().await;
    admin.batch_execute(sql).await.unwrap();
    let gw = cluster.gateway().await;
    (cluster, admin, gw)
}

/// Logs in as [`login_with_pid`] does and sends each request, reading its answer up to its
/// ReadyForQuery: the answers as (type, text), a notification's without its sender's PID
/// (another backend each run), then the connection and its backend PID.
async fn answers(
    addr: std::net::SocketAddr,
    app: &str,
    requests: &[Vec<u8>],
) -> (Vec<Vec<(char, String)>>, RawConn, i32) {
    let (mut rc, pid) = login_with_pid(addr, app).await;
    let mut all = Vec::new();
    for request in requests {
        rc.send(request).await;
        let answer = rc.read_until(b'Z').await.into_iter().map(|m| {
            let body = if m.tag == b'A' {
                &m.body[4..]
            } else {
                &m.body[..]
            };
            (m.tag as char, String::from_utf8_lossy(body).into_owned())
        });
        all.push(answer.collect());
    }
    (all, rc, pid)
}

/// A raw connection logged in as the trust role with `application_name` `app`, and the
/// backend PID the login reported.
async fn login_with_pid(addr: std::net::SocketAddr, app: &str) -> (RawConn, i32) {
    let (rc, login) = RawConn::login_as_app(addr, roles::TRUST, app).await;
    let pid = login
        .iter()
        .find(|m| m.tag == b'K')
        .map(|m| i32::from_be_bytes(m.body[..4].try_into().unwrap()))
        .expect("BackendKeyData");
    (rc, pid)
}

/// Each message as its type and its body read as text, to compare and print.
fn as_text(msgs: Vec<raw::Msg>) -> Vec<(char, String)> {
    msgs.into_iter()
        .map(|m| (m.tag as char, String::from_utf8_lossy(&m.body).into_owned()))
        .collect()
}

/// The last statement text of `pid`'s backend, as the server saw it (`pg_stat_activity`).
/// The xid capture, as the server shows it in `pg_stat_activity`.
const XID_SQL: &str = "SELECT pg_catalog.pg_current_xact_id_if_assigned()";

async fn last_query(admin: &tokio_postgres::Client, pid: i32) -> String {
    admin
        .query_one("SELECT query FROM pg_stat_activity WHERE pid = $1", &[&pid])
        .await
        .unwrap()
        .get(0)
}

/// Tables whose writes commit or fail at the commit: `q`, and `c`, whose deferred foreign key
/// on `q` fails at the commit, and whose deferred trigger raises a notice there.
const COMMITS_CHECKED: &str = "CREATE TABLE q(a int PRIMARY KEY, b text);
    CREATE TABLE c(a int REFERENCES q DEFERRABLE INITIALLY DEFERRED);
    CREATE FUNCTION said() RETURNS trigger LANGUAGE plpgsql AS
      $$BEGIN RAISE NOTICE 'committing %', NEW.a; RETURN NULL; END$$;
    CREATE CONSTRAINT TRIGGER said AFTER INSERT ON c DEFERRABLE INITIALLY DEFERRED
      FOR EACH ROW EXECUTE FUNCTION said();";

/// A Query of one data change outside a transaction block, which a gateway armed for failover
/// sends as a batch with its xid query (flushed where in-flight commits are settled), is
/// answered exactly as directly: rows of a RETURNING, a write of no row, a unique violation, a
/// syntax error, a deferred constraint failing at the commit (its error replaces the
/// CommandComplete; a RETURNING of no row is still described), a notice raised during the
/// commit (before the CommandComplete), a ParameterStatus and a notification (after it), a
/// trailing comment, a row too large to be held whole, a `$` that keeps the Query as it is, and
/// a Query without the NUL that ends its text. The Query leaves no unnamed statement behind to
/// be bound again. (An audit found the RowDescription of no row dropped, the ParameterStatus
/// and notification ahead of the CommandComplete, and the write run twice by a Bind of the
/// unnamed statement.)
#[tokio::test]
async fn autocommit_queries_sent_as_batches_answer_as_directly() {
    let (cluster, admin, gw) = armed_after(&format!(
        "{COMMITS_CHECKED}
             CREATE TABLE skip(a int);
             CREATE FUNCTION elsewhere() RETURNS trigger LANGUAGE plpgsql AS
               $$BEGIN INSERT INTO c VALUES (NEW.a); RETURN NULL; END$$;
             CREATE TRIGGER elsewhere BEFORE INSERT ON skip
               FOR EACH ROW EXECUTE FUNCTION elsewhere();
             GRANT ALL ON q, c, skip TO PUBLIC"
    ))
    .await;
    let settling = cluster
        .gateway_with(|c| c.failover.settle_in_flight_autocommit = true)
        .await;
    let query = |sql: &str| (sql.to_owned(), raw::query(sql));
    let sync = raw::msg(b'S', b"");
    let script = [
        query("INSERT INTO q VALUES (1, 'x')"),
        query("INSERT INTO q VALUES (2, 'y') RETURNING a, b"),
        query("UPDATE q SET b = 'z' WHERE a = 99"),
        query("INSERT INTO q VALUES (1, 'again')"),
        query("INSERT INTO q VALUS (5)"),
        query("INSERT INTO c VALUES (42)"),
        query("INSERT INTO c VALUES (1);"),
        query("INSERT INTO q VALUES (3, 'w') -- the end"),
        query("INSERT INTO q VALUES (4, '$1')"),
        query("UPDATE q SET b = b WHERE a > 0 RETURNING 1 / (a - 2)"),
        query("WITH d AS (DELETE FROM q WHERE a = 4 RETURNING a) SELECT count(*) FROM d"),
        query("INSERT INTO q SELECT g, 'n' FROM generate_series(10, 20) g"),
        query("DELETE FROM q WHERE a >= 10 RETURNING *"),
        query("INSERT INTO q VALUES (30, repeat('x', 200000)) RETURNING b, a"),
        // Malformed: no NUL at the end of the text. The server refuses it.
        (
            "no NUL".to_owned(),
            raw::msg(b'Q', b"INSERT INTO q VALUES (31, 'x')"),
        ),
        // No row, and the commit fails: the statement ran, so its rows were described.
        query("INSERT INTO skip VALUES (77) RETURNING a"),
        // What the server says once the commit is done comes after the CommandComplete.
        query(
            "INSERT INTO q VALUES (50, 'p') RETURNING set_config('application_name', 'x', false)",
        ),
        query("LISTEN ch"),
        query("INSERT INTO q VALUES (51, 'n') RETURNING pg_notify('ch', 'x')"),
        // The Query ends the unnamed statement: binding it again afterwards fails, once.
        (
            "unnamed".to_owned(),
            [raw::parse("", "SELECT 'x'"), sync.clone()].concat(),
        ),
        query("INSERT INTO q VALUES (52, 'once')"),
        (
            "bind unnamed".to_owned(),
            [
                raw::bind("", &[]),
                raw::msg(b'E', b"\0\0\0\0\0"),
                sync.clone(),
            ]
            .concat(),
        ),
    ];
    let requests: Vec<_> = script.iter().map(|(_, bytes)| bytes.clone()).collect();
    let transcript = |addr| answers(addr, "queries", &requests);
    let reset = "TRUNCATE c, q, skip";
    let (direct, _, _) = transcript(cluster.pg.primary.addr()).await;
    let has = |i: usize, tag: char, text: &str| {
        direct[i]
            .iter()
            .any(|(t, body)| *t == tag && body.contains(text))
    };
    let tags = |i: usize| direct[i].iter().map(|(t, _)| *t).collect::<String>();
    assert!(has(1, 'D', "y") && has(3, 'E', "23505") && has(4, 'E', "42601"));
    assert!(
        has(5, 'E', "23503") && !has(5, 'C', "INSERT"),
        "{:?}",
        direct[5]
    );
    assert!(
        has(6, 'E', "23503") || has(6, 'N', "committing 1"),
        "{:?}",
        direct[6]
    );
    assert!(has(14, 'E', "08P01"), "{:?}", direct[14]);
    assert_eq!(
        (tags(15), tags(16), tags(18)),
        ("TEZ".into(), "TDCSZ".into(), "TDCAZ".into())
    );
    assert!(has(21, 'E', "26000"), "{:?}", direct[21]);
    for gw in [&gw, &settling] {
        admin.batch_execute(reset).await.unwrap();
        let (through, mut rc, pid) = transcript(gw.addr()).await;
        for (i, (through, direct)) in through.iter().zip(&direct).enumerate() {
            assert_eq!(through, direct, "{}", script[i].0);
        }
        // It was sent as a batch: the xid query ran last, in the write's transaction.
        rc.send(&raw::query("INSERT INTO q VALUES (7, 'v')")).await;
        rc.read_until(b'Z').await;
        assert_eq!(last_query(&admin, pid).await, XID_SQL);
        assert_eq!(
            int_column(&admin, "SELECT a FROM q ORDER BY a").await,
            [1, 2, 3, 7, 30, 50, 51, 52],
            "each write once"
        );
    }
}

/// A Query that writes outside a transaction block, which a gateway armed for failover sends with
/// its xid query in the same string (after its statements, or before the COMMIT of a whole block:
/// in the same transaction, before the commit), is answered exactly as directly: several statements
/// with rows between the writes, a later statement failing (the earlier ones were answered), a
/// syntax error, a deferred constraint failing at the commit (its error replaces the last
/// CommandComplete), a notice raised during the commit (before the last CommandComplete), a
/// ParameterStatus and a notification (after it), empty statements, a write of no row; lone
/// statements a batch cannot carry (a `$` in the text, a WITH form, a function that writes, its
/// commit failing); schema changes (a notice, one failing, one with a data change); several
/// statements of other kinds (SET, ANALYZE, LOCK, NOTIFY, COPY out, VACUUM refused); a whole
/// transaction block (the xid query before its COMMIT; that COMMIT failing; a statement failing
/// before it); COPY from the client (rows, a bad row, after an INSERT, its commit failing); text
/// that ends inside a literal or comment, a Query that only reads, and CREATE INDEX CONCURRENTLY,
/// which refuses a transaction block (nothing appended to any). Each acknowledged write is there
/// once, and the schema is the same.
#[tokio::test]
async fn autocommit_queries_carrying_the_xid_query_answer_as_directly() {
    let (cluster, admin, gw) = armed_after(&format!(
        "{COMMITS_CHECKED}
         CREATE FUNCTION add_child(i int, parent int) RETURNS int LANGUAGE sql
           AS $$ INSERT INTO q VALUES (i, 'f'); INSERT INTO c VALUES (parent); SELECT i $$;
         GRANT ALL ON q, c TO PUBLIC"
    ))
    .await;
    let script = [
        "INSERT INTO q VALUES (1, 'x'); INSERT INTO q VALUES (2, 'y')",
        "INSERT INTO q VALUES (3, 'z') RETURNING a, b; SELECT b FROM q WHERE a = 1",
        "INSERT INTO q VALUES (4, 'w'); INSERT INTO q VALUES (1, 'again')",
        "INSERT INTO q VALUES (5, 'v'); INSERT INTO q VALUS (6)",
        "INSERT INTO q VALUES (6, 'u'); INSERT INTO c VALUES (42)",
        "INSERT INTO q VALUES (7, 't'); INSERT INTO c VALUES (7);",
        "UPDATE q SET b = 's' WHERE a = 99; DELETE FROM q WHERE a = 98",
        "DELETE FROM q WHERE a = 2; SELECT 1 / 0",
        ";INSERT INTO q VALUES (8, 'r');; INSERT INTO q VALUES (9, 'q') -- the end",
        "LISTEN ch",
        "INSERT INTO q VALUES (10, 'p'); \
         SELECT set_config('application_name', 'renamed', false), pg_notify('ch', 'x')",
        "SELECT 1; SELECT count(*) FROM q",
        "INSERT INTO q VALUES (11, 'costs $5') RETURNING b",
        "WITH i AS (INSERT INTO q VALUES (12, 'n') RETURNING a) SELECT a + 1 FROM i",
        "SELECT add_child(13, 13)",
        "SELECT add_child(77, 78)",
        // Text ending inside a literal or comment: nothing is appended, which the server's
        // error would show.
        "INSERT INTO q VALUES (30, '$ open",
        "INSERT INTO q VALUES (31, 'a'); SELECT 1 /* open",
        // Schema changes, which run in a block as alone: a notice, a failing one, one after
        // a data change; and one PostgreSQL refuses in a block, which gets nothing appended.
        "CREATE TABLE d1 (a int PRIMARY KEY)",
        "CREATE TABLE IF NOT EXISTS d1 (a int)",
        "ALTER TABLE d1 ADD b text; CREATE INDEX ON d1 (b); INSERT INTO q VALUES (14, 'm')",
        "DROP TABLE IF EXISTS nothere; COMMENT ON TABLE d1 IS 'd'; TRUNCATE d1",
        "INSERT INTO d1 VALUES (1, 'x'); ALTER TABLE d1 ADD CHECK (b <> 'x')",
        "CREATE TABLE d2 (a int); CREATE TABLE d2 (a int)",
        "CREATE INDEX CONCURRENTLY ON d1 (a)",
        // Several statements of other kinds, which an implicit block holds already: a
        // setting (its ParameterStatus comes at the end), ANALYZE (a warning: not the owner),
        // LOCK, NOTIFY (heard after the commit), COPY out; VACUUM, refused in the block.
        "SET application_name = 'mixed'; INSERT INTO q VALUES (15, 'l')",
        "INSERT INTO q VALUES (16, 'k'); ANALYZE q",
        "LOCK TABLE q; UPDATE q SET b = 'j' WHERE a = 16; NOTIFY ch, 'y'",
        "INSERT INTO q VALUES (17, 'i'); COPY (SELECT a FROM q WHERE a > 15) TO STDOUT",
        "INSERT INTO q VALUES (18, 'h'); VACUUM q",
        // A whole transaction block: the xid query goes before its COMMIT, which answers once
        // it committed; a deferred constraint failing at that COMMIT; a statement failing,
        // which leaves the block open.
        "BEGIN; INSERT INTO q VALUES (19, 'g'); COMMIT",
        "begin;\ninsert into q values (20, 'f');;\nend;\n",
        "BEGIN; INSERT INTO c VALUES (99); COMMIT",
        "BEGIN; INSERT INTO q VALUES (1, 'dup'); COMMIT",
        "ROLLBACK",
    ];
    // COPY from the client, its data right behind the Query: rows, a bad row, after an
    // INSERT, and a deferred constraint failing at the commit (its error in the COPY's
    // CommandComplete's place).
    let copies: [(&str, &[u8]); 4] = [
        ("COPY q (a, b) FROM STDIN", b"40\tcopied\n41\tcopied\n"),
        ("COPY q (a, b) FROM STDIN", b"42\tok\nbad\n"),
        (
            "INSERT INTO q VALUES (43, 'e'); COPY q (a, b) FROM STDIN",
            b"44\tcopied\n",
        ),
        ("COPY c FROM STDIN", b"98\n"),
    ];
    let copy = |sql: &str, data: &[u8]| {
        [raw::query(sql), raw::msg(b'd', data), raw::msg(b'c', b"")].concat()
    };
    let labels: Vec<&str> = script
        .iter()
        .chain(copies.iter().map(|(sql, _)| sql))
        .copied()
        .collect();
    let requests: Vec<_> = script
        .iter()
        .map(|sql| raw::query(sql))
        .chain(copies.iter().map(|(sql, data)| copy(sql, data)))
        .collect();
    let transcript = |addr| answers(addr, "several", &requests);
    let (direct, _, _) = transcript(cluster.pg.primary.addr()).await;
    let tags = |i: usize| direct[i].iter().map(|(t, _)| *t).collect::<String>();
    assert_eq!(
        (0..labels.len()).map(tags).collect::<Vec<_>>(),
        [
            "CCZ", "TDCTDCZ", "CEZ", "EZ", "CEZ", "CNCZ", "CCZ", "CEZ", "CCZ", "CZ", "CTDCASZ",
            "TDCTDCZ", "TDCZ", "TDCZ", "TDNCZ", "TDEZ", "EZ", "EZ", "CZ", "NCZ", "CCCZ", "NCCCZ",
            "CEZ", "CEZ", "CZ", "CCSZ", "CNCZ", "CCCAZ", "CHddcCZ", "CEZ", "CCCZ", "CCCZ", "CCEZ",
            "CEZ", "CZ", "GCZ", "GEZ", "CGCZ", "GEZ"
        ],
        "{direct:?}"
    );
    let rows = "SELECT a FROM q ORDER BY a";
    let written = int_column(&admin, rows).await;
    assert_eq!(
        written,
        [1, 2, 3, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 19, 20, 40, 41, 43, 44]
    );
    let schema = "SELECT string_agg(relname, ' ' ORDER BY relname) FROM pg_class \
                  WHERE relname ~ '^d[0-9]' AND relkind IN ('r', 'i')";
    let made = admin
        .query_one(schema, &[])
        .await
        .unwrap()
        .get::<_, String>(0);
    assert_eq!(made, "d1 d1_a_idx d1_b_idx d1_pkey");
    admin
        .batch_execute("TRUNCATE c, q; DROP TABLE d1")
        .await
        .unwrap();
    let (through, mut rc, pid) = transcript(gw.addr()).await;
    for (i, (through, direct)) in through.iter().zip(&direct).enumerate() {
        assert_eq!(through, direct, "{}", labels[i]);
    }
    assert_eq!(int_column(&admin, rows).await, written, "each write once");
    let again = admin
        .query_one(schema, &[])
        .await
        .unwrap()
        .get::<_, String>(0);
    assert_eq!(again, made);
    let block = "BEGIN; INSERT INTO q VALUES (25, 'l'); COMMIT";
    rc.send(&raw::query(block)).await;
    rc.read_until(b'Z').await;
    assert_eq!(
        last_query(&admin, pid).await,
        format!("BEGIN; INSERT INTO q VALUES (25, 'l');{XID_SQL} AS understudy_xid; COMMIT")
    );
    rc.send(&copy("COPY q (a, b) FROM STDIN", b"45\tz\n")).await;
    rc.read_until(b'Z').await;
    assert_eq!(
        last_query(&admin, pid).await,
        format!("COPY q (a, b) FROM STDIN\n;{XID_SQL} AS understudy_xid")
    );
    // The xid query ran in the string, after the client's statements.
    for sql in [
        "INSERT INTO q VALUES (21, 'o'); INSERT INTO q VALUES (22, 'n')",
        "INSERT INTO q VALUES (23, '$')",
        "CREATE TABLE d3 (a int)",
        "INSERT INTO q VALUES (24, 'm'); ANALYZE q",
    ] {
        rc.send(&raw::query(sql)).await;
        rc.read_until(b'Z').await;
        let ran = last_query(&admin, pid).await;
        assert_eq!(ran, format!("{sql}\n;{XID_SQL} AS understudy_xid"));
    }
}

/// A Query sent after extended-protocol requests without a Sync is skipped by the server when
/// one of those requests fails, up to the Sync, whose one ReadyForQuery answers them all. The
/// gateway keeps count: the client gets what it would directly, before and after (writes sent
/// as batches, an autocommit batch, a transaction), and the session is at a transaction
/// boundary at the end (a pause holds it). Without a failure each is answered. (The gateway
/// counted one ReadyForQuery too many from then on, and answers to its own queries leaked to
/// the client.)
#[tokio::test]
async fn a_query_skipped_to_the_sync_leaves_the_count_of_answers_right() {
    let (cluster, admin, gw) =
        armed_after("CREATE TABLE w(a int PRIMARY KEY); GRANT ALL ON w TO PUBLIC").await;
    let sync = raw::msg(b'S', b"");
    let execute = raw::msg(b'E', b"\0\0\0\0\0");
    let insert = |a: i32| {
        [
            raw::parse("", &format!("INSERT INTO w VALUES ({a})")),
            raw::bind("", &[]),
            execute.clone(),
        ]
        .concat()
    };
    // What is sent, and how many ReadyForQuery answer it.
    let script: Vec<(Vec<u8>, usize)> = vec![
        (
            [
                raw::bind("nosuch", &[]),
                execute.clone(),
                raw::query("INSERT INTO w VALUES (100)"),
                raw::query("INSERT INTO w VALUES (101)"),
                sync.clone(),
            ]
            .concat(),
            1,
        ),
        (raw::query("INSERT INTO w VALUES (1)"), 1),
        ([insert(2), sync.clone()].concat(), 1),
        (
            [
                insert(3),
                raw::query("INSERT INTO w VALUES (4)"),
                sync.clone(),
            ]
            .concat(),
            2,
        ),
        (
            [
                raw::query("BEGIN"),
                insert(5),
                raw::query("COMMIT"),
                sync.clone(),
            ]
            .concat(),
            3,
        ),
        (
            [
                insert(1),
                raw::query("INSERT INTO w VALUES (102)"),
                sync.clone(),
            ]
            .concat(),
            1,
        ),
        (raw::query("INSERT INTO w VALUES (6) RETURNING a"), 1),
    ];
    let transcript = |addr| {
        let script = script.clone();
        async move {
            let (mut rc, _) = RawConn::login_as_app(addr, roles::TRUST, "skipped").await;
            let mut all = Vec::new();
            for (bytes, readies) in script {
                rc.send(&bytes).await;
                for _ in 0..readies {
                    all.extend(as_text(rc.read_until(b'Z').await));
                }
            }
            (all, rc)
        }
    };
    let (direct, _) = transcript(cluster.pg.primary.addr()).await;
    assert!(direct.iter().any(|(t, b)| *t == 'E' && b.contains("26000")));
    let rows = int_column(&admin, "SELECT a FROM w ORDER BY a").await;
    assert_eq!(rows, [1, 2, 3, 4, 5, 6], "the skipped ones are not run");
    admin.batch_execute("TRUNCATE w").await.unwrap();
    let (through, _rc) = transcript(gw.addr()).await;
    assert_eq!(through, direct);
    assert_eq!(int_column(&admin, "SELECT a FROM w ORDER BY a").await, rows);
    let (status, body) = gw.admin_post("/pause?timeout_ms=5000").await;
    assert_eq!(
        status, 200,
        "every session at a transaction boundary: {body}"
    );
    gw.admin_post("/resume").await;
}

/// The server runs what the client sends and nothing more unless a session could move: with a
/// second backend, a lone write in a transaction block carries the xid query, and so do
/// autocommit writes (a Query of two INSERTs in the same string), but for one with another
/// kind of statement, which the WAL position query follows; with one backend (or
/// `promote = "off"`) neither is sent, so revoking the function the capture uses changes
/// nothing, and `/status` says why failover is off.
#[tokio::test]
async fn sessions_that_cannot_move_get_no_capture_statements() {
    let cluster = Cluster::primary_and_standby().await;
    let admin = cluster.superuser().await;
    admin
        .batch_execute("CREATE TABLE y(a int); GRANT ALL ON y TO PUBLIC")
        .await
        .unwrap();
    let primary = cluster.pg.primary.addr().to_string();
    let armed = cluster.gateway().await;
    let single = cluster
        .gateway_with(|c| c.backends = vec![primary.clone()])
        .await;
    let off = cluster
        .gateway_with(|c| c.failover.promote = understudy::config::Promote::Off)
        .await;
    let write = "INSERT INTO y VALUES (1)";

    let a = armed.connect(roles::SCRAM).await;
    let a_pid = backend_pid(&a).await;
    a.batch_execute("BEGIN").await.unwrap();
    a.batch_execute(write).await.unwrap();
    let text = last_query(&admin, a_pid).await;
    assert!(
        text.starts_with(write) && text.contains("pg_current_xact_id_if_assigned()"),
        "{text:?}"
    );
    a.batch_execute("COMMIT").await.unwrap();
    // An autocommit write is sent as a batch with the xid query in front of its Sync.
    a.batch_execute(write).await.unwrap();
    assert_eq!(last_query(&admin, a_pid).await, XID_SQL);
    // Two in one string carry the xid query after them.
    let writes = format!("{write}; {write}");
    a.batch_execute(&writes).await.unwrap();
    assert_eq!(
        last_query(&admin, a_pid).await,
        format!("{writes}\n;{XID_SQL} AS understudy_xid")
    );
    // A transaction block with more after it in one string cannot: the WAL position query
    // follows its answer.
    let mixed = format!("BEGIN; {write}; COMMIT; SELECT 1");
    a.batch_execute(&mixed).await.unwrap();
    let mut text = String::new();
    for _ in 0..50 {
        text = last_query(&admin, a_pid).await;
        if text != mixed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(text.contains("pg_current_wal_insert_lsn()"), "{text:?}");

    for (gw, why) in [(&single, "only one backend"), (&off, "promote")] {
        let c = gw.connect(roles::SCRAM).await;
        let c_pid = backend_pid(&c).await;
        c.batch_execute("BEGIN").await.unwrap();
        c.batch_execute(write).await.unwrap();
        assert_eq!(last_query(&admin, c_pid).await, write);
        c.batch_execute("COMMIT").await.unwrap();
        c.batch_execute(write).await.unwrap();
        // Time for a query behind the answer to show, had the gateway sent one.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(last_query(&admin, c_pid).await, write);
        let status = gw.status().await;
        assert_eq!(status["failover"], "off", "{status:#}");
        let reason = status["failover_off"].as_str().unwrap_or_default();
        assert!(reason.contains(why), "{status:#}");
        // Nor is any of its sessions movable, whatever it holds.
        let session = gw.session_status(&c).await;
        assert_eq!(session["movable"], "no", "{session:#}");
        let reason = session["reason"].as_str().unwrap_or_default();
        assert!(
            reason.starts_with("failover is off") && reason.contains(why),
            "{session:#}"
        );
    }

    admin
        .batch_execute("REVOKE EXECUTE ON FUNCTION pg_current_xact_id_if_assigned() FROM PUBLIC")
        .await
        .unwrap();
    let c = single.connect(roles::SCRAM).await;
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute(write).await.unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    c.batch_execute("BEGIN; INSERT INTO y VALUES (1)")
        .await
        .unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    let n: i64 = admin
        .query_one("SELECT count(*) FROM y", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 11);
}

/// A Sync or Flush sent during COPY data is ignored by the server, so the gateway must not count
/// it as owed a ReadyForQuery: the client gets exactly the server's answers, and once every
/// session is idle a shutdown closes them at once instead of waiting out `shutdown_timeout_ms`. Both
/// for a gateway armed for failover and for one that cannot move sessions (which keeps no
/// journal), in the simple and the extended protocol.
#[tokio::test]
async fn syncs_during_copy_data_are_owed_nothing() {
    let cluster = Cluster::primary_only().await;
    let admin = cluster.superuser().await;
    admin
        .batch_execute("CREATE TABLE cp(a int); GRANT ALL ON cp TO PUBLIC")
        .await
        .unwrap();
    let primary = cluster.pg.primary.addr().to_string();
    for (armed, n) in [(true, 0), (false, 4)] {
        let gw = cluster
            .gateway_with(|c| {
                c.backends = vec![primary.clone()];
                if armed {
                    c.backends
                        .push(understudy_integration_tests::DOWN_STANDBY.to_owned());
                }
                c.shutdown_timeout_ms = 10_000;
            })
            .await;
        let failover = &gw.status().await["failover"];
        assert_eq!(failover == "off", !armed, "{failover}");

        let mut raw = RawConn::login(gw.addr(), roles::TRUST).await;
        raw.send(&raw::query("copy cp from stdin")).await;
        assert_eq!(raw::tags(&raw.read_until(b'G').await), "G");
        let mut data = raw::msg(b'd', format!("{}\n", n + 1).as_bytes());
        data.extend(raw::msg(b'S', b""));
        data.extend(raw::msg(b'H', b""));
        data.extend(raw::msg(b'd', format!("{}\n", n + 2).as_bytes()));
        data.extend(raw::msg(b'c', b""));
        raw.send(&data).await;
        assert_eq!(raw::tags(&raw.read_until(b'Z').await), "CZ");
        // The extended protocol, the Sync right behind the Execute.
        let mut batch = raw::msg(b'P', b"\0COPY cp FROM STDIN\0\0\0");
        batch.extend(raw::msg(b'B', b"\0\0\0\0\0\0\0\0"));
        batch.extend(raw::msg(b'E', b"\0\0\0\0\0"));
        batch.extend(raw::msg(b'S', b""));
        raw.send(&batch).await;
        assert_eq!(raw::tags(&raw.read_until(b'G').await), "12G");
        let mut data = raw::msg(b'd', format!("{}\n", n + 3).as_bytes());
        data.extend(raw::msg(b'c', b""));
        data.extend(raw::msg(b'S', b""));
        raw.send(&data).await;
        assert_eq!(raw::tags(&raw.read_until(b'Z').await), "CZ");
        raw.send(&raw::query("SELECT 1")).await;
        assert_eq!(raw::tags(&raw.read_until(b'Z').await), "TDCZ");

        let c = gw.connect(roles::SCRAM).await;
        let sink = c.copy_in("COPY cp FROM STDIN").await.unwrap();
        futures_util::pin_mut!(sink);
        sink.send(bytes::Bytes::from(format!("{}\n", n + 4)))
            .await
            .unwrap();
        assert_eq!(sink.finish().await.unwrap(), 1);

        let started = std::time::Instant::now();
        gw.shutdown().await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "armed: {armed}: idle sessions waited {:?} to be closed",
            started.elapsed()
        );
    }
    let rows = int_column(&admin, "SELECT a FROM cp ORDER BY a").await;
    assert_eq!(rows, (1..=8).collect::<Vec<_>>());
}

/// The gateway's own queries name what they call with its schema: a session whose
/// `search_path` puts a function called like the xid query's before `pg_catalog` does not have
/// it run in their place (it would fail the write, or forge the xid the failover checks). An
/// autocommit Query, an autocommit batch, a lone write in a block and a COMMIT all commit, and
/// the capture stays on.
#[tokio::test]
async fn the_gateways_queries_are_not_taken_in_by_the_search_path() {
    let (_cluster, admin, gw) = armed_after(
        "CREATE TABLE sp(a int); GRANT ALL ON sp TO PUBLIC;
         CREATE FUNCTION public.pg_current_xact_id_if_assigned() RETURNS xid8
           LANGUAGE plpgsql AS $$BEGIN RAISE EXCEPTION 'impostor'; END$$;
         GRANT EXECUTE ON FUNCTION public.pg_current_xact_id_if_assigned() TO PUBLIC",
    )
    .await;
    let c = gw.connect(roles::SCRAM).await;
    let pid = backend_pid(&c).await;
    c.batch_execute("SET search_path = public, pg_catalog")
        .await
        .unwrap();
    let impostor = c
        .batch_execute("SELECT pg_current_xact_id_if_assigned()")
        .await
        .unwrap_err();
    // The session's own calls do find it.
    assert_eq!(sqlstate(&impostor), Some("P0001"), "{impostor:?}");
    c.batch_execute("INSERT INTO sp VALUES (1)").await.unwrap();
    c.execute("INSERT INTO sp VALUES ($1)", &[&2])
        .await
        .unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("INSERT INTO sp VALUES (3)").await.unwrap();
    c.batch_execute("INSERT INTO sp VALUES (4)").await.unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        int_column(&admin, "SELECT a FROM sp ORDER BY a").await,
        [1, 2, 3, 4]
    );
    c.batch_execute("INSERT INTO sp VALUES (5)").await.unwrap();
    assert_eq!(last_query(&admin, pid).await, XID_SQL);
}

/// The xid the gateway captures before the COMMIT of a writing transaction never shows: the
/// client gets exactly the server's answer to its COMMIT, in the simple and the extended
/// protocol. If the capture itself fails (EXECUTE on the function revoked after the session
/// logged in), the COMMIT is answered with that error rather than a silent "ROLLBACK", and the
/// session's later transactions commit without the capture; a session logging in once the
/// gateway knows (it asks at login) does without it from its start.
#[tokio::test]
async fn commit_answers_hide_the_xid_capture_and_a_failed_capture_is_no_silent_rollback() {
    // A standby to move to, or the gateway would capture nothing.
    let (_cluster, admin, gw) =
        armed_after("CREATE TABLE x(a int); GRANT ALL ON x TO PUBLIC").await;
    let tags = as_text;
    let mut c = RawConn::login(gw.addr(), roles::TRUST).await;
    c.send(&raw::query("BEGIN; INSERT INTO x VALUES (1)")).await;
    c.read_until(b'Z').await;
    c.send(&raw::query("COMMIT")).await;
    assert_eq!(
        tags(c.read_until(b'Z').await),
        [('C', "COMMIT\0".into()), ('Z', "I".into())]
    );
    c.send(&raw::query("BEGIN; INSERT INTO x VALUES (2)")).await;
    c.read_until(b'Z').await;
    let mut batch = raw::msg(b'P', b"\0COMMIT\0\0\0");
    batch.extend(raw::msg(b'B', b"\0\0\0\0\0\0\0\0"));
    batch.extend(raw::msg(b'E', b"\0\0\0\0\0"));
    batch.extend(raw::msg(b'S', b""));
    c.send(&batch).await;
    assert_eq!(
        tags(c.read_until(b'Z').await),
        [
            ('1', String::new()),
            ('2', String::new()),
            ('C', "COMMIT\0".into()),
            ('Z', "I".into())
        ]
    );
    // A writing statement sent on its own in a transaction block carries the xid query after
    // it, in the same string: the answer is still the statement's alone.
    c.send(&raw::query("BEGIN")).await;
    c.read_until(b'Z').await;
    c.send(&raw::query(
        "INSERT INTO x VALUES (10) RETURNING a -- a comment the newline ends",
    ))
    .await;
    let answer = tags(c.read_until(b'Z').await);
    let kinds: String = answer.iter().map(|(t, _)| *t).collect();
    assert_eq!(kinds, "TDCZ", "{answer:?}");
    assert_eq!(answer[2].1, "INSERT 0 1\0");
    assert_eq!(answer[3].1, "T");
    c.send(&raw::query("COMMIT")).await;
    assert_eq!(
        tags(c.read_until(b'Z').await),
        [('C', "COMMIT\0".into()), ('Z', "I".into())]
    );

    // Sessions that logged in while the role could run the capture (the gateway asked at the
    // first login and keeps the answer a minute)...
    let s = gw.connect(roles::SCRAM).await;
    let w = gw.connect(roles::SCRAM).await;
    let e = gw.connect(roles::SCRAM).await;
    let b = gw.connect(roles::SCRAM).await;
    admin
        .batch_execute("REVOKE EXECUTE ON FUNCTION pg_current_xact_id_if_assigned() FROM PUBLIC")
        .await
        .unwrap();
    // ...find out at their first capture. The failed capture aborted the transaction, so the
    // server answers the COMMIT "ROLLBACK"; the client gets the capture's error instead, and
    // the transaction is over.
    s.batch_execute("BEGIN; INSERT INTO x VALUES (3)")
        .await
        .unwrap();
    let err = s.batch_execute("COMMIT").await.unwrap_err();
    assert_eq!(sqlstate(&err), Some("42501"), "{err}");
    s.batch_execute("BEGIN; INSERT INTO x VALUES (4)")
        .await
        .unwrap();
    s.batch_execute("COMMIT").await.unwrap();
    // The xid query after a write: the write's string fails with its error, as a whole.
    w.batch_execute("BEGIN").await.unwrap();
    let err = w
        .batch_execute("INSERT INTO x VALUES (7)")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), Some("42501"), "{err}");
    w.batch_execute("ROLLBACK").await.unwrap();
    w.batch_execute("BEGIN").await.unwrap();
    w.batch_execute("INSERT INTO x VALUES (8)").await.unwrap();
    w.batch_execute("COMMIT").await.unwrap();
    // The same in the extended protocol.
    e.batch_execute("BEGIN; INSERT INTO x VALUES (5)")
        .await
        .unwrap();
    let err = e.execute("COMMIT", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), Some("42501"), "{err}");
    e.batch_execute("BEGIN; INSERT INTO x VALUES (6)")
        .await
        .unwrap();
    e.execute("COMMIT", &[]).await.unwrap();
    // An autocommit batch asks in its own transaction, which the failure aborts: the write
    // fails with the capture's error, and the session takes the WAL position after its writes
    // from then on.
    let err = b
        .execute("INSERT INTO x VALUES (13)", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), Some("42501"), "{err}");
    assert_eq!(
        b.execute("INSERT INTO x VALUES (14)", &[]).await.unwrap(),
        1
    );
    // A session that logs in after the failures (which the gateway noted), or as a role it
    // asks about only now, does without the capture from its start: none of its writes fails.
    for (role, first) in [(roles::SCRAM, 20), (roles::MD5, 30)] {
        let n = gw.connect(role).await;
        n.batch_execute(&format!("BEGIN; INSERT INTO x VALUES ({first})"))
            .await
            .unwrap();
        n.batch_execute("COMMIT").await.unwrap();
        n.batch_execute("BEGIN").await.unwrap();
        n.batch_execute(&format!("INSERT INTO x VALUES ({})", first + 1))
            .await
            .unwrap();
        n.execute("COMMIT", &[]).await.unwrap();
        n.execute(&format!("INSERT INTO x VALUES ({})", first + 2), &[])
            .await
            .unwrap();
        n.batch_execute(&format!("INSERT INTO x VALUES ({})", first + 3))
            .await
            .unwrap();
    }
    // The answer is kept per login, its `options` included: a login that runs as a role that
    // may run the capture (`-c role=…`) asks for itself, and captures; the login role's own
    // sessions still do without.
    admin
        .batch_execute(&format!(
            "GRANT EXECUTE ON FUNCTION pg_current_xact_id_if_assigned() TO {md5};
             GRANT {md5} TO {scram}",
            md5 = roles::MD5,
            scram = roles::SCRAM
        ))
        .await
        .unwrap();
    let mut config = gw.pg_config(roles::SCRAM);
    config.options(format!("-c role={}", roles::MD5));
    let (as_md5, conn) = config.connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    let plain = gw.connect(roles::SCRAM).await;
    for (session, a, captures) in [(&as_md5, 40, true), (&plain, 41, false)] {
        let pid = backend_pid(session).await;
        session
            .execute(&format!("INSERT INTO x VALUES ({a})"), &[])
            .await
            .unwrap();
        let last = last_query(&admin, pid).await;
        assert_eq!(last == XID_SQL, captures, "{a}: {last}");
    }

    let rows = admin
        .query("SELECT a FROM x ORDER BY a", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, i32>(0))
        .collect::<Vec<_>>();
    assert_eq!(
        rows,
        [1, 2, 4, 6, 8, 10, 14, 20, 21, 22, 23, 30, 31, 32, 33, 40, 41]
    );
}

/// The question a gateway armed for failover asks at login (may the session run the xid
/// capture) is its own: a client that has the server's statement log sent to it
/// (`client_min_messages = log`) sees its own statements logged, not the question.
#[tokio::test]
async fn the_login_question_is_not_shown_to_the_client() {
    let (_cluster, _admin, gw) = armed_after("SELECT 1").await;
    let mut config = gw.pg_config(roles::SUPERUSER);
    config.options("-c log_statement=all -c client_min_messages=log");
    let (c, mut rx) = connect_with_messages(&config).await;
    c.batch_execute("SELECT 'mine'").await.unwrap();
    let mut logged = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
        if let AsyncMessage::Notice(n) = m {
            logged.push(n.message().to_owned());
        }
    }
    assert!(
        logged.iter().any(|m| m.contains("SELECT 'mine'")),
        "{logged:?}"
    );
    assert!(
        !logged.iter().any(|m| m.contains("has_function_privilege")),
        "{logged:?}"
    );
}

/// The unnamed prepared statement lasts until the next unnamed Parse or simple Query the
/// client sends, across Syncs and transactions; the queries a gateway armed for failover
/// slips in (a write's WAL position, the xid before a COMMIT) must not end it, or the client's
/// next Bind of it fails with 26000 (libpq's `PQprepare(conn, "", …)` then `PQexecPrepared`, or
/// a driver that parses and binds in separate round trips, as pg8000 does).
#[tokio::test]
async fn the_unnamed_statement_outlives_the_gateways_own_queries() {
    let cluster = Cluster::primary_and_standby().await;
    let admin = cluster.superuser().await;
    admin
        .batch_execute("CREATE TABLE un(a int PRIMARY KEY); GRANT ALL ON un TO PUBLIC")
        .await
        .unwrap();
    let gw = cluster.failover_gateway().await;
    let tags = raw::tags;
    let mut c = RawConn::login(gw.addr(), roles::TRUST).await;

    // Autocommit writes: each is followed by the WAL-position query.
    let mut prepare = raw::parse("", "INSERT INTO un VALUES ($1)");
    prepare.extend(raw::msg(b'S', b""));
    c.send(&prepare).await;
    assert_eq!(tags(&c.read_until(b'Z').await), "1Z");
    for a in ["1", "2", "3"] {
        c.send(&raw::bind_execute_sync("", &[a])).await;
        let answer = c.read_until(b'Z').await;
        assert_eq!(tags(&answer), "2CZ", "insert {a}: {answer:?}");
    }

    // A transaction that wrote, committed with an unnamed COMMIT parsed beforehand: the xid
    // is asked for before the COMMIT runs.
    c.send(&raw::query("BEGIN")).await;
    c.read_until(b'Z').await;
    c.send(&prepare).await;
    assert_eq!(tags(&c.read_until(b'Z').await), "1Z");
    c.send(&raw::bind_execute_sync("", &["4"])).await;
    assert_eq!(tags(&c.read_until(b'Z').await), "2CZ");
    let mut commit = raw::parse("", "COMMIT");
    commit.extend(raw::msg(b'S', b""));
    c.send(&commit).await;
    assert_eq!(tags(&c.read_until(b'Z').await), "1Z");
    c.send(&raw::bind_execute_sync("", &[])).await;
    let answer = c.read_until(b'Z').await;
    assert_eq!(tags(&answer), "2CZ", "{answer:?}");
    assert_eq!(answer.last().unwrap().body, b"I");

    // Still there after the transaction, and until a simple Query ends it, as directly.
    c.send(&raw::bind_execute_sync("", &[])).await;
    let answer = c.read_until(b'Z').await;
    assert_eq!(
        tags(&answer),
        "2NCZ",
        "a COMMIT outside a transaction warns: {answer:?}"
    );
    c.send(&raw::query("SELECT 1")).await;
    c.read_until(b'Z').await;
    c.send(&raw::bind_execute_sync("", &[])).await;
    let answer = c.read_until(b'Z').await;
    assert_eq!(tags(&answer), "EZ", "{answer:?}");
    assert_eq!(answer[0].code(), "26000");
    assert_eq!(
        int_column(&admin, "SELECT a FROM un ORDER BY a").await,
        [1, 2, 3, 4]
    );
}

/// Autocommit batches that write, through a gateway that could move the session (so the xid
/// query goes in front of each batch's Sync; with `failover.settle_in_flight_autocommit`, and
/// a Flush), answer exactly as directly: rows from a Describe'd portal, an Execute with a row
/// limit and its PortalSuspended, two batches pipelined, a statement Described and Closed in
/// the batch, an empty query, answers read after a Flush before the Sync, a failing batch, a
/// simple Query, schema changes, COPY (rows, a bad row).
#[tokio::test]
async fn autocommit_batches_answer_as_directly() {
    use postgres_protocol::message::frontend;
    let cluster = Cluster::primary_and_standby().await;
    cluster
        .superuser()
        .await
        .batch_execute("CREATE TABLE z(a int); GRANT ALL ON z TO PUBLIC")
        .await
        .unwrap();
    let gw = cluster.gateway().await;
    let settling = cluster
        .gateway_with(|c| c.failover.settle_in_flight_autocommit = true)
        .await;
    let bind = raw::bind;
    let execute = |max_rows: i32| {
        let mut buf = bytes::BytesMut::new();
        frontend::execute("", max_rows, &mut buf).unwrap();
        buf.to_vec()
    };
    let describe = |kind: u8, name: &str| {
        let mut buf = bytes::BytesMut::new();
        frontend::describe(kind, name, &mut buf).unwrap();
        buf.to_vec()
    };
    let close = |name: &str| {
        let mut buf = bytes::BytesMut::new();
        frontend::close(b'S', name, &mut buf).unwrap();
        buf.to_vec()
    };
    let sync = raw::msg(b'S', b"");
    let flush = raw::msg(b'H', b"");
    let ins = "INSERT INTO z SELECT generate_series(1, $1::int) RETURNING a";
    let copy_batch = |data: &[u8]| {
        [
            raw::parse("", "COPY z FROM STDIN"),
            bind("", &[]),
            execute(0),
            sync.clone(),
            raw::msg(b'd', data),
            raw::msg(b'c', b""),
            sync.clone(),
        ]
        .concat()
    };
    // Each step: what is sent, then how many ReadyForQuery to read (0: read up to a
    // CommandComplete instead).
    let script: Vec<(Vec<u8>, usize)> = vec![
        ([raw::parse("ins", ins), sync.clone()].concat(), 1),
        (
            [
                bind("ins", &["3"]),
                describe(b'P', ""),
                execute(0),
                sync.clone(),
            ]
            .concat(),
            1,
        ),
        (
            [bind("ins", &["5"]), execute(2), execute(0), sync.clone()].concat(),
            1,
        ),
        (
            [
                bind("ins", &["1"]),
                execute(0),
                sync.clone(),
                bind("ins", &["2"]),
                execute(0),
                sync.clone(),
            ]
            .concat(),
            2,
        ),
        (
            [
                raw::parse("upd", "UPDATE z SET a = a + 10 WHERE a = $1"),
                describe(b'S', "upd"),
                bind("upd", &["1"]),
                execute(0),
                close("upd"),
                raw::parse("", ""),
                bind("", &[]),
                execute(0),
                sync.clone(),
            ]
            .concat(),
            1,
        ),
        ([bind("ins", &["2"]), execute(0), flush.clone()].concat(), 0),
        (sync.clone(), 1),
        (
            [
                bind("ins", &["1"]),
                execute(0),
                raw::parse("", "INSERT INTO z VALUES (1/0)"),
                bind("", &[]),
                execute(0),
                sync.clone(),
            ]
            .concat(),
            1,
        ),
        (raw::query("DELETE FROM z WHERE a > 2"), 1),
        // COPY: the Sync sent before the data is discarded; the one after it ends the batch.
        (copy_batch(b"7\n8\n"), 1),
        (copy_batch(b"9\nnine\n"), 1),
        (raw::query("TABLE z"), 1),
        (raw::query("DELETE FROM z"), 1),
        // Schema changes: they run in the batch's transaction too.
        (raw::batch(&["CREATE TABLE zz (a int)"]), 1),
        (
            raw::batch(&["ALTER TABLE zz ADD b int", "CREATE TABLE zz (a int)"]),
            1,
        ),
        (
            raw::batch(&["INSERT INTO zz VALUES (1)", "DROP TABLE zz"]),
            1,
        ),
    ];
    let transcript = |addr| {
        let script = script.clone();
        async move {
            let (mut rc, pid) = login_with_pid(addr, "batches").await;
            let mut all = Vec::new();
            for (bytes, readies) in script {
                rc.send(&bytes).await;
                if readies == 0 {
                    all.extend(rc.read_until(b'C').await);
                }
                for _ in 0..readies {
                    all.extend(rc.read_until(b'Z').await);
                }
            }
            let all = all
                .into_iter()
                .map(|m| (m.tag as char, String::from_utf8_lossy(&m.body).into_owned()))
                .collect::<Vec<_>>();
            (all, rc, pid)
        }
    };
    let (direct, _, _) = transcript(cluster.pg.primary.addr()).await;
    assert!(
        direct.contains(&('s', String::new())) && direct.iter().any(|(t, _)| *t == 'E'),
        "{direct:?}"
    );
    let admin = cluster.superuser().await;
    for gw in [&gw, &settling] {
        let (through, mut rc, pid) = transcript(gw.addr()).await;
        assert_eq!(through, direct);
        // The gateway did ask: the xid query ran last in the batch's transaction.
        rc.send(&[bind("ins", &["1"]), execute(0), sync.clone()].concat())
            .await;
        rc.read_until(b'Z').await;
        assert_eq!(last_query(&admin, pid).await, XID_SQL);
        rc.send(&raw::batch(&["CREATE TABLE zz (a int)"])).await;
        rc.read_until(b'Z').await;
        assert_eq!(last_query(&admin, pid).await, XID_SQL);
        rc.send(&copy_batch(b"10\n")).await;
        rc.read_until(b'Z').await;
        assert_eq!(last_query(&admin, pid).await, XID_SQL);
        admin
            .batch_execute("DELETE FROM z; DROP TABLE zz")
            .await
            .unwrap();
    }
}

/// An extended-protocol COPY that fails before its data (no such table), sent as drivers
/// send it (Parse, Bind, Execute, Sync, the data, CopyDone, Sync): the first Sync is then no
/// COPY's to discard, and the server answers both. Through a gateway, one that could move the
/// session and one that could not, the client gets what it gets directly, and the session
/// goes on (a COPY that works, a query). (The gateway took that Sync for discarded: through
/// one that could move the session, the client got the answer to the gateway's own query
/// behind the batch.)
#[tokio::test]
async fn an_extended_copy_refused_before_its_data_answers_as_directly() {
    let (cluster, _admin, gw) =
        armed_after("CREATE TABLE cz(a int); GRANT ALL ON cz TO PUBLIC").await;
    let sync = raw::msg(b'S', b"");
    let copy = |table: &str| {
        [
            raw::parse("", &format!("COPY {table} FROM STDIN")),
            raw::bind("", &[]),
            raw::msg(b'E', b"\0\0\0\0\0"),
            sync.clone(),
            raw::msg(b'd', b"1\n"),
            raw::msg(b'c', b""),
            sync.clone(),
        ]
        .concat()
    };
    let transcript = |addr| {
        let (nosuch, cz) = (copy("nosuch"), copy("cz"));
        async move {
            let (mut rc, _) = login_with_pid(addr, "copy").await;
            let mut all = Vec::new();
            for request in [nosuch, cz] {
                rc.send(&request).await;
                rc.send(&raw::query("INSERT INTO cz VALUES (2) RETURNING 'end'"))
                    .await;
                loop {
                    let answer = rc.read_until(b'Z').await;
                    let end = answer.iter().any(|m| m.tag == b'D');
                    all.extend(as_text(answer));
                    if end {
                        break;
                    }
                }
            }
            all
        }
    };
    let primary = cluster.pg.primary.addr();
    let single = cluster
        .gateway_with(|c| c.backends = vec![primary.to_string()])
        .await;
    let su = cluster.superuser().await;
    let mut direct = Vec::new();
    for addr in [primary, gw.addr(), single.addr()] {
        let got = tokio::time::timeout(Duration::from_secs(10), transcript(addr))
            .await
            .expect("answered");
        su.batch_execute("TRUNCATE cz").await.unwrap();
        if addr == primary {
            let tags: String = got.iter().map(|(t, _)| *t).collect();
            assert_eq!(tags, "12EZZTDCZ12GCZTDCZ", "{got:?}");
            direct = got;
        } else {
            assert_eq!(got, direct);
        }
    }
}
