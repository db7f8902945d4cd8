//! Metrics (Prometheus via the `metrics` crate) and log setup.

use std::sync::OnceLock;

use metrics::{Counter, Gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// The process-wide Prometheus recorder; installed on first use.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[
                0.000_1, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                2.5, 5.0, 10.0,
            ])
            .map(|b| b.build_recorder())
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        // Another recorder may already be installed (an embedding program's); then ours only
        // renders what it sees, which is nothing, and that is the embedder's choice.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    })
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!("understudy_sessions_open", "Client sessions open now");
    describe_gauge!(
        "understudy_backend_spares",
        "Spare backend connections ready for logins"
    );
    describe_counter!("understudy_sessions_total", "Client sessions accepted");
    describe_counter!(
        "understudy_sessions_ended_total",
        "Sessions ended, by reason"
    );
    describe_counter!(
        "understudy_client_bytes_total",
        Unit::Bytes,
        "Bytes received from clients"
    );
    describe_counter!(
        "understudy_backend_bytes_total",
        Unit::Bytes,
        "Bytes received from backends"
    );
    describe_counter!(
        "understudy_queries_total",
        "Query and Execute messages forwarded"
    );
    describe_counter!(
        "understudy_transactions_total",
        "Transactions ended (ReadyForQuery back to idle)"
    );
    describe_counter!(
        "understudy_errors_total",
        "ErrorResponses seen, by SQLSTATE and origin"
    );
    describe_counter!(
        "understudy_cancel_requests_total",
        "Cancel requests, by outcome"
    );
    describe_histogram!(
        "understudy_backend_connect_seconds",
        Unit::Seconds,
        "Time to open a backend connection"
    );
    describe_histogram!(
        "understudy_login_seconds",
        Unit::Seconds,
        "Time from client connect to ReadyForQuery"
    );
}

/// Handles to the hot-path metrics, looked up once.
#[derive(Clone)]
pub struct Metrics {
    /// Sessions open now.
    pub sessions_open: Gauge,
    /// Sessions accepted.
    pub sessions_total: Counter,
    /// Bytes from clients.
    pub client_bytes: Counter,
    /// Bytes from backends.
    pub backend_bytes: Counter,
    /// Query/Execute messages.
    pub queries: Counter,
    /// Transactions ended.
    pub transactions: Counter,
}

impl Metrics {
    /// Registers the handles with the global recorder.
    pub fn new() -> Self {
        prometheus();
        Self {
            sessions_open: metrics::gauge!("understudy_sessions_open"),
            sessions_total: metrics::counter!("understudy_sessions_total"),
            client_bytes: metrics::counter!("understudy_client_bytes_total"),
            backend_bytes: metrics::counter!("understudy_backend_bytes_total"),
            queries: metrics::counter!("understudy_queries_total"),
            transactions: metrics::counter!("understudy_transactions_total"),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Counts an ErrorResponse by SQLSTATE; `origin` is `server` or `gateway`.
pub fn count_error(code: &str, origin: &'static str) {
    metrics::counter!("understudy_errors_total", "sqlstate" => code.to_owned(), "origin" => origin)
        .increment(1);
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Logs into the test harness's captured output (shown for failing tests), filtered by
/// `RUST_LOG` (default `info`).
pub fn init_test_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}
