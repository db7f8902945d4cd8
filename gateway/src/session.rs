//! One client session on the data path: forwards both ways, tracks message and transaction
//! boundaries from the headers, and ends the way PostgreSQL would.

use std::future::poll_fn;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use understudy_protocol::encode::{self, Severity};
use understudy_protocol::frame::{FrameError, Step};
use understudy_protocol::inspect::{self, ErrorView};
use understudy_protocol::tags::{backend, frontend};

use crate::error::SessionError;
use crate::pump::{Event, Pump, PumpError};
use crate::sessions::SessionGuard;
use crate::shutdown::{Phase, Shutdown};
use crate::telemetry::{count_error, Metrics};

/// How long a closing session may take to hand its last bytes to a peer.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the data path stopped.
enum End {
    /// The client sent Terminate (forwarded) or closed its socket.
    ClientDone,
    /// Anything else; the client may need to be told.
    Failed(SessionError),
}

/// A logged-in session on the data path.
pub struct Session {
    pump: Pump,
    guard: SessionGuard,
    metrics: Metrics,
    /// Status byte of the last ReadyForQuery.
    txn_status: u8,
    /// Query, Sync and FunctionCall messages still waiting for their ReadyForQuery.
    awaiting_ready: u32,
    /// Shutdown asked sessions to close at their next transaction boundary.
    draining: bool,
    /// The server's own FATAL, already forwarded; the backend will close next.
    server_fatal: Option<(String, String)>,
    /// The last value of every ParameterStatus the server reported.
    server_params: Vec<(String, String)>,
}

impl Session {
    /// A session whose login just finished with ReadyForQuery `txn_status`.
    pub fn new(
        pump: Pump,
        guard: SessionGuard,
        metrics: Metrics,
        server_params: Vec<(String, String)>,
    ) -> Self {
        guard.info().txn_status.store(b'I', Ordering::Relaxed);
        Self {
            pump,
            guard,
            metrics,
            txn_status: b'I',
            awaiting_ready: 0,
            draining: false,
            server_fatal: None,
            server_params,
        }
    }

    /// Parameters as the server last reported them.
    pub fn server_params(&self) -> &[(String, String)] {
        &self.server_params
    }

    /// Forwards until the client leaves, the server ends the session, or shutdown.
    pub async fn run(mut self, mut shutdown: Shutdown) -> Result<(), SessionError> {
        let end = self.forward(&mut shutdown).await;
        self.close(end).await
    }

    fn at_transaction_boundary(&self) -> bool {
        self.awaiting_ready == 0 && self.txn_status == b'I' && self.pump.up.unscanned().is_empty()
    }

    async fn forward(&mut self, shutdown: &mut Shutdown) -> End {
        // Login may have left bytes of either side in the buffers.
        if let Some(end) = self.scan_up().or_else(|| self.scan_down()) {
            return end;
        }
        if shutdown.phase() >= Phase::Draining {
            self.draining = true;
        }
        loop {
            if self.draining && self.at_transaction_boundary() {
                return End::Failed(SessionError::Shutdown);
            }
            enum Wake {
                Io(Result<Event, PumpError>),
                Shutdown,
            }
            let wake = tokio::select! {
                e = poll_fn(|cx| self.pump.poll_event(cx)) => Wake::Io(e),
                _ = shutdown.changed() => Wake::Shutdown,
            };
            let end = match wake {
                Wake::Shutdown => match shutdown.phase() {
                    Phase::Force => Some(End::Failed(SessionError::Shutdown)),
                    Phase::Draining => {
                        self.draining = true;
                        None
                    }
                    Phase::Running => None,
                },
                Wake::Io(Ok(Event::FromClient(n))) => {
                    self.metrics.client_bytes.increment(n as u64);
                    self.scan_up()
                }
                Wake::Io(Ok(Event::FromBackend(n))) => {
                    self.metrics.backend_bytes.increment(n as u64);
                    self.scan_down()
                }
                Wake::Io(Ok(Event::ClientEof)) => Some(End::ClientDone),
                Wake::Io(Ok(Event::BackendEof)) => Some(End::Failed(
                    self.backend_gone(std::io::ErrorKind::UnexpectedEof.into()),
                )),
                Wake::Io(Err(PumpError::Client(e))) => {
                    Some(End::Failed(SessionError::ClientGone(e)))
                }
                Wake::Io(Err(PumpError::Backend(e))) => Some(End::Failed(self.backend_gone(e))),
            };
            if let Some(end) = end {
                return end;
            }
        }
    }

    fn backend_gone(&mut self, e: std::io::Error) -> SessionError {
        match self.server_fatal.take() {
            Some((code, message)) => SessionError::ServerFatal { code, message },
            None => SessionError::BackendLost(e),
        }
    }

    /// Inspects new client bytes up to the last complete header.
    fn scan_up(&mut self) -> Option<End> {
        let pipe = &mut self.pump.up;
        loop {
            let (step, n) = match pipe.scan(|t| t == frontend::TERMINATE) {
                Ok(s) => s,
                Err(e) => return Some(End::Failed(client_frame_error(e))),
            };
            match step {
                Step::NeedMore => return None,
                Step::Whole { .. } => {
                    // Terminate: pass it on so the server ends the backend cleanly.
                    pipe.ready += n;
                    return Some(End::ClientDone);
                }
                Step::Streamed { tag, .. } => {
                    if !frontend::is_known(tag) {
                        return Some(End::Failed(SessionError::refused(
                            "08P01",
                            "protocol_violation",
                            format!("invalid frontend message type {tag}"),
                        )));
                    }
                    if frontend::expects_ready_for_query(tag) {
                        self.awaiting_ready += 1;
                    }
                    if matches!(tag, frontend::QUERY | frontend::EXECUTE) {
                        self.metrics.queries.increment(1);
                    }
                    pipe.ready += n;
                }
                Step::Body => pipe.ready += n,
            }
        }
    }

    /// Inspects new server bytes up to the last complete header.
    fn scan_down(&mut self) -> Option<End> {
        let wanted = |t| {
            matches!(
                t,
                backend::READY_FOR_QUERY | backend::ERROR_RESPONSE | backend::PARAMETER_STATUS
            )
        };
        loop {
            let pipe = &mut self.pump.down;
            let (step, n) = match pipe.scan(wanted) {
                Ok(s) => s,
                // The server's framing is trusted; a broken one means a broken connection.
                Err(e) => {
                    return Some(End::Failed(SessionError::BackendLost(
                        std::io::Error::other(e),
                    )))
                }
            };
            match step {
                Step::NeedMore => return None,
                Step::Whole { tag, body } => {
                    match tag {
                        backend::READY_FOR_QUERY => {
                            let status = inspect::ready_for_query_status(body).unwrap_or(b'I');
                            if status == b'I' && self.txn_status != b'I' {
                                self.metrics.transactions.increment(1);
                            }
                            self.txn_status = status;
                            self.awaiting_ready = self.awaiting_ready.saturating_sub(1);
                            self.guard
                                .info()
                                .txn_status
                                .store(status, Ordering::Relaxed);
                        }
                        backend::ERROR_RESPONSE => {
                            let err = ErrorView::parse(body);
                            count_error(err.code, "server");
                            if err.is_fatal() {
                                self.server_fatal =
                                    Some((err.code.to_owned(), err.message.to_owned()));
                            }
                        }
                        _ => {
                            if let Some((name, value)) = inspect::parameter_status(body) {
                                record_param(&mut self.server_params, name, value);
                            }
                        }
                    }
                    self.pump.down.ready += n;
                }
                Step::Streamed { .. } | Step::Body => pipe.ready += n,
            }
        }
    }

    /// Ends the session: pass on what is in flight, tell the client why if it must hear it,
    /// and close the backend at once (session mode: it lives and dies with its client).
    async fn close(mut self, end: End) -> Result<(), SessionError> {
        let result = match end {
            End::ClientDone => Ok(()),
            End::Failed(e) => Err(e),
        };
        let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, self.pump.flush_backend()).await;
        if let Err(e) = &result {
            let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, self.pump.flush_client()).await;
            if let Some((code, message)) = e.client_report() {
                count_error(code, "gateway");
                let mut buf = BytesMut::new();
                encode::error_response(&mut buf, Severity::Fatal, code, &message);
                let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, async {
                    self.pump.client.write_all(&buf).await?;
                    self.pump.client.flush().await
                })
                .await;
            }
            if !matches!(
                e,
                SessionError::BackendLost(_) | SessionError::ServerFatal { .. }
            ) && self.pump.up.scanner.at_boundary()
            {
                let terminate = [frontend::TERMINATE, 0, 0, 0, 4];
                let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, async {
                    self.pump.backend.write_all(&terminate).await?;
                    self.pump.backend.flush().await
                })
                .await;
            }
        }
        let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, self.pump.client.shutdown()).await;
        result
    }
}

fn client_frame_error(e: FrameError) -> SessionError {
    match e {
        FrameError::TooLong { .. } => {
            SessionError::refused("54000", "message_too_long", e.to_string())
        }
        FrameError::Malformed { .. } => {
            SessionError::refused("08P01", "protocol_violation", e.to_string())
        }
    }
}

/// Sets `name` to `value`, keeping the server's order of first report.
pub fn record_param(params: &mut Vec<(String, String)>, name: &str, value: &str) {
    match params.iter_mut().find(|(n, _)| n == name) {
        Some((_, v)) if v == value => {}
        Some((_, v)) => *v = value.to_owned(),
        None => params.push((name.to_owned(), value.to_owned())),
    }
}
