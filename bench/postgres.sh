#!/usr/bin/env bash
# The ledger on PostgreSQL against the ledger on SQLite, in one run: one server on SQLite, one
# server on PostgreSQL, and three servers sharing that PostgreSQL behind an nginx proxy (escrow
# leases); the same fixed upstream (nginx), the same load (wrk, plain chat completions), budgets
# enforced and every call settled durably. PostgreSQL runs with its defaults (fsync and
# synchronous_commit on), on this machine, as a server the script starts and stops.
#
# Prints req/s, p50 and p99 per target, Stipend's CPU per call and PostgreSQL's (all its
# processes), and what the database did per call: transactions committed, rows inserted and
# updated, and statements (pg_stat_statements is not needed: the counters are pg_stat_database's).
#
# Usage: bench/postgres.sh [SECONDS]   (default 10 s per run; at 1, 16 and 64 connections)
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN="${1:-10}"

need=()
command -v nginx >/dev/null 2>&1 || need+=(nginx)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need+=(postgresql)
if ((${#need[@]})); then
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --locked -q -p stipend
STIPEND="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/stipend"
PG_BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"

WORK="$(mktemp -d)"
chmod 755 "$WORK"
AS_PG=()
if [ "$(id -u)" -eq 0 ]; then
    AS_PG=(setpriv --reuid=nobody --regid=nogroup --clear-groups)
fi
cleanup() {
    [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
    for pid in "${SQLITE_PID:-}" "${PG_PID:-}" "${N1_PID:-}" "${N2_PID:-}" "${N3_PID:-}"; do
        [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    done
    [ -d "$WORK/pg/data" ] && "${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$WORK/pg/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

UPSTREAM_PORT=18911 SQLITE_PORT=18912 PG_STIPEND_PORT=18913 PG_PORT=18914
NODES_PORT=18920 N1_PORT=18921 N2_PORT=18922 N3_PORT=18923
ANSWER='{"id":"x","object":"chat.completion","created":0,"model":"fixed","choices":[{"index":0,"message":{"role":"assistant","content":"Paris."},"finish_reason":"stop"}],"usage":{"prompt_tokens":20,"completion_tokens":3,"total_tokens":23}}'
mkdir -p "$WORK/nginx/logs"
cat > "$WORK/nginx.conf" <<CONF
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$UPSTREAM_PORT;
        location / { default_type application/json; return 200 '$ANSWER'; }
    }
    upstream nodes {
        least_conn;
        server 127.0.0.1:$N1_PORT;
        server 127.0.0.1:$N2_PORT;
        server 127.0.0.1:$N3_PORT;
        keepalive 128;
    }
    server {
        listen 127.0.0.1:$NODES_PORT;
        location / {
            proxy_pass http://nodes;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream off;
        }
    }
}
CONF
nginx -p "$WORK/nginx" -c "$WORK/nginx.conf"

# PostgreSQL with its defaults (durable commits), on loopback.
mkdir -p "$WORK/pg"
[ "$(id -u)" -eq 0 ] && chown nobody:nogroup "$WORK/pg"
"${AS_PG[@]}" "$PG_BIN/initdb" -D "$WORK/pg/data" -U stipend --auth=trust -E UTF8 >/dev/null
"${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$WORK/pg/data" -l "$WORK/pg/log" -w \
    -o "-p $PG_PORT -k $WORK/pg -c listen_addresses=127.0.0.1" start >/dev/null
psql -X -q -d "postgres://stipend@127.0.0.1:$PG_PORT/postgres" -c "CREATE DATABASE ledger"
DATABASE_URL="postgres://stipend@127.0.0.1:$PG_PORT/ledger"
pg_pids() { pgrep -u nobody -f "postgres" || pgrep -f "$WORK/pg/data" || true; }

config() {
    cat <<CONF
listen = "127.0.0.1:$1"
$2
[stipend]
amount = "1000000 EFLOP"
[[models]]
name = "fixed"
backend = "openai"
base_url = "http://127.0.0.1:$UPSTREAM_PORT/v1"
params = "8B"
max_concurrency = 1024
CONF
}
psql -X -q -d "postgres://stipend@127.0.0.1:$PG_PORT/postgres" -c "CREATE DATABASE shared"
SHARED_URL="postgres://stipend@127.0.0.1:$PG_PORT/shared"
mkdir -p "$WORK/sqlite" "$WORK/postgres" "$WORK/n1" "$WORK/n2" "$WORK/n3"
config "$SQLITE_PORT" "" > "$WORK/sqlite/stipend.toml"
config "$PG_STIPEND_PORT" "database_url = \"$DATABASE_URL\"" > "$WORK/postgres/stipend.toml"
for n in 1 2 3; do
    port_var="N${n}_PORT"
    config "${!port_var}" "database_url = \"$SHARED_URL\"" > "$WORK/n$n/stipend.toml"
done
start() {
    "$STIPEND" --config "$WORK/$1/stipend.toml" serve > "$WORK/$1/out" 2>&1 &
    echo $!
}
SQLITE_PID=$(start sqlite)
PG_PID=$(start postgres)
N1_PID=$(start n1)
N2_PID=$(start n2)
N3_PID=$(start n3)
for target in sqlite postgres n1; do
    until grep -q "Press Ctrl-C" "$WORK/$target/out" 2>/dev/null; do sleep 0.05; done
    "$STIPEND" --config "$WORK/$target/stipend.toml" account create bench > /dev/null
    key=$("$STIPEND" --config "$WORK/$target/stipend.toml" --json key create bench | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
    cat > "$WORK/$target/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"model":"fixed","messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":16}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $key"
LUA
done
for n in 2 3; do until grep -q "Press Ctrl-C" "$WORK/n$n/out" 2>/dev/null; do sleep 0.05; done; done

cpu_ticks() { local total=0 pid; for pid in "$@"; do total=$(( total + $(awk '{print $14 + $15}' /proc/"$pid"/stat) )); done; echo "$total"; }
# PostgreSQL's CPU: every process of the cluster (backends, WAL writer, checkpointer, ...).
pg_ticks() {
    local total=0 pid
    for pid in $(pgrep -f "$WORK/pg/data" || true) $(pgrep -P "$(head -1 "$WORK/pg/data/postmaster.pid")" || true); do
        [ -r "/proc/$pid/stat" ] && total=$(( total + $(awk '{print $14 + $15}' "/proc/$pid/stat") ))
    done
    echo "$total"
}
TICK_HZ=$(getconf CLK_TCK)
pg_counters() {
    psql -X -A -t -d "$DATABASE_URL" -c \
        "SELECT xact_commit, tup_inserted, tup_updated, tup_fetched + tup_returned FROM pg_stat_database WHERE datname = 'ledger'" | tr '|' ' '
}

run() {
    local port=$1 connections=$2 script=$3
    local threads=$((connections < 2 ? 1 : 2))
    wrk -t"$threads" -c"$connections" -d"${SECONDS_PER_RUN}s" --latency -s "$script" \
        "http://127.0.0.1:$port/v1/chat/completions" > "$WORK/wrk.out"
    local rps p50 p99 errors
    rps=$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk.out")
    p50=$(awk '$1 == "50%" {print $2}' "$WORK/wrk.out")
    p99=$(awk '$1 == "99%" {print $2}' "$WORK/wrk.out")
    errors=$(awk '/Non-2xx/ {print $4}' "$WORK/wrk.out")
    echo "$rps $p50 $p99 ${errors:-0}"
}

echo "ledger store load run: $(nproc) cores ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), ${SECONDS_PER_RUN}s per run, PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') with its defaults"
echo
echo "| connections | ledger | req/s | p50 | p99 | non-2xx | Stipend CPU/call | PostgreSQL CPU/call | vs SQLite |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
notes=()
for connections in 1 16 64; do
    s_cpu0=$(cpu_ticks "$SQLITE_PID")
    read -r s_rps s_p50 s_p99 s_err < <(run "$SQLITE_PORT" "$connections" "$WORK/sqlite/post.lua")
    s_cpu=$(( $(cpu_ticks "$SQLITE_PID") - s_cpu0 ))
    p_cpu0=$(cpu_ticks "$PG_PID")
    d_cpu0=$(pg_ticks)
    read -r c0 i0 u0 r0 < <(pg_counters)
    read -r p_rps p_p50 p_p99 p_err < <(run "$PG_STIPEND_PORT" "$connections" "$WORK/postgres/post.lua")
    read -r c1 i1 u1 r1 < <(pg_counters)
    p_cpu=$(( $(cpu_ticks "$PG_PID") - p_cpu0 ))
    d_cpu=$(( $(pg_ticks) - d_cpu0 ))
    per_call() { python3 -c "print(f'{$1 / $TICK_HZ * 1e6 / ($2 * $SECONDS_PER_RUN):.1f} µs')"; }
    calls=$(python3 -c "print(round($p_rps * $SECONDS_PER_RUN))")
    echo "| $connections | SQLite | $s_rps | $s_p50 | $s_p99 | $s_err | $(per_call "$s_cpu" "$s_rps") | | 1.00× |"
    echo "| $connections | PostgreSQL | $p_rps | $p_p50 | $p_p99 | $p_err | $(per_call "$p_cpu" "$p_rps") | $(per_call "$d_cpu" "$p_rps") | $(python3 -c "print(f'{$p_rps / $s_rps:.2f}×')") |"
    n_cpu0=$(cpu_ticks "$N1_PID" "$N2_PID" "$N3_PID")
    nd_cpu0=$(pg_ticks)
    read -r n_rps n_p50 n_p99 n_err < <(run "$NODES_PORT" "$connections" "$WORK/n1/post.lua")
    n_cpu=$(( $(cpu_ticks "$N1_PID" "$N2_PID" "$N3_PID") - n_cpu0 ))
    nd_cpu=$(( $(pg_ticks) - nd_cpu0 ))
    echo "| $connections | PostgreSQL, three servers (nginx) | $n_rps | $n_p50 | $n_p99 | $n_err | $(per_call "$n_cpu" "$n_rps") | $(per_call "$nd_cpu" "$n_rps") | $(python3 -c "print(f'{$n_rps / $s_rps:.2f}×')") |"
    notes+=("$connections connections, $calls calls: $(python3 -c "c=$calls; print(f'{($c1-$c0)/c:.3f} commits, {($i1-$i0)/c:.2f} rows inserted, {($u1-$u0)/c:.3f} rows updated, {($r1-$r0)/c:.2f} rows read per call')")")
done
echo
echo "What PostgreSQL did per call (pg_stat_database; the counters include the bench's own reads):"
for note in "${notes[@]}"; do echo "  $note"; done
for target in sqlite postgres n1; do
    echo "$target: ledger verify: $("$STIPEND" --config "$WORK/$target/stipend.toml" ledger verify)"
done
