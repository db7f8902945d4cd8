//! failover_probe: the client side of `bench/failover.sh`.
//!
//! Each client holds ONE connection through the gateway for the whole run and runs a statement
//! loop, one statement every `--interval-ms` (a tokio interval; a statement that stalls delays
//! the next tick, it does not queue a burst):
//!
//! - `read`:  `SELECT inet_server_port()` (simple query protocol);
//! - `write`: `INSERT INTO failover_probe (client, seq) VALUES ($1, $2) RETURNING
//!   inet_server_port()` (extended protocol, one named statement prepared once per connection,
//!   autocommit). `seq` increases by one per statement; the seqs whose INSERT succeeded are kept
//!   and checked against the table at the end (nothing acknowledged may be missing or doubled);
//! - `simple-write`: the same INSERT as a simple-protocol Query, values in its text (what psql,
//!   or psycopg in autocommit mode, sends), checked the same way;
//! - `block-write`: the same INSERT as a whole transaction block in one Query,
//!   `BEGIN; INSERT …; COMMIT`;
//! - `mixed-write`: the same INSERT after a `SET` in one Query (an ORM's batch).
//!
//! Every statement returns the port of the server that ran it, so the probe knows which
//! PostgreSQL answered. The script kills the primary and then writes on stdin
//!
//! ```text
//! kill <failover-id> <kill-instant, CLOCK_REALTIME ns> <port of the killed primary>
//! ```
//!
//! For each client the stall of that failover is the time from the kill instant to the completion
//! of the first statement that succeeded on another server (on the same connection, unless the
//! connection was lost, which is reported). Output on stdout, one line per event:
//!
//! ```text
//! ready client=read port=5433
//! stall failover=3 client=read ms=231.4 port=5434 old_port=5433 errors=0 reconnected=0 late_old=0
//! error failover=3 client=write seq=812 after_kill_ms=131.2 sent_ms=-0.4 sqlstate=08007 severity=ERROR message=...
//! lost failover=3 client=write after_kill_ms=... message=...       (connection lost; reconnects)
//! synced id=7 port=5434 client=read                                 (answer to `sync 7`)
//! doubt client=write seq=812 present=0          (one per INSERT that got an error: in the table?)
//! verify client=write acked=1234 present=1234 missing=0 duplicates=0 in_doubt=1 in_doubt_present=0
//! done
//! ```
//!
//! (`sent_ms`: when the failing statement was sent, relative to the kill instant: negative means
//! it was in flight when the primary died.)
//!
//! Other commands: `sync <id>` (each client answers `synced` after its next successful statement
//! that started after the command arrived: proof both clients are running), `quit`.
//!
//! Usage: failover_probe --host 127.0.0.1 --port 6432 --user bench --dbname bench
//!                       [--interval-ms 10] [--clients read,write,simple-write,block-write,mixed-write]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage, Statement};

/// CLOCK_REALTIME in nanoseconds (the clock bash's EPOCHREALTIME reads).
fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[derive(Clone)]
struct Opts {
    host: String,
    port: u16,
    user: String,
    dbname: String,
    interval: Duration,
    clients: Vec<String>,
}

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        host: "127.0.0.1".into(),
        port: 6432,
        user: "postgres".into(),
        dbname: "postgres".into(),
        interval: Duration::from_millis(10),
        clients: vec!["read".into(), "write".into()],
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut v = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--host" => o.host = v()?,
            "--port" => o.port = v()?.parse().map_err(|e| format!("--port: {e}"))?,
            "--user" => o.user = v()?,
            "--dbname" => o.dbname = v()?,
            "--interval-ms" => {
                o.interval = Duration::from_millis(
                    v()?.parse::<u64>()
                        .map_err(|e| format!("--interval-ms: {e}"))?
                        .max(1),
                )
            }
            "--clients" => {
                o.clients = v()?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    for c in &o.clients {
        if c != "read" && !writes(c) {
            return Err(format!(
                "unknown client kind {c:?} (read, write, simple-write, block-write, mixed-write)"
            ));
        }
    }
    Ok(o)
}

struct Kill {
    id: u64,
    t0: i128,
    port: i32,
}

#[derive(Default)]
struct ClientState {
    /// (port, completion time) of the first success after each change of server.
    switches: Vec<(i32, i128)>,
    last_port: Option<i32>,
    /// Successes on each kill's old port after its kill instant.
    late_old: BTreeMap<u64, u64>,
    /// Errors (incl. lost connections) after each kill instant, not yet attributed to a stall.
    errors_since: Vec<i128>,
    /// Times the connection was re-opened.
    reconnects: Vec<i128>,
    reported: BTreeSet<u64>,
    /// `sync` ids waiting for this client's next success started after the command.
    syncs: Vec<(u64, i128)>,
}

#[derive(Default)]
struct State {
    kills: Vec<Kill>,
    clients: BTreeMap<String, ClientState>,
}

impl State {
    /// Reports every stall that can be reported now.
    fn resolve(&mut self) {
        for kill in &self.kills {
            for (name, c) in self.clients.iter_mut() {
                if c.reported.contains(&kill.id) {
                    continue;
                }
                let Some(&(port, t)) = c
                    .switches
                    .iter()
                    .find(|(p, t)| *p != kill.port && *t > kill.t0)
                else {
                    continue;
                };
                let errors = c
                    .errors_since
                    .iter()
                    .filter(|&&e| e > kill.t0 && e <= t)
                    .count();
                let reconnected = c.reconnects.iter().any(|&r| r > kill.t0 && r <= t);
                say(format!(
                    "stall failover={} client={} ms={:.1} port={} old_port={} errors={} reconnected={} late_old={}",
                    kill.id,
                    name,
                    (t - kill.t0) as f64 / 1e6,
                    port,
                    kill.port,
                    errors,
                    u8::from(reconnected),
                    c.late_old.get(&kill.id).copied().unwrap_or(0),
                ));
                c.reported.insert(kill.id);
            }
        }
    }

    /// The failover an event at `t` belongs to (the latest kill before it).
    fn failover_at(&self, t: i128) -> Option<&Kill> {
        self.kills.iter().filter(|k| k.t0 <= t).max_by_key(|k| k.t0)
    }
}

type Shared = Arc<Mutex<State>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

async fn connect(o: &Opts, name: &str) -> Result<Client, tokio_postgres::Error> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&o.host)
        .port(o.port)
        .user(&o.user)
        .dbname(&o.dbname)
        .application_name(format!("failover_probe-{name}"))
        .connect_timeout(Duration::from_secs(5));
    let (client, conn) = cfg.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

fn describe(e: &tokio_postgres::Error) -> (String, String, String) {
    match e.as_db_error() {
        Some(db) => (
            db.code().code().to_owned(),
            db.severity().to_owned(),
            one_line(db.message()),
        ),
        None => (
            "-".into(),
            "-".into(),
            one_line(&match std::error::Error::source(e) {
                Some(src) => format!("{e}: {src}"),
                None => e.to_string(),
            }),
        ),
    }
}

const INSERT: &str =
    "INSERT INTO failover_probe (client, seq) VALUES ($1, $2) RETURNING inet_server_port()";

/// Whether the client kind `name` inserts (and is checked at the end).
fn writes(name: &str) -> bool {
    matches!(name, "write" | "simple-write" | "block-write" | "mixed-write")
}

/// The first column of a simple Query's first row, as a port.
fn port_of(msgs: &[SimpleQueryMessage]) -> i32 {
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
            _ => None,
        })
        .unwrap_or(-1)
}

struct Conn {
    client: Client,
    insert: Option<Statement>,
}

async fn open(o: &Opts, name: &str) -> Result<Conn, tokio_postgres::Error> {
    let client = connect(o, name).await?;
    let insert = if name == "write" {
        Some(client.prepare(INSERT).await?)
    } else {
        None
    };
    Ok(Conn { client, insert })
}

/// Runs the client's statement loop until `stop` flips; returns the seqs acknowledged and the
/// seqs in doubt (write client).
async fn run_client(
    o: Opts,
    name: String,
    shared: Shared,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> (Option<Conn>, BTreeSet<i64>, BTreeSet<i64>) {
    let mut acked = BTreeSet::new();
    let mut in_doubt = BTreeSet::new();
    let mut conn = match open(&o, &name).await {
        Ok(c) => Some(c),
        Err(e) => {
            let (code, _, msg) = describe(&e);
            say(format!("fatal client={name} connect failed: {code} {msg}"));
            std::process::exit(2);
        }
    };
    let mut tick = tokio::time::interval(o.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq: i64 = 0;
    let mut first = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return (conn, acked, in_doubt),
        }
        if *stop.borrow() {
            return (conn, acked, in_doubt);
        }
        let Some(c) = conn.as_ref() else {
            // reconnect after a lost connection (reported; the stall then counts to the first
            // success on the new connection)
            match open(&o, &name).await {
                Ok(c) => {
                    lock(&shared)
                        .clients
                        .get_mut(&name)
                        .unwrap()
                        .reconnects
                        .push(now_ns());
                    say(format!("reconnected client={name}"));
                    conn = Some(c);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
            continue;
        };
        let started = now_ns();
        if writes(&name) {
            seq += 1;
        }
        let result: Result<i32, tokio_postgres::Error> = if name == "write" {
            let stmt = c.insert.as_ref().expect("write client has its statement");
            c.client
                .query_one(stmt, &[&name, &seq])
                .await
                .map(|row| row.get::<_, i32>(0))
        } else if writes(&name) {
            let insert = format!(
                "INSERT INTO failover_probe (client, seq) VALUES ('{name}', {seq}) RETURNING inet_server_port()"
            );
            let sql = match name.as_str() {
                "block-write" => format!("BEGIN; {insert}; COMMIT"),
                "mixed-write" => format!("SET application_name = '{name}'; {insert}"),
                _ => insert,
            };
            c.client.simple_query(&sql).await.map(|msgs| port_of(&msgs))
        } else {
            c.client
                .simple_query("SELECT inet_server_port()")
                .await
                .map(|msgs| port_of(&msgs))
        };
        let done = now_ns();
        let mut st = lock(&shared);
        match result {
            Ok(port) => {
                if writes(&name) {
                    acked.insert(seq);
                }
                if first {
                    say(format!("ready client={name} port={port}"));
                    first = false;
                }
                let late: Vec<u64> = st
                    .kills
                    .iter()
                    .filter(|k| k.port == port && done > k.t0)
                    .map(|k| k.id)
                    .collect();
                let c = st.clients.get_mut(&name).unwrap();
                for id in late {
                    // a success on the killed server after the kill instant: the statement was
                    // answered in the instant between the timestamp and the kill (or the kill
                    // missed); counted, and the stall still waits for the other server
                    if !c.reported.contains(&id) {
                        *c.late_old.entry(id).or_default() += 1;
                    }
                }
                if c.last_port != Some(port) {
                    c.switches.push((port, done));
                    c.last_port = Some(port);
                }
                let ready: Vec<u64> = c
                    .syncs
                    .iter()
                    .filter(|(_, at)| started >= *at)
                    .map(|(id, _)| *id)
                    .collect();
                c.syncs.retain(|(_, at)| started < *at);
                for id in ready {
                    say(format!("synced id={id} port={port} client={name}"));
                }
                st.resolve();
            }
            Err(e) => {
                if writes(&name) {
                    in_doubt.insert(seq);
                }
                let (code, severity, msg) = describe(&e);
                // sent_ms < 0: the statement was sent before the kill (in flight when the
                // primary died); > 0: sent after the primary was already dead
                let (fid, after) = match st.failover_at(done) {
                    Some(k) => (
                        k.id.to_string(),
                        format!(
                            "{:.1} sent_ms={:.1}",
                            (done - k.t0) as f64 / 1e6,
                            (started - k.t0) as f64 / 1e6
                        ),
                    ),
                    None => ("-".into(), "- sent_ms=-".into()),
                };
                st.clients.get_mut(&name).unwrap().errors_since.push(done);
                let closed = conn.as_ref().is_some_and(|c| c.client.is_closed());
                let what = if closed { "lost" } else { "error" };
                let stmt = if writes(&name) {
                    format!(" seq={seq}")
                } else {
                    String::new()
                };
                say(format!(
                    "{what} failover={fid} client={name}{stmt} after_kill_ms={after} sqlstate={code} severity={severity} message={msg}"
                ));
                if closed {
                    conn = None;
                }
            }
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("failover_probe: {e}");
            std::process::exit(64);
        }
    };
    let shared: Shared = Arc::default();
    for c in &o.clients {
        lock(&shared)
            .clients
            .insert(c.clone(), ClientState::default());
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for c in o.clients.clone() {
        tasks.push((
            c.clone(),
            tokio::spawn(run_client(o.clone(), c, shared.clone(), stop_rx.clone())),
        ));
    }

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        let line = match lines.next_line().await {
            Ok(Some(l)) => l,
            Ok(None) => break, // EOF: same as quit
            Err(e) => {
                eprintln!("failover_probe: stdin: {e}");
                break;
            }
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["kill", id, t0, port] => {
                let (Ok(id), Ok(t0), Ok(port)) = (id.parse(), t0.parse(), port.parse()) else {
                    eprintln!("failover_probe: bad command {line:?}");
                    continue;
                };
                let mut st = lock(&shared);
                st.kills.push(Kill { id, t0, port });
                st.resolve();
            }
            ["sync", id] => {
                let Ok(id) = id.parse() else { continue };
                let now = now_ns();
                for c in lock(&shared).clients.values_mut() {
                    c.syncs.push((id, now));
                }
            }
            ["quit"] => break,
            [] => {}
            _ => eprintln!("failover_probe: unknown command {line:?}"),
        }
    }

    let _ = stop_tx.send(true);
    for (name, task) in tasks {
        let Ok((conn, acked, in_doubt)) = task.await else {
            say(format!("fatal client={name} task panicked"));
            continue;
        };
        if !writes(&name) {
            continue;
        }
        // Invariant check: every INSERT the client saw succeed is there exactly once. Done on
        // the probe's own connection when it still has one, else on a new one.
        let conn = match conn {
            Some(c) if !c.client.is_closed() => Ok(c),
            _ => open(&o, "verify").await,
        };
        let rows = match conn {
            Ok(c) => {
                c.client
                    .query(
                        "SELECT seq, count(*) FROM failover_probe WHERE client = $1 GROUP BY seq",
                        &[&name],
                    )
                    .await
            }
            Err(e) => Err(e),
        };
        match rows {
            Ok(rows) => {
                let mut present = BTreeMap::new();
                for r in rows {
                    present.insert(r.get::<_, i64>(0), r.get::<_, i64>(1));
                }
                let missing = acked.iter().filter(|s| !present.contains_key(s)).count();
                let duplicates = present.values().filter(|&&n| n > 1).count();
                let in_doubt_present = in_doubt.iter().filter(|s| present.contains_key(s)).count();
                for s in &in_doubt {
                    say(format!(
                        "doubt client={name} seq={s} present={}",
                        u8::from(present.contains_key(s))
                    ));
                }
                say(format!(
                    "verify client={name} acked={} present={} missing={missing} duplicates={duplicates} in_doubt={} in_doubt_present={in_doubt_present}",
                    acked.len(),
                    present.len(),
                    in_doubt.len(),
                ));
            }
            Err(e) => {
                let (code, _, msg) = describe(&e);
                say(format!("verify client={name} failed: {code} {msg}"));
            }
        }
    }
    say("done".into());
}
