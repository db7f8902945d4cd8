//! The data path: bytes flow both ways at once through two buffers, driven by one poll.
//!
//! Reads and writes on both sockets are polled together so that neither direction can block
//! the other (a client pipelining queries while the server streams results must not deadlock),
//! and a direction stops reading once its buffer is full, which is the backpressure that keeps
//! a slow client from making the gateway hold a whole result set.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncWrite, Interest};
use tokio_util::io::poll_read_buf;
use understudy_protocol::frame::{FrameError, FrameScanner, Step};

use crate::stream::{PlainSocket, Stream};

/// Server messages are not limited by the gateway (the server's own limit is 1 GB); this only
/// keeps a corrupt length word from being believed.
const SERVER_MESSAGE_LIMIT: usize = i32::MAX as usize;
/// Server messages up to this size reach the client whole, so that whatever the gateway must
/// say itself (an error ending an answer, a FATAL) lands at a message boundary; longer ones
/// stream through in pieces, keeping the gateway's memory bounded.
const SERVER_WHOLE_UP_TO: usize = 64 * 1024;

/// A direction stops reading when this much is buffered and ready to forward.
const HIGH_WATER: usize = 256 * 1024;
/// Read at least this much room at a time.
const READ_CHUNK: usize = 8 * 1024;
/// Buffers grown past this by a burst are given back once drained.
const SHRINK_ABOVE: usize = 64 * 1024;

/// One direction's bytes: `buf[..ready]` has been inspected and may be forwarded.
#[derive(Debug)]
pub struct Pipe {
    /// Received bytes not yet written on.
    pub buf: BytesMut,
    /// How many leading bytes of `buf` are inspected and may be forwarded.
    pub ready: usize,
    /// Message-boundary tracker for this direction.
    pub scanner: FrameScanner,
    /// Set by the session to stop reading this direction whatever room is left.
    pub paused: bool,
    /// Bytes written on so far, to any peer: `buf[i]` goes out as byte `written + i`.
    pub written: u64,
    needs_flush: bool,
    /// Where the last writes to a TLS backend began: the byte, as `written` counts, and the
    /// bytes the socket had been written by then (see [`Pipe::records_from`]).
    marks: [(u64, u64); MARKS],
    next_mark: usize,
}

/// How many writes to a TLS backend [`Pipe::records_from`] remembers.
const MARKS: usize = 4;
/// A mark that stands for no write.
const NO_MARK: (u64, u64) = (u64::MAX, 0);

impl Pipe {
    /// A pipe starting with bytes already read during login.
    pub fn new(buf: BytesMut, max_message: usize) -> Self {
        Self {
            buf,
            ready: 0,
            scanner: FrameScanner::new(max_message),
            paused: false,
            written: 0,
            needs_flush: false,
            marks: [NO_MARK; MARKS],
            next_mark: 0,
        }
    }

    /// How many bytes the backend's socket had been written when the write holding byte
    /// `byte` (as [`Pipe::written`] counts) began, at most: TLS records carry that byte and
    /// the ones after it only past that point. `None` if no write remembered began by then.
    pub fn records_from(&self, byte: u64) -> Option<u64> {
        self.marks
            .iter()
            .filter(|(at, _)| *at <= byte)
            .max_by_key(|(at, _)| *at)
            .map(|(_, records)| *records)
    }

    /// Forgets the writes remembered (their socket is gone).
    pub fn forget_marks(&mut self) {
        self.marks = [NO_MARK; MARKS];
    }

    /// Bytes received but not inspected yet.
    pub fn unscanned(&self) -> &[u8] {
        &self.buf[self.ready..]
    }

    /// A pipe for the server's messages: up to 64 KiB scanned whole, longer ones streamed.
    pub fn from_server(buf: BytesMut) -> Self {
        Self {
            scanner: FrameScanner::new(SERVER_MESSAGE_LIMIT).whole_up_to(SERVER_WHOLE_UP_TO),
            ..Self::new(buf, SERVER_MESSAGE_LIMIT)
        }
    }

    /// Scans the next message boundary in the bytes not inspected yet (see [`FrameScanner::next`]).
    pub fn scan(&mut self, whole: impl Fn(u8) -> bool) -> Result<(Step<'_>, usize), FrameError> {
        self.scanner.next(&self.buf[self.ready..], whole)
    }

    /// Puts `bytes` (whole messages of the gateway's own) into the stream at `ready`, which
    /// must be a message boundary; they count as inspected.
    pub fn insert_ready(&mut self, bytes: &[u8]) {
        self.splice_at_ready(0, bytes);
    }

    /// Removes `n` bytes starting at `ready` (a message the peer must not see).
    pub fn remove_at_ready(&mut self, n: usize) {
        if self.ready == 0 {
            self.buf.advance(n);
            return;
        }
        self.splice_at_ready(n, &[]);
    }

    /// Replaces the `remove` bytes at `ready` with `insert`, which then count as inspected.
    /// Done in place: the bytes after move, nothing is allocated unless the buffer must grow.
    pub fn splice_at_ready(&mut self, remove: usize, insert: &[u8]) {
        let at = self.ready;
        let len = self.buf.len();
        let new_len = len - remove + insert.len();
        if new_len > len {
            self.buf.resize(new_len, 0);
        }
        self.buf.copy_within(at + remove..len, at + insert.len());
        self.buf.truncate(new_len);
        self.buf[at..at + insert.len()].copy_from_slice(insert);
        self.ready += insert.len();
    }

    /// Drops the inspected bytes not yet written (they will not be written to this peer).
    pub fn discard_ready(&mut self) {
        self.buf.advance(self.ready);
        self.ready = 0;
        self.needs_flush = false;
    }

    /// Whether everything received has been written on and flushed.
    pub fn is_drained(&self) -> bool {
        self.buf.is_empty() && !self.needs_flush
    }

    fn wants_read(&self) -> bool {
        !self.paused && (self.buf.len() < HIGH_WATER || self.ready == 0)
    }

    #[inline]
    fn poll_write_to(&mut self, stream: &mut Stream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.ready == 0 && !self.needs_flush {
            return Poll::Ready(Ok(()));
        }
        self.poll_write_ready(stream, cx)
    }

    fn poll_write_ready(
        &mut self,
        stream: &mut Stream,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while self.ready > 0 {
            let n = match stream {
                Stream::Plain(tcp) => ready!(poll_send(tcp, &self.buf[..self.ready], cx))?,
                Stream::Unix(unix) => ready!(poll_send(unix, &self.buf[..self.ready], cx))?,
                _ => {
                    if let Some(records) = stream.records_written() {
                        self.marks[self.next_mark % MARKS] = (self.written, records);
                        self.next_mark = self.next_mark.wrapping_add(1);
                    }
                    ready!(Pin::new(&mut *stream).poll_write(cx, &self.buf[..self.ready]))?
                }
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.buf.advance(n);
            self.ready -= n;
            self.written += n as u64;
            // A TCP socket has nothing to flush; TLS may hold a record back.
            self.needs_flush = stream.is_tls();
        }
        if self.needs_flush {
            ready!(Pin::new(&mut *stream).poll_flush(cx))?;
            self.needs_flush = false;
        }
        if self.buf.is_empty() && self.buf.capacity() > SHRINK_ABOVE {
            self.buf = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }

    /// Reads into the pipe; `armed` as [`poll_recv`]'s (a TLS stream is never armed: it may
    /// read or write its socket from either direction, so it is always polled).
    fn poll_read_from(
        &mut self,
        stream: &mut Stream,
        cx: &mut Context<'_>,
        armed: &mut bool,
    ) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 2 {
            self.buf.reserve(READ_CHUNK);
        }
        match stream {
            Stream::Plain(tcp) => poll_recv(tcp, &mut self.buf, cx, armed),
            Stream::Unix(unix) => poll_recv(unix, &mut self.buf, cx, armed),
            _ => poll_read_buf(Pin::new(stream), cx, &mut self.buf),
        }
    }
}

/// Reads what a plain socket has into `buf`'s spare room, straight from tokio's readiness
/// state: the `AsyncRead` layers (cooperative budget, `ReadBuf`) cost more than the recv's
/// own user-space work, and a readable socket needs none of them.
///
/// `armed` says the task's waker is registered with the socket and tokio has seen no
/// readiness since; it is set when the read returns `Pending`. An armed socket that still has
/// no readiness costs one atomic load, not a new registration: tokio takes a registered waker
/// only when it sets readiness, and only a read tried here clears readiness (then `armed` is
/// cleared too).
fn poll_recv(
    socket: &impl PlainSocket,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
    armed: &mut bool,
) -> Poll<io::Result<usize>> {
    let room = buf.capacity() - buf.len();
    loop {
        // Stays `None` when tokio knows the socket has nothing: the read is not even tried.
        let mut read = None;
        let _ = socket.try_io(Interest::READABLE, || {
            let result = socket.try_read_buf(buf);
            // A read that did not fill the room drained the socket (edge-triggered epoll):
            // tokio is told so, as its own reads tell it, and waits for the next readiness
            // event instead of asking the socket again for a read that would block. The
            // readiness noted before this read is what is cleared, so data that arrives after
            // it is never missed.
            let drained = match &result {
                Ok(n) => 0 < *n && *n < room,
                Err(e) => e.kind() == io::ErrorKind::WouldBlock,
            };
            read = Some(result);
            if drained {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(())
            }
        });
        match read {
            None if *armed => return Poll::Pending,
            None => {}
            Some(result) => {
                *armed = false;
                match result {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    result => return Poll::Ready(result),
                }
            }
        }
        if socket.poll_read_ready(cx)?.is_pending() {
            *armed = true;
            return Poll::Pending;
        }
    }
}

/// Writes to a plain socket without the `AsyncWrite` layers (see [`poll_recv`]).
fn poll_send(
    socket: &impl PlainSocket,
    bytes: &[u8],
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    loop {
        match socket.try_write(bytes) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready!(socket.poll_write_ready(cx))?,
            result => return Poll::Ready(result),
        }
    }
}

/// Which socket an I/O error came from: decides between "client gone" and "backend lost".
#[derive(Debug)]
pub enum PumpError {
    /// The client's socket.
    Client(io::Error),
    /// The backend's socket.
    Backend(io::Error),
}

/// Something the session must look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// This many new bytes from the client in `up`.
    FromClient(usize),
    /// This many new bytes from the backend in `down`.
    FromBackend(usize),
    /// The client closed its side.
    ClientEof,
    /// The backend closed its side.
    BackendEof,
}

/// The client socket's bit in [`Pump::armed`].
const CLIENT: u8 = 1;
/// The backend socket's bit.
const BACKEND: u8 = 2;

/// Both sockets and both directions of one session.
///
/// The sockets may be written to directly, but are read only through [`Pump::poll_event`]:
/// a read elsewhere could clear tokio's readiness behind the pump's record of armed sockets.
pub struct Pump {
    /// The client connection.
    pub client: Stream,
    /// The backend connection.
    pub backend: Stream,
    /// Client → backend.
    pub up: Pipe,
    /// Backend → client.
    pub down: Pipe,
    client_open: bool,
    backend_open: bool,
    client_first: bool,
    /// The task's waker the sockets were last registered with.
    task: Option<Waker>,
    /// Plain sockets registered with `task` that tokio has seen no readiness on since: the
    /// registration stands, so they are not registered again until a read is tried.
    armed: u8,
}

impl Pump {
    /// Starts the data path with whatever each side sent past login.
    pub fn new(client: Stream, backend: Stream, up: Pipe, down: Pipe) -> Self {
        Self {
            client,
            backend,
            up,
            down,
            client_open: true,
            backend_open: true,
            client_first: false,
            task: None,
            armed: 0,
        }
    }

    /// Writes what is ready both ways, then reads from whichever side has something.
    pub fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Result<Event, PumpError>> {
        // A registration made with another task's waker would wake that task, not this one.
        if !self.task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
            self.task = Some(cx.waker().clone());
            self.armed = 0;
        }
        if let Poll::Ready(Err(e)) = self.up.poll_write_to(&mut self.backend, cx) {
            return Poll::Ready(Err(PumpError::Backend(e)));
        }
        if let Poll::Ready(Err(e)) = self.down.poll_write_to(&mut self.client, cx) {
            return Poll::Ready(Err(PumpError::Client(e)));
        }
        // Alternate which side is read first so a busy one cannot starve the other.
        self.client_first = !self.client_first;
        let order = if self.client_first {
            [CLIENT, BACKEND]
        } else {
            [BACKEND, CLIENT]
        };
        for socket in order {
            let event = self.poll_read(socket, cx);
            if event.is_ready() {
                return event;
            }
        }
        Poll::Pending
    }

    /// Reads from the `socket` side, unless it is closed or its pipe is full.
    fn poll_read(&mut self, socket: u8, cx: &mut Context<'_>) -> Poll<Result<Event, PumpError>> {
        let client = socket == CLIENT;
        let (pipe, stream, open) = if client {
            (&mut self.up, &mut self.client, &mut self.client_open)
        } else {
            (&mut self.down, &mut self.backend, &mut self.backend_open)
        };
        if !*open || !pipe.wants_read() {
            return Poll::Pending;
        }
        let mut armed = self.armed & socket != 0;
        let read = pipe.poll_read_from(stream, cx, &mut armed);
        self.armed = if armed {
            self.armed | socket
        } else {
            self.armed & !socket
        };
        Poll::Ready(match (ready!(read), client) {
            (Ok(0), _) => {
                *open = false;
                Ok(if client {
                    Event::ClientEof
                } else {
                    Event::BackendEof
                })
            }
            (Ok(n), true) => Ok(Event::FromClient(n)),
            (Ok(n), false) => Ok(Event::FromBackend(n)),
            (Err(e), true) => Err(PumpError::Client(e)),
            (Err(e), false) => Err(PumpError::Backend(e)),
        })
    }

    /// Swaps in a new backend connection (after a failover), whose bytes `down` starts with.
    pub fn replace_backend(&mut self, backend: Stream, down: Pipe) {
        self.backend = backend;
        self.up.forget_marks();
        self.down = down;
        self.backend_open = true;
        self.armed &= !BACKEND;
    }

    /// Writes out everything ready towards the client.
    pub async fn flush_client(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.down.poll_write_to(&mut self.client, cx)).await
    }

    /// Writes out everything ready towards the backend.
    pub async fn flush_backend(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.up.poll_write_to(&mut self.backend, cx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe(bytes: &[u8], ready: usize) -> Pipe {
        let mut p = Pipe::new(BytesMut::from(bytes), 1 << 20);
        p.ready = ready;
        p
    }

    #[test]
    fn splices_grow_shrink_and_keep_the_rest() {
        let mut p = pipe(b"aaHEADbody", 2);
        p.splice_at_ready(4, b"LONGER-HEAD");
        assert_eq!(&p.buf[..], b"aaLONGER-HEADbody");
        assert_eq!(p.ready, 13);
        let mut p = pipe(b"aaHEADbody", 2);
        p.splice_at_ready(4, b"H");
        assert_eq!(&p.buf[..], b"aaHbody");
        assert_eq!(p.ready, 3);
        let mut p = pipe(b"aaXXbb", 2);
        p.remove_at_ready(2);
        assert_eq!((&p.buf[..], p.ready), (&b"aabb"[..], 2));
        let mut p = pipe(b"XXbb", 0);
        p.remove_at_ready(2);
        assert_eq!((&p.buf[..], p.ready), (&b"bb"[..], 0));
        p.insert_ready(b"Z");
        assert_eq!((&p.buf[..], p.ready), (&b"Zbb"[..], 1));
    }

    async fn socket_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (peer, accepted) = tokio::join!(peer, listener.accept());
        (peer.unwrap(), accepted.unwrap().0)
    }

    async fn next_event(pump: &mut Pump) -> Event {
        let event = std::future::poll_fn(|cx| pump.poll_event(cx));
        crate::clock::timeout(std::time::Duration::from_secs(5), event)
            .await
            .expect("the pump was not woken")
            .unwrap()
    }

    /// The records carrying a byte begin no earlier than the socket's count when the last
    /// write begun at or before that byte began; forgotten writes give no answer.
    #[test]
    fn the_write_that_began_a_byte_is_found() {
        let mut p = Pipe::new(BytesMut::new(), 1024);
        assert_eq!(p.records_from(0), None);
        p.marks = [(0, 500), (100, 700), (250, 900), NO_MARK];
        assert_eq!(p.records_from(99), Some(500));
        assert_eq!(p.records_from(100), Some(700));
        assert_eq!(p.records_from(1000), Some(900));
        p.forget_marks();
        assert_eq!(p.records_from(1000), None);
    }

    #[tokio::test]
    async fn idle_sockets_are_not_asked_again_until_woken() {
        use tokio::io::AsyncWriteExt;
        let (mut client_peer, client) = socket_pair().await;
        let (mut backend_peer, backend) = socket_pair().await;
        let mut pump = Pump::new(
            Stream::Plain(client),
            Stream::Plain(backend),
            Pipe::new(BytesMut::new(), 1 << 20),
            Pipe::new(BytesMut::new(), 1 << 20),
        );
        let idle = std::future::poll_fn(|cx| Poll::Ready(pump.poll_event(cx).is_pending()));
        assert!(idle.await);
        assert_eq!(pump.armed, CLIENT | BACKEND);
        // The backend's readiness disarms it alone: the client's registration stands.
        backend_peer.write_all(b"xyz").await.unwrap();
        assert_eq!(next_event(&mut pump).await, Event::FromBackend(3));
        assert_eq!(pump.armed & CLIENT, CLIENT);
        client_peer.write_all(b"ab").await.unwrap();
        assert_eq!(next_event(&mut pump).await, Event::FromClient(2));
        assert_eq!(&pump.up.buf[..], b"ab");
        assert_eq!(&pump.down.buf[..], b"xyz");
        // Forwarding goes on both ways, and a closed peer is still seen.
        pump.up.ready = 2;
        drop(backend_peer);
        assert_eq!(next_event(&mut pump).await, Event::BackendEof);
        assert!(pump.up.buf.is_empty(), "the client's bytes were written");
        assert_eq!(pump.up.written, 2);
    }
}
