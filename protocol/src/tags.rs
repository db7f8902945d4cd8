//! Message type bytes of protocol 3.0 (PostgreSQL docs, "Message Formats", 55.7).

/// Frontend (client → server) message type bytes.
pub mod frontend {
    /// Bind a portal.
    pub const BIND: u8 = b'B';
    /// Close a statement or portal.
    pub const CLOSE: u8 = b'C';
    /// COPY data.
    pub const COPY_DATA: u8 = b'd';
    /// End of COPY data.
    pub const COPY_DONE: u8 = b'c';
    /// Abort COPY FROM STDIN.
    pub const COPY_FAIL: u8 = b'f';
    /// Describe a statement or portal.
    pub const DESCRIBE: u8 = b'D';
    /// Execute a portal.
    pub const EXECUTE: u8 = b'E';
    /// Flush pending output.
    pub const FLUSH: u8 = b'H';
    /// Fast-path function call (libpq large objects).
    pub const FUNCTION_CALL: u8 = b'F';
    /// Parse a statement.
    pub const PARSE: u8 = b'P';
    /// Password, SASLInitialResponse, SASLResponse or GSSResponse.
    pub const PASSWORD: u8 = b'p';
    /// Simple query.
    pub const QUERY: u8 = b'Q';
    /// End of an extended-query batch.
    pub const SYNC: u8 = b'S';
    /// Orderly close.
    pub const TERMINATE: u8 = b'X';

    /// Whether `tag` is a message a client may send after startup.
    pub fn is_known(tag: u8) -> bool {
        matches!(
            tag,
            BIND | CLOSE
                | COPY_DATA
                | COPY_DONE
                | COPY_FAIL
                | DESCRIBE
                | EXECUTE
                | FLUSH
                | FUNCTION_CALL
                | PARSE
                | PASSWORD
                | QUERY
                | SYNC
                | TERMINATE
        )
    }

    /// The longest message of type `tag` PostgreSQL reads, its length word included: 10,000
    /// bytes for the ones that carry little (Close, Describe, Execute, Flush, Sync, Terminate,
    /// CopyDone, CopyFail), `None` (the gateway's own limit) for the rest.
    pub fn max_len(tag: u8) -> Option<usize> {
        matches!(
            tag,
            CLOSE | DESCRIBE | EXECUTE | FLUSH | SYNC | TERMINATE | COPY_DONE | COPY_FAIL
        )
        .then_some(10_000)
    }

    /// Whether a ReadyForQuery answers `tag` (Query, Sync and FunctionCall each get one).
    pub fn expects_ready_for_query(tag: u8) -> bool {
        matches!(tag, QUERY | SYNC | FUNCTION_CALL)
    }
}

/// Backend (server → client) message type bytes.
pub mod backend {
    /// Authentication request or result.
    pub const AUTHENTICATION: u8 = b'R';
    /// Cancel key.
    pub const BACKEND_KEY_DATA: u8 = b'K';
    /// Command finished.
    pub const COMMAND_COMPLETE: u8 = b'C';
    /// Start of COPY FROM STDIN.
    pub const COPY_IN_RESPONSE: u8 = b'G';
    /// Start of COPY TO STDOUT.
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    /// Start of COPY BOTH (replication).
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    /// One row.
    pub const DATA_ROW: u8 = b'D';
    /// Empty query string.
    pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
    /// Error.
    pub const ERROR_RESPONSE: u8 = b'E';
    /// Protocol version negotiation.
    pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
    /// Notice.
    pub const NOTICE_RESPONSE: u8 = b'N';
    /// Asynchronous LISTEN/NOTIFY notification.
    pub const NOTIFICATION_RESPONSE: u8 = b'A';
    /// Run-time parameter value.
    pub const PARAMETER_STATUS: u8 = b'S';
    /// Execute stopped at its row limit.
    pub const PORTAL_SUSPENDED: u8 = b's';
    /// Ready for a new query, with the transaction status.
    pub const READY_FOR_QUERY: u8 = b'Z';
    /// Row description.
    pub const ROW_DESCRIPTION: u8 = b'T';
}
