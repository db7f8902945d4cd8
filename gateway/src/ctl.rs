//! `understudy ctl`: talks to a running gateway's admin listener.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// The HTTP methods [`exchange`] takes.
pub use hyper::Method;

/// A gateway's admin listener, and the token it wants (`admin_token`), if any.
#[derive(Debug, Clone)]
pub struct Admin {
    /// Its address.
    pub addr: SocketAddr,
    /// Sent as `Authorization: Bearer …`.
    pub token: Option<String>,
}

impl From<SocketAddr> for Admin {
    fn from(addr: SocketAddr) -> Self {
        Self { addr, token: None }
    }
}

/// GETs `path` from the admin listener and returns the body.
pub async fn get(admin: impl Into<Admin>, path: &str) -> anyhow::Result<String> {
    request(admin, hyper::Method::GET, path).await
}

/// Sends a bodiless request to the admin listener and returns the response body.
pub async fn request(
    admin: impl Into<Admin>,
    method: hyper::Method,
    path: &str,
) -> anyhow::Result<String> {
    let (status, text) = exchange(admin, method, path).await?;
    if !status.is_success() {
        anyhow::bail!("{path}: HTTP {status}: {text}");
    }
    Ok(text)
}

/// POSTs to `path` on the admin listener and returns the HTTP status code and the body.
pub async fn post(admin: impl Into<Admin>, path: &str) -> anyhow::Result<(u16, String)> {
    let (status, body) = exchange(admin, hyper::Method::POST, path).await?;
    Ok((status.as_u16(), body))
}

/// Sends a bodiless request to the admin listener and returns the status and the body.
pub async fn exchange(
    admin: impl Into<Admin>,
    method: hyper::Method,
    path: &str,
) -> anyhow::Result<(hyper::StatusCode, String)> {
    let Admin { addr, token } = admin.into();
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the admin listener at {addr}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string());
    if let Some(token) = token {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let req = req.body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Renders a `POST /pause` answer for a person.
pub fn render_pause(json: &serde_json::Value) -> String {
    if json["paused"] == true {
        return format!(
            "paused: {} session(s) held at a transaction boundary; `understudy ctl resume` lets them go on\n",
            json["held"]
        );
    }
    let busy: Vec<String> = json["busy_sessions"]
        .as_array()
        .map(|a| a.iter().map(|v| v.to_string()).collect())
        .unwrap_or_default();
    format!(
        "not paused: {}; sessions still busy: {}\n",
        json["error"].as_str().unwrap_or("unknown error"),
        if busy.is_empty() {
            "-".to_owned()
        } else {
            busy.join(", ")
        }
    )
}

/// Renders a `POST /reload` answer for a person.
pub fn render_reload(json: &serde_json::Value) -> String {
    use std::fmt::Write;
    let list = |v: &serde_json::Value| {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    let mut out = String::new();
    if let Some(error) = json["error"].as_str() {
        let _ = writeln!(out, "reload failed, nothing changed: {error}");
        return out;
    }
    let reread = list(&json["reread"]);
    let _ = writeln!(
        out,
        "reloaded; read again: {}",
        if reread.is_empty() { "-" } else { &reread }
    );
    let restart = list(&json["needs_restart"]);
    if !restart.is_empty() {
        let _ = writeln!(out, "changed, but only a restart applies them: {restart}");
    }
    out
}

/// Renders `/status` JSON for a person.
pub fn render_status(json: &serde_json::Value) -> String {
    use std::fmt::Write;
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "understudy {} on {}{}: {}{}, {} session(s), failover {}",
        s(&json["version"]),
        s(&json["listen"]),
        match json["unix_socket"].as_str() {
            Some(socket) => format!(" and {socket}"),
            None => String::new(),
        },
        s(&json["state"]),
        if json["paused"] == true {
            " (paused)"
        } else {
            ""
        },
        s(&json["session_count"]),
        match json["failover_off"].as_str() {
            Some(why) => format!("off ({why})"),
            None => s(&json["failover"]),
        }
    );
    let _ = writeln!(out, "\nBACKEND                 ROLE         ROUTED  ERROR");
    for b in json["backends"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:<23} {:<12} {:<7} {}",
            s(&b["address"]),
            s(&b["role"]),
            if b["routed"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            },
            s(&b["error"])
        );
    }
    let sessions = json["sessions"].as_array().cloned().unwrap_or_default();
    if !sessions.is_empty() {
        let _ = writeln!(
            out,
            "\nID     CLIENT                 USER         DATABASE     BACKEND PID  STATE                          MOVABLE"
        );
        for x in sessions {
            let movable = match x["movable"].as_str() {
                Some("yes") => "yes".to_owned(),
                Some(_) => format!("no: {}", s(&x["reason"])),
                None => "-".to_owned(),
            };
            let _ = writeln!(
                out,
                "{:<6} {:<22} {:<12} {:<12} {:<12} {:<30} {}",
                s(&x["id"]),
                s(&x["client"]),
                s(&x["user"]),
                s(&x["database"]),
                s(&x["backend_pid"]),
                state(&x),
                movable
            );
        }
    }
    out
}

/// A session's state as `pg_stat_activity` words it: `active` while a request runs, else what
/// its transaction is.
fn state(session: &serde_json::Value) -> &'static str {
    let active = session["active"].as_bool() == Some(true);
    match (session["transaction"].as_str(), active) {
        (Some("in_transaction"), true) => "active (in transaction)",
        (Some("failed_transaction"), true) => "active (failed transaction)",
        (_, true) => "active",
        (Some("idle"), false) => "idle",
        (Some("in_transaction"), false) => "idle in transaction",
        (Some("failed_transaction"), false) => "idle in transaction (aborted)",
        _ => "starting",
    }
}
