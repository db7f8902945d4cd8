# shellcheck shell=bash
# Helpers the benchmark scripts share; sourced, not run. The sourcing script sets BENCH_NAME (the
# log prefix) and PGBIN first, and owns TMP and KEEP_TMP.

log() { printf '[%s %s] %s\n' "$BENCH_NAME" "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

require_root() { # why
    [[ $(id -u) -eq 0 ]] || die "run as root ($1)"
}

require_tools() { # tool...
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null || die "$tool not found"
    done
}

# The source the gateway is built from, noted before the run (files edited meanwhile are not in
# it): the short commit, plus the gateway's files that differ from it.
git_rev() { # repo root
    local rev dirty
    rev=$(git -C "$1" rev-parse --short HEAD 2>/dev/null || echo unknown)
    dirty=$(git -C "$1" status --porcelain -- gateway protocol replay Cargo.toml Cargo.lock 2>/dev/null | awk '{print $2}' | tr '\n' ' ')
    [[ -z $dirty ]] || rev="$rev + uncommitted changes in: $dirty"
    echo "$rev"
}

# A port below the ephemeral range, free now: an ephemeral port could be taken by an outgoing
# connection while a server is down (a node between a kill and its re-seed, a gateway restarting).
free_port() {
    python3 - <<'PY'
import random, socket
lo = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
while True:
    p = random.randint(20000, max(20001, lo - 1))
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); s.close(); print(p); break
    except OSError:
        s.close()
PY
}

wait_port() { # port seconds: until something accepts on 127.0.0.1:port
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

# CPU busy % of the whole machine over 0.5 s while none of the benchmark's runs is going: what
# something else (a build, a test suite) takes from the measurement that follows.
background_busy() {
    local a b
    a=$(head -n1 /proc/stat)
    sleep 0.5
    b=$(head -n1 /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN {
        n = split(a, x, " "); split(b, y, " "); tot = 0
        for (i = 2; i <= 9 && i <= n; i++) tot += y[i] - x[i]  # user..steal (guest is inside user)
        idle = (y[5] - x[5]) + (y[6] - x[6])
        printf "%.0f", (tot > 0 ? 100 * (tot - idle) / tot : 0) }'
}

# Before a measured run: waits (up to `seconds`) until the machine is at most `max` % busy without
# the benchmark; prints the last sample. On a shared 2-CPU box a concurrent build or test run moves
# TPS by tens of percent; this keeps most runs out of such bursts, the reports show the rest.
wait_quiet() { # max seconds
    local b waited=0
    while :; do
        b=$(background_busy)
        if [[ $b -le $1 || $waited -ge $2 ]]; then
            echo "$b"
            return
        fi
        [[ $waited -eq 0 ]] && log "machine ${b}% busy (something else is running); waiting up to ${2}s for <= ${1}%"
        sleep 1
        waited=$((waited + 2)) # the sample takes 0.5 s, the sleep 1 s; counted generously
    done
}

parse_tps() { sed -n 's/^tps = \([0-9.]*\) (without initial connection time).*/\1/p' "$1" | head -n1; }
parse_lat() { sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' "$1" | head -n1; }
parse_tx() { sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$1" | head -n1; }

# A throwaway primary in dir/data (dir must be owned by postgres), listening on 127.0.0.1:port
# with trust auth, with database `bench` initialised by `pgbench -i -s scale` and vacuumed.
# synchronous_commit=off (fsync stays on): -N measures the proxies, not the disk's flush latency.
init_primary() { # dir port max_connections scale
    local dir=$1 data=$1/data
    runuser -u postgres -- "$PGBIN/initdb" -D "$data" -U postgres -A trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
    cat >>"$data/postgresql.conf" <<EOF

# --- understudy $BENCH_NAME ---
listen_addresses = '127.0.0.1'
port = $2
unix_socket_directories = '$dir'
max_connections = $3
shared_buffers = 256MB
synchronous_commit = off
max_wal_size = 4GB
checkpoint_timeout = 30min
logging_collector = off
log_min_messages = warning
EOF
    cat >"$data/pg_hba.conf" <<EOF
local all all trust
host  all all 127.0.0.1/32 trust
host  replication all 127.0.0.1/32 trust
EOF
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$data" -l "$dir/postgres.log" -w -t 60 start >/dev/null \
        || { tail -n 30 "$dir/postgres.log" >&2; die "postgres did not start"; }
    psql -X -q -h 127.0.0.1 -p "$2" -d postgres -c "CREATE DATABASE bench" >/dev/null
    log "pgbench -i -s $4"
    pgbench -i -q -s "$4" -h 127.0.0.1 -p "$2" bench >"$dir/pgbench-init.log" 2>&1 \
        || { cat "$dir/pgbench-init.log" >&2; die "pgbench -i failed"; }
    psql -X -q -h 127.0.0.1 -p "$2" -d bench -c "VACUUM ANALYZE" >/dev/null
}

# For cleanup traps: the helpers below never fail.
kill_now() { # pid...: SIGKILL and reap each that is still alive
    local pid
    for pid in "$@"; do
        if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
            kill -KILL "$pid" 2>/dev/null
            wait "$pid" 2>/dev/null
        fi
    done
    return 0
}

stop_cluster() { # data dir: immediate shutdown if a postmaster runs there
    # A killed postmaster leaves its postmaster.pid behind, and pg_ctl would signal whatever
    # process has that PID now (another cluster's backend, on a shared machine): only a live
    # postmaster of this data directory is stopped.
    local pid
    if [[ -n $1 && -f $1/postmaster.pid ]]; then
        pid=$(head -n1 "$1/postmaster.pid")
        if [[ $pid =~ ^[0-9]+$ ]] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$1"; then
            runuser -u postgres -- "$PGBIN/pg_ctl" -D "$1" -m immediate -w -t 20 stop >/dev/null 2>&1
        fi
    fi
    return 0
}

finish_tmp() { # exit status [what to look at]: TMP kept on failure or with KEEP_TMP=1, else removed
    if [[ -n $TMP && -d $TMP ]]; then
        if [[ $KEEP_TMP == 1 || $1 -ne 0 ]]; then
            log "temp dir kept: $TMP${2:+ ($2)}"
        else
            rm -rf "$TMP"
        fi
    fi
    return 0
}
