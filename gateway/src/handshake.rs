//! The client's side of the startup phase: TLS and GSS negotiation, then a StartupMessage or a
//! CancelRequest.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use understudy_protocol::startup::{self, CancelKey, StartupError, StartupMessage, StartupPacket};

use crate::error::SessionError;
use crate::stream::Stream;

/// What the client came for.
pub enum Opening {
    /// A session.
    Session {
        /// The connection, TLS already set up if asked for.
        stream: Stream,
        /// The StartupMessage.
        startup: StartupMessage,
    },
    /// A cancel of another session's query.
    Cancel {
        /// The connection it came on, to be closed once the cancel is passed on.
        stream: Stream,
        /// The key it names.
        key: CancelKey,
    },
}

/// The first byte of a TLS record carrying a handshake: a client opening TLS at once.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The ALPN protocol PostgreSQL 17 defines, required of a client that opens TLS at once.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// Runs the startup phase on a fresh client connection, plain TCP or a Unix-domain socket.
pub async fn accept(
    socket: Stream,
    tls: Option<&Arc<crate::tls::ServerTls>>,
) -> Result<Opening, (Option<Stream>, SessionError)> {
    let mut stream = match socket {
        Stream::Plain(tcp) => {
            let mut first = [0u8; 1];
            match tcp.peek(&mut first).await {
                Ok(1) if first[0] == TLS_HANDSHAKE_RECORD => direct_tls(tcp, tls).await?,
                Ok(_) => Stream::Plain(tcp),
                Err(e) => return Err((None, SessionError::ClientGone(e))),
            }
        }
        other => other,
    };
    let direct = stream.is_tls();
    // As PostgreSQL, no TLS on a Unix-domain socket: an SSLRequest there is answered `N`.
    let tls = tls.filter(|_| !matches!(stream, Stream::Unix(_)));
    // SSLRequest and GSSENCRequest may each come once, in either order, before the real packet
    // (none after TLS is set up); as in PostgreSQL, one more is an unsupported protocol.
    let (mut ssl_done, mut gss_done) = (direct, direct);
    loop {
        let packet = match read_packet(&mut stream).await {
            Ok(p) => p,
            Err(Failure::Io(e)) => return Err((None, SessionError::ClientGone(e))),
            Err(Failure::Startup(e)) => return Err(refused(stream, e)),
        };
        match packet {
            StartupPacket::SslRequest if !ssl_done => {
                ssl_done = true;
                let ahead = sent_ahead(&stream);
                let Some(config) = tls else {
                    stream = answer(stream, b'N').await?;
                    if ahead {
                        return Err(sent_before_answer(stream, "SSL"));
                    }
                    continue;
                };
                if ahead {
                    return Err(sent_before_answer(stream, "SSL"));
                }
                let Stream::Plain(mut tcp) = stream else {
                    unreachable!("TLS is set up only here, once")
                };
                if let Err(e) = tcp.write_all(b"S").await {
                    return Err((None, SessionError::ClientGone(e)));
                }
                match tokio_rustls::TlsAcceptor::from(config.config.clone())
                    .accept(tcp)
                    .await
                {
                    Ok(tls) => stream = Stream::ServerTls(Box::new(tls)),
                    Err(e) => return Err((None, SessionError::ClientGone(e))),
                }
                gss_done = true;
            }
            StartupPacket::GssEncRequest if !gss_done => {
                gss_done = true;
                let ahead = sent_ahead(&stream);
                stream = answer(stream, b'N').await?;
                if ahead {
                    return Err(sent_before_answer(stream, "GSSAPI encryption"));
                }
            }
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                let minor = if matches!(packet, StartupPacket::SslRequest) {
                    5679
                } else {
                    5680
                };
                let e = StartupError::UnsupportedProtocol { major: 1234, minor };
                return Err(refused(stream, e));
            }
            StartupPacket::Cancel(key) => return Ok(Opening::Cancel { stream, key }),
            StartupPacket::Startup(startup) => return Ok(Opening::Session { stream, startup }),
        }
    }
}

/// Sets up TLS for a client that began with its ClientHello instead of an SSLRequest
/// (libpq 17+ with `sslnegotiation=direct`); as in PostgreSQL 17, only a client that names
/// the `postgresql` application protocol is served.
async fn direct_tls(
    tcp: TcpStream,
    tls: Option<&Arc<crate::tls::ServerTls>>,
) -> Result<Stream, (Option<Stream>, SessionError)> {
    let Some(config) = tls else {
        // What any other bytes that are no startup packet get (a TLS client cannot read it,
        // but whoever looks at the bytes can).
        return Err((
            Some(Stream::Plain(tcp)),
            SessionError::refused(
                "08P01",
                "protocol_violation",
                "invalid length of startup packet: this is a TLS handshake (sslnegotiation=direct), and the gateway has no tls.cert",
            ),
        ));
    };
    let tls = match tokio_rustls::TlsAcceptor::from(config.config.clone())
        .accept(tcp)
        .await
    {
        Ok(tls) => tls,
        Err(e) => return Err((None, SessionError::ClientGone(e))),
    };
    let named = tls.get_ref().1.alpn_protocol() == Some(ALPN_POSTGRESQL);
    let stream = Stream::ServerTls(Box::new(tls));
    if !named {
        return Err((
            Some(stream),
            SessionError::refused(
                "08P01",
                "protocol_violation",
                "received direct TLS connection request without the ALPN protocol \"postgresql\"",
            ),
        ));
    }
    Ok(stream)
}

/// The refusal of a bad startup packet, with the stream to tell the client on.
fn refused(stream: Stream, e: StartupError) -> (Option<Stream>, SessionError) {
    let code = e.sqlstate();
    (
        Some(stream),
        SessionError::refused(code, "bad_startup", e.to_string()),
    )
}

/// Whether the client sent more after an encryption request before it had the answer: bytes
/// that came before the TLS handshake (or in place of it), which a man in the middle may have
/// put there.
fn sent_ahead(stream: &Stream) -> bool {
    if stream.is_tls() {
        return false;
    }
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
    // The socket does not block: an empty one answers WouldBlock.
    matches!(socket2::SockRef::from(&stream.fd()).peek(&mut byte), Ok(n) if n > 0)
}

/// PostgreSQL's refusal of a client that sent data right behind its `what` request.
fn sent_before_answer(stream: Stream, what: &str) -> (Option<Stream>, SessionError) {
    (
        Some(stream),
        SessionError::refused(
            "08P01",
            "bad_startup",
            format!("received unencrypted data after {what} request"),
        ),
    )
}

async fn answer(mut stream: Stream, byte: u8) -> Result<Stream, (Option<Stream>, SessionError)> {
    match stream.write_all(&[byte]).await {
        Ok(()) => Ok(stream),
        Err(e) => Err((None, SessionError::ClientGone(e))),
    }
}

enum Failure {
    Io(std::io::Error),
    Startup(StartupError),
}

async fn read_packet<S: AsyncRead + Unpin>(stream: &mut S) -> Result<StartupPacket, Failure> {
    // Exact reads: nothing past this packet may be consumed, a TLS handshake may follow it.
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await.map_err(Failure::Io)?;
    let total = startup::packet_len(&len)
        .map_err(Failure::Startup)?
        .unwrap_or_default();
    let mut packet = vec![0u8; total];
    packet[..4].copy_from_slice(&len);
    stream
        .read_exact(&mut packet[4..])
        .await
        .map_err(Failure::Io)?;
    startup::parse_packet(&packet).map_err(Failure::Startup)
}
