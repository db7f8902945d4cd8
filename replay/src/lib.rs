//! What a session did and what its client saw, so that the session can be moved to another
//! server: statement classification, the per-session journal with response digests, and the
//! decisions of replay. No sockets here; the gateway does the I/O.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod classify;
pub mod journal;
mod read_only_calls;
