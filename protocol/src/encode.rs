//! Encoders for the backend messages the gateway writes itself, built on pgwire's message types.

use bytes::BytesMut;
use pgwire::messages::response::{ErrorResponse, NoticeResponse, ReadyForQuery, TransactionStatus};
use pgwire::messages::startup::{
    Authentication, BackendKeyData, NegotiateProtocolVersion, ParameterStatus, SecretKey,
};
use pgwire::messages::Message;

/// Severity of an error or notice the gateway raises itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Ends the session.
    Fatal,
    /// Ends the current command.
    Error,
    /// Informational.
    Notice,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Fatal => "FATAL",
            Severity::Error => "ERROR",
            Severity::Notice => "NOTICE",
        }
    }
}

fn put(buf: &mut BytesMut, msg: &impl Message) {
    // pgwire only fails to encode messages whose fields break its own limits (a secret key over
    // 256 bytes); everything built here stays within them.
    if let Err(e) = msg.encode(buf) {
        debug_assert!(false, "pgwire refused a gateway-built message: {e}");
    }
}

fn fields(severity: Severity, code: &str, message: &str) -> Vec<(u8, String)> {
    vec![
        (b'S', severity.as_str().to_owned()),
        (b'V', severity.as_str().to_owned()),
        (b'C', code.to_owned()),
        (b'M', message.to_owned()),
    ]
}

/// ErrorResponse with severity, SQLSTATE and message.
pub fn error_response(buf: &mut BytesMut, severity: Severity, code: &str, message: &str) {
    put(buf, &ErrorResponse::new(fields(severity, code, message)));
}

/// NoticeResponse with SQLSTATE and message.
pub fn notice_response(buf: &mut BytesMut, code: &str, message: &str) {
    put(
        buf,
        &NoticeResponse::new(fields(Severity::Notice, code, message)),
    );
}

/// ReadyForQuery with the transaction status byte (`I`, `T` or `E`).
pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    let status = match status {
        b'T' => TransactionStatus::Transaction,
        b'E' => TransactionStatus::Error,
        _ => TransactionStatus::Idle,
    };
    put(buf, &ReadyForQuery::new(status));
}

/// BackendKeyData with a protocol 3.0 (4-byte) secret.
pub fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    put(buf, &BackendKeyData::new(pid, SecretKey::I32(secret)));
}

/// NegotiateProtocolVersion for a server that speaks 3.0 and no protocol options: the version
/// word is the whole version (`3 << 16`), as PostgreSQL sends it and libpq 18 reads it.
pub fn negotiate_protocol_version(buf: &mut BytesMut, unsupported: Vec<String>) {
    put(
        buf,
        &NegotiateProtocolVersion::new(PROTOCOL_3_0, unsupported),
    );
}

/// Protocol version 3.0 as a version word.
const PROTOCOL_3_0: i32 = 3 << 16;

/// ParameterStatus.
pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    put(
        buf,
        &ParameterStatus::new(name.to_owned(), value.to_owned()),
    );
}

/// AuthenticationOk.
pub fn auth_ok(buf: &mut BytesMut) {
    put(buf, &Authentication::Ok);
}

/// AuthenticationCleartextPassword.
pub fn auth_cleartext(buf: &mut BytesMut) {
    put(buf, &Authentication::CleartextPassword);
}

/// AuthenticationMD5Password with its salt.
pub fn auth_md5(buf: &mut BytesMut, salt: [u8; 4]) {
    put(buf, &Authentication::MD5Password(salt.to_vec()));
}

/// AuthenticationSASL offering the given mechanisms.
pub fn auth_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    put(
        buf,
        &Authentication::SASL(mechanisms.iter().map(|m| (*m).to_owned()).collect()),
    );
}

/// AuthenticationSASLContinue.
pub fn auth_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    put(
        buf,
        &Authentication::SASLContinue(bytes::Bytes::copy_from_slice(data)),
    );
}

/// AuthenticationSASLFinal.
pub fn auth_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    put(
        buf,
        &Authentication::SASLFinal(bytes::Bytes::copy_from_slice(data)),
    );
}

/// Name of the statement and portal the gateway's own queries use. The unnamed ones are the
/// client's: a simple Query (or a Parse or Bind of them) would end the client's unnamed
/// statement or portal, which PostgreSQL keeps across Syncs until the client replaces them.
pub const INTERNAL_STATEMENT: &str = "understudy_internal";

/// The gateway's own query `sql` in the extended protocol, as one request group answered by
/// one ReadyForQuery: [`internal_request`], then Sync.
pub fn internal_query(buf: &mut BytesMut, sql: &str) {
    internal_request(buf, sql);
    postgres_protocol::message::frontend::sync(buf);
}

/// Messages in an [`internal_request`]: each is answered by one completion message (the
/// Execute's after the rows).
pub const INTERNAL_REQUESTS: usize = 7;

/// The gateway's own query `sql` in the extended protocol, without a Sync: Close of
/// [`INTERNAL_STATEMENT`] (statement and portal, which an earlier query that failed may have
/// left), Parse, Bind (text results), Execute, the two Closes again. Its DataRows carry the
/// result; every other message of its answer completes one of its requests. It leaves the
/// client's unnamed statement and portal as they were. `sql` must be one statement without
/// NUL bytes.
pub fn internal_request(buf: &mut BytesMut, sql: &str) {
    use postgres_protocol::message::frontend;
    let name = INTERNAL_STATEMENT;
    // The names and `sql` contain no NUL and there are no parameters: nothing can fail.
    let _ = frontend::close(b'P', name, buf);
    let _ = frontend::close(b'S', name, buf);
    let _ = frontend::parse(name, sql, std::iter::empty(), buf);
    let _ = frontend::bind(
        name,
        name,
        std::iter::empty::<i16>(),
        std::iter::empty::<()>(),
        |(), _| Ok(postgres_protocol::IsNull::No),
        std::iter::empty::<i16>(),
        buf,
    );
    let _ = frontend::execute(name, 0, buf);
    let _ = frontend::close(b'P', name, buf);
    let _ = frontend::close(b'S', name, buf);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response_layout() {
        let mut b = BytesMut::new();
        error_response(&mut b, Severity::Fatal, "53300", "too many");
        let mut want = vec![b'E'];
        let body = b"SFATAL\0VFATAL\0C53300\0Mtoo many\0\0";
        want.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        want.extend_from_slice(body);
        assert_eq!(&b[..], &want[..]);
    }

    #[test]
    fn internal_request_has_its_count_of_messages() {
        let mut b = BytesMut::new();
        internal_request(&mut b, "SELECT 1");
        let mut messages = 0;
        let mut rest = &b[..];
        while !rest.is_empty() {
            let len = i32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
            rest = &rest[1 + len..];
            messages += 1;
        }
        assert_eq!(messages, INTERNAL_REQUESTS);
    }

    #[test]
    fn small_messages_layout() {
        let mut b = BytesMut::new();
        ready_for_query(&mut b, b'T');
        backend_key_data(&mut b, 7, -1);
        assert_eq!(&b[..], b"Z\0\0\0\x05TK\0\0\0\x0c\0\0\0\x07\xff\xff\xff\xff");
    }
}
