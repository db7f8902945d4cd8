//! Bad input and abrupt endings: whatever a client sends or however it leaves, it gets the
//! ErrorResponse PostgreSQL would send (or simply a closed socket), its backend goes away, and
//! every other session carries on (DESIGN.md, "Transparency rules" and the bad input paragraph).
//!
//! Every test keeps a well-behaved session open next to the misbehaving one and checks it still
//! answers afterwards, and every test checks that no panic was raised in gateway code.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::{Client, NoTls};
use understudy::config::{Config, Keepalive};
use understudy_integration_tests::netns::NetNs;
use understudy_integration_tests::raw::{self, msg, query, startup, Msg, RawConn};
use understudy_integration_tests::tls::TestCa;
use understudy_integration_tests::{
    backend_pid, connect_watched, roles, run_program, sqlstate, Cluster, ConnectionEnd,
    TestGateway, PATIENCE,
};

// ---------------------------------------------------------------------------------------------
// Private helpers

/// Panics raised in gateway or protocol code (session tasks swallow them, so count them here).
static GATEWAY_PANICS: AtomicUsize = AtomicUsize::new(0);

fn watch_for_gateway_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_gateway = info.location().is_some_and(|l| {
                ["gateway/src/", "protocol/src/", "replay/src/"]
                    .iter()
                    .any(|dir| l.file().contains(dir))
            });
            if in_gateway {
                GATEWAY_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

fn assert_no_gateway_panics() {
    assert_eq!(
        GATEWAY_PANICS.load(Ordering::SeqCst),
        0,
        "gateway code panicked (see the panic messages above)"
    );
}

/// The well-behaved neighbour every test keeps open.
async fn still_answers(client: &Client) {
    let one: i32 = client
        .query_one("SELECT 1", &[])
        .await
        .expect("the well-behaved session still works")
        .get(0);
    assert_eq!(one, 1);
}

/// A trusted raw session named `app`; returns it after ReadyForQuery with the greeting.
async fn raw_session(addr: SocketAddr, app: &str) -> (RawConn, Vec<Msg>) {
    RawConn::login_as_app(addr, roles::TRUST, app).await
}

fn assert_no_error(msgs: &[Msg]) {
    if let Some(e) = msgs.iter().find(|m| m.tag == b'E') {
        panic!(
            "unexpected error {} {}: {}",
            e.severity(),
            e.code(),
            e.message()
        );
    }
}

/// Runs `sql` on a raw session; returns the first column of every row as text.
async fn raw_select(c: &mut RawConn, sql: &str) -> Vec<String> {
    c.send(&query(sql)).await;
    let answer = c.read_until(b'Z').await;
    assert_no_error(&answer);
    answer
        .iter()
        .filter(|m| m.tag == b'D')
        .map(first_column)
        .collect()
}

/// First column of a DataRow, as text.
fn first_column(row: &Msg) -> String {
    let body = &row.body;
    let len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]);
    String::from_utf8_lossy(&body[6..6 + len as usize]).into_owned()
}

/// An ErrorResponse's fields by type byte (`F` file and `R` routine only come from a server).
fn error_field(m: &Msg, field: u8) -> Option<String> {
    let mut rest = m.body.as_slice();
    while let Some((&kind, tail)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0)?;
        if kind == field {
            return Some(String::from_utf8_lossy(&tail[..end]).into_owned());
        }
        rest = &tail[end + 1..];
    }
    None
}

/// Asserts `m` is a FATAL ErrorResponse with SQLSTATE `code`.
fn assert_fatal(m: &Msg, code: &str) {
    assert_eq!(m.tag, b'E', "expected an ErrorResponse, got {m:?}");
    assert_eq!(
        (m.severity().as_str(), m.code().as_str()),
        ("FATAL", code),
        "message: {}",
        m.message()
    );
}

/// SQLSTATE the connection task ended with, waiting at most `within`.
async fn connection_end(conn: ConnectionEnd, within: Duration) -> Option<String> {
    let ended = tokio::time::timeout(within, conn)
        .await
        .expect("connection ends in time")
        .expect("connection task");
    match ended {
        Ok(()) => None,
        Err(e) => sqlstate(&e).map(str::to_owned),
    }
}

/// A protocol 2.0 StartupMessage (major 2), which PostgreSQL 15 no longer speaks.
fn startup_v2(user: &str) -> Vec<u8> {
    let mut body = (2i32 << 16).to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0");
    body.extend_from_slice(user.as_bytes());
    body.extend_from_slice(b"\0\0");
    let mut v = (body.len() as i32 + 4).to_be_bytes().to_vec();
    v.extend_from_slice(&body);
    v
}

/// The 8-byte SSLRequest / GSSENCRequest.
fn request(code: i32) -> Vec<u8> {
    let mut v = 8i32.to_be_bytes().to_vec();
    v.extend_from_slice(&code.to_be_bytes());
    v
}

const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;

/// Parses a NegotiateProtocolVersion body: the version word and the options not supported.
fn negotiate_protocol_version(m: &Msg) -> (i32, Vec<String>) {
    assert_eq!(m.tag, b'v', "expected NegotiateProtocolVersion, got {m:?}");
    let b = &m.body;
    let version = i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let count = i32::from_be_bytes([b[4], b[5], b[6], b[7]]);
    let names: Vec<String> = b[8..]
        .split(|&c| c == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    assert_eq!(
        names.len(),
        count as usize,
        "option count matches the names"
    );
    (version, names)
}

/// A primary, a gateway in front of it that takes client messages of at most 64 KiB, and a
/// well-behaved session through it; panics in gateway code are watched for.
async fn gateway_limited_to_64k() -> (Cluster, TestGateway, Client) {
    watch_for_gateway_panics();
    let cluster = Cluster::primary_only().await;
    let gw = cluster
        .gateway_with(|cfg| cfg.max_message_size = 64 * 1024)
        .await;
    let neighbour = gw.connect(roles::TRUST).await;
    (cluster, gw, neighbour)
}

/// The header of a Query promising a 1 MB body, over [`gateway_limited_to_64k`]'s limit.
fn oversized_query_header() -> Vec<u8> {
    let mut header = vec![b'Q'];
    header.extend_from_slice(&(1_000_000i32).to_be_bytes());
    header
}

// ---------------------------------------------------------------------------------------------
// Malformed messages after login

/// Unknown message types, oversized and impossible lengths after login each end only their own
/// session with PostgreSQL's FATAL (08P01 / 54000), close it, and release its backend.
#[tokio::test]
async fn malformed_messages_after_login_end_only_their_session() {
    let (cluster, gw, neighbour) = gateway_limited_to_64k().await;

    // Unknown type byte: PostgreSQL's "invalid frontend message type %d".
    let (mut c, _) = raw_session(gw.addr(), "bad_type").await;
    c.send(&msg(b'z', b"whatever")).await;
    let e = c.expect_error().await;
    assert_fatal(&e, "08P01");
    assert_eq!(e.message(), "invalid frontend message type 122");
    assert!(c.closed().await, "closed after an unknown message type");
    cluster.wait_backends_named("bad_type", 0).await;

    // The same from the type byte alone, before the body its length promises (here, a second
    // startup packet: type byte 0), as PostgreSQL answers it.
    let (mut c, _) = raw_session(gw.addr(), "bad_type_early").await;
    let again = startup(0, &[("user", roles::TRUST)]);
    c.send(&again[..again.len() - 4]).await;
    let e = c.expect_error().await;
    assert_fatal(&e, "08P01");
    assert_eq!(e.message(), "invalid frontend message type 0");
    assert!(c.closed().await, "closed after an unknown message type");
    cluster.wait_backends_named("bad_type_early", 0).await;

    // A length over max_message_size: rejected from the header alone.
    let (mut c, _) = raw_session(gw.addr(), "too_long").await;
    let mut huge = oversized_query_header();
    huge.extend_from_slice(b"SELECT ");
    c.send(&huge).await;
    let e = c.expect_error().await;
    assert_fatal(&e, "54000");
    assert!(c.closed().await, "closed after an oversized message");
    cluster.wait_backends_named("too_long", 0).await;

    // A length below the 4 bytes it must count, and a negative one.
    for (app, len) in [("short_len", 3i32), ("negative_len", -20)] {
        let (mut c, _) = raw_session(gw.addr(), app).await;
        let mut bad = vec![b'Q'];
        bad.extend_from_slice(&len.to_be_bytes());
        c.send(&bad).await;
        let e = c.expect_error().await;
        assert_fatal(&e, "08P01");
        assert!(c.closed().await, "closed after length {len}");
        cluster.wait_backends_named(app, 0).await;
    }

    // A message just under the limit still goes through.
    let (mut c, _) = raw_session(gw.addr(), "near_limit").await;
    let literal = "x".repeat(60 * 1024);
    let rows = raw_select(&mut c, &format!("SELECT length('{literal}')")).await;
    assert_eq!(rows, [literal.len().to_string()]);

    still_answers(&neighbour).await;
    gw.connect(roles::TRUST).await; // and the gateway still takes new sessions
    assert_no_gateway_panics();
}

/// Requests sent before a bad message are answered before its FATAL, as PostgreSQL answers
/// them before it reads the bad one: a COMMIT pipelined in front of an unknown message type,
/// an impossible length or a Sync longer than PostgreSQL reads is committed and the client is
/// told so, and a statement still running when the bad message comes is answered when it ends.
/// Nothing sent after the bad message runs. (The client used to get the FATAL alone, and a
/// commit it was not told of: a retry would write twice.)
#[tokio::test]
async fn answers_owed_before_a_bad_message_come_before_its_fatal() {
    let (cluster, gw, neighbour) = gateway_limited_to_64k().await;
    cluster
        .superuser()
        .await
        .batch_execute("CREATE TABLE owed (a int); GRANT ALL ON owed TO PUBLIC")
        .await
        .unwrap();
    let unknown_type = [&[0xee][..], &8i32.to_be_bytes(), b"abcd"].concat();
    let short_length = [&b"Q"[..], &2i32.to_be_bytes()].concat();
    let long_sync = [&b"S"[..], &10_001i32.to_be_bytes()].concat();
    for (app, a, bad) in [
        ("owed_type", 1, &unknown_type),
        ("owed_length", 2, &short_length),
        ("owed_sync", 3, &long_sync),
    ] {
        let (mut c, _) = raw_session(gw.addr(), app).await;
        for sql in ["BEGIN".to_owned(), format!("INSERT INTO owed VALUES ({a})")] {
            c.send(&query(&sql)).await;
            assert_no_error(&c.read_until(b'Z').await);
        }
        let mut pipelined = query("COMMIT");
        pipelined.extend_from_slice(bad);
        pipelined.extend(query("INSERT INTO owed VALUES (99)"));
        c.send(&pipelined).await;
        let answer = c.read_until(b'E').await;
        assert_eq!(raw::tags(&answer), "CZE", "{app}: {answer:?}");
        assert_eq!(answer[0].body, b"COMMIT\0", "{app}");
        assert_fatal(&answer[2], "08P01");
        assert!(c.closed().await, "{app}: closed after the FATAL");
        cluster.wait_backends_named(app, 0).await;
    }
    let (mut c, _) = raw_session(gw.addr(), "owed_running").await;
    c.send(&query("INSERT INTO owed SELECT 4 FROM pg_sleep(0.3)"))
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.send(&unknown_type).await;
    let answer = c.read_until(b'E').await;
    assert_eq!(raw::tags(&answer), "CZE", "{answer:?}");
    assert!(c.closed().await);
    // In the middle of a COPY FROM STDIN the COPY is what is owed an answer, and it never
    // ends: the FATAL comes at once, and nothing of the COPY is kept.
    let (mut c, _) = raw_session(gw.addr(), "owed_copy").await;
    c.send(&query("COPY owed FROM STDIN")).await;
    c.read_until(b'G').await;
    c.send(&[msg(b'd', b"5\n"), unknown_type.clone()].concat())
        .await;
    let e = c.expect_error().await;
    assert_fatal(&e, "08P01");
    assert_eq!(e.message(), "invalid frontend message type 238");
    assert!(c.closed().await);
    cluster.wait_backends_named("owed_copy", 0).await;
    let rows: Vec<i32> = neighbour
        .query("SELECT a FROM owed ORDER BY a", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        rows,
        [1, 2, 3, 4],
        "each told commit once, nothing after a bad message"
    );
    still_answers(&neighbour).await;
    assert_no_gateway_panics();
}

/// A client that leaves (Terminate, or a bad message) behind extended-protocol requests that
/// failed before any Sync leaves nothing behind: the server skips everything up to a Sync
/// after such an error, the Terminate included, so the gateway also ends the backend's input
/// (it waited for the server to close, which it never did). Requests flushed before a bad
/// message are answered before its FATAL, as the server answers them.
#[tokio::test]
async fn a_client_leaving_behind_a_failed_unsynced_batch_ends_its_backend() {
    let (cluster, gw, neighbour) = gateway_limited_to_64k().await;
    let failed_batch = [
        raw::parse("", "SELECT nonsense("),
        raw::bind("", &[]),
        msg(b'E', b"\0\0\0\0\0"),
    ]
    .concat();
    let unknown_type = [&[0xee][..], &8i32.to_be_bytes(), b"abcd"].concat();
    for (app, leaving) in [
        ("failed_then_terminate", msg(b'X', b"")),
        ("failed_then_garbage", unknown_type.clone()),
    ] {
        let (mut c, _) = raw_session(gw.addr(), app).await;
        c.send(&[failed_batch.clone(), leaving].concat()).await;
        assert!(c.closed().await, "{app}: closed");
        cluster.wait_backends_named(app, 0).await;
    }
    let flushed = [
        raw::parse("", "SELECT 'flushed'"),
        raw::bind("", &[]),
        msg(b'E', b"\0\0\0\0\0"),
        msg(b'H', b""),
        unknown_type,
    ]
    .concat();
    let transcript = |addr| {
        let flushed = flushed.clone();
        async move {
            let mut c = RawConn::login(addr, roles::TRUST).await;
            c.send(&flushed).await;
            raw::tags(&c.read_to_end().await)
        }
    };
    let direct = transcript(cluster.pg.primary.addr()).await;
    assert_eq!(direct, "12DCE");
    assert_eq!(transcript(gw.addr()).await, direct);
    still_answers(&neighbour).await;
    assert_no_gateway_panics();
}

/// A message of a type PostgreSQL reads only up to 10,000 bytes (Sync, Flush, Execute …) that
/// says it is longer is refused from its header, as the server refuses it, not waited for up
/// to `max_message_size` nor passed on to end the backend.
#[tokio::test]
async fn small_message_types_longer_than_postgresql_reads_are_refused() {
    let (cluster, gw, neighbour) = gateway_limited_to_64k().await;
    for (app, tag) in [
        ("long_flush", b'H'),
        ("long_execute", b'E'),
        ("long_close", b'C'),
    ] {
        let (mut c, _) = raw_session(gw.addr(), app).await;
        c.send(&[&[tag][..], &10_001i32.to_be_bytes()].concat())
            .await;
        let e = c.expect_error().await;
        assert_fatal(&e, "08P01");
        assert!(
            e.message().contains("invalid message length"),
            "{}",
            e.message()
        );
        assert!(c.closed().await, "{app}");
        cluster.wait_backends_named(app, 0).await;
    }
    // 10,000 bytes is within what the server reads: the server judges the body.
    let (mut c, _) = raw_session(gw.addr(), "long_ok").await;
    c.send(&[&b"H"[..], &10_000i32.to_be_bytes(), &[0u8; 9_996]].concat())
        .await;
    let e = c.expect_error().await;
    assert_eq!(e.code(), "08P01", "{}", e.message());
    still_answers(&neighbour).await;
    assert_no_gateway_panics();
}

/// A client that answers a password request with a message of another type is refused as
/// soon as its type byte arrives, in the server's words: not after the body its length word
/// would promise, nor at the login timeout (the gateway used to wait for both).
#[tokio::test]
async fn a_wrong_message_in_place_of_a_password_is_refused_at_once() {
    let (cluster, gw, neighbour) = gateway_limited_to_64k().await;
    let lone_byte = |addr| async move {
        let mut c = RawConn::open(addr).await;
        c.send(&startup(
            0,
            &[("user", roles::MD5), ("database", "postgres")],
        ))
        .await;
        let request = c.read().await.expect("a password request");
        assert_eq!(request.tag, b'R');
        let started = Instant::now();
        c.send(b"z").await;
        let e = c.expect_error().await;
        assert!(started.elapsed() < Duration::from_secs(5), "at once");
        assert!(c.closed().await);
        (e.severity(), e.code(), e.message())
    };
    let server_says = lone_byte(cluster.pg.primary.addr()).await;
    assert_eq!(server_says.1, "08P01");
    assert_eq!(lone_byte(gw.addr()).await, server_says);
    still_answers(&neighbour).await;
    assert_no_gateway_panics();
}

/// A client that goes on sending after the gateway ended its session (a pipelining driver,
/// or the rest of an oversized message) is not reset under the FATAL: the gateway reads and
/// drops what follows until the client closes, so its writes go through, it reads the FATAL
/// and then a clean end of stream, and its backend is gone meanwhile. (Closing with unread
/// bytes, as before, reset the connection and failed the client's next write.)
#[tokio::test]
async fn a_client_still_sending_after_its_fatal_is_not_reset() {
    let (cluster, gw, neighbour) = gateway_limited_to_64k().await;
    let (mut c, _) = raw_session(gw.addr(), "still_sending").await;
    c.send(&oversized_query_header()).await;
    assert_fatal(&c.expect_error().await, "54000");
    cluster.wait_backends_named("still_sending", 0).await;
    // The rest of the promised body, a while after the FATAL.
    let chunk = vec![b'x'; 64 * 1024];
    for i in 0..16 {
        c.socket
            .write_all(&chunk)
            .await
            .unwrap_or_else(|e| panic!("write {i} after the FATAL: {e}"));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c.shutdown_write().await;
    let mut rest = Vec::new();
    let end = tokio::time::timeout(PATIENCE, c.socket.read_to_end(&mut rest))
        .await
        .expect("the gateway closes once the client has");
    assert!(end.is_ok(), "a clean end of stream, not a reset: {end:?}");
    assert!(rest.is_empty(), "nothing after the FATAL: {rest:?}");
    still_answers(&neighbour).await;
    assert_no_gateway_panics();
}

/// SQL the server cannot even tokenize (an unclosed quoted identifier ending in a multi-byte
/// character, an unclosed string, dollar quote or comment) gets the server's own syntax error,
/// by the simple and the extended protocol, and the session goes on.
#[tokio::test]
async fn unfinished_sql_gets_the_servers_syntax_error() {
    watch_for_gateway_panics();
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;
    let neighbour = gw.connect(roles::TRUST).await;
    let client = gw.connect(roles::TRUST).await;
    for sql in [
        "LISTEN \"é",
        "COPY t FROM STDIN \" é",
        "SELECT 'é",
        "SELECT $q$ é",
        "SELECT 1 /* é",
        "PREPARE \"ü",
    ] {
        let e = client
            .simple_query(sql)
            .await
            .expect_err("the server refuses it");
        assert_eq!(sqlstate(&e), Some("42601"), "simple query {sql:?}: {e}");
        let e = client
            .prepare(sql)
            .await
            .expect_err("the server refuses it");
        assert_eq!(sqlstate(&e), Some("42601"), "Parse of {sql:?}: {e}");
        still_answers(&client).await;
    }
    still_answers(&neighbour).await;
    assert_no_gateway_panics();
}

/// `max_message_size` limits what clients send, not what the server answers: a row or an
/// error message larger than the limit reaches the client and the session goes on.
#[tokio::test]
async fn max_message_size_does_not_limit_server_messages() {
    let (_cluster, gw, neighbour) = gateway_limited_to_64k().await;
    let client = gw.connect(roles::TRUST).await;

    let value: String = client
        .query_one("SELECT repeat('x', 200000)", &[])
        .await
        .expect("a 200 kB value through a 64 kB client limit")
        .get(0);
    assert_eq!(value.len(), 200_000);

    let e = client
        .batch_execute("DO $$ BEGIN RAISE EXCEPTION '%', repeat('y', 100000); END $$")
        .await
        .expect_err("the server's error");
    assert_eq!(sqlstate(&e), Some("P0001"), "{e}");
    assert_eq!(e.as_db_error().map(|d| d.message().len()), Some(100_000));

    still_answers(&client).await;
    still_answers(&neighbour).await;
    assert_no_gateway_panics();
}

// ---------------------------------------------------------------------------------------------
// The startup phase

/// Bytes that are not a startup packet (an HTTP request, a TLS ClientHello sent without
/// SSLRequest, random bytes, a too-short or too-long length) get ErrorResponse 08P01 "invalid
/// length of startup packet" and a closed connection; an unknown request code is 0A000, a
/// missing user 28000, and a broken TLS handshake after `S` just closes the connection.
#[tokio::test]
async fn garbage_before_startup_gets_08p01_and_close() {
    watch_for_gateway_panics();
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;
    let neighbour = gw.connect(roles::TRUST).await;

    let mut random: Vec<u8> = (0..64).map(|_| rand::random::<u8>()).collect();
    random[0] |= 0x80; // a negative length word, whatever the rest is
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("HTTP request", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
        (
            "TLS ClientHello",
            vec![
                0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
            ],
        ),
        ("random bytes", random),
        ("length 4", 4i32.to_be_bytes().to_vec()),
        ("length 10005", 10_005i32.to_be_bytes().to_vec()),
    ];
    for (what, bytes) in cases {
        let mut c = RawConn::open(gw.addr()).await;
        c.send(&bytes).await;
        let e = c
            .read()
            .await
            .unwrap_or_else(|| panic!("{what}: connection closed without an ErrorResponse"));
        assert_eq!(e.tag, b'E', "{what}: {e:?}");
        assert_eq!(e.code(), "08P01", "{what}: {}", e.message());
        assert!(
            e.message().contains("invalid length of startup packet"),
            "{what}: {}",
            e.message()
        );
        if what == "TLS ClientHello" {
            assert!(e.message().contains("tls.cert"), "{}", e.message());
        }
        assert!(c.closed().await, "{what}: connection closed");
    }

    // PostgreSQL measures the packet past its length word: 10,004 bytes in all is within it.
    let base = startup(
        0,
        &[
            ("user", roles::TRUST),
            ("database", "postgres"),
            ("options", ""),
        ],
    )
    .len();
    let spaces = " ".repeat(10_004 - base);
    let longest = startup(
        0,
        &[
            ("user", roles::TRUST),
            ("database", "postgres"),
            ("options", &spaces),
        ],
    );
    assert_eq!(longest.len(), 10_004);
    let mut c = RawConn::open(gw.addr()).await;
    c.send(&longest).await;
    assert_no_error(&c.read_until(b'Z').await);

    // A valid length with an unknown request code is an unsupported protocol, as in PostgreSQL.
    let mut c = RawConn::open(gw.addr()).await;
    let mut odd = 16i32.to_be_bytes().to_vec();
    odd.extend_from_slice(&0x1234_5678i32.to_be_bytes());
    odd.extend_from_slice(&[0; 8]);
    c.send(&odd).await;
    assert_fatal(&c.expect_error().await, "0A000");
    assert!(c.closed().await);

    // A packet whose parameters do not end in the terminating NUL, or run past it, gets
    // PostgreSQL's own words for it.
    let full = startup(0, &[("user", roles::TRUST)]);
    for (what, body) in [
        ("unterminated", full[8..full.len() - 1].to_vec()),
        ("bytes after the terminator", [&full[8..], b"x\0"].concat()),
    ] {
        let mut packet = ((body.len() + 8) as i32).to_be_bytes().to_vec();
        packet.extend_from_slice(&full[4..8]);
        packet.extend_from_slice(&body);
        let mut said = Vec::new();
        for addr in [cluster.pg.primary.addr(), gw.addr()] {
            let mut c = RawConn::open(addr).await;
            c.send(&packet).await;
            let e = c.expect_error().await;
            assert!(c.closed().await, "{what}: connection closed");
            said.push((e.code(), e.message()));
        }
        assert_eq!(
            said[1], said[0],
            "{what}: the gateway says what PostgreSQL says"
        );
        assert_eq!(said[0].0, "08P01", "{what}");
    }

    // A startup packet without a user is PostgreSQL's 28000.
    let mut c = RawConn::open(gw.addr()).await;
    c.send(&startup(0, &[("database", "postgres")])).await;
    let e = c.expect_error().await;
    assert_fatal(&e, "28000");
    assert!(c.closed().await);

    // With TLS offered: garbage where the TLS handshake should be, or nothing at all.
    let ca = TestCa::new();
    let tls_gw = cluster
        .gateway_with(|cfg| {
            cfg.tls.cert = Some(ca.server_cert.clone());
            cfg.tls.key = Some(ca.server_key.clone());
        })
        .await;
    for garbage in [&b"GET / HTTP/1.1\r\n\r\n"[..], &[]] {
        let mut c = RawConn::open(tls_gw.addr()).await;
        c.send(&request(SSL_REQUEST)).await;
        assert_eq!(c.read_byte().await, b'S');
        c.send(garbage).await;
        c.socket.shutdown().await.expect("half-close");
        assert!(c.closed().await, "closed after a failed TLS handshake");
    }
    let mut config = tls_gw.pg_config(roles::TRUST);
    config.ssl_mode(tokio_postgres::config::SslMode::Require);
    let (tls_client, conn) = config.connect(ca.connector()).await.expect("TLS session");
    tokio::spawn(conn);
    still_answers(&tls_client).await;

    still_answers(&neighbour).await;
    gw.connect(roles::TRUST).await;
    assert_no_gateway_panics();
}

/// Protocol 2.0 is refused with 0A000; protocol 3.2 and `_pq_.` options get the
/// NegotiateProtocolVersion PostgreSQL itself sends (version 3.0, the unsupported options; an
/// earlier gateway said version 0, which libpq 18 refuses as a downgrade below 3.0) and then
/// log in normally.
#[tokio::test]
async fn protocol_versions_are_negotiated_like_postgresql() {
    watch_for_gateway_panics();
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;
    let neighbour = gw.connect(roles::TRUST).await;

    let mut c = RawConn::open(gw.addr()).await;
    c.send(&startup_v2(roles::TRUST)).await;
    let e = c.expect_error().await;
    assert_fatal(&e, "0A000");
    assert!(
        e.message().contains("unsupported frontend protocol 2.0"),
        "{}",
        e.message()
    );
    assert!(c.closed().await);

    /// Minor version, protocol options sent, options the gateway must list as unsupported.
    type Case<'a> = (u16, &'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: [Case; 3] = [
        (2, &[], &[]),
        (0, &[("_pq_.foo", "on")], &["_pq_.foo"]),
        (
            2,
            &[("_pq_.foo", "1"), ("_pq_.bar", "2")],
            &["_pq_.foo", "_pq_.bar"],
        ),
    ];
    for (minor, options, unsupported) in cases {
        let mut params = vec![
            ("user", roles::TRUST),
            ("database", "postgres"),
            ("application_name", "negotiated"),
        ];
        params.extend_from_slice(options);
        let mut direct = RawConn::open(cluster.pg.primary.addr()).await;
        direct.send(&startup(minor, &params)).await;
        let server_says = negotiate_protocol_version(&direct.read_until(b'Z').await[0]);
        let mut c = RawConn::open(gw.addr()).await;
        c.send(&startup(minor, &params)).await;
        let greeting = c.read_until(b'Z').await;
        assert_no_error(&greeting);
        let expected = (3 << 16, unsupported.iter().map(|s| s.to_string()).collect());
        assert_eq!(
            server_says, expected,
            "PostgreSQL, 3.{minor} with {options:?}"
        );
        assert_eq!(
            negotiate_protocol_version(&greeting[0]),
            expected,
            "3.{minor} with {options:?}"
        );
        assert!(
            greeting
                .iter()
                .any(|m| m.tag == b'R' && m.body == [0, 0, 0, 0]),
            "AuthenticationOk follows"
        );
        assert_eq!(raw_select(&mut c, "SELECT 41 + 1").await, ["42"]);
    }

    still_answers(&neighbour).await;
    assert_no_gateway_panics();
}

/// GSSENCRequest and SSLRequest (no TLS configured) are answered `N`, in either order, and the
/// StartupMessage that follows logs in; a second one of either is refused as PostgreSQL
/// refuses it (0A000).
#[tokio::test]
async fn encryption_requests_are_declined_then_startup_proceeds() {
    watch_for_gateway_panics();
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;
    let neighbour = gw.connect(roles::TRUST).await;

    for requests in [
        vec![GSSENC_REQUEST],
        vec![SSL_REQUEST],
        vec![GSSENC_REQUEST, SSL_REQUEST],
        vec![SSL_REQUEST, GSSENC_REQUEST],
    ] {
        let mut c = RawConn::open(gw.addr()).await;
        for code in &requests {
            c.send(&request(*code)).await;
            assert_eq!(
                c.read_byte().await,
                b'N',
                "answer to {code} in {requests:?}"
            );
        }
        c.send(&startup(
            0,
            &[("user", roles::TRUST), ("database", "postgres")],
        ))
        .await;
        assert_no_error(&c.read_until(b'Z').await);
        assert_eq!(raw_select(&mut c, "SELECT 'plain'").await, ["plain"]);
    }

    // One more of either is an unsupported protocol, in PostgreSQL's words (compared for
    // SSLRequest: this PostgreSQL, built with GSSAPI, accepts GSSENCRequest).
    let twice = |addr, code| async move {
        let mut c = RawConn::open(addr).await;
        c.send(&request(code)).await;
        assert_eq!(c.read_byte().await, b'N', "{code}");
        c.send(&request(code)).await;
        let e = c.expect_error().await;
        assert!(c.closed().await, "{code}: closed");
        (e.code(), e.message())
    };
    let server_says = twice(cluster.pg.primary.addr(), SSL_REQUEST).await;
    assert_eq!(twice(gw.addr(), SSL_REQUEST).await, server_says);
    assert_eq!(server_says.0, "0A000");
    assert_eq!(
        twice(gw.addr(), GSSENC_REQUEST).await,
        (
            "0A000".to_owned(),
            "unsupported frontend protocol 1234.5680: server supports 3.0 to 3.0".to_owned()
        )
    );

    // A startup packet sent right behind the request, before its answer, is refused as
    // PostgreSQL refuses it (it may have been put there by someone in the middle): the
    // server's own answer, compared.
    let ahead = |addr| async move {
        let mut c = RawConn::open(addr).await;
        let mut both = request(SSL_REQUEST);
        both.extend(startup(
            0,
            &[("user", roles::TRUST), ("database", "postgres")],
        ));
        c.send(&both).await;
        let answer = c.read_byte().await;
        let e = c.expect_error().await;
        assert!(c.closed().await, "closed");
        (answer, e.severity(), e.code(), e.message())
    };
    let server_says = ahead(cluster.pg.primary.addr()).await;
    assert_eq!(
        server_says,
        (
            b'N',
            "FATAL".to_owned(),
            "08P01".to_owned(),
            "received unencrypted data after SSL request".to_owned()
        )
    );
    assert_eq!(ahead(gw.addr()).await, server_says);

    // tokio-postgres's sslmode=prefer takes the `N` and carries on in the clear.
    let mut config = gw.pg_config(roles::TRUST);
    config.ssl_mode(tokio_postgres::config::SslMode::Prefer);
    still_answers(&gw.try_connect(config).await.expect("prefer falls back")).await;

    still_answers(&neighbour).await;
    assert_no_gateway_panics();
}

/// A client that sends part of a message (or part of a startup packet) and then closes its
/// socket leaves nothing behind: its backend disappears and the gateway carries on.
#[tokio::test]
async fn truncated_input_then_close_releases_everything() {
    watch_for_gateway_panics();
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;
    let neighbour = gw.connect(roles::TRUST).await;

    // Half a Query body.
    let (mut c, _) = raw_session(gw.addr(), "half_body").await;
    let whole = query("SELECT 'this query never arrives whole'");
    c.send(&whole[..whole.len() / 2]).await;
    drop(c);
    cluster.wait_backends_named("half_body", 0).await;

    // Three bytes of a header.
    let (mut c, _) = raw_session(gw.addr(), "half_header").await;
    c.send(&whole[..3]).await;
    drop(c);
    cluster.wait_backends_named("half_header", 0).await;

    // Half a startup packet.
    let mut c = RawConn::open(gw.addr()).await;
    let packet = startup(0, &[("user", roles::TRUST), ("database", "postgres")]);
    c.send(&packet[..packet.len() / 2]).await;
    drop(c);

    still_answers(&neighbour).await;
    gw.connect(roles::TRUST).await;
    assert_no_gateway_panics();
}

// ---------------------------------------------------------------------------------------------
// Limits

/// With `max_client_connections = 2` the third client gets 53300, and once a session closes a
/// new client gets in.
#[tokio::test]
async fn connection_limit_refuses_with_53300_and_frees_slots() {
    watch_for_gateway_panics();
    let cluster = Cluster::primary_only().await;
    let gw = cluster
        .gateway_with(|cfg| cfg.max_client_connections = 2)
        .await;
    let first = gw.connect(roles::TRUST).await;
    let second = gw.connect(roles::TRUST).await;

    for _ in 0..3 {
        let e = gw
            .try_connect(gw.pg_config(roles::TRUST))
            .await
            .expect_err("a third client is refused");
        assert_eq!(sqlstate(&e), Some("53300"), "{e}");
    }
    still_answers(&first).await;
    still_answers(&second).await;

    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    let third = loop {
        match gw.try_connect(gw.pg_config(roles::TRUST)).await {
            Ok(c) => break c,
            Err(e) if sqlstate(&e) == Some("53300") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("the freed slot was not given to a new client: {e}"),
        }
    };
    still_answers(&third).await;
    still_answers(&second).await;
    assert_no_gateway_panics();
}

/// `login_timeout_ms` closes clients that say nothing, stop inside the startup packet, or stall
/// during the password exchange (those hear 57014), and leaves logged-in sessions alone.
#[tokio::test]
async fn login_timeout_closes_stalled_clients() {
    watch_for_gateway_panics();
    let cluster = Cluster::primary_only().await;
    let gw = cluster
        .gateway_with(|cfg| cfg.login_timeout_ms = 1_000)
        .await;
    let neighbour = gw.connect(roles::TRUST).await;

    // Connects and says nothing.
    let started = Instant::now();
    let mut silent = RawConn::open(gw.addr()).await;
    // Stops inside its startup packet.
    let mut partial = RawConn::open(gw.addr()).await;
    let packet = startup(0, &[("user", roles::TRUST), ("database", "postgres")]);
    partial.send(&packet[..6]).await;
    // Sends its startup, is asked for a SCRAM exchange, and never answers.
    let mut stalled = RawConn::open(gw.addr()).await;
    stalled
        .send(&startup(
            0,
            &[
                ("user", roles::SCRAM),
                ("database", "postgres"),
                ("application_name", "stalled"),
            ],
        ))
        .await;
    let sasl = stalled.read().await.expect("an authentication request");
    assert_eq!(
        (sasl.tag, &sasl.body[..4]),
        (b'R', &10i32.to_be_bytes()[..]),
        "AuthenticationSASL"
    );

    let e = stalled.expect_error().await;
    assert_fatal(&e, "57014");
    assert!(stalled.closed().await, "stalled login closed");
    assert!(silent.closed().await, "silent client closed");
    assert!(partial.closed().await, "half-startup client closed");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "closed after {waited:?} with a 1 s login timeout"
    );

    // The neighbour has been logged in for longer than the login timeout.
    still_answers(&neighbour).await;
    gw.connect(roles::TRUST).await;
    assert_no_gateway_panics();
}

// ---------------------------------------------------------------------------------------------
// Clients that vanish

/// A client that vanishes in the middle of COPY FROM STDIN (mid-message, even) takes its
/// backend with it: nothing is committed, no lock is left, other sessions keep working.
#[tokio::test]
async fn client_vanishing_mid_copy_commits_nothing() {
    watch_for_gateway_panics();
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;
    let neighbour = gw.connect(roles::TRUST).await;
    neighbour
        .batch_execute("CREATE TABLE copy_target (id int, note text)")
        .await
        .unwrap();

    let (mut c, _) = raw_session(gw.addr(), "copy_vanish").await;
    c.send(&query("COPY copy_target FROM STDIN")).await;
    let started = c.read_until(b'G').await;
    assert_no_error(&started);
    for i in 0..1_000 {
        c.send(&msg(b'd', format!("{i}\trow {i}\n").as_bytes()))
            .await;
    }
    let partial = msg(b'd', b"1000\tcut short\n");
    c.send(&partial[..partial.len() - 4]).await;
    drop(c);
    cluster.wait_backends_named("copy_vanish", 0).await;

    let rows: i64 = neighbour
        .query_one("SELECT count(*) FROM copy_target", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "an unfinished COPY commits nothing");
    neighbour
        .batch_execute(
            "BEGIN; SET LOCAL lock_timeout = '2s';
             LOCK TABLE copy_target IN ACCESS EXCLUSIVE MODE; COMMIT",
        )
        .await
        .expect("no lock left behind");
    still_answers(&neighbour).await;
    assert_no_gateway_panics();
}

/// A client that resets its connection during COPY FROM STDIN, between two messages, ends its
/// backend as it would directly: the server finds its input ended ("unexpected EOF"), not a
/// Terminate, which it would report as a message it did not expect during COPY; nothing is
/// committed.
#[tokio::test]
async fn client_resetting_mid_copy_ends_its_input() {
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;
    let neighbour = gw.connect(roles::TRUST).await;
    neighbour
        .batch_execute("CREATE TABLE copy_reset (id int)")
        .await
        .unwrap();
    let (mut c, _) = raw_session(gw.addr(), "copy_reset").await;
    c.send(&query("COPY copy_reset FROM STDIN")).await;
    assert_no_error(&c.read_until(b'G').await);
    for i in 0..100 {
        c.send(&msg(b'd', format!("{i}\n").as_bytes())).await;
    }
    c.reset();
    cluster.wait_backends_named("copy_reset", 0).await;
    let rows: i64 = neighbour
        .query_one("SELECT count(*) FROM copy_reset", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0);
    let log = cluster.pg.primary.log_tail(100);
    assert!(!log.contains("unexpected message type 0x58"), "{log}");
    assert!(log.contains("unexpected EOF on client connection"), "{log}");
}

/// A client that reads a little of a large result and vanishes takes its backend with it.
#[tokio::test]
async fn client_vanishing_mid_result_frees_the_backend() {
    watch_for_gateway_panics();
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;
    let neighbour = gw.connect(roles::TRUST).await;

    let (mut c, _) = raw_session(gw.addr(), "result_vanish").await;
    c.send(&query(
        "SELECT g, repeat('x', 100) FROM generate_series(1, 5000000) g",
    ))
    .await;
    let mut rows = 0;
    while rows < 100 {
        let m = c.read().await.expect("rows arrive");
        assert_ne!(m.tag, b'E', "{}", m.message());
        rows += usize::from(m.tag == b'D');
    }
    drop(c);
    cluster.wait_backends_named("result_vanish", 0).await;

    still_answers(&neighbour).await;
    assert_no_gateway_panics();
}

/// Session mode: when the client goes, its backend goes at once, whether the client says
/// Terminate (tokio-postgres dropped) or just closes its socket.
#[tokio::test]
async fn backend_goes_as_soon_as_its_client() {
    watch_for_gateway_panics();
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;
    let neighbour = gw.connect(roles::SCRAM).await;

    let client = gw.connect(roles::TRUST).await;
    still_answers(&client).await;
    cluster.wait_backends_named("it_trust_user", 1).await;
    let started = Instant::now();
    drop(client);
    cluster.wait_backends_named("it_trust_user", 0).await;
    let after_terminate = started.elapsed();

    let (c, _) = raw_session(gw.addr(), "socket_closed").await;
    cluster.wait_backends_named("socket_closed", 1).await;
    let started = Instant::now();
    drop(c);
    cluster.wait_backends_named("socket_closed", 0).await;
    let after_close = started.elapsed();

    for (how, took) in [("Terminate", after_terminate), ("close", after_close)] {
        assert!(
            took < Duration::from_secs(2),
            "backend lingered {took:?} after {how}"
        );
    }
    still_answers(&neighbour).await;
    assert_no_gateway_panics();
}

/// A gateway that takes clients on `ns`'s host end of the link, with keepalive probing after
/// 1 s idle, every 1 s, twice: a peer that stops answering is dropped after about 3 s.
async fn gateway_for(cluster: &Cluster, ns: &NetNs) -> TestGateway {
    cluster
        .gateway_with(|c| {
            c.listen = SocketAddr::from((ns.host_addr, 0));
            c.tcp_keepalive = Keepalive {
                idle_secs: 1,
                interval_secs: 1,
                retries: 2,
                ..Keepalive::default()
            };
        })
        .await
}

/// A tokio-postgres session to `gw`, which listens on `ns`'s host end.
async fn neighbour_via(gw: &TestGateway, ns: &NetNs) -> Client {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(ns.host_addr.to_string())
        .port(gw.addr().port())
        .user(roles::TRUST)
        .dbname("postgres")
        .application_name("neighbour");
    let (client, conn) = cfg.connect(NoTls).await.expect("neighbour connects");
    tokio::spawn(conn);
    client
}

/// Runs `script` in psql inside `ns` (connected to `gw`, application name `app`), waits until
/// its backend is in `state` and a little more (for psql to acknowledge what it got), then cuts
/// the link; returns psql and how long its backend outlived the cut (panics past [`PATIENCE`]).
async fn cut_off_while(
    cluster: &Cluster,
    ns: &NetNs,
    gw: &TestGateway,
    app: &str,
    script: &[u8],
    state: &str,
) -> (tokio::process::Child, Duration) {
    let mut psql = ns
        .command(cluster.program("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
        .arg(ns.host_addr.to_string())
        .args([
            "-p",
            &gw.addr().port().to_string(),
            "-U",
            roles::TRUST,
            "-d",
            "postgres",
        ])
        .env("PGAPPNAME", app)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("psql in the namespace");
    let mut stdin = psql.stdin.take().expect("psql stdin");
    stdin.write_all(script).await.unwrap();
    stdin.flush().await.unwrap();
    // Kept open: psql waits for more rather than exiting.
    psql.stdin = Some(stdin);

    let su = cluster.superuser().await;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let n: i64 = su
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND state = $2",
                &[&app, &state],
            )
            .await
            .unwrap()
            .get(0);
        if n == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{app} never got to {state}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    ns.cut();
    let cut = Instant::now();
    cluster.wait_backends_named(app, 0).await;
    (psql, cut.elapsed())
}

/// A client that drops off the network in the middle of a transaction (no FIN, no RST: the
/// link goes down) is found dead by keepalive: its backend goes, its transaction is rolled back
/// and its row locks are released, while another session carries on.
#[tokio::test]
async fn client_dropping_off_the_network_while_idle_is_found_by_keepalive() {
    watch_for_gateway_panics();
    let cluster = Cluster::primary_only().await;
    let ns = NetNs::create();
    let gw = gateway_for(&cluster, &ns).await;
    let neighbour = neighbour_via(&gw, &ns).await;
    neighbour
        .batch_execute(
            "CREATE TABLE dropped (id int PRIMARY KEY, v int); INSERT INTO dropped VALUES (1, 0)",
        )
        .await
        .unwrap();

    // Cut once psql has acknowledged the last answer: idle, with nothing in flight.
    let (mut psql, took) = cut_off_while(
        &cluster,
        &ns,
        &gw,
        "dropped_idle",
        b"BEGIN;\nUPDATE dropped SET v = 1 WHERE id = 1;\nINSERT INTO dropped VALUES (2, 2);\n",
        "idle in transaction",
    )
    .await;
    assert!(
        took < Duration::from_secs(15),
        "the backend of a dead client lingered {took:?} (keepalive gives up after ~3 s)"
    );
    neighbour
        .batch_execute("SET lock_timeout = '2s'; UPDATE dropped SET v = 3 WHERE id = 1")
        .await
        .expect("the dead client's row lock is gone");
    let rows: Vec<(i32, i32)> = neighbour
        .query("SELECT id, v FROM dropped ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        rows,
        [(1, 3)],
        "nothing of the dead client's transaction is kept"
    );
    still_answers(&neighbour).await;
    let _ = psql.kill().await;
    assert_no_gateway_panics();
}

/// A client that drops off the network while a large result streams to it is found dead
/// although keepalive never probes a connection with data in flight: the gateway's
/// unacknowledged writes time out (TCP_USER_TIMEOUT), and the backend goes instead of sitting
/// in ClientWrite for the ~15 minutes the kernel would retransmit.
#[tokio::test]
async fn client_dropping_off_the_network_mid_result_is_found_by_the_user_timeout() {
    watch_for_gateway_panics();
    let cluster = Cluster::primary_only().await;
    let ns = NetNs::create();
    let gw = gateway_for(&cluster, &ns).await;
    let neighbour = neighbour_via(&gw, &ns).await;

    // In the select list the series streams (in FROM it would be materialized first).
    let (mut psql, took) = cut_off_while(
        &cluster,
        &ns,
        &gw,
        "dropped_streaming",
        b"COPY (SELECT generate_series(1, 100000000), repeat('x', 1000)) TO STDOUT;\n",
        "active",
    )
    .await;
    assert!(
        took < Duration::from_secs(15),
        "the backend of a dead client lingered {took:?} (the user timeout is ~3 s)"
    );
    still_answers(&neighbour).await;
    let _ = psql.kill().await;
    assert_no_gateway_panics();
}

// ---------------------------------------------------------------------------------------------
// The server's decisions and unreachable servers

/// `pg_terminate_backend` on a session's backend reaches the client as the server's own FATAL
/// 57P01, verbatim (with the server's file and routine fields), and the connection closes.
#[tokio::test]
async fn terminated_backend_forwards_the_servers_fatal() {
    watch_for_gateway_panics();
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;
    let neighbour = gw.connect(roles::TRUST).await;
    let su = cluster.superuser().await;

    let (mut c, _) = raw_session(gw.addr(), "terminated").await;
    let pid: i32 = raw_select(&mut c, "SELECT pg_backend_pid()").await[0]
        .parse()
        .unwrap();
    let done: bool = su
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap()
        .get(0);
    assert!(done, "backend {pid} terminated");
    let e = c.expect_error().await;
    assert_fatal(&e, "57P01");
    assert_eq!(
        e.message(),
        "terminating connection due to administrator command"
    );
    assert_eq!(
        error_field(&e, b'R').as_deref(),
        Some("ProcessInterrupts"),
        "the server's own ErrorResponse, not one the gateway made up: {e:?}"
    );
    assert!(c.closed().await, "closed after the server's FATAL");

    // The same through a driver: the connection ends with the server's error. The PID is
    // asked over the simple protocol: a prepared statement would be closed by the driver in
    // the background, and a FATAL that crosses that Close is taken as its answer, not the
    // connection's end (the driver does that talking to PostgreSQL directly, too).
    let (client, conn) = connect_watched(gw.pg_config(roles::MD5)).await;
    let pid = backend_pid(&client).await;
    su.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    assert_eq!(
        connection_end(conn, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("57P01")
    );

    still_answers(&neighbour).await;
    assert_no_gateway_panics();
}

/// `idle_session_timeout` sent in the startup `options` reaches the server, which ends the
/// session with 57P05; the client receives that FATAL and its backend is gone. The same for
/// `idle_in_transaction_session_timeout` (25P03).
#[tokio::test]
async fn idle_session_timeout_from_options_reaches_the_client() {
    watch_for_gateway_panics();
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;
    let neighbour = gw.connect(roles::TRUST).await;

    let mut c = RawConn::open(gw.addr()).await;
    c.send(&startup(
        0,
        &[
            ("user", roles::TRUST),
            ("database", "postgres"),
            ("application_name", "idle_raw"),
            ("options", "-c idle_session_timeout=500"),
        ],
    ))
    .await;
    assert_no_error(&c.read_until(b'Z').await);
    let started = Instant::now();
    let e = c.expect_error().await;
    assert_fatal(&e, "57P05");
    assert_eq!(
        e.message(),
        "terminating connection due to idle-session timeout"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "after {:?}",
        started.elapsed()
    );
    assert!(c.closed().await);
    cluster.wait_backends_named("idle_raw", 0).await;

    let mut config = gw.pg_config(roles::SCRAM);
    config.options("-c idle_session_timeout=500");
    let (_client, conn) = connect_watched(config).await;
    assert_eq!(
        connection_end(conn, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("57P05")
    );

    // Its sibling for sessions left inside a transaction: 25P03.
    let mut config = gw.pg_config(roles::MD5);
    config.options("-c idle_in_transaction_session_timeout=500");
    let (client, conn) = connect_watched(config).await;
    client.batch_execute("BEGIN").await.unwrap();
    assert_eq!(
        connection_end(conn, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("25P03")
    );

    still_answers(&neighbour).await;
    assert_no_gateway_panics();
}

/// `pg_isready`'s verdict on the gateway at `port`: its exit status (0 accepting, 1 rejecting,
/// 2 no response) and what it printed.
async fn pg_isready(cluster: &Cluster, port: u16) -> (i32, String) {
    let out = run_program(
        cluster.program("pg_isready"),
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            roles::TRUST,
        ],
        None,
    )
    .await;
    let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.code().expect("pg_isready exited"), said)
}

/// A gateway whose backend refuses connections answers 57P03 (cannot connect now) naming the
/// server, so `pg_isready` reports it rejecting connections (exit 1) where a gateway with a
/// server behind it is accepting (exit 0); one whose backend accepts but never answers does
/// the same within `connect_timeout_ms`.
#[tokio::test]
async fn unreachable_backend_gets_57p03() {
    watch_for_gateway_panics();
    let cluster = Cluster::primary_only().await;
    let healthy = cluster.gateway().await;
    let neighbour = healthy.connect(roles::TRUST).await;

    let closed_port = understudy::local_cluster::free_port().expect("a free port");
    let refusing = TestGateway::start(Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        backends: vec![format!("127.0.0.1:{closed_port}")],
        connect_timeout_ms: 3_000,
        shutdown_timeout_ms: 1_000,
        ..Config::default()
    })
    .await;
    let started = Instant::now();
    let e = refusing
        .try_connect(refusing.pg_config(roles::TRUST))
        .await
        .expect_err("no backend to log in to");
    assert_eq!(sqlstate(&e), Some("57P03"), "{e}");
    let message = e.as_db_error().expect("a server error").message();
    assert!(
        message.contains("could not connect") && message.contains(&closed_port.to_string()),
        "a message naming the server: {message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at once, not after the 3 s connect timeout"
    );
    let (status, said) = pg_isready(&cluster, refusing.addr().port()).await;
    assert_eq!(status, 1, "pg_isready: {said}");
    assert!(said.ends_with("rejecting connections"), "{said}");
    let (status, said) = pg_isready(&cluster, healthy.addr().port()).await;
    assert_eq!(status, 0, "pg_isready: {said}");
    assert!(said.ends_with("accepting connections"), "{said}");

    // A backend that accepts TCP and then says nothing.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            held.push(tcp);
        }
    });
    let mute = TestGateway::start(Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        backends: vec![silent_addr.to_string()],
        connect_timeout_ms: 1_000,
        shutdown_timeout_ms: 1_000,
        ..Config::default()
    })
    .await;
    let started = Instant::now();
    let e = tokio::time::timeout(PATIENCE, mute.try_connect(mute.pg_config(roles::TRUST)))
        .await
        .expect("an answer")
        .expect_err("no backend to log in to");
    assert_eq!(sqlstate(&e), Some("57P03"), "{e}");
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(3),
        "answered after {waited:?} with a 1 s connect timeout"
    );

    refusing.shutdown().await;
    mute.shutdown().await;
    hold.abort();
    still_answers(&neighbour).await;
    assert_no_gateway_panics();
}
