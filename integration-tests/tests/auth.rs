//! Authentication through the gateway: PostgreSQL stays the authority on who logs in
//! (passthrough), the gateway can check clients itself (auth_file, auth_query), and every session
//! reports whether the gateway holds what it needs to log in again without its client.

use std::path::PathBuf;

use tokio_postgres::{Client, NoTls};
use understudy::config::{ClientAuth, DEFAULT_AUTH_QUERY};
use understudy_integration_tests::{roles, run_program, sqlstate, Cluster, TestGateway, PATIENCE};

/// Every role the harness creates, with the pg_hba method that applies to it.
const ALL_ROLES: [&str; 4] = [roles::SCRAM, roles::MD5, roles::CLEARTEXT, roles::TRUST];

/// A login straight to the primary, bypassing the gateway.
fn direct_config(
    cluster: &Cluster,
    user: &str,
    password: Option<&str>,
    dbname: &str,
) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.host("127.0.0.1")
        .port(cluster.pg.primary.port())
        .user(user)
        .dbname(dbname)
        .connect_timeout(PATIENCE);
    if let Some(p) = password {
        c.password(p);
    }
    c
}

/// A login through the gateway (the harness's settings) with another password and database.
fn gateway_config(
    gw: &TestGateway,
    user: &str,
    password: Option<&str>,
    dbname: &str,
) -> tokio_postgres::Config {
    let mut c = gw.pg_config(user);
    c.dbname(dbname).connect_timeout(PATIENCE);
    if let Some(p) = password {
        c.password(p);
    }
    c
}

/// Connects without TLS and drives the connection in a task.
async fn try_login(config: &tokio_postgres::Config) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = config.connect(NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// The server-sent error of a login that must fail; panics if it succeeds or fails client-side.
async fn login_error(config: &tokio_postgres::Config, what: &str) -> (String, String) {
    match try_login(config).await {
        Ok(_) => panic!("{what}: login succeeded but must fail"),
        Err(e) => {
            let db = e
                .as_db_error()
                .unwrap_or_else(|| panic!("{what}: expected a server error, got {e:?}"));
            (db.code().code().to_owned(), db.message().to_owned())
        }
    }
}

/// A wrong password for `role` and a role that does not exist are both refused with 28P01, the
/// code PostgreSQL itself gives for either (so a client cannot tell which roles exist).
async fn assert_bad_logins_refused(gw: &TestGateway, role: &str) {
    for (user, password, what) in [
        (role, "wrong", "wrong password"),
        ("no_such_role", "whatever", "unknown role"),
    ] {
        let (code, message) =
            login_error(&gateway_config(gw, user, Some(password), "postgres"), what).await;
        assert_eq!(code, "28P01", "{what}: {message}");
    }
}

/// The gateway looks secrets up at each login: a role created a moment ago logs in (and its
/// session is movable), and once its password is changed the old one gets 28P01 and the new one
/// logs in.
async fn fresh_role_follows_password_changes(cluster: &Cluster, gw: &TestGateway) {
    let su = cluster.superuser().await;
    su.batch_execute("CREATE ROLE fresh_user LOGIN PASSWORD 'fresh-one'")
        .await
        .expect("create role");
    let config = |password| gateway_config(gw, "fresh_user", Some(password), "postgres");
    let client = try_login(&config("fresh-one"))
        .await
        .expect("a role created a moment ago logs in");
    assert_eq!(current_user(&client).await, "fresh_user");
    assert_movable(gw, &client, "fresh_user", true).await;

    su.batch_execute("ALTER ROLE fresh_user PASSWORD 'changed-pw'")
        .await
        .expect("alter role");
    let (code, _) = login_error(&config("fresh-one"), "old password after ALTER ROLE").await;
    assert_eq!(code, "28P01");
    let client = try_login(&config("changed-pw"))
        .await
        .expect("new password works");
    assert_eq!(current_user(&client).await, "fresh_user");
    assert_movable(gw, &client, "fresh_user", true).await;
}

/// `current_user` of a session.
async fn current_user(client: &Client) -> String {
    client
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("SELECT current_user")
        .get(0)
}

/// Asserts the session's movability in `/status`: "yes", or "no" with a non-empty reason (always
/// "no" where failover is off: a one-backend gateway, `UNDERSTUDY_TEST_ONE_BACKEND`).
async fn assert_movable(gw: &TestGateway, client: &Client, role: &str, movable: bool) {
    let s = gw.session_status(client).await;
    assert_eq!(s["user"], role, "{s:#}");
    assert_eq!(s["database"], "postgres", "{s:#}");
    if movable && gw.movable_word().await == "yes" {
        assert_eq!(s["movable"], "yes", "{role} must be movable: {s:#}");
    } else {
        assert_eq!(s["movable"], "no", "{role} must not be movable: {s:#}");
        let reason = s["reason"].as_str().unwrap_or_default();
        assert!(!reason.is_empty(), "{role}: 'no' without a reason: {s:#}");
    }
}

/// The role's stored secret (`SCRAM-SHA-256$…` or `md5…`) as PostgreSQL keeps it.
async fn stored_secret(cluster: &Cluster, role: &str) -> String {
    cluster
        .superuser()
        .await
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&role],
        )
        .await
        .expect("pg_authid")
        .get(0)
}

/// Writes a PgBouncer-style userlist into the cluster's directory (removed with the cluster).
fn write_userlist(cluster: &Cluster, entries: &[(&str, &str)]) -> PathBuf {
    let path = cluster.pg.base_dir().join("userlist.txt");
    let text: String = entries
        .iter()
        .map(|(user, secret)| format!("\"{user}\" \"{secret}\"\n"))
        .collect();
    std::fs::write(&path, text).expect("write userlist");
    path
}

/// Passthrough (the default): every harness role logs in through the gateway as itself, the
/// client sees the real backend PID, and /status says which sessions the gateway could log in
/// again on its own: SCRAM and md5 relayed without a known secret cannot be, cleartext (the
/// password went past) and trust can.
#[tokio::test]
async fn passthrough_logs_every_role_in() {
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;
    let mut sessions = Vec::new();
    for role in ALL_ROLES {
        let client = gw.connect(role).await;
        assert_eq!(current_user(&client).await, role);
        let row = client
            .query_one("SELECT session_user::text, current_database()::text", &[])
            .await
            .expect("session facts");
        assert_eq!(row.get::<_, String>(0), role);
        assert_eq!(row.get::<_, String>(1), "postgres");
        sessions.push((role, client));
    }
    for (role, client) in &sessions {
        let movable = matches!(*role, roles::CLEARTEXT | roles::TRUST);
        assert_movable(&gw, client, role, movable).await;
    }
    let status = gw.status().await;
    assert_eq!(status["session_count"], 4, "{status:#}");
}

/// Failed logins carry exactly the SQLSTATE PostgreSQL sends when connected to directly: wrong
/// password for each password method (28P01), unknown role, unknown database (3D000); and the
/// gateway keeps serving afterwards.
#[tokio::test]
async fn passthrough_failures_match_the_server() {
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;

    for role in [roles::SCRAM, roles::MD5, roles::CLEARTEXT] {
        let what = format!("{role} with a wrong password");
        let direct = login_error(
            &direct_config(&cluster, role, Some("wrong"), "postgres"),
            &what,
        )
        .await;
        let via = login_error(&gateway_config(&gw, role, Some("wrong"), "postgres"), &what).await;
        assert_eq!(direct.0, "28P01", "{what} directly: {direct:?}");
        assert_eq!(via, direct, "{what}: gateway differs from the server");
    }

    let what = "unknown role";
    let direct = login_error(
        &direct_config(&cluster, "no_such_role", Some("whatever"), "postgres"),
        what,
    )
    .await;
    let via = login_error(
        &gateway_config(&gw, "no_such_role", Some("whatever"), "postgres"),
        what,
    )
    .await;
    assert_eq!(direct.0, "28P01", "{what} directly: {direct:?}");
    assert_eq!(via, direct, "{what}: gateway differs from the server");

    for role in ALL_ROLES {
        let what = format!("{role} to an unknown database");
        let pw = roles::password(role);
        let direct = login_error(&direct_config(&cluster, role, pw, "no_such_db"), &what).await;
        let via = login_error(&gateway_config(&gw, role, pw, "no_such_db"), &what).await;
        assert_eq!(direct.0, "3D000", "{what} directly: {direct:?}");
        assert_eq!(via, direct, "{what}: gateway differs from the server");
    }

    let client = gw.connect(roles::SCRAM).await;
    assert_eq!(current_user(&client).await, roles::SCRAM);
}

/// PostgreSQL decides at login time: a role created a moment ago logs in through the gateway at
/// once, and after `ALTER ROLE … PASSWORD` the old password fails with 28P01 and the new one
/// works, with no cache in between.
#[tokio::test]
async fn passthrough_sees_role_changes_at_once() {
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;
    let su = cluster.superuser().await;

    su.batch_execute("CREATE ROLE fresh_user LOGIN PASSWORD 'fresh-one'")
        .await
        .expect("create role");
    let client = try_login(&gateway_config(
        &gw,
        "fresh_user",
        Some("fresh-one"),
        "postgres",
    ))
    .await
    .expect("a role created a moment ago logs in");
    assert_eq!(current_user(&client).await, "fresh_user");

    for role in [roles::SCRAM, "fresh_user"] {
        su.batch_execute(&format!("ALTER ROLE {role} PASSWORD 'changed-pw'"))
            .await
            .expect("alter role");
        let old = roles::password(role).unwrap_or("fresh-one");
        let (code, message) = login_error(
            &gateway_config(&gw, role, Some(old), "postgres"),
            "old password after ALTER ROLE",
        )
        .await;
        assert_eq!(code, "28P01", "{role}: {message}");
        let client = try_login(&gateway_config(&gw, role, Some("changed-pw"), "postgres"))
            .await
            .unwrap_or_else(|e| panic!("{role}: new password refused: {e:?}"));
        assert_eq!(current_user(&client).await, role);
    }
}

/// With auth_query in passthrough, PostgreSQL still decides, but the gateway learns each role's
/// secret at login, so every kind of session becomes movable: SCRAM (ClientKey recovered with the
/// verifier), md5 (stored hash), cleartext, trust; also for a role created and re-passworded a
/// moment ago, and wrong passwords still get the server's 28P01.
#[tokio::test]
async fn passthrough_with_auth_query_makes_sessions_movable() {
    let cluster = Cluster::primary_only().await;
    let gw = cluster
        .gateway_with(|c| c.auth.auth_query = Some(DEFAULT_AUTH_QUERY.into()))
        .await;
    let mut sessions = Vec::new();
    for role in ALL_ROLES {
        let client = gw.connect(role).await;
        assert_eq!(current_user(&client).await, role);
        assert_movable(&gw, &client, role, true).await;
        sessions.push(client);
    }

    fresh_role_follows_password_changes(&cluster, &gw).await;

    for role in [roles::SCRAM, roles::MD5] {
        let (code, _) = login_error(
            &gateway_config(&gw, role, Some("wrong"), "postgres"),
            "wrong password",
        )
        .await;
        assert_eq!(code, "28P01", "{role}");
    }
}

/// A `pg_hba.conf` change takes effect for logins through the gateway as soon as the role
/// probe sees the server reload it: the spare connections, whose server processes were forked
/// with the old rules, are replaced. (They let logins the new rules refuse in for up to
/// `spare_max_age_ms`.)
#[tokio::test]
async fn a_pg_hba_reload_reaches_logins_through_spares() {
    let cluster = Cluster::primary_only().await;
    let gw = cluster
        .gateway_with(|c| {
            c.spare_backends = 2;
            c.spare_max_age_ms = 600_000;
        })
        .await;
    gw.connect(roles::TRUST).await;
    let hba = cluster.pg.primary.data_dir().join("pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("host all {} 127.0.0.1/32 reject\n{rules}", roles::TRUST),
    )
    .unwrap();
    cluster
        .superuser()
        .await
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let Err(direct) = direct_config(&cluster, roles::TRUST, None, "postgres")
        .connect(NoTls)
        .await
    else {
        panic!("PostgreSQL itself refuses the role now");
    };
    assert_eq!(sqlstate(&direct), Some("28000"), "{direct}");
    // A few probe intervals (200 ms in tests).
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    for attempt in 0..3 {
        let e = gw
            .try_connect(gw.pg_config(roles::TRUST))
            .await
            .err()
            .unwrap_or_else(|| panic!("login {attempt} got in past the new pg_hba.conf"));
        assert_eq!(sqlstate(&e), Some("28000"), "{e}");
    }
}

/// client_auth = scram-sha-256 with an auth_file holding the verifier copied from pg_authid: the
/// gateway checks the client (its server signature is verified by tokio-postgres), logs in to
/// PostgreSQL with the recovered ClientKey, and the session is movable; a wrong password and an
/// unknown user both get 28P01, as PostgreSQL would say.
#[tokio::test]
async fn gateway_scram_with_auth_file() {
    let cluster = Cluster::primary_only().await;
    let verifier = stored_secret(&cluster, roles::SCRAM).await;
    assert!(verifier.starts_with("SCRAM-SHA-256$"), "{verifier}");
    let userlist = write_userlist(&cluster, &[(roles::SCRAM, &verifier)]);
    let gw = cluster
        .gateway_with(|c| {
            c.auth.client_auth = ClientAuth::ScramSha256;
            c.auth.auth_file = Some(userlist);
        })
        .await;

    let client = gw.connect(roles::SCRAM).await;
    assert_eq!(current_user(&client).await, roles::SCRAM);
    assert_movable(&gw, &client, roles::SCRAM, true).await;

    assert_bad_logins_refused(&gw, roles::SCRAM).await;

    // The first session is untouched by the failures.
    assert_eq!(current_user(&client).await, roles::SCRAM);
}

/// client_auth = scram-sha-256 with an auth_file holding plain passwords: the gateway checks
/// the client against a verifier of its own and logs in to PostgreSQL with the password, so
/// every role gets in whatever the server asks of it (SCRAM, md5, cleartext), and is movable.
/// (The ClientKey recovered from the client is salted with the gateway's verifier, not the
/// server's: logging in with it was refused.)
#[tokio::test]
async fn gateway_scram_with_plain_passwords_in_the_auth_file() {
    let cluster = Cluster::primary_only().await;
    let logins = [
        (roles::SCRAM, roles::SCRAM_PASSWORD),
        (roles::MD5, roles::MD5_PASSWORD),
        (roles::CLEARTEXT, roles::CLEARTEXT_PASSWORD),
    ];
    let userlist = write_userlist(&cluster, &logins);
    let gw = cluster
        .gateway_with(|c| {
            c.auth.client_auth = ClientAuth::ScramSha256;
            c.auth.auth_file = Some(userlist);
        })
        .await;
    for (role, _) in logins {
        let client = gw.connect(role).await;
        assert_eq!(current_user(&client).await, role);
        assert_movable(&gw, &client, role, true).await;
    }
    assert_bad_logins_refused(&gw, roles::MD5).await;
}

/// client_auth = md5 with an auth_file holding md5_user's stored md5 hash: the right password
/// logs in (the gateway answers the server's md5 challenge with the hash) and is movable; a
/// wrong password and an unknown user get 28P01.
#[tokio::test]
async fn gateway_md5_with_auth_file() {
    let cluster = Cluster::primary_only().await;
    let hash = stored_secret(&cluster, roles::MD5).await;
    assert!(hash.starts_with("md5") && hash.len() == 35, "{hash}");
    let userlist = write_userlist(&cluster, &[(roles::MD5, &hash)]);
    let gw = cluster
        .gateway_with(|c| {
            c.auth.client_auth = ClientAuth::Md5;
            c.auth.auth_file = Some(userlist);
        })
        .await;

    let client = gw.connect(roles::MD5).await;
    assert_eq!(current_user(&client).await, roles::MD5);
    assert_movable(&gw, &client, roles::MD5, true).await;

    assert_bad_logins_refused(&gw, roles::MD5).await;
}

/// client_auth = scram-sha-256 with auth_query: secrets are looked up at each login, so a role
/// created a moment ago logs in and a changed password takes effect at once; wrong password and
/// unknown role are 28P01, an unknown database is the server's 3D000.
#[tokio::test]
async fn gateway_scram_with_auth_query() {
    let cluster = Cluster::primary_only().await;
    let gw = cluster
        .gateway_with(|c| {
            c.auth.client_auth = ClientAuth::ScramSha256;
            c.auth.auth_query = Some(DEFAULT_AUTH_QUERY.into());
        })
        .await;

    let client = gw.connect(roles::SCRAM).await;
    assert_eq!(current_user(&client).await, roles::SCRAM);
    assert_movable(&gw, &client, roles::SCRAM, true).await;

    assert_bad_logins_refused(&gw, roles::SCRAM).await;
    let (code, message) = login_error(
        &gateway_config(
            &gw,
            roles::SCRAM,
            roles::password(roles::SCRAM),
            "no_such_db",
        ),
        "unknown database",
    )
    .await;
    assert_eq!(code, "3D000", "{message}");

    fresh_role_follows_password_changes(&cluster, &gw).await;
}

/// Real libpq (psql) logs in through the gateway as the SCRAM and the md5 role and runs a query;
/// with a wrong password it exits non-zero with PostgreSQL's message.
#[tokio::test]
async fn psql_logs_in_through_the_gateway() {
    let cluster = Cluster::primary_only().await;
    let gw = cluster.gateway().await;
    for role in [roles::SCRAM, roles::MD5] {
        let conninfo = gw.conn_str(role, "postgres");
        let out = run_program(
            cluster.program("psql"),
            &[
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &conninfo,
                "-c",
                "SELECT current_user || '/' || 6 * 7",
            ],
            None,
        )
        .await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{role}: psql failed: {stderr}");
        assert_eq!(stdout.trim(), format!("{role}/42"), "{role}: {stderr}");

        let wrong = format!(
            "host=127.0.0.1 port={} user={role} dbname=postgres password=wrong",
            gw.addr().port()
        );
        let out = run_program(
            cluster.program("psql"),
            &["-X", "-A", "-t", "-d", &wrong, "-c", "SELECT 1"],
            None,
        )
        .await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{role}: wrong password accepted");
        assert!(
            stderr.contains(&format!(
                "password authentication failed for user \"{role}\""
            )),
            "{role}: {stderr}"
        );
    }
}
