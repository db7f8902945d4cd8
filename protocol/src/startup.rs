//! The startup phase: packets without a type byte (StartupMessage, SSLRequest, GSSENCRequest,
//! CancelRequest), told apart by the code after their length (docs 55.2, 55.7).

use std::fmt;

use bytes::{BufMut, BytesMut};

/// Longest startup packet PostgreSQL accepts (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_PACKET_LEN: usize = 10_000;
/// Code of an SSLRequest.
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
/// Code of a GSSENCRequest.
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;
/// Code of a CancelRequest.
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;
/// Major protocol version the gateway speaks.
pub const PROTOCOL_MAJOR: u16 = 3;

/// One packet of the startup phase.
#[derive(Debug, PartialEq, Eq)]
pub enum StartupPacket {
    /// The client asks for TLS.
    SslRequest,
    /// The client asks for GSSAPI encryption.
    GssEncRequest,
    /// Cancel the query running on the session with this key.
    Cancel(CancelKey),
    /// The real startup message.
    Startup(StartupMessage),
}

/// The key a client quotes to cancel its session's query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CancelKey {
    /// Process ID from BackendKeyData.
    pub pid: i32,
    /// Secret from BackendKeyData.
    pub secret: i32,
}

/// A StartupMessage: protocol version and the parameters in the order the client sent them.
///
/// Values are bytes, as PostgreSQL takes them (a client in LATIN1 may send a LATIN1
/// `application_name`); names, `user` and `database` are UTF-8 (see [`StartupError::NotUtf8`]).
#[derive(Clone, PartialEq, Eq)]
pub struct StartupMessage {
    /// Minor protocol version asked for (major is always 3 here).
    pub minor: u16,
    /// Parameters, including `user`, `database`, `options` and any `_pq_.` protocol options.
    pub params: Vec<(String, Vec<u8>)>,
}

impl fmt::Debug for StartupMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let params: Vec<_> = self
            .params
            .iter()
            .map(|(k, v)| (k, v.escape_ascii().to_string()))
            .collect();
        f.debug_struct("StartupMessage")
            .field("minor", &self.minor)
            .field("params", &params)
            .finish()
    }
}

impl StartupMessage {
    /// Value of parameter `name`.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The role name (`user` is mandatory).
    pub fn user(&self) -> Option<&str> {
        self.text("user")
    }

    /// The database, which defaults to the role name.
    pub fn database(&self) -> Option<&str> {
        self.text("database").or_else(|| self.user())
    }

    /// Value of parameter `name`, if it is UTF-8 (`user` and `database` are: see [`parse_packet`]).
    fn text(&self, name: &str) -> Option<&str> {
        std::str::from_utf8(self.get(name)?).ok()
    }

    /// Protocol options (`_pq_.` prefix) the client asked for; the gateway supports none.
    pub fn protocol_options(&self) -> impl Iterator<Item = &str> {
        self.params
            .iter()
            .map(|(k, _)| k.as_str())
            .filter(|k| k.starts_with("_pq_."))
    }

    /// Parameters to pass to the server: all but protocol options.
    pub fn server_params(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.params
            .iter()
            .filter(|(k, _)| !k.starts_with("_pq_."))
            .map(|(k, v)| (k.as_str(), v.as_slice()))
    }
}

/// A startup packet the gateway cannot accept.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StartupError {
    /// Length word below 8, or a packet longer than [`MAX_STARTUP_PACKET_LEN`] past its
    /// length word.
    #[error("invalid length of startup packet: {0}")]
    InvalidLength(i64),
    /// Protocol major version other than 3, or an unknown request code.
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0")]
    UnsupportedProtocol {
        /// Major version asked for.
        major: u16,
        /// Minor version asked for.
        minor: u16,
    },
    /// The parameter list is not a list of NUL-terminated pairs ending in a NUL.
    #[error("invalid startup packet layout: {0}")]
    Malformed(&'static str),
    /// A parameter name, or the `user` or `database` value, is not UTF-8: the gateway names
    /// roles and databases in its own queries and settings, which are UTF-8 (values of other
    /// parameters are passed on as sent).
    #[error("the gateway takes only UTF-8 {0}")]
    NotUtf8(&'static str),
    /// No `user` parameter.
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
}

impl StartupError {
    /// SQLSTATE PostgreSQL uses for this error.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            StartupError::UnsupportedProtocol { .. } | StartupError::NotUtf8(_) => "0A000",
            StartupError::NoUser => "28000",
            StartupError::InvalidLength(_) | StartupError::Malformed(_) => "08P01",
        }
    }
}

/// Total length of the startup packet at the front of `buf`, once its length word has arrived.
pub fn packet_len(buf: &[u8]) -> Result<Option<usize>, StartupError> {
    let Some(word) = buf.first_chunk::<4>() else {
        return Ok(None);
    };
    let len = i32::from_be_bytes(*word);
    // PostgreSQL measures the packet without its length word.
    if !(8..=MAX_STARTUP_PACKET_LEN as i32 + 4).contains(&len) {
        return Err(StartupError::InvalidLength(len.into()));
    }
    Ok(Some(len as usize))
}

/// Parses one complete startup packet (length word included).
pub fn parse_packet(packet: &[u8]) -> Result<StartupPacket, StartupError> {
    let (Some(code), Some(body)) = (packet.get(4..8), packet.get(8..)) else {
        return Err(StartupError::InvalidLength(packet.len() as i64));
    };
    let code = i32::from_be_bytes([code[0], code[1], code[2], code[3]]);
    match code {
        SSL_REQUEST_CODE if body.is_empty() => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE if body.is_empty() => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST_CODE => {
            // Protocol 3.2 allows secrets up to 256 bytes; the gateway only issues 4-byte ones.
            let (Some(pid), Some(secret)) = (body.first_chunk::<4>(), body.get(4..)) else {
                return Err(StartupError::Malformed("cancel request too short"));
            };
            let secret = <[u8; 4]>::try_from(secret)
                .map_err(|_| StartupError::Malformed("cancel key is not 4 bytes"))?;
            Ok(StartupPacket::Cancel(CancelKey {
                pid: i32::from_be_bytes(*pid),
                secret: i32::from_be_bytes(secret),
            }))
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != PROTOCOL_MAJOR {
                return Err(StartupError::UnsupportedProtocol { major, minor });
            }
            let params = parse_params(body)?;
            let msg = StartupMessage { minor, params };
            for (name, what) in [("user", "user names"), ("database", "database names")] {
                if msg.get(name).is_some() && msg.text(name).is_none() {
                    return Err(StartupError::NotUtf8(what));
                }
            }
            if msg.user().is_none() {
                return Err(StartupError::NoUser);
            }
            Ok(StartupPacket::Startup(msg))
        }
    }
}

/// Writes a protocol 3.0 StartupMessage with `params` in order. Neither postgres-protocol's
/// encoder nor pgwire's takes values that are not UTF-8; a value holds no NUL once parsed.
pub fn write_startup<'a>(buf: &mut BytesMut, params: impl Iterator<Item = (&'a str, &'a [u8])>) {
    let start = buf.len();
    buf.put_i32(0);
    buf.put_i32(i32::from(PROTOCOL_MAJOR) << 16);
    for (name, value) in params {
        for part in [name.as_bytes(), value] {
            buf.put_slice(part);
            buf.put_u8(0);
        }
    }
    buf.put_u8(0);
    let len = (buf.len() - start) as i32;
    buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

fn parse_params(mut body: &[u8]) -> Result<Vec<(String, Vec<u8>)>, StartupError> {
    let mut params = Vec::new();
    loop {
        let name = cstr(&mut body)?;
        if name.is_empty() {
            break;
        }
        let name =
            std::str::from_utf8(name).map_err(|_| StartupError::NotUtf8("parameter names"))?;
        let value = cstr(&mut body)?;
        params.push((name.to_owned(), value.to_owned()));
    }
    if !body.is_empty() {
        return Err(StartupError::Malformed("expected terminator as last byte"));
    }
    Ok(params)
}

fn cstr<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], StartupError> {
    let end = buf
        .iter()
        .position(|&b| b == 0)
        .ok_or(StartupError::Malformed("expected terminator as last byte"))?;
    let s = &buf[..end];
    *buf = &buf[end + 1..];
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: i32, body: &[u8]) -> Vec<u8> {
        let mut v = ((body.len() + 8) as i32).to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn parses_startup_with_params_in_order() {
        let p = packet(
            196_608 + 2,
            b"user\0alice\0options\0-c x=1\0_pq_.foo\0on\0\0",
        );
        let StartupPacket::Startup(m) = parse_packet(&p).unwrap() else {
            panic!("not a startup message")
        };
        assert_eq!(m.minor, 2);
        assert_eq!(m.database(), Some("alice"));
        assert_eq!(m.protocol_options().collect::<Vec<_>>(), ["_pq_.foo"]);
        assert_eq!(
            m.server_params().collect::<Vec<_>>(),
            [("user", &b"alice"[..]), ("options", b"-c x=1")]
        );
    }

    /// A written StartupMessage parses back to what it was written from.
    #[test]
    fn startup_messages_round_trip() {
        let params = [("user", &b"alice"[..]), ("application_name", b"caf\xe9")];
        let mut buf = BytesMut::from(&b"xy"[..]);
        write_startup(&mut buf, params.into_iter());
        assert_eq!(packet_len(&buf[2..]), Ok(Some(buf.len() - 2)));
        let StartupPacket::Startup(m) = parse_packet(&buf[2..]).unwrap() else {
            panic!("not a startup message")
        };
        assert_eq!(m.minor, 0);
        assert_eq!(m.server_params().collect::<Vec<_>>(), params);
    }

    /// Values other than the role's and the database's are bytes, as PostgreSQL takes them.
    #[test]
    fn values_need_not_be_utf8() {
        let p = packet(196_608, b"user\0alice\0application_name\0caf\xe9\0\0");
        let StartupPacket::Startup(m) = parse_packet(&p).unwrap() else {
            panic!("not a startup message")
        };
        assert_eq!(m.get("application_name"), Some(&b"caf\xe9"[..]));
        assert_eq!((m.user(), m.database()), (Some("alice"), Some("alice")));
        assert!(format!("{m:?}").contains(r#""caf\\xe9""#), "{m:?}");
    }

    #[test]
    fn parses_requests() {
        assert_eq!(
            parse_packet(&packet(SSL_REQUEST_CODE, b"")),
            Ok(StartupPacket::SslRequest)
        );
        assert_eq!(
            parse_packet(&packet(GSSENC_REQUEST_CODE, b"")),
            Ok(StartupPacket::GssEncRequest)
        );
        let mut body = 42i32.to_be_bytes().to_vec();
        body.extend_from_slice(&(-7i32).to_be_bytes());
        assert_eq!(
            parse_packet(&packet(CANCEL_REQUEST_CODE, &body)),
            Ok(StartupPacket::Cancel(CancelKey {
                pid: 42,
                secret: -7
            }))
        );
    }

    #[test]
    fn rejects_bad_packets() {
        assert_eq!(
            packet_len(&[0, 0, 0, 4]),
            Err(StartupError::InvalidLength(4))
        );
        assert_eq!(
            packet_len(&[0x7f, 0, 0, 0]),
            Err(StartupError::InvalidLength(0x7f00_0000))
        );
        assert_eq!(packet_len(&[0, 0]), Ok(None));
        assert!(matches!(
            parse_packet(&packet(2 << 16, b"user\0a\0\0")),
            Err(StartupError::UnsupportedProtocol { major: 2, minor: 0 })
        ));
        assert_eq!(
            parse_packet(&packet(196_608, b"user\0a")),
            Err(StartupError::Malformed("expected terminator as last byte"))
        );
        assert_eq!(
            parse_packet(&packet(196_608, b"database\0a\0\0")),
            Err(StartupError::NoUser)
        );
        assert_eq!(
            parse_packet(&packet(196_608, b"user\0\xff\0\0")),
            Err(StartupError::NotUtf8("user names"))
        );
        assert_eq!(
            parse_packet(&packet(196_608, b"user\0a\0database\0caf\xe9\0\0")),
            Err(StartupError::NotUtf8("database names"))
        );
        assert_eq!(
            parse_packet(&packet(196_608, b"user\0a\0x.caf\xe9\0v\0\0")),
            Err(StartupError::NotUtf8("parameter names"))
        );
        assert!(parse_packet(&packet(CANCEL_REQUEST_CODE, b"\0\0")).is_err());
    }
}
