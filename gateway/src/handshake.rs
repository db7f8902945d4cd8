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

/// Runs the startup phase on a fresh client connection.
pub async fn accept(
    tcp: TcpStream,
    tls: Option<&Arc<rustls::ServerConfig>>,
) -> Result<Opening, (Option<Stream>, SessionError)> {
    let mut stream = Stream::Plain(tcp);
    // SSLRequest and GSSENCRequest may each come once, in either order, before the real packet
    // (none after TLS is set up); as in PostgreSQL, one more is an unsupported protocol.
    let (mut ssl_done, mut gss_done) = (false, false);
    loop {
        let packet = match read_packet(&mut stream).await {
            Ok(p) => p,
            Err(Failure::Io(e)) => return Err((None, SessionError::ClientGone(e))),
            Err(Failure::Startup(e)) => return Err(refused(stream, e)),
        };
        match packet {
            StartupPacket::SslRequest if !ssl_done => {
                ssl_done = true;
                let Some(config) = tls else {
                    stream = answer(stream, b'N').await?;
                    continue;
                };
                let Stream::Plain(mut tcp) = stream else {
                    unreachable!("TLS is set up only here, once")
                };
                if let Err(e) = tcp.write_all(b"S").await {
                    return Err((None, SessionError::ClientGone(e)));
                }
                match tokio_rustls::TlsAcceptor::from(config.clone())
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
                stream = answer(stream, b'N').await?;
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

/// The refusal of a bad startup packet, with the stream to tell the client on.
fn refused(stream: Stream, e: StartupError) -> (Option<Stream>, SessionError) {
    let code = e.sqlstate();
    (
        Some(stream),
        SessionError::refused(code, "bad_startup", e.to_string()),
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
