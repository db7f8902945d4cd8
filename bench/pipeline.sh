#!/usr/bin/env bash
# Deep pipelines through Understudy: one connection sends N simple queries at once and reads
# every answer, directly and through the gateway (one backend, and armed for failover with a
# second one), for several N. Printed: seconds per run, the gateway's time over direct's (it
# should stay near 1 whatever N: the gateway's work per message must not grow with the number
# of requests in flight) and the gateway's peak RSS (VmHWM) over the run, started afresh for
# each (a client that pipelines faster than the server answers must not make it keep a record
# per request). With STALL=s the client reads nothing for s seconds first.
#
# Knobs: SIZES="10000 100000 400000"  SQL="select 1"  STALL=0  ROUNDS=3 (median)
#        SKIP_BUILD=1  KEEP_TMP=1  PGBIN=/usr/lib/postgresql/15/bin
#        GATEWAY_BIN=path  another build of the gateway (implies nothing is built)
# Needs root (PostgreSQL runs as user postgres), python3, psql. Takes about a minute.
set -euo pipefail

SIZES=${SIZES:-10000 100000 400000}
SQL=${SQL:-select 1}
STALL=${STALL:-0}
ROUNDS=${ROUNDS:-3}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP_TMP=${KEEP_TMP:-0}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
GATEWAY_BIN=${GATEWAY_BIN:-$ROOT/target/release/understudy}
CLIENT=$BENCH_DIR/pipeline_client.py

BENCH_NAME=pipeline
export PGUSER=postgres
# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"

require_root "PostgreSQL is started as user postgres with runuser"
require_tools psql runuser python3 pgbench

TMP=""
GW_PID=""
cleanup() {
    local rc=$?
    set +e
    kill_now "$GW_PID"
    [[ -n $TMP ]] && stop_cluster "$TMP/pg/data"
    finish_tmp "$rc" "gateway.log, pg/postgres.log"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [[ $SKIP_BUILD != 1 && $GATEWAY_BIN == "$ROOT/target/release/understudy" ]]; then
    log "cargo build --release -p understudy"
    (cd "$ROOT" && cargo build --release -p understudy)
fi
[[ -x $GATEWAY_BIN ]] || die "$GATEWAY_BIN missing (build it or unset SKIP_BUILD)"

TMP=$(mktemp -d /tmp/understudy-pipeline.XXXXXX)
chmod 755 "$TMP"
mkdir "$TMP/pg"
chown postgres "$TMP/pg"
PG_PORT=$(free_port)
init_primary "$TMP/pg" "$PG_PORT" 20 1

# Starts a fresh gateway on $GW_PORT ($1: one backend, or "armed" with an unreachable second
# backend, so that its sessions journal as a failover-ready gateway's do).
start_gateway() {
    local backends=(--backend "127.0.0.1:$PG_PORT")
    [[ $1 == armed ]] && backends+=(--backend 127.0.0.1:1)
    GW_PORT=$(free_port)
    RUST_LOG=warn "$GATEWAY_BIN" run --listen "127.0.0.1:$GW_PORT" "${backends[@]}" \
        >>"$TMP/gateway.log" 2>&1 &
    GW_PID=$!
    wait_port "$GW_PORT" 30 || die "gateway did not start"
}

stop_gateway() {
    kill_now "$GW_PID" || true # its wait returns the killed gateway's status
    GW_PID=""
}

peak_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }

median() { tr ' ' '\n' | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }

log "SQL '$SQL', stall ${STALL}s, $ROUNDS rounds (median), PostgreSQL on 127.0.0.1:$PG_PORT"
printf '\n| N | direct s | understudy s (ratio) | peak RSS MiB | armed s (ratio) | armed peak RSS MiB |\n'
printf '|---:|---:|---:|---:|---:|---:|\n'
for n in $SIZES; do
    declare -A times=()
    declare -A peaks=()
    for target in direct understudy armed; do
        runs=()
        peak=0
        for _ in $(seq "$ROUNDS"); do
            if [[ $target == direct ]]; then
                port=$PG_PORT
            else
                start_gateway "$target"
                port=$GW_PORT
            fi
            runs+=("$(python3 "$CLIENT" "$port" "$n" "$SQL" "$STALL")")
            if [[ $target != direct ]]; then
                p=$(peak_kib "$GW_PID")
                ((p > peak)) && peak=$p
                stop_gateway
            fi
        done
        times[$target]=$(echo "${runs[*]}" | median)
        peaks[$target]=$peak
    done
    awk -v n="$n" -v d="${times[direct]}" -v u="${times[understudy]}" -v a="${times[armed]}" \
        -v pu="${peaks[understudy]}" -v pa="${peaks[armed]}" 'BEGIN {
            printf "| %d | %.3f | %.3f (%.2f) | %.1f | %.3f (%.2f) | %.1f |\n",
                n, d, u, u / d, pu / 1024, a, a / d, pa / 1024 }'
    unset times peaks
done
