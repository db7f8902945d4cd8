//! Telling systemd how the gateway is doing, for `Type=notify` units: ready once its listeners
//! are bound, reloading, stopping, and the watchdog's keep-alive. Not started by systemd (no
//! `NOTIFY_SOCKET`), each call does nothing.

use sd_notify::NotifyState;

/// The gateway accepts clients (`READY=1`); `status` is what `systemctl status` shows.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A configuration reload has begun (`RELOADING=1`, with the time `Type=notify-reload` asks
/// for); [`ready`] says it is over.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// The gateway is shutting down (`STOPPING=1`), draining its sessions.
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("shutting down: closing sessions at their transaction boundaries"),
    ]);
}

/// Feeds systemd's watchdog (`WatchdogSec=`) at half its interval for as long as the runtime
/// it runs on gets to run it, so that a gateway whose runtime hangs is restarted. Returns at
/// once when no watchdog is asked for.
pub async fn feed_watchdog() {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    loop {
        send(&[NotifyState::Watchdog]);
        crate::clock::sleep(interval / 2).await;
    }
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "could not notify systemd (NOTIFY_SOCKET)");
    }
}
