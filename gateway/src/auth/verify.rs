//! The gateway authenticating a client itself (`client_auth` = trust, md5, scram-sha-256;
//! `peer` on the Unix-domain socket).

use bytes::BytesMut;
use subtle::ConstantTimeEq;
use understudy_protocol::encode;
use understudy_protocol::md5::{md5_response_from_password, md5_response_from_verifier};
use understudy_protocol::scram::{ScramError, ScramServer, ScramVerifier, SCRAM_SHA_256_PLUS};
use zeroize::Zeroizing;

use super::relay::ClientEnd;
use super::{Credential, Secret};
use crate::config::ClientAuth;
use crate::error::SessionError;
use crate::wire::cstr;

/// PostgreSQL's refusal of a wrong password.
pub(super) fn auth_failed(user: &str) -> SessionError {
    SessionError::refused(
        "28P01",
        "auth_failed",
        format!("password authentication failed for user \"{user}\""),
    )
}

/// The refusal of a client-final-message the exchange rejected: PostgreSQL's for a channel
/// binding that does not match (a TLS connection to someone in between, who passed the exchange
/// on), else a wrong password's.
pub(super) fn final_refusal(e: &ScramError, user: &str) -> SessionError {
    match e {
        ScramError::ChannelBindingMismatch => SessionError::refused(
            "08P01",
            "protocol_violation",
            "SCRAM channel binding check failed",
        ),
        _ => auth_failed(user),
    }
}

/// Checks the client's password; returns what the gateway can use to log in to the backend.
/// `end_point`: the channel-binding data of the client's TLS connection, if it is on TLS
/// (SCRAM-SHA-256-PLUS is offered then).
///
/// An unknown role goes through the same exchange as a known one and fails the same way, so
/// the answer does not tell which roles exist.
pub async fn verify(
    client: &mut ClientEnd<'_>,
    mode: ClientAuth,
    user: &str,
    secret: Option<Secret>,
    end_point: Option<&[u8]>,
) -> Result<Credential, SessionError> {
    match mode {
        // Peer, cert: the client's operating-system user or certificate was checked when it
        // connected.
        ClientAuth::Passthrough | ClientAuth::Trust | ClientAuth::Peer | ClientAuth::Cert => {
            Ok(secret
                .as_ref()
                .map(Credential::from_secret)
                .unwrap_or(Credential::NotNeeded))
        }
        ClientAuth::Md5 => verify_md5(client, user, secret).await,
        ClientAuth::ScramSha256 => verify_scram(client, user, secret, end_point).await,
    }
}

async fn verify_md5(
    client: &mut ClientEnd<'_>,
    user: &str,
    secret: Option<Secret>,
) -> Result<Credential, SessionError> {
    let salt: [u8; 4] = rand::random();
    let mut out = BytesMut::new();
    encode::auth_md5(&mut out, salt);
    client.send(&out).await?;
    let reply = client.recv_password().await?;
    let mut body = reply.body();
    let answer = cstr(&mut body).unwrap_or_default();
    let (expected, credential) = match &secret {
        Some(Secret::Md5(h)) => (
            md5_response_from_verifier(h, salt).ok(),
            Credential::Md5(h.clone()),
        ),
        Some(Secret::Plain(p)) => (
            Some(md5_response_from_password(
                p.as_bytes(),
                user.as_bytes(),
                salt,
            )),
            Credential::Password(p.clone()),
        ),
        // A SCRAM verifier cannot check an md5 answer, as in PostgreSQL.
        Some(Secret::Scram(_)) | None => (None, Credential::Missing("unknown role")),
    };
    match expected {
        Some(e) if bool::from(e.as_bytes().ct_eq(answer.as_bytes())) => Ok(credential),
        _ => Err(auth_failed(user)),
    }
}

async fn verify_scram(
    client: &mut ClientEnd<'_>,
    user: &str,
    secret: Option<Secret>,
    end_point: Option<&[u8]>,
) -> Result<Credential, SessionError> {
    let (verifier, known) = match &secret {
        Some(Secret::Scram(v)) => (v.clone(), true),
        Some(Secret::Plain(p)) => (random_verifier(p.as_bytes())?, true),
        // Unknown role or md5-only: run a mock exchange against a random verifier.
        _ => {
            let noise = Zeroizing::new(rand::random::<[u8; 32]>());
            (random_verifier(&noise[..])?, false)
        }
    };
    let server_key = *verifier.server_key();
    let mut out = BytesMut::new();
    // PostgreSQL's order: the bound mechanism first.
    match end_point {
        Some(_) => encode::auth_sasl(&mut out, &[SCRAM_SHA_256_PLUS, "SCRAM-SHA-256"]),
        None => encode::auth_sasl(&mut out, &["SCRAM-SHA-256"]),
    }
    client.send(&out).await?;

    let reply = client.recv_password().await?;
    let mut body = reply.body();
    let mechanism = cstr(&mut body).unwrap_or_default();
    let selected = mechanism == SCRAM_SHA_256_PLUS && end_point.is_some();
    if mechanism != "SCRAM-SHA-256" && !selected {
        return Err(SessionError::refused(
            "28000",
            "auth_failed",
            "client selected an invalid SASL authentication mechanism",
        ));
    }
    let mut server = ScramServer::with_random_nonce(verifier);
    if let Some(end_point) = end_point {
        server = server.offer_channel_binding(end_point.to_vec(), selected);
    }
    let client_first = body.get(4..).unwrap_or_default();
    let server_first = server
        .handle_client_first(client_first)
        .map_err(|e| SessionError::refused("08P01", "auth_failed", e.to_string()))?;
    out.clear();
    encode::auth_sasl_continue(&mut out, &server_first);
    client.send(&out).await?;

    let reply = client.recv_password().await?;
    let (server_final, client_key) = match server.handle_client_final(reply.body()) {
        Ok(done) if known => done,
        Ok(_) => return Err(auth_failed(user)),
        Err(e) => return Err(final_refusal(&e, user)),
    };
    out.clear();
    encode::auth_sasl_final(&mut out, &server_final);
    client.send(&out).await?;
    Ok(match secret {
        // The ClientKey is salted with the verifier made here, not the server's: the backend
        // gets the password itself.
        Some(Secret::Plain(p)) => Credential::Password(p),
        _ => Credential::Scram {
            client_key,
            server_key: Some(server_key),
        },
    })
}

/// A verifier for `password` with a fresh salt and PostgreSQL's default 4096 iterations.
fn random_verifier(password: &[u8]) -> Result<ScramVerifier, SessionError> {
    ScramVerifier::from_password(password, &rand::random::<[u8; 16]>(), 4096)
        .map_err(|e| SessionError::refused("XX000", "internal", e.to_string()))
}
