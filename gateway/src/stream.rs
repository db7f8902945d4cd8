//! A socket that may or may not be wrapped in TLS, for either end of a session.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A client or backend connection, plain or TLS.
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS accepted from a client.
    ServerTls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// TLS opened to a backend.
    ClientTls(Box<tokio_rustls::client::TlsStream<Counted>>),
}

/// A TCP socket that counts the bytes written to it: under TLS, the records' bytes, which is
/// what the kernel's count of unacknowledged bytes counts (see `Session::relocate`).
#[derive(Debug)]
pub struct Counted {
    tcp: TcpStream,
    written: u64,
}

impl Counted {
    /// Counts from now on.
    pub fn new(tcp: TcpStream) -> Self {
        Self { tcp, written: 0 }
    }
}

impl Stream {
    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }

    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::ServerTls(s) => s.get_ref().0,
            Stream::ClientTls(s) => &s.get_ref().0.tcp,
        }
    }

    /// Bytes written to the socket of a TLS connection to a backend ([`Counted`]).
    pub fn records_written(&self) -> Option<u64> {
        match self {
            Stream::ClientTls(s) => Some(s.get_ref().0.written),
            _ => None,
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Plain($s) => $e,
            Stream::ServerTls($s) => $e,
            Stream::ClientTls($s) => $e,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

/// Turns on TCP_NODELAY, keepalive and the user timeout on a fresh socket.
pub fn tune_socket(s: &TcpStream, keepalive: &crate::config::Keepalive) -> io::Result<()> {
    s.set_nodelay(true)?;
    if let Some(timeout) = keepalive.user_timeout() {
        socket2::SockRef::from(s).set_tcp_user_timeout(Some(timeout))?;
    }
    if keepalive.idle_secs > 0 {
        let ka = socket2::TcpKeepalive::new()
            .with_time(std::time::Duration::from_secs(keepalive.idle_secs))
            .with_interval(std::time::Duration::from_secs(
                keepalive.interval_secs.max(1),
            ))
            .with_retries(keepalive.retries.max(1));
        socket2::SockRef::from(s).set_tcp_keepalive(&ka)?;
    }
    Ok(())
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        count(
            &mut this.written,
            Pin::new(&mut this.tcp).poll_write(cx, buf),
        )
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        count(
            &mut this.written,
            Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs),
        )
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// Adds what a write wrote to `written`.
fn count(written: &mut u64, write: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
    if let Poll::Ready(Ok(n)) = write {
        *written += n as u64;
    }
    write
}
