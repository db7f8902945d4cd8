//! Admin HTTP listener: `/metrics` (Prometheus text) and `/status` (JSON).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;

use crate::config::Promote;
use crate::gateway::Shared;
use crate::sessions::{Movability, SessionStatus};
use crate::shutdown::{Phase, Shutdown};
use crate::topology::BackendStatus;

/// The `/status` document.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Gateway version.
    pub version: &'static str,
    /// Client listen address.
    pub listen: String,
    /// The Unix-domain socket clients may connect to, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unix_socket: Option<String>,
    /// `running`, `draining` or `stopping`.
    pub state: &'static str,
    /// Live sessions.
    pub session_count: usize,
    /// Whether the gateway is paused (`POST /pause`): sessions hold at transaction boundaries.
    pub paused: bool,
    /// Who promotes a new primary (`auto`, `external`), or `off` when no session can move.
    pub failover: Promote,
    /// Why failover is off, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failover_off: Option<&'static str>,
    /// Configured backends and their roles.
    pub backends: Vec<BackendStatus>,
    /// Spare connections open to the primary, ready for logins.
    pub spare_backends: usize,
    /// Live sessions.
    pub sessions: Vec<SessionStatus>,
    /// What each database a session logged in to has that makes a read write (a gateway
    /// that can move sessions).
    pub catalog: Vec<crate::suspects::CatalogStatus>,
}

/// Builds the status document.
pub fn status(shared: &Shared) -> Status {
    let mut sessions = shared.registry.statuses();
    // No session moves while failover is off, whatever it holds.
    if let Some(why) = shared.failover.disabled() {
        for s in &mut sessions {
            if s.movable.is_some() {
                s.movable = Some(Movability::No(format!("failover is off: {why}")));
            }
        }
    }
    Status {
        version: env!("CARGO_PKG_VERSION"),
        listen: shared.listen.to_string(),
        unix_socket: shared.unix_socket.as_ref().map(|p| p.display().to_string()),
        paused: *shared.hold.borrow(),
        state: match shared.shutdown.subscribe().phase() {
            Phase::Running => "running",
            Phase::Draining => "draining",
            Phase::Force => "stopping",
        },
        session_count: sessions.len(),
        failover: match shared.failover.disabled() {
            Some(_) => Promote::Off,
            None => shared.failover.config().promote,
        },
        failover_off: shared.failover.disabled(),
        backends: shared.topology.statuses(),
        spare_backends: shared
            .connector
            .spares
            .as_ref()
            .map_or(0, |s| s.ready_count()),
        sessions,
        catalog: shared.catalog_suspects.statuses(),
    }
}

/// An admin connection is closed after this long, whatever it is doing: a request takes
/// milliseconds, and one that never ends (a client that sends half a request and stops) must
/// not hold a descriptor the sessions need.
const CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(10);

/// Admin connections served at once; one more is closed at once.
const MAX_CONNECTIONS: usize = 64;

/// Serves admin requests until shutdown.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, mut shutdown: Shutdown) {
    if let Ok(addr) = listener.local_addr() {
        if shared.config.admin_token.is_none() && !addr.ip().is_loopback() {
            tracing::warn!(%addr, "the admin listener is reachable beyond this host and asks for no token: anyone who reaches it can pause sessions and read /status; set admin_token");
        }
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    crate::clock::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.reached(Phase::Force) => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("admin connection refused: {MAX_CONNECTIONS} already open");
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(&shared, req).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service);
            let _ = crate::clock::timeout(CONNECTION_LIFETIME, connection).await;
            drop(slot);
        });
    }
}

/// Whether `req` carries the admin token, when one is set (compared in constant time).
fn authorized(shared: &Shared, req: &Request<Incoming>) -> bool {
    let Some(token) = &shared.config.admin_token else {
        return true;
    };
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .unwrap_or_default();
    bool::from(subtle::ConstantTimeEq::ct_eq(given, token.as_bytes()))
}

/// Whether the gateway serves new sessions now (`GET /ready`): running, not draining, and
/// routing to a primary; else why not.
pub fn readiness(shared: &Shared) -> Result<String, String> {
    if shared.shutdown.subscribe().phase() != Phase::Running {
        return Err("shutting down".to_owned());
    }
    match shared.topology.current_primary() {
        Some(primary) => Ok(format!("ready: sessions go to {primary}")),
        None => Err("no primary known".to_owned()),
    }
}

async fn route(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    // Probes of load balancers and orchestrators, which often cannot send a token: they say
    // only whether the gateway lives and serves.
    let probe = req.method() == Method::GET || req.method() == Method::HEAD;
    match req.uri().path() {
        "/health" if probe => return reply(StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/ready" if probe => {
            return match readiness(shared) {
                Ok(why) => reply(StatusCode::OK, "text/plain", why + "\n"),
                Err(why) => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", why + "\n"),
            }
        }
        _ => {}
    }
    if !authorized(shared, &req) {
        let mut r = reply(
            StatusCode::UNAUTHORIZED,
            "text/plain",
            "the admin listener wants its token (admin_token): Authorization: Bearer TOKEN, or understudy ctl --admin-token\n".to_owned(),
        );
        r.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Bearer realm=\"understudy\""),
        );
        return r;
    }
    let path = req.uri().path();
    let allowed = match path {
        "/metrics" | "/status" | "/health" | "/ready" => "GET, HEAD",
        "/demo/crash-primary" | "/reload" | "/pause" | "/resume" => "POST",
        _ => "",
    };
    // HEAD is answered as GET (hyper sends the headers without the body).
    let method = match req.method() {
        &Method::HEAD => &Method::GET,
        m => m,
    };
    if !allowed.is_empty() && !allowed.split(", ").any(|m| m == method.as_str()) {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            format!("{path} takes {allowed}\n"),
        );
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static(allowed),
        );
        return r;
    }
    match (method, path) {
        (&Method::GET, "/metrics") => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            crate::telemetry::prometheus().render(),
        ),
        (&Method::GET, "/status") => json_reply(StatusCode::OK, &status(shared)),
        (&Method::POST, "/pause") => {
            let timeout = match pause_timeout(req.uri().query()) {
                Ok(t) => t,
                Err(e) => return reply(StatusCode::BAD_REQUEST, "text/plain", e),
            };
            let outcome = crate::pause::pause(shared, timeout).await;
            let status = if outcome.paused {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json_reply(status, &outcome)
        }
        (&Method::POST, "/resume") => json_reply(
            StatusCode::OK,
            &serde_json::json!({ "was_paused": crate::pause::resume(shared) }),
        ),
        (&Method::POST, "/reload") => {
            let outcome = crate::reload::reload(shared);
            let status = if outcome.applied {
                StatusCode::OK
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            json_reply(status, &outcome)
        }
        (&Method::POST, "/demo/crash-primary") => match &shared.demo_crash {
            Some(tx) => {
                // Answer once the primary is dead, so whatever the caller does next meets a
                // crashed primary.
                let (done, killed) = tokio::sync::oneshot::channel();
                if tx.try_send(done).is_err() {
                    return reply(
                        StatusCode::CONFLICT,
                        "text/plain",
                        "a crash is already under way\n".to_owned(),
                    );
                }
                match crate::clock::timeout(std::time::Duration::from_secs(10), killed).await {
                    Ok(Ok(())) => reply(
                        StatusCode::OK,
                        "text/plain",
                        "crashed the primary (SIGKILL of the postmaster and its children)\n"
                            .to_owned(),
                    ),
                    _ => reply(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        "the demo did not confirm the crash\n".to_owned(),
                    ),
                }
            }
            None => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "crash-primary exists only in `understudy demo`\n".to_owned(),
            ),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics or /status\n".to_owned(),
        ),
    }
}

/// Longest a pause may wait for the sessions' transactions to end.
const MAX_PAUSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// The pause's `timeout_ms` query parameter (10 s without one).
fn pause_timeout(query: Option<&str>) -> Result<std::time::Duration, String> {
    let mut timeout = std::time::Duration::from_secs(10);
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("timeout_ms", v)) => {
                let ms: u64 = v.parse().map_err(|_| {
                    format!("timeout_ms must be a number of milliseconds, not {v:?}\n")
                })?;
                timeout = std::time::Duration::from_millis(ms).min(MAX_PAUSE_TIMEOUT);
            }
            _ => {
                return Err(format!(
                    "unknown parameter {pair:?}; /pause takes timeout_ms\n"
                ))
            }
        }
    }
    Ok(timeout)
}

/// A response with `status`, `content_type` and `body`.
fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

/// `value` as pretty JSON with `status`.
fn json_reply(status: StatusCode, value: &impl Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_string_pretty(value) {
        Ok(json) => reply(status, "application/json", json),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            e.to_string(),
        ),
    }
}
