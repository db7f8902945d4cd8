#!/usr/bin/env bash
# Understudy failover benchmark: the stall a client sees when the primary PostgreSQL is SIGKILLed,
# measured from the kill instant to the completion of the same connection's next successful
# statement on the new primary, over $FAILOVERS consecutive failovers with `--promote auto`
# (the gateway detects the failure and promotes the standby itself: detection, the two-witness
# check, pg_promote(), re-login and session restore are all inside the figure).
#
# What runs
#   - a PostgreSQL 15 primary and a streaming hot standby (pg_basebackup -R) in a temp dir, run as
#     user postgres, on two fixed loopback ports; wal_level=replica, hot_standby=on,
#     wal_retrieve_retry_interval=200ms, dynamic_shared_memory_type=mmap (a SIGKILLed postmaster
#     leaves nothing in /dev/shm), pg_hba trust for 127.0.0.1 (incl. replication): the gateway
#     needs no login material to log sessions in again, and the control role `postgres` can probe
#     and promote;
#   - replication is synchronous (SYNC_REP=1, the default): synchronous_standby_names='*' on the
#     primary, synchronous_commit=on, so no INSERT the client saw succeed can be lost at the kill
#     (with asynchronous replication the gateway would rightly end a session whose acknowledged
#     commit is missing on the new primary with FATAL 08007). The standby's own configuration has
#     synchronous_standby_names='' so that, once promoted, it does not wait for a standby that does
#     not exist yet; the script turns it on (ALTER SYSTEM) when the re-seeded standby streams, and
#     only kills again once it reports sync_state='sync'. SYNC_REP=0: asynchronous throughout;
#   - understudy `run --backend PRIMARY --backend STANDBY --promote auto`, every other setting at
#     its default (failover.probe_timeout_ms=1000, probe_attempts=3, topology_interval_ms=1000,
#     standby_silence_ms=2000), RUST_LOG=info, stderr kept in gateway.log;
#   - bench/failover_probe (a small Rust client, built with cargo): each client holds ONE
#     connection through the gateway for the whole run and runs one statement every
#     $INTERVAL_MS ms (10):
#       read:  `SELECT inet_server_port()`                       (simple protocol)
#       write: `INSERT INTO failover_probe (client, seq) VALUES ($1, $2) RETURNING
#               inet_server_port()`  (extended protocol, named prepared statement, autocommit)
#       simple-write: the same INSERT as a simple-protocol Query, values in its text (psql's,
#               or psycopg's in autocommit mode)
#       block-write: the same INSERT as a whole transaction block in one Query,
#               `BEGIN; INSERT …; COMMIT`; mixed-write: after a `SET` in one Query
#     All run at the same time (CLIENTS=read,write,simple-write), on their own connections.
#
# One failover
#   1. `sync` the probe: both clients have completed a statement on the current primary after the
#      previous failover's re-seed; then $SETTLE s of steady traffic, and a wait for a quiet
#      machine (see QUIET_MAX: on a shared box other work would otherwise land in the stall);
#   2. every process of the primary is listed from /proc (the postmaster first; each child is
#      its own process group, PostgreSQL setsid()s them, so a group kill would reach the
#      postmaster alone), then the instant is read (bash $EPOCHREALTIME, CLOCK_REALTIME, no fork)
#      and right after it the builtin kill sends SIGKILL to all of them, microseconds apart (once
#      every client recovered, a sweep of /proc kills any process of the node forked between
#      the listing and the kill: none expected; counted). Runs before 2026-12-04 killed the
#      process group, i.e. the postmaster alone; its children exited on noticing, ~15 ms later;
#   3. the script tells the probe "kill <id> <instant ns> <port>"; per client, the stall is the
#      time from the instant to the completion of its first successful statement answered by
#      another server (every statement returns inet_server_port(), so a statement the old primary
#      answered in the microseconds between timestamp and kill cannot count as recovered;
#      "late_old" counts those);
#   4. re-seed: the dead node's System V interlock segment is removed, its data directory deleted,
#      a new standby is pg_basebackup'ed (-R, -X stream, -c fast) from the new primary onto the
#      old primary's port (new data and socket dirs each time, so no stale
#      .s.PGSQL.PORT.lock matters), started, and waited for: streaming, then sync_state=sync
#      (SYNC_REP=1), then the gateway's /status shows it as a standby (it re-adopts a fenced
#      old primary once it answers in recovery; without that the next failover has no candidate).
#
# Output: per-failover stalls per client, p50 / p90 / max / mean per client and overall, client
# errors (an autocommit INSERT in flight at the kill may get 08007 "outcome unknown", by design;
# reads should get none), lost connections, and the write invariant (every acknowledged INSERT
# present exactly once at the end). Written to $RESULTS (default bench/failover-latest.md;
# with FAULT=stop, bench/failover-stop-latest.md), with the gateway's failover log lines and
# every WARN/ERROR line it printed.
# Targets (from the issue): stall p50 <= 0.5 s, max <= 1 s.
#
# Knobs (environment):
#   FAILOVERS=20      failovers to run               INTERVAL_MS=10   ms between statements
#   CLIENTS=read,write,simple-write  probe clients   SETTLE=1         s of steady traffic before a kill
#   SYNC_REP=1        synchronous replication (see above)
#   FAULT=kill        kill: SIGKILL the primary's processes; stop: SIGSTOP them instead (a hung
#                     host: no socket closes, its kernel still ACKs, so only timeouts reveal it;
#                     the standby's wal_receiver_timeout is 5 s), then SIGKILL it once every client
#                     recovered. The stall targets are for kill.
#   FSYNC=on          PostgreSQL fsync (a SIGKILL loses nothing from the page cache either way)
#   STALL_TIMEOUT=40  s to wait for every client to recover from one kill before giving up
#   QUIET_MAX=25 QUIET_WAIT=60  before each kill wait up to QUIET_WAIT s until the machine is at
#                     most QUIET_MAX % busy (0.5 s /proc/stat samples; the probe and the idle
#                     cluster take a few %); the last sample is reported per failover
#   SKIP_BUILD=1      use the existing target/release/understudy and probe binary
#   RESULTS=...       report path                    KEEP_TMP=1  keep the temp dir (logs)
#   PGBIN=/usr/lib/postgresql/15/bin                 RUST_LOG=info  gateway log filter
#
# How long: ~15 s setup + FAILOVERS x (SETTLE + stall + re-seed ~2-4 s), so ~2 minutes for 20,
# plus the cargo builds when they are not up to date.
#
# Usage: bench/failover.sh   (as root; PostgreSQL runs as user postgres)

set -euo pipefail
export LC_ALL=C

FAILOVERS=${FAILOVERS:-20}
INTERVAL_MS=${INTERVAL_MS:-10}
CLIENTS=${CLIENTS:-read,write,simple-write}
SETTLE=${SETTLE:-1}
SYNC_REP=${SYNC_REP:-1}
FAULT=${FAULT:-kill}
FSYNC=${FSYNC:-on}
STALL_TIMEOUT=${STALL_TIMEOUT:-40}
QUIET_MAX=${QUIET_MAX:-25}
QUIET_WAIT=${QUIET_WAIT:-60}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP_TMP=${KEEP_TMP:-0}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
if [[ $FAULT == stop ]]; then
    RESULTS=${RESULTS:-$BENCH_DIR/failover-stop-latest.md}
else
    RESULTS=${RESULTS:-$BENCH_DIR/failover-latest.md}
fi
GATEWAY_BIN=$ROOT/target/release/understudy
PROBE_DIR=$BENCH_DIR/failover_probe
PROBE_BIN=$PROBE_DIR/target/release/failover_probe

BENCH_NAME=failover
# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"

require_root "PostgreSQL is started as user postgres with runuser"
require_tools psql runuser python3 curl
for p in initdb pg_ctl pg_basebackup postgres; do
    [[ -x $PGBIN/$p ]] || die "$PGBIN/$p not found"
done
IFS=, read -r -a CLIENT_LIST <<<"$CLIENTS"
[[ ${#CLIENT_LIST[@]} -gt 0 ]] || die "CLIENTS is empty"

# ---------------------------------------------------------------------------------------------
# state and cleanup
TMP=""
GW_PID=""
PROBE_PID=""
declare -a NODE_DATA=("" "") # data dir of each slot's current incarnation
declare -a NODE_GEN=(0 0)
cleanup() {
    local rc=$?
    set +e
    exec 7>&- 2>/dev/null
    kill_now "$PROBE_PID" "$GW_PID"
    for s in 0 1; do
        # Both look for postmaster.pid themselves; a killed postmaster leaves it behind.
        stop_cluster "${NODE_DATA[$s]}"
        release_shm "${NODE_DATA[$s]}"
    done
    finish_tmp "$rc" "gateway.log, probe.out, node logs"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

sql() { # port db sql...  (as postgres, trust over TCP)
    local port=$1 db=$2
    shift 2
    psql -X -q -t -A -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d "$db" -c "$*"
}

# Removes the System V interlock segment a killed postmaster leaves (IPC_RMID: destroyed once
# the last process detaches).
release_shm() {
    local pidfile=$1/postmaster.pid shmid
    [[ -f $pidfile ]] || return 0
    shmid=$(sed -n 7p "$pidfile" | awk '{print $2}')
    [[ -n $shmid && $shmid =~ ^[0-9]+$ ]] && ipcrm -m "$shmid" 2>/dev/null || true
}

# Live (non-zombie) processes whose cwd is the data dir (the postmaster chdirs there, children
# inherit it, so this finds them even after re-parenting).
node_pids() {
    local dir=$1 p st cwd
    for p in /proc/[0-9]*; do
        cwd=$(readlink "$p/cwd" 2>/dev/null) || continue
        cwd=${cwd% (deleted)}
        [[ $cwd == "$dir" ]] || continue
        st=$(awk '{print $3}' "$p/stat" 2>/dev/null) || continue
        [[ $st == Z || $st == X ]] && continue
        echo "${p#/proc/}"
    done
}

case $FAULT in
    kill) FAULT_SIGNAL=KILL ;;
    stop) FAULT_SIGNAL=STOP ;;
    *) die "FAULT must be kill or stop, not '$FAULT'" ;;
esac

# ---------------------------------------------------------------------------------------------
# 1. build
if [[ $SKIP_BUILD != 1 ]]; then
    log "cargo build --release -p understudy"
    (cd "$ROOT" && cargo build --release -p understudy)
    log "cargo build --release --manifest-path bench/failover_probe/Cargo.toml"
    cargo build --release --manifest-path "$PROBE_DIR/Cargo.toml"
fi
[[ -x $GATEWAY_BIN ]] || die "$GATEWAY_BIN missing (build it or unset SKIP_BUILD)"
[[ -x $PROBE_BIN ]] || die "$PROBE_BIN missing (build it or unset SKIP_BUILD)"

# ---------------------------------------------------------------------------------------------
# 2. primary + streaming standby
TMP=$(mktemp -d /tmp/understudy-failover.XXXXXX)
chmod 755 "$TMP"
mkdir "$TMP/logs" # server logs of killed incarnations (nodeS.gN.log), kept for KEEP_TMP=1
PORT0=$(free_port)
PORT1=$(free_port)
while [[ $PORT1 == "$PORT0" ]]; do PORT1=$(free_port); done
declare -a PORT=("$PORT0" "$PORT1")
GW_PORT=$(free_port)
ADMIN_PORT=$(free_port)

new_node_dir() { # slot -> sets NODE_DATA[slot], creates <dir>/{data,sock} owned by postgres
    local s=$1
    NODE_GEN[$s]=$((NODE_GEN[$s] + 1))
    local d=$TMP/node$s.g${NODE_GEN[$s]}
    mkdir -p "$d/sock"
    chown postgres:postgres "$d" "$d/sock"
    chmod 755 "$d"
    NODE_DATA[$s]=$d/data
}

start_node() { # slot
    local s=$1 d=${NODE_DATA[$1]}
    local base=${d%/data}
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$d" -l "$base/postgres.log" -w -t 60 \
        -o "-c port=${PORT[$s]} -c unix_socket_directories='$base/sock'" start >/dev/null \
        || { tail -n 30 "$base/postgres.log" >&2; die "node $s (port ${PORT[$s]}) did not start"; }
}

postmaster_pid() { head -n1 "${NODE_DATA[$1]}/postmaster.pid"; }

log "temp dir $TMP; initdb (nodes on 127.0.0.1:$PORT0 and :$PORT1)"
new_node_dir 0
runuser -u postgres -- "$PGBIN/initdb" -D "${NODE_DATA[0]}" -U postgres -A trust -E UTF8 --no-sync \
    >"$TMP/initdb.log" 2>&1 || { cat "$TMP/initdb.log" >&2; die "initdb failed"; }
cat >>"${NODE_DATA[0]}/postgresql.conf" <<EOF

# --- understudy failover bench (port and socket dir are given on the command line) ---
listen_addresses = '127.0.0.1'
wal_level = replica
hot_standby = on
max_wal_senders = 10
wal_keep_size = '256MB'
wal_retrieve_retry_interval = '200ms'
wal_receiver_timeout = '5s'
dynamic_shared_memory_type = mmap
synchronous_commit = on
fsync = $FSYNC
logging_collector = off
log_line_prefix = '%m [%p] %q%u@%d '
EOF
cat >"${NODE_DATA[0]}/pg_hba.conf" <<EOF
local all         all trust
host  all         all 127.0.0.1/32 trust
host  replication all 127.0.0.1/32 trust
EOF
start_node 0
export PGSSLMODE=disable PGGSSENCMODE=disable PGAPPNAME=understudy-failover-bench
unset PGPASSWORD PGHOST PGPORT PGDATABASE PGSERVICE PGUSER
sql "${PORT[0]}" postgres "CREATE ROLE bench LOGIN" >/dev/null
sql "${PORT[0]}" postgres "CREATE DATABASE bench OWNER bench" >/dev/null
psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "${PORT[0]}" -U bench -d bench \
    -c "CREATE TABLE failover_probe (client text, seq bigint, PRIMARY KEY (client, seq))" >/dev/null

# Seeds slot $1 as a standby of slot $2 and waits until it streams (and is synchronous).
seed_standby() {
    local s=$1 p=$2 d
    new_node_dir "$s"
    d=${NODE_DATA[$s]}
    runuser -u postgres -- "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "${PORT[$p]}" -U postgres \
        -D "$d" -R -X stream -c fast --no-sync >"${d%/data}/basebackup.log" 2>&1 \
        || { cat "${d%/data}/basebackup.log" >&2; die "pg_basebackup from port ${PORT[$p]} failed"; }
    # the standby's own copy must not wait for a standby once promoted
    printf "synchronous_standby_names = ''\n" >>"$d/postgresql.auto.conf"
    start_node "$s"
    local i state
    for ((i = 0; i < 300; i++)); do
        state=$(sql "${PORT[$p]}" postgres "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'" 2>/dev/null || true)
        [[ $state == 1 ]] && break
        sleep 0.1
    done
    [[ $state == 1 ]] || die "standby on ${PORT[$s]} does not stream from ${PORT[$p]}"
    if [[ $SYNC_REP == 1 ]]; then
        sql "${PORT[$p]}" postgres "ALTER SYSTEM SET synchronous_standby_names = '*'" >/dev/null
        sql "${PORT[$p]}" postgres "SELECT pg_reload_conf()" >/dev/null
        for ((i = 0; i < 300; i++)); do
            state=$(sql "${PORT[$p]}" postgres "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'" 2>/dev/null || true)
            [[ $state == 1 ]] && break
            sleep 0.1
        done
        [[ $state == 1 ]] || die "standby on ${PORT[$s]} did not become synchronous"
    fi
}

log "pg_basebackup: standby on ${PORT[1]}"
seed_standby 1 0

# ---------------------------------------------------------------------------------------------
# 3. gateway and probe
log "starting understudy on 127.0.0.1:$GW_PORT (admin $ADMIN_PORT), --promote auto"
# setsid: a session (and scheduler autogroup) of its own, as a service would run; see bench.sh.
RUST_LOG=${RUST_LOG:-info} setsid "$GATEWAY_BIN" run --listen "127.0.0.1:$GW_PORT" \
    --backend "127.0.0.1:${PORT[0]}" --backend "127.0.0.1:${PORT[1]}" \
    --admin-listen "127.0.0.1:$ADMIN_PORT" --promote auto >"$TMP/gateway.log" 2>&1 &
GW_PID=$!
wait_port "$GW_PORT" 30 || { tail -n 30 "$TMP/gateway.log" >&2; die "understudy did not start listening"; }
wait_port "$ADMIN_PORT" 30 || die "understudy admin listener did not start"

# Waits until the gateway's /status shows slot $1 with role $2, from a probe taken after the
# epoch time $3 (0: any probe); at most $4 s. Prints the last role seen.
gw_wait() {
    python3 - "127.0.0.1:${PORT[$1]}" "$2" "$3" "$4" "http://127.0.0.1:$ADMIN_PORT/status" <<'PY'
import json, sys, time, urllib.request
addr, want, since, limit, url = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
deadline = time.time() + limit
role = "?"
while True:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            doc = json.load(r)
        now = time.time()
        for b in doc["backends"]:
            if b["address"] == addr:
                role = b["role"]
                ago = b["probed_secs_ago"]
                if role == want and ago is not None and now - ago >= since:
                    print(role); sys.exit(0)
    except Exception as e:
        role = f"? ({e})"
    if time.time() > deadline:
        print(role); sys.exit(1)
    time.sleep(0.05)
PY
}
gw_wait 0 primary 0 30 >/dev/null || die "gateway does not see ${PORT[0]} as primary"
gw_wait 1 standby 0 30 >/dev/null || die "gateway does not see ${PORT[1]} as standby"

FIFO=$TMP/probe.in
PROBE_OUT=$TMP/probe.out
mkfifo "$FIFO"
"$PROBE_BIN" --host 127.0.0.1 --port "$GW_PORT" --user bench --dbname bench \
    --interval-ms "$INTERVAL_MS" --clients "$CLIENTS" <"$FIFO" >"$PROBE_OUT" 2>"$TMP/probe.err" &
PROBE_PID=$!
exec 7>"$FIFO"

# waits until every client printed a line matching the regex (with "client=NAME" appended)
wait_probe() { # regex-prefix seconds
    local pat=$1 secs=$2 i c ok
    for ((i = 0; i < secs * 20; i++)); do
        ok=1
        for c in "${CLIENT_LIST[@]}"; do
            grep -Eq "^${pat}(.* )?client=$c( |\$)" "$PROBE_OUT" || { ok=0; break; }
        done
        [[ $ok == 1 ]] && return 0
        kill -0 "$PROBE_PID" 2>/dev/null || { cat "$PROBE_OUT" "$TMP/probe.err" >&2; die "the probe exited"; }
        sleep 0.05
    done
    return 1
}
wait_probe "ready" 30 || { cat "$PROBE_OUT" "$TMP/probe.err" >&2; die "probe clients did not start"; }
log "probe running: clients ${CLIENTS} through the gateway, one statement every ${INTERVAL_MS} ms"

# ---------------------------------------------------------------------------------------------
# 4. failovers
FAILOVER_TSV=$TMP/failovers.tsv # id killed_port new_port t0_ns extra_killed reseed_s busy_pct
: >"$FAILOVER_TSV"
PRIMARY=0
STANDBY=1
COMPLETED=0
ABORTED=""
for ((f = 1; f <= FAILOVERS; f++)); do
    # both clients demonstrably running on the current primary
    echo "sync $f" >&7
    wait_probe "synced id=$f " 30 || { ABORTED="probe clients not running before failover $f"; break; }
    if grep -E "^synced id=$f " "$PROBE_OUT" | grep -vq " port=${PORT[$PRIMARY]} "; then
        ABORTED="before failover $f a client was not on the primary ${PORT[$PRIMARY]}: $(grep -E "^synced id=$f " "$PROBE_OUT" | tr '\n' ';')"
        break
    fi
    sleep "$SETTLE"
    busy=$(wait_quiet "$QUIET_MAX" "$QUIET_WAIT")

    pm=$(postmaster_pid "$PRIMARY")
    dead_dir=${NODE_DATA[$PRIMARY]}
    # listed before the instant, so the /proc scan costs the stall nothing
    victims=("$pm")
    for p in $(node_pids "$dead_dir"); do [[ $p == "$pm" ]] || victims+=("$p"); done
    # --- the kill: timestamp, then the signal to every process of the node ---
    t=$EPOCHREALTIME
    kill "-$FAULT_SIGNAL" "${victims[@]}" 2>/dev/null || true
    t0=${t/./}000
    echo "kill $f $t0 ${PORT[$PRIMARY]}" >&7

    if ! wait_probe "stall failover=$f " "$STALL_TIMEOUT"; then
        ABORTED="failover $f: not every client recovered within ${STALL_TIMEOUT}s"
        log "$ABORTED"
        tail -n 40 "$TMP/gateway.log" >&2
        break
    fi
    new_port=$(grep -m1 -E "^stall failover=$f " "$PROBE_OUT" | sed -n 's/.* port=\([0-9]*\) .*/\1/p')
    line=$(grep -E "^stall failover=$f " "$PROBE_OUT" | sed 's/^stall //' | tr '\n' ';')
    log "failover $f: ${line%;}"
    if [[ $new_port != "${PORT[$STANDBY]}" ]]; then
        ABORTED="failover $f: the clients continued on port $new_port, not the standby ${PORT[$STANDBY]}"
        break
    fi

    # a frozen primary, fenced by now, is killed for the re-seed
    if [[ $FAULT == stop ]]; then kill -KILL "${victims[@]}" 2>/dev/null || true; fi
    # anything of the dead node still alive, forked between the listing and the kill (not
    # expected; swept only now so that scanning /proc takes no CPU from the failover measured)
    extra=0
    for p in $(node_pids "$dead_dir"); do
        kill -KILL "$p" 2>/dev/null && extra=$((extra + 1))
    done
    [[ $extra == 0 ]] || log "failover $f: $extra process(es) of the dead node escaped the kill; killed now"

    # --- re-seed the dead primary's slot as a standby of the new primary ---
    rs_start=$EPOCHREALTIME
    release_shm "$dead_dir"
    cp "${dead_dir%/data}/postgres.log" "$TMP/logs/$(basename "${dead_dir%/data}").log" 2>/dev/null || true
    rm -rf "${dead_dir%/data}"
    seed_standby "$PRIMARY" "$STANDBY"
    # the gateway must have re-adopted it: a probe taken after it was up saw it in recovery
    if ! role=$(gw_wait "$PRIMARY" standby "$EPOCHREALTIME" 30); then
        ABORTED="failover $f: the gateway did not re-adopt ${PORT[$PRIMARY]} as a standby (role $role)"
        break
    fi
    rs_s=$(python3 -c "import sys; print(f'{float(sys.argv[2])-float(sys.argv[1]):.1f}')" "$rs_start" "$EPOCHREALTIME")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$f" "${PORT[$PRIMARY]}" "${PORT[$STANDBY]}" "$t0" "$extra" "$rs_s" "$busy" >>"$FAILOVER_TSV"
    COMPLETED=$f
    tmp=$PRIMARY; PRIMARY=$STANDBY; STANDBY=$tmp
done

# ---------------------------------------------------------------------------------------------
# 5. finish: the probe checks the write invariant, then everything stops
curl -fsS --max-time 5 "http://127.0.0.1:$ADMIN_PORT/metrics" 2>/dev/null \
    | grep -E '^understudy_(failover|session_move|replays|in_doubt|lost_commits|unread_requests)' | grep -v '_bucket' >"$TMP/metrics.txt" || true
echo quit >&7
exec 7>&-
for ((i = 0; i < 300; i++)); do kill -0 "$PROBE_PID" 2>/dev/null || break; sleep 0.1; done
kill -0 "$PROBE_PID" 2>/dev/null && { log "probe did not finish; killing it"; kill -KILL "$PROBE_PID"; }
wait "$PROBE_PID" 2>/dev/null || true
PROBE_PID=""
kill -INT "$GW_PID" 2>/dev/null || true
for ((i = 0; i < 50; i++)); do kill -0 "$GW_PID" 2>/dev/null || break; sleep 0.1; done
kill -KILL "$GW_PID" 2>/dev/null || true
wait "$GW_PID" 2>/dev/null || true
GW_PID=""

# ---------------------------------------------------------------------------------------------
# 6. report
GIT_REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git -C "$ROOT" status --porcelain -- gateway protocol replay 2>/dev/null | head -n1) ]]; then GIT_REV="$GIT_REV (dirty tree)"; fi
PG_VERSION=$("$PGBIN/postgres" --version | awk '{print $3}')
REPORT=$TMP/report.md
python3 - "$PROBE_OUT" "$FAILOVER_TSV" "$TMP/gateway.log" "$FAILOVERS" "$COMPLETED" "$ABORTED" "$CLIENTS" "$TMP/metrics.txt" "$TMP" >"$REPORT" <<PY
import re, statistics, sys
probe_out, tsv, gwlog, wanted, completed, aborted, clients, metrics, tmpdir = sys.argv[1:10]
wanted, completed = int(wanted), int(completed)
clients = [c for c in clients.split(",") if c]
lines = open(probe_out).read().splitlines()
def kv(line):
    return dict(re.findall(r"(\w+)=(\S+)", line))
stalls = {}   # (failover, client) -> dict
for l in lines:
    if l.startswith("stall "):
        d = kv(l); stalls[(int(d["failover"]), d["client"])] = d
errors = [l for l in lines if l.startswith(("error ", "lost ", "fatal "))]
verify = [l for l in lines if l.startswith("verify ")]
fo = [l.split("\t") for l in open(tsv).read().splitlines() if l.strip()]
gw = open(gwlog, errors="replace").read().splitlines()
ansi = re.compile(r"\x1b\[[0-9;]*m")
gw = [ansi.sub("", l) for l in gw]
promo = [l for l in gw if "new primary; old one fenced" in l]
def took(l):
    m = re.search(r"took_ms=(\d+)", l); return int(m.group(1)) if m else None
from datetime import datetime
def ts_ns(l):  # tracing's RFC 3339 UTC timestamp at the start of the line
    try:
        d = datetime.fromisoformat(l.split()[0].replace("Z", "+00:00"))
    except (ValueError, IndexError):
        return None
    return int(d.timestamp()) * 10**9 + d.microsecond * 1000
down = [l for l in gw if "primary is down; failing over" in l]
# PostgreSQL's own view, from the server logs of every incarnation (ms resolution)
import glob
pgev = []  # (ns, kind)
for f in glob.glob(tmpdir + "/logs/*.log") + glob.glob(tmpdir + "/node*/postgres.log"):
    for l in open(f, errors="replace"):
        kind = ("eof" if "could not receive data from WAL stream" in l else
                "ready" if "database system is ready to accept connections" in l else None)
        if kind is None:
            continue
        try:
            d = datetime.strptime(l[:23], "%Y-%m-%d %H:%M:%S.%f")
        except ValueError:
            continue
        from datetime import timezone
        d = d.replace(tzinfo=timezone.utc)
        pgev.append((int(d.timestamp()) * 10**9 + d.microsecond * 1000, kind))
pgev.sort()
def pg_after(kind, t0):
    for t, k in pgev:
        if k == kind and t >= t0 - 1_000_000:  # log lines have ms resolution
            return (t - t0) / 1e6
    return None
def first_after(cands, t0):
    for l in cands:
        t = ts_ns(l)
        if t is not None and t >= t0:
            return l, t
    return None, None
moves = [l for l in gw if "session moved to the new primary" in l]

def pct(v, p):  # nearest-rank percentile
    v = sorted(v); k = max(1, -(-len(v) * p // 100)); return v[int(k) - 1]

print("# Understudy failover benchmark")
print()
print("$(date -u '+%Y-%m-%d %H:%M UTC'), understudy $GIT_REV, PostgreSQL $PG_VERSION, $(nproc) CPUs ($(uname -r)).")
print("Primary + streaming hot standby on 127.0.0.1, " + ("synchronous replication (synchronous_standby_names='*', synchronous_commit=on)" if "$SYNC_REP" == "1" else "asynchronous replication") + ", fsync=$FSYNC, trust auth.")
print("Gateway: \`understudy run --backend PRIMARY --backend STANDBY --promote auto\`, all other settings default")
print("(probe_timeout_ms=1000, probe_attempts=3, topology_interval_ms=1000, standby_silence_ms=2000).")
print("Clients (bench/failover_probe), each on ONE connection through the gateway for the whole run, one statement every ${INTERVAL_MS} ms:")
print("\`read\` = \`SELECT inet_server_port()\` (simple protocol); \`write\` = autocommit \`INSERT … RETURNING inet_server_port()\`")
print("(extended protocol, named prepared statement); \`simple-write\` = the same INSERT as a simple-protocol Query, values in its text;"
      " \`block-write\` = \`BEGIN; INSERT …; COMMIT\` in one Query; \`mixed-write\` = \`SET …; INSERT …\` in one Query.")
print("Fault: SIGKILL of every process of the primary (postmaster and children, microseconds apart) after ${SETTLE} s of steady traffic." if "$FAULT" == "kill" else
      "Fault: SIGSTOP of every process of the primary (postmaster and children, microseconds apart: a hung host, no connection closes) after ${SETTLE} s of steady traffic; standbys run with wal_receiver_timeout = 5 s; the frozen node is SIGKILLed once every client recovered. The stall targets below are for SIGKILL.")
print("Stall = kill instant → completion of that connection's first successful statement answered by the new primary.")
print("After each failover the dead node is re-seeded (pg_basebackup) as a standby of the new primary and re-adopted by the gateway.")
print()
print(f"Failovers: {completed} of {wanted} completed" + (f" — **stopped: {aborted}**" if aborted else "") + ".")
print()
print("## Stall per failover (ms)")
print()
hdr = "| # | killed → new | " + " | ".join(f"{c} stall" for c in clients) + " | kill → standby's WAL receiver loses it (PG log) | kill → gateway says primary down | kill → promoted standby ready (PG log) | gateway promotion (took_ms) | client errors | re-seed s | machine busy before kill % |"
print(hdr)
print("|---:|---|" + "---:|" * len(clients) + "---:|---:|---:|---:|---|---:|---:|")
eof_ms, ready_ms = [], []
detect_ms, promo_ms = [], []
ids = sorted({k[0] for k in stalls})
fo_by = {int(r[0]): r for r in fo}
for i in ids:
    r = fo_by.get(i)
    ports = f"{r[1]} → {r[2]}" if r else "?"
    cells = []
    errs = []
    for c in clients:
        d = stalls.get((i, c))
        if d is None:
            cells.append("—"); continue
        s = f"{float(d['ms']):.1f}"
        if d.get("reconnected") == "1": s += " (reconnected)"
        if d.get("late_old", "0") != "0": s += f" (late_old={d['late_old']})"
        cells.append(s)
        if d.get("errors", "0") != "0": errs.append(f"{c}: {d['errors']}")
    dm = pm = em = rm = None
    if r:
        t0 = int(r[3])
        em = pg_after("eof", t0)
        rm = pg_after("ready", t0)
        if em is not None: eof_ms.append(em)
        if rm is not None: ready_ms.append(rm)
        _, td = first_after(down, t0)
        if td is not None:
            dm = (td - t0) / 1e6; detect_ms.append(dm)
        lp, _ = first_after(promo, t0)
        if lp is not None and took(lp) is not None:
            pm = took(lp); promo_ms.append(pm)
    print(f"| {i} | {ports} | " + " | ".join(cells) + f" | {'?' if em is None else f'{em:.0f}'} | {'?' if dm is None else f'{dm:.1f}'} | {'?' if rm is None else f'{rm:.0f}'} | {'?' if pm is None else pm} | {', '.join(errs) or '0'} | {r[5] if r else '?'} | {r[6] if r else '?'} |")
print()
print("## Summary")
print()
print("| client | n | p50 ms | p90 ms | max ms | mean ms | min ms | target p50 ≤ 500 | target max ≤ 1000 |")
print("|---|---:|---:|---:|---:|---:|---:|:---:|:---:|")
allv = []
verdict = []
for c in clients + ["all"]:
    v = [float(d["ms"]) for (i, cc), d in stalls.items() if cc == c] if c != "all" else allv
    if c != "all": allv += v
    if not v:
        print(f"| {c} | 0 | | | | | | | |"); continue
    p50 = statistics.median(v); mx = max(v)
    ok50, okmx = p50 <= 500, mx <= 1000
    verdict.append((c, p50, mx, ok50, okmx))
    print(f"| {c} | {len(v)} | {p50:.1f} | {pct(v,90):.1f} | {mx:.1f} | {statistics.mean(v):.1f} | {min(v):.1f} | {'met' if ok50 else '**missed**'} | {'met' if okmx else '**missed**'} |")
print()
if eof_ms:
    print(f"Kill → the standby's WAL receiver sees the connection close (PostgreSQL log, ms resolution): p50 {statistics.median(eof_ms):.0f} ms,"
          f" max {max(eof_ms):.0f} ms — the time the kernel takes to tear the killed processes down; no client can notice earlier.")
if detect_ms:
    print(f"Detection (kill instant → gateway logs 'primary is down; failing over', i.e. a session noticed the broken backend and the"
          f" health probe was refused): p50 {statistics.median(detect_ms):.1f} ms, max {max(detect_ms):.1f} ms.")
if ready_ms:
    print(f"Kill → the promoted standby logs 'ready to accept connections': p50 {statistics.median(ready_ms):.0f} ms, max {max(ready_ms):.0f} ms.")
if promo_ms:
    print(f"Gateway promotion time (coordinator: failure noticed → standby promoted, log \`took_ms\`): "
          f"p50 {statistics.median(promo_ms):.0f} ms, max {max(promo_ms)} ms over {len(promo_ms)} failovers.")
mv = [took(l) for l in moves if took(l) is not None]
if mv:
    print(f"Session moves (log \`session moved to the new primary\`, broken backend noticed → session running on the new primary): "
          f"{len(mv)}, p50 {statistics.median(mv):.0f} ms, max {max(mv)} ms.")
print()
print("## Client errors")
print()
if errors:
    print(f"{len(errors)} (reads should get none; an autocommit INSERT in flight at the kill may get 08007 by design):")
    print()
    print("\`\`\`")
    for l in errors: print(l)
    print("\`\`\`")
    doubt = {(kv(l)["client"], kv(l)["seq"]): kv(l)["present"] for l in lines if l.startswith("doubt ")}
    werr = [kv(l) for l in errors if kv(l).get("client", "").endswith("write") and "seq" in kv(l)]
    if werr:
        print()
        print("Write errors: when the INSERT was sent relative to the kill (sent_ms < 0: in flight when the primary died;"
              " > 0: sent to the gateway after the SIGKILL, which the kernel takes milliseconds to carry out: a backend may"
              " still read and commit such a write) and whether it is in the table at the end:")
        print()
        print("| failover | client | seq | sqlstate | sent_ms | answered after kill ms | in the table |")
        print("|---:|---|---:|---|---:|---:|:---:|")
        for d in werr:
            pres = {"1": "yes", "0": "no"}.get(doubt.get((d["client"], d["seq"]), "?"), "?")
            print(f"| {d['failover']} | {d['client']} | {d['seq']} | {d['sqlstate']} | {d.get('sent_ms','?')} | {d.get('after_kill_ms','?')} | {pres} |")
        by = {}
        for d in werr:
            try:
                sm = float(d.get("sent_ms", "nan"))
                when = ("sent before the kill (in flight)" if sm < 0 else
                        "sent < 1 ms after the kill instant (the kill takes effect within about that)" if sm < 1 else
                        "sent ≥ 1 ms after the kill (its processes may not all be gone yet)")
            except ValueError:
                when = "?"
            pres = {"1": "applied", "0": "not applied"}.get(doubt.get((d["client"], d["seq"]), "?"), "?")
            key = (d["client"], d["sqlstate"], when, pres)
            by[key] = by.get(key, 0) + 1
        print()
        for (client, code, when, pres), n in sorted(by.items()):
            print(f"- {client}: {code}, {when}, {pres}: {n}")
    dup = [l for l in errors if "sqlstate=23505" in l and "failover_probe_pkey" in l]
    if dup:
        print()
        print(f"**{len(dup)} × 23505 on the probe's primary key**: every INSERT carries a new seq, so a duplicate key on (client, seq) "
              "means the gateway executed that INSERT a second time on the new primary after it had already committed "
              "(and replicated) before the kill — applied twice, stopped only by the primary key. The design asks for 08007 "
              "(or the xid-based outcome) for an in-flight autocommit write, never a re-run.")
else:
    print("None: no statement failed, no connection was lost.")
print()
print("## Write invariant")
print()
if verify:
    for l in verify: print(f"- \`{l}\`")
    print()
    print("(acked = INSERTs the client saw succeed; missing/duplicates must be 0; in_doubt = INSERTs that got an error, in_doubt_present = of those, how many are in the table.)")
else:
    print("(no write client or no verification line)")
print()
print("## Targets")
print()
for c, p50, mx, ok50, okmx in verdict:
    print(f"- {c}: p50 {p50:.1f} ms vs ≤ 500 → {'met' if ok50 else 'MISSED'}; max {mx:.1f} ms vs ≤ 1000 → {'met' if okmx else 'MISSED'}")
print()
print("## Gateway metrics at the end")
print()
try:
    m = [l for l in open(metrics).read().splitlines() if l.strip()]
except OSError:
    m = []
print("\`\`\`")
for l in m: print(l)
if not m: print("(not available)")
print("\`\`\`")
print()
print("## Gateway log (failover lines, WARN and ERROR)")
print()
keep = [l for l in gw if any(s in l for s in (" WARN ", " ERROR ", "failing over", "new primary", "back as a standby", "session moved", "health monitor", "in flight", "primary found"))]
print("\`\`\`")
for l in keep[:400]: print(l)
if len(keep) > 400: print(f"... {len(keep) - 400} more lines")
print("\`\`\`")
PY

cp "$REPORT" "$RESULTS"
echo
cat "$REPORT"
echo
log "report written to $RESULTS"
[[ -z $ABORTED ]] || exit 1
