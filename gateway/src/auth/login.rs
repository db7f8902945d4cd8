//! Logging in to a backend with a stored credential, without the client.

use bytes::BytesMut;
use postgres_protocol::message::frontend as fe;
use understudy_protocol::inspect::ErrorView;
use understudy_protocol::md5::{md5_response_from_password, md5_response_from_verifier};
use understudy_protocol::scram::ScramClient;
use understudy_protocol::tags::backend;

use super::relay::{recv_backend, unexpected};
use super::Credential;
use crate::error::SessionError;
use crate::stream::Stream;
use crate::wire::{send, Frame};

/// A login that did not succeed.
#[derive(Debug)]
pub enum LoginError {
    /// The server refused with this ErrorResponse (forward it verbatim to a waiting client).
    Server(Frame),
    /// Anything else.
    Failed(SessionError),
}

impl From<SessionError> for LoginError {
    fn from(e: SessionError) -> Self {
        LoginError::Failed(e)
    }
}

impl LoginError {
    /// As a session error; a server refusal keeps its SQLSTATE.
    pub fn into_session_error(self) -> SessionError {
        match self {
            LoginError::Server(frame) => {
                let e = ErrorView::parse(frame.body());
                SessionError::ServerFatal {
                    code: e.code.to_owned(),
                    message: e.message.to_owned(),
                }
            }
            LoginError::Failed(e) => e,
        }
    }
}

fn no_credential(method: &str) -> LoginError {
    LoginError::Failed(SessionError::refused(
        "28000",
        "no_credential",
        format!("the gateway holds no credential to answer the server's {method} authentication"),
    ))
}

/// Answers the server's authentication requests until AuthenticationOk.
pub async fn login(
    stream: &mut Stream,
    buf: &mut BytesMut,
    user: &str,
    credential: &Credential,
) -> Result<(), LoginError> {
    login_from(stream, buf, user, credential, None).await
}

/// As [`login`], with the server's first request already read.
pub async fn login_from(
    stream: &mut Stream,
    buf: &mut BytesMut,
    user: &str,
    credential: &Credential,
    mut first: Option<Frame>,
) -> Result<(), LoginError> {
    let mut scram: Option<ScramClient> = None;
    let mut out = BytesMut::new();
    loop {
        let frame = match first.take() {
            Some(f) => f,
            None => recv_backend(stream, buf).await?,
        };
        match frame.tag {
            backend::AUTHENTICATION => {}
            backend::ERROR_RESPONSE => return Err(LoginError::Server(frame)),
            backend::NOTICE_RESPONSE => continue,
            other => return Err(unexpected(other).into()),
        }
        let body = frame.body();
        let code = body.first_chunk::<4>().map(|c| i32::from_be_bytes(*c));
        out.clear();
        match (code, credential) {
            (Some(0), _) => return Ok(()),
            (Some(3), Credential::Password(p)) => password(&mut out, p.as_bytes()),
            (Some(3), _) => return Err(no_credential("password")),
            (Some(5), c) => {
                let salt = body
                    .get(4..8)
                    .and_then(|s| <[u8; 4]>::try_from(s).ok())
                    .ok_or_else(|| unexpected(backend::AUTHENTICATION))?;
                let answer = match c {
                    Credential::Password(p) => {
                        md5_response_from_password(p.as_bytes(), user.as_bytes(), salt)
                    }
                    Credential::Md5(h) => {
                        md5_response_from_verifier(h, salt).map_err(|_| no_credential("md5"))?
                    }
                    _ => return Err(no_credential("md5")),
                };
                password(&mut out, answer.as_bytes());
            }
            (Some(10), c) => {
                let mut client = match c {
                    Credential::Password(p) => ScramClient::with_password(p.as_bytes()),
                    Credential::Scram {
                        client_key,
                        server_key,
                    } => ScramClient::with_client_key(client_key.clone(), *server_key),
                    _ => return Err(no_credential("SCRAM")),
                };
                let first = client.client_first();
                scram = Some(client);
                fe::sasl_initial_response("SCRAM-SHA-256", &first, &mut out)
                    .map_err(SessionError::BackendLost)?;
            }
            (Some(11), _) => {
                let client = scram.as_mut().ok_or_else(|| unexpected(backend::AUTHENTICATION))?;
                let last = client
                    .handle_server_first(&body[4..])
                    .map_err(|e| scram_failed(e.to_string()))?;
                fe::sasl_response(&last, &mut out).map_err(SessionError::BackendLost)?;
            }
            (Some(12), _) => {
                let client = scram.as_mut().ok_or_else(|| unexpected(backend::AUTHENTICATION))?;
                client
                    .handle_server_final(&body[4..])
                    .map_err(|e| scram_failed(e.to_string()))?;
                continue;
            }
            (other, _) => {
                return Err(LoginError::Failed(SessionError::refused(
                    "28000",
                    "auth_unsupported",
                    format!(
                        "authentication method {} requested by the server is not supported by the gateway",
                        other.unwrap_or(-1)
                    ),
                )))
            }
        }
        send(stream, &out)
            .await
            .map_err(SessionError::BackendLost)?;
    }
}

fn password(out: &mut BytesMut, secret: &[u8]) {
    // Only fails on an embedded NUL, which a PostgreSQL password cannot contain.
    if fe::password_message(secret, out).is_err() {
        out.clear();
    }
}

fn scram_failed(why: String) -> LoginError {
    LoginError::Failed(SessionError::BackendUnavailable {
        code: "28000",
        message: format!("SCRAM login to the server failed: {why}"),
    })
}
