//! One client connection from accept to close: startup, login, then the data path.

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use understudy_protocol::encode::{self, Severity};
use understudy_protocol::startup::{CancelKey, StartupMessage};

use crate::auth::ident::IdentMap;
use crate::auth::login::{login, LoginError};
use crate::auth::relay::{relay, ClientEnd, Ends};
use crate::auth::verify::verify;
use crate::auth::{Credential, Secret};
use crate::config::{ClientAuth, ClientCert};
use crate::error::SessionError;
use crate::failover::FailoverError;
use crate::gateway::Shared;
use crate::handshake::{self, Opening};
use crate::pump::{Pipe, Pump};
use crate::session::{Relogin, Session};
use crate::sessions::{CancelTarget, SessionGuard};
use crate::shutdown::{Phase, Shutdown};
use crate::stream::{PeerAddr, Stream};
use crate::telemetry::count_error;
use crate::topology::Backend;
use crate::wire::send;

/// How long the gateway tries to hand its last words to a client it closes before a session.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves one accepted client connection (plain TCP or a Unix-domain socket) to its end.
pub async fn serve(shared: Arc<Shared>, socket: Stream, peer: PeerAddr) {
    let permit = shared.limit.clone().try_acquire_owned().ok();
    let shutdown = shared.shutdown.subscribe();
    let mut forced = shared.shutdown.subscribe();
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + shared.config.login_timeout();
    let tls = shared.client_tls.get();
    let handshake = crate::clock::timeout_at(deadline, handshake::accept(socket, tls.as_ref()));
    let opening = tokio::select! {
        r = handshake => r,
        // A client still negotiating does not hold up a forced shutdown.
        _ = forced.reached(Phase::Force) => return,
    };
    let opening = match opening {
        Err(_) => {
            tracing::debug!(%peer, "startup timed out");
            return;
        }
        Ok(Err((stream, e))) => {
            tracing::debug!(%peer, error = %e, "startup refused");
            if let Some(stream) = stream {
                report(stream, &e).await;
            }
            return;
        }
        Ok(Ok(opening)) => opening,
    };
    let (stream, startup) = match opening {
        Opening::Cancel { mut stream, key } => {
            crate::cancel::forward(&shared.registry, key, shared.config.connect_timeout()).await;
            // Closed as PostgreSQL closes it: inside TLS with close_notify, which libpq 17+
            // waits for (a bare close fails its cancel call, though the query was cancelled).
            let _ = crate::clock::timeout(CLOSE_TIMEOUT, stream.shutdown()).await;
            return;
        }
        Opening::Session { stream, startup } => (stream, startup),
    };
    // What a SCRAM-SHA-256-PLUS login binds to: the certificate this client's TLS was served.
    let end_point = match &stream {
        Stream::ServerTls(_) => tls.as_ref().and_then(|t| t.end_point.clone()),
        _ => None,
    };
    // Taken before the phase is read, so a drain that begins in between waits for this session.
    let in_session = shared.sessions.token();
    // A Unix-domain socket is not the network TLS guards against, and carries no TLS (as a
    // `local` line of pg_hba.conf).
    let unencrypted = !stream.is_tls() && !matches!(stream, Stream::Unix(_));
    let refusal = if shared.config.tls.required && unencrypted {
        // What PostgreSQL says when only hostssl lines would let the client in.
        Some(SessionError::refused(
            "28000",
            "tls_required",
            format!(
                "connection without encryption refused for user \"{}\": the gateway requires TLS (tls.required); connect with sslmode=require",
                startup.user().unwrap_or_default()
            ),
        ))
    } else if permit.is_none() {
        Some(SessionError::refused(
            "53300",
            "too_many_connections",
            format!(
                "sorry, too many clients already (max_client_connections is {})",
                shared.config.max_client_connections
            ),
        ))
    } else if shutdown.phase() != Phase::Running {
        Some(SessionError::refused(
            crate::error::CANNOT_CONNECT_NOW,
            "shutting_down",
            "the database system is shutting down",
        ))
    } else {
        None
    };
    if let Some(e) = refusal {
        drop(in_session);
        tracing::info!(%peer, error = %e, "connection refused");
        report(stream, &e).await;
        return;
    }
    shared.metrics.sessions_total.increment(1);
    shared.metrics.sessions_open.increment(1.0);
    let user = startup.user().unwrap_or_default().to_owned();
    let clock = LoginClock { started, deadline };
    let result = session(
        &shared,
        stream,
        end_point,
        startup,
        peer.clone(),
        shutdown,
        clock,
    )
    .await;
    shared.metrics.sessions_open.decrement(1.0);
    let reason = match &result {
        Ok(()) => "client_closed",
        Err(e) => e.label(),
    };
    metrics::counter!("understudy_sessions_ended_total", "reason" => reason).increment(1);
    match result {
        Ok(()) | Err(SessionError::ClientGone(_)) => {
            tracing::debug!(%peer, %user, reason, "session ended")
        }
        Err(e) => tracing::info!(%peer, %user, reason, error = %e, "session ended"),
    }
    drop(permit);
    drop(in_session);
}

/// Tells the client why it is being turned away, if it can still hear it.
async fn report(mut stream: Stream, e: &SessionError) {
    if let Some((code, message)) = e.client_report() {
        count_error(code, "gateway");
        let mut buf = BytesMut::new();
        encode::error_response(&mut buf, Severity::Fatal, code, &message);
        let _ = crate::clock::timeout(CLOSE_TIMEOUT, async {
            send(&mut stream, &buf).await?;
            stream.shutdown().await
        })
        .await;
    }
}

/// A logged-in backend and what each side sent past the login.
struct Established {
    backend: Stream,
    backend_buf: BytesMut,
    client_buf: BytesMut,
    server_params: Vec<(String, String)>,
    backend_pid: i32,
    relogin: Relogin,
    /// What the login learned of the session's role and database.
    learned: crate::session::Learned,
}

/// When a login began, and when it must be done by (`login_timeout_ms`).
#[derive(Debug, Clone, Copy)]
struct LoginClock {
    started: Instant,
    deadline: tokio::time::Instant,
}

/// Logs the client in (`end_point`: its TLS certificate's channel-binding data, if on TLS)
/// and runs its session.
async fn session(
    shared: &Arc<Shared>,
    mut stream: Stream,
    end_point: Option<Vec<u8>>,
    startup: StartupMessage,
    peer: PeerAddr,
    shutdown: Shutdown,
    clock: LoginClock,
) -> Result<(), SessionError> {
    let user = startup.user().unwrap_or_default().to_owned();
    let database = startup.database().unwrap_or_default().to_owned();
    let mut guard = shared
        .registry
        .open(peer, stream.is_tls(), &user, &database);
    let mut client_buf = BytesMut::new();
    let mut forced = shutdown.clone();
    let login = crate::clock::timeout_at(
        clock.deadline,
        // Boxed: the session's data path should not carry the login's state in its stack frame.
        Box::pin(establish(
            shared,
            &mut stream,
            end_point.as_deref(),
            &mut client_buf,
            &startup,
            &mut guard,
        )),
    );
    // A login has no transaction to finish: a drain ends it at once.
    let login_result = tokio::select! {
        r = login => r,
        _ = forced.reached(Phase::Draining) => Ok(Err(SessionError::Shutdown)),
    };
    let established = match login_result {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => {
            report(stream, &e).await;
            return Err(e);
        }
        Err(_) => {
            let e = SessionError::refused(
                "57014",
                "login_timeout",
                "canceling authentication due to timeout",
            );
            report(stream, &e).await;
            return Err(e);
        }
    };
    metrics::histogram!("understudy_login_seconds").record(clock.started.elapsed().as_secs_f64());
    let max = shared.config.max_message_size;
    let pump = Pump::new(
        stream,
        established.backend,
        Pipe::new(established.client_buf, max),
        Pipe::from_server(established.backend_buf),
    );
    let session = Session::new(
        pump,
        guard,
        shared.clone(),
        established.relogin,
        established.backend_pid,
        established.server_params,
        established.learned,
    );
    // Boxed: the data path's poll should not carry the construction's temporaries.
    Box::pin(session.run(shutdown)).await
}

/// Whether `system` (an operating-system user, a certificate's common name) may log in as role
/// `user`: as the user name map `ident` says, if one is set, else by being the role's name.
fn name_allows(ident: Option<&IdentMap>, system: &str, user: &str) -> bool {
    match ident {
        Some(map) => map.allows(system, user),
        None => system == user,
    }
}

/// PostgreSQL's `peer` check: the operating-system user of the process at the other end of
/// the Unix-domain socket, as the kernel reports it, must have the role's name, or be mapped
/// to it by `ident` (looked up by the system's name service, on a blocking thread: a
/// directory service may be slow). A refusal tells the client what PostgreSQL tells it; the
/// log says why.
async fn check_peer(
    stream: &Stream,
    user: &str,
    ident: Option<&IdentMap>,
) -> Result<(), SessionError> {
    let uid = match stream {
        Stream::Unix(unix) => unix.peer_cred().map(|cred| cred.uid()),
        _ => Err(std::io::Error::other("not a Unix-domain socket")),
    };
    let named = match uid {
        Ok(uid) => tokio::task::spawn_blocking(move || crate::accounts::user_name(uid))
            .await
            .map_err(std::io::Error::other)
            .and_then(|name| Ok((uid, name?))),
        Err(e) => Err(e),
    };
    let why = match named {
        Ok((_, Some(name))) if name_allows(ident, &name, user) => return Ok(()),
        Ok((_, Some(name))) if ident.is_some() => {
            format!("the user name map has no line for operating-system user {name:?} as this role")
        }
        Ok((_, Some(name))) => format!("the client runs as operating-system user {name:?}"),
        Ok((uid, None)) => format!("the system knows no user with id {uid}"),
        Err(e) => format!("who the client is could not be learned: {e}"),
    };
    tracing::info!(%user, why, "peer authentication failed");
    Err(SessionError::refused(
        "28000",
        "peer_auth_failed",
        format!("Peer authentication failed for user \"{user}\""),
    ))
}

/// PostgreSQL's `clientcert` check (and its `cert` method, `as_method`): a certificate the
/// handshake found valid is needed from `verify-ca` on, and from `verify-full` on its common
/// name must be the role's. Refusals say what PostgreSQL says.
fn check_client_cert(
    stream: &Stream,
    user: &str,
    needed: ClientCert,
    as_method: bool,
    ident: Option<&IdentMap>,
) -> Result<(), SessionError> {
    if needed == ClientCert::Optional {
        return Ok(());
    }
    let refused = |message: String| Err(SessionError::refused("28000", "client_cert", message));
    let name = match crate::tls::client_common_name(stream) {
        None => return refused("connection requires a valid client certificate".to_owned()),
        Some(name) => name,
    };
    if needed == ClientCert::VerifyCa {
        return Ok(());
    }
    match name {
        Ok(name) if name_allows(ident, &name, user) => Ok(()),
        other => {
            let why = match other {
                Ok(name) if ident.is_some() => {
                    format!("the user name map has no line for common name {name:?} as this role")
                }
                Ok(name) => format!("the certificate's common name is {name:?}"),
                Err(e) => e,
            };
            tracing::info!(%user, why, "client certificate does not name the role");
            refused(if as_method {
                format!("certificate authentication failed for user \"{user}\"")
            } else {
                format!(
                    "certificate validation (clientcert=verify-full) failed for user \"{user}\": CN mismatch"
                )
            })
        }
    }
}

/// Logs in to the primary for the client and relays the server's greeting.
async fn establish(
    shared: &Arc<Shared>,
    stream: &mut Stream,
    end_point: Option<&[u8]>,
    client_buf: &mut BytesMut,
    startup: &StartupMessage,
    guard: &mut SessionGuard,
) -> Result<Established, SessionError> {
    let user = startup.user().unwrap_or_default();
    let auth = &shared.config.auth;
    let mode = match stream {
        Stream::Unix(_) => auth.unix_socket_auth.unwrap_or(auth.client_auth),
        _ => auth.client_auth,
    };
    let ident = shared.ident.get();
    if mode == ClientAuth::Peer {
        check_peer(stream, user, ident.as_deref()).await?;
    }
    let certificate = match (mode, &*stream) {
        (ClientAuth::Cert, _) => ClientCert::VerifyFull,
        // As `clientcert`, which only `hostssl` lines take.
        (_, Stream::Unix(_)) => ClientCert::Optional,
        _ => shared.config.tls.client_cert,
    };
    check_client_cert(
        stream,
        user,
        certificate,
        mode == ClientAuth::Cert,
        ident.as_deref(),
    )?;
    let mut greeting = BytesMut::new();
    // Newer minor versions and protocol options are answered here; the server gets plain 3.0.
    let options: Vec<String> = startup.protocol_options().map(str::to_owned).collect();
    if startup.minor > 0 || !options.is_empty() {
        encode::negotiate_protocol_version(&mut greeting, options);
    }
    if !greeting.is_empty() {
        send(stream, &greeting)
            .await
            .map_err(SessionError::ClientGone)?;
        greeting.clear();
    }
    // The gateway checks the client itself before it opens a backend for it; relaying, it
    // opens the backend first, so that a login that finds the primary dead waits for the
    // failover and looks the secret up on the new primary.
    let checked =
        if mode == ClientAuth::Passthrough {
            None
        } else {
            let secret = shared.secrets.lookup(user).await.map_err(|e| {
                SessionError::BackendUnavailable {
                    code: "08001",
                    message: format!("could not look up credentials: {e}"),
                }
            })?;
            let mut client = ClientEnd {
                stream: &mut *stream,
                buf: &mut *client_buf,
            };
            Some(verify(&mut client, mode, user, secret, end_point).await?)
        };
    let (primary, mut backend) = open_primary(shared, startup).await?;
    let mut client = ClientEnd {
        stream,
        buf: client_buf,
    };
    let mut backend_buf = BytesMut::new();
    let credential = if let Some(credential) = checked {
        match login(&mut backend, &mut backend_buf, user, &credential).await {
            Ok(()) => {}
            Err(LoginError::Server(frame)) => {
                client.send(&frame.raw).await?;
                return Err(LoginError::Server(frame).into_session_error());
            }
            Err(LoginError::Failed(e)) => return Err(e),
        }
        encode::auth_ok(&mut greeting);
        credential
    } else {
        let (secret, looked_up) = if shared.secrets.configured() {
            match shared.secrets.lookup(user).await {
                Ok(secret) => (secret, true),
                Err(e) => {
                    tracing::warn!(%user, error = %e, "secret lookup failed; session will not be movable");
                    (None, false)
                }
            }
        } else {
            (None, false)
        };
        let mut ends = Ends {
            client: &mut client,
            backend: &mut backend,
            backend_buf: &mut backend_buf,
        };
        // SCRAM-SHA-256-PLUS can be offered where the gateway can check the client itself: it
        // knows this role's secret, or has just asked for every role's (so the offer tells
        // nothing of which roles exist).
        let binds = matches!(secret, Some(Secret::Scram(_) | Secret::Plain(_)))
            || looked_up && shared.secrets.knows_every_role();
        relay(
            &mut ends,
            user,
            secret.as_ref(),
            shared.secrets.configured(),
            end_point.filter(|_| binds),
        )
        .await?
    };
    if let Credential::Missing(why) = &credential {
        tracing::debug!(%user, why, "session cannot be moved without its client");
    }
    guard.info().set_movable(credential.movability());

    // After AuthenticationOk: ParameterStatus…, BackendKeyData, ReadyForQuery (docs 55.2.1).
    let backend_addr = backend.peer_addr().map_err(SessionError::BackendLost)?;
    let greeting_result = crate::backend::read_greeting(&mut backend, &mut backend_buf).await;
    let (relayed, result) = match greeting_result {
        Ok(g) => (g, Ok(())),
        Err((g, e)) => (g, Err(e)),
    };
    // The client hears the server's greeting with the gateway's cancel key in place of the
    // server's, right before the final ReadyForQuery.
    let mut tail = relayed.relay;
    let mut backend_pid = 0;
    if let Some((pid, secret)) = relayed.key {
        let key = guard.issue_cancel_key(CancelTarget {
            backend: backend_addr.clone(),
            key: CancelKey { pid, secret },
        });
        guard.info().set_backend(backend_addr, pid);
        backend_pid = pid;
        let rfq_at = tail.len().saturating_sub(6);
        let rest = tail.split_off(rfq_at);
        encode::backend_key_data(&mut tail, key.pid, key.secret);
        tail.unsplit(rest);
    }
    greeting.unsplit(tail);
    // Asked before the client hears its ReadyForQuery, while the backend is idle; only by a
    // gateway that captures xids (one that can move sessions), and never of a walsender,
    // which takes no such query (and drops its temporary slots at the error).
    let replication = startup
        .server_params()
        .any(|(k, v)| k == "replication" && crate::session::asks_replication(v));
    if replication {
        guard.info().set_movable(crate::sessions::Movability::No(
            "a replication connection (walsender) cannot move".to_owned(),
        ));
    }
    let learned = if result.is_ok() && shared.failover.disabled().is_none() && !replication {
        // As the registry has it, which is what a failed capture forgets by.
        let database = startup.database().unwrap_or_default();
        let options = startup.server_params().find(|(k, _)| *k == "options");
        let login = crate::grants::login_key(user, options.map(|(_, v)| v));
        crate::session::Learned {
            may_capture: shared
                .capture_grants
                .may_capture(database, &login, &mut backend, &mut backend_buf)
                .await?,
            suspects: Some(
                shared
                    .catalog_suspects
                    .of(database, &mut backend, &mut backend_buf)
                    .await?,
            ),
        }
    } else {
        crate::session::Learned::default()
    };
    client.send(&greeting).await?;
    result?;
    let server_params = relayed.params;
    Ok(Established {
        backend,
        backend_buf,
        client_buf: std::mem::take(client.buf),
        server_params,
        backend_pid,
        learned,
        relogin: Relogin {
            backend: primary,
            params: startup
                .server_params()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            user: user.to_owned(),
            credential,
        },
    })
}

/// The primary and a connection to it with the StartupMessage sent. When the primary cannot
/// be reached and sessions can move, the login waits for the failover (which first makes
/// sure the primary is really gone) and connects to the new primary instead.
async fn open_primary(
    shared: &Arc<Shared>,
    startup: &StartupMessage,
) -> Result<(Backend, Stream), SessionError> {
    let primary = shared
        .topology
        .primary(shared.config.connect_timeout())
        .await
        .ok_or_else(|| {
            SessionError::no_server_now(format!(
                "no primary database server is available ({})",
                shared.topology.why_no_primary()
            ))
        })?;
    let unreachable = match shared
        .connector
        .open(&primary, startup.server_params())
        .await
    {
        Ok(backend) => return Ok((primary, backend)),
        Err(e @ SessionError::BackendUnavailable { .. })
            if shared.failover.disabled().is_none() =>
        {
            e
        }
        Err(e) => return Err(e),
    };
    match shared.failover.recover(&primary).await {
        Ok(promotion) => {
            tracing::info!(primary = %promotion.primary, "login waited for the failover");
            let backend = shared
                .connector
                .open(&promotion.primary, startup.server_params())
                .await?;
            Ok((promotion.primary, backend))
        }
        Err(FailoverError::PrimaryAlive) => Err(unreachable),
        Err(e) => Err(SessionError::no_server_now(format!("{unreachable}; {e}"))),
    }
}
