#!/usr/bin/env bash
# Understudy journaling overhead: throughput through the current gateway (session journal,
# response digests, xid capture before COMMIT — always on) against the plain gateway that
# existed before journaling (git commit 0b3b717, "Gateway: wire framing, startup/TLS, auth relay
# …, data-path pump …"), and against a direct connection. Target: current/plain >= 0.95.
#
# What it does
#   - builds target/release/understudy (unless SKIP_BUILD=1) and the plain gateway: a git
#     worktree of $PLAIN_REV under /tmp (removed at the end with `git worktree remove --force`),
#     built with `cargo build --release -p understudy` into $PLAIN_TARGET_DIR (default
#     target/bench-plain-<rev>); the binary is kept there as understudy-<full sha>, so later runs
#     skip the worktree and the build (REBUILD_PLAIN=1 forces them);
#   - one throwaway PostgreSQL 15 primary (as user postgres, everything on 127.0.0.1): trust auth,
#     max_connections=100, shared_buffers=256MB, synchronous_commit=off (fsync on; -N measures the
#     gateways, not the disk's flush latency), max_wal_size=4GB; `pgbench -i -s $SCALE` + VACUUM;
#   - targets, each a gateway with the single backend (no standby, so nothing else differs):
#       direct   pgbench → PostgreSQL
#       plain    0b3b717 `understudy run --listen … --backend …` (its runtime: #[tokio::main], a
#                multi-thread runtime with one worker per CPU)
#       current  target/release/understudy, same flags, default configuration
#       current-mt  (with MT=auto, only when the current gateway knows the `worker_threads` key
#                and its default is not already multi-thread) the current gateway with
#                `worker_threads = 0` (one per CPU), i.e. the plain gateway's runtime:
#                current-mt/plain isolates the journal from the runtime choice, current/plain
#                is what a user gets with the defaults;
#   - workloads pgbench `-S` (simple protocol), `-S -M prepared`, `-N` (BEGIN, UPDATE, SELECT,
#     INSERT, END: a writing transaction, so the xid capture before COMMIT is exercised) at
#     `-c $CLIENTS -j $THREADS -T $DURATION -n`; each workload runs $ROUNDS rounds, every round
#     runs every target once (order rotated each round), preceded by $WARMUP s untimed per target;
#   - report: median TPS ("without initial connection time") per workload and target, ratios
#     current/plain, current/direct, plain/direct, and the verdict's figure: the median over
#     rounds of current/plain within each round (target >= 0.95), with a 95 % interval; raw
#     runs. On a shared machine other work moves TPS by tens of percent, so each run is guarded
#     twice: before it, a wait
#     (up to QUIET_WAIT s) for the machine to be quiet; during it, CPU accounting: /proc/stat busy
#     ticks minus those of PostgreSQL (postmaster incl. reaped backends, live children), the
#     gateways and pgbench (bash `time`) = what other processes took ("foreign %"); runs above
#     FOREIGN_MAX % are left out of the medians. Written to $RESULTS
#     (default bench/overhead-latest.md).
#
# How long: workloads(3) x targets(3-4) x ROUNDS x (DURATION + WARMUP) + ~20 s setup.
#   Defaults (DURATION=5 ROUNDS=10 WARMUP=2, 3 targets): ~11 minutes, plus ~2 for callgrind.
#   Many short interleaved rounds beat a few long ones here: TPS drifts by ±15 % over minutes.
#   Plus the builds the first time (the plain gateway from scratch: a few minutes on 2 CPUs).
#
# Knobs (environment):
#   DURATION=10  ROUNDS=3  WARMUP=2  SCALE=10  CLIENTS=8  THREADS=2
#   WORKLOADS="-S,-S -M prepared,-N"  the pgbench workloads, comma-separated (e.g. WORKLOADS=-N
#                ROUNDS=9 for a closer look at one)
#   PLAIN_REV=0b3b717   PLAIN_TARGET_DIR=target/bench-plain-<rev>   REBUILD_PLAIN=1
#   MT=0|auto    never run the current-mt target (0, the default), or when possible (auto)
#   SKIP_BUILD=1 use the existing target/release/understudy (the plain one is still built if missing)
#   QUIET_MAX=15 QUIET_WAIT=60  before each run wait up to QUIET_WAIT s for the machine to be at
#                most QUIET_MAX % busy (0.5 s samples; QUIET_WAIT=0: never wait)
#   FOREIGN_MAX=10  a run during which other processes (not PostgreSQL, the gateways, pgbench)
#                took more than this % of the machine's CPU is left out of the medians (shown
#                in the raw table; when every run of a cell is over, all are used and marked *)
#   INSTR=auto|0 INSTR_TX=3000  count each gateway's user-space instructions per transaction
#                under callgrind afterwards (auto: when valgrind is installed; about 2 minutes)
#   RESULTS=...  KEEP_TMP=1  PGBIN=/usr/lib/postgresql/15/bin
#
# Usage: bench/overhead.sh   (as root)

set -euo pipefail
export LC_ALL=C

DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-10}
WARMUP=${WARMUP:-2}
SCALE=${SCALE:-10}
CLIENTS=${CLIENTS:-8}
THREADS=${THREADS:-2}
PLAIN_REV=${PLAIN_REV:-0b3b717}
MT=${MT:-0}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP_TMP=${KEEP_TMP:-0}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
QUIET_MAX=${QUIET_MAX:-15}
QUIET_WAIT=${QUIET_WAIT:-60}
FOREIGN_MAX=${FOREIGN_MAX:-10}
INSTR=${INSTR:-auto}
INSTR_TX=${INSTR_TX:-3000}
IFS=, read -r -a WORKLOADS <<<"${WORKLOADS:--S,-S -M prepared,-N}"

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
RESULTS=${RESULTS:-$BENCH_DIR/overhead-latest.md}
BENCH_NAME=overhead
# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"
GIT_REV=$(git_rev "$ROOT")
GATEWAY_BIN=$ROOT/target/release/understudy
PLAIN_TARGET_DIR=${PLAIN_TARGET_DIR:-$ROOT/target/bench-plain-$PLAIN_REV}

require_root "PostgreSQL is started as user postgres with runuser"
require_tools pgbench psql runuser python3 git cargo
[[ -x $PGBIN/initdb && -x $PGBIN/pg_ctl ]] || die "PostgreSQL binaries not found in $PGBIN"

TMP=""
WORKTREE=""
PG_DATA=""
declare -A GW_PID=()
cleanup() {
    local rc=$?
    set +e
    kill_now "${GW_PID[@]}"
    stop_cluster "$PG_DATA"
    if [[ -n $WORKTREE ]]; then
        git -C "$ROOT" worktree remove --force "$WORKTREE" >/dev/null 2>&1 || rm -rf "$WORKTREE"
        git -C "$ROOT" worktree prune >/dev/null 2>&1
    fi
    finish_tmp "$rc"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# CPU accounting (clock ticks, USER_HZ) to tell how much of the machine something else took
# during a run: foreign = machine busy ticks - PostgreSQL's - the gateways' - pgbench's.
#   machine_ticks: all CPUs' total and busy ticks from /proc/stat (user..steal); interrupt and
#              softirq time is not busy here: it is charged to no process, and on loopback
#              it is mostly the run's own TCP (a fifth of the machine at 40k round trips/s)
#   our_ticks: the postmaster (own + reaped children: exited backends) + its live children + the
#              gateways; pgbench's own is measured with bash's `time` (TIMEFORMAT, seconds).
machine_ticks() {
    awk '/^cpu / { t = 0; for (i = 2; i <= 9; i++) t += $i; print t, t - $5 - $6 - $7 - $8; exit }' /proc/stat
}
# Sum of CPU ticks of the postmaster (own + reaped children), its live children and the
# gateways; pure bash (no fork per process).
our_ticks() {
    local pm f line rest sum=0 gw=" ${GW_PID[*]} "
    read -r pm <"$PG_DATA/postmaster.pid"
    for f in /proc/[0-9]*/stat; do
        read -r line 2>/dev/null <"$f" || continue
        rest=${line##*) }
        # shellcheck disable=SC2086
        set -- $rest # $1 state, $2 ppid, ... $12 utime, $13 stime, $14 cutime, $15 cstime
        local pid=${f#/proc/}
        pid=${pid%/stat}
        if [[ $pid == "$pm" ]]; then
            sum=$((sum + ${12} + ${13} + ${14} + ${15}))
        elif [[ $2 == "$pm" || $gw == *" $pid "* ]]; then
            sum=$((sum + ${12} + ${13}))
        fi
    done
    echo "$sum"
}

# ---------------------------------------------------------------------------------------------
# 1. builds
if [[ $SKIP_BUILD != 1 ]]; then
    log "cargo build --release -p understudy (current tree)"
    (cd "$ROOT" && cargo build --release -p understudy)
fi
[[ -x $GATEWAY_BIN ]] || die "$GATEWAY_BIN missing (build it or unset SKIP_BUILD)"
PLAIN_FULL=$(git -C "$ROOT" rev-parse --verify "$PLAIN_REV^{commit}") || die "no commit $PLAIN_REV"
TMP=$(mktemp -d /tmp/understudy-overhead.XXXXXX)
chmod 755 "$TMP"
# The plain binary is cached by commit: a fresh worktree has fresh mtimes, so cargo would
# recompile the workspace crates (minutes on 2 CPUs) even with the target dir kept.
# It is built with the current tree's release profile, so the two binaries differ in code only.
PROFILE_ENV=(
    CARGO_PROFILE_RELEASE_LTO="$(sed -n 's/^lto *= *"\{0,1\}\([a-z]*\)"\{0,1\}/\1/p' "$ROOT/Cargo.toml" | head -n1)"
    CARGO_PROFILE_RELEASE_CODEGEN_UNITS="$(sed -n 's/^codegen-units *= *\([0-9]*\)/\1/p' "$ROOT/Cargo.toml" | head -n1)"
)
PROFILE_TAG=$(printf '%s' "${PROFILE_ENV[*]}" | tr -c 'A-Za-z0-9=' '_')
PLAIN_CACHED=$PLAIN_TARGET_DIR/understudy-$PLAIN_FULL-$PROFILE_TAG
if [[ -x $PLAIN_CACHED && ${REBUILD_PLAIN:-0} != 1 ]]; then
    log "plain gateway $PLAIN_REV: cached binary $PLAIN_CACHED"
else
    WORKTREE=$TMP/plain-src
    log "git worktree add $WORKTREE $PLAIN_REV; cargo build --release -p understudy (target dir $PLAIN_TARGET_DIR)"
    git -C "$ROOT" worktree add --detach "$WORKTREE" "$PLAIN_FULL" >"$TMP/worktree.log" 2>&1 \
        || { cat "$TMP/worktree.log" >&2; die "git worktree add failed"; }
    env "${PROFILE_ENV[@]}" CARGO_TARGET_DIR="$PLAIN_TARGET_DIR" cargo build --release --manifest-path "$WORKTREE/Cargo.toml" -p understudy \
        || die "building $PLAIN_REV failed"
    cp "$PLAIN_TARGET_DIR/release/understudy" "$PLAIN_CACHED.tmp" && mv "$PLAIN_CACHED.tmp" "$PLAIN_CACHED"
    git -C "$ROOT" worktree remove --force "$WORKTREE" && WORKTREE=""
    git -C "$ROOT" worktree prune || true
fi
PLAIN_BIN=$TMP/understudy-plain
cp "$PLAIN_CACHED" "$PLAIN_BIN"

# ---------------------------------------------------------------------------------------------
# 2. PostgreSQL
mkdir -p "$TMP/pg"
chown postgres:postgres "$TMP/pg"
PG_DATA=$TMP/pg/data
PG_PORT=$(free_port)
export PGUSER=postgres PGSSLMODE=disable PGGSSENCMODE=disable PGAPPNAME=understudy-overhead
unset PGPASSWORD PGHOST PGPORT PGDATABASE PGSERVICE
DB=bench # init_primary's
log "initdb (PostgreSQL on 127.0.0.1:$PG_PORT)"
init_primary "$TMP/pg" "$PG_PORT" 100 "$SCALE"

# ---------------------------------------------------------------------------------------------
# 3. gateways (all running for the whole benchmark; idle ones cost nothing)
declare -A PORT=([direct]=$PG_PORT)
start_gateway() { # name binary [extra args...]
    local name=$1 bin=$2
    shift 2
    local port
    port=$(free_port)
    # setsid: the gateway runs in a session of its own, as a service (and PgBouncer, which
    # daemonizes) would. In the script's session it would share one scheduler autogroup with
    # pgbench (kernel.sched_autogroup_enabled=1), and the clients it wakes would preempt it
    # twice as often as they preempt PgBouncer.
    RUST_LOG=${RUST_LOG:-warn} setsid "$bin" run --listen "127.0.0.1:$port" --backend "127.0.0.1:$PG_PORT" "$@" \
        >"$TMP/gw-$name.log" 2>&1 &
    GW_PID[$name]=$!
    if ! wait_port "$port" 20; then
        kill -KILL "${GW_PID[$name]}" 2>/dev/null || true
        unset 'GW_PID[$name]'
        return 1
    fi
    PORT[$name]=$port
}
TARGETS=(direct plain current)
start_gateway plain "$PLAIN_BIN" || { cat "$TMP/gw-plain.log" >&2; die "plain gateway did not start"; }
start_gateway current "$GATEWAY_BIN" || { cat "$TMP/gw-current.log" >&2; die "current gateway did not start"; }
CURRENT_RUNTIME="multi-thread, one worker per CPU (#[tokio::main]; no worker_threads setting)"
MT_NOTE=""
if grep -q 'worker_threads' "$ROOT/gateway/src/config.rs" 2>/dev/null; then
    # the key exists in this tree (the binary is checked by starting it): what is its default?
    wt_default=$(sed -n 's/^ *worker_threads: \([0-9]*\),.*/\1/p' "$ROOT/gateway/src/config.rs" | head -n1)
    CURRENT_RUNTIME="worker_threads = ${wt_default:-?} (default)"
    if [[ $MT != 0 && ${wt_default:-} != 0 ]]; then
        printf 'listen = "127.0.0.1:%s"\nbackends = ["127.0.0.1:%s"]\nworker_threads = 0\n' \
            "$(free_port)" "$PG_PORT" >"$TMP/current-mt.toml"
        mt_port=$(sed -n 's/^listen = "127.0.0.1:\([0-9]*\)"/\1/p' "$TMP/current-mt.toml")
        RUST_LOG=${RUST_LOG:-warn} setsid "$GATEWAY_BIN" run --config "$TMP/current-mt.toml" >"$TMP/gw-current-mt.log" 2>&1 &
        GW_PID[current-mt]=$!
        if wait_port "$mt_port" 20; then
            PORT[current-mt]=$mt_port
            TARGETS+=(current-mt)
        else
            MT_NOTE="current-mt skipped: the gateway did not start with worker_threads = 0 ($(head -c 300 "$TMP/gw-current-mt.log" | tr '\n' ' '))"
            kill -KILL "${GW_PID[current-mt]}" 2>/dev/null || true
            unset 'GW_PID[current-mt]'
        fi
    fi
fi
for t in "${TARGETS[@]}"; do
    psql -X -q -t -A -h 127.0.0.1 -p "${PORT[$t]}" -d "$DB" -c "SELECT 1" >/dev/null \
        || die "$t (port ${PORT[$t]}) does not answer"
done
log "targets: ${TARGETS[*]} (current runtime: $CURRENT_RUNTIME)"
[[ -z $MT_NOTE ]] || log "$MT_NOTE"

# ---------------------------------------------------------------------------------------------
# 4. measurement
RAW=$TMP/raw.tsv # workload target round tps latency_ms busy_before_pct foreign_during_pct
: >"$RAW"
alive() {
    [[ $1 == direct ]] && return 0
    kill -0 "${GW_PID[$1]}" 2>/dev/null || { tail -n 30 "$TMP/gw-$1.log" >&2; die "gateway $1 died"; }
}
LOAD_START=$(cut -d' ' -f1 /proc/loadavg)
n_targets=${#TARGETS[@]}
for w in "${WORKLOADS[@]}"; do
    read -r -a wargs <<<"$w"
    for ((r = 1; r <= ROUNDS; r++)); do
        for ((k = 0; k < n_targets; k++)); do
            t=${TARGETS[$(((k + r - 1) % n_targets))]}
            alive "$t"
            if [[ $WARMUP -gt 0 ]]; then
                pgbench -n -h 127.0.0.1 -p "${PORT[$t]}" -c "$CLIENTS" -j "$THREADS" -T "$WARMUP" "${wargs[@]}" "$DB" \
                    >/dev/null 2>&1 || true
            fi
            busy=$(wait_quiet "$QUIET_MAX" "$QUIET_WAIT")
            out=$TMP/run-${w// /_}-$t-$r.txt
            read -r s0_total s0_busy < <(machine_ticks)
            o0=$(our_ticks)
            rc=0
            { TIMEFORMAT='%U %S'; time pgbench -n -h 127.0.0.1 -p "${PORT[$t]}" -c "$CLIENTS" -j "$THREADS" \
                -T "$DURATION" "${wargs[@]}" "$DB" >"$out" 2>&1 || rc=$?; } 2>"$TMP/pgbench-cpu.txt"
            [[ $rc -eq 0 ]] || { log "pgbench $w against $t exited $rc:"; tail -n 10 "$out" >&2; }
            o1=$(our_ticks)
            read -r s1_total s1_busy < <(machine_ticks)
            # CPU the rest of the machine took during the run, in % of all CPUs
            foreign=$(awk -v t="$((s1_total - s0_total))" -v b="$((s1_busy - s0_busy))" -v o="$((o1 - o0))" \
                '{ pg = ($1 + $2) * 100 } END { f = (t > 0 ? 100 * (b - o - pg) / t : 0); if (f < 0) f = 0; printf "%.0f", f }' \
                "$TMP/pgbench-cpu.txt")
            tps=$(parse_tps "$out")
            lat=$(parse_lat "$out")
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$w" "$t" "$r" "${tps:-nan}" "${lat:-nan}" "$busy" "$foreign" >>"$RAW"
            log "pgbench $w round $r/$ROUNDS $t: ${tps:-?} tps (machine busy before: ${busy}%, other processes during the run: ${foreign}%)"
        done
    done
done
LOAD_END=$(cut -d' ' -f1 /proc/loadavg)

# User-space instructions per transaction of each gateway, counted by callgrind: a figure that
# the machine's noise does not move, where TPS moves by several percent between rounds.
INSTR_RAW=$TMP/instr.tsv # workload target instructions_per_tx atomic_rmw_per_tx
: >"$INSTR_RAW"
if [[ $INSTR != 0 ]] && command -v valgrind >/dev/null && command -v callgrind_control >/dev/null; then
    for t in plain current; do
        bin=$PLAIN_BIN
        [[ $t == current ]] && bin=$GATEWAY_BIN
        for w in "${WORKLOADS[@]}"; do
            read -r -a wargs <<<"$w"
            port=$(free_port)
            out=$TMP/callgrind-$t-${w// /_}.out
            RUST_LOG=${RUST_LOG:-warn} setsid valgrind --tool=callgrind --dump-instr=yes --callgrind-out-file="$out" \
                "$bin" run --listen "127.0.0.1:$port" --backend "127.0.0.1:$PG_PORT" >"$TMP/callgrind-$t.log" 2>&1 &
            vg=$!
            GW_PID[callgrind]=$vg
            wait_port "$port" 60 || { tail -n 20 "$TMP/callgrind-$t.log" >&2; die "$t did not start under valgrind"; }
            # Logins and the first queries are not what is counted.
            pgbench -n -h 127.0.0.1 -p "$port" -c 4 -j 1 -t 100 "${wargs[@]}" "$DB" >/dev/null 2>&1 || true
            callgrind_control -z "$vg" >/dev/null
            pgbench -n -h 127.0.0.1 -p "$port" -c 4 -j 1 -t $((INSTR_TX / 4)) "${wargs[@]}" "$DB" >"$out.pgbench" 2>&1 \
                || { tail -n 5 "$out.pgbench" >&2; die "pgbench under callgrind failed"; }
            callgrind_control -d "$vg" >/dev/null
            kill "$vg" 2>/dev/null
            wait "$vg" 2>/dev/null || true
            unset 'GW_PID[callgrind]'
            ir=$(awk '/^summary:/ { print $2; exit }' "$out.1")
            tx=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out.pgbench")
            # Locked instructions executed (bench/rmw_count.py), two decimals per transaction.
            rmw=$(python3 "$ROOT/bench/rmw_count.py" "$out.1" "$bin")
            printf '%s\t%s\t%s\t%s\n' "$w" "$t" "$((ir / tx))" "$((rmw * 100 / tx))" >>"$INSTR_RAW"
            log "callgrind $w $t: $((ir / tx)) instructions, $((rmw * 100 / tx))/100 atomic read-modify-writes per transaction"
        done
    done
elif [[ $INSTR != 0 ]]; then
    log "valgrind is not installed (apt-get install -y valgrind): no instruction counts"
fi

# ---------------------------------------------------------------------------------------------
# 5. report
PG_VERSION=$("$PGBIN/postgres" --version | awk '{print $3}')
REPORT=$TMP/report.md
python3 - "$RAW" "${TARGETS[*]}" "$INSTR_RAW" "$(IFS=,; echo "${WORKLOADS[*]}")" >"$REPORT" <<PY
import math, statistics, sys
sys.path.insert(0, "$BENCH_DIR")
from stats import fmt_ci, paired
raw, targets, instr_raw = sys.argv[1], sys.argv[2].split(), sys.argv[3]
W = sys.argv[4].split(",")
rows = [l.rstrip("\n").split("\t") for l in open(raw) if l.strip()]
FOREIGN_MAX = float("$FOREIGN_MAX")
marked = set()
def med(w, t):
    cell = [r for r in rows if r[0] == w and r[1] == t and r[3] != "nan"]
    clean = [r for r in cell if float(r[6]) <= FOREIGN_MAX]
    if not clean:
        clean = cell
        if cell: marked.add((w, t))
    v = [float(r[3]) for r in clean]
    return statistics.median(v) if v else float("nan")
def paired_ratio(w, a, b):
    # Rounds where both runs are clean, else all rounds.
    def by_round(t):
        return {r[2]: (float(r[3]), float(r[6]) <= FOREIGN_MAX) for r in rows if r[0] == w and r[1] == t and r[3] != "nan"}
    x, y = by_round(a), by_round(b)
    both = [k for k in x if k in y]
    clean = [k for k in both if x[k][1] and y[k][1]] or both
    return paired({k: x[k][0] for k in clean}, {k: y[k][0] for k in clean})
def n_clean(w, t):
    return sum(1 for r in rows if r[0] == w and r[1] == t and r[3] != "nan" and float(r[6]) <= FOREIGN_MAX)
print("# Understudy journaling overhead")
print()
print("$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs ($(uname -r)), PostgreSQL $PG_VERSION; pgbench -c $CLIENTS -j $THREADS -T $DURATION,")
print("ROUNDS=$ROUNDS (median; targets interleaved, order rotated each round, ${WARMUP} s warm-up before each run), SCALE=$SCALE,")
print("synchronous_commit=off, trust auth, one PostgreSQL, everything on 127.0.0.1. Load average (1 min) at start $LOAD_START, at end $LOAD_END.")
print()
print("- **direct**: pgbench → PostgreSQL")
print("- **plain**: the gateway before journaling, commit $PLAIN_REV ($(git -C "$ROOT" log -1 --format=%s "$PLAIN_FULL" | cut -c1-60)…), multi-thread runtime (#[tokio::main])")
print("- **current**: $GIT_REV, default configuration ($CURRENT_RUNTIME): session journal, response digests, xid capture before COMMIT")
if "current-mt" in targets:
    print("- **current-mt**: the same binary with \`worker_threads = 0\` (one worker per CPU, the plain gateway's runtime): current-mt/plain isolates the journal's cost from the runtime choice")
note = """$MT_NOTE"""
if note: print(f"- {note}")
fg = [float(r[6]) for r in rows]
if fg:
    dirty = sum(1 for x in fg if x > FOREIGN_MAX)
    print()
    print(f"Other processes' CPU during the runs (machine busy minus PostgreSQL, gateways, pgbench; % of all CPUs): median {statistics.median(fg):.0f} %,"
          f" max {max(fg):.0f} %; {dirty} of {len(fg)} runs above FOREIGN_MAX={FOREIGN_MAX:.0f} % are left out of the medians"
          + (" — **the machine was shared; treat the numbers with care**" if dirty > len(fg) // 4 else "") + ".")
print()
print("## Median TPS")
print()
print("| workload | " + " | ".join(targets) + " |")
print("|---|" + "---:|" * len(targets))
for w in W:
    print(f"| \`{w}\` | " + " | ".join(f"{med(w,t):,.0f}{'*' if (w,t) in marked else ''} ({n_clean(w,t) if (w,t) not in marked else 'all'})" for t in targets) + " |")
print()
print("(n) = runs in the median (clean runs); * = no clean run, median of all runs.")
print()
print("## Ratios")
print()
pairs = [("current", "plain"), ("current", "direct"), ("plain", "direct")]
if "current-mt" in targets:
    pairs[1:1] = [("current-mt", "plain")]
print("| workload | " + " | ".join(f"{a}/{b}" for a, b in pairs) + " | current/plain per round (n, 95 % CI) | current/plain ≥ 0.95 |")
print("|---|" + "---:|" * (len(pairs) + 1) + ":---:|")
verdicts = []
for w in W:
    cells = [med(w, a) / med(w, b) for a, b in pairs]
    pr, pn, ci = paired_ratio(w, "current", "plain")
    ok = pr >= 0.95
    ci = fmt_ci(ci)
    verdicts.append((w, pr, ci, ok, (med(w, "current-mt") / med(w, "plain")) if "current-mt" in targets else None))
    print(f"| \`{w}\` | " + " | ".join(f"{c:.3f}" for c in cells) + f" | {pr:.3f} ({pn}, {ci}) | {'met' if ok else '**missed**'} |")
print()
print("## Targets")
print()
for w, c, ci, ok, mt in verdicts:
    extra = f" (current-mt/plain {mt:.3f})" if mt is not None else ""
    print(f"- \`{w}\`: current/plain per round {c:.3f} (95 % CI {ci}) vs ≥ 0.95 → {'met' if ok else 'MISSED'}{extra}")
print()
print("current/plain per round: the median, over rounds, of the two targets' ratio within one round (the machine's")
print("slow drift cancels), with a distribution-free 95 % interval for that median.")
print("Run-to-run noise on this machine is several percent between rounds of the same target (see the raw runs);")
print("a ratio within a few percent of 0.95 is not a clear verdict either way.")
print()
instr_rows = [l.rstrip("\n").split("\t") for l in open(instr_raw) if l.strip()]
instr = {(r[0], r[1]): int(r[2]) for r in instr_rows}
rmw = {(r[0], r[1]): int(r[3]) / 100 for r in instr_rows}
if instr:
    print("## Gateway instructions per transaction (user space, callgrind)")
    print()
    print("| workload | plain | current | current/plain | atomic RMW plain | atomic RMW current |")
    print("|---|---:|---:|---:|---:|---:|")
    for w in W:
        p, c = instr.get((w, "plain")), instr.get((w, "current"))
        if p and c:
            print(f"| \`{w}\` | {p:,} | {c:,} | {c / p:.2f} | {rmw[(w, 'plain')]:.1f} | {rmw[(w, 'current')]:.1f} |")
    print()
    print("Each gateway alone under \`valgrind --tool=callgrind\`, $INSTR_TX transactions of 4 pgbench clients after 400 uncounted;")
    print("the kernel's share of the work (system calls, TCP), the same for both, is not counted. Atomic RMW: locked")
    print("instructions executed per transaction (bench/rmw_count.py; about 20 cycles each, which the instruction count hides).")
    print()
print("## Raw runs")
print()
print("| workload | target | round | tps | latency avg (ms) | machine busy before (%) | other processes during (%) |")
print("|---|---|---:|---:|---:|---:|---:|")
for r in rows:
    tps = "nan" if r[3] == "nan" else f"{float(r[3]):,.1f}"
    flag = " (left out)" if float(r[6]) > FOREIGN_MAX else ""
    print(f"| \`{r[0]}\` | {r[1]} | {r[2]} | {tps} | {r[4]} | {r[5]} | {r[6]}{flag} |")
PY
cp "$REPORT" "$RESULTS"
echo
cat "$REPORT"
echo
log "report written to $RESULTS"
