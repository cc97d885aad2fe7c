#!/usr/bin/env bash
# The gateway load run: the same load against three targets in one run, so that the ratios mean
# something on a shared machine:
#   (a) the upstream directly: nginx answering a fixed chat completion (never the bottleneck),
#   (b) an nginx reverse proxy in front of it (the floor for any proxy),
#   (c) Stipend in front of it, with budgets enforced (every call reserved and settled durably),
#       with its default HTTP worker threads (half the cores, at least one), and
#   (d) the same with `workers = 2`, one per core here (the default before e68601e), to see
#       what a second event loop costs or buys on this machine.
# Prints a markdown table, plus Stipend's CPU per call (steadier than req/s on a shared machine)
# and its HTTP worker's share of a core and preemptions a second,
# its RSS idle and under load, and its start-up time.
#
# Usage: bench/load.sh [SECONDS]   (default 10 s per run; at 1 connection, below saturation,
# and at 16 and 64, at saturation)
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN="${1:-10}"

need=()
command -v nginx >/dev/null 2>&1 || need+=(nginx)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
if ((${#need[@]})); then
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --locked -q -p stipend
STIPEND="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/stipend"

WORK="$(mktemp -d)"
cleanup() {
    [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
    [ -n "${STIPEND_PID:-}" ] && kill "$STIPEND_PID" 2>/dev/null || true
    [ -n "${STIPEND_PID:-}" ] && wait "$STIPEND_PID" 2>/dev/null || true
    [ -n "${STIPEND1_PID:-}" ] && kill "$STIPEND1_PID" 2>/dev/null || true
    [ -n "${STIPEND1_PID:-}" ] && wait "$STIPEND1_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

UPSTREAM_PORT=18901 PROXY_PORT=18902 STIPEND_PORT=18903 STIPEND1_PORT=18904
ANSWER='{"id":"x","object":"chat.completion","created":0,"model":"fixed","choices":[{"index":0,"message":{"role":"assistant","content":"Paris."},"finish_reason":"stop"}],"usage":{"prompt_tokens":20,"completion_tokens":3,"total_tokens":23}}'
# A streamed answer: 16 content chunks, the usage chunk, [DONE]; served whole, as a fixed body.
STREAM_ANSWER=$(python3 - <<'PY'
import json
base = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "fixed"}
events = [dict(base, choices=[{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}]) for i in range(16)]
events.append(dict(base, choices=[], usage={"prompt_tokens": 20, "completion_tokens": 16, "total_tokens": 36}))
print("".join(f"data: {json.dumps(event, separators=(',', ':'))}\n\n" for event in events) + "data: [DONE]\n\n", end="")
PY
)
mkdir -p "$WORK/nginx/logs"
cat > "$WORK/nginx.conf" <<CONF
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    upstream fixed { server 127.0.0.1:$UPSTREAM_PORT; keepalive 128; }
    server {
        listen 127.0.0.1:$UPSTREAM_PORT;
        location /stream/ { default_type text/event-stream; return 200 '$STREAM_ANSWER
'; }
        location / { default_type application/json; return 200 '$ANSWER'; }
    }
    server {
        listen 127.0.0.1:$PROXY_PORT;
        location / {
            proxy_pass http://fixed;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
CONF
nginx -p "$WORK/nginx" -c "$WORK/nginx.conf"

cat > "$WORK/stipend.toml" <<CONF
listen = "127.0.0.1:$STIPEND_PORT"
[stipend]
amount = "1000000 EFLOP"
[[models]]
name = "fixed"
backend = "openai"
base_url = "http://127.0.0.1:$UPSTREAM_PORT/v1"
params = "8B"
max_concurrency = 1024
[[models]]
name = "fixed-stream"
backend = "openai"
base_url = "http://127.0.0.1:$UPSTREAM_PORT/stream/v1"
upstream_model = "fixed"
params = "8B"
max_concurrency = 1024
CONF
started_ns=$(date +%s%N)
"$STIPEND" --config "$WORK/stipend.toml" serve > "$WORK/stipend.out" 2>&1 &
STIPEND_PID=$!
until grep -q "Press Ctrl-C" "$WORK/stipend.out" 2>/dev/null; do sleep 0.01; done
ready_ms=$(( ($(date +%s%N) - started_ns) / 1000000 ))
"$STIPEND" --config "$WORK/stipend.toml" account create bench > /dev/null
KEY=$("$STIPEND" --config "$WORK/stipend.toml" --json key create bench | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
rss_mb() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$STIPEND_PID/status"; }
rss_idle=$(rss_mb)

# The same with two worker threads, on its own data directory.
mkdir -p "$WORK/one"
sed -e "s/$STIPEND_PORT/$STIPEND1_PORT/" "$WORK/stipend.toml" > "$WORK/one/stipend.toml"
echo "workers = 2" | cat - "$WORK/one/stipend.toml" > "$WORK/one/stipend.tmp" && mv "$WORK/one/stipend.tmp" "$WORK/one/stipend.toml"
"$STIPEND" --config "$WORK/one/stipend.toml" serve > "$WORK/one/stipend.out" 2>&1 &
STIPEND1_PID=$!
until grep -q "Press Ctrl-C" "$WORK/one/stipend.out" 2>/dev/null; do sleep 0.01; done
"$STIPEND" --config "$WORK/one/stipend.toml" account create bench > /dev/null
KEY1=$("$STIPEND" --config "$WORK/one/stipend.toml" --json key create bench | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
cat > "$WORK/post1.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"model":"fixed","messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":16}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $KEY1"
LUA

cat > "$WORK/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"model":"fixed","messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":16}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $KEY"
LUA

cat > "$WORK/stream.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"model":"fixed-stream","messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":16,"stream":true}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $KEY"
LUA

# CPU time (user + system, in clock ticks) of every thread of a process.
cpu_ticks() { awk '{print $14 + $15}' /proc/"$1"/stat; }
TICK_HZ=$(getconf CLK_TCK)
# Of the HTTP worker threads (tokio-rt-worker) only: CPU ticks and involuntary context switches
# (preemptions), summed. With the load generator and the upstream on the same cores, the worker
# is preempted thousands of times a second and gets less than a core (docs/benchmarks.md).
worker_stats() {
    local ticks=0 preempted=0 task
    for task in /proc/"$1"/task/*; do
        [ "$(cat "$task/comm")" = tokio-rt-worker ] || continue
        ticks=$(( ticks + $(awk '{print $14 + $15}' "$task/stat") ))
        preempted=$(( preempted + $(awk '/^nonvoluntary_ctxt_switches/ {print $2}' "$task/status") ))
    done
    echo "$ticks $preempted"
}

# wrk's latency distribution: 50% and 99% lines; requests/sec.
run() {
    local url=$1 connections=$2 script=${3:-$WORK/post.lua}
    local threads=$((connections < 2 ? 1 : 2))
    wrk -t"$threads" -c"$connections" -d"${SECONDS_PER_RUN}s" --latency -s "$script" "$url" > "$WORK/wrk.out"
    local rps p50 p99 errors
    rps=$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk.out")
    p50=$(awk '$1 == "50%" {print $2}' "$WORK/wrk.out")
    p99=$(awk '$1 == "99%" {print $2}' "$WORK/wrk.out")
    errors=$(awk '/Non-2xx/ {print $4}' "$WORK/wrk.out")
    echo "$rps $p50 $p99 ${errors:-0}"
}

echo "gateway load run: $(nproc) cores ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), ${SECONDS_PER_RUN}s per run, wrk -t2 (-t1 at 1 connection)"
echo
echo "| connections | target | req/s | p50 | p99 | non-2xx | vs nginx proxy |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
rss_load=0
cpu_notes=()
worker_notes=()
for connections in 1 16 64; do
    read -r d_rps d_p50 d_p99 d_err < <(run "http://127.0.0.1:$UPSTREAM_PORT/v1/chat/completions" "$connections")
    read -r p_rps p_p50 p_p99 p_err < <(run "http://127.0.0.1:$PROXY_PORT/v1/chat/completions" "$connections")
    ( sleep $((SECONDS_PER_RUN / 2)); rss_mb > "$WORK/rss_load" ) &
    sampler=$!
    s_cpu0=$(cpu_ticks "$STIPEND_PID")
    read -r w_ticks0 w_preempted0 < <(worker_stats "$STIPEND_PID")
    read -r s_rps s_p50 s_p99 s_err < <(run "http://127.0.0.1:$STIPEND_PORT/v1/chat/completions" "$connections")
    s_cpu=$(( $(cpu_ticks "$STIPEND_PID") - s_cpu0 ))
    read -r w_ticks w_preempted < <(worker_stats "$STIPEND_PID")
    worker_notes+=("$connections connections: $(python3 -c "print(f'{($w_ticks - $w_ticks0) / $TICK_HZ / $SECONDS_PER_RUN:.2f} of a core, {($w_preempted - $w_preempted0) / $SECONDS_PER_RUN:.0f} preemptions a second')")")
    wait "$sampler"
    o_cpu0=$(cpu_ticks "$STIPEND1_PID")
    read -r o_rps o_p50 o_p99 o_err < <(run "http://127.0.0.1:$STIPEND1_PORT/v1/chat/completions" "$connections" "$WORK/post1.lua")
    o_cpu=$(( $(cpu_ticks "$STIPEND1_PID") - o_cpu0 ))
    # Stipend's own CPU per call (all its threads, the ledger writer included): steadier than
    # req/s on a shared machine.
    cpu_notes+=("$connections connections: $(python3 -c "print(f'{$s_cpu / $TICK_HZ * 1e6 / ($s_rps * $SECONDS_PER_RUN):.1f}')") µs (default workers), $(python3 -c "print(f'{$o_cpu / $TICK_HZ * 1e6 / ($o_rps * $SECONDS_PER_RUN):.1f}')") µs (workers = 2)")
    rss_now=$(cat "$WORK/rss_load")
    rss_load=$(python3 -c "print(max($rss_load, $rss_now))")
    ratio=$(python3 -c "print(f'{$s_rps / $p_rps:.2f}×')")
    ratio1=$(python3 -c "print(f'{$o_rps / $p_rps:.2f}×')")
    echo "| $connections | upstream directly | $d_rps | $d_p50 | $d_p99 | $d_err | |"
    echo "| $connections | nginx proxy | $p_rps | $p_p50 | $p_p99 | $p_err | 1.00× |"
    echo "| $connections | Stipend, budgets enforced | $s_rps | $s_p50 | $s_p99 | $s_err | $ratio |"
    echo "| $connections | Stipend, workers = 2 | $o_rps | $o_p50 | $o_p99 | $o_err | $ratio1 |"
done
echo
echo "Streamed answers (16 content chunks, usage, [DONE]; usage asked for upstream and stripped), 64 connections:"
echo
echo "| target | req/s | p50 | p99 | non-2xx | vs nginx proxy |"
echo "| --- | --- | --- | --- | --- | --- |"
read -r p_rps p_p50 p_p99 p_err < <(run "http://127.0.0.1:$PROXY_PORT/stream/v1/chat/completions" 64 "$WORK/stream.lua")
s_cpu0=$(cpu_ticks "$STIPEND_PID")
read -r s_rps s_p50 s_p99 s_err < <(run "http://127.0.0.1:$STIPEND_PORT/v1/chat/completions" 64 "$WORK/stream.lua")
s_cpu=$(( $(cpu_ticks "$STIPEND_PID") - s_cpu0 ))
echo "| nginx proxy | $p_rps | $p_p50 | $p_p99 | $p_err | 1.00× |"
echo "| Stipend, budgets enforced | $s_rps | $s_p50 | $s_p99 | $s_err | $(python3 -c "print(f'{$s_rps / $p_rps:.2f}×')") |"
cpu_notes+=("streamed, 64 connections: $(python3 -c "print(f'{$s_cpu / $TICK_HZ * 1e6 / ($s_rps * $SECONDS_PER_RUN):.1f}')") µs (default workers)")
echo
echo "Stipend's CPU per call (its threads, the ledger writer included):"
for note in "${cpu_notes[@]}"; do echo "  $note"; done
echo "Stipend's HTTP worker thread (default workers):"
for note in "${worker_notes[@]}"; do echo "  $note"; done
echo "Stipend: start to ready ${ready_ms} ms (no model loaded); RSS idle ${rss_idle} MB, under load ${rss_load} MB (peak sampled)."
charged=$("$STIPEND" --config "$WORK/stipend.toml" --json account show bench | python3 -c 'import json,sys; a=json.load(sys.stdin); print(a["reserved_cu"])')
verify=$("$STIPEND" --config "$WORK/stipend.toml" ledger verify)
echo "After the run: reserved_cu = $charged; ledger verify: $verify"
