//! Understudy, a PostgreSQL failover gateway: clients connect here instead of to PostgreSQL, and
//! each session is forwarded to the current primary over the native wire protocol.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod auth;
pub mod backend;
pub mod cancel;
pub mod config;
pub mod connection;
pub mod ctl;
pub mod demo;
pub mod error;
pub mod failover;
pub mod gateway;
pub mod handshake;
pub mod local_cluster;
pub mod pump;
pub mod session;
pub mod sessions;
pub mod shutdown;
pub mod stream;
pub mod telemetry;
pub mod tls;
pub mod topology;
pub mod wake;
pub mod wire;

pub use config::Config;
pub use gateway::{Gateway, GatewayHandle};
