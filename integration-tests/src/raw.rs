//! A byte-level protocol client, for what real drivers never send: garbage, truncated and
//! oversized messages, unknown types, protocol versions, stalls.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use understudy_protocol::inspect::ErrorView;

/// One backend message as received.
#[derive(Debug, Clone)]
pub struct Msg {
    /// Type byte.
    pub tag: u8,
    /// Body.
    pub body: Vec<u8>,
}

impl Msg {
    /// SQLSTATE of an ErrorResponse/NoticeResponse.
    pub fn code(&self) -> String {
        ErrorView::parse(&self.body).code.to_owned()
    }

    /// Severity of an ErrorResponse/NoticeResponse.
    pub fn severity(&self) -> String {
        ErrorView::parse(&self.body).severity.to_owned()
    }

    /// Primary message of an ErrorResponse/NoticeResponse.
    pub fn message(&self) -> String {
        ErrorView::parse(&self.body).message.to_owned()
    }
}

/// The type bytes of `msgs`, in order, as text (`"12DCZ"`).
pub fn tags(msgs: &[Msg]) -> String {
    msgs.iter().map(|m| m.tag as char).collect()
}

/// A raw connection, over TCP unless opened on a Unix-domain socket.
pub struct RawConn<S = TcpStream> {
    /// The socket.
    pub socket: S,
    buf: BytesMut,
}

/// A tagged message.
pub fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// A Query message.
pub fn query(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    msg(b'Q', &body)
}

/// A StartupMessage for protocol 3.`minor` with `params`.
pub fn startup(minor: u16, params: &[(&str, &str)]) -> Vec<u8> {
    let params: Vec<_> = params
        .iter()
        .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
        .collect();
    startup_bytes(minor, &params)
}

/// A StartupMessage for protocol 3.`minor` with `params` as bytes, UTF-8 or not.
pub fn startup_bytes(minor: u16, params: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut body = BytesMut::new();
    body.put_i32((3 << 16) | i32::from(minor));
    for (k, v) in params {
        body.put_slice(k);
        body.put_u8(0);
        body.put_slice(v);
        body.put_u8(0);
    }
    body.put_u8(0);
    let mut v = (body.len() as i32 + 4).to_be_bytes().to_vec();
    v.extend_from_slice(&body);
    v
}

/// Parse of `sql` as statement `name` (no parameter types given).
pub fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut buf = bytes::BytesMut::new();
    postgres_protocol::message::frontend::parse(name, sql, std::iter::empty(), &mut buf).unwrap();
    buf.to_vec()
}

/// Bind of statement `name` to the unnamed portal with text `params`.
pub fn bind(name: &str, params: &[&str]) -> Vec<u8> {
    let mut buf = bytes::BytesMut::new();
    postgres_protocol::message::frontend::bind(
        "",
        name,
        std::iter::empty::<i16>(),
        params.iter(),
        |p, buf| {
            buf.extend_from_slice(p.as_bytes());
            Ok(postgres_protocol::IsNull::No)
        },
        std::iter::empty::<i16>(),
        &mut buf,
    )
    .map_err(|_| "bind")
    .unwrap();
    buf.to_vec()
}

/// Bind of statement `name` to the unnamed portal with text `params`, Execute, Sync.
pub fn bind_execute_sync(name: &str, params: &[&str]) -> Vec<u8> {
    use postgres_protocol::message::frontend;
    let mut buf = bytes::BytesMut::from(&bind(name, params)[..]);
    frontend::execute("", 0, &mut buf).unwrap();
    frontend::sync(&mut buf);
    buf.to_vec()
}

/// Parse, Bind and Execute of each of `sqls` as the unnamed statement, then one Sync: an
/// extended-protocol batch, which runs in one transaction outside a block.
pub fn batch(sqls: &[&str]) -> Vec<u8> {
    use postgres_protocol::message::frontend;
    let mut buf = bytes::BytesMut::new();
    for sql in sqls {
        buf.extend_from_slice(&parse("", sql));
        buf.extend_from_slice(&bind("", &[]));
        frontend::execute("", 0, &mut buf).unwrap();
    }
    frontend::sync(&mut buf);
    buf.to_vec()
}

impl RawConn {
    /// Opens a TCP connection without saying anything.
    pub async fn open(addr: SocketAddr) -> Self {
        Self {
            socket: TcpStream::connect(addr).await.expect("connect"),
            buf: BytesMut::new(),
        }
    }

    /// Opens a connection and logs in as a trusted role; returns after ReadyForQuery.
    pub async fn login(addr: SocketAddr, user: &str) -> Self {
        Self::login_as_app(addr, user, "raw").await.0
    }

    /// Logs in as a trusted role with `application_name` `app`; returns the connection after
    /// ReadyForQuery and the messages up to it.
    pub async fn login_as_app(addr: SocketAddr, user: &str, app: &str) -> (Self, Vec<Msg>) {
        let mut c = Self::open(addr).await;
        c.send(&startup(
            0,
            &[
                ("user", user),
                ("database", "postgres"),
                ("application_name", app),
            ],
        ))
        .await;
        let greeting = c.read_until(b'Z').await;
        assert!(
            greeting.iter().all(|m| m.tag != b'E'),
            "login failed: {greeting:?}"
        );
        (c, greeting)
    }

    /// Closes the connection with a reset (SO_LINGER 0), as a client whose host or process
    /// died abruptly might.
    pub fn reset(self) {
        let _ = socket2::SockRef::from(&self.socket).set_linger(Some(std::time::Duration::ZERO));
    }
}

impl RawConn<UnixStream> {
    /// Opens a connection to the Unix-domain socket at `path` without saying anything.
    pub async fn open_unix(path: &std::path::Path) -> Self {
        Self {
            socket: UnixStream::connect(path).await.expect("connect"),
            buf: BytesMut::new(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawConn<S> {
    /// Writes bytes (errors ignored: the peer may have closed on purpose).
    pub async fn send(&mut self, bytes: &[u8]) {
        let _ = self.socket.write_all(bytes).await;
    }

    /// Ends the stream towards the peer (a half-close); reading goes on.
    pub async fn shutdown_write(&mut self) {
        let _ = self.socket.shutdown().await;
    }

    /// Reads one message; None on EOF or after 10 s of silence.
    pub async fn read(&mut self) -> Option<Msg> {
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
                let total = 1 + len.max(4) as usize;
                if self.buf.len() >= total {
                    let m = self.buf.split_to(total);
                    return Some(Msg {
                        tag: m[0],
                        body: m[5..].to_vec(),
                    });
                }
            }
            let n =
                tokio::time::timeout(Duration::from_secs(10), self.socket.read_buf(&mut self.buf))
                    .await
                    .ok()?
                    .ok()?;
            if n == 0 {
                return None;
            }
        }
    }

    /// Reads every message until the connection ends (or 10 s of silence).
    pub async fn read_to_end(&mut self) -> Vec<Msg> {
        let mut all = Vec::new();
        while let Some(m) = self.read().await {
            all.push(m);
        }
        all
    }

    /// Reads until a message of type `tag` (included); panics on EOF first.
    pub async fn read_until(&mut self, tag: u8) -> Vec<Msg> {
        let mut out = Vec::new();
        loop {
            let m = self.read().await.unwrap_or_else(|| {
                panic!("connection ended before {:?}; got {out:?}", tag as char)
            });
            let done = m.tag == tag;
            out.push(m);
            if done {
                return out;
            }
        }
    }

    /// Reads until an ErrorResponse and returns it; panics if the connection ends first.
    pub async fn expect_error(&mut self) -> Msg {
        self.read_until(b'E').await.pop().expect("an ErrorResponse")
    }

    /// Whether the peer closes the connection (EOF) within 10 s, discarding anything before.
    pub async fn closed(&mut self) -> bool {
        let mut sink = [0u8; 4096];
        matches!(
            tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    match self.socket.read(&mut sink).await {
                        Ok(0) | Err(_) => return true,
                        Ok(_) => {}
                    }
                }
            })
            .await,
            Ok(true)
        )
    }

    /// Reads the single-byte answer to SSLRequest/GSSENCRequest.
    pub async fn read_byte(&mut self) -> u8 {
        self.socket.read_u8().await.expect("one byte")
    }
}
