//! Message-at-a-time reads and writes for the startup and login phases (not the data path).

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use understudy_protocol::frame::{FrameError, FrameScanner, Step, HEADER_LEN};

/// Largest message accepted during login (PostgreSQL's PG_MAX_AUTH_TOKEN_LENGTH is 65535).
pub const MAX_LOGIN_MESSAGE: usize = 65_535 + HEADER_LEN;

/// One whole message, kept as received so it can be forwarded untouched.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Message type byte.
    pub tag: u8,
    /// Type byte, length and body.
    pub raw: Bytes,
}

impl Frame {
    /// The body, after type byte and length.
    pub fn body(&self) -> &[u8] {
        &self.raw[HEADER_LEN..]
    }
}

/// Why reading one message failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Socket error or EOF.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Impossible length.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Reads one whole message through `buf`; bytes after it stay in `buf` for the data path.
pub async fn read_message<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    max_len: usize,
) -> Result<Frame, ReadError> {
    loop {
        let mut scanner = FrameScanner::new(max_len);
        if let (Step::Whole { tag, .. }, n) = scanner.next(buf, |_| true)? {
            return Ok(Frame {
                tag,
                raw: buf.split_to(n).freeze(),
            });
        }
        buf.reserve(FrameScanner::missing(buf).max(1024));
        if stream.read_buf(buf).await? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
    }
}

/// Writes all of `bytes` and flushes (TLS needs the flush to put records on the wire).
pub async fn send<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// Reads a NUL-terminated UTF-8 string from the front of `buf`.
pub fn cstr<'a>(buf: &mut &'a [u8]) -> Option<&'a str> {
    let end = buf.iter().position(|&b| b == 0)?;
    let s = std::str::from_utf8(&buf[..end]).ok()?;
    *buf = &buf[end + 1..];
    Some(s)
}
