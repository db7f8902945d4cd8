//! Opening a connection to a PostgreSQL server: TCP, TLS negotiation, StartupMessage.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpStream, UnixStream};

use crate::config::{BackendSslMode, Keepalive};
use crate::error::SessionError;
use crate::reload::Swappable;
use crate::spares::{Answer, Spares};
use crate::stream::{tune_socket, Stream};
use crate::tls::server_name;
use crate::topology::Backend;
use crate::wire::send;

/// How the gateway connects to backends.
#[derive(Clone)]
pub struct Connector {
    /// TLS policy.
    pub sslmode: BackendSslMode,
    /// TLS client configuration, unless `sslmode = disable`; a reload replaces it.
    pub tls: Arc<Swappable<Option<Arc<rustls::ClientConfig>>>>,
    /// Time allowed for TCP + TLS.
    pub timeout: Duration,
    /// Keepalive for backend sockets.
    pub keepalive: Keepalive,
    /// Connections opened ahead of logins, if any are kept.
    pub spares: Option<Arc<Spares>>,
}

impl Connector {
    /// Connects to `backend` and sends a protocol 3.0 StartupMessage with `params` as given,
    /// on a spare connection when one is ready.
    pub async fn open<'a>(
        &self,
        backend: &Backend,
        params: impl Iterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<Stream, SessionError> {
        let mut buf = BytesMut::with_capacity(256);
        understudy_protocol::startup::write_startup(&mut buf, params);
        if let Some(mut spare) = self.spares.as_ref().and_then(|s| s.take(backend)) {
            // The server has read nothing from a spare it closed, so sending the StartupMessage
            // again on a new connection starts nothing twice.
            let answer = match send(&mut spare, &buf).await {
                Ok(()) => crate::spares::answer(&spare, self.timeout).await,
                Err(_) => Answer::Closed,
            };
            match answer {
                Answer::Answered => return Ok(spare),
                Answer::Closed => {
                    tracing::debug!(%backend, "spare backend connection was closed; opening another")
                }
                Answer::Silent => {
                    return Err(SessionError::no_server_now(format!(
                        "the database server at {backend} did not answer within {:?}",
                        self.timeout
                    )))
                }
            }
        }
        let mut stream = self.connect(backend).await?;
        send(&mut stream, &buf)
            .await
            .map_err(SessionError::BackendLost)?;
        Ok(stream)
    }

    /// Opens a connection to `backend` (TCP, then TLS as `sslmode` says) within the timeout.
    /// A server that cannot be reached refuses the login with `57P03` (not now); one reached
    /// whose TLS does not match the gateway's settings, with `08001`.
    pub async fn connect(&self, backend: &Backend) -> Result<Stream, SessionError> {
        let started = Instant::now();
        let refusal = |tls: bool, e: &dyn std::fmt::Display| {
            let message = format!("could not connect to the database server at {backend}: {e}");
            if tls {
                SessionError::BackendUnavailable {
                    code: "08001",
                    message,
                }
            } else {
                SessionError::no_server_now(message)
            }
        };
        let negotiate = async {
            let socket = self.dial(backend).await.map_err(|e| (false, e))?;
            self.secure(backend, socket).await.map_err(|e| (true, e))
        };
        let stream = crate::clock::timeout(self.timeout, negotiate)
            .await
            .map_err(|_| refusal(false, &format!("timed out after {:?}", self.timeout)))?
            .map_err(|(tls, e)| {
                if crate::error::out_of_files(&e) {
                    SessionError::out_of_files()
                } else {
                    refusal(tls, &e)
                }
            })?;
        metrics::histogram!("understudy_backend_connect_seconds")
            .record(started.elapsed().as_secs_f64());
        Ok(stream)
    }

    /// A plain connection to `backend` (bounded by the caller): TCP with the gateway's socket
    /// options, or a Unix-domain socket when the backend's host is a directory. A host name
    /// with several addresses (`localhost` as `::1` and `127.0.0.1`, say) is tried at each in
    /// turn, as libpq tries them, until one connects, each given an equal share of the
    /// connect timeout (so one that drops packets leaves time for the next); the last one's
    /// error is the answer.
    pub async fn dial(&self, backend: &Backend) -> std::io::Result<Stream> {
        if let Some(path) = backend.socket_path() {
            return Ok(Stream::Unix(UnixStream::connect(path).await?));
        }
        let tcp = connect_any(backend.resolve().await?, self.timeout).await?;
        tune_socket(&tcp, &self.keepalive)?;
        Ok(Stream::Plain(tcp))
    }

    /// A plain TCP connection with TLS negotiated as `sslmode` says (SSLRequest, then the
    /// handshake), or as it is when TLS is off or a `prefer` server declines it. A Unix-domain
    /// socket stays as it is whatever `sslmode` says, as libpq leaves it: PostgreSQL offers no
    /// TLS there.
    pub async fn secure(&self, backend: &Backend, socket: Stream) -> std::io::Result<Stream> {
        let Stream::Plain(mut tcp) = socket else {
            return Ok(socket);
        };
        let Some(tls) = self
            .tls
            .get()
            .filter(|_| self.sslmode != BackendSslMode::Disable)
        else {
            return Ok(Stream::Plain(tcp));
        };
        let mut req = BytesMut::new();
        postgres_protocol::message::frontend::ssl_request(&mut req);
        send(&mut tcp, &req).await?;
        match tcp.read_u8().await? {
            b'S' => {
                let name = server_name(&backend.host).map_err(std::io::Error::other)?;
                let tls = tokio_rustls::TlsConnector::from(tls)
                    .connect(name, crate::stream::Counted::new(tcp))
                    .await?;
                Ok(Stream::ClientTls(Box::new(tls)))
            }
            b'N' if self.sslmode == BackendSslMode::Prefer => Ok(Stream::Plain(tcp)),
            b'N' => Err(std::io::Error::other("server does not support TLS")),
            other => Err(std::io::Error::other(format!(
                "unexpected answer {other:#x} to SSLRequest"
            ))),
        }
    }
}

/// What a server says between AuthenticationOk and its first ReadyForQuery.
#[derive(Debug, Default)]
pub struct Greeting {
    /// ParameterStatus, NoticeResponse, ReadyForQuery messages as received (BackendKeyData
    /// left out: the client gets the gateway's).
    pub relay: BytesMut,
    /// Parameters reported, in order.
    pub params: Vec<(String, String)>,
    /// The backend's process ID and secret.
    pub key: Option<(i32, i32)>,
}

/// Reads the server's greeting after authentication (docs 55.2.1); a FATAL is returned with
/// the greeting so far (the caller forwards it).
pub async fn read_greeting(
    stream: &mut Stream,
    buf: &mut BytesMut,
) -> Result<Greeting, (Greeting, SessionError)> {
    use understudy_protocol::inspect::{self, ErrorView};
    use understudy_protocol::tags::backend;
    let mut g = Greeting::default();
    loop {
        let frame = match crate::auth::relay::recv_backend(stream, buf).await {
            Ok(f) => f,
            Err(e) => return Err((g, e)),
        };
        match frame.tag {
            backend::PARAMETER_STATUS => {
                if let Some((name, value)) = inspect::parameter_status(frame.body()) {
                    crate::session::record_param(&mut g.params, name, value);
                }
                g.relay.extend_from_slice(&frame.raw);
            }
            backend::BACKEND_KEY_DATA => match inspect::backend_key_data(frame.body()) {
                Some(key) => g.key = Some(key),
                None => return Err((g, crate::auth::relay::unexpected(backend::BACKEND_KEY_DATA))),
            },
            backend::NOTICE_RESPONSE => g.relay.extend_from_slice(&frame.raw),
            backend::ERROR_RESPONSE => {
                g.relay.extend_from_slice(&frame.raw);
                let err = ErrorView::parse(frame.body());
                let e = SessionError::ServerFatal {
                    code: err.code.to_owned(),
                    message: err.message.to_owned(),
                };
                return Err((g, e));
            }
            backend::READY_FOR_QUERY => {
                g.relay.extend_from_slice(&frame.raw);
                return Ok(g);
            }
            other => return Err((g, crate::auth::relay::unexpected(other))),
        }
    }
}

/// The first of `addrs`, in order, that accepts a TCP connection, each of several given its
/// share of `within`; else the last one's error, naming it when there were several.
async fn connect_any(
    addrs: Vec<std::net::SocketAddr>,
    within: Duration,
) -> std::io::Result<TcpStream> {
    let several = addrs.len() > 1;
    let share = within / u32::try_from(addrs.len()).unwrap_or(u32::MAX).max(1);
    let mut failed = None;
    for addr in addrs {
        let attempt = async {
            if !several {
                return TcpStream::connect(addr).await;
            }
            crate::clock::timeout(share, TcpStream::connect(addr))
                .await
                .unwrap_or_else(|_| {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer within {share:?}"),
                    ))
                })
        };
        match attempt.await {
            Ok(tcp) => return Ok(tcp),
            Err(e) if several => {
                tracing::debug!(%addr, error = %e, "could not connect to this address");
                failed = Some(std::io::Error::new(e.kind(), format!("{addr}: {e}")));
            }
            Err(e) => failed = Some(e),
        }
    }
    Err(failed.unwrap_or_else(|| std::io::Error::other("no address to connect to")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An address that refuses (a port just freed) is passed over for the next, as libpq
    /// passes over a host name's addresses; when all of several refuse, the error names the
    /// last (the caller names a lone one).
    #[tokio::test]
    async fn each_address_is_tried_in_turn() {
        let within = Duration::from_secs(5);
        let refusing = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let listening = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listening.local_addr().unwrap();
        let tcp = connect_any(vec![refusing, open], within).await.unwrap();
        assert_eq!(tcp.peer_addr().unwrap(), open);
        let e = connect_any(vec![refusing, refusing], within)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
        assert!(e.to_string().starts_with(&refusing.to_string()), "{e}");
        let e = connect_any(vec![refusing], within).await.unwrap_err();
        assert!(
            !e.to_string().contains(&refusing.to_string()),
            "said by the caller: {e}"
        );
        assert!(connect_any(Vec::new(), within).await.is_err());
    }

    /// An address that drops the connection attempt (a listener whose backlog is full: the
    /// kernel ignores the SYN) costs its share of the timeout, not all of it: the next
    /// address is still tried in time.
    #[test]
    fn a_silent_address_leaves_time_for_the_next() {
        // The gateway's runtime: no time driver, timers from the clock's thread.
        let runtime = crate::runtime(1).unwrap();
        runtime.block_on(async {
            let full =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
            full.bind(&any.into()).unwrap();
            full.listen(0).unwrap();
            let silent = full.local_addr().unwrap().as_socket().unwrap();
            // Fill the backlog; later SYNs go unanswered.
            let mut held = Vec::new();
            for _ in 0..4 {
                let attempt =
                    crate::clock::timeout(Duration::from_millis(200), TcpStream::connect(silent));
                if let Ok(Ok(tcp)) = attempt.await {
                    held.push(tcp);
                }
            }
            let listening = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let open = listening.local_addr().unwrap();
            let started = Instant::now();
            let tcp = connect_any(vec![silent, open], Duration::from_secs(2))
                .await
                .expect("the second address within the timeout");
            assert_eq!(tcp.peer_addr().unwrap(), open);
            let took = started.elapsed();
            assert!(
                took >= Duration::from_millis(900) && took < Duration::from_millis(1900),
                "the silent address had its share, 1 s: {took:?}"
            );
        });
    }
}
