#!/usr/bin/env bash
# User-space instructions per request under valgrind's callgrind: repeatable
# whatever else the machine does, unlike req/s on these shared VMs.
#   bench/instructions.sh sync|spool|floor-app|floor-server|floor-httptools
# Loads the target with wrk (4 connections, the bench's mixpanel-js-shaped
# POST) behind a fast nginx upstream, counts instructions during 8 s, prints
# instructions per request. Everything on 127.0.0.1; stops what it started.
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:-sync}
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; }
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
http { access_log off; client_body_temp_path $tmp/b;
  server { listen 127.0.0.1:$up; location / { default_type application/json; return 200 '{"status":1,"error":null}'; } } }
NGX
nginx -p "$tmp" -c "$tmp/up.conf" & pids+=($!)
python3 - "$tmp/post.lua" <<'PY'
import base64, json, sys, time, uuid
from urllib.parse import quote
d = str(uuid.uuid4())
props = {"token": "bench-token", "time": time.time(), "distinct_id": "$device:" + d, "$device_id": d,
         "$insert_id": "abcdefgh12345678", "$browser": "Chrome", "$browser_version": 120, "$os": "Linux",
         "$current_url": "https://www.site-a.test/pricing?utm_source=bench", "$host": "www.site-a.test",
         "$pathname": "/pricing", "$referrer": "https://www.google.com/", "$referring_domain": "www.google.com",
         "$initial_referrer": "$direct", "$initial_referring_domain": "$direct", "$screen_height": 1080,
         "$screen_width": 1920, "$lib_version": "2.83.0", "mp_lib": "web", "$mp_api_endpoint": "api-js.mixpanel.com",
         "$mp_api_timestamp_ms": int(time.time() * 1000), "mp_page_view_id": "x1", "mp_sent_by_lib_version": "2.83.0",
         "$search_engine": "google", "$device": "Linux", "$had_persisted_distinct_id": False}
# EVENTS=n: a batch of n events (mixpanel-js batches up to 50), each with its own $insert_id.
n = int(__import__("os").environ.get("EVENTS", "1"))
events = [{"event": "Page View", "properties": {**props, "$insert_id": f"abcdefgh{i:08d}"}} for i in range(n)]
payload = events[0] if n == 1 else events
body = "data=" + quote(base64.b64encode(json.dumps(payload).encode()).decode(), safe="")
open(sys.argv[1], "w").write('wrk.method="POST"\nwrk.body=%s\nwrk.headers["Content-Type"]="application/x-www-form-urlencoded"\n'
                             'wrk.headers["Origin"]="http://www.site-a.test"\nwrk.headers["User-Agent"]="Mozilla/5.0 (bench)"\n' % json.dumps(body))
PY
case "$kind" in
  sync|spool)
    printf '[server]\ndata_dir = "%s/data"\n[upstream]\nus = "http://127.0.0.1:%s"\n[cookie]\nsecure = false\nsecret = "instructions-secret-instructions"\n[delivery]\nmode = "%s"\n' "$tmp" "$up" "$kind" > "$tmp/proxy.toml"
    cmd=("$py" -m proxy serve --config "$tmp/proxy.toml" --port "$px") ;;
  floor-app) cmd=("$py" bench/floor_app.py "$px" app) ;;
  floor-server) cmd=("$py" bench/floor_app.py "$px" server) ;;
  floor-httptools) cmd=("$py" bench/floor_app.py "$px" httptools) ;;
  *) echo "usage: $0 sync|spool|floor-app|floor-server|floor-httptools" >&2; exit 2 ;;
esac
valgrind --tool=callgrind --callgrind-out-file="$tmp/cg.%p" "${cmd[@]}" > "$tmp/target.log" 2>&1 & vg=$!; pids+=($vg)
for _ in $(seq 600); do curl -s -o /dev/null "http://127.0.0.1:$px/healthz" && break; sleep 0.2; done
wrk -t1 -c4 -d4s -s "$tmp/post.lua" "http://127.0.0.1:$px/mp/track/?verbose=1&ip=1" >/dev/null
callgrind_control -z "$vg" >/dev/null
out=$(wrk -t1 -c4 -d8s -s "$tmp/post.lua" "http://127.0.0.1:$px/mp/track/?verbose=1&ip=1")
callgrind_control -d "$vg" >/dev/null
n=$(echo "$out" | awk '/requests in/{print $1}')
total=$(callgrind_annotate "$(ls "$tmp"/cg.*.1)" 2>/dev/null | awk '/PROGRAM TOTALS/{gsub(",","",$1); print $1}')
echo "$kind: $n requests under callgrind, $((total / n)) instructions per request (user space)"
