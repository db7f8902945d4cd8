//! Query cancellation through the gateway (DESIGN.md, "Transparency rules"): BackendKeyData
//! carries the real backend PID with a secret of the gateway's own, a CancelRequest quoting that
//! key reaches the session's backend (in the clear or inside TLS), and a wrong key does nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, NoTls};
use understudy_integration_tests::raw::{query, Msg, RawConn};
use understudy_integration_tests::tls::TestCa;
use understudy_integration_tests::{roles, sqlstate, Cluster, PATIENCE};

/// The longest a forwarded cancel may take to stop a query.
const CANCEL_LATENCY: Duration = Duration::from_secs(5);

/// Waits until a backend of `app` is running a statement containing `pg_sleep`.
async fn wait_sleeping(cluster: &Cluster, app: &str) {
    let su = cluster.superuser().await;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let n: i64 = su
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE application_name = $1 AND state = 'active' AND query LIKE '%pg_sleep%'",
                &[&app],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if n > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{app} never started sleeping");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `sql` in a task; resolves to its outcome and how long it took.
fn spawn_query(
    client: &Arc<Client>,
    sql: &'static str,
) -> JoinHandle<(Result<(), tokio_postgres::Error>, Duration)> {
    let client = client.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let r = client.query_one(sql, &[]).await.map(drop);
        (r, started.elapsed())
    })
}

/// Awaits a query from [`spawn_query`] that was cancelled: it failed with 57014, in time.
async fn assert_cancelled(query: JoinHandle<(Result<(), tokio_postgres::Error>, Duration)>) {
    let (result, took) = query.await.unwrap();
    let e = result.expect_err("the query was cancelled");
    assert_eq!(sqlstate(&e), Some("57014"), "{e}");
    assert!(took < CANCEL_LATENCY, "cancelled after {took:?}");
}

async fn assert_answers(client: &Client) {
    let one: i32 = client
        .query_one("SELECT 1", &[])
        .await
        .expect("session still works")
        .get(0);
    assert_eq!(one, 1);
}

/// A trusted raw session named `app`: the connection, and the pid and secret from its
/// BackendKeyData.
async fn raw_session(addr: SocketAddr, app: &str) -> (RawConn, i32, i32) {
    let (c, greeting) = RawConn::login_as_app(addr, roles::TRUST, app).await;
    let key = greeting
        .iter()
        .find(|m| m.tag == b'K')
        .expect("BackendKeyData");
    assert_eq!(
        key.body.len(),
        8,
        "a protocol 3.0 key: pid and 4-byte secret"
    );
    let word = |i: usize| i32::from_be_bytes(key.body[i..i + 4].try_into().expect("4 bytes"));
    (c, word(0), word(4))
}

/// Sends a CancelRequest for (`pid`, `secret`) on a new connection; the gateway answers
/// nothing and closes it, as PostgreSQL does.
async fn send_cancel(addr: SocketAddr, pid: i32, secret: i32) {
    let mut c = RawConn::open(addr).await;
    let mut packet = 16i32.to_be_bytes().to_vec();
    packet.extend_from_slice(&80_877_102i32.to_be_bytes());
    packet.extend_from_slice(&pid.to_be_bytes());
    packet.extend_from_slice(&secret.to_be_bytes());
    c.send(&packet).await;
    assert!(
        c.closed().await,
        "cancel connection closed without an answer"
    );
}

/// First column of the DataRows of a raw answer, as text.
fn values(answer: &[Msg]) -> Vec<String> {
    answer
        .iter()
        .filter(|m| m.tag == b'D')
        .map(|row| {
            let len = i32::from_be_bytes(row.body[2..6].try_into().expect("4 bytes"));
            String::from_utf8_lossy(&row.body[6..6 + len as usize]).into_owned()
        })
        .collect()
}

/// tokio-postgres's own cancel against `SELECT pg_sleep(30)` through the gateway fails the query
/// with 57014 within seconds; the session stays usable and a neighbour's query is untouched.
#[tokio::test]
async fn cancel_token_stops_a_running_query() {
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;
    let client = Arc::new(gw.connect(roles::TRUST).await);
    let neighbour = Arc::new(gw.connect(roles::SCRAM).await);

    let neighbour_sleep = spawn_query(&neighbour, "SELECT pg_sleep(1)");
    let sleeping = spawn_query(&client, "SELECT pg_sleep(30)");
    wait_sleeping(&cluster, "it_trust_user").await;
    wait_sleeping(&cluster, "it_scram_user").await;
    client
        .cancel_token()
        .cancel_query(NoTls)
        .await
        .expect("cancel sent");
    assert_cancelled(sleeping).await;

    let (neighbour_result, _) = neighbour_sleep.await.unwrap();
    neighbour_result.expect("the neighbour's query is not cancelled");
    assert_answers(&client).await;
    assert_answers(&neighbour).await;
}

/// BackendKeyData carries the backend's real PID: what `pg_backend_pid()` says, and the PID
/// `pg_stat_activity` lists the session under.
#[tokio::test]
async fn backend_key_data_carries_the_real_pid() {
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;
    let (mut c, pid, _secret) = raw_session(gw.addr(), "key_data").await;
    c.send(&query("SELECT pg_backend_pid()")).await;
    let answer = c.read_until(b'Z').await;
    assert_eq!(values(&answer), [pid.to_string()]);

    let su = cluster.superuser().await;
    let app: String = su
        .query_one(
            "SELECT application_name FROM pg_stat_activity WHERE pid = $1",
            &[&pid],
        )
        .await
        .expect("the PID is a live backend")
        .get(0);
    assert_eq!(app, "key_data");
}

/// A CancelRequest with the right PID but a wrong secret (or the right secret with a wrong PID)
/// does nothing: `pg_sleep(2)` finishes normally. The right key cancels at once.
#[tokio::test]
async fn cancel_with_a_wrong_key_is_ignored() {
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;
    let neighbour = gw.connect(roles::TRUST).await;
    let (mut c, pid, secret) = raw_session(gw.addr(), "wrong_key").await;

    let started = Instant::now();
    c.send(&query("SELECT pg_sleep(2)")).await;
    wait_sleeping(&cluster, "wrong_key").await;
    send_cancel(gw.addr(), pid, secret.wrapping_add(1)).await;
    send_cancel(gw.addr(), pid.wrapping_add(1), secret).await;
    send_cancel(gw.addr(), 0, 0).await;
    let answer = c.read_until(b'Z').await;
    assert!(
        answer.iter().all(|m| m.tag != b'E'),
        "a wrong key cancelled the query: {answer:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(1_900));

    // Control: the right key works on the same session.
    let started = Instant::now();
    c.send(&query("SELECT pg_sleep(30)")).await;
    wait_sleeping(&cluster, "wrong_key").await;
    send_cancel(gw.addr(), pid, secret).await;
    let answer = c.read_until(b'Z').await;
    let e = answer
        .iter()
        .find(|m| m.tag == b'E')
        .expect("the right key cancels");
    assert_eq!(e.code(), "57014", "{}", e.message());
    assert_eq!(e.message(), "canceling statement due to user request");
    assert!(started.elapsed() < CANCEL_LATENCY);

    c.send(&query("SELECT 'still here'")).await;
    assert_eq!(values(&c.read_until(b'Z').await), ["still here"]);
    assert_answers(&neighbour).await;
}

/// A cancel sent inside TLS (SSLRequest, handshake, then CancelRequest, as tokio-postgres and
/// libpq 17+ do) reaches the backend of a TLS session.
#[tokio::test]
async fn cancel_inside_tls_stops_the_query() {
    let cluster = Cluster::primary_only().await;
    let ca = TestCa::new();
    let gw = cluster
        .gateway_with(|cfg| {
            cfg.tls.cert = Some(ca.server_cert.clone());
            cfg.tls.key = Some(ca.server_key.clone());
        })
        .await;
    let mut config = gw.pg_config(roles::TRUST);
    config.ssl_mode(SslMode::Require);
    let (client, conn) = config.connect(ca.connector()).await.expect("TLS session");
    tokio::spawn(conn);
    let status = gw.status().await;
    assert!(
        status["sessions"]
            .as_array()
            .expect("sessions")
            .iter()
            .all(|s| s["tls"] == true),
        "the session runs over TLS: {status}"
    );

    let client = Arc::new(client);
    let sleeping = spawn_query(&client, "SELECT pg_sleep(30)");
    wait_sleeping(&cluster, "it_trust_user").await;
    client
        .cancel_token()
        .cancel_query(ca.connector())
        .await
        .expect("cancel sent inside TLS");
    assert_cancelled(sleeping).await;
    assert_answers(&client).await;

    // The gateway ends a cancel connection as PostgreSQL does, inside TLS with close_notify:
    // libpq 17+ waits for it and reports a bare close as a failed cancel.
    let mut tcp = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    tcp.write_all(&packet(&[80_877_103])).await.unwrap();
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"S");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(ca.client_config()));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.expect("TLS handshake");
    // A CancelRequest whose key matches no session.
    tls.write_all(&packet(&[80_877_102, 1, 2])).await.unwrap();
    tls.flush().await.unwrap();
    let mut rest = Vec::new();
    let end = tokio::time::timeout(PATIENCE, tls.read_to_end(&mut rest))
        .await
        .expect("the gateway closes a cancel connection");
    assert_eq!(
        end.map_err(|e| e.kind()),
        Ok(0),
        "closed with close_notify, nothing said"
    );
}

/// A startup-phase packet of `words`, behind its length word.
fn packet(words: &[i32]) -> Vec<u8> {
    let len = 4 * (words.len() + 1) as i32;
    std::iter::once(len)
        .chain(words.iter().copied())
        .flat_map(i32::to_be_bytes)
        .collect()
}

/// A cancel gets through even when the gateway is at `max_client_connections`: cancel
/// connections are not sessions (PostgreSQL, too, serves them when full).
#[tokio::test]
async fn cancel_gets_through_when_the_gateway_is_full() {
    let cluster = Cluster::primary_only().await;
    let gw = cluster
        .gateway_with(|cfg| cfg.max_client_connections = 1)
        .await;
    let client = Arc::new(gw.connect(roles::TRUST).await);
    let refused = gw
        .try_connect(gw.pg_config(roles::TRUST))
        .await
        .expect_err("the gateway is full");
    assert_eq!(sqlstate(&refused), Some("53300"));

    let sleeping = spawn_query(&client, "SELECT pg_sleep(30)");
    wait_sleeping(&cluster, "it_trust_user").await;
    client
        .cancel_token()
        .cancel_query(NoTls)
        .await
        .expect("cancel sent");
    assert_cancelled(sleeping).await;
    assert_answers(&client).await;
}
