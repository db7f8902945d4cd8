//! Relaying the login exchange between client and server, so PostgreSQL decides who gets in,
//! while keeping what is needed to log in again without the client.

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use understudy_protocol::encode;
use understudy_protocol::inspect::ErrorView;
use understudy_protocol::scram::{
    recover_client_key, ScramServer, ScramVerifier, SCRAM_SHA_256_PLUS,
};
use understudy_protocol::tags::{backend, frontend};
use zeroize::Zeroizing;

use super::login::{login_from, LoginError};
use super::verify::{auth_failed, final_refusal};
use super::{Credential, Secret};
use crate::error::SessionError;
use crate::stream::Stream;
use crate::wire::{cstr, read_message, send, Frame, ReadError, MAX_LOGIN_MESSAGE};

const SCRAM: &str = "SCRAM-SHA-256";

/// The client side of a login in progress.
pub struct ClientEnd<'a> {
    /// Client connection.
    pub stream: &'a mut Stream,
    /// Bytes read from the client and not yet used.
    pub buf: &'a mut BytesMut,
}

impl ClientEnd<'_> {
    /// Next message from the client, which must be a password-family message: any other
    /// type is refused as soon as its type byte arrives, as PostgreSQL refuses it, rather than
    /// after the body its length word promises (or the login timeout).
    pub async fn recv_password(&mut self) -> Result<Frame, SessionError> {
        if self.buf.is_empty() {
            let n = self
                .stream
                .read_buf(self.buf)
                .await
                .map_err(SessionError::ClientGone)?;
            if n == 0 {
                return Err(SessionError::ClientGone(
                    std::io::ErrorKind::UnexpectedEof.into(),
                ));
            }
        }
        if self.buf[0] != frontend::PASSWORD {
            return Err(wrong_type(self.buf[0]));
        }
        let frame = read_message(self.stream, self.buf, MAX_LOGIN_MESSAGE)
            .await
            .map_err(|e| match e {
                ReadError::Io(e) => SessionError::ClientGone(e),
                ReadError::Frame(e) => {
                    SessionError::refused("08P01", "protocol_violation", e.to_string())
                }
            })?;
        Ok(frame)
    }

    /// Sends bytes to the client.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        send(self.stream, bytes)
            .await
            .map_err(SessionError::ClientGone)
    }
}

/// PostgreSQL's refusal of a message of type `tag` where a password response belongs.
fn wrong_type(tag: u8) -> SessionError {
    SessionError::refused(
        "08P01",
        "protocol_violation",
        format!("expected password response, got message type {tag}"),
    )
}

/// Next message from a backend during login.
pub async fn recv_backend(stream: &mut Stream, buf: &mut BytesMut) -> Result<Frame, SessionError> {
    read_message(stream, buf, MAX_LOGIN_MESSAGE)
        .await
        .map_err(|e| match e {
            ReadError::Io(e) => SessionError::BackendLost(e),
            ReadError::Frame(e) => SessionError::BackendLost(std::io::Error::other(e)),
        })
}

/// Both connections of a relayed login.
pub struct Ends<'a, 'c> {
    /// The client.
    pub client: &'a mut ClientEnd<'c>,
    /// Backend connection.
    pub backend: &'a mut Stream,
    /// Bytes read from the backend and not yet used.
    pub backend_buf: &'a mut BytesMut,
}

impl Ends<'_, '_> {
    async fn recv_backend(&mut self) -> Result<Frame, SessionError> {
        recv_backend(self.backend, self.backend_buf).await
    }

    async fn recv_client(&mut self) -> Result<Frame, SessionError> {
        self.client.recv_password().await
    }

    async fn send_client(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        self.client.send(bytes).await
    }

    async fn send_backend(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        send(self.backend, bytes)
            .await
            .map_err(SessionError::BackendLost)
    }
}

/// Relays authentication until the server's AuthenticationOk, which is forwarded too.
///
/// `secret` is the role's secret from the auth file or auth_query, if known: with it a relayed
/// SCRAM exchange yields the ClientKey. `end_point`: the channel-binding data of the client's
/// TLS connection, given where the gateway can check this client itself; a server's SCRAM
/// offer then reaches the client with SCRAM-SHA-256-PLUS, bound to the gateway's certificate.
pub async fn relay(
    ends: &mut Ends<'_, '_>,
    user: &str,
    secret: Option<&Secret>,
    sources: bool,
    end_point: Option<&[u8]>,
) -> Result<Credential, SessionError> {
    let mut credential = Credential::NotNeeded;
    let mut scram = ScramTranscript::default();
    loop {
        let frame = ends.recv_backend().await?;
        match frame.tag {
            backend::AUTHENTICATION => {}
            backend::ERROR_RESPONSE => {
                ends.send_client(&frame.raw).await?;
                let err = ErrorView::parse(frame.body());
                return Err(SessionError::ServerFatal {
                    code: err.code.to_owned(),
                    message: err.message.to_owned(),
                });
            }
            backend::NOTICE_RESPONSE => {
                ends.send_client(&frame.raw).await?;
                continue;
            }
            other => return Err(unexpected(other)),
        }
        let body = frame.body();
        let code = body
            .first_chunk::<4>()
            .map(|c| i32::from_be_bytes(*c))
            .unwrap_or(-1);
        match code {
            0 => {
                ends.send_client(&frame.raw).await?;
                return Ok(match (credential, secret, scram.complete()) {
                    (Credential::NotNeeded, Some(Secret::Scram(v)), Some((cf, sf, cl))) => {
                        match recover_client_key(v, cf, sf, cl) {
                            Ok(client_key) => Credential::Scram {
                                client_key,
                                server_key: Some(*v.server_key()),
                            },
                            Err(_) => Credential::Missing(
                                "the SCRAM verifier known for this role does not match the server's",
                            ),
                        }
                    }
                    (Credential::NotNeeded, Some(s), Some(_)) => match s {
                        Secret::Plain(p) => Credential::Password(p.clone()),
                        _ => Credential::Missing("SCRAM login relayed; no verifier for this role"),
                    },
                    (Credential::NotNeeded, None, Some(_)) => Credential::Missing(
                        "SCRAM login relayed without auth_query or auth_file to recover the key",
                    ),
                    (c, _, _) => c,
                });
            }
            // AuthenticationCleartextPassword: the password itself passes by.
            3 => {
                ends.send_client(&frame.raw).await?;
                let reply = ends.recv_client().await?;
                let mut body = reply.body();
                if let Some(p) = cstr(&mut body) {
                    credential = Credential::Password(Zeroizing::new(p.to_owned()));
                }
                ends.send_backend(&reply.raw).await?;
            }
            // AuthenticationMD5Password: the salted answer is useless elsewhere; a stored hash is not.
            5 => {
                ends.send_client(&frame.raw).await?;
                let reply = ends.recv_client().await?;
                credential = match secret {
                    Some(Secret::Md5(h)) => Credential::Md5(h.clone()),
                    Some(Secret::Plain(p)) => Credential::Password(p.clone()),
                    _ => Credential::Missing("md5 login relayed without the role's md5 hash"),
                };
                ends.send_backend(&reply.raw).await?;
            }
            // AuthenticationSASL: channel binding ties the exchange to one TLS connection, and a
            // gateway holds two, so the server's -PLUS variants are not offered to the client.
            // The gateway's own is, where it can check the client itself: bound to its own
            // certificate, the client's exchange ends at the gateway, which then logs in to the
            // server with the ClientKey it yields.
            10 => {
                let mut rest = &body[4..];
                let mut mechanisms = Vec::new();
                while let Some(m) = cstr(&mut rest).filter(|m| !m.is_empty()) {
                    if !m.ends_with("-PLUS") {
                        mechanisms.push(m);
                    }
                }
                if mechanisms.is_empty() {
                    return Err(SessionError::refused(
                        "28000",
                        "auth_unsupported",
                        "the server offers only channel-bound SASL, which cannot pass through a gateway",
                    ));
                }
                let end_point = end_point.filter(|_| mechanisms.contains(&SCRAM));
                if end_point.is_some() {
                    mechanisms.insert(0, SCRAM_SHA_256_PLUS);
                }
                let mut out = BytesMut::new();
                encode::auth_sasl(&mut out, &mechanisms);
                ends.send_client(&out).await?;
                let reply = ends.recv_client().await?;
                let mut rest = reply.body();
                let mechanism = cstr(&mut rest);
                let data = rest.get(4..).unwrap_or_default();
                let selected = mechanism == Some(SCRAM_SHA_256_PLUS);
                // Offered the bound mechanism, a client that does not bind says `n`, and is
                // relayed; any other answer is the gateway's to judge, as the server would on
                // one TLS connection (a `y` is an offer removed on the way).
                let judged = selected || mechanism == Some(SCRAM) && data.first() != Some(&b'n');
                if let Some(end_point) = end_point.filter(|_| judged) {
                    let binding = Some((end_point, selected));
                    return terminate_scram(ends, user, secret, sources, data, frame, binding).await;
                }
                if mechanism == Some(SCRAM) {
                    // "y": the client could bind but was not offered -PLUS. A server on TLS
                    // that does offer it rejects that as a downgrade, so the gateway must
                    // check the client itself and log in with what it learns.
                    if data.first() == Some(&b'y') && ends.backend.is_tls() {
                        return terminate_scram(ends, user, secret, sources, data, frame, None)
                            .await;
                    }
                    scram.client_first = Some(data.to_vec());
                }
                ends.send_backend(&reply.raw).await?;
            }
            // AuthenticationSASLContinue carries server-first-message.
            11 => {
                scram.server_first = Some(body[4..].to_vec());
                ends.send_client(&frame.raw).await?;
                let reply = ends.recv_client().await?;
                scram.client_final = Some(reply.body().to_vec());
                ends.send_backend(&reply.raw).await?;
            }
            // AuthenticationSASLFinal: the server proved itself; AuthenticationOk follows.
            12 => ends.send_client(&frame.raw).await?,
            other => {
                return Err(SessionError::refused(
                    "28000",
                    "auth_unsupported",
                    format!("authentication method {other} requested by the server is not supported by the gateway"),
                ))
            }
        }
    }
}

/// Completes a SCRAM login with the client as the server would, then logs in to the backend
/// with the credential that yields, forwarding the backend's verdict. `sources`: whether an
/// auth file or auth_query could have known the role's secret; `binding`: the channel-binding
/// data offered to the client (SCRAM-SHA-256-PLUS), and whether it selected it.
async fn terminate_scram(
    ends: &mut Ends<'_, '_>,
    user: &str,
    secret: Option<&Secret>,
    sources: bool,
    client_first: &[u8],
    sasl_request: Frame,
    binding: Option<(&[u8], bool)>,
) -> Result<Credential, SessionError> {
    let made_up = |password: &[u8]| {
        ScramVerifier::from_password(password, &rand::random::<[u8; 16]>(), 4096)
            .map_err(|e| SessionError::refused("XX000", "internal", e.to_string()))
    };
    let (verifier, credential_of, known) =
        match secret {
            Some(Secret::Scram(v)) => (v.clone(), None, true),
            Some(Secret::Plain(p)) => (
                made_up(p.as_bytes())?,
                Some(Credential::Password(p.clone())),
                true,
            ),
            None | Some(Secret::Md5(_)) if !sources => return Err(SessionError::refused(
                "28000",
                "auth_unsupported",
                "SCRAM channel binding cannot pass through the gateway, and it has no verifier \
                 for this role to check the password itself: configure auth.auth_query or \
                 auth.auth_file, or connect with channel_binding=disable",
            )),
            // An unknown role, one without a password, or one with an md5 hash only: as
            // PostgreSQL does, the exchange runs against a made-up verifier and fails at its end,
            // so a client learns nothing of which roles exist.
            None | Some(Secret::Md5(_)) => {
                let noise = Zeroizing::new(rand::random::<[u8; 32]>());
                (made_up(&noise[..])?, None, false)
            }
        };
    let server_key = *verifier.server_key();
    let mut server = ScramServer::with_random_nonce(verifier);
    if let Some((end_point, selected)) = binding {
        server = server.offer_channel_binding(end_point.to_vec(), selected);
    }
    let server_first = server
        .handle_client_first(client_first)
        .map_err(|e| SessionError::refused("08P01", "protocol_violation", e.to_string()))?;
    let mut out = BytesMut::new();
    encode::auth_sasl_continue(&mut out, &server_first);
    ends.send_client(&out).await?;
    let reply = ends.recv_client().await?;
    let (server_final, client_key) = match server.handle_client_final(reply.body()) {
        Ok(done) if known => done,
        Ok(_) => return Err(auth_failed(user)),
        Err(e) => return Err(final_refusal(&e, user)),
    };
    let credential = credential_of.unwrap_or(Credential::Scram {
        client_key,
        server_key: Some(server_key),
    });
    match login_from(
        ends.backend,
        ends.backend_buf,
        user,
        &credential,
        Some(sasl_request),
    )
    .await
    {
        Ok(()) => {}
        Err(LoginError::Server(frame)) => {
            ends.send_client(&frame.raw).await?;
            return Err(LoginError::Server(frame).into_session_error());
        }
        Err(LoginError::Failed(e)) => return Err(e),
    }
    out.clear();
    encode::auth_sasl_final(&mut out, &server_final);
    encode::auth_ok(&mut out);
    ends.send_client(&out).await?;
    Ok(credential)
}

/// The three SCRAM messages seen in a relayed exchange.
#[derive(Default)]
struct ScramTranscript {
    client_first: Option<Vec<u8>>,
    server_first: Option<Vec<u8>>,
    client_final: Option<Vec<u8>>,
}

impl ScramTranscript {
    fn complete(&self) -> Option<(&[u8], &[u8], &[u8])> {
        Some((
            self.client_first.as_deref()?,
            self.server_first.as_deref()?,
            self.client_final.as_deref()?,
        ))
    }
}

/// A message from the server that has no place in the login exchange.
pub fn unexpected(tag: u8) -> SessionError {
    SessionError::BackendLost(std::io::Error::other(format!(
        "unexpected message type {:?} from the server during login",
        char::from(tag)
    )))
}
