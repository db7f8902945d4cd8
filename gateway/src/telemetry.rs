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
        export_alerting_series();
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
    describe_counter!(
        "understudy_unread_requests_total",
        "Requests in flight at a failover that the old primary provably never read, run on the new one"
    );
    describe_counter!(
        "understudy_catalog_questions_total",
        "Questions of a database's catalog for views and functions that write unseen, by outcome"
    );
    describe_counter!(
        "understudy_config_reloads_total",
        "Configuration reloads (SIGHUP, POST /reload), by outcome"
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

/// Exports the series that alerts watch at 0 from the start rather than from their first
/// event: a rule on their increase, or on their absence, needs them there.
fn export_alerting_series() {
    for name in [
        "understudy_failovers_total",
        "understudy_failover_failures_total",
        "understudy_lost_commits_total",
        "understudy_in_doubt_statements_total",
        "understudy_listener_waits_given_up_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    let outcomes: [(&'static str, &[&'static str]); 6] = [
        (
            "understudy_in_doubt_commits_total",
            &["committed", "replayed", "unknown"],
        ),
        (
            "understudy_replays_total",
            &["ok", "diverged", "unreplayable"],
        ),
        (
            "understudy_session_moves_total",
            &["moved", "unmovable", "no_credential", "lost_commit"],
        ),
        (
            "understudy_cancel_requests_total",
            &["forwarded", "failed", "timeout", "unknown_key"],
        ),
        ("understudy_config_reloads_total", &["applied", "failed"]),
        (
            "understudy_catalog_questions_total",
            &["answered", "failed"],
        ),
    ];
    for (name, outcomes) in outcomes {
        for &outcome in outcomes {
            metrics::counter!(name, "outcome" => outcome).increment(0);
        }
    }
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

/// A session's traffic, counted locally and added to the shared counters when a transaction
/// (or a statement outside one) ends, when more than [`Tally::FLUSH_BYTES`] are pending, and
/// when the session ends: one update of each shared counter (two atomic operations) per
/// transaction rather than per statement and direction.
pub struct Tally {
    client_bytes: u64,
    backend_bytes: u64,
    queries: u64,
    counters: [Counter; 3],
}

impl Tally {
    /// Pending bytes, either way, that are added at once rather than at the transaction's end.
    pub const FLUSH_BYTES: u64 = 1 << 20;

    /// A tally for `metrics`' client bytes, backend bytes and queries.
    pub fn new(metrics: &Metrics) -> Self {
        Self {
            client_bytes: 0,
            backend_bytes: 0,
            queries: 0,
            counters: [
                metrics.client_bytes.clone(),
                metrics.backend_bytes.clone(),
                metrics.queries.clone(),
            ],
        }
    }

    /// Counts `n` bytes from the client.
    #[inline]
    pub fn client_bytes(&mut self, n: usize) {
        self.client_bytes += n as u64;
        if self.client_bytes > Self::FLUSH_BYTES {
            self.flush();
        }
    }

    /// Counts `n` bytes from the backend.
    #[inline]
    pub fn backend_bytes(&mut self, n: usize) {
        self.backend_bytes += n as u64;
        if self.backend_bytes > Self::FLUSH_BYTES {
            self.flush();
        }
    }

    /// Counts one Query or Execute.
    #[inline]
    pub fn query(&mut self) {
        self.queries += 1;
    }

    /// Adds what is pending to the shared counters.
    pub fn flush(&mut self) {
        let pending = [
            std::mem::take(&mut self.client_bytes),
            std::mem::take(&mut self.backend_bytes),
            std::mem::take(&mut self.queries),
        ];
        for (counter, n) in self.counters.iter().zip(pending) {
            if n > 0 {
                counter.increment(n);
            }
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Counts an ErrorResponse by SQLSTATE; `origin` is `server` or `gateway`.
pub fn count_error(code: &str, origin: &'static str) {
    metrics::counter!("understudy_errors_total", "sqlstate" => code.to_owned(), "origin" => origin)
        .increment(1);
}

/// The filter in force, which a reload may replace (not when `RUST_LOG` set it).
static LOG_FILTER: std::sync::OnceLock<
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>,
> = std::sync::OnceLock::new();

/// Logs to stderr as `format`, filtered by `level` (a `tracing` filter), or by `RUST_LOG`
/// when that is set.
pub fn init_logging(level: &str, format: crate::config::LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let from_env = tracing_subscriber::EnvFilter::try_from_default_env().ok();
    let from_config = from_env.is_none();
    let filter = from_env.unwrap_or_else(|| {
        tracing_subscriber::EnvFilter::try_new(level)
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    });
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let lines: Box<dyn tracing_subscriber::Layer<_> + Send + Sync> = match format {
        crate::config::LogFormat::Text => {
            Box::new(lines.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())))
        }
        crate::config::LogFormat::Json => Box::new(lines.json().with_ansi(false)),
    };
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(lines)
        .try_init()
        .is_ok();
    if installed && from_config {
        let _ = LOG_FILTER.set(handle);
    }
}

/// Puts log filter `level` in force (a configuration reload); `RUST_LOG`, when it set the
/// filter, keeps it.
pub fn set_log_level(level: &str) -> Result<(), String> {
    let Some(handle) = LOG_FILTER.get() else {
        return Ok(());
    };
    let filter = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())?;
    handle.reload(filter).map_err(|e| e.to_string())
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use super::*;

    /// What the tally adds shows up at a flush, past the byte threshold, and at its end; never
    /// twice.
    #[test]
    fn a_tally_adds_at_flushes_past_the_threshold_and_when_dropped() {
        let cells: Vec<Arc<AtomicU64>> = (0..3).map(|_| Arc::new(AtomicU64::new(0))).collect();
        let counter = |i: usize| Counter::from_arc(cells[i].clone());
        let read = || -> Vec<u64> { cells.iter().map(|c| c.load(Ordering::Relaxed)).collect() };
        let mut tally = Tally {
            client_bytes: 0,
            backend_bytes: 0,
            queries: 0,
            counters: [counter(0), counter(1), counter(2)],
        };
        tally.client_bytes(10);
        tally.backend_bytes(20);
        tally.query();
        assert_eq!(read(), [0, 0, 0], "nothing before a flush");
        tally.flush();
        assert_eq!(read(), [10, 20, 1]);
        tally.flush();
        assert_eq!(read(), [10, 20, 1], "a second flush adds nothing");
        tally.backend_bytes(Tally::FLUSH_BYTES as usize + 1);
        assert_eq!(
            read(),
            [10, 21 + Tally::FLUSH_BYTES, 1],
            "a large answer is added at once"
        );
        tally.client_bytes(5);
        tally.query();
        drop(tally);
        assert_eq!(
            read(),
            [15, 21 + Tally::FLUSH_BYTES, 2],
            "the rest when the session ends"
        );
    }
}
