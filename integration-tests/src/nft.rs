//! TCP segments to or from one port of this host dropped with nftables, for faults that
//! depend on what arrives when: a segment dropped is sent again by its kernel later (a FIN
//! included), as on a network that lost it. Needs root (CAP_NET_ADMIN) and the `nft` program
//! (Debian: `apt-get install -y nftables`); panics saying so without them.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Which segments a [`Dropped`] drops.
#[derive(Debug, Clone, Copy)]
pub enum Direction {
    /// Those sent from the port (by the server listening there).
    From,
    /// Those sent to it.
    To,
}

/// An nftables table that drops the segments of one direction of a port, removed on drop.
pub struct Dropped {
    table: String,
}

impl Dropped {
    /// Starts dropping the TCP segments sent `direction` `port` on this host (loopback
    /// included: it filters where packets leave, whatever the interface).
    pub fn segments(direction: Direction, port: u16) -> Self {
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(remove_stale_tables);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let table = format!("understudy_{}_{n}", std::process::id());
        let field = match direction {
            Direction::From => "sport",
            Direction::To => "dport",
        };
        let script = format!(
            "table inet {table} {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n    tcp {field} {port} drop\n  }}\n}}\n"
        );
        let mut nft = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("nft (apt-get install -y nftables; the test needs it, and root): {e}")
            });
        nft.stdin
            .take()
            .expect("piped")
            .write_all(script.as_bytes())
            .expect("nft reads the table");
        let out = nft.wait_with_output().expect("nft ran");
        assert!(
            out.status.success(),
            "nft (the test needs root): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Self { table }
    }
}

impl Drop for Dropped {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .status();
    }
}

/// Removes the tables of test processes that died without removing theirs (killed, say): a
/// later run may be given the ports they drop.
fn remove_stale_tables() {
    let Ok(out) = Command::new("nft").args(["list", "tables"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "table inet understudy_<pid>_<n>"
        let Some(table) = line.strip_prefix("table inet ") else {
            continue;
        };
        let Some(pid) = table
            .strip_prefix("understudy_")
            .and_then(|rest| rest.split('_').next())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("nft")
                .args(["delete", "table", "inet", table])
                .status();
        }
    }
}
