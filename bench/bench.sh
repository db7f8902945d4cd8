#!/usr/bin/env bash
# Understudy benchmark: throughput, per-round-trip latency and idle-session memory of the gateway,
# measured side by side with a direct PostgreSQL connection and PgBouncer in session mode.
#
# What it measures
#   1. Throughput: pgbench `-S` (select-only, simple protocol), `-S -M prepared` and `-N`
#      (simple-update: BEGIN, UPDATE, SELECT, INSERT, END = 5 round trips a transaction) at
#      `-c $CLIENTS -j $THREADS -T $DURATION`. Each workload runs $ROUNDS rounds; each round
#      interleaves direct, understudy and pgbouncer (the order rotated each round) so drift
#      (autovacuum, cache, thermal) hits all three alike. Reported: median TPS ("without initial
#      connection time"), the median of the per-round ratios to direct (each target against the
#      direct run of the same round), the median of the per-round understudy/pgbouncer ratios
#      with a 95 % interval, and the added time per statement derived from the median TPS:
#      (CLIENTS/TPS_target - CLIENTS/TPS_direct) / statements per transaction. Target:
#      understudy/pgbouncer >= 1 (understudy's ratio to direct >= PgBouncer's) on every workload.
#      With HA=1 (default) a fourth target, "understudy-ha", is the same gateway armed for failover:
#      a second backend (a streaming standby of the cluster, started for the run), so its sessions
#      can move: it journals every request and answer, and the server also runs its xid capture
#      (one small statement per writing transaction, an autocommit batch included) and the
#      WAL-position query (after other autocommit writes). The one-backend "understudy" can move no session, keeps no journal and
#      sends the server nothing the client did not. The standby replays the primary's WAL during
#      every run, whatever the target.
#   1b. System calls per transaction: one more pgbench run per proxy and workload (same flags),
#      with `perf stat -e 'syscalls:sys_enter_*' -p PID` counting every system call the proxy
#      process makes (linux-perf is installed with apt when missing; skipped with a note where the
#      tracepoints are not available). Counting slows the run, so its TPS is not used; the counts
#      are exact, and on loopback the kernel work they stand for is most of a proxy's cost.
#   2. Latency probe: one client, `-S -M prepared` (one round trip a transaction), `taskset -c
#      $LAT_CPU pgbench -c 1 -j 1`, $LAT_ROUNDS interleaved rounds. Reported: median "latency average" and
#      the microseconds each proxy adds per round trip. With LAT_PIN=all (default) PostgreSQL, the
#      gateway and PgBouncer are pinned to the same CPU for the probe (taskset -a -p, undone after):
#      on a small VM an idle second CPU makes every cross-CPU wake-up cost a variable few tens of
#      µs (cpuidle/haltpoll), which swamps the proxies' cost and can even make a proxy look faster
#      than a direct connection (it keeps the other CPU awake). On one CPU the added latency is the
#      proxy's own work per round trip plus its context switches. LAT_PIN=client pins pgbench only.
#   3. Memory: a fresh gateway alone; a small Python (stdlib only) client opens $SESSIONS idle
#      sessions through it over raw sockets (StartupMessage -> ReadyForQuery), and the gateway's
#      VmRSS (/proc/PID/status) before and after gives KiB per idle session; measured again after
#      each session ran one `SELECT 1`. Target: <= 64 KiB per idle session. PgBouncer's figure is
#      measured the same way for reference.
#   4. Login time: $LOGIN_ROUNDS interleaved rounds (order rotated) of $LOGIN_SESSIONS sequential
#      logins held open, through direct, understudy (the fresh gateway of 3., default spare
#      backend connections) and PgBouncer; reported: the median of the rounds' mean login time.
#
# Setup (all throwaway, all on 127.0.0.1, everything removed on exit)
#   - builds target/release/understudy (unless SKIP_BUILD=1);
#   - installs pgbouncer with apt when missing (the Debian service is stopped and disabled);
#   - a PostgreSQL 15 cluster in a temp dir, run as user postgres: max_connections=600,
#     shared_buffers=256MB, synchronous_commit=off (fsync stays on: commits are not waited for, so
#     -N measures the proxies rather than the disk's flush latency; durability is unaffected apart
#     from the last few hundred ms of commits on a crash), max_wal_size=4GB (no checkpoint storms),
#     pg_hba `trust` for 127.0.0.1 (authentication is kept out of the measurement);
#     `pgbench -i -s $SCALE`, then one VACUUM ANALYZE; every measured run uses `-n`;
#   - understudy `run` with the default client_auth (passthrough: PostgreSQL decides the login);
#     with HA=1 also a streaming standby (pg_basebackup -R, async) and a second understudy with
#     both servers as backends (promote = "external", the default: it never promotes by itself);
#   - pgbouncer pool_mode=session, auth_type=trust, max_client_conn=1000, default_pool_size=600.
#   libpq is told PGSSLMODE=disable for all three targets.
#
# How long: about 3 workloads x 3 targets x ROUNDS x DURATION + 3 x LAT_ROUNDS x DURATION (probe)
#   + warm-ups (WARMUP s per target per workload) + 3 workloads x proxies x (DURATION + 1)
#   (system calls) + ~30 s setup/memory test; with HA=1 the throughput runs have 4 targets.
#   Defaults (DURATION=5 ROUNDS=10): ~17 minutes, plus the cargo build when it is not up to date.
#   Many short rounds rather than a few long ones: TPS here drifts by ±15 % over minutes, and
#   ten paired rounds give the per-round ratios a 95 % interval.
#   The machine should be otherwise idle: before every run the script samples how busy the CPUs are
#   for 0.5 s (raw table, "background CPU %"), so a concurrent build or test run shows up in the report;
#   IDLE_WAIT=N makes it wait up to N s before each run for the machine to be < 10 % busy (this can
#   lengthen the run by up to 120 x N s with the defaults).
#   Quick check: DURATION=5 ROUNDS=1 (~2 minutes).
#
# Knobs (environment):
#   DURATION=5   seconds per pgbench run         ROUNDS=10   interleaved rounds per workload
#   SCALE=10     pgbench scale factor            CLIENTS=8   clients for the throughput runs
#   THREADS=2    pgbench -j                      WARMUP=2    seconds of untimed warm-up per target
#   SESSIONS=500 idle sessions for the memory test (max_connections is 600)
#   LOGIN_ROUNDS=5 LOGIN_SESSIONS=100  login probe rounds, and logins per target and round
#   LAT_CPU=1    CPU the latency probe is pinned to     LAT_PIN=all|client (see 2. above)
#   LAT_ROUNDS=$ROUNDS  rounds of the latency probe (e.g. LAT_ROUNDS=3 with ROUNDS=30)
#   SKIP_BUILD=1 use the existing target/release/understudy
#   GATEWAY_BIN=... the gateway binary to measure (default target/release/understudy; with
#                SKIP_BUILD=1, e.g. to compare two builds run by run)
#   RESULTS=...  where the markdown report goes (default bench/results-latest.md; the raw runs go
#                next to it as .tsv: kind workload target round tps latency_ms background_cpu_pct proxy_cpu_us_per_tx
#                preemptions_per_tx proxy_user_us_per_tx proxy_system_us_per_tx machine_cpu_us_per_tx machine_idle_pct
#                tcp_segments_per_tx)
#   KEEP_TMP=1   keep the temp dir (logs) after the run
#   IDLE_WAIT=0  seconds to wait, before each run, for other work on the machine to stop
#   PGB_SERVERS=fresh|pooled  fresh (default): PgBouncer's idle server connections are closed
#                before each of its runs, so its pgbench clients get new backends like direct's
#                and understudy's (a backend's first seconds cost more: catalog caches, and
#                ~30k page faults as 8 new backends map shared_buffers, against ~4.5k for
#                reused ones); pooled: PgBouncer keeps them from run to run, as it would in
#                production, which adds its pooling benefit to its proxy cost
#   TRANSPORT=tcp|unix  how pgbench reaches each target and the proxies reach PostgreSQL: tcp
#                (default) over 127.0.0.1; unix by Unix-domain sockets at both ends (the
#                server's socket directory, understudy's unix_socket_dir and a backend named
#                by its socket directory, PgBouncer's unix_socket_dir and host=<dir>), as on a
#                database host where the proxy runs beside PostgreSQL; the memory and login
#                probes stay on TCP
#   HA=1         also measure understudy armed for failover (see 1. above); HA=0 skips it
#   SYSCALLS=1   count each proxy's system calls per transaction (see 1b. above); SYSCALLS=0 skips it
#   WORKLOADS="-S,-S -M prepared,-N"  the throughput workloads, comma-separated (e.g. WORKLOADS=-N
#                ROUNDS=30 for a narrower interval on one of them); -A is one more: an autocommit
#                UPDATE of pgbench_accounts per transaction, `-M prepared` (a driver's autocommit
#                write, which understudy-ha gives its xid query in front of the Sync); -A -M simple,
#                the same UPDATE as a simple-protocol Query (psql's, which understudy-ha sends as
#                such a batch)
#   PGBIN=/usr/lib/postgresql/15/bin
#
# Usage: bench/bench.sh            (as root; see bench/README.md)

set -euo pipefail

DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-10}
LAT_ROUNDS=${LAT_ROUNDS:-$ROUNDS}
SCALE=${SCALE:-10}
CLIENTS=${CLIENTS:-8}
THREADS=${THREADS:-2}
WARMUP=${WARMUP:-2}
SESSIONS=${SESSIONS:-500}
LOGIN_ROUNDS=${LOGIN_ROUNDS:-5}
LOGIN_SESSIONS=${LOGIN_SESSIONS:-100}
LAT_CPU=${LAT_CPU:-1}
LAT_PIN=${LAT_PIN:-all}
IDLE_WAIT=${IDLE_WAIT:-0}
PGB_SERVERS=${PGB_SERVERS:-fresh}
SKIP_BUILD=${SKIP_BUILD:-0}
HA=${HA:-1}
TRANSPORT=${TRANSPORT:-tcp}
SYSCALLS=${SYSCALLS:-1}
WORKLOADS=${WORKLOADS:--S,-S -M prepared,-N}
KEEP_TMP=${KEEP_TMP:-0}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
RESULTS=${RESULTS:-$BENCH_DIR/results-latest.md}
GATEWAY_BIN=${GATEWAY_BIN:-$ROOT/target/release/understudy}
BENCH_NAME=bench
# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"
GIT_REV=$(git_rev "$ROOT")

require_root "needs apt, runuser and taskset"
IFS=, read -r -a WORKLOAD_NAMES <<<"$WORKLOADS"
for w in "${WORKLOAD_NAMES[@]}"; do
    case $w in
    "-S" | "-S -M prepared" | "-N" | "-A" | "-A -M simple") ;;
    *) die "WORKLOADS: unknown workload '$w' (use -S, -S -M prepared, -N, -A and -A -M simple, comma-separated)" ;;
    esac
done
[[ $TRANSPORT == tcp || $TRANSPORT == unix ]] || die "TRANSPORT must be tcp or unix, not '$TRANSPORT'"
for knob in DURATION ROUNDS LAT_ROUNDS; do
    [[ ${!knob} =~ ^[1-9][0-9]*$ ]] || die "$knob must be a positive whole number, not '${!knob}'"
done
require_tools pgbench psql taskset python3 runuser
[[ -x $PGBIN/initdb && -x $PGBIN/pg_ctl ]] || die "PostgreSQL binaries not found in $PGBIN"
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# ---------------------------------------------------------------------------------------------
# cleanup
TMP=""
PG_DATA=""
GW_PID=""
HAGW_PID=""
MEMGW_PID=""
SB_DATA=""
PGB_PIDFILE=""
PGB_PID=""
cleanup() {
    local rc=$?
    set +e
    kill_now "$GW_PID" "$HAGW_PID" "$MEMGW_PID"
    if [[ -n $PGB_PIDFILE && -s $PGB_PIDFILE ]]; then
        PGB_PID=$(cat "$PGB_PIDFILE")
    fi
    if [[ -n $PGB_PID ]] && kill -0 "$PGB_PID" 2>/dev/null; then
        kill -TERM "$PGB_PID" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$PGB_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$PGB_PID" 2>/dev/null
    fi
    stop_cluster "$SB_DATA"
    stop_cluster "$PG_DATA"
    wait 2>/dev/null
    finish_tmp "$rc"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_sql port sql want tenths: runs sql on port (database postgres) up to `tenths` times,
# 0.1 s apart, until it prints want; fails if it never does
wait_sql() {
    local i
    for ((i = 0; i < $4; i++)); do
        [[ $(psql -X -q -t -A -h 127.0.0.1 -p "$1" -d postgres -c "$2") == "$3" ]] && return 0
        sleep 0.1
    done
    return 1
}

loadavg() { cut -d' ' -f1 /proc/loadavg; }
ALL_CPUS=0-$(($(nproc) - 1))

# SIGINT, then SIGKILL after a few seconds: understudy's drain waits for shutdown_timeout (30 s)
stop_gateway() {
    local pid=$1 i
    kill -INT "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        log "understudy (pid $pid) still draining 5 s after SIGINT with no sessions; SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

# ---------------------------------------------------------------------------------------------
# 1. build
if [[ $SKIP_BUILD != 1 ]]; then
    log "cargo build --release -p understudy"
    (cd "$ROOT" && cargo build --release -p understudy)
fi
[[ -x $GATEWAY_BIN ]] || die "$GATEWAY_BIN missing (build it or unset SKIP_BUILD)"

# ---------------------------------------------------------------------------------------------
# pgbouncer (installed when missing; the distribution's service must not stay running)
if ! command -v pgbouncer >/dev/null; then
    log "installing pgbouncer with apt"
    made_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        # keep apt from starting the service at all; removed again right after
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    apt_rc=0
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer; } >&2 || apt_rc=$?
    [[ $made_policy == 1 ]] && rm -f /usr/sbin/policy-rc.d
    [[ $apt_rc -eq 0 ]] || die "apt-get install pgbouncer failed"
    # in case a service manager started it anyway: stop and disable the system instance
    if command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
        systemctl disable --now pgbouncer >/dev/null 2>&1 || true
    fi
    if [[ -x /etc/init.d/pgbouncer ]]; then
        /etc/init.d/pgbouncer stop >/dev/null 2>&1 || true
        update-rc.d pgbouncer disable >/dev/null 2>&1 || true
    fi
fi
command -v pgbouncer >/dev/null || die "pgbouncer not available"
PGBOUNCER_BIN=$(command -v pgbouncer)

# ---------------------------------------------------------------------------------------------
# 2. throwaway PostgreSQL cluster
TMP=$(mktemp -d /tmp/understudy-bench.XXXXXX)
chmod 755 "$TMP"
mkdir -p "$TMP/pg" "$TMP/pgbouncer" "$TMP/gw"
chown postgres:postgres "$TMP/pg" "$TMP/pgbouncer"
PG_DATA=$TMP/pg/data
PG_PORT=$(free_port)
export PGUSER=postgres PGSSLMODE=disable PGGSSENCMODE=disable PGAPPNAME=understudy-bench
unset PGPASSWORD PGHOST PGPORT PGDATABASE PGSERVICE
DB=bench # init_primary's
printf '%s\n' '\set aid random(1, 100000 * :scale)' \
    'UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;' >"$TMP/autocommit.sql"
chmod 644 "$TMP/autocommit.sql"
log "temp dir $TMP; initdb (PostgreSQL on 127.0.0.1:$PG_PORT)"
init_primary "$TMP/pg" "$PG_PORT" 600 "$SCALE"

if [[ $HA == 1 ]]; then
    SB_DATA=$TMP/pg/standby
    SB_PORT=$(free_port)
    log "streaming standby on 127.0.0.1:$SB_PORT (pg_basebackup -R)"
    runuser -u postgres -- "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$PG_PORT" -U postgres -D "$SB_DATA" -R -X stream -c fast \
        >"$TMP/pg/basebackup.log" 2>&1 || { cat "$TMP/pg/basebackup.log" >&2; die "pg_basebackup failed"; }
    # The copied postgresql.conf names the primary's port; the last setting wins.
    printf '\nport = %s\n' "$SB_PORT" >>"$SB_DATA/postgresql.conf"
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$SB_DATA" -l "$TMP/pg/standby.log" -w -t 60 start >/dev/null \
        || { tail -n 30 "$TMP/pg/standby.log" >&2; die "the standby did not start"; }
    wait_sql "$PG_PORT" "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'" 1 100 \
        || die "the standby does not stream"
fi

# ---------------------------------------------------------------------------------------------
# 3. understudy and pgbouncer
GW_PORT=$(free_port)
GW_ADMIN_PORT=$(free_port)
# server_at port: a PostgreSQL server's address as the proxies are told it (TRANSPORT)
server_at() {
    if [[ $TRANSPORT == unix ]]; then echo "$TMP/pg:$1"; else echo "127.0.0.1:$1"; fi
}
start_gateway() { # port admin_port logfile [more --backend flags] -> sets STARTED_PID
    # setsid: the gateway runs in a session of its own, as a service (and PgBouncer, which
    # daemonizes) would. In the script's session it would share one scheduler autogroup with
    # pgbench (kernel.sched_autogroup_enabled=1), and the clients it wakes would preempt it
    # twice as often as they preempt PgBouncer.
    local socket=()
    [[ $TRANSPORT == tcp ]] || socket=(--unix-socket-dir "$TMP/gw")
    RUST_LOG=${RUST_LOG:-warn} setsid "$GATEWAY_BIN" run --listen "127.0.0.1:$1" --backend "$(server_at "$PG_PORT")" \
        --admin-listen "127.0.0.1:$2" "${socket[@]}" "${@:4}" >"$3" 2>&1 &
    STARTED_PID=$!
    wait_port "$1" 30 || { tail -n 30 "$3" >&2; die "understudy did not start listening on $1"; }
}
log "starting understudy on 127.0.0.1:$GW_PORT (admin $GW_ADMIN_PORT)"
start_gateway "$GW_PORT" "$GW_ADMIN_PORT" "$TMP/gw/understudy.log"
GW_PID=$STARTED_PID
if [[ $HA == 1 ]]; then
    HAGW_PORT=$(free_port)
    HAGW_ADMIN_PORT=$(free_port)
    log "starting understudy-ha (backends: primary and standby) on 127.0.0.1:$HAGW_PORT"
    start_gateway "$HAGW_PORT" "$HAGW_ADMIN_PORT" "$TMP/gw/understudy-ha.log" --backend "$(server_at "$SB_PORT")"
    HAGW_PID=$STARTED_PID
    # Routed once the first role probe has found the primary.
    for _ in $(seq 100); do
        psql -X -q -t -A -h 127.0.0.1 -p "$HAGW_PORT" -d "$DB" -c "SELECT 1" >/dev/null 2>&1 && break
        sleep 0.1
    done
fi

PGB_PORT=$(free_port)
PGB_DIR=$TMP/pgbouncer
PGB_PIDFILE=$PGB_DIR/pgbouncer.pid
cat >"$PGB_DIR/userlist.txt" <<EOF
"postgres" ""
EOF
cat >"$PGB_DIR/pgbouncer.ini" <<EOF
[databases]
* = host=$(if [[ $TRANSPORT == unix ]]; then echo "$TMP/pg"; else echo 127.0.0.1; fi) port=$PG_PORT

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir = $(if [[ $TRANSPORT == unix ]]; then echo "$PGB_DIR"; fi)
auth_type = trust
auth_file = $PGB_DIR/userlist.txt
pool_mode = session
max_client_conn = 1000
default_pool_size = 600
max_db_connections = 0
logfile = $PGB_DIR/pgbouncer.log
pidfile = $PGB_PIDFILE
log_connections = 0
log_disconnections = 0
log_stats = 0
stats_period = 3600
EOF
chown -R postgres:postgres "$PGB_DIR"
log "starting pgbouncer on 127.0.0.1:$PGB_PORT"
runuser -u postgres -- "$PGBOUNCER_BIN" -d "$PGB_DIR/pgbouncer.ini" >"$PGB_DIR/stdout.log" 2>&1 \
    || { cat "$PGB_DIR/stdout.log" "$PGB_DIR/pgbouncer.log" >&2 2>/dev/null; die "pgbouncer did not start"; }
wait_port "$PGB_PORT" 30 || { cat "$PGB_DIR/pgbouncer.log" >&2; die "pgbouncer not listening"; }
for _ in $(seq 50); do [[ -s $PGB_PIDFILE ]] && break; sleep 0.1; done
PGB_PID=$(cat "$PGB_PIDFILE")

TARGETS=(direct understudy pgbouncer)
declare -A PORT=([direct]=$PG_PORT [understudy]=$GW_PORT [pgbouncer]=$PGB_PORT)
# Where pgbench finds each target: an address, or a socket directory (TRANSPORT=unix).
declare -A HOST=([direct]=127.0.0.1 [understudy]=127.0.0.1 [understudy-ha]=127.0.0.1 [pgbouncer]=127.0.0.1)
if [[ $TRANSPORT == unix ]]; then
    HOST=([direct]=$TMP/pg [understudy]=$TMP/gw [understudy-ha]=$TMP/gw [pgbouncer]=$PGB_DIR)
fi
# Throughput also runs the armed gateway; the latency probe (read-only, where the two
# gateways do the same work) and the memory test do not.
TPUT_TARGETS=("${TARGETS[@]}")
if [[ $HA == 1 ]]; then
    TPUT_TARGETS=(direct understudy understudy-ha pgbouncer)
    PORT[understudy-ha]=$HAGW_PORT
fi

# sanity: every target answers
for t in "${TPUT_TARGETS[@]}"; do
    psql -X -q -t -A -h "${HOST[$t]}" -p "${PORT[$t]}" -d "$DB" -c "SELECT 1" >/dev/null \
        || die "$t (port ${PORT[$t]}) does not answer"
done

# ---------------------------------------------------------------------------------------------
# measurement helpers
RAW=$TMP/raw.tsv # kind workload target round tps latency_ms background_busy_pct [proxy_cpu_us_per_tx preemptions_per_tx proxy_user_us_per_tx proxy_system_us_per_tx machine_cpu_us_per_tx machine_idle_pct tcp_segments_per_tx]
: >"$RAW"

check_target_alive() {
    case $1 in
    understudy) kill -0 "$GW_PID" 2>/dev/null || { tail -n 40 "$TMP/gw/understudy.log" >&2; die "understudy died"; } ;;
    understudy-ha) kill -0 "$HAGW_PID" 2>/dev/null || { tail -n 40 "$TMP/gw/understudy-ha.log" >&2; die "understudy-ha died"; } ;;
    pgbouncer) kill -0 "$PGB_PID" 2>/dev/null || { tail -n 40 "$PGB_DIR/pgbouncer.log" >&2; die "pgbouncer died"; } ;;
    esac
}

# The cluster's client backends, PgBouncer's server connections among them, but not the
# gateways' kept control connections (a FROM ... WHERE clause of pg_stat_activity).
CLIENT_BACKENDS="FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() AND application_name <> 'understudy-control'"
# Ends every client backend (PgBouncer drops a server connection whose backend has ended).
terminate_client_backends() {
    psql -X -q -t -A -h 127.0.0.1 -p "$PG_PORT" -d postgres \
        -c "SELECT count(pg_terminate_backend(pid)) $CLIENT_BACKENDS" >/dev/null
}

# Closes the server connections PgBouncer keeps idle (see PGB_SERVERS); nothing else is
# connected between runs but the gateways' control connections and spares.
fresh_pgbouncer_servers() {
    [[ $PGB_SERVERS == fresh ]] || return 0
    terminate_client_backends
    wait_sql "$PG_PORT" "SELECT count(*) $CLIENT_BACKENDS" 0 50 || true
    sleep 0.2 # PgBouncer reads the FATAL of each and drops it
}

# prepare_target target: checks the target is up and gives PgBouncer fresh server connections
# (PGB_SERVERS). Called before a run's measurements start, so that this work (a psql, the
# backends' exits, a pause) counts neither as the run's CPU nor as its idle time.
prepare_target() {
    check_target_alive "$1"
    [[ $1 != pgbouncer ]] || fresh_pgbouncer_servers
}

# workload_args workload: sets wargs to its pgbench arguments. -A stands for one autocommit
# UPDATE a transaction in the extended protocol (what a driver sends outside a transaction),
# which a gateway armed for failover gives its xid query, in front of the Sync.
workload_args() {
    if [[ $1 == -A ]]; then
        wargs=(-M prepared -f "$TMP/autocommit.sql")
    elif [[ $1 == "-A -M simple" ]]; then
        wargs=(-M simple -f "$TMP/autocommit.sql")
    else
        read -r -a wargs <<<"$1"
    fi
}

# run_pgbench target outfile seconds [prefix...] -- [pgbench args...]; after prepare_target.
run_pgbench() {
    local target=$1 out=$2 secs=$3
    shift 3
    local prefix=()
    while [[ $# -gt 0 && $1 != -- ]]; do prefix+=("$1"); shift; done
    shift
    local rc=0
    "${prefix[@]}" pgbench -n -h "${HOST[$target]}" -p "${PORT[$target]}" -T "$secs" "$@" "$DB" >"$out" 2>&1 || rc=$?
    if [[ $rc -ne 0 ]]; then
        log "pgbench against $target exited $rc:"
        tail -n 15 "$out" >&2
    fi
    return 0
}
# proxy_pid target -> the proxy's process id; nothing for direct.
proxy_pid() {
    case $1 in
    understudy) echo "$GW_PID" ;;
    understudy-ha) echo "$HAGW_PID" ;;
    pgbouncer) echo "$PGB_PID" ;;
    esac
}
# proxy_usage target -> "user_ticks system_ticks preemptions" of the proxy process (CPU in clock
# ticks, involuntary context switches), summed over its threads; "0 0 0" for direct.
proxy_usage() {
    local pid
    pid=$(proxy_pid "$1")
    [[ -n $pid ]] || { echo "0 0 0"; return; }
    local ticks preempt
    ticks=$(awk '{print $14, $15}' "/proc/$pid/stat")
    preempt=$(awk '/^nonvoluntary_ctxt_switches/ {print $2}' "/proc/$pid/status")
    echo "$ticks $preempt"
}
# machine_usage -> "busy_ticks idle_ticks tcp_segments_sent" of the whole machine (all CPUs,
# every process: PostgreSQL, pgbench and the proxy alike; idle includes iowait; time stolen by
# the hypervisor is neither)
machine_usage() {
    awk '/^cpu / { for (i = 2; i <= 8; i++) t += $i; printf "%d %d ", t - $5 - $6, $5 + $6 }' /proc/stat
    awk '/^Tcp:/ { if (!c) { for (i = 1; i <= NF; i++) if ($i == "OutSegs") c = i } else print $c }' /proc/net/snmp
}
CLK_TCK=$(getconf CLK_TCK)
# pm_children -> how many processes the postmaster has (background workers, backends, spares)
pm_children() { pgrep -c -P "$(head -n1 "$PG_DATA/postmaster.pid")" || true; }
# end_backends N: with PGB_SERVERS=fresh, ends the client backends a run left behind (PgBouncer
# keeps its server connections; Understudy's and direct's backends end with their clients); then
# waits, up to 3 s, for the postmaster to be back at N children. The same psql runs after every
# target's run, so each run's machine CPU includes the exits of the backends it started, whoever
# started them. With PGB_SERVERS=pooled PgBouncer keeps its server connections, as it would.
end_backends() {
    local i
    [[ $PGB_SERVERS != fresh ]] || terminate_client_backends
    for ((i = 0; i < 60; i++)); do
        [[ $(pm_children) -gt $1 ]] || return 0
        sleep 0.05
    done
}

# ---------------------------------------------------------------------------------------------
# 4. throughput
LOAD_START=$(loadavg)
BUSY_START=$(background_busy)
[[ $BUSY_START -lt 10 ]] || log "WARNING: the machine is ${BUSY_START}% busy before the runs: something else is using the CPUs"
for w in "${WORKLOAD_NAMES[@]}"; do
    workload_args "$w"
    if [[ $WARMUP -gt 0 ]]; then
        for t in "${TPUT_TARGETS[@]}"; do
            prepare_target "$t"
            run_pgbench "$t" "$TMP/warmup.out" "$WARMUP" -- -c "$CLIENTS" -j "$THREADS" "${wargs[@]}"
        done
    fi
    for ((r = 1; r <= ROUNDS; r++)); do
        for ((k = 0; k < ${#TPUT_TARGETS[@]}; k++)); do
            t=${TPUT_TARGETS[$(((k + r - 1) % ${#TPUT_TARGETS[@]}))]}
            out=$TMP/tput-$(tr -c 'A-Za-z0-9' '_' <<<"$w")-$t-$r.out
            prepare_target "$t"
            load=$(wait_quiet 9 "$IDLE_WAIT")
            read -r user0 sys0 preempt0 < <(proxy_usage "$t")
            children=$(pm_children)
            read -r busy0 idle0 segs0 < <(machine_usage)
            run_pgbench "$t" "$out" "$DURATION" -- -c "$CLIENTS" -j "$THREADS" "${wargs[@]}"
            read -r busy1 idle1 segs1 < <(machine_usage)
            read -r user1 sys1 preempt1 < <(proxy_usage "$t")
            # Busy time counts until the run's backends have exited; idle time and segments stop
            # with pgbench.
            end_backends "$children"
            read -r busy2 _ _ < <(machine_usage)
            tps=$(parse_tps "$out")
            lat=$(parse_lat "$out")
            tx=$(parse_tx "$out")
            cost=$(awk -v u0="$user0" -v u1="$user1" -v s0="$sys0" -v s1="$sys1" -v p="$preempt0" -v q="$preempt1" \
                -v b0="$busy0" -v b1="$busy1" -v b2="$busy2" -v i0="$idle0" -v i1="$idle1" -v g0="$segs0" -v g1="$segs1" \
                -v tx="${tx:-0}" -v hz="$CLK_TCK" 'BEGIN {
                    if (tx <= 0) { printf "NaN\tNaN\tNaN\tNaN\tNaN\tNaN\tNaN"; exit }
                    us = 1e6 / hz / tx; all = (b1 - b0) + (i1 - i0)
                    printf "%.1f\t%.3f\t%.2f\t%.2f\t%.1f\t%.1f\t%.2f", (u1 - u0 + s1 - s0) * us, (q - p) / tx,
                        (u1 - u0) * us, (s1 - s0) * us, (b2 - b0) * us, (all > 0 ? 100 * (i1 - i0) / all : 0), (g1 - g0) / tx }')
            printf 'tput\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$w" "$t" "$r" "${tps:-NaN}" "${lat:-NaN}" "$load" "$cost" >>"$RAW"
            log "pgbench $w  round $r/$ROUNDS  $(printf '%-13s' "$t") tps ${tps:-FAILED}"
        done
    done
done

# ---------------------------------------------------------------------------------------------
# 4b. system calls per transaction: one more run per proxy and workload, counted by perf's
# syscall tracepoints (counting slows the run, so its TPS is not used). Exact where TPS is noisy:
# the kernel work a proxy asks for per transaction, which on loopback is most of its cost.
SYS=$TMP/syscalls.tsv # workload target syscall per_tx
: >"$SYS"
SYS_SKIPPED=""
if [[ $SYSCALLS == 1 ]] && ! command -v perf >/dev/null; then
    log "installing linux-perf with apt (for the system-call counts)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf; } >&2 || true
fi
if [[ $SYSCALLS != 1 ]]; then
    SYS_SKIPPED="SYSCALLS=0"
elif ! command -v perf >/dev/null; then
    SYS_SKIPPED="perf is not installed"
elif ! perf stat -e syscalls:sys_enter_sendto -o /dev/null true >/dev/null 2>&1; then
    SYS_SKIPPED="perf cannot use the syscall tracepoints here"
fi
if [[ -z $SYS_SKIPPED ]]; then
    for w in "${WORKLOAD_NAMES[@]}"; do
        workload_args "$w"
        for t in "${TPUT_TARGETS[@]}"; do
            [[ $t != direct ]] || continue
            counts=$TMP/sys-$(tr -c 'A-Za-z0-9' '_' <<<"$w")-$t.csv
            out=$counts.out
            # Started first so the whole pgbench run is inside the counted window.
            prepare_target "$t"
            perf stat -x, -e 'syscalls:sys_enter_*' -p "$(proxy_pid "$t")" -o "$counts" -- sleep $((DURATION + 1)) &
            perf_pid=$!
            sleep 0.3
            run_pgbench "$t" "$out" "$DURATION" -- -c "$CLIENTS" -j "$THREADS" "${wargs[@]}"
            wait "$perf_pid" || true
            tx=$(parse_tx "$out")
            awk -F, -v w="$w" -v t="$t" -v tx="${tx:-0}" \
                '$1 ~ /^[0-9]+$/ && $1 > 0 && tx > 0 { sub(/^syscalls:sys_enter_/, "", $3); printf "%s\t%s\t%s\t%.4f\n", w, t, $3, $1 / tx }' \
                "$counts" >>"$SYS"
            log "system calls $w  $(printf '%-13s' "$t") $(awk -F'\t' -v w="$w" -v t="$t" '$1 == w && $2 == t { n += $4 } END { printf "%.2f", n }' "$SYS") per transaction"
        done
    done
else
    log "system-call counts skipped: $SYS_SKIPPED"
fi

# ---------------------------------------------------------------------------------------------
# 5. single-client latency probe, pinned to one CPU
pin_servers() { # cpu list: PostgreSQL (postmaster and every backend), understudy, pgbouncer
    local pm pid
    pm=$(head -n1 "$PG_DATA/postmaster.pid")
    for pid in "$pm" $(pgrep -P "$pm") "$GW_PID" "$PGB_PID"; do
        taskset -a -p -c "$1" "$pid" >/dev/null 2>&1 || true
    done
}
if [[ $LAT_PIN == all ]]; then
    log "latency probe: pgbench, PostgreSQL, understudy and pgbouncer pinned to CPU $LAT_CPU"
    pin_servers "$LAT_CPU"
else
    log "latency probe: pgbench pinned to CPU $LAT_CPU"
fi
if [[ $WARMUP -gt 0 ]]; then
    for t in "${TARGETS[@]}"; do
        prepare_target "$t"
        run_pgbench "$t" "$TMP/warmup.out" "$WARMUP" taskset -c "$LAT_CPU" -- -c 1 -j 1 -S -M prepared
    done
fi
for ((r = 1; r <= LAT_ROUNDS; r++)); do
    for ((k = 0; k < ${#TARGETS[@]}; k++)); do
        t=${TARGETS[$(((k + r - 1) % ${#TARGETS[@]}))]}
        out=$TMP/lat-$t-$r.out
        prepare_target "$t"
        load=$(wait_quiet 9 "$IDLE_WAIT")
        run_pgbench "$t" "$out" "$DURATION" taskset -c "$LAT_CPU" -- -c 1 -j 1 -S -M prepared
        tps=$(parse_tps "$out")
        lat=$(parse_lat "$out")
        printf 'lat\t%s\t%s\t%s\t%s\t%s\t%s\n' "probe" "$t" "$r" "${tps:-NaN}" "${lat:-NaN}" "$load" >>"$RAW"
        log "latency probe round $r/$LAT_ROUNDS  $(printf '%-10s' "$t") latency ${lat:-FAILED} ms"
    done
done

[[ $LAT_PIN == all ]] && pin_servers "$ALL_CPUS"

# ---------------------------------------------------------------------------------------------
# 6. memory per idle session
cat >"$TMP/idle_sessions.py" <<'PY'
"""Open N idle PostgreSQL sessions over raw sockets (trust auth) and report a process's VmRSS."""
import socket, struct, sys, time

host, port, user, db, n, pid = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6]

def rss():
    if pid == "-":
        return 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise SystemExit("no VmRSS")

def recv_exact(s, k):
    buf = b""
    while len(buf) < k:
        chunk = s.recv(k - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by server")
        buf += chunk
    return buf

def until_ready(s):
    while True:
        typ, ln = struct.unpack("!cI", recv_exact(s, 5))
        body = recv_exact(s, ln - 4)
        if typ == b"E":
            raise ConnectionError("server error: " + body.decode(errors="replace"))
        if typ == b"R" and struct.unpack("!I", body[:4])[0] != 0:
            raise ConnectionError("server asks for a password; the bench expects trust")
        if typ == b"Z":
            return

def open_session():
    s = socket.create_connection((host, port))
    params = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in
                      (("user", user), ("database", db), ("application_name", "understudy-bench-idle"))) + b"\0"
    s.sendall(struct.pack("!II", 8 + len(params), 196608) + params)
    until_ready(s)
    return s

def settle():
    time.sleep(1.0)

# warm the process up with one session, then measure the baseline with none open
open_session().close()
settle()
base = rss()
socks = []
t0 = time.monotonic()
for _ in range(n):
    socks.append(open_session())
login_ms = (time.monotonic() - t0) * 1000 / n
settle()
opened = rss()
q = b"SELECT 1\0"
for s in socks:
    s.sendall(b"Q" + struct.pack("!I", 4 + len(q)) + q)
for s in socks:
    until_ready(s)
settle()
queried = rss()
for s in socks:
    try:
        s.sendall(b"X\0\0\0\4")
    except OSError:
        pass
    s.close()
print(f"base={base} opened={opened} queried={queried} login_us={login_ms * 1000:.0f} n={n}")
PY

measure_memory() { # label port pid outfile -> outfile holds "base opened queried"
    python3 "$TMP/idle_sessions.py" 127.0.0.1 "$2" postgres "$DB" "$SESSIONS" "$3" >"$4.raw" \
        || die "idle-session test against $1 failed"
    sed -n 's/^base=\([0-9]*\) opened=\([0-9]*\) queried=\([0-9]*\) login_us=\([0-9]*\) .*/\1 \2 \3 \4/p' "$4.raw" >"$4"
    [[ -s $4 ]] || die "idle-session test against $1 printed nothing usable"
}

log "memory: stopping the benchmark gateways, starting a fresh one alone"
stop_gateway "$GW_PID"; GW_PID=""
[[ -z $HAGW_PID ]] || { stop_gateway "$HAGW_PID"; HAGW_PID=""; }
MEM_PORT=$(free_port)
MEM_ADMIN=$(free_port)
start_gateway "$MEM_PORT" "$MEM_ADMIN" "$TMP/gw/understudy-mem.log"
MEMGW_PID=$STARTED_PID
sleep 1
log "memory: $SESSIONS idle sessions through understudy"
measure_memory understudy "$MEM_PORT" "$MEMGW_PID" "$TMP/mem-understudy"
read -r GW_BASE GW_OPEN GW_QUERIED _ <"$TMP/mem-understudy"
sleep 1 # let the backends exit (max_connections is 600)

# Login time, interleaved like the throughput runs: each round opens $LOGIN_SESSIONS sessions one
# after another (held open, as an application's pool fills) through each target, in rotated order.
cat >"$TMP/login_probe.py" <<'PY'
"""Sequential logins (raw StartupMessage, trust); prints raw rows: login probe TARGET ROUND NaN MS NaN."""
import socket, struct, sys, time

rounds, n, user, db = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
targets = [(t.split("=")[0], int(t.split("=")[1])) for t in sys.argv[5:]]
params = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in
                  (("user", user), ("database", db), ("application_name", "understudy-bench-login"))) + b"\0"
startup = struct.pack("!II", 8 + len(params), 196608) + params

def login(port):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(startup)
    buf = b""
    while b"Z\0\0\0\x05I" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            raise SystemExit(f"login to port {port} failed: {buf[:200]!r}")
        buf += chunk
    return s

for r in range(1, rounds + 1):
    for k in range(len(targets)):
        name, port = targets[(k + r - 1) % len(targets)]
        t0 = time.monotonic()
        socks = [login(port) for _ in range(n)]
        ms = (time.monotonic() - t0) * 1000 / n
        for s in socks:
            s.sendall(b"X\0\0\0\4")
            s.close()
        print(f"login\tprobe\t{name}\t{r}\tNaN\t{ms:.4f}\tNaN", flush=True)
        time.sleep(0.5)
PY
log "login time: $LOGIN_ROUNDS rounds of $LOGIN_SESSIONS sequential logins, direct / understudy / pgbouncer interleaved"
python3 "$TMP/login_probe.py" "$LOGIN_ROUNDS" "$LOGIN_SESSIONS" postgres "$DB" \
    direct="$PG_PORT" understudy="$MEM_PORT" pgbouncer="$PGB_PORT" >>"$RAW" \
    || die "login probe failed"
stop_gateway "$MEMGW_PID"; MEMGW_PID=""
sleep 1
log "memory: $SESSIONS idle sessions through pgbouncer (reference)"
measure_memory pgbouncer "$PGB_PORT" "$PGB_PID" "$TMP/mem-pgbouncer"
read -r PGB_BASE PGB_OPEN PGB_QUERIED _ <"$TMP/mem-pgbouncer"

# ---------------------------------------------------------------------------------------------
# 7. report
PG_VERSION=$("$PGBIN/postgres" --version | awk '{print $3}')
PGB_VERSION=$("$PGBOUNCER_BIN" --version 2>/dev/null | head -n1 | awk '{print $NF}')

LOAD_END=$(loadavg)
REPORT=$TMP/report.md
python3 - "$RAW" "$CLIENTS" "$GW_BASE" "$GW_OPEN" "$GW_QUERIED" "$PGB_BASE" "$PGB_OPEN" "$PGB_QUERIED" "$SESSIONS" \
    "$LOGIN_SESSIONS" "$LOGIN_ROUNDS" >"$REPORT" <<PY
import math, statistics, sys
sys.path.insert(0, "$BENCH_DIR")
from stats import fmt_ci, paired
raw, clients = sys.argv[1], int(sys.argv[2])
gw_base, gw_open, gw_q, pgb_base, pgb_open, pgb_q, n, login_n, login_rounds = map(int, sys.argv[3:12])
rows = [l.rstrip("\n").split("\t") for l in open(raw) if l.strip()]
def med(kind, w, t, col):
    vals = [float(r[col]) for r in rows if r[0] == kind and r[1] == w and r[2] == t and len(r) > col]
    vals = [v for v in vals if not math.isnan(v)]
    return statistics.median(vals) if vals else float("nan")
stmts = {"-S": 1, "-S -M prepared": 1, "-N": 5, "-A": 1, "-A -M simple": 1}
# The workloads this run measured (WORKLOADS), in the usual order.
WL = [w for w in stmts if any(r[0] == "tput" and r[1] == w for r in rows)]
def tps_by_round(w, t):
    return {r[3]: float(r[4]) for r in rows if r[0] == "tput" and r[1] == w and r[2] == t}
def round_ratio(w, t, base="direct"):
    """Median over rounds of TPS_target / TPS_base within the same round, its n and 95 %
    interval (interleaved, so the two runs of a pair saw the same machine conditions)."""
    return paired(tps_by_round(w, t), tps_by_round(w, base))
print("# Understudy benchmark")
print()
print("$(date -u '+%Y-%m-%d %H:%M UTC'), understudy $GIT_REV, PostgreSQL $PG_VERSION, PgBouncer $PGB_VERSION,")
print("$(nproc) CPUs ($(uname -r)); DURATION=$DURATION s, ROUNDS=$ROUNDS (median), SCALE=$SCALE, -c $CLIENTS -j $THREADS,")
print("synchronous_commit=off, trust auth, everything on 127.0.0.1" + (", pgbench and the proxies' server connections over Unix-domain sockets (TRANSPORT=unix)" if "$TRANSPORT" == "unix" else "") + ". Load average (1 min) at start $LOAD_START, at end $LOAD_END.")
# Sampled before each throughput and latency run (the login probe's rows have none).
bg = [float(r[6]) for r in rows if r[0] in ("tput", "lat")]
if bg:
    print(f"Background CPU (machine busy % in the 0.5 s before each run, with the benchmark idle): median {statistics.median(bg):.0f} %, max {max(bg):.0f} %"
          + (" — **other work was running on the machine; treat the numbers with care**" if max(bg) >= 10 else "") + ".")
print()
print(f"## Throughput (pgbench -c {clients} -j $THREADS, median TPS, per-round ratio to direct)")
print()
print("| workload | direct TPS | understudy TPS (ratio) | pgbouncer TPS (ratio) | understudy/pgbouncer per round (n, 95 % CI) | added µs/stmt understudy | added µs/stmt pgbouncer | understudy ≥ pgbouncer |")
print("|---|---:|---:|---:|---:|---:|---:|:---:|")
verdicts = []
for w in WL:
    d, u, b = (med("tput", w, t, 4) for t in ("direct", "understudy", "pgbouncer"))
    ru, rb = round_ratio(w, "understudy")[0], round_ratio(w, "pgbouncer")[0]
    ub, un, uci = round_ratio(w, "understudy", "pgbouncer")
    # time per transaction per client = clients / tps; spread over the statements (round trips)
    au = (clients / u - clients / d) / stmts[w] * 1e6
    ab = (clients / b - clients / d) / stmts[w] * 1e6
    ok = ub >= 1.0
    verdicts.append((w, ok, ru, rb, ub, fmt_ci(uci)))
    print(f"| \`{w}\` | {d:,.0f} | {u:,.0f} ({ru:.2f}) | {b:,.0f} ({rb:.2f}) | {ub:.3f} ({un}, {fmt_ci(uci)}) | {au:+.1f} | {ab:+.1f} | {'yes' if ok else '**no**'} |")
print()
print("TPS: median over rounds; ratio: median over rounds of TPS_target/TPS_direct of the same round;")
print("understudy/pgbouncer per round: the same for the two proxies, with a distribution-free 95 % interval for")
print("that median (the verdict: ≥ 1.000). PgBouncer's server connections: $PGB_SERVERS (PGB_SERVERS).")
print()
print("added µs/stmt = (clients/TPS_target − clients/TPS_direct) / round trips per transaction (1 for -S, 5 for -N):")
print("the extra wall time each statement costs under load, on this 2-CPU machine mostly CPU the proxy takes from PostgreSQL and pgbench.")
print()
ha = any(r[0] == "tput" and r[2] == "understudy-ha" for r in rows)
if ha:
    print("## Armed for failover (understudy-ha: a standby as second backend, same runs)")
    print()
    print("| workload | understudy-ha TPS (ratio) | understudy-ha/pgbouncer per round (n, 95 % CI) | understudy-ha/understudy per round (n, 95 % CI) | understudy-ha CPU µs/tx |")
    print("|---|---:|---:|---:|---:|")
    for w in WL:
        h = med("tput", w, "understudy-ha", 4)
        rh = round_ratio(w, "understudy-ha")[0]
        hb, hbn, hbci = round_ratio(w, "understudy-ha", "pgbouncer")
        hu, hun, huci = round_ratio(w, "understudy-ha", "understudy")
        print(f"| \`{w}\` | {h:,.0f} ({rh:.2f}) | {hb:.3f} ({hbn}, {fmt_ci(hbci)}) | {hu:.3f} ({hun}, {fmt_ci(huci)}) | {med('tput', w, 'understudy-ha', 7):.1f} |")
    print()
    print("understudy (one backend) can move no session, so it keeps no journal and asks the server nothing the client did")
    print("not; understudy-ha can, so it journals every request and answer, and the server also runs its xid capture (one")
    print("small statement per writing transaction, an autocommit batch included) and, after other autocommit writes,")
    print("its WAL-position query.")
    print()
print("## Proxy cost per transaction (same runs, median over rounds)")
print()
print("| workload | understudy CPU µs/tx | pgbouncer CPU µs/tx | understudy preemptions/tx | pgbouncer preemptions/tx |")
print("|---|---:|---:|---:|---:|")
for w in WL:
    cu, cb = (med("tput", w, t, 7) for t in ("understudy", "pgbouncer"))
    pu, pb = (med("tput", w, t, 8) for t in ("understudy", "pgbouncer"))
    print(f"| \`{w}\` | {cu:.1f} | {cb:.1f} | {pu:.3f} | {pb:.3f} |")
print()
print("CPU: user + system time of the proxy process (/proc/PID/stat) over the run / transactions; preemptions:")
print("involuntary context switches of the proxy per transaction. Less noisy than TPS on a shared 2-CPU machine:")
print("the proxy's own work, whatever PostgreSQL and pgbench were doing.")
print()
print("## Where the machine's CPU goes (same runs, median over rounds)")
print()
print("| workload | target | machine CPU µs/tx | machine idle % | proxy user µs/tx | proxy system µs/tx | proxy user, % of machine CPU | TCP segments/tx |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
targets = [t for t in ("direct", "understudy", "understudy-ha", "pgbouncer") if any(r[0] == "tput" and r[2] == t for r in rows)]
gaps = []
for w in WL:
    for t in targets:
        m, idle, pu, ps, segs = (med("tput", w, t, c) for c in (11, 12, 9, 10, 13))
        if t == "direct":
            print(f"| \`{w}\` | {t} | {m:.1f} | {idle:.1f} | — | — | — | {segs:.2f} |")
        else:
            print(f"| \`{w}\` | {t} | {m:.1f} | {idle:.1f} | {pu:.2f} | {ps:.2f} | {100 * pu / m:.1f} | {segs:.2f} |")
    uu, bu, um = med("tput", w, "understudy", 9), med("tput", w, "pgbouncer", 9), med("tput", w, "understudy", 11)
    gaps.append(f"\`{w}\` {uu - bu:+.2f} µs ({100 * (uu - bu) / um:+.2f} % of the machine's CPU per transaction)")
print()
print("Machine CPU: busy time of all CPUs (/proc/stat: PostgreSQL, pgbench and the proxy) / transactions, from the run's start")
print("until the backends it started have exited (PgBouncer's pooled ones are ended after its run, and the same psql runs after every run);")
print("idle: the share of the run the CPUs had nothing to run (every process waiting for a message, or for a halted CPU to wake);")
print("proxy user/system: the proxy process's user-space and kernel time; TCP segments: sent on the machine per")
print("transaction (4 per round trip through a proxy and 2 direct is the floor: no pure ACKs, no split messages).")
print("Understudy's user-space time minus PgBouncer's: " + "; ".join(gaps) + ".")
print()
print("## System calls per transaction (perf syscall tracepoints; one extra run per proxy and workload)")
print()
sysrows = [l.rstrip("\n").split("\t") for l in open("$SYS") if l.strip()]
if not sysrows:
    print("Not measured: $SYS_SKIPPED.")
else:
    kinds = {
        "reads": {"read", "readv", "recvfrom", "recvmsg"},
        "writes": {"write", "writev", "sendto", "sendmsg"},
        "waits": {"epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll", "select", "pselect6"},
    }
    print("| workload | proxy | reads | writes | epoll/poll waits | other | total | most frequent other calls |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    proxies = list(dict.fromkeys(r[1] for r in sysrows))
    for w in WL:
        for t in proxies:
            calls = {r[2]: float(r[3]) for r in sysrows if r[0] == w and r[1] == t}
            if not calls:
                continue
            part = {k: sum(v for c, v in calls.items() if c in names) for k, names in kinds.items()}
            known = set().union(*kinds.values())
            others = sorted(((v, c) for c, v in calls.items() if c not in known), reverse=True)
            total = sum(calls.values())
            top = ", ".join(f"{c} {v:.3f}" for v, c in others[:3] if v >= 0.001) or "—"
            print(f"| \`{w}\` | {t} | {part['reads']:.3f} | {part['writes']:.3f} | {part['waits']:.3f} | "
                  f"{total - sum(part.values()):.3f} | {total:.3f} | {top} |")
    print()
    print("Every system call the proxy process made during the run (connection set-up included, about 20 calls per")
    print("client, spread over the run's transactions) / transactions. A proxy has to read and write each message")
    print("once each way: 2 reads and 2 writes per round trip (-S: 1 round trip a transaction, -N: 5) is the floor.")
print()
d, u, b = (med("lat", "probe", t, 5) for t in ("direct", "understudy", "pgbouncer"))
pinned = "pgbench, PostgreSQL and the proxies all" if "$LAT_PIN" == "all" else "pgbench"
print(f"## Latency probe (1 client, -S -M prepared, {pinned} pinned to CPU $LAT_CPU, median of rounds)")
print()
print("| target | latency average | added per round trip |")
print("|---|---:|---:|")
print(f"| direct | {d*1000:.1f} µs | — |")
print(f"| understudy | {u*1000:.1f} µs | {(u-d)*1000:+.1f} µs |")
print(f"| pgbouncer | {b*1000:.1f} µs | {(b-d)*1000:+.1f} µs |")
print()
print(f"## Memory ({n} idle sessions, VmRSS)")
print()
def per(a, z): return (z - a) / n
gw1, gw2 = per(gw_base, gw_open), per(gw_base, gw_q)
print("| process | RSS alone | RSS with sessions open | KiB/session after login | KiB/session after one query each |")
print("|---|---:|---:|---:|---:|")
print(f"| understudy (fresh) | {gw_base:,} KiB | {gw_open:,} KiB / {gw_q:,} KiB | {gw1:.1f} | {gw2:.1f} |")
print(f"| pgbouncer (reference) | {pgb_base:,} KiB | {pgb_open:,} KiB / {pgb_q:,} KiB | {per(pgb_base, pgb_open):.1f} | {per(pgb_base, pgb_q):.1f} |")
print()
print("RSS with sessions open: after login / after one \`SELECT 1\` each. PgBouncer's server connections are pooled")
print("(opened at the first query, kept after the benchmark), so its figures are a reference, not a like-for-like.")
print()
login_d, login_u, login_b = (med("login", "probe", t, 5) for t in ("direct", "understudy", "pgbouncer"))
print(f"Login time (median of {login_rounds} interleaved rounds of {login_n} sequential logins held open, raw "
      f"StartupMessage, trust): direct {login_d:.2f} ms, understudy {login_u:.2f} ms ({login_u-login_d:+.2f} ms), "
      f"pgbouncer {login_b:.2f} ms (it hands out pooled server connections).")
print()
print("## Targets")
print()
for w, ok, ru, rb, ub, uci in verdicts:
    print(f"- \`{w}\`: understudy/pgbouncer per round {ub:.3f} (95 % CI {uci}; ratios to direct {ru:.3f} and {rb:.3f}) → {'met' if ok else 'MISSED'}")
worst = max(gw1, gw2)
print(f"- memory: {worst:.1f} KiB per idle session (worst of the two) vs ≤ 64 KiB → {'met' if worst <= 64 else 'MISSED'}")
print()
if ha:
    for w in WL:
        hb, _, hbci = round_ratio(w, "understudy-ha", "pgbouncer")
        print(f"- \`{w}\`, armed for failover (reference, not a target): understudy-ha/pgbouncer per round {hb:.3f} (95 % CI {fmt_ci(hbci)})")
print()
print("## Raw runs")
print()
print("| kind | workload | target | round | tps | latency avg (ms) | background CPU % before |")
print("|---|---|---|---:|---:|---:|---:|")
for r in rows:
    print(f"| {r[0]} | \`{r[1]}\` | {r[2]} | {r[3]} | {float(r[4]):,.1f} | {r[5]} | {r[6] if len(r) > 6 else ''} |")
PY

cp "$REPORT" "$RESULTS"
cp "$RAW" "${RESULTS%.md}.tsv"
echo
cat "$REPORT"
echo
log "report written to $RESULTS"
