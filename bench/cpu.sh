#!/usr/bin/env bash
# CPU per request at 64 connections, for taking the proxy's cost apart:
#   bench/cpu.sh KIND [runs]
#   KIND: sync | spool | spool-no-sqlite | spool-no-sender | spool-no-delivery-log |
#         spool-no-upstream-call | spool-no-spool | spool-read-only | floor-app | floor-spool | floor-spool-rows | floor-sync | floor-httptools
#   EVENTS=10 bench/cpu.sh spool: the same POST carrying 10 events (CPU per request; per event = /10)
#   STRACE=out.txt bench/cpu.sh spool 1: also counts the server's system calls per request
#   PROFILE=out.txt bench/cpu.sh spool 1: also samples the server with py-spy during the
#     runs and writes its collapsed stacks to out.txt (py-spy from pip)
# The measured server is pinned to CPU 0, wrk and a fast nginx upstream to CPU 1;
# the bench's mixpanel-js-shaped POST; prints req/s and CPU µs/req (utime+stime
# of the server process over requests completed; of it, the kernel's; minor page faults) for each 5 s run. Interleave
# kinds when comparing: these machines are noisy. Everything on 127.0.0.1;
# stops what it started.
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:-spool}; runs=${2:-3}
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || { apt-get update -qq && apt-get install -y -qq nginx >/dev/null; }
export PATH="$PATH:/usr/sbin"
py=$(python3 -c 'import sys; print(sys.executable)')
tmp=$(mktemp -d); pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
up=$(port); px=$(port)
cat > "$tmp/up.conf" <<NGX
worker_processes 1; pid $tmp/up.pid; error_log $tmp/up.err warn; daemon off;
events { worker_connections 1024; }
http { access_log off; client_body_temp_path $tmp/b; keepalive_requests 100000000;
  server { listen 127.0.0.1:$up; location / { default_type application/json; return 200 '{"status":1,"error":null}'; } } }
NGX
taskset -c 1 nginx -p "$tmp" -c "$tmp/up.conf" & pids+=($!)
# The same request body as bench/instructions.sh.
sed -n '/^python3 - "\$tmp\/post.lua"/,/^PY$/p' bench/instructions.sh > "$tmp/post.sh"
tmp=$tmp bash "$tmp/post.sh"
mode=${kind%%-*}
printf '[server]\ndata_dir = "%s/data"\n[upstream]\nus = "http://127.0.0.1:%s"\n[cookie]\nsecure = false\nsecret = "cpu-bench-secret-cpu-bench-secret"\n[delivery]\nmode = "%s"\n' \
  "$tmp" "$up" "$mode" > "$tmp/proxy.toml"
serve=(serve --config "$tmp/proxy.toml" --port "$px")
case "$kind" in
  sync|spool) cmd=("$py" -m proxy "${serve[@]}") ;;
  spool-no-sqlite) cmd=("$py" bench/ablate.py no-sqlite "${serve[@]}") ;;
  spool-no-sender) cmd=("$py" bench/ablate.py no-sender "${serve[@]}") ;;
  spool-no-delivery-log) cmd=("$py" bench/ablate.py no-delivery-log "${serve[@]}") ;;
  spool-no-upstream-call) cmd=("$py" bench/ablate.py no-upstream-call "${serve[@]}") ;;
  spool-no-spool) cmd=("$py" bench/ablate.py no-spool "${serve[@]}") ;;
  spool-read-only) cmd=("$py" bench/ablate.py read-only "${serve[@]}") ;;
  floor-app) cmd=("$py" bench/floor_app.py "$px" app) ;;
  floor-spool) cmd=("$py" bench/floor_spool.py "$px" "http://127.0.0.1:$up" "$tmp/floor") ;;
  floor-spool-rows) cmd=("$py" bench/floor_spool.py "$px" "http://127.0.0.1:$up" "$tmp/floor" --row-per-request) ;;
  floor-sync) cmd=("$py" bench/floor_spool.py "$px" "http://127.0.0.1:$up" "$tmp/floor" --sync) ;;
  floor-httptools) cmd=("$py" bench/floor_app.py "$px" httptools) ;;
  *) echo "usage: $0 sync|spool|spool-no-sqlite|spool-no-sender|spool-no-delivery-log|spool-no-upstream-call|spool-no-spool|spool-read-only|floor-app|floor-spool|floor-spool-rows|floor-sync|floor-httptools [runs]" >&2; exit 2 ;;
esac
taskset -c 0 "${cmd[@]}" > "$tmp/server.log" 2>&1 & pp=$!; pids+=($pp)
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$px/healthz" && break; sleep 0.2; done
url="http://127.0.0.1:$px/mp/track/?verbose=1&ip=1"
taskset -c 1 wrk -t1 -c64 -d2s -s "$tmp/post.lua" "$url" >/dev/null  # warm-up
tick=$(getconf CLK_TCK)
if [ -n "${PROFILE:-}" ]; then
  command -v py-spy >/dev/null || python3 -m pip install -q py-spy
  py-spy record --nonblocking --format raw --rate 500 --duration $((runs * 5)) --pid "$pp" -o "$PROFILE" >/dev/null 2>&1 & spy=$!
  sleep 0.5
fi
if [ -n "${STRACE:-}" ]; then
  # STRACE=out.txt: count the server's system calls (all threads) over the runs; the
  # summary ends with them per request. strace slows the server: read its counts, not its CPU.
  command -v strace >/dev/null || { apt-get update -qq && apt-get install -y -qq strace >/dev/null; }
  strace -f -c -o "$STRACE" -p "$pp" 2>/dev/null & tracer=$!
  sleep 0.5
fi
total=0
for r in $(seq "$runs"); do
  read -r c0 k0 f0 < <(awk '{print $14+$15, $15, $10}' "/proc/$pp/stat")
  for t in /proc/$pp/task/*; do echo "$(basename "$t") $(awk '{print $14+$15}' "$t/stat") $(cat "$t/comm")"; done > "$tmp/threads0"
  out=$(taskset -c 1 wrk -t2 -c64 -d5s -s "$tmp/post.lua" "$url")
  sleep 0.3
  read -r c1 k1 f1 < <(awk '{print $14+$15, $15, $10}' "/proc/$pp/stat")
  for t in /proc/$pp/task/*; do echo "$(basename "$t") $(awk '{print $14+$15}' "$t/stat") $(cat "$t/comm")"; done > "$tmp/threads1"
  n=$(echo "$out" | awk '/requests in/{print $1}'); total=$((total + n)); rps=$(echo "$out" | awk '/Requests\/sec/{print $2}')
  # Of the CPU, the kernel's part (stime: sockets, SQLite's writes and fsyncs, page faults),
  # which callgrind's instruction counts do not see; and minor page faults per request.
  python3 -c "print('$kind run $r: %s req/s, %.1f CPU µs/req (kernel %.1f), %.2f page faults/req' % ('$rps', ($c1 - $c0) * 1e6 / $tick / $n, ($k1 - $k0) * 1e6 / $tick / $n, ($f1 - $f0) / $n))"
  # THREADS=1: the same per thread (the event loop, the spool's SQLite thread, ...).
  [ -z "${THREADS:-}" ] || join "$tmp/threads0" "$tmp/threads1" | awk -v n="$n" -v tick="$tick" \
    '{d=$4-$2; if (d>0) printf "  thread %-16s %.1f CPU µs/req\n", $3, d*1e6/tick/n}'
done
[ -z "${spy:-}" ] || wait "$spy" || true
if [ -n "${tracer:-}" ]; then
  kill -INT "$tracer"; wait "$tracer" || true
  awk -v n="$total" '$1 ~ /^[0-9.]+$/ && NF >= 5 {c=$4; name=$NF; if (name != "total") printf "  %-16s %.3f calls/req\n", name, c/n}' "$STRACE" | sort -k2 -nr | head -12
fi
