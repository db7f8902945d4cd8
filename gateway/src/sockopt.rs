//! What the kernel knows of a TCP connection that neither the standard library nor tokio
//! asks it: the crate's one module with `unsafe` code (STYLE.md), each block saying why it is
//! sound.

use std::io;
use std::os::fd::AsFd;
#[cfg(target_os = "linux")]
use std::os::fd::AsRawFd;

/// Bytes written to a TCP socket that its peer has not acknowledged (Linux `SIOCOUTQ`: sent
/// and unacknowledged, or not sent yet). It keeps its value once the connection is reset.
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    /// Waits for `cond`, for at most two seconds.
    fn until(mut cond: impl FnMut() -> bool) {
        for _ in 0..200 {
            if cond() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("not reached in 2 s");
    }

    /// Acknowledged bytes leave the count, bytes a peer that closed first never got stay in
    /// it after its reset.
    #[test]
    fn counts_what_the_peer_has_not_acknowledged() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        assert_eq!(unacknowledged(&client).unwrap(), 0);
        client.write_all(b"request").unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(server.read(&mut buf).unwrap(), 7);
        until(|| unacknowledged(&client).unwrap() == 0);
        drop(server);
        std::thread::sleep(Duration::from_millis(50));
        client.write_all(b"late").unwrap();
        // The closed socket answers with a reset; nothing of it is acknowledged.
        until(|| client.take_error().unwrap().is_some());
        assert_eq!(unacknowledged(&client).unwrap(), 4);
    }
}
