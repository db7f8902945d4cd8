//! A local PostgreSQL primary and streaming hot standby, run from the server binaries installed on
//! this machine. `understudy demo` and the integration-test harness both build on it.
//!
//! Layout under [`ClusterOptions::base_dir`]:
//!
//! ```text
//! <base_dir>/<node>/data     data directory (owned by `postgres` when we run as root)
//! <base_dir>/<node>/socket   unix socket directory (control connections of this module)
//! <base_dir>/<node>.log      server log (the postmaster's stderr)
//! ```
//!
//! PostgreSQL refuses to run as root, so when we are root every server program runs as the
//! `postgres` system user (`setuid`/`setgid` in the child, like `runuser` without its extra
//! process, so the PID we hold is the postmaster's own). The postmaster is our child process: we
//! reap it ourselves, and its children are found through `/proc` (parent PID, or a working
//! directory equal to the data directory, which every postmaster child inherits).
//!
//! No `unsafe`: the effective uid and user entries come from `accounts`, and signals to
//! processes that are not our children go through `kill(1)`.
//!
//! Simulated crashes must not leak: dynamic shared memory lives in the data directory (`mmap`),
//! and the System V interlock segment of a SIGKILLed postmaster is removed once its processes are
//! gone. Throw-away clusters go to /dev/shm when it has room (see [`scratch_parent_dir`]).

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::io::AsyncReadExt;
use tokio_postgres::{Client, NoTls};
use tracing::{debug, info, warn};

// The OS user the server programs run as, when we are root.
use crate::accounts::User as RunAs;

/// How long a node may take to accept connections after its postmaster was spawned.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a fast or immediate shutdown may take.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the processes of a killed node may take to disappear.
const GONE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a new standby may take to stream, and a synchronous standby to be chosen.
const REPLICATION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a promotion may take.
const PROMOTE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound for initdb, pg_basebackup and cp.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound for the synchronous cleanup in `Drop`.
const DROP_TIMEOUT: Duration = Duration::from_secs(5);
/// Polling interval of every wait in this module.
const POLL: Duration = Duration::from_millis(20);

/// The bootstrap superuser (`initdb -U`), used for all control connections.
const SUPERUSER: &str = "postgres";
/// The system user that runs the servers when we are root.
const SERVER_OS_USER: &str = "postgres";
/// Settings of one node, included from its `postgresql.conf`.
const NODE_CONF: &str = "understudy.conf";
const INCLUDE_NODE_CONF: &str = "include 'understudy.conf'";
/// Bump when the way the template is made changes, so stale caches are rebuilt.
const TEMPLATE_FORMAT: &str = "understudy initdb template v1";
/// Lines of server log quoted in errors.
const LOG_TAIL_LINES: usize = 40;
/// Ports below the kernel's ephemeral range and above this are preferred (see [`free_port`]).
const LOWEST_PORT: u16 = 20_000;
/// `sizeof(sockaddr_un.sun_path)` on Linux, including the terminating NUL.
const UNIX_PATH_MAX: usize = 108;

/// Why a local cluster could not be created or driven.
#[derive(Debug, thiserror::Error)]
pub enum LocalClusterError {
    /// No directory with the PostgreSQL server binaries was found.
    #[error(
        "PostgreSQL server binaries (postgres, initdb, pg_basebackup) not found on $PATH, via \
         `pg_config --bindir` or in /usr/lib/postgresql/*/bin; install them (Debian/Ubuntu: \
         `apt-get install -y postgresql`) or put their directory on $PATH"
    )]
    BinariesNotFound,
    /// A file-system or process operation failed.
    #[error("{what}: {cause}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        cause: io::Error,
    },
    /// An external command exited unsuccessfully.
    #[error("`{command}` failed ({status}):\n{output}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// The tail of its stdout and stderr.
        output: String,
    },
    /// A node did not come up; carries the tail of its server log.
    #[error("PostgreSQL node {node} (port {port}) did not start: {reason}\n--- tail of {log} ---\n{log_tail}")]
    StartFailed {
        /// Node name.
        node: String,
        /// Its TCP port.
        port: u16,
        /// What went wrong.
        reason: String,
        /// Path of its log file.
        log: String,
        /// The last lines of that log.
        log_tail: String,
    },
    /// Something did not happen within its time bound.
    #[error("timed out after {}s waiting for {what}{detail}", .waited.as_secs())]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long we waited.
        waited: Duration,
        /// Extra context (a log tail, the processes left), may be empty.
        detail: String,
    },
    /// A control query or connection to a node failed.
    #[error("{what}: {}", describe_pg_error(.cause))]
    Postgres {
        /// What was being done.
        what: String,
        /// The client error.
        cause: tokio_postgres::Error,
    },
    /// The machine does not allow running a cluster (root without a `postgres` user, unreachable
    /// directories, no free port, ...).
    #[error("{0}")]
    Environment(String),
    /// The cluster or node is not in the state the operation needs.
    #[error("{0}")]
    State(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> LocalClusterError {
    let what = what.into();
    move |cause| LocalClusterError::Io { what, cause }
}

/// tokio-postgres' Display says only "db error" for server errors; the server's words matter.
fn describe_pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

fn pg_err(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> LocalClusterError {
    let what = what.into();
    move |cause| LocalClusterError::Postgres { what, cause }
}

/// Where the PostgreSQL server programs live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgBinaries {
    /// Directory holding `postgres`, `initdb` and `pg_basebackup`.
    pub bindir: PathBuf,
}

/// Programs a directory must hold to be usable.
const REQUIRED_PROGRAMS: [&str; 3] = ["postgres", "initdb", "pg_basebackup"];

impl PgBinaries {
    /// Finds the server binaries: $PATH, then `pg_config --bindir`, then the newest
    /// /usr/lib/postgresql/*/bin (and /usr/pgsql-*/bin, /usr/local/pgsql/bin).
    pub fn find() -> Result<Self, LocalClusterError> {
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                if dir.join("postgres").is_file() && dir.join("initdb").is_file() {
                    if let Some(found) = Self::complete_at(&dir) {
                        return Ok(found);
                    }
                }
            }
        }
        if let Ok(out) = std::process::Command::new("pg_config")
            .arg("--bindir")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
        {
            if out.status.success() {
                let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                if let Some(found) = Self::complete_at(&dir) {
                    return Ok(found);
                }
            }
        }
        for (parent, prefix) in [("/usr/lib/postgresql", ""), ("/usr", "pgsql-")] {
            let Ok(entries) = fs::read_dir(parent) else {
                continue;
            };
            let names = entries
                .flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .filter_map(|n| n.strip_prefix(prefix).map(str::to_owned))
                .collect();
            for version in newest_versions_first(names) {
                let dir = Path::new(parent)
                    .join(format!("{prefix}{version}"))
                    .join("bin");
                if let Some(found) = Self::complete_at(&dir) {
                    return Ok(found);
                }
            }
        }
        Self::complete_at(Path::new("/usr/local/pgsql/bin"))
            .ok_or(LocalClusterError::BinariesNotFound)
    }

    /// Uses the binaries in `bindir`, which must hold `postgres`, `initdb` and `pg_basebackup`.
    pub fn at(bindir: impl Into<PathBuf>) -> Result<Self, LocalClusterError> {
        Self::complete_at(&bindir.into()).ok_or(LocalClusterError::BinariesNotFound)
    }

    /// Full path of one program in [`PgBinaries::bindir`].
    pub fn program(&self, name: &str) -> PathBuf {
        self.bindir.join(name)
    }

    /// `postgres --version`, e.g. "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)".
    pub async fn version(&self) -> Result<String, LocalClusterError> {
        let mut cmd = server_command(&self.program("postgres"), None, &std::env::temp_dir());
        cmd.arg("--version");
        Ok(run_command(cmd, COMMAND_TIMEOUT).await?.trim().to_owned())
    }

    /// A directory with every required program; `/usr/local/bin/postgres` style symlinks are
    /// followed to the real bin directory, which also holds pg_basebackup.
    fn complete_at(dir: &Path) -> Option<Self> {
        let has_all = |d: &Path| REQUIRED_PROGRAMS.iter().all(|p| d.join(p).is_file());
        if let Some(real) = fs::canonicalize(dir.join("postgres"))
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
        {
            if has_all(&real) {
                return Some(Self { bindir: real });
            }
        }
        has_all(dir).then(|| Self {
            bindir: dir.to_path_buf(),
        })
    }
}

/// Version directory names ("15", "9.6", "16") sorted newest first; other names dropped.
fn newest_versions_first(names: Vec<String>) -> Vec<String> {
    let mut versions: Vec<(Vec<u32>, String)> = names
        .into_iter()
        .filter_map(|name| {
            let key = name
                .split('.')
                .map(|part| part.parse::<u32>().ok())
                .collect::<Option<Vec<u32>>>()?;
            Some((key, name))
        })
        .collect();
    versions.sort_by(|a, b| b.0.cmp(&a.0));
    versions.into_iter().map(|(_, name)| name).collect()
}

/// The major version in `postgres --version` output: "15" for 15.18, "9.6" for 9.6.24.
fn parse_major_version(version_output: &str) -> Option<String> {
    let number = version_output
        .split_whitespace()
        .find(|word| word.starts_with(|c: char| c.is_ascii_digit()))?;
    let mut parts = number.split(|c: char| !c.is_ascii_digit());
    let first: u32 = parts.next()?.parse().ok()?;
    if first >= 10 {
        Some(first.to_string())
    } else {
        let second: u32 = parts.next()?.parse().ok()?;
        Some(format!("{first}.{second}"))
    }
}

/// `Some(postgres user)` when we are root, since initdb and postgres refuse to run as root.
fn server_user(euid: u32) -> Result<Option<RunAs>, LocalClusterError> {
    if euid != 0 {
        return Ok(None);
    }
    crate::accounts::user_named(SERVER_OS_USER)
        .map_err(io_err("looking up the postgres user"))?
        .map(Some)
        .ok_or_else(|| {
            LocalClusterError::Environment(format!(
                "running as root, but PostgreSQL refuses to run as root and there is no \
             `{SERVER_OS_USER}` user to run it as (create one, e.g. \
             `useradd --system --home-dir /var/lib/postgresql {SERVER_OS_USER}`, or run as a \
             normal user)"
            ))
        })
}

/// Whether a directory with this mode and owner lets `user` traverse it.
fn mode_lets_through(mode: u32, owner: u32, group: u32, user: &RunAs) -> bool {
    mode & 0o001 != 0
        || (owner == user.uid && mode & 0o100 != 0)
        || (group == user.gid && mode & 0o010 != 0)
}

/// Fails with a clear message when the server user cannot reach `dir`.
fn check_reachable(dir: &Path, user: &RunAs) -> Result<(), LocalClusterError> {
    for ancestor in dir.ancestors() {
        let meta =
            fs::metadata(ancestor).map_err(io_err(format!("stat {}", ancestor.display())))?;
        if !mode_lets_through(meta.mode(), meta.uid(), meta.gid(), user) {
            return Err(LocalClusterError::Environment(format!(
                "the `{SERVER_OS_USER}` user cannot reach {}: {} has mode {:o}; use a directory \
                 under {} or `chmod o+x {}`",
                dir.display(),
                ancestor.display(),
                meta.mode() & 0o7777,
                std::env::temp_dir().display(),
                ancestor.display()
            )));
        }
    }
    Ok(())
}

fn chown_to(path: &Path, user: Option<&RunAs>) -> Result<(), LocalClusterError> {
    match user {
        Some(u) => std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid))
            .map_err(io_err(format!("chown {}", path.display()))),
        None => Ok(()),
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), LocalClusterError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(io_err(format!("chmod {mode:o} {}", path.display())))
}

/// Creates `path` with `mode`, owned by the server user.
fn create_owned_dir(path: &Path, mode: u32, user: Option<&RunAs>) -> Result<(), LocalClusterError> {
    fs::create_dir(path).map_err(io_err(format!("creating {}", path.display())))?;
    set_mode(path, mode)?;
    chown_to(path, user)
}

/// Writes a 0600 file owned by the server user.
fn write_owned_file(
    path: &Path,
    contents: &[u8],
    user: Option<&RunAs>,
) -> Result<(), LocalClusterError> {
    fs::write(path, contents).map_err(io_err(format!("writing {}", path.display())))?;
    set_mode(path, 0o600)?;
    chown_to(path, user)
}

fn remove_if_present(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            warn!(path = %path.display(), error = %e, "could not remove stale file");
        }
    }
}

/// `remove_dir_all`, retried briefly: files may still be closing when a node was just killed.
fn remove_tree(path: &Path) {
    for attempt in 0..5 {
        match fs::remove_dir_all(path) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) if attempt == 4 => {
                warn!(path = %path.display(), error = %e, "could not remove directory");
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A command for a PostgreSQL program: as the server user when we are root, without the
/// caller's PG* environment (PGDATA, PGPORT, ... would silently redirect initdb and
/// pg_basebackup).
fn server_command(program: &Path, user: Option<&RunAs>, cwd: &Path) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(&key);
        }
    }
    cmd.env("LC_ALL", "C").current_dir(cwd).stdin(Stdio::null());
    if let Some(u) = user {
        cmd.uid(u.uid)
            .gid(u.gid)
            .env("HOME", &u.home)
            .env("USER", SERVER_OS_USER)
            .env("LOGNAME", SERVER_OS_USER);
    }
    cmd
}

fn describe_command(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// How often a child process is asked whether it exited.
const CHILD_POLL: Duration = Duration::from_millis(10);

/// Waits for `child` to exit and reaps it.
///
/// Asked every [`CHILD_POLL`] rather than told by SIGCHLD: the gateway's runtime is built
/// without tokio's process driver, which would otherwise look for exited children at every
/// park of the data path.
async fn reap(child: &mut Child) -> io::Result<ExitStatus> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        crate::clock::sleep(CHILD_POLL).await;
    }
}

/// Waits up to `limit` for `child` to exit and reaps it; `None` if it still runs.
async fn wait_child(child: &mut Child, limit: Duration) -> Option<io::Result<ExitStatus>> {
    crate::clock::timeout(limit, reap(child)).await.ok()
}

/// A child process that is killed and reaped if its handle is dropped before it exited (a
/// command that timed out, or whose caller gave up).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            // SIGKILL cannot be ignored: the wait is short.
            let _ = self.0.wait();
        }
    }
}

/// Reads a child's pipe to its end without blocking the runtime.
async fn read_pipe(pipe: Option<impl Into<std::os::fd::OwnedFd>>) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    if let Some(pipe) = pipe {
        tokio::net::unix::pipe::Receiver::from_owned_fd(pipe.into())?
            .read_to_end(&mut bytes)
            .await?;
    }
    Ok(bytes)
}

/// Runs `child` to its end, collecting what it writes.
async fn collect_output(child: &mut Child) -> io::Result<Output> {
    let (stdout, stderr) = tokio::try_join!(
        read_pipe(child.stdout.take()),
        read_pipe(child.stderr.take())
    )?;
    // Both pipes are closed: the child exited or is about to (the caller bounds the wait).
    let status = reap(child).await?;
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Runs a command to completion within `limit`; its stdout on success, an error quoting its
/// output otherwise.
async fn run_command(mut cmd: Command, limit: Duration) -> Result<String, LocalClusterError> {
    let command = describe_command(&cmd);
    debug!(%command, "running");
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = KillOnDrop(
        cmd.spawn()
            .map_err(io_err(format!("starting `{command}`")))?,
    );
    // On timeout the child is killed and reaped (`KillOnDrop`).
    let out = crate::clock::timeout(limit, collect_output(&mut child.0))
        .await
        .map_err(|_| LocalClusterError::Timeout {
            what: format!("`{command}`"),
            waited: limit,
            detail: String::new(),
        })?
        .map_err(io_err(format!("waiting for `{command}`")))?;
    if !out.status.success() {
        let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
        output.push_str(&String::from_utf8_lossy(&out.stderr));
        return Err(LocalClusterError::Command {
            command,
            status: out.status.to_string(),
            output: last_lines(&output, LOG_TAIL_LINES),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The last `n` lines of `text`.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The last `n` lines of a file (reads at most its last 64 KiB).
fn file_tail(path: &Path, n: usize) -> String {
    let read = || -> io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => last_lines(&text, n),
        Err(e) => format!("(could not read {}: {e})", path.display()),
    }
}

/// Sends `signal` (a name such as "KILL") to every PID in one `kill(1)` call, so they die
/// within microseconds of each other. Best effort: PIDs already gone are ignored.
pub fn signal_processes(signal: &str, pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let program = ["/usr/bin/kill", "/bin/kill"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .unwrap_or("kill");
    let result = std::process::Command::new(program)
        .args(["-s", signal, "--"])
        .args(pids.iter().map(u32::to_string))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if let Err(e) = result {
        warn!(error = %e, ?pids, signal, "could not run kill(1)");
    }
}

/// The fields of `/proc/<pid>/stat` this module needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcStat {
    pid: u32,
    /// `R`, `S`, `D`, `Z` (zombie: dead, holds nothing but its PID), ...
    state: char,
    ppid: u32,
}

/// Parses a `/proc/<pid>/stat` line; the command name may itself contain spaces and parentheses,
/// so fields are read after the last `)`.
fn parse_proc_stat(line: &str) -> Option<ProcStat> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    let pid = line.get(..open)?.trim().parse().ok()?;
    let mut rest = line.get(close + 1..)?.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some(ProcStat { pid, state, ppid })
}

/// The target of a `/proc/<pid>/cwd` link, without the " (deleted)" the kernel appends once
/// the directory is gone.
fn strip_deleted(link: &Path) -> PathBuf {
    let text = link.to_string_lossy();
    PathBuf::from(text.strip_suffix(" (deleted)").unwrap_or(&text))
}

/// Live (non-zombie) processes of one node: its postmaster, the postmaster's children, and
/// anything whose working directory is the data directory (the postmaster chdirs there and every
/// child inherits it, so this still finds children after the postmaster died and they were
/// re-parented).
fn node_processes(data_dir: &Path, postmaster: Option<u32>) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    let mut pids = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Some(stat) = fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|s| parse_proc_stat(&s))
        else {
            continue;
        };
        if matches!(stat.state, 'Z' | 'X' | 'x') {
            continue;
        }
        let ours = postmaster.is_some_and(|pm| stat.pid == pm || stat.ppid == pm)
            || fs::read_link(entry.path().join("cwd"))
                .is_ok_and(|cwd| strip_deleted(&cwd) == data_dir);
        if ours {
            pids.push(pid);
        }
    }
    pids
}

/// The System V segment id in line 7 ("key id") of a `postmaster.pid`.
fn parse_pid_file_shmem_id(pid_file: &str) -> Option<u64> {
    pid_file
        .lines()
        .nth(6)?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The attach count (`nattch`) of segment `shmid` in the text of `/proc/sysvipc/shm`.
fn parse_sysv_attach_count(table: &str, shmid: u64) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1)?.parse::<u64>().ok()? != shmid {
            return None;
        }
        fields.get(6)?.parse().ok()
    })
}

/// Removes the small System V segment every postmaster keeps as an interlock. A clean shutdown
/// removes it, a SIGKILL does not, and a restart would only clean it up using `postmaster.pid`,
/// which we delete (or the whole data directory): without this every simulated crash leaks one.
fn release_shmem_segment(data_dir: &Path) {
    let Some(shmid) = fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()
        .and_then(|text| parse_pid_file_shmem_id(&text))
    else {
        return;
    };
    let unattached = fs::read_to_string("/proc/sysvipc/shm")
        .ok()
        .and_then(|table| parse_sysv_attach_count(&table, shmid))
        == Some(0);
    if !unattached {
        return;
    }
    let removed = std::process::Command::new("ipcrm")
        .args(["-m", &shmid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !removed.is_ok_and(|status| status.success()) {
        warn!(shmid, data_dir = %data_dir.display(), "could not remove a stale shared memory segment");
    }
}

/// Ports already handed out by [`free_port`] in this process.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A free TCP port on 127.0.0.1, never the same twice in one process.
///
/// Ports are drawn at random below the kernel's ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`): an ephemeral port (what binding port 0 gives) can
/// be taken by any outgoing connection before a node restarts on it after a simulated crash.
pub fn free_port() -> Result<u16, LocalClusterError> {
    let ephemeral_low = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| parse_port_range(&text))
        .map_or(32_768, |(low, _)| low);
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(port) = pick_port(
        LOWEST_PORT,
        ephemeral_low,
        &mut handed_out,
        &mut rand::thread_rng(),
        port_is_free,
    ) {
        return Ok(port);
    }
    for _ in 0..64 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(io_err("binding 127.0.0.1:0 to find a free port"))?;
        let port = listener
            .local_addr()
            .map_err(io_err("reading the address of a listener on 127.0.0.1:0"))?
            .port();
        if handed_out.insert(port) {
            return Ok(port);
        }
    }
    Err(LocalClusterError::Environment(
        "found no free TCP port on 127.0.0.1".to_owned(),
    ))
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// `(low, high)` from the text of `ip_local_port_range`.
fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut parts = text.split_whitespace();
    let low = parts.next()?.parse().ok()?;
    let high = parts.next()?.parse().ok()?;
    Some((low, high))
}

/// The first port in `low..high`, scanning round from a random start, that was not handed out
/// yet and is free now; records it. `None` when the range is too small to be worth it or full.
fn pick_port(
    low: u16,
    high: u16,
    handed_out: &mut BTreeSet<u16>,
    rng: &mut impl Rng,
    mut is_free: impl FnMut(u16) -> bool,
) -> Option<u16> {
    if high <= low.saturating_add(100) {
        return None;
    }
    let span = u32::from(high - low);
    let start = rng.gen_range(0..span);
    let port = (0..span)
        .filter_map(|offset| u16::try_from(u32::from(low) + (start + offset) % span).ok())
        .find(|port| !handed_out.contains(port) && is_free(*port))?;
    handed_out.insert(port);
    Some(port)
}

/// A value for a `postgresql.conf` line, quoted.
fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// A value for a libpq `key=value` connection string, quoted when needed.
fn conn_value(value: &str) -> String {
    if !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\')
    {
        value.to_owned()
    } else {
        format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
    }
}

/// How to build a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterOptions {
    /// Everything lives under here; must be absent or empty, and is deleted on shutdown.
    pub base_dir: PathBuf,
    /// `max_connections` of every node.
    pub max_connections: u32,
    /// Synchronous replication: `synchronous_standby_names = '*'`, set once the standby streams.
    pub synchronous: bool,
    /// Whether to create a streaming hot standby.
    pub with_standby: bool,
    /// Lines appended to every node's configuration (they win over the defaults).
    pub extra_conf: Vec<String>,
    /// `pg_hba.conf` lines put before the defaults.
    pub hba: Vec<String>,
    /// Server certificate and key PEM files: `ssl = on` with them.
    pub ssl: Option<(PathBuf, PathBuf)>,
    /// CA certificates (PEM) for client certificates (`ssl_ca_file`), with `ssl`.
    pub ssl_ca: Option<PathBuf>,
}

impl ClusterOptions {
    /// Defaults in `base_dir`: 100 connections, asynchronous replication, with a standby.
    pub fn new(base_dir: impl Into<PathBuf>) -> Self {
        Self {
            base_dir: base_dir.into(),
            max_connections: 100,
            synchronous: false,
            with_standby: true,
            extra_conf: Vec::new(),
            hba: Vec::new(),
            ssl: None,
            ssl_ca: None,
        }
    }

    /// Defaults in a fresh directory under [`scratch_parent_dir`].
    pub fn in_temp_dir() -> Self {
        Self::new(scratch_parent_dir().join(format!(
            "understudy-cluster-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        )))
    }
}

/// Free space /dev/shm must have to be preferred over the temp directory.
const MIN_SHM_FREE_KIB: u64 = 2 * 1024 * 1024;

/// Where throw-away clusters go: `$UNDERSTUDY_CLUSTER_DIR` if set, else /dev/shm when it has at
/// least 2 GiB free, else the system temp directory. A data directory is ~1000 files, and on
/// disk-backed file systems of small VMs creating one costs around a millisecond (measured: a
/// cluster with a standby takes 0.4 s on tmpfs, 2.4 s on ext4).
pub fn scratch_parent_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("UNDERSTUDY_CLUSTER_DIR") {
        return PathBuf::from(dir);
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        let free = std::process::Command::new("df")
            .args(["-Pk", "/dev/shm"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()
            .and_then(|out| parse_df_available_kib(&String::from_utf8_lossy(&out.stdout)));
        if free.is_some_and(|kib| kib >= MIN_SHM_FREE_KIB) {
            return shm.to_path_buf();
        }
    }
    std::env::temp_dir()
}

/// The "Available" column (KiB) of `df -Pk PATH` output.
fn parse_df_available_kib(output: &str) -> Option<u64> {
    output
        .lines()
        .nth(1)?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

/// The node's own settings (`understudy.conf`).
///
/// `dynamic_shared_memory_type = mmap` keeps dynamic shared memory in the data directory: the
/// default (posix) leaves a /dev/shm/PostgreSQL.* file behind for every SIGKILLed postmaster.
/// `wal_retrieve_retry_interval` is short so a standby reconnects (and notices a promotion
/// request) quickly instead of sleeping 5 s after its primary died. `wal_receiver_timeout` is
/// 5 s so the standby pings a silent primary after 2.5 s: a failover gateway counts a standby's
/// silence as a witness only past that ping (plus `failover.standby_silence_ms`).
fn render_node_conf(opts: &ClusterOptions, node: &LocalNode) -> String {
    let mut conf = format!(
        "# Written by understudy's local_cluster for node {name}.\n\
         listen_addresses = '127.0.0.1'\n\
         port = {port}\n\
         unix_socket_directories = {socket}\n\
         cluster_name = {name_q}\n\
         max_connections = {max_connections}\n\
         wal_level = replica\n\
         max_wal_senders = 10\n\
         max_replication_slots = 10\n\
         wal_keep_size = '256MB'\n\
         hot_standby = on\n\
         hot_standby_feedback = on\n\
         wal_retrieve_retry_interval = '200ms'\n\
         wal_receiver_timeout = '5s'\n\
         dynamic_shared_memory_type = mmap\n\
         password_encryption = 'scram-sha-256'\n\
         fsync = off\n\
         synchronous_commit = on\n\
         logging_collector = off\n\
         log_destination = 'stderr'\n\
         log_line_prefix = '%m [%p] %q%u@%d '\n",
        name = node.name,
        port = node.port,
        socket = conf_quote(&node.socket_dir.to_string_lossy()),
        name_q = conf_quote(&node.name),
        max_connections = opts.max_connections,
    );
    if opts.ssl.is_some() {
        conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        if opts.ssl_ca.is_some() {
            conf.push_str("ssl_ca_file = 'root.crt'\n");
        }
    }
    for line in &opts.extra_conf {
        conf.push_str(line);
        conf.push('\n');
    }
    conf
}

/// `pg_hba.conf`: our control channel (superuser over the node's unix socket, which nothing else
/// uses) first so `opts.hba` can never lock this module out, then `opts.hba`, then the defaults.
fn render_hba(opts: &ClusterOptions) -> String {
    let mut hba = String::from(
        "# Written by understudy's local_cluster.\n\
         local all postgres trust\n",
    );
    for line in &opts.hba {
        hba.push_str(line);
        hba.push('\n');
    }
    hba.push_str(
        "local all all trust\n\
         host all postgres 127.0.0.1/32 trust\n\
         host replication all 127.0.0.1/32 trust\n\
         host all all 127.0.0.1/32 scram-sha-256\n",
    );
    hba
}

/// Writes a node's configuration into its (populated) data directory.
fn write_node_files(opts: &ClusterOptions, node: &LocalNode) -> Result<(), LocalClusterError> {
    let user = node.run_as.as_ref();
    let main_conf = node.data_dir.join("postgresql.conf");
    let text = fs::read_to_string(&main_conf)
        .map_err(io_err(format!("reading {}", main_conf.display())))?;
    // pg_basebackup copies the include line (and a stale understudy.conf, overwritten below).
    if !text.lines().any(|l| l.trim() == INCLUDE_NODE_CONF) {
        let mut file = OpenOptions::new()
            .append(true)
            .open(&main_conf)
            .map_err(io_err(format!("opening {}", main_conf.display())))?;
        writeln!(file, "\n{INCLUDE_NODE_CONF}")
            .map_err(io_err(format!("appending to {}", main_conf.display())))?;
    }
    if let Some((cert, key)) = &opts.ssl {
        let ca = opts.ssl_ca.iter().map(|ca| (ca, "root.crt"));
        for (source, name) in [(cert, "server.crt"), (key, "server.key")]
            .into_iter()
            .chain(ca)
        {
            let pem = fs::read(source).map_err(io_err(format!("reading {}", source.display())))?;
            write_owned_file(&node.data_dir.join(name), &pem, user)?;
        }
    }
    write_owned_file(
        &node.data_dir.join(NODE_CONF),
        render_node_conf(opts, node).as_bytes(),
        user,
    )?;
    write_owned_file(
        &node.data_dir.join("pg_hba.conf"),
        render_hba(opts).as_bytes(),
        user,
    )
}

/// The initdb'ed data directory every primary is copied from, created once per PostgreSQL major
/// version and invoking user (initdb takes about a second; a copy takes a fraction of that).
async fn ensure_template(
    bins: &PgBinaries,
    euid: u32,
    user: Option<&RunAs>,
) -> Result<PathBuf, LocalClusterError> {
    // One initdb at a time within this process; other processes are handled by the atomic rename.
    static TEMPLATE_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _guard = TEMPLATE_LOCK.lock().await;

    let version = bins.version().await?;
    let major = parse_major_version(&version).ok_or_else(|| {
        LocalClusterError::Environment(format!(
            "cannot read a version in `postgres --version` output {version:?}"
        ))
    })?;
    let temp = std::env::temp_dir();
    let name = format!("understudy-initdb-template-{major}-{euid}");
    let dir = temp.join(&name);
    let marker = format!("{TEMPLATE_FORMAT}\n{version}\n{}\n", bins.bindir.display());
    let usable = |dir: &Path| {
        fs::read_to_string(dir.join("FORMAT")).is_ok_and(|m| m == marker)
            && dir.join("data/PG_VERSION").is_file()
    };
    if usable(&dir) {
        return Ok(dir);
    }
    // Other processes (nextest runs one per test) wait for the one that holds the lock instead of
    // all running initdb at once on a cold machine.
    let _lock = TemplateLock::acquire(&temp.join(format!("{name}.lock")), || usable(&dir)).await?;
    if usable(&dir) {
        return Ok(dir);
    }
    let unique = || format!("{}-{:016x}", std::process::id(), rand::random::<u64>());
    if dir.exists() {
        // Made by another version of this module or other binaries: move it aside, then delete.
        let stale = temp.join(format!("{name}.stale-{}", unique()));
        if fs::rename(&dir, &stale).is_ok() {
            remove_tree(&stale);
        }
    }
    if let Some(u) = user {
        check_reachable(&temp, u)?;
    }
    let tmp = temp.join(format!("{name}.tmp-{}", unique()));
    let result = async {
        fs::create_dir(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
        set_mode(&tmp, 0o755)?;
        let data = tmp.join("data");
        create_owned_dir(&data, 0o700, user)?;
        let started = Instant::now();
        let mut initdb = server_command(&bins.program("initdb"), user, &tmp);
        initdb
            .arg("-D")
            .arg(&data)
            .args(["--auth=trust", "-U", SUPERUSER, "--encoding=UTF8", "--no-locale", "--no-sync"]);
        run_command(initdb, COMMAND_TIMEOUT).await?;
        fs::write(tmp.join("FORMAT"), &marker).map_err(io_err(format!("writing {}/FORMAT", tmp.display())))?;
        info!(template = %dir.display(), elapsed_ms = started.elapsed().as_millis() as u64, "initdb template created");
        Ok::<(), LocalClusterError>(())
    }
    .await;
    if let Err(e) = result {
        remove_tree(&tmp);
        return Err(e);
    }
    if let Err(e) = fs::rename(&tmp, &dir) {
        remove_tree(&tmp);
        // Another process won the race: use its template.
        if !usable(&dir) {
            return Err(LocalClusterError::Io {
                what: format!("renaming {} to {}", tmp.display(), dir.display()),
                cause: e,
            });
        }
    }
    Ok(dir)
}

/// A lock directory (mkdir is atomic) held while a template is built; removed on drop.
struct TemplateLock {
    path: PathBuf,
}

impl TemplateLock {
    /// Takes the lock, or waits until `done()` (another process finished the work: returns
    /// without the lock being needed, but still holding it is harmless) or the holder looks dead
    /// (lock older than the initdb time bound).
    async fn acquire(path: &Path, done: impl Fn() -> bool) -> Result<Self, LocalClusterError> {
        let started = Instant::now();
        loop {
            match fs::create_dir(path) {
                Ok(()) => {
                    return Ok(Self {
                        path: path.to_path_buf(),
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(LocalClusterError::Io {
                        what: format!("creating lock directory {}", path.display()),
                        cause: e,
                    })
                }
            }
            if done() {
                return Ok(Self {
                    path: PathBuf::new(),
                });
            }
            let age = fs::metadata(path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|modified| modified.elapsed().ok());
            if age.is_some_and(|age| age > COMMAND_TIMEOUT) {
                warn!(lock = %path.display(), "removing a stale initdb template lock");
                let _ = fs::remove_dir(path);
                continue;
            }
            if started.elapsed() > COMMAND_TIMEOUT * 2 {
                return Err(LocalClusterError::Timeout {
                    what: format!(
                        "another process to build the initdb template ({})",
                        path.display()
                    ),
                    waited: COMMAND_TIMEOUT * 2,
                    detail: String::new(),
                });
            }
            crate::clock::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for TemplateLock {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_dir(&self.path);
        }
    }
}

/// One PostgreSQL server (postmaster) of a local cluster.
#[derive(Debug)]
pub struct LocalNode {
    name: String,
    port: u16,
    node_dir: PathBuf,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    /// The socket directory lives under the temp dir (the base dir was too long for a socket
    /// path) and is removed with the node.
    socket_dir_outside: bool,
    log_path: PathBuf,
    bins: PgBinaries,
    run_as: Option<RunAs>,
    postmaster: Option<Child>,
    /// Set when a postmaster was spawned, cleared once none of the node's processes remain.
    may_have_processes: bool,
}

impl LocalNode {
    /// A node named `name` under `base_dir` (creates its directory and socket directory).
    fn new(
        name: &str,
        port: u16,
        base_dir: &Path,
        bins: &PgBinaries,
        run_as: Option<RunAs>,
    ) -> Result<Self, LocalClusterError> {
        let node_dir = base_dir.join(name);
        fs::create_dir(&node_dir).map_err(io_err(format!("creating {}", node_dir.display())))?;
        set_mode(&node_dir, 0o755)?;
        let mut socket_dir = node_dir.join("socket");
        let socket_name_len = format!("/.s.PGSQL.{port}").len() + 1;
        let socket_dir_outside = socket_dir.as_os_str().len() + socket_name_len > UNIX_PATH_MAX;
        if socket_dir_outside {
            socket_dir = std::env::temp_dir().join(format!(
                "understudy-sock-{}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            ));
        }
        create_owned_dir(&socket_dir, 0o755, run_as.as_ref())?;
        Ok(Self {
            name: name.to_owned(),
            port,
            data_dir: node_dir.join("data"),
            node_dir,
            socket_dir,
            socket_dir_outside,
            log_path: base_dir.join(format!("{name}.log")),
            bins: bins.clone(),
            run_as,
            postmaster: None,
            may_have_processes: false,
        })
    }

    /// The node's name ("node1", "node2", ...), also its `cluster_name` and replication
    /// `application_name`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// TCP address, 127.0.0.1:port.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// Data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Unix socket directory.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// Server log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        file_tail(&self.log_path, lines)
    }

    /// libpq connection string over TCP: `host=127.0.0.1 port=.. user=.. dbname=..`.
    pub fn conn_string(&self, user: &str, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={} dbname={}",
            self.port,
            conn_value(user),
            conn_value(dbname)
        )
    }

    /// PID of the running postmaster, `None` when not started, stopped, or killed and reaped.
    pub fn postmaster_pid(&self) -> Option<u32> {
        self.postmaster.as_ref().map(Child::id)
    }

    /// Live server processes of this node other than the postmaster (backends, auxiliaries).
    pub fn server_processes(&self) -> Vec<u32> {
        let postmaster = self.postmaster_pid();
        let mut pids = node_processes(&self.data_dir, postmaster);
        pids.retain(|&pid| Some(pid) != postmaster);
        pids
    }

    /// Whether the postmaster is alive, without reaping it: an exited postmaster stays a zombie
    /// (and `/proc/<pid>` stays) until [`LocalNode::is_running`] or a `kill_*`/`stop` reaps it.
    pub fn postmaster_alive(&self) -> bool {
        self.postmaster_pid().is_some_and(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|line| parse_proc_stat(&line))
                .is_some_and(|stat| !matches!(stat.state, 'Z' | 'X' | 'x'))
        })
    }

    /// Whether the postmaster process is alive (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        match self.postmaster.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.postmaster = None;
                false
            }
            None => false,
        }
    }

    /// Starts the postmaster (a no-op when it runs) and waits until it accepts connections.
    ///
    /// Leftovers of a killed incarnation are awaited and stale lock files removed first.
    pub async fn start(&mut self) -> Result<(), LocalClusterError> {
        if self.is_running() {
            return Ok(());
        }
        self.wait_gone().await?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(io_err(format!("opening {}", self.log_path.display())))?;
        let log_err = log
            .try_clone()
            .map_err(io_err("duplicating the log file handle"))?;
        let mut cmd = server_command(
            &self.bins.program("postgres"),
            self.run_as.as_ref(),
            &self.node_dir,
        );
        cmd.arg("-D")
            .arg(&self.data_dir)
            .stdout(log)
            .stderr(log_err);
        let started = Instant::now();
        let child = cmd
            .spawn()
            .map_err(io_err(format!("starting {}", describe_command(&cmd))))?;
        self.postmaster = Some(child);
        self.may_have_processes = true;
        loop {
            if let Some(Ok(Some(status))) = self.postmaster.as_mut().map(Child::try_wait) {
                self.postmaster = None;
                return Err(self.start_failed(format!("postgres exited with {status}")));
            }
            match self.control_client().await {
                Ok(_) => break,
                Err(e) if started.elapsed() >= START_TIMEOUT => {
                    self.kill_all().await;
                    return Err(self.start_failed(format!(
                        "not accepting connections after {}s (last attempt: {e})",
                        START_TIMEOUT.as_secs()
                    )));
                }
                Err(_) => crate::clock::sleep(POLL).await,
            }
        }
        info!(node = %self.name, port = self.port, pid = ?self.postmaster_pid(),
              elapsed_ms = started.elapsed().as_millis() as u64, "PostgreSQL node started");
        Ok(())
    }

    fn start_failed(&self, reason: String) -> LocalClusterError {
        LocalClusterError::StartFailed {
            node: self.name.clone(),
            port: self.port,
            reason,
            log: self.log_path.display().to_string(),
            log_tail: self.log_tail(LOG_TAIL_LINES),
        }
    }

    /// Fast shutdown (SIGINT: sessions are terminated, a shutdown checkpoint is written).
    pub async fn stop(&mut self) -> Result<(), LocalClusterError> {
        self.shutdown_with("INT", "fast shutdown").await
    }

    /// Immediate shutdown (SIGQUIT: no checkpoint, crash recovery at the next start).
    pub async fn stop_immediate(&mut self) -> Result<(), LocalClusterError> {
        self.shutdown_with("QUIT", "immediate shutdown").await
    }

    async fn shutdown_with(&mut self, signal: &str, what: &str) -> Result<(), LocalClusterError> {
        if let Some(pid) = self.postmaster_pid() {
            signal_processes(signal, &[pid]);
            if let Some(child) = self.postmaster.as_mut() {
                match wait_child(child, STOP_TIMEOUT).await {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        warn!(node = %self.name, error = %e, "waiting for the postmaster failed")
                    }
                    None => {
                        self.kill_all().await;
                        return Err(LocalClusterError::Timeout {
                            what: format!("{what} of node {}", self.name),
                            waited: STOP_TIMEOUT,
                            detail: format!("; killed it\n{}", self.log_tail(LOG_TAIL_LINES)),
                        });
                    }
                }
            }
            self.postmaster = None;
            debug!(node = %self.name, what, "PostgreSQL node stopped");
        }
        self.wait_gone().await
    }

    /// SIGKILLs the postmaster only (its children notice and exit on their own) and reaps it.
    pub async fn kill_postmaster(&mut self) {
        self.reap_postmaster().await;
    }

    /// SIGKILLs the postmaster and all its children at once, like a host crash, and reaps the
    /// postmaster.
    pub async fn kill_all(&mut self) {
        let postmaster = self.postmaster_pid();
        signal_processes("KILL", &node_processes(&self.data_dir, postmaster));
        // A backend forked between the scan and the signal.
        signal_processes("KILL", &node_processes(&self.data_dir, postmaster));
        self.reap_postmaster().await;
    }

    /// SIGKILLs the postmaster (if not dead yet) and reaps it.
    async fn reap_postmaster(&mut self) {
        if let Some(child) = self.postmaster.as_mut() {
            if let Err(e) = child.kill() {
                debug!(node = %self.name, error = %e, "postmaster already exited");
            }
            if wait_child(child, STOP_TIMEOUT).await.is_none() {
                warn!(node = %self.name, "killed postmaster was not reaped in time");
                return;
            }
        }
        self.postmaster = None;
    }

    /// Waits until no process of this node remains (zombies count as gone), then removes the
    /// stale `postmaster.pid` and socket lock files, whose PIDs could otherwise make a restart on
    /// the same port believe an old postmaster still runs. Use after the `kill_*` methods.
    pub async fn wait_gone(&mut self) -> Result<(), LocalClusterError> {
        let started = Instant::now();
        loop {
            let running = self.is_running();
            let left = node_processes(&self.data_dir, self.postmaster_pid());
            if !running && left.is_empty() {
                self.remove_stale_files();
                self.may_have_processes = false;
                return Ok(());
            }
            if started.elapsed() >= GONE_TIMEOUT {
                return Err(LocalClusterError::Timeout {
                    what: format!("the processes of node {} to exit", self.name),
                    waited: GONE_TIMEOUT,
                    detail: format!("; still running: {left:?} (postmaster running: {running})"),
                });
            }
            crate::clock::sleep(POLL).await;
        }
    }

    /// Removes what a killed postmaster leaves: its System V interlock segment, `postmaster.pid`
    /// and the socket lock file. Only call when no process of the node remains.
    fn remove_stale_files(&self) {
        release_shmem_segment(&self.data_dir);
        remove_if_present(&self.data_dir.join("postmaster.pid"));
        remove_if_present(&self.socket_dir.join(format!(".s.PGSQL.{}.lock", self.port)));
        remove_if_present(&self.socket_dir.join(format!(".s.PGSQL.{}", self.port)));
    }

    /// Promotes a standby (`pg_promote()`) and waits until `pg_is_in_recovery()` is false; a
    /// no-op on a primary.
    pub async fn promote(&self) -> Result<(), LocalClusterError> {
        let client = self.control_client().await?;
        if !in_recovery(&client, &self.name).await? {
            return Ok(());
        }
        let started = Instant::now();
        // pg_promote(true) polls for the end of recovery every 100 ms; polling ourselves is faster.
        client
            .simple_query("SELECT pg_promote(false)")
            .await
            .map_err(pg_err(format!("pg_promote() on node {}", self.name)))?;
        while in_recovery(&client, &self.name).await? {
            if started.elapsed() >= PROMOTE_TIMEOUT {
                return Err(LocalClusterError::Timeout {
                    what: format!("node {} to leave recovery after pg_promote()", self.name),
                    waited: PROMOTE_TIMEOUT,
                    detail: format!("\n{}", self.log_tail(LOG_TAIL_LINES)),
                });
            }
            crate::clock::sleep(POLL).await;
        }
        info!(node = %self.name, elapsed_ms = started.elapsed().as_millis() as u64, "node promoted");
        Ok(())
    }

    /// `pg_is_in_recovery()`: true on a standby.
    pub async fn is_in_recovery(&self) -> Result<bool, LocalClusterError> {
        in_recovery(&self.control_client().await?, &self.name).await
    }

    /// A tokio-postgres client over TCP (127.0.0.1) as `user` to `dbname`, without TLS; its
    /// connection task is spawned.
    pub async fn client(&self, user: &str, dbname: &str) -> Result<Client, LocalClusterError> {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .user(user)
            .dbname(dbname);
        connect(
            &config,
            format!("connecting to node {} as {user}", self.name),
        )
        .await
    }

    /// A superuser client over the node's unix socket, which `ClusterOptions::hba` cannot lock out.
    async fn control_client(&self) -> Result<Client, LocalClusterError> {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&self.socket_dir)
            .port(self.port)
            .user(SUPERUSER)
            .dbname("postgres")
            .application_name("understudy-local-cluster");
        connect(&config, format!("control connection to node {}", self.name)).await
    }

    /// Synchronous best-effort kill for `Drop`: SIGKILL every process, reap the postmaster.
    fn kill_now(&mut self) {
        if !self.may_have_processes {
            return;
        }
        signal_processes(
            "KILL",
            &node_processes(&self.data_dir, self.postmaster_pid()),
        );
        if let Some(child) = self.postmaster.as_mut() {
            let _ = child.kill();
            let started = Instant::now();
            while matches!(child.try_wait(), Ok(None)) && started.elapsed() < DROP_TIMEOUT {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        // A child still unreaped stays a zombie until this process exits.
        self.postmaster = None;
        self.may_have_processes = false;
    }

    /// Removes the node's files (data, socket and log); its processes must be gone.
    fn remove_files(&self) {
        remove_tree(&self.node_dir);
        remove_if_present(&self.log_path);
        if self.socket_dir_outside {
            remove_tree(&self.socket_dir);
        }
    }
}

impl Drop for LocalNode {
    fn drop(&mut self) {
        self.kill_now();
        if self.socket_dir_outside {
            remove_tree(&self.socket_dir);
        }
    }
}

async fn connect(
    config: &tokio_postgres::Config,
    what: String,
) -> Result<Client, LocalClusterError> {
    const LIMIT: Duration = Duration::from_secs(5);
    let Ok(connected) = crate::clock::timeout(LIMIT, config.connect(NoTls)).await else {
        return Err(LocalClusterError::Timeout {
            what,
            waited: LIMIT,
            detail: String::new(),
        });
    };
    let (client, connection) = connected.map_err(pg_err(what))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(error = %e, "local cluster connection ended");
        }
    });
    Ok(client)
}

async fn in_recovery(client: &Client, node: &str) -> Result<bool, LocalClusterError> {
    let row = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .map_err(pg_err(format!("pg_is_in_recovery() on node {node}")))?;
    row.try_get(0).map_err(pg_err(format!(
        "reading pg_is_in_recovery() of node {node}"
    )))
}

/// A local primary and (optionally) a streaming hot standby.
#[derive(Debug)]
pub struct LocalCluster {
    /// The node that accepts writes.
    pub primary: LocalNode,
    /// The streaming hot standby, if any.
    pub standby: Option<LocalNode>,
    bins: PgBinaries,
    opts: ClusterOptions,
    run_as: Option<RunAs>,
    next_node: u32,
    /// `shutdown` already cleaned everything up.
    torn_down: bool,
}

impl LocalCluster {
    /// Creates and starts a primary (a copy of a cached initdb template) and, if asked, a
    /// standby streaming from it.
    pub async fn create(
        bins: &PgBinaries,
        mut opts: ClusterOptions,
    ) -> Result<Self, LocalClusterError> {
        let started = Instant::now();
        let euid = crate::accounts::effective_uid();
        let run_as = server_user(euid)?;
        opts.base_dir = prepare_base_dir(&opts.base_dir, run_as.as_ref())?;
        let primary = match free_port()
            .and_then(|port| LocalNode::new("node1", port, &opts.base_dir, bins, run_as.clone()))
        {
            Ok(node) => node,
            Err(e) => {
                remove_tree(&opts.base_dir);
                return Err(e);
            }
        };
        // From here on, Drop cleans up whatever a failing step leaves behind.
        let mut cluster = Self {
            primary,
            standby: None,
            bins: bins.clone(),
            opts,
            run_as,
            next_node: 2,
            torn_down: false,
        };
        let template = ensure_template(bins, euid, cluster.run_as.as_ref()).await?;
        let mut copy = Command::new("cp");
        copy.arg("-a")
            .arg(template.join("data"))
            .arg(&cluster.primary.data_dir);
        run_command(copy, COMMAND_TIMEOUT).await?;
        write_node_files(&cluster.opts, &cluster.primary)?;
        cluster.primary.start().await?;
        if cluster.opts.with_standby {
            let name = cluster.next_name();
            let standby = cluster.add_standby(free_port()?, name).await?;
            cluster.standby = Some(standby);
            if cluster.opts.synchronous {
                cluster.enable_synchronous().await?;
            }
        }
        info!(base_dir = %cluster.opts.base_dir.display(), primary_port = cluster.primary.port,
              standby_port = ?cluster.standby.as_ref().map(LocalNode::port),
              elapsed_ms = started.elapsed().as_millis() as u64, "local PostgreSQL cluster ready");
        Ok(cluster)
    }

    /// After a failover: the promoted standby becomes [`LocalCluster::primary`], the old primary
    /// is killed (if anything of it still runs) and deleted, and a new standby is
    /// pg_basebackup'ed from the new primary on the old primary's port and under its name (so
    /// in its socket directory), so a gateway configured with both stays valid across any
    /// number of failovers, whether it names them by port or by socket.
    pub async fn reseed_standby(&mut self) -> Result<(), LocalClusterError> {
        let Some(standby) = self.standby.as_ref() else {
            return Err(LocalClusterError::State(
                "reseed_standby: the cluster has no standby".to_owned(),
            ));
        };
        if standby.is_in_recovery().await? {
            return Err(LocalClusterError::State(format!(
                "reseed_standby: node {} is still a standby; promote it first",
                standby.name
            )));
        }
        let Some(new_primary) = self.standby.take() else {
            return Err(LocalClusterError::State(
                "reseed_standby: standby vanished".to_owned(),
            ));
        };
        let mut old = std::mem::replace(&mut self.primary, new_primary);
        // Fenced for good: a second primary must never come back.
        old.kill_all().await;
        old.wait_gone().await?;
        old.remove_files();
        let port = if port_is_free(old.port) {
            old.port
        } else {
            free_port()?
        };
        // The old primary's name too, so its socket directory is the new standby's.
        let name = old.name.clone();
        drop(old);
        let standby = self.add_standby(port, name).await?;
        self.standby = Some(standby);
        if self.opts.synchronous {
            self.enable_synchronous().await?;
        }
        Ok(())
    }

    /// The primary, then the standby if there is one.
    pub fn nodes(&self) -> impl Iterator<Item = &LocalNode> {
        std::iter::once(&self.primary).chain(self.standby.as_ref())
    }

    /// The directory everything lives in (canonical path).
    pub fn base_dir(&self) -> &Path {
        &self.opts.base_dir
    }

    /// The options the cluster was created with.
    pub fn options(&self) -> &ClusterOptions {
        &self.opts
    }

    /// Waits until the standby has replayed all WAL the primary has written so far, so a row
    /// just committed on the primary is visible there.
    pub async fn wait_standby_caught_up(&self) -> Result<(), LocalClusterError> {
        let Some(standby) = self.standby.as_ref() else {
            return Err(LocalClusterError::State(
                "the cluster has no standby".to_owned(),
            ));
        };
        let primary = self.primary.control_client().await?;
        let row = primary
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .map_err(pg_err("pg_current_wal_lsn() on the primary"))?;
        let target: String = row
            .try_get(0)
            .map_err(pg_err("reading pg_current_wal_lsn()"))?;
        let client = standby.control_client().await?;
        let started = Instant::now();
        loop {
            let row = client
                .query_one(
                    "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)",
                    &[&target],
                )
                .await
                .map_err(pg_err(format!(
                    "pg_last_wal_replay_lsn() on node {}",
                    standby.name
                )))?;
            if row
                .try_get::<_, bool>(0)
                .map_err(pg_err("reading the replay position"))?
            {
                return Ok(());
            }
            if started.elapsed() >= REPLICATION_TIMEOUT {
                return Err(LocalClusterError::Timeout {
                    what: format!("node {} to replay up to {target}", standby.name),
                    waited: REPLICATION_TIMEOUT,
                    detail: format!("\n{}", standby.log_tail(LOG_TAIL_LINES)),
                });
            }
            crate::clock::sleep(POLL).await;
        }
    }

    /// Immediate shutdown of every node, then removal of the base directory. Best effort:
    /// failures are logged.
    pub async fn shutdown(&mut self) {
        let nodes = self
            .standby
            .iter_mut()
            .chain(std::iter::once(&mut self.primary));
        for node in nodes {
            if let Err(e) = node.stop_immediate().await {
                warn!(node = %node.name, error = %e, "immediate shutdown failed; killing");
                node.kill_all().await;
                if let Err(e) = node.wait_gone().await {
                    warn!(node = %node.name, error = %e, "node processes left behind");
                }
            }
            if node.socket_dir_outside {
                remove_tree(&node.socket_dir);
            }
        }
        remove_tree(&self.opts.base_dir);
        self.torn_down = true;
        info!(base_dir = %self.opts.base_dir.display(), "local PostgreSQL cluster removed");
    }

    fn next_name(&mut self) -> String {
        let name = format!("node{}", self.next_node);
        self.next_node += 1;
        name
    }

    /// pg_basebackup a new standby named `name` from the primary, start it, wait until it
    /// streams.
    async fn add_standby(
        &mut self,
        port: u16,
        name: String,
    ) -> Result<LocalNode, LocalClusterError> {
        let started = Instant::now();
        let mut node = LocalNode::new(
            &name,
            port,
            &self.opts.base_dir,
            &self.bins,
            self.run_as.clone(),
        )?;
        create_owned_dir(&node.data_dir, 0o700, self.run_as.as_ref())?;
        let source = format!(
            "host=127.0.0.1 port={} user={SUPERUSER} application_name={name}",
            self.primary.port
        );
        let mut backup = server_command(
            &self.bins.program("pg_basebackup"),
            self.run_as.as_ref(),
            &node.node_dir,
        );
        backup.arg("-D").arg(&node.data_dir).args([
            "-R",
            "-X",
            "stream",
            "--checkpoint=fast",
            "--no-sync",
            "-d",
            &source,
        ]);
        run_command(backup, COMMAND_TIMEOUT).await?;
        write_node_files(&self.opts, &node)?;
        node.start().await?;
        wait_streaming(&self.primary, &mut node).await?;
        info!(node = %name, port, primary = %self.primary.name,
              elapsed_ms = started.elapsed().as_millis() as u64, "standby streaming");
        Ok(node)
    }

    /// `synchronous_standby_names = '*'` on the primary, then waits until it has a sync standby.
    /// Only done once the standby streams, or commits would hang. `ALTER SYSTEM` writes
    /// postgresql.auto.conf after the standby was copied, so a promoted standby never inherits
    /// the setting (with no standby of its own, all its commits would hang).
    async fn enable_synchronous(&self) -> Result<(), LocalClusterError> {
        let client = self.primary.control_client().await?;
        // Two statements: ALTER SYSTEM refuses to run in the implicit transaction of a batch.
        for statement in [
            "ALTER SYSTEM SET synchronous_standby_names = '*'",
            "SELECT pg_reload_conf()",
        ] {
            client
                .batch_execute(statement)
                .await
                .map_err(pg_err(format!("`{statement}` on the primary")))?;
        }
        let started = Instant::now();
        loop {
            let row = client
                .query_one(
                    "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
                    &[],
                )
                .await
                .map_err(pg_err("reading pg_stat_replication"))?;
            if row
                .try_get::<_, i64>(0)
                .map_err(pg_err("reading the sync standby count"))?
                > 0
            {
                return Ok(());
            }
            if started.elapsed() >= REPLICATION_TIMEOUT {
                return Err(LocalClusterError::Timeout {
                    what: "the primary to report a synchronous standby".to_owned(),
                    waited: REPLICATION_TIMEOUT,
                    detail: String::new(),
                });
            }
            crate::clock::sleep(POLL).await;
        }
    }
}

/// Waits until the primary's `pg_stat_replication` shows `standby` streaming.
async fn wait_streaming(
    primary: &LocalNode,
    standby: &mut LocalNode,
) -> Result<(), LocalClusterError> {
    let client = primary.control_client().await?;
    let started = Instant::now();
    loop {
        let rows = client
            .query(
                "SELECT state FROM pg_stat_replication WHERE application_name = $1",
                &[&standby.name],
            )
            .await
            .map_err(pg_err(format!(
                "reading pg_stat_replication on node {}",
                primary.name
            )))?;
        let streaming = rows
            .iter()
            .any(|row| row.try_get::<_, Option<&str>>(0).ok().flatten() == Some("streaming"));
        if streaming {
            return Ok(());
        }
        if !standby.is_running() {
            return Err(standby.start_failed("the standby exited before it streamed".to_owned()));
        }
        if started.elapsed() >= REPLICATION_TIMEOUT {
            return Err(LocalClusterError::Timeout {
                what: format!(
                    "standby {} to stream from node {}",
                    standby.name, primary.name
                ),
                waited: REPLICATION_TIMEOUT,
                detail: format!(
                    "\n--- tail of {} ---\n{}",
                    standby.log_path.display(),
                    standby.log_tail(LOG_TAIL_LINES)
                ),
            });
        }
        crate::clock::sleep(POLL).await;
    }
}

/// Creates (or accepts an empty) base directory, mode 0755, reachable by the server user;
/// returns its canonical path, which is what `/proc/<pid>/cwd` of the servers will show.
fn prepare_base_dir(base: &Path, user: Option<&RunAs>) -> Result<PathBuf, LocalClusterError> {
    match fs::read_dir(base) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(LocalClusterError::Environment(format!(
                    "base_dir {} exists and is not empty; refusing to use it (it is deleted on \
                     shutdown)",
                    base.display()
                )));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(base).map_err(io_err(format!("creating {}", base.display())))?;
        }
        Err(e) => {
            return Err(LocalClusterError::Io {
                what: format!("reading {}", base.display()),
                cause: e,
            })
        }
    }
    set_mode(base, 0o755)?;
    let base = fs::canonicalize(base).map_err(io_err(format!("resolving {}", base.display())))?;
    if let Some(u) = user {
        check_reachable(&base, u)?;
    }
    Ok(base)
}

impl Drop for LocalCluster {
    /// Best effort for a test that failed halfway: SIGKILL everything still running and remove
    /// the base directory, synchronously.
    fn drop(&mut self) {
        if self.torn_down {
            return;
        }
        let mut nodes: Vec<&mut LocalNode> = self.standby.iter_mut().collect();
        nodes.push(&mut self.primary);
        for node in &mut nodes {
            node.kill_now();
        }
        let started = Instant::now();
        while nodes
            .iter()
            .any(|n| !node_processes(&n.data_dir, None).is_empty())
        {
            if started.elapsed() >= DROP_TIMEOUT {
                warn!(base_dir = %self.opts.base_dir.display(), "processes of the local cluster survived SIGKILL");
                break;
            }
            std::thread::sleep(POLL);
        }
        for node in &nodes {
            release_shmem_segment(&node.data_dir);
        }
        remove_tree(&self.opts.base_dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn proc_stat_with_spaces_and_parentheses_in_the_name() {
        let line = "4242 (postgres: postgres (x) idle) S 4200 4242 4242 0 -1 4194560 120 0 0 0 0 0 0 0 20 0 1 0 987654 180000000 1000 18446744073709551615 0 0 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_proc_stat(line),
            Some(ProcStat {
                pid: 4242,
                state: 'S',
                ppid: 4200
            })
        );
        let zombie = "77 (postgres) Z 1 77 77 0 -1 4228356 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0";
        assert_eq!(parse_proc_stat(zombie).map(|s| s.state), Some('Z'));
        assert_eq!(parse_proc_stat("garbage"), None);
        assert_eq!(parse_proc_stat("12 (x)"), None);
    }

    #[test]
    fn own_stat_line_parses() {
        let line = fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let stat = parse_proc_stat(&line);
        assert_eq!(stat.map(|s| s.pid), Some(std::process::id()));
    }

    #[test]
    fn traversal_permissions() {
        let pg = RunAs {
            uid: 101,
            gid: 104,
            home: PathBuf::new(),
        };
        assert!(mode_lets_through(0o40755, 0, 0, &pg));
        assert!(mode_lets_through(0o41777, 0, 0, &pg));
        assert!(!mode_lets_through(0o40700, 0, 0, &pg));
        assert!(mode_lets_through(0o40700, 101, 0, &pg));
        assert!(mode_lets_through(0o40710, 0, 104, &pg));
        assert!(!mode_lets_through(0o40770, 0, 0, &pg));
    }

    #[test]
    fn major_versions() {
        let v = "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)";
        assert_eq!(parse_major_version(v).as_deref(), Some("15"));
        assert_eq!(
            parse_major_version("postgres (PostgreSQL) 9.6.24").as_deref(),
            Some("9.6")
        );
        assert_eq!(
            parse_major_version("postgres (PostgreSQL) 17devel").as_deref(),
            Some("17")
        );
        assert_eq!(
            parse_major_version("postgres (PostgreSQL) 18beta1").as_deref(),
            Some("18")
        );
        assert_eq!(parse_major_version("no version here"), None);
    }

    #[test]
    fn version_directories_newest_first() {
        let names = ["9.6", "15", "13", "README", "16", "9.5"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            newest_versions_first(names),
            ["16", "15", "13", "9.6", "9.5"]
        );
    }

    #[test]
    fn shmem_segment_of_a_killed_postmaster() {
        let pid_file = "4242\n/tmp/x/data\n1795580233\n5432\n/tmp/x/socket\n127.0.0.1\n  10035602     32769\nready   \n";
        assert_eq!(parse_pid_file_shmem_id(pid_file), Some(32769));
        assert_eq!(parse_pid_file_shmem_id("4242\n/tmp/x/data\n"), None);
        let table = "       key      shmid perms                  size  cpid  lpid nattch   uid   gid  cuid  cgid      atime      dtime      ctime                   rss                  swap\n  \
                     10035602      32769   600                    56 17273 17273      0   101   104   101   104 1795580233 1795580233 1795580232                  4096                     0\n  \
                     10035554      32770   600                    56 17302 17326      3   101   104   101   104 1795580235 1795580235 1795580233                  4096                     0\n";
        assert_eq!(parse_sysv_attach_count(table, 32769), Some(0));
        assert_eq!(parse_sysv_attach_count(table, 32770), Some(3));
        assert_eq!(parse_sysv_attach_count(table, 5), None);
    }

    #[test]
    fn df_available() {
        let out = "Filesystem     1024-blocks  Used Available Capacity Mounted on\n\
                   tmpfs             24681940     8  24681932       1% /dev/shm\n";
        assert_eq!(parse_df_available_kib(out), Some(24_681_932));
        assert_eq!(parse_df_available_kib("Filesystem\n"), None);
    }

    #[test]
    fn port_range() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("1024 65535"), Some((1024, 65535)));
        assert_eq!(parse_port_range("oops"), None);
    }

    #[test]
    fn picked_ports_are_in_range_free_and_never_repeated() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut handed_out = BTreeSet::new();
        let mut seen = BTreeSet::new();
        for _ in 0..100 {
            let port = pick_port(20_000, 20_200, &mut handed_out, &mut rng, |p| p % 2 == 0);
            let port = port.unwrap_or_default();
            assert!((20_000..20_200).contains(&port) && port % 2 == 0, "{port}");
            assert!(seen.insert(port), "port {port} handed out twice");
        }
        // Every even port is taken now.
        assert_eq!(
            pick_port(20_000, 20_200, &mut handed_out, &mut rng, |p| p % 2 == 0),
            None
        );
        // Range too small (ephemeral range starts low): fall back to the kernel.
        assert_eq!(
            pick_port(20_000, 20_050, &mut BTreeSet::new(), &mut rng, |_| true),
            None
        );
    }

    #[test]
    fn free_port_never_repeats_in_one_process() {
        let mut seen = BTreeSet::new();
        for _ in 0..200 {
            let port = free_port();
            assert!(port.is_ok(), "{port:?}");
            let port = port.unwrap_or_default();
            assert!(seen.insert(port), "port {port} handed out twice");
            assert!(port_is_free(port));
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(conf_quote("/tmp/a b"), "'/tmp/a b'");
        assert_eq!(conf_quote("it's\\"), "'it''s\\\\'");
        assert_eq!(conn_value("postgres"), "postgres");
        assert_eq!(conn_value("a b"), "'a b'");
        assert_eq!(conn_value("o'k"), "'o\\'k'");
        assert_eq!(conn_value(""), "''");
    }

    #[test]
    fn tail_of_text() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(last_lines("a", 5), "a");
        assert_eq!(last_lines("", 5), "");
    }

    #[test]
    fn deleted_cwd() {
        assert_eq!(
            strip_deleted(Path::new("/tmp/x/data (deleted)")),
            PathBuf::from("/tmp/x/data")
        );
        assert_eq!(
            strip_deleted(Path::new("/tmp/x/data")),
            PathBuf::from("/tmp/x/data")
        );
    }

    #[test]
    fn hba_puts_caller_lines_between_control_and_defaults() {
        let mut opts = ClusterOptions::new("/nowhere");
        opts.hba = vec!["hostssl all alice 127.0.0.1/32 scram-sha-256".to_owned()];
        let hba = render_hba(&opts);
        let control = hba.find("local all postgres trust");
        let caller = hba.find("hostssl all alice");
        let defaults = hba.find("host all all 127.0.0.1/32 scram-sha-256");
        assert!(control < caller && caller < defaults, "{hba}");
        assert!(control.is_some());
    }
}
