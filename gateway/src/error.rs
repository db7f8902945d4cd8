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

impl SessionError {
    /// A FATAL refusal with a SQLSTATE and message safe to show the client.
    pub fn refused(code: &'static str, label: &'static str, message: impl Into<String>) -> Self {
        SessionError::Refused {
            code,
            message: message.into(),
            label,
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
