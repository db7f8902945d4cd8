//! A socket that may or may not be wrapped in TLS, for either end of a session.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// A client or backend connection, plain or TLS.
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// A Unix-domain socket (never TLS, as in PostgreSQL).
    Unix(UnixStream),
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
        !matches!(self, Stream::Plain(_) | Stream::Unix(_))
    }

    /// The TCP socket underneath, unless it is a Unix-domain socket.
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Plain(s) => Some(s),
            Stream::Unix(_) => None,
            Stream::ServerTls(s) => Some(s.get_ref().0),
            Stream::ClientTls(s) => Some(&s.get_ref().0.tcp),
        }
    }

    /// The socket underneath, for calls the kernel answers without waiting.
    pub fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Plain(s) => s.as_fd(),
            Stream::ServerTls(s) => s.get_ref().0.as_fd(),
            Stream::ClientTls(s) => s.get_ref().0.tcp.as_fd(),
        }
    }

    /// Where the connection leads (for a connection the gateway opened; an accepted Unix-domain
    /// socket's peer has no path).
    pub fn peer_addr(&self) -> io::Result<PeerAddr> {
        match (self, self.tcp()) {
            (Stream::Unix(s), _) => s
                .peer_addr()?
                .as_pathname()
                .map(|p| PeerAddr::Unix(p.into()))
                .ok_or_else(|| io::Error::other("the Unix-domain socket's peer has no path")),
            (_, Some(tcp)) => Ok(PeerAddr::Tcp(tcp.peer_addr()?)),
            (_, None) => Err(io::ErrorKind::Unsupported.into()),
        }
    }

    /// Waits until the socket underneath is readable.
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.readable().await,
            Stream::Plain(s) => s.readable().await,
            Stream::ServerTls(s) => s.get_ref().0.readable().await,
            Stream::ClientTls(s) => s.get_ref().0.tcp.readable().await,
        }
    }

    /// Runs `f`, a non-blocking call on [`Stream::fd`], if the socket underneath was last seen
    /// readable; a `WouldBlock` from it clears that readiness.
    pub fn try_read_io<R>(&self, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        match self {
            Stream::Unix(s) => s.try_io(Interest::READABLE, f),
            Stream::Plain(s) => s.try_io(Interest::READABLE, f),
            Stream::ServerTls(s) => s.get_ref().0.try_io(Interest::READABLE, f),
            Stream::ClientTls(s) => s.get_ref().0.tcp.try_io(Interest::READABLE, f),
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
            Stream::Unix($s) => $e,
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

/// Where a connection leads: a TCP address, or a Unix-domain socket's path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerAddr {
    /// A TCP peer.
    Tcp(SocketAddr),
    /// A Unix-domain socket, named by the path its listening end is bound to (the gateway's
    /// own for its clients, the server's for a backend).
    Unix(Arc<Path>),
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerAddr::Tcp(a) => a.fmt(f),
            PeerAddr::Unix(p) => p.display().fmt(f),
        }
    }
}

/// The non-blocking calls the data path makes on a plain socket, TCP or Unix-domain, straight
/// from tokio's readiness state (see `pump::poll_recv`).
pub trait PlainSocket {
    /// Runs `f` if tokio last saw the socket ready for `interest`; a `WouldBlock` from `f`
    /// clears that readiness.
    fn try_io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
    /// Reads into `buf`'s spare room without waiting.
    fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize>;
    /// Registers the task's waker until the socket is readable.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Writes what the socket takes without waiting.
    fn try_write(&self, bytes: &[u8]) -> io::Result<usize>;
    /// Registers the task's waker until the socket is writable.
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

macro_rules! plain_socket {
    ($t:ty) => {
        impl PlainSocket for $t {
            #[inline]
            fn try_io<R>(
                &self,
                interest: Interest,
                f: impl FnOnce() -> io::Result<R>,
            ) -> io::Result<R> {
                <$t>::try_io(self, interest, f)
            }
            #[inline]
            fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
                <$t>::try_read_buf(self, buf)
            }
            #[inline]
            fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$t>::poll_read_ready(self, cx)
            }
            #[inline]
            fn try_write(&self, bytes: &[u8]) -> io::Result<usize> {
                <$t>::try_write(self, bytes)
            }
            #[inline]
            fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$t>::poll_write_ready(self, cx)
            }
        }
    };
}

plain_socket!(TcpStream);
plain_socket!(UnixStream);

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
