//! Why a session ended, and what (if anything) its client is told.

use std::io;

/// The end of a session other than an orderly Terminate.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The client's socket failed or closed; there is nobody left to tell.
    #[error("client connection lost: {0}")]
    ClientGone(#[source] io::Error),
    /// The gateway refuses the client: protocol violation, limit, authentication.
    #[error("{message}")]
    Refused {
        /// SQLSTATE sent in the FATAL ErrorResponse.
        code: &'static str,
        /// Message sent to the client.
        message: String,
        /// Metrics label.
        label: &'static str,
    },
    /// No backend could be reached or logged in to.
    #[error("{message}")]
    BackendUnavailable {
        /// SQLSTATE sent to the client.
        code: &'static str,
        /// Message sent to the client.
        message: String,
    },
    /// The backend connection broke without the server saying why.
    #[error("connection to the database server lost: {0}")]
    BackendLost(#[source] io::Error),
    /// The server ended the session with its own FATAL, already forwarded verbatim.
    #[error("server ended the session: {code} {message}")]
    ServerFatal {
        /// The server's SQLSTATE.
        code: String,
        /// The server's message.
        message: String,
    },
    /// Gateway shutdown.
    #[error("terminating connection due to administrator command")]
    Shutdown,
}

/// `cannot_connect_now`.
pub const CANNOT_CONNECT_NOW: &str = "57P03";

/// What a client the gateway has no file descriptor for is told.
pub const OUT_OF_FILES: &str = "sorry, too many clients already: the gateway is out of file descriptors (raise its open-file limit)";

/// Whether `e` is the process or the system running out of file descriptors.
pub fn out_of_files(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

impl SessionError {
    /// The refusal of a session the gateway has no file descriptor for (its own lack, not the
    /// server's: no failover follows).
    pub fn out_of_files() -> Self {
        Self::refused("53300", "out_of_files", OUT_OF_FILES)
    }

    /// A FATAL refusal with a SQLSTATE and message safe to show the client.
    pub fn refused(code: &'static str, label: &'static str, message: impl Into<String>) -> Self {
        SessionError::Refused {
            code,
            message: message.into(),
            label,
        }
    }

    /// The refusal of a login while no database server can take it (no primary known, or the
    /// primary unreachable): `57P03`, what PostgreSQL says while it cannot accept connections,
    /// so that `pg_isready` and drivers' retry rules treat the gateway as a server that is up
    /// but not accepting yet.
    pub fn no_server_now(message: String) -> Self {
        SessionError::BackendUnavailable {
            code: CANNOT_CONNECT_NOW,
            message,
        }
    }

    /// The SQLSTATE and message the gateway itself must send, if the client is still there and
    /// has not already heard from the server.
    pub fn client_report(&self) -> Option<(&str, String)> {
        match self {
            SessionError::ClientGone(_) | SessionError::ServerFatal { .. } => None,
            SessionError::Refused { code, message, .. }
            | SessionError::BackendUnavailable { code, message } => Some((code, message.clone())),
            SessionError::BackendLost(_) => Some((
                "08006",
                "connection to the database server was lost".to_owned(),
            )),
            SessionError::Shutdown => Some((
                "57P01",
                "terminating connection due to administrator command".to_owned(),
            )),
        }
    }

    /// Short label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            SessionError::ClientGone(_) => "client_gone",
            SessionError::Refused { label, .. } => label,
            SessionError::BackendUnavailable { .. } => "backend_unavailable",
            SessionError::BackendLost(_) => "backend_lost",
            SessionError::ServerFatal { .. } => "server_fatal",
            SessionError::Shutdown => "shutdown",
        }
    }
}
