#!/usr/bin/env python3
"""Side-by-side load benchmark: direct upstream vs nginx pass-through vs our proxy (sync and spool).

Run from the repository root:

    python bench/run.py                 # defaults: --duration 7 --connections 64 --runs 3 (about 2.7 min)
    python bench/run.py --quick         # ~35 s smoke run

Rows (measured interleaved: run1 = A B C D, run2 = A B C D, ...):

  A  direct upstream     the fake Mixpanel upstream (nginx ``return 200``) itself
  B  nginx pass-through  Debian nginx reverse proxy (keepalive pool) -> fake upstream
  C  our proxy, sync     ``python -m proxy serve`` with ``[delivery] mode = "sync"``: one upstream
                         request per client request, the client waits for it
  D  our proxy, spool    the same with ``mode = "spool"``: answered once fsync'd to the SQLite spool,
                         forwarded in batches; after every D run the bench waits (bounded) until
                         the spool has drained and checks every accepted event was forwarded

Then, once per invocation, a slow-upstream scenario: ``bench/slow_upstream.py`` answers after
100 ms; rows B, C and D are put in front of it and loaded with the same ``wrk -c64``.

At the end, a targets section checks the figures against /work/shared/PERFORMANCE.md
(met / not met; a missed target does not change the exit code: only harness errors do).

CPU placement: the measured server runs on CPU 0 (``taskset -c 0``); wrk and the fake
upstreams used by rows B, C and D run on CPU 1.  For row A the upstream *is* the measured
server, so a separate instance pinned to CPU 0 is used.

Everything listens on 127.0.0.1 with ports picked by the kernel; every process started
here is stopped again (by PID) in a ``finally`` block.  Only the standard library is used
(the slow upstream, a separate process, uses aiohttp from the proxy's environment).
Raw results are written to ``bench/out/last.json``, the printed Markdown to ``bench/out/last.md``.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import json
import os
import platform
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
OUT_DIR = BENCH_DIR / "out"

CLK_TCK = os.sysconf("SC_CLK_TCK")
UPSTREAM_BODY = '{"status":1,"error":null}'
COOKIE_SECRET = "bench-secret-bench-secret-bench-secret"
SITE_ORIGIN = "http://www.site-a.test"
USER_AGENT = "Mozilla/5.0 (bench)"

ROW_LABELS = {
    "A": "direct upstream",
    "B": "nginx pass-through",
    "C": "our proxy, sync",
    "D": "our proxy, spool",
    "E": "bare aiohttp (framework floor)",
    "F": "our proxy, spool, 10 events per request",
    "G": "our proxy, spool on NATS JetStream (+ its nats-server's CPU)",
    "H": "durable floor: bare aiohttp + decode + SQLite spool + batched send",
    "I": "durable floor, 10 events per request",
    "J": "forwarding floor: bare aiohttp + decode + one ClientSession forward",
}
PROXY_MODES = {"C": "sync", "D": "spool", "G": "spool"}
# Written into both proxies' TOML so the notes can reason about them (these are the proxy's defaults).
DELIVERY = {"batch_size": 50, "batch_window_ms": 50, "max_in_flight": 32}
ALL_ROWS = "ABCDEFGHIJ"
BATCH_EVENTS = 10  # row F: mixpanel-js batches up to 50 events per request

# Opener that never goes through an http_proxy from the environment.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- tools


def _find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/usr/bin", "/sbin"):
        p = Path(d) / name
        if p.exists() and os.access(p, os.X_OK):
            return str(p)
    return None


def ensure_tools() -> dict[str, str]:
    """Return paths of nginx/wrk/taskset, installing nginx and wrk with apt-get if absent."""
    missing = [t for t in ("nginx", "wrk") if _find_tool(t) is None]
    if missing:
        if shutil.which("apt-get") is None:
            raise SystemExit(f"missing {missing} and apt-get is not available; install them first")
        prefix: list[str] = []
        if os.geteuid() != 0:
            if shutil.which("sudo") is None:
                raise SystemExit(f"missing {missing}; need root (or sudo) to apt-get install them")
            prefix = ["sudo", "-n"]
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        log(f"installing {' '.join(missing)} with apt-get ...")
        subprocess.run(prefix + ["apt-get", "update"], check=True, env=env, timeout=300)
        subprocess.run(prefix + ["apt-get", "install", "-y", "--no-install-recommends", *missing],
                       check=True, env=env, timeout=600)
    tools = {}
    for t in ("nginx", "wrk", "taskset"):
        p = _find_tool(t)
        if p is None:
            raise SystemExit(f"required tool not found: {t}")
        tools[t] = p
    return tools


def tool_version(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except Exception as exc:  # pragma: no cover - informational only
        return f"unknown ({exc})"
    out = (r.stdout + r.stderr).strip().splitlines()
    return out[0].strip() if out else "unknown"


# --------------------------------------------------------------------------- payload


def _rand_str(n: int) -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(random.choice(alphabet) for _ in range(n))


def build_event() -> dict[str, Any]:
    """One mixpanel-js 2.x shaped ``track`` event with 26 properties."""
    dev = str(uuid.uuid4())
    now = time.time()
    props: dict[str, Any] = {
        "$os": "Linux",
        "$browser": "Chrome",
        "$current_url": "https://www.site-a.test/pricing?utm_source=bench",
        "$browser_version": 120,
        "$screen_height": 1080,
        "$screen_width": 1920,
        "mp_lib": "web",
        "$lib_version": "2.83.0",
        "$insert_id": _rand_str(16),
        "time": round(now, 3),
        "distinct_id": f"$device:{dev}",
        "$device_id": dev,
        "$initial_referrer": "$direct",
        "$initial_referring_domain": "$direct",
        "$referrer": "https://www.google.com/search?q=site+a",
        "$referring_domain": "www.google.com",
        "$host": "www.site-a.test",
        "$pathname": "/pricing",
        "utm_source": "bench",
        "current_page_title": "Pricing - Plans for every team | Site A",
        "mp_page_view_id": _rand_str(16),
        "$mp_api_endpoint": "www.site-a.test",
        "$mp_api_timestamp_ms": int(now * 1000),
        "mp_sent_by_lib_version": "2.83.0",
        "$search_engine": "google",
        "token": "bench-token",
    }
    assert len(props) == 26, len(props)
    return {"event": "Page View", "properties": props}


def encode_body(event: dict[str, Any]) -> str:
    """``data=`` + base64(JSON), percent-encoded the way mixpanel-js does (+ / =)."""
    raw = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
    b64 = base64.b64encode(raw).decode("ascii")
    return "data=" + b64.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")


def write_lua(path: Path, body: str) -> None:
    # Only [A-Za-z0-9%=] can appear in the body, so a long-bracket string is safe.
    assert re.fullmatch(r"[A-Za-z0-9%=]+", body)
    lua = f"""-- generated by bench/run.py
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.headers["Origin"] = "{SITE_ORIGIN}"
wrk.headers["User-Agent"] = "{USER_AGENT}"
-- no Cookie header: first-visit traffic

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCHJSON {{\\"requests\\":%d,\\"duration_us\\":%d,\\"bytes\\":%d," ..
    "\\"err_connect\\":%d,\\"err_read\\":%d,\\"err_write\\":%d,\\"err_status\\":%d,\\"err_timeout\\":%d," ..
    "\\"p50_us\\":%d,\\"p90_us\\":%d,\\"p99_us\\":%d,\\"p999_us\\":%d,\\"max_us\\":%d,\\"mean_us\\":%.2f}}\\n",
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
"""
    path.write_text(lua)


# --------------------------------------------------------------------------- processes


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the comm field (index 0 == state)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return data[data.rindex(")") + 2:].split()


def _starttime(pid: int) -> int | None:
    st = _read_stat(pid)
    return int(st[19]) if st else None


def process_tree(root: int) -> list[int]:
    """root and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _read_stat(int(entry))
        if st is None:
            continue
        children.setdefault(int(st[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if _read_stat(pid) is None:
            continue
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_cpu_seconds(root: int) -> tuple[float, float, list[int]]:
    """utime+stime of root and its descendants, plus cutime+cstime of root (reaped children),
    and the kernel's part of it (stime, cstime)."""
    ticks = sys_ticks = 0
    pids = process_tree(root)
    for pid in pids:
        st = _read_stat(pid)
        if st is None:
            continue
        ticks += int(st[11]) + int(st[12])  # utime, stime
        sys_ticks += int(st[12])
        if pid == root:
            ticks += int(st[13]) + int(st[14])  # cutime, cstime
            sys_ticks += int(st[14])
    return ticks / CLK_TCK, sys_ticks / CLK_TCK, pids


def all_proc_ticks() -> dict[int, tuple[str, int, int]]:
    """{pid: (comm, starttime, utime+stime ticks)} for every process (to name interference)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read().decode("ascii", "replace")
        except OSError:
            continue
        comm = data[data.index("(") + 1:data.rindex(")")]
        st = data[data.rindex(")") + 2:].split()
        out[int(entry)] = (comm, int(st[19]), int(st[11]) + int(st[12]))
    return out


def top_other_procs(before: dict, after: dict, exclude: set[int], elapsed: float,
                    min_pct: float = 3.0) -> list[dict[str, Any]]:
    tops = []
    for pid, (comm, start, ticks) in after.items():
        if pid in exclude or pid == os.getpid():
            continue
        prev = before.get(pid)
        base = prev[2] if prev and prev[1] == start else 0
        pct = 100.0 * (ticks - base) / CLK_TCK / elapsed if elapsed > 0 else 0.0
        if pct >= min_pct:
            tops.append({"pid": pid, "comm": comm, "cpu_pct": round(pct, 1)})
    tops = sorted(tops, key=lambda x: -x["cpu_pct"])[:5]
    for t in tops:
        try:
            with open(f"/proc/{t['pid']}/cmdline", "rb") as f:
                t["cmdline"] = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()[:120]
        except OSError:
            t["cmdline"] = ""
    return tops


def core_times() -> dict[str, tuple[int, int]]:
    """{'cpu0': (busy, total), ...} jiffies from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if not re.match(r"cpu\d+ ", line):
                continue
            parts = line.split()
            vals = [int(x) for x in parts[1:9]]  # user nice system idle iowait irq softirq steal
            total = sum(vals)
            idle = vals[3] + vals[4]
            out[parts[0]] = (total - idle, total)
    return out


def core_busy_pct(before: dict, after: dict) -> dict[str, float]:
    res = {}
    for cpu, (b1, t1) in after.items():
        b0, t0 = before.get(cpu, (0, 0))
        res[cpu] = round(100.0 * (b1 - b0) / (t1 - t0), 1) if t1 > t0 else 0.0
    return res


class Managed:
    """A process this script started (root PID); stopped by PID only."""

    def __init__(self, name: str, cmd: list[str], tmpdir: Path, cwd: Path | None = None,
                 env: dict[str, str] | None = None):
        self.name = name
        self.cmd = cmd
        self.out_path = tmpdir / f"{name}.stdout.log"
        self.err_path = tmpdir / f"{name}.stderr.log"
        self._out = open(self.out_path, "wb")
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._out, stderr=self._err, start_new_session=True)
        self.pid = self.proc.pid
        self.known: dict[int, int | None] = {}  # pid -> starttime, for safe cleanup
        self.remember_tree()

    def remember_tree(self) -> list[int]:
        pids = process_tree(self.pid) if self.alive() else []
        for p in pids:
            self.known.setdefault(p, _starttime(p))
        return pids

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_seconds(self) -> float:
        return self.cpu_split()[0]

    def cpu_split(self) -> tuple[float, float]:
        """(CPU seconds, of which in the kernel) of the process tree."""
        secs, sys_secs, pids = tree_cpu_seconds(self.pid)
        for p in pids:
            self.known.setdefault(p, _starttime(p))
        return secs, sys_secs

    def stderr_tail(self, n: int = 4000) -> str:
        try:
            self._err.flush()
            data = self.err_path.read_bytes()[-n:].decode("utf-8", "replace")
            out = self.out_path.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""
        return (data + ("\n[stdout]\n" + out if out.strip() else "")).strip()

    def stop(self, timeout: float = 8.0) -> None:
        if self.alive():
            self.remember_tree()
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=5)
        # Any descendant we saw that outlived the root: kill it (only if it is still the
        # very same process, i.e. its start time did not change).
        deadline = time.monotonic() + 3
        for pid, st in self.known.items():
            if pid == self.pid:
                continue
            while _starttime(pid) == st and st is not None and time.monotonic() < deadline:
                time.sleep(0.05)
            if st is not None and _starttime(pid) == st:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for f in (self._out, self._err):
            try:
                f.close()
            except OSError:
                pass


def http_request(url: str, method: str = "GET", body: bytes | None = None,
                 headers: dict[str, str] | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with _HTTP.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_http_ok(url: str, proc: Managed, timeout: float) -> tuple[bool, str]:
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        if not proc.alive():
            return False, f"process exited with code {proc.proc.returncode}"
        try:
            status, _ = http_request(url, timeout=0.5)
            if status == 200:
                return True, "ok"
            last = f"HTTP {status}"
        except Exception as exc:  # connection refused while starting, etc.
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.1)
    return False, f"not ready after {timeout:.0f}s (last: {last})"


# --------------------------------------------------------------------------- nginx


NGINX_COMMON = """\
worker_processes 1;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}.error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/{name}_client_body;
    proxy_temp_path {tmp}/{name}_proxy;
    fastcgi_temp_path {tmp}/{name}_fastcgi;
    uwsgi_temp_path {tmp}/{name}_uwsgi;
    scgi_temp_path {tmp}/{name}_scgi;
    keepalive_timeout 75s;
    keepalive_requests 100000000;
{body}
}}
"""

UPSTREAM_SERVER = """\
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location = /__bench_status {{
            stub_status;
        }}
        location / {{
            # return discards the request body; answer like Mixpanel /track?verbose=1
            default_type application/json;
            return 200 '{resp}';
        }}
    }}
"""

PASSTHROUGH_SERVER = """\
    upstream fake_mixpanel {{
        server 127.0.0.1:{up_port};
        keepalive {pool};
        keepalive_requests 100000000;
        keepalive_timeout 75s;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        # Same public path as our proxy: /mp/track/... -> upstream /track/...
        location /mp/ {{
            proxy_pass http://fake_mixpanel/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
        location / {{
            proxy_pass http://fake_mixpanel;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""


def start_nginx(name: str, server_block: str, tmpdir: Path, nginx: str, taskset: list[str]) -> Managed:
    conf = tmpdir / f"{name}.conf"
    conf.write_text(NGINX_COMMON.format(tmp=tmpdir, name=name, body=server_block))
    cmd = taskset + [nginx, "-p", str(tmpdir), "-e", str(tmpdir / f"{name}.error.log"),
                     "-c", str(conf), "-g", "daemon off;"]
    return Managed(name, cmd, tmpdir)


# --------------------------------------------------------------------------- wrk

_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _to_us(value: str, unit: str) -> float:
    return float(value) * _UNITS_S[unit] * 1e6


def parse_wrk(text: str) -> dict[str, Any]:
    """Parse wrk's text output (and the BENCHJSON line from our Lua done())."""
    res: dict[str, Any] = {}
    lat_re = r"([\d.]+)\s*(us|ms|s|m|h)\b"
    dist = {}
    for pct, val, unit in re.findall(r"^\s*(50|75|90|99)(?:\.0+)?%\s+" + lat_re, text, re.M):
        dist[pct] = _to_us(val, unit)
    res["p50_us"] = dist.get("50")
    res["p75_us"] = dist.get("75")
    res["p90_us"] = dist.get("90")
    res["p99_us"] = dist.get("99")
    m = re.search(r"^\s*Latency\s+" + lat_re, text, re.M)
    res["mean_us"] = _to_us(m.group(1), m.group(2)) if m else None
    m = re.search(r"^\s*(\d+)\s+requests in\s+([\d.]+)(us|ms|s|m|h)\b", text, re.M)
    if m:
        res["requests"] = int(m.group(1))
        res["elapsed_s"] = _to_us(m.group(2), m.group(3)) / 1e6
    else:
        res["requests"] = None
        res["elapsed_s"] = None
    m = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    res["rps"] = float(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    res["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    res["socket_errors"] = (dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups())))
                            if m else {"connect": 0, "read": 0, "write": 0, "timeout": 0})
    m = re.search(r"^BENCHJSON (\{.*\})\s*$", text, re.M)
    if m:
        try:
            res["lua"] = json.loads(m.group(1))
        except ValueError:
            res["lua"] = None
    # Fall back on the Lua summary for anything the text did not give us.
    lua = res.get("lua") or {}
    if lua:
        if res["requests"] is None:
            res["requests"] = lua.get("requests")
        if res["p50_us"] is None:
            res["p50_us"] = lua.get("p50_us")
        if res["p99_us"] is None:
            res["p99_us"] = lua.get("p99_us")
        if res["rps"] is None and lua.get("duration_us"):
            res["rps"] = lua["requests"] / (lua["duration_us"] / 1e6)
        res["p999_us"] = lua.get("p999_us")
        res["max_us"] = lua.get("max_us")
    res["ok"] = bool(res["requests"]) and res["rps"] is not None and res["p50_us"] is not None
    return res


def run_wrk(wrk: str, taskset: list[str], url: str, lua: Path, threads: int, conns: int,
            seconds: int) -> dict[str, Any]:
    cmd = taskset + [wrk, f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", str(lua), url]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=seconds + 20)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=5)
        err += "\n[bench] wrk killed after timeout"
    except BaseException:  # interrupted: never leave wrk running (or unreaped)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
        raise
    wall = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = parse_wrk(out)
    res["cmd"] = " ".join(shlex.quote(c) for c in cmd)
    res["returncode"] = proc.returncode
    res["stdout"] = out
    res["stderr"] = err.strip()
    res["wall_s"] = round(wall, 3)
    res["wrk_cpu_s"] = round((ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime), 3)
    if proc.returncode != 0:
        res["ok"] = False
    return res


# --------------------------------------------------------------------------- targets


class Upstream:
    """A fake upstream whose counters we read: nginx (stub_status) or bench/slow_upstream.py (/__stats)."""

    def __init__(self, kind: str, port: int, proc: Managed):
        assert kind in ("nginx", "slow")
        self.kind = kind
        self.port = port
        self.proc = proc


class Target:
    def __init__(self, key: str, label: str, url: str, proc: Managed | None,
                 available: bool = True, reason: str = ""):
        self.key = key
        self.label = label
        self.url = url
        self.proc = proc
        self.available = available
        self.reason = reason
        self.upstream: Upstream | None = None  # the fake upstream that serves this row (counters)
        self.upstream_is_server = False  # row A: the upstream is the measured server itself
        self.mode: str | None = None  # proxy rows: "sync" / "spool"
        self.port: int | None = None  # proxy rows: the ops listener's port, for /metrics
        self.smoke: dict[str, Any] = {}
        self.throughput: list[dict[str, Any]] = []
        self.latency1: list[dict[str, Any]] = []
        self.lua: Path | None = None  # row F: its own body (a batch)
        self.body: str | None = None
        self.extra: list[Managed] = []  # row G: its nats-server, whose CPU counts as the row's

    def cpu_seconds(self) -> float:
        return self.cpu_split()[0]

    def cpu_split(self) -> tuple[float, float]:
        """(CPU seconds, of which in the kernel) of the row's processes."""
        assert self.proc is not None
        splits = [self.proc.cpu_split(), *(p.cpu_split() for p in self.extra)]
        return sum(t for t, _ in splits), sum(k for _, k in splits)


def stub_status(port: int | None) -> dict[str, int] | None:
    """nginx stub_status counters of a fake upstream (None if unavailable)."""
    if port is None:
        return None
    try:
        status, body = http_request(f"http://127.0.0.1:{port}/__bench_status", timeout=2)
    except Exception:
        return None
    m = re.search(r"Active connections:\s*(\d+).*?\n\s*(\d+)\s+(\d+)\s+(\d+)", body.decode(), re.S)
    if status != 200 or not m:
        return None
    return dict(zip(("active", "accepts", "handled", "requests"), map(int, m.groups())))


def slow_stats(port: int) -> dict[str, int] | None:
    try:
        status, body = http_request(f"http://127.0.0.1:{port}/__stats", timeout=2)
        return json.loads(body) if status == 200 else None
    except Exception:
        return None


def upstream_counts(up: Upstream | None) -> dict[str, int | None] | None:
    """{'requests', 'conns', 'events'} of a fake upstream; events is None for nginx (it discards bodies)."""
    if up is None:
        return None
    if up.kind == "nginx":
        st = stub_status(up.port)
        return None if st is None else {"requests": st["requests"], "conns": st["accepts"], "events": None}
    st = slow_stats(up.port)
    return None if st is None else {"requests": st["requests"], "conns": st["connections"], "events": st["events"]}


def wait_upstream_idle(up: Upstream | None, timeout: float = 5.0) -> bool:
    """Wait until the slow upstream has no request in flight, so requests left over from the previous
    measurement (wrk stops with `connections` requests outstanding, which the previous server still
    forwards) are answered, and counted, before this measurement's first counter read.  The nginx
    upstream answers at once: nothing to wait for."""
    if up is None or up.kind != "slow":
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = slow_stats(up.port)
        if st is not None and st.get("in_flight", 0) == 0:
            return True
        time.sleep(0.02)
    return False


def upstream_delta(up: Upstream, before: dict | None, after: dict | None) -> dict[str, int | None] | None:
    if not before or not after:
        return None
    # Each stub_status read is itself one request on one new connection: subtract the second read
    # (the first one is in `before`).  /__stats reads are not counted by the slow upstream.
    fix = 1 if up.kind == "nginx" else 0
    return {
        "requests": after["requests"] - before["requests"] - fix,
        "conns": after["conns"] - before["conns"] - fix,
        "events": (after["events"] - before["events"]) if after["events"] is not None else None,
    }


_PROM_RE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_PROM_LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prom(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _PROM_RE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out.append((m.group(1), dict(_PROM_LABEL_RE.findall(m.group(2) or "")), value))
    return out


def proxy_counters(port: int | None) -> dict[str, float] | None:
    """Delivery counters from the proxy's GET /metrics (summed over routes), None if unreachable."""
    if port is None:
        return None
    try:
        status, body = http_request(f"http://127.0.0.1:{port}/metrics", timeout=2)
    except Exception:
        return None
    if status != 200:
        return None
    c = {"accepted": 0.0, "forwarded": 0.0, "dead_letter": 0.0, "expired": 0.0, "retry": 0.0,
         "spool_depth": None}
    for name, labels, value in parse_prom(body.decode("utf-8", "replace")):
        if name == "firstparty_events_accepted_total":
            c["accepted"] += value
        elif name == "firstparty_delivery_outcomes_total" and labels.get("outcome") in c:
            c[labels["outcome"]] += value
        elif name == "firstparty_spool_depth":
            c["spool_depth"] = value
    return c


def _settled(base: dict[str, float], c: dict[str, float]) -> tuple[int, int]:
    """(accepted since base, accepted-since-base not yet settled: forwarded / dead letter / expired)."""
    acc = int(c["accepted"] - base["accepted"])
    done = int(sum(c[k] - base[k] for k in ("forwarded", "dead_letter", "expired")))
    return acc, acc - done


def wait_spool_drain(port: int, base: dict[str, float], timeout: float) -> dict[str, Any]:
    """Poll /metrics until every event accepted since `base` has left the spool (forwarded, dead
    letter or expired) and the accepted count is stable, at most `timeout` seconds.

    The outcome counters move as soon as a batch is acknowledged; the firstparty_spool_depth gauge
    is only refreshed every few seconds by the proxy, so it is recorded but not relied on."""
    t0 = time.monotonic()
    first = proxy_counters(port)
    if first is None:
        return {"drained": False, "error": "GET /metrics failed", "drain_s": 0.0}
    _, backlog_at_stop = _settled(base, first)
    prev, c = None, first
    while True:
        acc, left = _settled(base, c)
        if left <= 0 and prev is not None and prev["accepted"] == c["accepted"]:
            drained = True
            break
        if time.monotonic() - t0 >= timeout:
            drained = False
            break
        time.sleep(0.1 if time.monotonic() - t0 < 2 else 0.25)
        prev, nxt = c, proxy_counters(port)
        if nxt is None:
            return {"drained": False, "error": "GET /metrics failed while draining",
                    "drain_s": round(time.monotonic() - t0, 2), "backlog_at_stop": backlog_at_stop}
        c = nxt
    acc, left = _settled(base, c)
    return {
        "drained": drained,
        "drain_s": round(time.monotonic() - t0, 2),
        "backlog_at_stop": backlog_at_stop,
        "accepted": acc,
        "left_in_spool": left,
        "forwarded": int(c["forwarded"] - base["forwarded"]),
        "dead_letter": int(c["dead_letter"] - base["dead_letter"]),
        "expired": int(c["expired"] - base["expired"]),
        "retry": int(c["retry"] - base["retry"]),
        "spool_depth_gauge": c["spool_depth"],
    }


def measure(target: Target, tools: dict[str, str], pin_load: list[str], lua: Path, threads: int,
            conns: int, seconds: int, drain_timeout: float = 20.0) -> dict[str, Any]:
    assert target.proc is not None
    if not target.proc.alive():
        return {"ok": False, "error": f"server process exited (code {target.proc.proc.returncode})"}
    up = target.upstream
    up_proc = None if (up is None or target.upstream_is_server) else up.proc
    spool = target.mode == "spool"
    idle = wait_upstream_idle(up)
    uc0 = upstream_counts(up)
    pc0 = proxy_counters(target.port) if spool else None
    p0 = all_proc_ticks()
    c0 = core_times()
    s0, k0 = target.cpu_split()
    u0 = up_proc.cpu_seconds() if up_proc else None
    res = run_wrk(tools["wrk"], pin_load, target.url, lua, threads, conns, seconds)
    res["upstream_idle_at_start"] = idle
    # Read the upstream's counters at once: the requests wrk left outstanding when it stopped are
    # still being forwarded and would otherwise be counted against the requests wrk completed.
    # (Spool rows are read after the drain instead.)
    uc1 = None if spool else upstream_counts(up)
    s1, k1 = target.cpu_split()
    u1 = up_proc.cpu_seconds() if up_proc else None
    c1 = core_times()
    p1 = all_proc_ticks()
    n = res.get("requests") or 0
    s_total, k_total = s1 - s0, k1 - k0
    if spool:
        if pc0 is None:
            res["delivery"] = {"drained": False, "error": "GET /metrics failed before the run"}
        else:
            d = wait_spool_drain(target.port, pc0, drain_timeout)
            d["wrk_completed"] = n
            # "Every accepted event reached the upstream": nothing left in the spool, nothing
            # dead-lettered, and at least every request wrk saw answered was forwarded (the proxy may
            # also have accepted a few requests that were in flight when wrk stopped).
            d["all_delivered"] = bool(d.get("drained") and d.get("left_in_spool", 1) == 0
                                      and not d.get("dead_letter") and not d.get("expired")
                                      and d.get("forwarded", 0) >= n)
            res["delivery"] = d
        s_end, k_end = target.cpu_split()  # includes the sender's work after wrk stopped
        s_total, k_total = s_end - s0, k_end - k0
    if spool:
        uc1 = upstream_counts(up)
    ud = upstream_delta(up, uc0, uc1) if up else None
    if ud is not None:
        res["upstream_requests"] = ud["requests"]
        res["upstream_new_conns"] = ud["conns"]
        res["upstream_events"] = ud["events"]
        res["upstream_req_per_client_req"] = round(ud["requests"] / n, 4) if n else None
        # Events: counted by the slow upstream; for spool rows, what the proxy says it forwarded;
        # otherwise one event per request wrk completed.
        events = ud["events"]
        if events is None and spool:
            events = (res.get("delivery") or {}).get("forwarded")
        if events is None and not target.upstream_is_server:
            events = n
        res["events_for_ratio"] = events
        res["upstream_req_per_1000_events"] = (round(1000 * ud["requests"] / events, 2)
                                               if events else None)
    res["server_cpu_s"] = round(s1 - s0, 3)
    res["server_cpu_s_incl_drain"] = round(s_total, 3)
    res["upstream_cpu_s"] = round(u1 - u0, 3) if up_proc else None
    res["core_busy_pct"] = core_busy_pct(c0, c1)
    # CPU µs/req: for spool rows this includes the sender's work after wrk stopped (draining the
    # spool), so it is the whole cost of an event, not only the part on the request path.
    res["server_cpu_us_per_req"] = round(s_total * 1e6 / n, 2) if n else None
    # Of it, in the kernel (stime): sockets, SQLite's writes and fsyncs, the log's writes. What
    # callgrind's instruction counts (bench/inprocess.py --instructions) do not see.
    res["server_sys_us_per_req"] = round(k_total * 1e6 / n, 2) if n else None
    res["server_cpu_us_per_req_load_only"] = round((s1 - s0) * 1e6 / n, 2) if n else None
    el = res.get("elapsed_s") or seconds
    res["server_cpu_pct"] = round(100 * (s1 - s0) / el, 1)
    res["wrk_cpu_pct"] = round(100 * res["wrk_cpu_s"] / el, 1)
    res["upstream_cpu_pct"] = round(100 * (u1 - u0) / el, 1) if up_proc else None
    res["upstream_cpu_us_per_req"] = round((u1 - u0) * 1e6 / n, 2) if (up_proc and n) else None
    # Core time not explained by the processes placed there: kernel softirq work plus anything
    # else running on the machine (other users' tests, ...).  A few % is normal.
    busy = res["core_busy_pct"]
    if "cpu0" in busy and "cpu1" in busy:
        res["other_cpu0_pct"] = round(busy["cpu0"] - res["server_cpu_pct"], 1)
        res["other_cpu1_pct"] = round(busy["cpu1"] - res["wrk_cpu_pct"] - (res["upstream_cpu_pct"] or 0), 1)
    ours = set(target.proc.known) | (set(up_proc.known) if up_proc else set())
    for extra in target.extra:
        ours |= set(extra.known)
    res["other_top_procs"] = top_other_procs(p0, p1, ours, el)
    if not target.proc.alive():
        res["ok"] = False
        res["error"] = f"server process exited during load (code {target.proc.proc.returncode})"
    return res


def smoke_check(target: Target, body: str) -> dict[str, Any]:
    try:
        status, resp = http_request(target.url, method="POST", body=body.encode(), headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "Origin": SITE_ORIGIN,
            "User-Agent": USER_AGENT,
        }, timeout=5)
        return {"status": status, "body": resp[:300].decode("utf-8", "replace")}
    except Exception as exc:
        return {"status": None, "error": f"{type(exc).__name__}: {exc}"}


# --------------------------------------------------------------------------- reporting


def med(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def fmt_lat(us: float | None) -> str:
    if us is None:
        return "n/a"
    if us < 1000:
        return f"{us:.0f} µs"
    if us < 1e6:
        return f"{us / 1000:.2f} ms"
    return f"{us / 1e6:.2f} s"


def fmt_num(v: float | None, spec: str = ",.0f") -> str:
    return "n/a" if v is None else format(v, spec)


def summarize(t: Target) -> dict[str, Any]:
    ok_runs = [r for r in t.throughput if r.get("ok")]
    lat_runs = [r for r in t.latency1 if r.get("ok")]
    s: dict[str, Any] = {
        "available": t.available,
        "reason": t.reason,
        "mode": t.mode,
        "runs": len(t.throughput),
        "ok_runs": len(ok_runs),
        "rps_runs": [r.get("rps") for r in t.throughput],
        "rps": med([r.get("rps") for r in ok_runs]),
        "p50_us": med([r.get("p50_us") for r in ok_runs]),
        "p99_us": med([r.get("p99_us") for r in ok_runs]),
        "cpu_us_per_req": med([r.get("server_cpu_us_per_req") for r in ok_runs]),
        "sys_us_per_req": med([r.get("server_sys_us_per_req") for r in ok_runs]),
        "cpu_us_per_req_load_only": med([r.get("server_cpu_us_per_req_load_only") for r in ok_runs]),
        "server_cpu_pct": med([r.get("server_cpu_pct") for r in ok_runs]),
        "wrk_cpu_pct": med([r.get("wrk_cpu_pct") for r in ok_runs]),
        "upstream_cpu_pct": med([r.get("upstream_cpu_pct") for r in ok_runs]),
        "core0_busy_pct": med([r.get("core_busy_pct", {}).get("cpu0") for r in ok_runs]),
        "core1_busy_pct": med([r.get("core_busy_pct", {}).get("cpu1") for r in ok_runs]),
        "other_cpu0_pct": med([r.get("other_cpu0_pct") for r in ok_runs]),
        "other_cpu1_pct": med([r.get("other_cpu1_pct") for r in ok_runs]),
        "upstream_req_per_client_req": med([r.get("upstream_req_per_client_req") for r in ok_runs]),
        "upstream_req_per_1000_events": med([r.get("upstream_req_per_1000_events") for r in ok_runs]),
        "upstream_new_conns": med([r.get("upstream_new_conns") for r in ok_runs]),
        "upstream_cpu_us_per_req": med([r.get("upstream_cpu_us_per_req") for r in ok_runs]),
        "non2xx": sum(r.get("non2xx") or 0 for r in t.throughput),
        "socket_errors": sum(sum((r.get("socket_errors") or {}).values()) for r in t.throughput),
        "failed_runs": sum(1 for r in t.throughput if not r.get("ok")),
        "lat1_non2xx": sum(r.get("non2xx") or 0 for r in t.latency1),
        "lat1_socket_errors": sum(sum((r.get("socket_errors") or {}).values()) for r in t.latency1),
        "lat1_failed_runs": sum(1 for r in t.latency1 if not r.get("ok")),
        "lat1_p50_us": med([r.get("p50_us") for r in lat_runs]),
        "lat1_p99_us": med([r.get("p99_us") for r in lat_runs]),
        "lat1_rps": med([r.get("rps") for r in lat_runs]),
    }
    s["flagged"] = bool(s["non2xx"] or s["socket_errors"] or s["failed_runs"])
    s["lat1_flagged"] = bool(s["lat1_non2xx"] or s["lat1_socket_errors"] or s["lat1_failed_runs"])
    if t.mode == "spool":
        dels = [r.get("delivery") for r in t.throughput + t.latency1]
        dels = [d for d in dels if d is not None]
        # None when no run measured delivery (the proxy never ran), else False if any run missed it.
        s["all_delivered"] = all(d.get("all_delivered") for d in dels) if dels else None
        s["max_drain_s"] = max((d.get("drain_s") or 0 for d in dels), default=None)
    return s


def _ratio_fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def evaluate_targets(summ: dict[str, dict[str, Any]], slow: dict[str, dict[str, Any]],
                     conns: int) -> list[dict[str, Any]]:
    """The PERFORMANCE.md targets this bench can check, each met / not met / not measured."""
    out: list[dict[str, Any]] = []

    def add(name: str, threshold: str, value: float | None, ok: bool | None, measured: str,
            flagged: bool = False) -> None:
        status = "not measured" if value is None or ok is None else ("met" if ok else "not met")
        if flagged and value is not None:
            measured += " ⚠ (row had errors)"
        out.append({"target": name, "threshold": threshold, "value": value, "measured": measured,
                    "status": status})

    b, c, d = summ.get("B", {}), summ.get("C", {}), summ.get("D", {})
    b_rps = b.get("rps")
    e = summ.get("E", {})
    floor = e.get("cpu_us_per_req")
    for key, limit, s in (("D", 2.0, d), ("C", 3.0, c)):
        cpu = s.get("cpu_us_per_req")
        ratio = cpu / floor if (cpu and floor) else None
        rps = s.get("rps")
        vs_b = f"; req/s {fmt_num(rps)} = {rps / b_rps:.3f} × nginx" if (rps and b_rps) else ""
        add(f"{key} ({ROW_LABELS[key]}) CPU per request ≤ {limit:.1f} × E (bare aiohttp)",
            f"≤ {limit:.1f} × E", ratio, None if ratio is None else ratio <= limit,
            f"{ratio:.2f} × E ({cpu:.1f} vs {floor:.1f} µs){vs_b}" if ratio is not None else "n/a (run row E)",
            bool(s.get("flagged") or e.get("flagged")))
    sd = slow.get("D", {})
    p99 = sd.get("p99_us")
    add("D p99 with the 100 ms upstream ≤ 5 ms", "≤ 5 ms", p99, None if p99 is None else p99 <= 5000,
        f"{fmt_lat(p99)} (p50 {fmt_lat(sd.get('p50_us'))}, {fmt_num(sd.get('rps'))} req/s)" if p99 is not None
        else "n/a", bool(sd.get("flagged")))
    per_k = d.get("upstream_req_per_1000_events")
    slow_k = sd.get("upstream_req_per_1000_events")
    extra = f"; with the 100 ms upstream: {slow_k:.1f}" if slow_k is not None else ""
    add("D upstream requests per 1,000 events ≤ 25 (throughput runs)", "≤ 25", per_k,
        None if per_k is None else per_k <= 25,
        (f"{per_k:.1f}{extra}" if per_k is not None else "n/a"), bool(d.get("flagged")))
    f_cpu, d_cpu = summ.get("F", {}).get("cpu_us_per_req"), d.get("cpu_us_per_req")
    marginal = (f_cpu - d_cpu) / (BATCH_EVENTS - 1) if (f_cpu and d_cpu) else None
    add(f"marginal CPU of one more event in a batch, (F - D) / {BATCH_EVENTS - 1}, ≤ 20 µs", "≤ 20 µs", marginal,
        None if marginal is None else marginal <= 20,
        f"{marginal:.1f} µs ({f_cpu:.1f} µs for {BATCH_EVENTS} events vs {d_cpu:.1f} µs for one)"
        if marginal is not None else "n/a (run rows D and F)", bool(summ.get("F", {}).get("flagged")))
    # (1-connection latency is reported in its own table: with fsync on every
    # acknowledgement it is the disk's, and no target is set for it.)
    return out


def floor_lines(summ: dict[str, dict[str, Any]]) -> list[str]:
    """Table rows: each CPU target's figure for the floor (H, I, J) and for the proxy."""
    cpu = {k: summ.get(k, {}).get("cpu_us_per_req") for k in "CDEFHIJ"}
    e = cpu["E"]
    out: list[str] = []

    def row(label: str, floor: float | None, ours: float | None, unit: str) -> None:
        if floor is None:
            return
        ratio = f"{ours / floor:.2f}" if ours else "n/a"
        ours_s = f"{ours:.2f}{unit}" if ours else "n/a"
        out.append(f"| {label} | {floor:.2f}{unit} | {ours_s} | {ratio} |")

    if e:
        row("spool mode, CPU per request ÷ E (target for D: ≤ 2.0)", cpu["H"] / e if cpu["H"] else None,
            cpu["D"] / e if cpu["D"] else None, " × E")
        row("sync mode, CPU per request ÷ E (target for C: ≤ 3.0)", cpu["J"] / e if cpu["J"] else None,
            cpu["C"] / e if cpu["C"] else None, " × E")
    n = BATCH_EVENTS - 1
    floor_marginal = (cpu["I"] - cpu["H"]) / n if (cpu["I"] and cpu["H"]) else None
    ours_marginal = (cpu["F"] - cpu["D"]) / n if (cpu["F"] and cpu["D"]) else None
    row(f"marginal CPU of one more event, µs (I - H) / {n} and (F - D) / {n} (target: ≤ 20)", floor_marginal,
        ours_marginal, " µs")
    # The kernel's part (stime) of the same figures: what instruction counts under callgrind miss.
    ker = {k: summ.get(k, {}).get("sys_us_per_req") for k in "DFHI"}
    row("of a 1-event request's CPU, in the kernel, µs (H and D)", ker["H"], ker["D"], " µs")
    if all(ker.values()):
        row(f"of the marginal event, in the kernel, µs (I - H) / {n} and (F - D) / {n}",
            (ker["I"] - ker["H"]) / n, (ker["F"] - ker["D"]) / n, " µs")
    return out


def _delivery_cells(label: str, r: dict[str, Any]) -> str:
    d = r.get("delivery") or {}
    if not d:
        return f"| {label} | {fmt_num(r.get('requests'))} | n/a | | | | | | | no measurement |"
    if d.get("error") and "accepted" not in d:
        return f"| {label} | {fmt_num(r.get('requests'))} | n/a | | | | | | | {d['error']} |"
    drained = f"{d['drain_s']:.1f} s" if d.get("drained") else f"not drained after {d.get('drain_s', 0):.0f} s"
    lost = []
    if d.get("left_in_spool"):
        lost.append(f"{d['left_in_spool']:,} still spooled")
    if d.get("dead_letter"):
        lost.append(f"{d['dead_letter']:,} dead letters")
    if d.get("expired"):
        lost.append(f"{d['expired']:,} expired")
    if d.get("retry"):
        lost.append(f"{d['retry']:,} retried")
    verdict = "yes" if d.get("all_delivered") else "**no**"
    if lost:
        verdict += " (" + ", ".join(lost) + ")"
    return (f"| {label} | {fmt_num(r.get('requests'))} | {fmt_num(d.get('accepted'))} | {fmt_num(d.get('forwarded'))} "
            f"| {fmt_num(d.get('backlog_at_stop'))} | {drained} | {fmt_num(r.get('upstream_requests'))} "
            f"| {_ratio_fmt(r.get('upstream_req_per_1000_events'), '.1f')} "
            f"| {fmt_num(r.get('upstream_events'))} | {verdict} |")


def render(meta: dict[str, Any], targets: list[Target], summ: dict[str, dict[str, Any]],
           slow_targets: list[Target], slow_summ: dict[str, dict[str, Any]], slow_info: dict[str, Any],
           goals: list[dict[str, Any]], cfg: dict[str, Any], notes: list[str]) -> str:
    L: list[str] = []
    L.append(f"## firstparty-proxy load benchmark ({meta['date']})")
    L.append("")
    L.append(f"Machine: nproc={meta['nproc']}, CPU \"{meta['cpu_model']}\", Python {meta['python']}, "
             f"{meta['nginx']}, {meta['wrk']}, kernel {meta['kernel']}, proxy commit {meta['git']}")
    L.append(f"Command: `{meta['command']}` (wall time {cfg.get('elapsed_s', 0):.0f} s)")
    L.append("")
    L.append("Rows: **A** the fake upstream itself (nginx `return 200`); **B** nginx pass-through "
             "(keepalive pool); **C** our proxy, `[delivery] mode = \"sync\"` (the client waits for the "
             "upstream, one upstream request per client request); **D** our proxy, `mode = \"spool\"` "
             "(answered once fsync'd to the SQLite spool, forwarded in batches of up to 50); **E** a bare "
             "aiohttp `web.Application` (uvloop, access log off) reading the same POST and answering `1`: "
             "the framework's floor; **F** row D's proxy loaded with the same event 10 times in one "
             "batch (CPU µs/req is per 10-event request); **G** row D on NATS JetStream; **H** the durable "
             "floor (`bench/floor_spool.py --row-per-request`: row E plus the decode, the SQLite spool with "
             "the proxy's pragmas, a request's events in one row as the proxy keeps them, and batched "
             "sending, nothing else); **I** row H with row F's batch; **J** the "
             "forwarding floor (row E plus the decode and one `ClientSession` forward per request).")
    L.append("")
    floor = summ.get("E", {}).get("cpu_us_per_req")
    if floor:
        parts = [f"{k}/E = {summ[k]['cpu_us_per_req'] / floor:.2f}" for k in "CDHJ"
                 if summ.get(k, {}).get("cpu_us_per_req")]
        L.append(f"CPU per request against the framework floor (targets: D/E <= 2.0, C/E <= 3.0): {', '.join(parts)}.")
        L.append("")
    order = "".join(t.key for t in targets)
    L.append(f"### Throughput at {cfg['connections']} connections")
    L.append("")
    L.append(f"`wrk -t{cfg['threads']} -c{cfg['connections']} -d{cfg['duration']}s --latency`, "
             f"{cfg['runs']} interleaved run(s) ({' '.join(order)}, {' '.join(order)}, ...), medians shown. "
             "Measured server pinned to CPU 0; wrk + fake upstream pinned to CPU 1.")
    L.append("")
    L.append("| Row | Target | req/s | p50 | p99 | CPU µs/req | vs nginx | upstream req per client req "
             "| upstream req per 1,000 events | non-2xx / sock err | req/s per run |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    anchor = summ.get("B", {}).get("rps")
    for t in targets:
        s = summ[t.key]
        name = f"{t.label} ⚠" if s["flagged"] else t.label
        if not t.available:
            L.append(f"| {t.key} | {t.label} | unavailable | | | | | | | | "
                     f"{t.reason.splitlines()[0][:90] if t.reason else ''} |")
            continue
        ratio = f"{s['rps'] / anchor:.2f}" if (anchor and s["rps"]) else "n/a"
        runs = " / ".join(fmt_num(v) for v in s["rps_runs"])
        per_k = "—" if t.key == "A" else _ratio_fmt(s["upstream_req_per_1000_events"], ",.1f")
        L.append(f"| {t.key} | {name} | {fmt_num(s['rps'])} | {fmt_lat(s['p50_us'])} | {fmt_lat(s['p99_us'])} "
                 f"| {fmt_num(s['cpu_us_per_req'], '.1f')} | {ratio} "
                 f"| {_ratio_fmt(s['upstream_req_per_client_req'], '.3f')} | {per_k} "
                 f"| {s['non2xx']} / {s['socket_errors']} | {runs} |")
    L.append("")

    spool_rows = [t for t in targets + slow_targets if t.mode == "spool" and t.available]
    if spool_rows:
        L.append("### Spool delivery (row D)")
        L.append("")
        L.append("After each D run the bench polls the proxy's `/metrics` until every event accepted during "
                 f"the run has left the spool (at most {cfg['drain_timeout']:.0f} s), then reads the fake "
                 "upstream's counters. *accepted* / *forwarded*: `firstparty_events_accepted_total` / "
                 "`firstparty_delivery_outcomes_total{outcome=\"forwarded\"}` deltas; *backlog*: accepted but "
                 "not yet forwarded when wrk stopped. Every event delivered = nothing left in the spool, no "
                 "dead letters, and forwarded ≥ requests wrk completed (each request is one event; the proxy "
                 "can also accept a few requests wrk gave up on when it stopped).")
        L.append("")
        L.append("| D run | wrk completed | accepted | forwarded | backlog when wrk stopped | drained after "
                 "| upstream requests | upstream req per 1,000 events | events counted by upstream "
                 "| every event delivered |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for t in spool_rows:
            slow = t in slow_targets
            for r in t.throughput:
                lab = (f"{slow_info.get('delay_ms', 100):g} ms upstream, {cfg['slow_connections']} conns" if slow
                       else f"run {r.get('run')}, {cfg['connections']} conns")
                L.append(_delivery_cells(lab, r))
            for r in t.latency1:
                L.append(_delivery_cells(f"run {r.get('run')}, 1 conn", r))
        L.append("")

    L.append(f"### Latency at 1 connection")
    L.append("")
    L.append(f"`wrk -t1 -c1 -d{cfg['lat_duration']}s --latency`, one per run, median over runs.")
    L.append("")
    L.append("| Row | Target | p50 | p99 | added p50 vs direct | req/s (1 conn) | non-2xx / sock err |")
    L.append("|---|---|---:|---:|---:|---:|---:|")
    direct = summ.get("A", {}).get("lat1_p50_us")
    for t in targets:
        s = summ[t.key]
        if not t.available:
            L.append(f"| {t.key} | {t.label} | unavailable | | | | |")
            continue
        if t.key == "A":
            added = "(baseline)"
        elif direct is not None and s["lat1_p50_us"] is not None:
            added = f"+{fmt_lat(s['lat1_p50_us'] - direct)}" if s["lat1_p50_us"] >= direct \
                else f"-{fmt_lat(direct - s['lat1_p50_us'])}"
        else:
            added = "n/a"
        name = f"{t.label} ⚠" if s["lat1_flagged"] else t.label
        L.append(f"| {t.key} | {name} | {fmt_lat(s['lat1_p50_us'])} | {fmt_lat(s['lat1_p99_us'])} "
                 f"| {added} | {fmt_num(s['lat1_rps'])} | {s['lat1_non2xx']} / {s['lat1_socket_errors']} |")
    L.append("")

    delay = slow_info.get("delay_ms", 100)
    L.append(f"### Slow upstream ({delay:g} ms)")
    L.append("")
    if not slow_info.get("ran"):
        L.append(f"Not run: {slow_info.get('reason', 'skipped')}.")
    else:
        L.append(f"`bench/slow_upstream.py` (aiohttp + uvloop, CPU 1) answers `{UPSTREAM_BODY}` after "
                 f"{delay:g} ms and counts the requests and events it receives. Rows B, C, D in front of it, "
                 f"`wrk -t{cfg['threads']} -c{cfg['slow_connections']} -d{cfg['slow_duration']}s --latency`, "
                 f"measured once per invocation after the interleaved runs "
                 f"({'one warm-up second each, not recorded' if cfg['slow_warmup_s'] else 'no warm-up'}); "
                 "D is waited on until its spool has drained.")
        L.append("")
        L.append("| Row | Target | req/s | p50 | p99 | CPU µs/req | upstream req per 1,000 client req "
                 "| events at upstream per client req | non-2xx / sock err |")
        L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for t in slow_targets:
            s = slow_summ[t.key]
            if not t.available:
                L.append(f"| {t.key} | {t.label} | unavailable | | | | | | |")
                continue
            r = t.throughput[0] if t.throughput else {}
            n = r.get("requests") or 0
            per_k = 1000 * r["upstream_requests"] / n if (n and r.get("upstream_requests") is not None) else None
            ev = r.get("upstream_events") / n if (n and r.get("upstream_events") is not None) else None
            name = f"{t.label} ⚠" if s["flagged"] else t.label
            L.append(f"| {t.key} | {name} | {fmt_num(s['rps'])} | {fmt_lat(s['p50_us'])} | {fmt_lat(s['p99_us'])} "
                     f"| {fmt_num(s['cpu_us_per_req'], '.1f')} | {_ratio_fmt(per_k, ',.1f')} "
                     f"| {_ratio_fmt(ev, '.3f')} | {s['non2xx']} / {s['socket_errors']} |")
    L.append("")

    L.append("### Targets (/work/shared/PERFORMANCE.md)")
    L.append("")
    L.append("| Target | Threshold | Measured | Result |")
    L.append("|---|---|---|---|")
    for g in goals:
        res = {"met": "✅ met", "not met": "❌ not met"}.get(g["status"], g["status"])
        L.append(f"| {g['target']} | {g['threshold']} | {g['measured']} | {res} |")
    L.append("")
    L.append("Not checked here: RSS with 5,000 idle keep-alive connections. A missed target does not "
             "change the exit code.")
    L.append("")
    floors = floor_lines(summ)
    if floors:
        L.append("### Against the stack's floors (rows H, I, J)")
        L.append("")
        L.append("What a proxy on aiohttp and SQLite pays before any work of its own (bench/floor_spool.py): "
                 "the same POST decoded, then spooled durably and sent in batches (H, I), or forwarded (J). "
                 "A target below its floor cannot be met by any pipeline on this stack.")
        L.append("")
        L.append("| | floor | our proxy | ours ÷ floor |")
        L.append("|---|---:|---:|---:|")
        L.extend(floors)
        L.append("")

    L.append("### Where the CPU went")
    L.append("")
    L.append("Median %, 100 % = one core, over the wrk window (drain time after a D run is not in these).")
    L.append("")
    L.append("| Row | measured server (CPU 0) | fake upstream (CPU 1) | wrk (CPU 1) | core 0 busy | core 1 busy "
             "| unattributed core 0 / core 1 | new upstream conns per run |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = [(t, summ[t.key], t.key) for t in targets] + \
           [(t, slow_summ[t.key], f"{t.key} ({delay:g} ms upstream)") for t in slow_targets]
    for t, s, lab in rows:
        if not t.available:
            continue
        up = "(is the server)" if t.upstream_is_server else fmt_num(s["upstream_cpu_pct"], ".0f")
        L.append(f"| {lab} | {fmt_num(s['server_cpu_pct'], '.0f')} | {up} | {fmt_num(s['wrk_cpu_pct'], '.0f')} "
                 f"| {fmt_num(s['core0_busy_pct'], '.0f')} | {fmt_num(s['core1_busy_pct'], '.0f')} "
                 f"| {fmt_num(s['other_cpu0_pct'], '.0f')} / {fmt_num(s['other_cpu1_pct'], '.0f')} "
                 f"| {fmt_num(s['upstream_new_conns'], '.0f')} |")
    L.append("")
    L.append("Notes:")
    for n in notes:
        L.append(f"- {n}")
    return "\n".join(L)


def machine_meta(argv: list[str], tools: dict[str, str]) -> dict[str, Any]:
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    git = "unknown"
    try:
        r = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                           capture_output=True, text=True, timeout=5)
        if r.returncode == 0:
            git = r.stdout.strip()
            d = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "proxy"],
                               capture_output=True, text=True, timeout=5)
            if d.stdout.strip():
                git += "+dirty"
        else:
            git = "no commits"
    except Exception:
        pass
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "nginx": tool_version([tools["nginx"], "-v"]).replace("nginx version: ", ""),
        "wrk": tool_version([tools["wrk"], "--version"]).split(" [")[0].split(" Copyright")[0],
        "git": git,
        "command": " ".join(shlex.quote(a) for a in ["python", "bench/run.py", *argv]),
    }


# --------------------------------------------------------------------------- main


def fs_type(path: Path) -> str:
    """Filesystem type holding `path` (from /proc/mounts), for the fsync note."""
    best, kind = "", "unknown"
    try:
        p = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3:
                mnt = parts[1].replace("\\040", " ")
                if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, kind = mnt, f"{parts[2]} ({parts[0]} on {mnt})"
    except OSError:
        pass
    return kind


def write_proxy_conf(conf: Path, port: int, ops_port: int, data_dir: Path, up_port: int, mode: str,
                     extra: str = "") -> None:
    conf.write_text(
        "[server]\n"
        'host = "127.0.0.1"\n'
        f"port = {port}\n"
        f'data_dir = "{data_dir}"\n'
        "[ops]\n"
        f"port = {ops_port}\n"
        "[upstream]\n"
        f'us = "http://127.0.0.1:{up_port}"\n'
        'default_region = "us"\n'
        "[cookie]\n"
        "secure = false\n"
        f'secret = "{COOKIE_SECRET}"\n'
        "[log]\n"
        f'forwarded = "{data_dir / "forwarded.jsonl"}"\n'
        "[delivery]\n"
        f'mode = "{mode}"\n'
        + "".join(f"{k} = {v}\n" for k, v in DELIVERY.items())
        + extra
    )


def proxy_command(args: argparse.Namespace, conf: Path) -> list[str]:
    if args.proxy_cmd:
        pcmd = [c.replace("{config}", str(conf)) for c in shlex.split(args.proxy_cmd)]
        if pcmd and pcmd[0] in ("python", "python3"):
            pcmd[0] = sys.executable
        return pcmd
    return [sys.executable, "-m", "proxy", "serve", "--config", str(conf)]


def start_nats(tmpdir: Path, pin_server: list[str], procs: list[Managed]) -> tuple[Managed | None, int, str]:
    """Row G's own nats-server (JetStream, file storage in tmpdir), on the measured core."""
    binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
    if not Path(binary).exists():
        return None, 0, "nats-server is not installed (apt-get install nats-server)"
    port = free_ports(1)[0]
    nats = Managed("nats", pin_server + [binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(tmpdir / "nats")],
                   tmpdir)
    procs.append(nats)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return nats, port, ""
        time.sleep(0.05)
    return None, 0, "nats-server did not start"


def start_proxy(key: str, name: str, port: int, up: Upstream, query: str, tmpdir: Path,
                pin_server: list[str], args: argparse.Namespace, procs: list[Managed]) -> Target:
    mode = PROXY_MODES[key]
    data_dir = tmpdir / f"{name}_data"
    data_dir.mkdir()
    conf = tmpdir / f"{name}.toml"
    ops_port = free_ports(1)[0]
    nats = None
    extra = ""
    if key == "G":
        nats, nats_port, why = start_nats(tmpdir, pin_server, procs)
        if nats is None:
            return Target(key, ROW_LABELS[key], "", None, False, why)
        extra = f'queue = "jetstream"\nnats_url = "nats://127.0.0.1:{nats_port}"\n'
    write_proxy_conf(conf, port, ops_port, data_dir, up.port, mode, extra)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    px = Managed(name, pin_server + proxy_command(args, conf), tmpdir, cwd=REPO_ROOT, env=env)
    procs.append(px)
    ok, why = wait_http_ok(f"http://127.0.0.1:{port}/healthz", px, 15)
    t = Target(key, ROW_LABELS[key], f"http://127.0.0.1:{port}/mp/track/{query}", px, ok, why)
    t.mode, t.port, t.upstream = mode, ops_port, up
    if nats is not None:
        t.extra = [nats]
    if not ok:
        tail = px.stderr_tail()
        t.reason = f"proxy ({mode}) did not become ready: {why}"
        print(f"\n[bench] row {key} ({name}) unavailable: {t.reason}\n[bench] proxy command: "
              f"{' '.join(shlex.quote(c) for c in px.cmd)}\n[bench] proxy stderr (tail):\n"
              f"{tail or '(empty)'}\n", file=sys.stderr, flush=True)
        px.stop()
    return t


def add_notes(notes: list[str], targets: list[Target], summ: dict[str, dict[str, Any]],
              slow_targets: list[Target], slow_summ: dict[str, dict[str, Any]],
              args: argparse.Namespace) -> None:
    """Append the data-dependent notes (errors, saturation, interference, spool drain)."""
    labelled = [(t, summ[t.key], t.key) for t in targets] + \
               [(t, slow_summ[t.key], f"{t.key} (slow upstream)") for t in slow_targets]
    for t, s, k in labelled:
        if s["flagged"] or s["lat1_flagged"]:
            notes.append(f"⚠ Row {k}: {s['non2xx'] + s['lat1_non2xx']} non-2xx responses, "
                         f"{s['socket_errors'] + s['lat1_socket_errors']} socket errors, "
                         f"{s['failed_runs'] + s['lat1_failed_runs']} failed wrk runs; its figures are "
                         "not comparable (see bench/out/last.json).")
    for t, s, k in labelled:
        busy0, busy1, srv = s["core0_busy_pct"], s["core1_busy_pct"], s["server_cpu_pct"]
        load = (s["wrk_cpu_pct"] or 0) + (s["upstream_cpu_pct"] or 0)
        if busy0 is None or busy1 is None or srv is None:
            continue
        if t in slow_targets and t.mode != "spool":
            continue  # bounded by connections / upstream delay, see the note on the slow scenario
        if srv >= 90:
            if busy1 >= 95 and load >= 80:
                notes.append(f"Row {k}: both cores saturated (server {srv:.0f} % of CPU 0; wrk + fake upstream "
                             f"{load:.0f} % of CPU 1); the server is the limit, with little headroom on the "
                             "load side.")
        elif busy1 >= 95 and load >= 60:
            notes.append(f"Row {k} is load-side bound: CPU 1 was {busy1:.0f} % busy (wrk + fake upstream "
                         f"{load:.0f} %) while the measured server used only {srv:.0f} % of CPU 0; "
                         "its req/s is a lower bound.")
        elif busy0 >= 95 or busy1 >= 95:
            notes.append(f"Row {k}: the bench itself saturated neither core (server {srv:.0f} % of CPU 0, wrk + "
                         f"fake upstream {load:.0f} % of CPU 1) yet the cores were {busy0:.0f} % / {busy1:.0f} % "
                         "busy: other processes took the rest, so its req/s is depressed by interference "
                         "(compare CPU µs/req instead).")
    for t, s, k in labelled:
        ratio = s["upstream_req_per_client_req"]
        if t.key in "BC" and ratio is not None and abs(ratio - 1) > 0.01:
            notes.append(f"Row {k}: the fake upstream saw {ratio:.3f} requests per request wrk completed "
                         "(expected 1.000 for one forward per event; wrk does not count the few "
                         "requests in flight when it stops).")
    notes.append("New upstream conns: whether the upstream keep-alive pool is reused. Up to one per wrk "
                 "connection per run can come from wrk dropping in-flight requests when it stops; "
                 "steady-state churn shows up as thousands (row A: these are wrk's own connections). "
                 "The slow upstream counts distinct client address:port pairs.")
    # Spool delivery.
    for t in targets + slow_targets:
        if t.mode != "spool":
            continue
        where = "with the slow upstream" if t in slow_targets else "with the fast upstream"
        for r in t.throughput + t.latency1:
            d = r.get("delivery")
            if d is None:
                continue
            if not d.get("drained"):
                notes.append(f"⚠ Row D {where}, run {r.get('run')}: the spool had not drained after "
                             f"{args.drain_timeout:.0f} s ({d.get('left_in_spool', '?')} events left, "
                             f"{d.get('error', '')}); the next measurement may have been disturbed.")
            elif not d.get("all_delivered"):
                notes.append(f"⚠ Row D {where}, run {r.get('run')}: not every event was delivered "
                             f"(forwarded {d.get('forwarded')}, wrk completed {d.get('wrk_completed')}, "
                             f"dead letters {d.get('dead_letter')}, expired {d.get('expired')}).")
        sd = (slow_summ if t in slow_targets else summ).get("D", {})
        if sd.get("all_delivered"):
            notes.append(f"Row D {where}: every accepted event was forwarded in every run "
                         f"(longest drain {sd.get('max_drain_s') or 0:.1f} s).")
    if any(t.key in "BC" for t in slow_targets):
        delay_s = args.slow_delay_ms / 1000
        cap = f"{args.slow_connections / delay_s:,.0f}" if delay_s > 0 else "unbounded"
        notes.append(f"Slow upstream, rows B and C: every request waits for the upstream, so req/s ≤ "
                     f"connections ÷ delay = {args.slow_connections} ÷ {args.slow_delay_ms:g} ms = {cap} req/s, "
                     "and p50 ≥ the delay.")
    sd = slow_summ.get("D", {})
    slow_d = [t for t in slow_targets if t.mode == "spool" and t.throughput]
    if slow_d and args.slow_delay_ms > 0:
        r = slow_d[0].throughput[0]
        d = r.get("delivery") or {}
        ceiling = DELIVERY["max_in_flight"] * DELIVERY["batch_size"] / (args.slow_delay_ms / 1000)
        if d.get("backlog_at_stop") is not None and r.get("rps"):
            notes.append(f"Row D with the slow upstream: the sender forwards at most max_in_flight × batch_size ÷ "
                         f"delay = {DELIVERY['max_in_flight']} × {DELIVERY['batch_size']} ÷ "
                         f"{args.slow_delay_ms:g} ms = {ceiling:,.0f} events/s; D accepted {fmt_num(r['rps'])} "
                         f"req/s and had {fmt_num(d['backlog_at_stop'])} events spooled when wrk stopped "
                         f"(drained {d.get('drain_s', 0):.1f} s later). Above that rate the spool grows "
                         "for as long as the load lasts.")
    if sd.get("rps") and sd.get("p99_us"):
        need = args.slow_connections / 0.005
        notes.append(f"Little's law: wrk keeps {args.slow_connections} requests outstanding (closed loop, no think "
                     f"time), so mean latency = {args.slow_connections} ÷ req/s. A p99 ≤ 5 ms at "
                     f"{args.slow_connections} connections therefore needs more than {need:,.0f} req/s from one "
                     f"process; row D with the slow upstream did {fmt_num(sd['rps'])} req/s "
                     f"({args.slow_connections} ÷ that = {fmt_lat(args.slow_connections / sd['rps'] * 1e6)} mean). "
                     "Its latency is the proxy's own queueing, not the upstream's delay.")
    a = summ.get("A", {})
    if a.get("p99_us") and a["p99_us"] > 10_000:
        notes.append(f"Row A (nginx `return 200` on its own) had a p99 of {fmt_lat(a['p99_us'])} at "
                     f"{args.connections} connections: in this invocation the tails of every row are set by CPU "
                     "contention with other processes (a pinned server waiting for its core), so p99 figures "
                     "are an upper bound on what the servers themselves add.")
    # Interference.
    others: dict[str, float] = {}
    for t, s, k in labelled:
        hits = []
        for r in t.throughput:
            o0, o1 = r.get("other_cpu0_pct"), r.get("other_cpu1_pct")
            if o0 is None or o1 is None:
                continue
            srv, busy1 = r.get("server_cpu_pct") or 0, (r.get("core_busy_pct") or {}).get("cpu1", 0)
            # Core 0 interference always hurts; core 1 interference only when the load side was tight.
            if o0 > 15 or (o1 > 15 and busy1 >= 90 and srv < 95):
                hits.append(f"run {r['run']} ({o0:.0f} % / {o1:.0f} %, {fmt_num(r.get('rps'))} req/s)")
                for pr in r.get("other_top_procs", []):
                    key = (pr.get("cmdline") or pr["comm"])[:60]
                    others[key] = max(others.get(key, 0), pr["cpu_pct"])
        if hits:
            notes.append(f"Interference, row {k}: other processes took core 0 / core 1 time in "
                         + "; ".join(hits) + " — those runs' req/s are depressed (CPU µs/req much less so).")
    if others:
        top = sorted(others.items(), key=lambda kv: -kv[1])[:3]
        notes.append("Busiest foreign processes seen: " + ", ".join(f"`{k}` (up to {v:.0f} %)" for k, v in top)
                     + ".")
    notes.append("Unattributed core time = core busy % minus the bench processes on that core: kernel "
                 "softirq (a few %) plus anything else running on the host, which the bench does not "
                 "stop. Look at the per-run spread and prefer CPU µs/req when runs disagree.")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=None, help="seconds per throughput run (default 7; quick 3)")
    p.add_argument("--connections", type=int, default=64, help="wrk connections for throughput (default 64)")
    p.add_argument("--runs", type=int, default=None, help="interleaved runs (default 3; quick 1)")
    p.add_argument("--lat-duration", type=int, default=None,
                   help="seconds per 1-connection latency run (default 3; quick 1)")
    p.add_argument("--quick", action="store_true", help="~35 s smoke run (duration 3, 1 run)")
    p.add_argument("--rows", default=ALL_ROWS, help="subset of rows to run, e.g. AB (default ABCD)")
    p.add_argument("--no-slow", dest="slow", action="store_false",
                   help="skip the slow-upstream scenario")
    p.add_argument("--slow-duration", type=int, default=None,
                   help="seconds for each slow-upstream run (default: --duration)")
    p.add_argument("--slow-delay-ms", type=float, default=100.0, help="slow upstream delay (default 100)")
    p.add_argument("--slow-connections", type=int, default=8,
                   help="wrk connections in the slow-upstream scenario (default 8: a load the proxy is not "
                        "saturated by, so latency shows the upstream's effect rather than queueing)")
    p.add_argument("--drain-timeout", type=float, default=20.0,
                   help="seconds to wait for the spool to drain after each D run (default 20)")
    p.add_argument("--proxy-cmd", default=None,
                   help="advanced: command for rows C and D instead of 'python -m proxy serve --config {config}'; "
                        "'{config}' is replaced with the generated TOML path (which sets the delivery mode)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs) for inspection")
    a = p.parse_args(argv)
    if a.duration is None:
        a.duration = 3 if a.quick else 7
    if a.runs is None:
        a.runs = 1 if a.quick else 3
    if a.lat_duration is None:
        a.lat_duration = 1 if a.quick else 3
    if a.slow_duration is None:
        a.slow_duration = a.duration
    if min(a.duration, a.runs, a.connections, a.lat_duration, a.slow_duration) < 1:
        p.error("--duration, --runs, --connections, --lat-duration and --slow-duration must be >= 1")
    if a.drain_timeout < 0 or a.slow_delay_ms < 0:
        p.error("--drain-timeout and --slow-delay-ms must be >= 0")
    a.rows = "".join(r for r in ALL_ROWS if r in a.rows.upper())
    if not a.rows:
        p.error(f"--rows must name at least one of {ALL_ROWS}")
    return a


def _log_run(what: str, r: dict[str, Any]) -> None:
    msg = (f"{what}: {fmt_num(r.get('rps'))} req/s, p50 {fmt_lat(r.get('p50_us'))}, "
           f"p99 {fmt_lat(r.get('p99_us'))}, {fmt_num(r.get('server_cpu_us_per_req'), '.1f')} µs/req, "
           f"non2xx {r.get('non2xx')}, upstream req/client req {r.get('upstream_req_per_client_req')}")
    d = r.get("delivery")
    if d:
        msg += (f"; spool: backlog {d.get('backlog_at_stop')}, drained={d.get('drained')} in {d.get('drain_s')} s, "
                f"forwarded {d.get('forwarded')} of accepted {d.get('accepted')}, "
                f"{r.get('upstream_req_per_1000_events')} upstream req/1000 events")
    if not r.get("ok"):
        msg += f"  FAILED {r.get('error', '')} {r.get('stderr', '')[:200]}"
    log(msg)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    tools = ensure_tools()
    meta = machine_meta(argv, tools)

    ncpu = os.cpu_count() or 1
    if ncpu >= 2:
        pin_server = [tools["taskset"], "-c", "0"]
        pin_load = [tools["taskset"], "-c", "1"]
    else:
        pin_server = pin_load = []
        log("WARNING: fewer than 2 CPUs; running unpinned, results are not comparable")

    warmup = 1
    slow_warmup = 0 if args.quick else 1
    cfg = {"duration": args.duration, "connections": args.connections, "runs": args.runs,
           "threads": 2, "lat_duration": args.lat_duration, "warmup_s": warmup, "rows": args.rows,
           "slow": args.slow, "slow_warmup_s": slow_warmup, "slow_duration": args.slow_duration,
           "slow_delay_ms": args.slow_delay_ms, "slow_connections": args.slow_connections,
           "drain_timeout": args.drain_timeout, "pinned": bool(pin_server)}

    event = build_event()
    body = encode_body(event)
    batch = [{**event, "properties": {**event["properties"], "$insert_id": f"batch{i:011d}"}} for i in range(BATCH_EVENTS)]
    body_batch = encode_body(batch)  # type: ignore[arg-type]
    # Row G: the same event without $insert_id, so the proxy gives each its own. With the
    # fixed body's one $insert_id JetStream would store the first copy only (Nats-Msg-Id:
    # a resend is one event), where an SDK sends a new id with every event.
    body_noid = encode_body({**event, "properties": {k: v for k, v in event["properties"].items() if k != "$insert_id"}})
    ms = event["properties"]["$mp_api_timestamp_ms"]
    query = f"?verbose=1&ip=1&_={ms}"

    tmpdir = Path(tempfile.mkdtemp(prefix="fp-bench-"))
    os.chmod(tmpdir, 0o755)  # nginx workers may drop privileges when run as root
    procs: list[Managed] = []
    targets: list[Target] = []
    slow_targets: list[Target] = []
    slow_info: dict[str, Any] = {"ran": False, "delay_ms": args.slow_delay_ms}
    harness_errors: list[str] = []
    t_start = time.monotonic()

    notes = [
        f"One fixed request body for every request: `data=` + percent-encoded base64 of one mixpanel-js "
        f"2.x `Page View` event with {len(event['properties'])} properties ({len(body)} bytes); "
        f"fixed query `{query}`; headers Content-Type form-urlencoded, Origin {SITE_ORIGIN}, "
        f"User-Agent \"{USER_AGENT}\", no Cookie (first-visit traffic). Each request is one event.",
        "Fake upstream: separate nginx (1 worker) answering `200 {\"status\":1,\"error\":null}` "
        "(Mixpanel /track?verbose=1 shape), body discarded. Rows B, C and D share the instance on CPU 1; "
        "row A measures its own instance on CPU 0.",
        "Rows C and D are two `python -m proxy serve` processes (one per delivery mode, each with its own "
        "data dir, both pinned to CPU 0; only the one being measured gets traffic). Delivery settings: "
        f"`batch_size = {DELIVERY['batch_size']}`, `batch_window_ms = {DELIVERY['batch_window_ms']}`, "
        f"`max_in_flight = {DELIVERY['max_in_flight']}` (the proxy's defaults); D's spool is on "
        f"{fs_type(tmpdir)}, and fsync latency there is on its request path.",
        "CPU µs/req = utime+stime delta of the measured server's process tree (nginx master+worker, "
        "or the proxy's python process + children) / requests completed by wrk. For row D it also counts "
        "the CPU the proxy used after wrk stopped, while the spool drained (the whole cost of an event). "
        "Kernel softirq work for loopback TCP is not attributed to any process and is excluded.",
        "vs nginx = req/s ÷ row B req/s. ⚠ marks rows with non-2xx responses, socket errors or failed runs.",
        "Upstream req per client req = requests the fake upstream received (nginx `stub_status`; for D read "
        "after the spool drained) ÷ requests wrk completed. Upstream req per 1,000 events: for D per event "
        "the proxy forwarded (`/metrics`), for B and C per request wrk completed (one event each).",
    ]

    def _on_term(signum, frame):  # make SIGTERM run the finally-block cleanup
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, _on_term)
    try:
        lua = tmpdir / "track.lua"
        write_lua(lua, body)
        lua_batch = tmpdir / "track_batch.lua"
        write_lua(lua_batch, body_batch)
        lua_noid = tmpdir / "track_noid.lua"
        write_lua(lua_noid, body_noid)
        p_up1, p_up0, p_ngx, p_c, p_d, p_e, p_g, p_h, p_j = free_ports(9)

        # Fake upstream for rows B, C and D, on the load-generator core.
        up1 = start_nginx("upstream_cpu1", UPSTREAM_SERVER.format(port=p_up1, resp=UPSTREAM_BODY),
                          tmpdir, tools["nginx"], pin_load)
        procs.append(up1)
        ok, why = wait_http_ok(f"http://127.0.0.1:{p_up1}/", up1, 10)
        if not ok:
            log(f"fake upstream failed to start: {why}\n{up1.stderr_tail()}")
            return 2
        fast_up = Upstream("nginx", p_up1, up1)

        if "A" in args.rows:
            up0 = start_nginx("upstream_cpu0", UPSTREAM_SERVER.format(port=p_up0, resp=UPSTREAM_BODY),
                              tmpdir, tools["nginx"], pin_server)
            procs.append(up0)
            ok, why = wait_http_ok(f"http://127.0.0.1:{p_up0}/", up0, 10)
            t = Target("A", ROW_LABELS["A"], f"http://127.0.0.1:{p_up0}/track/{query}", up0, ok, why)
            t.upstream, t.upstream_is_server = Upstream("nginx", p_up0, up0), True
            if not ok:
                log(f"row A upstream failed: {why}\n{up0.stderr_tail()}")
                harness_errors.append(f"row A fake upstream did not start: {why}")
            targets.append(t)

        if "B" in args.rows:
            ngx = start_nginx("nginx_passthrough",
                              PASSTHROUGH_SERVER.format(port=p_ngx, up_port=p_up1,
                                                        pool=max(32, args.connections)),
                              tmpdir, tools["nginx"], pin_server)
            procs.append(ngx)
            ok, why = wait_http_ok(f"http://127.0.0.1:{p_ngx}/", ngx, 10)
            t = Target("B", ROW_LABELS["B"], f"http://127.0.0.1:{p_ngx}/mp/track/{query}", ngx, ok, why)
            t.upstream = fast_up
            if not ok:
                log(f"nginx pass-through failed: {why}\n{ngx.stderr_tail()}")
                harness_errors.append(f"row B nginx did not start: {why}")
            targets.append(t)

        for key, port in (("C", p_c), ("D", p_d), ("G", p_g)):
            if key in args.rows:
                name = "proxy_jetstream" if key == "G" else f"proxy_{PROXY_MODES[key]}"
                targets.append(start_proxy(key, name, port, fast_up, query, tmpdir, pin_server, args, procs))
                if key == "G":
                    targets[-1].lua, targets[-1].body = lua_noid, body_noid

        if "F" in args.rows:
            # The spool-mode proxy again (row D's process when it runs), loaded with a
            # 10-event batch: (F - D) / 9 is the marginal CPU of one more event.
            d_row = next((t for t in targets if t.key == "D"), None)
            if d_row is None:
                d_row = start_proxy("D", "proxy_spool", p_d, fast_up, query, tmpdir, pin_server, args, procs)
            t = Target("F", ROW_LABELS["F"], d_row.url, d_row.proc, d_row.available, d_row.reason)
            t.mode, t.port, t.upstream = d_row.mode, d_row.port, d_row.upstream
            t.lua, t.body = lua_batch, body_batch
            f_row = t
        if "E" in args.rows:
            # The framework's own floor: an aiohttp Application that reads the
            # same POST and answers 1 (uvloop, access log off), as our app is served.
            floor = Managed("floor_app", pin_server + [sys.executable, str(BENCH_DIR / "floor_app.py"), str(p_e), "app"],
                            tmpdir, cwd=REPO_ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
            procs.append(floor)
            ok, why = wait_http_ok(f"http://127.0.0.1:{p_e}/healthz", floor, 15)
            t = Target("E", ROW_LABELS["E"], f"http://127.0.0.1:{p_e}/mp/track/{query}", floor, ok, why)
            t.upstream = fast_up
            if not ok:
                harness_errors.append(f"row E bare aiohttp did not start: {why}")
            targets.append(t)

        if "F" in args.rows:
            targets.append(f_row)
        # The floors under D, F and C (bench/floor_spool.py): what any proxy on
        # this stack pays that acknowledges only what is on disk (H, and I with
        # the 10-event batch), or that forwards each request (J), with none of
        # the proxy's own work. D/H, C/J and the marginal costs side by side say
        # how much of a ratio to E is ours and how much the stack's.
        floor_rows = [(key, port) for key, port in (("H", p_h), ("J", p_j)) if key in args.rows or (key == "H" and "I" in args.rows)]
        h_row: Target | None = None
        for key, port in floor_rows:
            argv = [sys.executable, str(BENCH_DIR / "floor_spool.py"), str(port), f"http://127.0.0.1:{p_up1}",
                    str(tmpdir / f"floor_{key}"), "--sync" if key == "J" else "--row-per-request"]
            proc = Managed(f"floor_{key}", pin_server + argv, tmpdir, cwd=REPO_ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
            procs.append(proc)
            ok, why = wait_http_ok(f"http://127.0.0.1:{port}/healthz", proc, 15)
            t = Target(key, ROW_LABELS[key], f"http://127.0.0.1:{port}/mp/track/{query}", proc, ok, why)
            t.upstream = fast_up
            if not ok:
                harness_errors.append(f"row {key} ({ROW_LABELS[key]}) did not start: {why}")
            if key == "H":
                h_row = t
            if key in args.rows:
                targets.append(t)
        if "I" in args.rows and h_row is not None:
            t = Target("I", ROW_LABELS["I"], h_row.url, h_row.proc, h_row.available, h_row.reason)
            t.upstream, t.lua, t.body = fast_up, lua_batch, body_batch
            targets.append(t)
        live = [t for t in targets if t.available]
        for t in live:
            t.smoke = smoke_check(t, t.body or body)
            log(f"smoke {t.key}: POST -> {t.smoke.get('status')} "
                f"{t.smoke.get('body', t.smoke.get('error', ''))[:120]!r}")
            if t.smoke.get("status") != 200:
                notes.append(f"Row {t.key} smoke POST answered {t.smoke.get('status')} "
                             f"{t.smoke.get('body', t.smoke.get('error', ''))[:120]!r} (expected 200).")
        for t in live:  # warm-up (not recorded): fills pools / caches
            measure(t, tools, pin_load, t.lua or lua, 2, args.connections, warmup, args.drain_timeout)

        for run in range(args.runs):
            for t in live:
                r = measure(t, tools, pin_load, t.lua or lua, 2, args.connections, args.duration, args.drain_timeout)
                r["run"] = run + 1
                t.throughput.append(r)
                _log_run(f"run {run + 1}/{args.runs} {t.key} throughput", r)
            for t in live:
                r = measure(t, tools, pin_load, t.lua or lua, 1, 1, args.lat_duration, args.drain_timeout)
                r["run"] = run + 1
                t.latency1.append(r)
                _log_run(f"run {run + 1}/{args.runs} {t.key} 1-conn latency", r)

        # ------------------------------------------------------------ slow upstream
        slow_keys = [k for k in "BCD" if k in args.rows]
        if not args.slow:
            slow_info["reason"] = "skipped (--no-slow)"
        elif not slow_keys:
            slow_info["reason"] = "no row among B, C, D selected"
        else:
            # The fast-upstream servers are done: stop them so nothing idle shares the cores.
            for p in reversed(procs):
                p.stop()
            p_slow, p_ngx_s, p_cs, p_ds = free_ports(4)
            su = Managed("slow_upstream", pin_load + [sys.executable, str(BENCH_DIR / "slow_upstream.py"),
                                                      "--port", str(p_slow), "--delay-ms", f"{args.slow_delay_ms:g}"],
                         tmpdir, cwd=REPO_ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
            procs.append(su)
            ok, why = wait_http_ok(f"http://127.0.0.1:{p_slow}/__stats", su, 15)
            if not ok:
                log(f"slow upstream failed to start: {why}\n{su.stderr_tail()}")
                harness_errors.append(f"slow upstream did not start: {why}")
                slow_info["reason"] = f"slow upstream did not start: {why}"
            else:
                slow_info["ran"] = True
                slow_up = Upstream("slow", p_slow, su)
                if "B" in slow_keys:
                    ngx = start_nginx("nginx_slow",
                                      PASSTHROUGH_SERVER.format(port=p_ngx_s, up_port=p_slow,
                                                                pool=max(32, args.connections)),
                                      tmpdir, tools["nginx"], pin_server)
                    procs.append(ngx)
                    ok, why = wait_http_ok(f"http://127.0.0.1:{p_ngx_s}/", ngx, 10)
                    t = Target("B", ROW_LABELS["B"], f"http://127.0.0.1:{p_ngx_s}/mp/track/{query}", ngx, ok, why)
                    t.upstream = slow_up
                    if not ok:
                        log(f"nginx pass-through (slow) failed: {why}\n{ngx.stderr_tail()}")
                        harness_errors.append(f"row B nginx (slow upstream) did not start: {why}")
                    slow_targets.append(t)
                for key, port in (("C", p_cs), ("D", p_ds)):
                    if key in slow_keys:
                        slow_targets.append(start_proxy(key, f"proxy_{PROXY_MODES[key]}_slow", port, slow_up,
                                                        query, tmpdir, pin_server, args, procs))
                slow_live = [t for t in slow_targets if t.available]
                for t in slow_live:
                    t.smoke = smoke_check(t, body)
                    log(f"smoke slow {t.key}: POST -> {t.smoke.get('status')} "
                        f"{t.smoke.get('body', t.smoke.get('error', ''))[:120]!r}")
                for t in slow_live:
                    if slow_warmup:
                        measure(t, tools, pin_load, lua, 2, args.slow_connections, slow_warmup, args.drain_timeout)
                    r = measure(t, tools, pin_load, lua, 2, args.slow_connections, args.slow_duration,
                                args.drain_timeout)
                    r["run"] = 1
                    t.throughput.append(r)
                    _log_run(f"slow upstream {t.key} throughput", r)
                st = slow_stats(p_slow)
                slow_info["upstream_stats_end"] = st

        # ------------------------------------------------------------ summary + notes
        summ = {t.key: summarize(t) for t in targets}
        slow_summ = {t.key: summarize(t) for t in slow_targets}
        goals = evaluate_targets(summ, slow_summ, args.connections)
        add_notes(notes, targets, summ, slow_targets, slow_summ, args)
        cfg["elapsed_s"] = round(time.monotonic() - t_start, 1)
        table = render(meta, targets, summ, slow_targets, slow_summ, slow_info, goals, cfg, notes)
        print(table, flush=True)

        OUT_DIR.mkdir(parents=True, exist_ok=True)

        def dump(ts: list[Target]) -> dict[str, Any]:
            return {
                t.key: {
                    "label": t.label,
                    "mode": t.mode,
                    "url": t.url,
                    "available": t.available,
                    "reason": t.reason,
                    "command": t.proc.cmd if t.proc else None,
                    "smoke": t.smoke,
                    "throughput": t.throughput,
                    "latency_1conn": t.latency1,
                } for t in ts
            }

        out = {
            "meta": meta,
            "config": cfg,
            "body_bytes": len(body),
            "body": body,
            "event": event,
            "notes": notes,
            "summary": summ,
            "slow_upstream": {"info": slow_info, "summary": slow_summ, "targets": dump(slow_targets)},
            "performance_targets": goals,
            "harness_errors": harness_errors,
            "targets": dump(targets),
            "markdown": table,
        }
        (OUT_DIR / "last.json").write_text(json.dumps(out, indent=2, ensure_ascii=False))
        (OUT_DIR / "last.md").write_text(table + "\n")
        log(f"raw results: {OUT_DIR / 'last.json'}, Markdown: {OUT_DIR / 'last.md'} "
            f"(total {cfg['elapsed_s']} s)")
        if harness_errors:
            log("harness errors: " + "; ".join(harness_errors))
            return 2
        return 0
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    finally:
        for p in reversed(procs):
            try:
                p.stop()
            except Exception as exc:  # keep stopping the others
                log(f"failed to stop {p.name} (pid {p.pid}): {exc}")
        signal.signal(signal.SIGTERM, old_term)
        if args.keep_tmp:
            log(f"temp dir kept: {tmpdir}")
        else:
            shutil.rmtree(tmpdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
