//! A network namespace joined to this host by a veth pair, for faults a loopback connection
//! cannot have: a peer that drops off the network without closing its connections.
//!
//! Programs started with [`NetNs::command`] run inside the namespace and reach this host at
//! [`NetNs::host_addr`] over the veth pair; [`NetNs::cut`] takes the link down, after which
//! their packets (FIN and RST included) no longer arrive and this host's are dropped. Needs
//! root (CAP_NET_ADMIN), as the suite does.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace with a veth link to the host, removed (with the link) on drop.
pub struct NetNs {
    name: String,
    inner_if: String,
    /// This host's end of the link.
    pub host_addr: Ipv4Addr,
    /// The namespace's end of the link.
    pub ns_addr: Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetNs {
    /// Creates the namespace and its link, both up. Panics, saying why, where that is not
    /// allowed (not root).
    pub fn create() -> Self {
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // Interface names have at most 15 bytes; the pid keeps concurrent runs apart.
        let tag = format!("{:x}{n}", pid % 0x10_0000);
        let octet = |v: u32| u8::try_from(v % 250).unwrap_or(0);
        let (b, c) = (octet(pid) + 1, octet(n) + 1);
        let this = Self {
            name: format!("ust{tag}"),
            inner_if: format!("ust{tag}n"),
            host_addr: Ipv4Addr::new(10, b, c, 1),
            ns_addr: Ipv4Addr::new(10, b, c, 2),
        };
        let host_if = format!("ust{tag}h");
        let host_cidr = format!("{}/30", this.host_addr);
        let ns_cidr = format!("{}/30", this.ns_addr);
        let _ = ip(&["netns", "del", &this.name]);
        let steps: [&[&str]; 7] = [
            &["netns", "add", &this.name],
            &[
                "link",
                "add",
                &host_if,
                "type",
                "veth",
                "peer",
                "name",
                &this.inner_if,
                "netns",
                &this.name,
            ],
            &["addr", "add", &host_cidr, "dev", &host_if],
            &["link", "set", &host_if, "up"],
            &[
                "-n",
                &this.name,
                "addr",
                "add",
                &ns_cidr,
                "dev",
                &this.inner_if,
            ],
            &["-n", &this.name, "link", "set", &this.inner_if, "up"],
            &["-n", &this.name, "link", "set", "lo", "up"],
        ];
        for step in steps {
            if let Err(e) = ip(step) {
                panic!("network namespace (the suite needs root for these tests): {e}");
            }
        }
        this
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd.kill_on_drop(true);
        cmd
    }

    /// Takes the link down: from now on nothing passes either way.
    pub fn cut(&self) {
        ip(&["-n", &self.name, "link", "set", &self.inner_if, "down"]).expect("link down");
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair with it.
        let _ = ip(&["netns", "del", &self.name]);
    }
}
