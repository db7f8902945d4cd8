//! What the kernel knows or holds that neither the standard library nor tokio reaches (a TCP
//! connection's unacknowledged bytes, whether a process exists, the sockets systemd passed
//! in): the crate's one module with `unsafe` code (STYLE.md), each block saying why it is
//! sound.

use std::io;
use std::os::fd::AsFd;
#[cfg(target_os = "linux")]
use std::os::fd::AsRawFd;

/// Bytes written to a TCP socket that its peer has not acknowledged (Linux `SIOCOUTQ`: sent
/// and unacknowledged, or not sent yet). It keeps its value once the connection is reset
/// (checked with the kernel facts the failover relies on, in `session::relocate`'s tests).
#[cfg(target_os = "linux")]
pub fn unacknowledged(socket: &impl AsFd) -> io::Result<u64> {
    let fd = socket.as_fd();
    let mut n: libc::c_int = 0;
    // SAFETY: `fd` is borrowed, so it stays open for the call. `SIOCOUTQ` (the same number as
    // `TIOCOUTQ`, linux/sockios.h) writes one `int` through its argument, which points to `n`,
    // an `int` that lives across the call; it reads nothing else.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut n as *mut libc::c_int) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    u64::try_from(n).map_err(|_| io::Error::other(format!("SIOCOUTQ answered {n}")))
}

/// Bytes written to a TCP socket that its peer has not acknowledged: not known here.
#[cfg(not(target_os = "linux"))]
pub fn unacknowledged(_socket: &impl AsFd) -> io::Result<u64> {
    Err(io::ErrorKind::Unsupported.into())
}

/// Whether process `pid` exists, as PostgreSQL asks of a lock file's holder (`kill(pid, 0)`).
/// One this process may not signal (another user's) exists too: only `ESRCH` says it does not.
pub fn process_exists(pid: u32) -> bool {
    // 0 and values past i32::MAX are no process's ID (they would name a process group).
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 sends nothing and touches no memory; `kill` only reports whether `pid`
    // could be signalled.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// The listening sockets systemd passed to this process (socket activation: `LISTEN_FDS`
/// with `LISTEN_PID` naming this process), each with its name (`FileDescriptorName=`,
/// `LISTEN_FDNAMES`); none outside socket activation, and none after the first call.
pub fn activated_sockets() -> io::Result<Vec<(socket2::Socket, String)>> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::sync::atomic::{AtomicBool, Ordering};
    static TAKEN: AtomicBool = AtomicBool::new(false);
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(Vec::new());
    }
    let mut sockets = Vec::new();
    for (fd, name) in sd_notify::listen_fds_with_names()? {
        // SAFETY: systemd opens these descriptors for this process to own (sd_listen_fds(3):
        // LISTEN_PID is this process, they are 3 and up, LISTEN_FDS of them), and nothing
        // else in it takes them: this is the only place that does, once (`TAKEN`).
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        sockets.push((socket2::Socket::from(owned), name));
    }
    Ok(sockets)
}
