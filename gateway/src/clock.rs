//! Sleeps and timeouts, driven by a thread of their own rather than by the sessions' runtime.
//!
//! The runtime that runs sessions is built without tokio's time driver ([`crate::runtime`]):
//! with it, every park reads the clock twice and walks the timer wheel (about 400 instructions
//! per park, nearly one park per round trip under load), although a session in steady state
//! has no timer at all. The timers made here live in a small runtime on the `understudy-timers`
//! thread; when one fires it wakes its task wherever that task runs. Code in this crate uses
//! these functions instead of `tokio::time`'s (clippy's `disallowed-methods` says so), because
//! those would panic on the sessions' runtime.

use std::future::IntoFuture;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::time::{Instant, Interval, Sleep, Timeout};

/// The timer thread's runtime, started on first use.
fn timers() -> &'static Handle {
    static HANDLE: OnceLock<Handle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("the timer runtime starts");
        let handle = runtime.handle().clone();
        std::thread::Builder::new()
            .name("understudy-timers".into())
            .spawn(move || runtime.block_on(std::future::pending::<()>()))
            .expect("the timer thread starts");
        handle
    })
}

/// Waits for `duration` (as `tokio::time::sleep`).
#[allow(clippy::disallowed_methods)]
pub fn sleep(duration: Duration) -> Sleep {
    let _timers = timers().enter();
    tokio::time::sleep(duration)
}

/// Runs `future` for at most `duration` (as `tokio::time::timeout`).
#[allow(clippy::disallowed_methods)]
pub fn timeout<F: IntoFuture>(duration: Duration, future: F) -> Timeout<F::IntoFuture> {
    let _timers = timers().enter();
    tokio::time::timeout(duration, future)
}

/// Runs `future` until `deadline` at the latest (as `tokio::time::timeout_at`).
#[allow(clippy::disallowed_methods)]
pub fn timeout_at<F: IntoFuture>(deadline: Instant, future: F) -> Timeout<F::IntoFuture> {
    let _timers = timers().enter();
    tokio::time::timeout_at(deadline, future)
}

/// Ticks every `period`, the first time at `start` (as `tokio::time::interval_at`).
#[allow(clippy::disallowed_methods)]
pub fn interval_at(start: Instant, period: Duration) -> Interval {
    let _timers = timers().enter();
    tokio::time::interval_at(start, period)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The timers work from a runtime that has no time driver of its own, which is how the
    /// gateway runs.
    #[test]
    fn timers_fire_on_a_runtime_without_a_time_driver() {
        let runtime = crate::runtime(1).unwrap();
        runtime.block_on(async {
            let started = Instant::now();
            sleep(Duration::from_millis(20)).await;
            assert!(started.elapsed() >= Duration::from_millis(20));
            let late = timeout(Duration::from_millis(10), std::future::pending::<()>()).await;
            assert!(late.is_err(), "the timeout fired");
            let on_time = timeout_at(Instant::now() + Duration::from_secs(5), async { 7 }).await;
            assert_eq!(on_time.unwrap(), 7);
            let mut ticks = interval_at(Instant::now(), Duration::from_millis(5));
            for _ in 0..3 {
                ticks.tick().await;
            }
            assert!(started.elapsed() >= Duration::from_millis(30));
        });
    }

    /// Without this module, the same runtime refuses timers: the test above proves something.
    #[test]
    #[allow(clippy::disallowed_methods)]
    fn tokio_timers_panic_on_the_gateway_runtime() {
        let runtime = crate::runtime(1).unwrap();
        let made = runtime.block_on(async {
            std::panic::catch_unwind(|| drop(tokio::time::sleep(Duration::from_millis(1))))
        });
        assert!(made.is_err());
    }
}
