//! TLS on both legs of the gateway: clients ↔ gateway (`tls.cert`/`tls.key`) and gateway ↔
//! PostgreSQL (`backend_tls.sslmode`), checked with tokio-postgres (rustls, verify-full) and with
//! real libpq (psql).

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::Output;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::config::{ChannelBinding, SslMode};
use tokio_postgres::Client;
use understudy::config::{BackendSslMode, ClientAuth, DEFAULT_AUTH_QUERY};
use understudy_integration_tests::tls::TestCa;
use understudy_integration_tests::{roles, run_program, sqlstate, Cluster, TestGateway, PATIENCE};

/// `<current_user> <backend leg is TLS>` in one psql output line.
const BACKEND_SSL_QUERY: &str =
    "SELECT current_user || ' ' || (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid())";

/// A primary whose PostgreSQL serves TLS with the CA's server certificate.
async fn tls_cluster(ca: &TestCa) -> Cluster {
    let (cert, key) = (ca.server_cert.clone(), ca.server_key.clone());
    Cluster::build(move |o| {
        o.with_standby = false;
        o.ssl = Some((cert, key));
    })
    .await
}

/// A gateway offering TLS to clients with the CA's server certificate and backend TLS `mode`.
async fn tls_gateway(cluster: &Cluster, ca: &TestCa, mode: BackendSslMode) -> TestGateway {
    let (cert, key) = (ca.server_cert.clone(), ca.server_key.clone());
    cluster
        .gateway_with(move |c| {
            c.tls.cert = Some(cert);
            c.tls.key = Some(key);
            c.backend_tls.sslmode = mode;
        })
        .await
}

/// tokio-postgres settings for `user` through the gateway with TLS required; `host` is the
/// name the certificate is checked against (the socket always goes to 127.0.0.1).
fn tls_config(gw: &TestGateway, user: &str, host: &str) -> tokio_postgres::Config {
    tls_config_at(gw.addr().port(), user, host)
}

/// [`tls_config`] for whatever listens on `port` (the gateway, or PostgreSQL itself).
fn tls_config_at(port: u16, user: &str, host: &str) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.host(host)
        .hostaddr(IpAddr::V4(Ipv4Addr::LOCALHOST))
        .port(port)
        .user(user)
        .dbname("postgres")
        .ssl_mode(SslMode::Require)
        .connect_timeout(PATIENCE);
    if let Some(p) = roles::password(user) {
        c.password(p);
    }
    c
}

/// Connects over TLS, trusting only `ca` (certificate chain and host name are verified).
async fn connect_tls(
    config: &tokio_postgres::Config,
    ca: &TestCa,
) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = config.connect(ca.connector()).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// The error and all its causes, for messages that hide the interesting part in a source.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Whether the session's *backend* connection (gateway → PostgreSQL) uses TLS, as PostgreSQL
/// sees it, and the current user.
async fn backend_facts(client: &Client) -> (bool, String) {
    let row = client
        .query_one(
            "SELECT ssl, current_user::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl row of the session's backend");
    (row.get(0), row.get(1))
}

/// Clients of `gw` are refused with a message that names `cause` (any case): with 08001 where
/// the gateway could not open the backend leg as its `backend_tls` demands, and with 57P03
/// where its role probes could not either (then the message says no primary is available, and
/// why).
async fn assert_backend_leg_refused(gw: &TestGateway, cause: &str) {
    for role in [roles::TRUST, roles::SCRAM] {
        let e = gw
            .try_connect(gw.pg_config(role))
            .await
            .expect_err("the backend leg cannot be opened as configured");
        let message = e.as_db_error().map(|d| d.message()).unwrap_or_default();
        let code = if message.starts_with("no primary") {
            "57P03"
        } else {
            "08001"
        };
        assert_eq!(sqlstate(&e), Some(code), "{role}: {e:?}");
        assert!(
            message.to_lowercase().contains(&cause.to_lowercase()),
            "{role}: unclear message {message:?}"
        );
    }
}

/// Runs psql with `conninfo` and `commands` (-c each), unaligned, tuples only, no psqlrc.
async fn psql(cluster: &Cluster, conninfo: &str, commands: &[&str]) -> Output {
    let mut args = vec!["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", conninfo];
    for c in commands {
        args.extend(["-c", c]);
    }
    run_program(cluster.program("psql"), &args, None).await
}

/// psql output as (success, stdout, stderr).
fn outcome(out: &Output) -> (bool, String, String) {
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A gateway with a certificate serves tokio-postgres clients that verify it (verify-full
/// semantics, by IP and by host name), while the backend leg stays plain because this
/// PostgreSQL has no TLS (`prefer` falls back): the client's TLS is the gateway's, and
/// `pg_stat_ssl` shows the backend's. Plain clients are still served; a client trusting another
/// CA is refused in the handshake and disturbs nobody.
#[tokio::test]
async fn tls_clients_verify_the_gateway_certificate() {
    let ca = TestCa::new();
    let cluster = Cluster::primary_only().await;
    let gw = tls_gateway(&cluster, &ca, BackendSslMode::Prefer).await;

    let mut sessions = Vec::new();
    for host in ["127.0.0.1", "localhost"] {
        for role in [roles::SCRAM, roles::MD5, roles::CLEARTEXT, roles::TRUST] {
            let client = connect_tls(&tls_config(&gw, role, host), &ca)
                .await
                .unwrap_or_else(|e| panic!("{role} via {host}: {}", error_chain(&e)));
            let (backend_ssl, user) = backend_facts(&client).await;
            assert_eq!(user, role);
            assert!(
                !backend_ssl,
                "{role}: PostgreSQL has no TLS, yet the backend is TLS"
            );
            let s = gw.session_status(&client).await;
            assert_eq!(s["tls"], true, "client leg must be TLS: {s:#}");
            sessions.push(client);
        }
    }

    let plain = gw.connect(roles::SCRAM).await;
    let s = gw.session_status(&plain).await;
    assert_eq!(s["tls"], false, "{s:#}");

    let stranger = TestCa::new();
    let e = connect_tls(&tls_config(&gw, roles::TRUST, "localhost"), &stranger)
        .await
        .expect_err("a certificate from an unknown CA must be refused");
    assert!(e.as_db_error().is_none(), "not a server error: {e:?}");
    let chain = error_chain(&e);
    assert!(chain.contains("TLS"), "{chain}");
    assert!(chain.to_lowercase().contains("certificate"), "{chain}");

    for client in sessions.iter().chain([&plain]) {
        let v: i32 = client
            .query_one("SELECT 6 * 7", &[])
            .await
            .expect("sessions survive a refused handshake")
            .get(0);
        assert_eq!(v, 42);
    }
}

/// An SSLRequest: its length, then the code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 4, 210, 22, 47];

/// A client's TLS stream.
type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// Opens TLS to `port` at once, no SSLRequest first, as libpq 17+ does with
/// `sslnegotiation=direct`, offering the ALPN protocols `alpn`.
async fn direct_tls(port: u16, ca: &TestCa, alpn: &[&[u8]]) -> std::io::Result<TlsStream> {
    tls_over(
        TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?,
        ca,
        alpn,
    )
    .await
}

/// A TLS client on `tcp`, trusting `ca`, offering the ALPN protocols `alpn`.
async fn tls_over(tcp: TcpStream, ca: &TestCa, alpn: &[&[u8]]) -> std::io::Result<TlsStream> {
    let mut config = ca.client_config();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
}

/// A client that opens TLS at once (libpq 17+ `sslnegotiation=direct`: a ClientHello naming
/// the ALPN protocol "postgresql" where an SSLRequest would be) gets a whole session, with its
/// cancel keys; one naming no protocol is refused with 08P01 inside TLS, one naming only others
/// fails its handshake, as PostgreSQL 17 does. The SSLRequest way selects "postgresql" when
/// offered. A gateway without a certificate refuses such a connection (in plain text, which
/// the TLS client cannot read: bad_input.rs reads it), and serves other clients.
#[tokio::test]
async fn direct_tls_negotiation() {
    let ca = TestCa::new();
    let cluster = Cluster::primary_only().await;
    let gw = tls_gateway(&cluster, &ca, BackendSslMode::Disable).await;
    let port = gw.addr().port();

    let tls = direct_tls(port, &ca, &[b"postgresql"]).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
    let mut config = tls_config(&gw, roles::SCRAM, "localhost");
    config.ssl_mode(SslMode::Disable);
    let (client, conn) = config
        .connect_raw(tls, tokio_postgres::NoTls)
        .await
        .expect("a session inside TLS opened at once");
    tokio::spawn(conn);
    let (backend_ssl, user) = backend_facts(&client).await;
    assert_eq!((backend_ssl, user.as_str()), (false, roles::SCRAM));
    assert_eq!(gw.session_status(&client).await["tls"], true);
    let sleeping = client.simple_query("SELECT pg_sleep(30)");
    let cancel = async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let tls = direct_tls(port, &ca, &[b"postgresql"]).await.unwrap();
        client
            .cancel_token()
            .cancel_query_raw(tls, tokio_postgres::NoTls)
            .await
    };
    let (slept, cancelled) = tokio::join!(sleeping, cancel);
    cancelled.expect("cancel sent");
    assert_eq!(sqlstate(&slept.unwrap_err()), Some("57014"));

    let mut unnamed = direct_tls(port, &ca, &[]).await.expect("handshake");
    let mut said = Vec::new();
    tokio::time::timeout(PATIENCE, unnamed.read_to_end(&mut said))
        .await
        .expect("closed")
        .expect("closed with close_notify");
    assert_eq!(said.first(), Some(&b'E'), "{said:?}");
    let text = String::from_utf8_lossy(&said);
    assert!(text.contains("C08P01") && text.contains("ALPN"), "{text:?}");
    let other = direct_tls(port, &ca, &[b"h2"]).await;
    assert!(
        other.is_err(),
        "a client naming only another protocol: {other:?}"
    );

    let mut tcp = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .unwrap();
    tcp.write_all(&SSL_REQUEST).await.unwrap();
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"S");
    let requested = tls_over(tcp, &ca, &[b"postgresql"]).await.unwrap();
    assert_eq!(
        requested.get_ref().1.alpn_protocol(),
        Some(&b"postgresql"[..])
    );

    // Bytes sent behind the SSLRequest before its answer came before the handshake, where
    // someone in the middle may have put them: refused, in the clear, with no handshake.
    let mut tcp = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .unwrap();
    tcp.write_all(&[&SSL_REQUEST[..], b"Q\0\0\0\x0dSELECT 1\0"].concat())
        .await
        .unwrap();
    let mut said = Vec::new();
    tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut said))
        .await
        .expect("closed")
        .unwrap();
    let text = String::from_utf8_lossy(&said);
    assert_eq!(said.first(), Some(&b'E'), "{text:?}");
    assert!(
        text.contains("C08P01") && text.contains("unencrypted data after SSL request"),
        "{text:?}"
    );

    let plain = cluster.gateway().await;
    let refused = direct_tls(plain.addr().port(), &ca, &[b"postgresql"]).await;
    refused.expect_err("no TLS to be had");
    let v: i32 = plain
        .connect(roles::TRUST)
        .await
        .query_one("SELECT 6 * 7", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 42);
    let v: i32 = client.query_one("SELECT 6 * 7", &[]).await.unwrap().get(0);
    assert_eq!(v, 42);
}

/// With `tls.required` a plain client is refused with 28000 and told to use TLS, before any
/// password exchange, while TLS clients are served; the setting needs a certificate.
#[tokio::test]
async fn tls_required_refuses_plain_clients() {
    let ca = TestCa::new();
    let cluster = Cluster::primary_only().await;
    let (cert, key) = (ca.server_cert.clone(), ca.server_key.clone());
    let gw = cluster
        .gateway_with(move |c| {
            c.tls.cert = Some(cert);
            c.tls.key = Some(key);
            c.tls.required = true;
        })
        .await;
    for role in [roles::SCRAM, roles::TRUST] {
        let e = gw
            .try_connect(gw.pg_config(role))
            .await
            .err()
            .unwrap_or_else(|| panic!("{role}: a plain client got in"));
        let db = e.as_db_error().unwrap_or_else(|| panic!("{role}: {e:?}"));
        assert_eq!(db.code().code(), "28000", "{role}: {db:?}");
        assert!(db.message().contains("requires TLS"), "{}", db.message());
        let client = connect_tls(&tls_config(&gw, role, "localhost"), &ca)
            .await
            .unwrap_or_else(|e| panic!("{role} over TLS: {}", error_chain(&e)));
        assert_eq!(gw.session_status(&client).await["tls"], true);
    }
    let mut config = cluster.gateway_config();
    config.tls.required = true;
    let refused = config
        .validate()
        .expect_err("tls.required without a certificate");
    assert!(refused.to_string().contains("tls.required"), "{refused}");
}

/// psql (libpq) over TLS to the gateway: `sslmode=require`, and `sslmode=verify-full` against
/// the test CA with host=localhost, both run a query and report an SSL connection; verify-full
/// against another CA fails on the certificate. With the backend leg plain, SCRAM with libpq's
/// default `channel_binding=prefer` works, and `channel_binding=require` fails with libpq's
/// explanation: without a verifier source (`auth_file`, `auth_query`) the gateway cannot check
/// the client itself, so it offers no SCRAM-SHA-256-PLUS.
#[tokio::test]
async fn psql_over_tls_to_the_gateway() {
    let ca = TestCa::new();
    let cluster = Cluster::primary_only().await;
    let gw = tls_gateway(&cluster, &ca, BackendSslMode::Prefer).await;
    let base = gw.conn_str(roles::SCRAM, "postgres");
    let by_name = base.replace("host=127.0.0.1", "host=localhost hostaddr=127.0.0.1");

    for conninfo in [
        format!("{base} sslmode=require"),
        format!(
            "{by_name} sslmode=verify-full sslrootcert={}",
            ca.ca_cert.display()
        ),
    ] {
        let (ok, stdout, stderr) =
            outcome(&psql(&cluster, &conninfo, &[BACKEND_SSL_QUERY, "\\conninfo"]).await);
        assert!(ok, "{conninfo}: {stderr}");
        let mut lines = stdout.lines();
        assert_eq!(lines.next(), Some("scram_user false"), "{stdout}");
        assert!(
            stdout.contains("SSL connection (protocol: TLS"),
            "psql must report TLS to the gateway: {stdout}"
        );
    }

    let stranger = TestCa::new();
    let conninfo = format!(
        "{by_name} sslmode=verify-full sslrootcert={}",
        stranger.ca_cert.display()
    );
    let (ok, _, stderr) = outcome(&psql(&cluster, &conninfo, &["SELECT 1"]).await);
    assert!(!ok, "an untrusted certificate was accepted");
    assert!(stderr.contains("certificate verify failed"), "{stderr}");

    let conninfo = format!("{base} sslmode=require channel_binding=require");
    let (ok, _, stderr) = outcome(&psql(&cluster, &conninfo, &["SELECT 1"]).await);
    assert!(
        !ok,
        "channel_binding=require cannot be met through the gateway"
    );
    assert!(
        stderr.contains("channel binding is required"),
        "libpq must say why: {stderr}"
    );

    let (ok, stdout, stderr) =
        outcome(&psql(&cluster, &format!("{base} sslmode=require"), &["SELECT 1"]).await);
    assert!(ok && stdout.trim() == "1", "gateway still serves: {stderr}");
}

/// TLS asked for where it is not offered ends cleanly: libpq and tokio-postgres with
/// `sslmode=require` against a gateway without a certificate fail with a message saying the
/// server does not support SSL/TLS, and a gateway with `backend_tls.sslmode = require` in front
/// of a PostgreSQL without TLS refuses clients with SQLSTATE 08001.
#[tokio::test]
async fn tls_required_but_not_offered_fails_cleanly() {
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;

    // Over TCP whatever the tests' transport: libpq ignores sslmode on a Unix-domain socket.
    let conninfo = format!(
        "host=127.0.0.1 port={} user={} dbname=postgres sslmode=require",
        gw.addr().port(),
        roles::TRUST
    );
    let (ok, _, stderr) = outcome(&psql(&cluster, &conninfo, &["SELECT 1"]).await);
    assert!(!ok, "sslmode=require succeeded without a certificate");
    assert!(
        stderr.contains("server does not support SSL, but SSL was required"),
        "{stderr}"
    );

    let ca = TestCa::new();
    let e = connect_tls(&tls_config(&gw, roles::TRUST, "localhost"), &ca)
        .await
        .expect_err("tokio-postgres sslmode=require must fail");
    let chain = error_chain(&e);
    assert!(chain.contains("server does not support TLS"), "{chain}");

    let client = gw.connect(roles::TRUST).await;
    let (backend_ssl, user) = backend_facts(&client).await;
    assert_eq!((backend_ssl, user.as_str()), (false, roles::TRUST));

    let strict = cluster
        .unrouted_gateway_with(|c| c.backend_tls.sslmode = BackendSslMode::Require)
        .await;
    assert_backend_leg_refused(&strict, "TLS").await;
}

/// The gateway's own connections (role probes, `auth_query`, health probes, the promotion)
/// use `backend_tls` as the sessions do, so a server that turns the control role away on
/// unencrypted TCP (`hostnossl … reject`) is still found to be primary or standby, answers
/// `auth_query`, and is failed over from; `pg_stat_ssl` shows the control connections
/// encrypted. The control role logs in with SCRAM over that TLS (without channel binding).
#[tokio::test]
async fn control_plane_follows_backend_tls() {
    const CONTROL: &str = "understudy_ctl";
    const CONTROL_PASSWORD: &str = "ctl-secret";
    let ca = TestCa::new();
    let (cert, key) = (ca.server_cert.clone(), ca.server_key.clone());
    let mut cluster = Cluster::build(move |o| {
        o.ssl = Some((cert, key));
        o.hba.splice(
            0..0,
            [
                format!("hostnossl all {CONTROL} 127.0.0.1/32 reject"),
                format!("hostssl all {CONTROL} 127.0.0.1/32 scram-sha-256"),
            ],
        );
    })
    .await;
    let su = cluster.superuser().await;
    su.batch_execute(&format!(
        "CREATE ROLE {CONTROL} SUPERUSER LOGIN PASSWORD '{CONTROL_PASSWORD}';
         CREATE TABLE t(a int PRIMARY KEY); GRANT ALL ON t TO PUBLIC"
    ))
    .await
    .unwrap();
    cluster.pg.wait_standby_caught_up().await.unwrap();
    let gw = cluster
        .failover_gateway_with(|c| {
            c.backend_tls.sslmode = BackendSslMode::Require;
            c.control.user = CONTROL.to_owned();
            c.control.password = Some(CONTROL_PASSWORD.to_owned());
        })
        .await;

    let status = gw.status().await;
    let mut roles_seen: Vec<String> = status["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["role"].as_str().unwrap_or_default().to_owned())
        .collect();
    roles_seen.sort();
    assert_eq!(roles_seen, ["primary", "standby"], "{status:#}");

    // SCRAM through auth_query: the verifier is read over the kept control connection.
    let c = gw.connect(roles::SCRAM).await;
    let (backend_ssl, user) = backend_facts(&c).await;
    assert_eq!((backend_ssl, user.as_str()), (true, roles::SCRAM));
    let control: Vec<(String, bool)> = su
        .query(
            "SELECT a.application_name, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s \
             USING (pid) WHERE a.usename = $1",
            &[&CONTROL],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        control.contains(&("understudy-control".to_owned(), true)),
        "the kept control connection is encrypted: {control:?}"
    );
    assert!(control.iter().all(|(_, ssl)| *ssl), "{control:?}");

    c.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let standby_port = i32::from(cluster.pg.standby.as_ref().unwrap().port());
    cluster.kill_primary().await;
    c.batch_execute("INSERT INTO t VALUES (2); COMMIT")
        .await
        .unwrap();
    let rows = c
        .query("SELECT a, inet_server_port() FROM t ORDER BY a", &[])
        .await
        .unwrap();
    let got: Vec<(i32, i32)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(got, [(1, standby_port), (2, standby_port)]);
}

/// A reload (`POST /reload`) reads the TLS files again: a renewed gateway certificate is
/// offered to the clients that come next while a session opened before carries on, and a
/// replaced `backend_tls.root_cert` is what the next backend connections are checked against.
/// A certificate file that does not parse changes nothing.
#[tokio::test]
async fn a_reload_takes_renewed_certificates_into_use() {
    let old = TestCa::new();
    let cluster = tls_cluster(&old).await;
    let dir = old.dir().join("in-use");
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key, root) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("root.pem"),
    );
    let install = |ca: &TestCa| {
        std::fs::copy(&ca.server_cert, &cert).unwrap();
        std::fs::copy(&ca.server_key, &key).unwrap();
    };
    install(&old);
    std::fs::copy(&old.ca_cert, &root).unwrap();
    let (c, k, r) = (cert.clone(), key.clone(), root.clone());
    let gw = cluster
        .gateway_with(move |g| {
            g.tls.cert = Some(c);
            g.tls.key = Some(k);
            g.backend_tls.sslmode = BackendSslMode::VerifyFull;
            g.backend_tls.root_cert = Some(r);
        })
        .await;
    let config = tls_config(&gw, roles::TRUST, "localhost");
    let before = connect_tls(&config, &old).await.unwrap();

    let renewed = TestCa::new();
    install(&renewed);
    connect_tls(&config, &renewed)
        .await
        .expect_err("the old certificate is in use until the reload");
    let (status, body) = gw.admin_post("/reload").await;
    assert_eq!(status, 200, "{body}");
    let outcome: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(outcome["applied"], true, "{body}");
    for file in [&cert, &key, &root] {
        assert!(
            outcome["reread"]
                .as_array()
                .unwrap()
                .contains(&file.display().to_string().into()),
            "{body}"
        );
    }
    assert_eq!(outcome["needs_restart"], serde_json::json!([]), "{body}");
    let after = connect_tls(&config, &renewed).await.unwrap();
    assert_eq!(backend_facts(&after).await, (true, roles::TRUST.to_owned()));
    connect_tls(&config, &old)
        .await
        .expect_err("the replaced certificate is no longer offered");
    assert_eq!(
        backend_facts(&before).await,
        (true, roles::TRUST.to_owned())
    );

    // The backend's certificate is from `old`: checked against another CA it fails.
    std::fs::copy(&renewed.ca_cert, &root).unwrap();
    assert_eq!(gw.admin_post("/reload").await.0, 200);
    let e = connect_tls(&config, &renewed)
        .await
        .expect_err("the backend's certificate is not from the new root");
    assert_eq!(sqlstate(&e), Some("08001"), "{e:?}");
    std::fs::copy(&old.ca_cert, &root).unwrap();

    std::fs::write(&cert, "not a certificate").unwrap();
    let (status, body) = gw.admin_post("/reload").await;
    assert_eq!(status, 500, "{body}");
    let outcome: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(outcome["applied"], false, "{body}");
    assert!(
        outcome["error"]
            .as_str()
            .is_some_and(|e| e.contains(&cert.display().to_string())),
        "the error names the file: {body}"
    );
    // Nothing changed: the renewed certificate, and the root that failed, are still in use.
    connect_tls(&config, &renewed)
        .await
        .expect_err("the failed reload did not apply the restored root either");
    install(&renewed);
    assert_eq!(gw.admin_post("/reload").await.0, 200);
    let again = connect_tls(&config, &renewed).await.unwrap();
    assert_eq!(backend_facts(&again).await, (true, roles::TRUST.to_owned()));
}

/// The backend leg follows `backend_tls.sslmode` against a PostgreSQL with TLS: `disable` is
/// plain, `prefer`, `require` and `verify-full` (root_cert = the test CA) are encrypted, as
/// PostgreSQL's own `pg_stat_ssl` reports for the session's backend (checked from the session and
/// by the superuser for the PID /status names); `verify-full` with another CA refuses clients
/// with 08001 and a message about the certificate.
#[tokio::test]
async fn backend_tls_follows_sslmode() {
    let ca = TestCa::new();
    let cluster = tls_cluster(&ca).await;
    let su = cluster.superuser().await;

    for (mode, encrypted) in [
        (BackendSslMode::Disable, false),
        (BackendSslMode::Prefer, true),
        (BackendSslMode::Require, true),
        (BackendSslMode::VerifyFull, true),
    ] {
        let root = ca.ca_cert.clone();
        let gw = cluster
            .gateway_with(move |c| {
                c.backend_tls.sslmode = mode;
                c.backend_tls.root_cert = Some(root);
            })
            .await;
        for role in [roles::TRUST, roles::SCRAM, roles::MD5, roles::CLEARTEXT] {
            let client = gw.connect(role).await;
            let (backend_ssl, user) = backend_facts(&client).await;
            assert_eq!(user, role, "{mode:?}");
            assert_eq!(backend_ssl, encrypted, "{mode:?} {role}");
            let s = gw.session_status(&client).await;
            assert_eq!(s["tls"], false, "client leg is plain: {s:#}");
            let pid = s["backend_pid"].as_i64().expect("backend_pid") as i32;
            let row = su
                .query_one(
                    "SELECT ssl, coalesce(version, '') FROM pg_stat_ssl WHERE pid = $1",
                    &[&pid],
                )
                .await
                .expect("pg_stat_ssl row for the backend /status names");
            assert_eq!(row.get::<_, bool>(0), encrypted, "{mode:?} {role}");
            let version: String = row.get(1);
            assert_eq!(version.starts_with("TLSv1."), encrypted, "{version}");
        }
    }

    let stranger = TestCa::new();
    let root = stranger.ca_cert.clone();
    let gw = cluster
        .unrouted_gateway_with(move |c| {
            c.backend_tls.sslmode = BackendSslMode::VerifyFull;
            c.backend_tls.root_cert = Some(root);
        })
        .await;
    assert_backend_leg_refused(&gw, "certificate").await;
}

/// TLS on both legs with passthrough authentication. A client that can bind SCRAM to its TLS
/// channel says so (`y`), which a TLS backend rejects as a downgrade when relayed, so the
/// gateway checks such a client itself against the role's verifier and logs in with the
/// recovered ClientKey. Without a verifier source that is impossible and the client is told
/// how to fix it; with `auth_query` every role logs in, and the gateway offers
/// SCRAM-SHA-256-PLUS bound to its own certificate: psql and tokio-postgres with
/// `channel_binding=require` log in (each computes the certificate's hash itself), with a
/// session that can move, and a wrong password still fails.
#[tokio::test]
async fn tls_on_both_legs() {
    let ca = TestCa::new();
    let cluster = tls_cluster(&ca).await;

    let bare = tls_gateway(&cluster, &ca, BackendSslMode::Prefer).await;
    let mut config = tls_config(&bare, roles::SCRAM, "localhost");
    config.channel_binding(ChannelBinding::Prefer);
    let err = connect_tls(&config, &ca)
        .await
        .err()
        .map(|e| describe(&e))
        .unwrap_or_default();
    assert!(
        err.contains("28000") && err.contains("auth_query"),
        "without a verifier the refusal says what to configure: {err}"
    );

    let (cert, key) = (ca.server_cert.clone(), ca.server_key.clone());
    let gw = cluster
        .gateway_with(move |c| {
            c.tls.cert = Some(cert);
            c.tls.key = Some(key);
            c.backend_tls.sslmode = BackendSslMode::Prefer;
            c.auth.auth_query = Some(understudy::config::DEFAULT_AUTH_QUERY.to_owned());
        })
        .await;
    let mut failures = Vec::new();
    for role in [roles::TRUST, roles::CLEARTEXT, roles::MD5, roles::SCRAM] {
        let mut config = tls_config(&gw, role, "localhost");
        config.channel_binding(ChannelBinding::Prefer);
        match connect_tls(&config, &ca).await {
            Ok(client) => {
                let (backend_ssl, user) = backend_facts(&client).await;
                assert_eq!((backend_ssl, user.as_str()), (true, role));
                let s = gw.session_status(&client).await;
                assert_eq!(s["tls"], true, "{s:#}");
                assert_eq!(s["movable"], gw.movable_word().await, "{s:#}");
            }
            Err(e) => failures.push(format!("tokio-postgres {role}: {}", describe(&e))),
        }

        let conninfo = format!(
            "{} sslmode=verify-full sslrootcert={}",
            gw.conn_str(role, "postgres")
                .replace("host=127.0.0.1", "host=localhost hostaddr=127.0.0.1"),
            ca.ca_cert.display()
        );
        let (ok, stdout, stderr) = outcome(&psql(&cluster, &conninfo, &[BACKEND_SSL_QUERY]).await);
        if ok {
            assert_eq!(stdout.trim(), format!("{role} true"));
        } else {
            failures.push(format!("psql {role}: {}", stderr.trim()));
        }
    }
    let mut wrong = tls_config(&gw, roles::SCRAM, "localhost");
    wrong.password("not-the-password");
    let err = connect_tls(&wrong, &ca)
        .await
        .err()
        .map(|e| describe(&e))
        .unwrap_or_default();
    assert!(
        err.contains("28P01"),
        "wrong password through the terminated exchange: {err}"
    );
    // A role that does not exist fails the same way and at the same step as one with a wrong
    // password, with PostgreSQL's own words: nothing tells a client which roles exist.
    let mut said = Vec::new();
    for port in [cluster.pg.primary.port(), gw.addr().port()] {
        let mut nobody = tls_config_at(port, "nobody_here", "localhost");
        nobody.password("whatever");
        nobody.channel_binding(ChannelBinding::Prefer);
        let e = connect_tls(&nobody, &ca).await.expect_err("refused");
        said.push(describe(&e));
    }
    assert_eq!(said[1], said[0], "unknown role: gateway vs PostgreSQL");
    assert!(said[0].contains("28P01"), "{}", said[0]);

    assert_channel_binding_required_works(&cluster, &gw, &ca).await;

    assert!(
        failures.is_empty(),
        "logins over TLS on both legs failed:\n{}",
        failures.join("\n")
    );
}

/// psql and tokio-postgres with `channel_binding=require` (SCRAM-SHA-256-PLUS, each binding to
/// the certificate it was served) log in as scram_user through `gw`, the session can move, a
/// wrong password is refused as ever, and psql with `channel_binding=disable` logs in unbound.
async fn assert_channel_binding_required_works(cluster: &Cluster, gw: &TestGateway, ca: &TestCa) {
    let conninfo = format!(
        "{} sslmode=require channel_binding=require",
        gw.conn_str(roles::SCRAM, "postgres")
    );
    let (ok, stdout, stderr) = outcome(&psql(cluster, &conninfo, &["SELECT current_user"]).await);
    assert!(ok, "psql channel_binding=require: {stderr}");
    assert_eq!(stdout.trim(), roles::SCRAM);
    // Offered, not taken: the exchange goes on unbound.
    let unbound = conninfo.replace("channel_binding=require", "channel_binding=disable");
    let (ok, stdout, stderr) = outcome(&psql(cluster, &unbound, &["SELECT current_user"]).await);
    assert!(ok, "psql channel_binding=disable: {stderr}");
    assert_eq!(stdout.trim(), roles::SCRAM);
    let wrong = conninfo.replace(roles::SCRAM_PASSWORD, "wrong");
    let (ok, _, stderr) = outcome(&psql(cluster, &wrong, &["SELECT 1"]).await);
    assert!(!ok, "wrong password accepted");
    assert!(
        stderr.contains("password authentication failed for user \"scram_user\""),
        "{stderr}"
    );

    let mut config = tls_config(gw, roles::SCRAM, "localhost");
    config.channel_binding(ChannelBinding::Require);
    let client = connect_tls(&config, ca)
        .await
        .unwrap_or_else(|e| panic!("tokio-postgres channel_binding=require: {}", describe(&e)));
    let s = gw.session_status(&client).await;
    assert_eq!(s["movable"], gw.movable_word().await, "{s:#}");
}

/// With `client_auth = scram-sha-256` (auth_query) the gateway runs the SCRAM exchange itself,
/// offering SCRAM-SHA-256-PLUS to TLS clients: psql with the default `channel_binding=prefer`
/// (which binds when offered) and with `channel_binding=require`, and tokio-postgres, log in as
/// scram_user over TLS on both legs, and the gateway logs in to PostgreSQL over TLS with the
/// recovered ClientKey (session movable).
#[tokio::test]
async fn gateway_scram_over_tls_on_both_legs() {
    let ca = TestCa::new();
    let cluster = tls_cluster(&ca).await;
    let (cert, key) = (ca.server_cert.clone(), ca.server_key.clone());
    let gw = cluster
        .gateway_with(move |c| {
            c.tls.cert = Some(cert);
            c.tls.key = Some(key);
            c.backend_tls.sslmode = BackendSslMode::Require;
            c.auth.client_auth = ClientAuth::ScramSha256;
            c.auth.auth_query = Some(DEFAULT_AUTH_QUERY.into());
        })
        .await;

    let client = connect_tls(&tls_config(&gw, roles::SCRAM, "localhost"), &ca)
        .await
        .unwrap_or_else(|e| panic!("tokio-postgres: {}", describe(&e)));
    let (backend_ssl, user) = backend_facts(&client).await;
    assert_eq!((backend_ssl, user.as_str()), (true, roles::SCRAM));
    let s = gw.session_status(&client).await;
    assert_eq!(
        (&s["tls"], &s["movable"]),
        (
            &serde_json::json!(true),
            &serde_json::json!(gw.movable_word().await)
        ),
        "{s:#}"
    );

    let conninfo = format!(
        "{} sslmode=verify-full sslrootcert={}",
        gw.conn_str(roles::SCRAM, "postgres")
            .replace("host=127.0.0.1", "host=localhost hostaddr=127.0.0.1"),
        ca.ca_cert.display()
    );
    let (ok, stdout, stderr) = outcome(&psql(&cluster, &conninfo, &[BACKEND_SSL_QUERY]).await);
    assert!(ok, "psql: {stderr}");
    assert_eq!(stdout.trim(), "scram_user true");

    assert_channel_binding_required_works(&cluster, &gw, &ca).await;
}

/// A login error with the server's SQLSTATE and message when there is one.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "{} {}: {} ({})",
            db.severity(),
            db.code().code(),
            db.message(),
            db.detail().unwrap_or_default()
        ),
        None => error_chain(e),
    }
}

/// Client certificates (`tls.client_ca`), as PostgreSQL checks them with `libpq`'s `sslcert`:
/// as the `cert` method (`client_auth = "cert"`: a valid certificate whose common name is the
/// role logs in with no password) and as `clientcert` on top of the server's own login
/// (`tls.client_cert = "verify-full"`, then `"verify-ca"`). Refusals carry PostgreSQL's texts
/// and `28000`; a certificate from another CA fails the handshake.
#[tokio::test]
async fn client_certificates_as_the_cert_method_and_as_clientcert() {
    let ca = TestCa::new();
    let cluster = Cluster::primary_only().await;
    let (postgres_cert, postgres_key) = ca.client_cert(roles::SUPERUSER);
    let (scram_cert, scram_key) = ca.client_cert(roles::SCRAM);
    let stranger = TestCa::new();
    let (foreign_cert, foreign_key) = stranger.client_cert(roles::SUPERUSER);
    let conninfo = |gw: &TestGateway, user: &str, extra: &str| verify_full(gw, &ca, user, extra);
    let gateway = |auth, needed| certificate_gateway(&cluster, &ca, auth, needed, |_| {});

    // The cert method.
    let gw = gateway(ClientAuth::Cert, understudy::config::ClientCert::Optional).await;
    let cert = presenting(&postgres_cert, &postgres_key);
    assert_eq!(
        psql_login(&cluster, &conninfo(&gw, roles::SUPERUSER, &cert)).await,
        roles::SUPERUSER
    );
    let not_named = format!(
        "certificate authentication failed for user \"{}\"",
        roles::SCRAM
    );
    psql_refused(&cluster, &conninfo(&gw, roles::SCRAM, &cert), &not_named).await;
    psql_refused(
        &cluster,
        &conninfo(&gw, roles::SUPERUSER, ""),
        NO_CERTIFICATE,
    )
    .await;
    let plain = gw.conn_str(roles::SUPERUSER, "postgres") + " sslmode=disable";
    psql_refused(&cluster, &plain, NO_CERTIFICATE).await;
    // Another CA's certificate fails the handshake itself (a TLS alert).
    let foreign = presenting(&foreign_cert, &foreign_key);
    psql_refused(
        &cluster,
        &conninfo(&gw, roles::SUPERUSER, &foreign),
        "alert",
    )
    .await;
    // tokio-postgres (rustls) presenting the certificate: in, and 28000 for another role.
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(
        ca.client_config_with_cert(&postgres_cert, &postgres_key),
    );
    let (client, conn) = tls_config(&gw, roles::SUPERUSER, "localhost")
        .connect(tls.clone())
        .await
        .expect("the certificate logs in");
    tokio::spawn(conn);
    let row = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), roles::SUPERUSER);
    let refused = tls_config(&gw, roles::TRUST, "localhost")
        .connect(tls)
        .await
        .err()
        .expect("the certificate names another role");
    assert_eq!(sqlstate(&refused), Some("28000"));
    gw.shutdown().await;

    // clientcert=verify-full over the server's own login (SCRAM here).
    let gw = gateway(
        ClientAuth::Passthrough,
        understudy::config::ClientCert::VerifyFull,
    )
    .await;
    let scram = presenting(&scram_cert, &scram_key);
    assert_eq!(
        psql_login(&cluster, &conninfo(&gw, roles::SCRAM, &scram)).await,
        roles::SCRAM
    );
    let mismatch = format!(
        "certificate validation (clientcert=verify-full) failed for user \"{}\": CN mismatch",
        roles::MD5
    );
    psql_refused(&cluster, &conninfo(&gw, roles::MD5, &scram), &mismatch).await;
    psql_refused(&cluster, &conninfo(&gw, roles::SCRAM, ""), NO_CERTIFICATE).await;
    gw.shutdown().await;

    // clientcert=verify-ca: any certificate of the CA, then the server's login.
    let gw = gateway(
        ClientAuth::Passthrough,
        understudy::config::ClientCert::VerifyCa,
    )
    .await;
    assert_eq!(
        psql_login(&cluster, &conninfo(&gw, roles::MD5, &scram)).await,
        roles::MD5
    );
    psql_refused(&cluster, &conninfo(&gw, roles::MD5, ""), NO_CERTIFICATE).await;
    gw.shutdown().await;
}

/// What PostgreSQL, and the gateway, say to a client that needs a certificate and has none.
/// Certificates with a user name map (`auth.ident_file`, `auth.ident_map`, PostgreSQL's
/// `map=`): under the `cert` method the map decides which common names log in as which roles
/// (`/^(.*)\.people$` → `\1`), and the common name alone no longer does; under
/// `tls.client_cert = "verify-full"` the same map judges the name before the server's own login.
#[tokio::test]
async fn certificates_follow_the_user_name_map() {
    let ca = TestCa::new();
    let cluster = Cluster::primary_only().await;
    let (mapped_cert, mapped_key) = ca.client_cert(&format!("{}.people", roles::SUPERUSER));
    let (plain_cert, plain_key) = ca.client_cert(roles::SUPERUSER);
    let dir = std::env::temp_dir().join(format!("understudy-ident-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ident = dir.join("pg_ident.conf");
    std::fs::write(&ident, "people  /^(.*)\\.people$  \\1\n").unwrap();
    let conninfo = |gw: &TestGateway, user: &str, cert: &Path, key: &Path| {
        verify_full(gw, &ca, user, &presenting(cert, key))
    };
    for (auth, client_cert, refusal) in [
        (
            ClientAuth::Cert,
            understudy::config::ClientCert::Optional,
            "certificate authentication failed for user",
        ),
        (
            ClientAuth::Passthrough,
            understudy::config::ClientCert::VerifyFull,
            "certificate validation (clientcert=verify-full) failed for user",
        ),
    ] {
        let ident = ident.clone();
        let gw = certificate_gateway(&cluster, &ca, auth, client_cert, |c| {
            c.auth.ident_file = Some(ident);
            c.auth.ident_map = Some("people".to_owned());
        })
        .await;
        let mapped = conninfo(&gw, roles::SUPERUSER, &mapped_cert, &mapped_key);
        assert_eq!(psql_login(&cluster, &mapped).await, roles::SUPERUSER);
        let other_role = conninfo(&gw, roles::SCRAM, &mapped_cert, &mapped_key);
        psql_refused(&cluster, &other_role, refusal).await;
        // The role's own name as the common name: no line of the map says so.
        let unmapped = conninfo(&gw, roles::SUPERUSER, &plain_cert, &plain_key);
        psql_refused(&cluster, &unmapped, refusal).await;
        gw.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

const NO_CERTIFICATE: &str = "connection requires a valid client certificate";

/// A gateway serving `ca`'s server certificate that asks TLS clients for a certificate of `ca`
/// (`tls.client_ca`), with `client_auth = auth` and `tls.client_cert = needed`, and no
/// Unix-domain socket (which carries none); `adjust` sets the rest.
async fn certificate_gateway(
    cluster: &Cluster,
    ca: &TestCa,
    auth: ClientAuth,
    needed: understudy::config::ClientCert,
    adjust: impl FnOnce(&mut understudy::config::Config),
) -> TestGateway {
    cluster
        .gateway_with(|c| {
            c.tls.cert = Some(ca.server_cert.clone());
            c.tls.key = Some(ca.server_key.clone());
            c.tls.client_ca = Some(ca.ca_cert.clone());
            c.tls.client_cert = needed;
            c.auth.client_auth = auth;
            c.unix_socket_dir = None;
            adjust(c);
        })
        .await
}

/// libpq's connection string for `user` through `gw` with `sslmode=verify-full` against `ca`
/// (the certificate checked for `localhost`), and `extra` (see [`presenting`]).
fn verify_full(gw: &TestGateway, ca: &TestCa, user: &str, extra: &str) -> String {
    format!(
        "{} sslmode=verify-full sslrootcert={}{extra}",
        gw.conn_str(user, "postgres")
            .replace("host=127.0.0.1", "host=localhost hostaddr=127.0.0.1"),
        ca.ca_cert.display()
    )
}

/// The connection-string options that present client certificate `cert` with its `key`.
fn presenting(cert: &Path, key: &Path) -> String {
    format!(" sslcert={} sslkey={}", cert.display(), key.display())
}

/// The role psql logs in as with `conninfo` (it must log in).
async fn psql_login(cluster: &Cluster, conninfo: &str) -> String {
    let (ok, stdout, stderr) = outcome(&psql(cluster, conninfo, &["SELECT current_user"]).await);
    assert!(ok, "{conninfo}: {stderr}");
    stdout.trim_end().to_owned()
}

/// psql with `conninfo` is refused, saying `says`.
async fn psql_refused(cluster: &Cluster, conninfo: &str, says: &str) {
    let (ok, _, stderr) = outcome(&psql(cluster, conninfo, &["SELECT 1"]).await);
    assert!(!ok && stderr.contains(says), "{conninfo}: {stderr}");
}

/// A server that wants a certificate from every TLS client (`clientcert=verify-ca` on its
/// `hostssl` lines; nothing else but the harness's superuser from plain TCP) serves the gateway's sessions and its own control
/// connections once `backend_tls.cert` and `backend_tls.key` give the gateway one (libpq's
/// `sslcert`/`sslkey`): the server sees it (`pg_stat_ssl.client_dn`) under the client's SCRAM
/// login. Without one, clients are refused naming the server's reason.
#[tokio::test]
async fn the_gateway_presents_its_certificate_to_servers_that_ask() {
    let ca = TestCa::new();
    let (cert, key, root) = (
        ca.server_cert.clone(),
        ca.server_key.clone(),
        ca.ca_cert.clone(),
    );
    let cluster = Cluster::build(move |o| {
        o.with_standby = false;
        o.ssl = Some((cert, key));
        o.ssl_ca = Some(root);
        o.hba = vec![
            // The harness's own superuser connections, without TLS.
            "hostnossl all postgres 127.0.0.1/32 trust".to_owned(),
            "hostssl all postgres 127.0.0.1/32 trust clientcert=verify-ca".to_owned(),
            "hostssl all all 127.0.0.1/32 scram-sha-256 clientcert=verify-ca".to_owned(),
            "host all all 127.0.0.1/32 reject".to_owned(),
        ];
    })
    .await;
    let (gateway_cert, gateway_key) = ca.client_cert("understudy-gateway");
    let gw = cluster
        .gateway_with(move |c| {
            c.backend_tls.sslmode = BackendSslMode::Require;
            c.backend_tls.cert = Some(gateway_cert);
            c.backend_tls.key = Some(gateway_key);
        })
        .await;
    let client = gw.connect(roles::SCRAM).await;
    let row = client
        .query_one(
            "SELECT current_user::text, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), roles::SCRAM);
    assert_eq!(row.get::<_, String>(1), "/CN=understudy-gateway");
    gw.shutdown().await;

    // Refused, naming the reason: the server's own 28000 where the gateway logs in at once
    // (one backend), or 57P03 with the probes' reason where it must first find the primary.
    let gw = cluster
        .unrouted_gateway_with(|c| c.backend_tls.sslmode = BackendSslMode::Require)
        .await;
    let e = gw
        .try_connect(gw.pg_config(roles::SCRAM))
        .await
        .expect_err("no certificate, no session");
    assert!(matches!(sqlstate(&e), Some("57P03" | "28000")), "{e:?}");
    let message = e.as_db_error().map(|d| d.message()).unwrap_or_default();
    assert!(message.contains("client certificate"), "{message}");
}
