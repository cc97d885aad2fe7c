#!/usr/bin/env bash
# Memory under a sustained load: Stipend in front of the fake upstream (`echo`), 64 connections
# of wrk for SECONDS, once per store page cache given (store_cache_mb); prints the server's RSS
# idle, every 10 s under load, and after, with the requests a second of each run.
#
# Usage: bench/rss.sh [SECONDS] [CACHE_MB ...]   (default: 60 s; 16 and 64 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN="${1:-60}"
shift || true
CACHES=("${@:-16 64}")
command -v wrk >/dev/null 2>&1 || { sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"; $sudo apt-get update -qq; DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq wrk >/dev/null; }
cargo build --release --locked -q -p stipend -p stipend-testkit
TARGET="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release"
WORK="$(mktemp -d)"
cleanup() { kill "${UP_PID:-}" "${ST_PID:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
"$TARGET/stipend-fake-upstream" 127.0.0.1:18911 > /dev/null & UP_PID=$!
rss() { awk '/VmRSS/ {printf "%.1f MB", $2 / 1024}' "/proc/$1/status"; }
echo "memory under load: $(nproc) cores, ${SECONDS_PER_RUN}s at 64 connections per run"
for cache in ${CACHES[@]}; do
    dir="$WORK/run-$cache"; mkdir -p "$dir"
    cat > "$dir/stipend.toml" <<CONF
listen = "127.0.0.1:18912"
store_cache_mb = $cache
[stipend]
amount = "1 EFLOP"
[[models]]
name = "echo"
backend = "openai"
base_url = "http://127.0.0.1:18911/v1"
params = "8B"
max_concurrency = 256
CONF
    "$TARGET/stipend" --config "$dir/stipend.toml" serve > "$dir/out" 2>&1 & ST_PID=$!
    until grep -q "Press Ctrl-C" "$dir/out" 2>/dev/null; do sleep 0.1; done
    "$TARGET/stipend" --config "$dir/stipend.toml" account create bench > /dev/null
    KEY=$("$TARGET/stipend" --config "$dir/stipend.toml" --json key create bench | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
    cat > "$dir/post.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $KEY"
wrk.body = '{"model": "echo", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16}'
LUA
    idle=$(rss $ST_PID)
    wrk -t2 -c64 -d"${SECONDS_PER_RUN}s" -s "$dir/post.lua" http://127.0.0.1:18912/v1/chat/completions > "$dir/wrk" &
    WRK_PID=$!
    samples=""
    for ((t = 10; t <= SECONDS_PER_RUN; t += 10)); do sleep 10; samples+=" ${t}s $(rss $ST_PID);"; done
    wait $WRK_PID
    rps=$(awk '/Requests\/sec/ {print $2}' "$dir/wrk")
    echo "store_cache_mb = $cache: idle $idle;$samples after $(rss $ST_PID); $rps req/s"
    kill $ST_PID; wait $ST_PID 2>/dev/null || true; ST_PID=""
done
