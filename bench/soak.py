"""A soak: the proxy under a realistic mix for a bounded time, with faults on a
schedule, and what it cost (issue 10).

Everything runs on 127.0.0.1 and stops by itself: the proxy
(`python -m proxy serve`, spool mode, a Redis store), a redis-server of its
own on a free port, a counting fake vendor (Mixpanel's and Segment's answers),
and a load of browser-like clients: mixpanel-js batches, sendBeacon bodies,
people updates, session-replay chunks, feature flags, analytics.js calls and
Segment server batches. The schedule (fractions of --minutes):

    0.00 normal      0.15 vendor down (503)   0.30 normal
    0.45 Redis killed                         0.55 Redis back
    0.60 disk pressure (the spool's tmpfs filled to below delivery.min_free_bytes)
    0.72 normal      0.80 SIGTERM, restart    0.85 normal      1.00 drain

It reports events acknowledged, delivered, lost (acknowledged, never
delivered) and duplicated, answers refused (503) and failed (no answer),
p99 latency per phase, and RSS and open files of the proxy every second, as a
table and an SVG plot (`--plot`, default bench/out/soak.svg).

    python bench/soak.py                  # 10 minutes
    python bench/soak.py --minutes 2 --plot docs/soak.svg

The disk-pressure phase mounts a small tmpfs for the spool (root only); without
it the phase is skipped and the report says so.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gzip
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "soak-token"
WRITE_KEY = "soak-write-key"
SCHEDULE = [
    (0.00, "normal"), (0.15, "vendor down"), (0.30, "normal"), (0.45, "redis killed"), (0.55, "redis back"),
    (0.60, "disk pressure"), (0.72, "normal"), (0.80, "restart"), (0.85, "normal"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------- the vendor


@dataclass
class Vendor:
    """Answers like Mixpanel and Segment; counts each event id it is sent."""

    down: bool = False
    seen: dict[str, int] = field(default_factory=dict)

    def count(self, ids: list[str]) -> None:
        for i in ids:
            self.seen[i] = self.seen.get(i, 0) + 1

    async def serve(self) -> tuple[web.AppRunner, int]:
        """Listen on a free port of 127.0.0.1: (runner to clean up, port)."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner, runner.addresses[0][1]

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.down and request.method == "POST":
            return web.json_response({"error": "unavailable"}, status=503)
        path = request.path.rstrip("/")
        if path == "/v1/batch":
            self.count([c.get("messageId", "") for c in json.loads(body)["batch"]])
            return web.json_response({"success": True})
        if path in ("/track", "/engage", "/import"):
            data = dict(parse_qsl(body.decode())).get("data", "")
            if data and data[0] not in "[{":
                data = base64.b64decode(data + "=" * (-len(data) % 4)).decode()
            events = json.loads(data) if data else []
            events = events if isinstance(events, list) else [events]
            self.count([e.get("properties", e).get("$insert_id", "") for e in events if isinstance(e, dict)])
            return web.json_response({"status": 1, "error": None})
        if path == "/record":
            return web.json_response({"code": 200, "status": "OK"})
        if path.startswith("/flags"):
            return web.json_response({"flags": {}})
        return web.json_response({"status": 1, "error": None})


# ------------------------------------------------------------------- the load


@dataclass
class Tally:
    acked: set[str] = field(default_factory=set)
    refused: int = 0
    failed: int = 0
    answered: int = 0
    latencies: dict[str, list[float]] = field(default_factory=dict)


def mp_event(name: str, device: str) -> dict[str, Any]:
    return {"event": name, "properties": {
        "token": TOKEN, "distinct_id": f"$device:{device}", "$device_id": device, "$insert_id": uuid.uuid4().hex[:16],
        "time": time.time(), "$current_url": "https://www.example.com/pricing", "mp_lib": "web", "$os": "Linux",
        "$browser": "Chrome", "$screen_width": 1920, "plan": random.choice(["free", "pro", "team"]),
    }}


def form(events: list[dict[str, Any]]) -> str:
    return "data=" + quote(base64.b64encode(json.dumps(events).encode()).decode(), safe="")


async def browser(base: str, tally: Tally, phase: list[str], until: float) -> None:
    headers = {"User-Agent": "Mozilla/5.0 (soak) Chrome/120", "Origin": "https://www.example.com"}
    while time.monotonic() < until:
        device = str(uuid.uuid4())
        anon = str(uuid.uuid4())
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar, timeout=aiohttp.ClientTimeout(total=10)) as session:
            for _ in range(random.randint(5, 30)):
                if time.monotonic() >= until:
                    return
                kind = random.choices(
                    ["batch", "beacon", "engage", "record", "flags", "ajs", "segment-batch"], [40, 10, 8, 4, 8, 25, 5]
                )[0]
                ids: list[str] = []
                try:
                    if kind in ("batch", "beacon"):
                        events = [mp_event(random.choice(["Page View", "Click", "Signup"]), device)
                                  for _ in range(random.randint(1, 5) if kind == "batch" else 1)]
                        ids = [e["properties"]["$insert_id"] for e in events]
                        ctype = "application/x-www-form-urlencoded" if kind == "batch" else "text/plain;charset=UTF-8"
                        req = session.post(f"{base}/mp/track/?verbose=1&ip=1", data=form(events),
                                           headers={**headers, "Content-Type": ctype})
                    elif kind == "engage":
                        update = {"$token": TOKEN, "$distinct_id": f"$device:{device}", "$set": {"plan": "pro"}}
                        req = session.post(f"{base}/mp/engage/?verbose=1", data=form([update]),
                                           headers={**headers, "Content-Type": "application/x-www-form-urlencoded"})
                    elif kind == "record":
                        chunk = gzip.compress(json.dumps([{"type": 3, "data": {"x": random.random()}}] * 50).encode())
                        req = session.post(f"{base}/mp/record/?format=gzip&distinct_id=%24device%3A{device}&seq=1"
                                           f"&replay_id={uuid.uuid4().hex}&$device_id={device}", data=chunk,
                                           headers={**headers, "Content-Type": "application/octet-stream"})
                    elif kind == "flags":
                        context = quote(json.dumps({"distinct_id": f"$device:{device}", "device_id": device}))
                        req = session.get(f"{base}/mp/flags/?context={context}&token={TOKEN}", headers=headers)
                    elif kind == "ajs":
                        call = {"type": "track", "event": "Viewed", "anonymousId": anon, "writeKey": WRITE_KEY,
                                "messageId": f"ajs-{uuid.uuid4().hex}", "context": {"page": {"url": "https://www.example.com/"}}}
                        ids = [call["messageId"]]
                        req = session.post(f"{base}/seg/v1/t", data=json.dumps(call),
                                           headers={**headers, "Content-Type": "text/plain"})
                    else:
                        calls = [{"type": "track", "event": "Order", "anonymousId": str(uuid.uuid4()),
                                  "messageId": f"py-{uuid.uuid4().hex}"} for _ in range(random.randint(1, 10))]
                        ids = [c["messageId"] for c in calls]
                        auth = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
                        req = session.post(f"{base}/seg/v1/batch", data=json.dumps({"batch": calls}),
                                           headers={"Content-Type": "application/json", "Authorization": auth,
                                                    "User-Agent": "analytics-python/2.3"})
                    started = time.monotonic()
                    async with req as resp:
                        await resp.read()
                        status = resp.status
                    tally.latencies.setdefault(phase[0], []).append(time.monotonic() - started)
                    tally.answered += 1
                    if 200 <= status < 300:
                        tally.acked.update(ids)
                    elif status == 503:
                        tally.refused += 1
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    tally.failed += 1
                    await asyncio.sleep(0.05)
                await asyncio.sleep(random.uniform(0, 0.02))


# ------------------------------------------------------------ the processes


class Processes:
    def __init__(self, tmp: Path, vendor_port: int, tiny: Path | None) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.redis_port = free_port()
        self.vendor_port = vendor_port
        self.tiny = tiny
        self.proxy: subprocess.Popen[bytes] | None = None
        self.redis: subprocess.Popen[bytes] | None = None

    def start_redis(self) -> None:
        self.redis = subprocess.Popen(
            [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(self.redis_port), "--bind",
             "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.tmp)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def stop_redis(self) -> None:
        if self.redis is not None and self.redis.poll() is None:
            self.redis.kill()
            self.redis.wait(timeout=10)

    def start_proxy(self) -> None:
        spool_dir = self.tiny or self.tmp
        config = self.tmp / "soak.toml"
        vendor = f"http://127.0.0.1:{self.vendor_port}"
        config.write_text(
            f'[server]\ndata_dir = "{self.tmp / "data"}"\nport = {self.port}\n'
            f'[ops]\nport = 0\n'
            f'[upstream]\nus = "{vendor}"\neu = "{vendor}"\nin = "{vendor}"\ndecide = "{vendor}"\ncdn = "{vendor}"\n'
            f'[segment]\nus = "{vendor}"\neu = "{vendor}"\ncdn = "{vendor}"\n'
            f'[cookie]\nsecure = false\nsecret = "soak-secret-soak-secret-soak"\ndomains = [".example.com"]\n'
            f'[cors]\nallowed_origins = ["https://www.example.com"]\n'
            f'[store]\nurl = "redis://127.0.0.1:{self.redis_port}/0"\n'
            f'[delivery]\nspool_path = "{spool_dir / "spool.sqlite3"}"\nmin_free_bytes = {8 * 1024 * 1024}\n'
            f"backoff_initial_seconds = 0.5\nbackoff_max_seconds = 5\n"
        )
        self.proxy = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(config)],
            cwd=ROOT, env={k: v for k, v in os.environ.items() if not k.startswith("FIRSTPARTY_")},
            stdout=subprocess.DEVNULL, stderr=open(self.tmp / "proxy.log", "ab"),  # noqa: SIM115
        )

    async def wait_proxy(self) -> None:
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with s.get(f"http://127.0.0.1:{self.port}/healthz") as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise SystemExit(f"the proxy did not start; see {self.tmp / 'proxy.log'}")

    def stop_proxy(self) -> None:
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.send_signal(signal.SIGTERM)
            self.proxy.wait(timeout=30)


def sample(pid: int) -> tuple[float, int]:
    try:
        rss = int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0]) / 1024
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, IndexError):
        return 0.0, 0
    return rss, fds


def fill(directory: Path, leave: int) -> Path:
    """A file that leaves ``leave`` bytes free on ``directory``'s file system."""
    filler = directory / "filler"
    st = os.statvfs(directory)
    size = max(0, st.f_bavail * st.f_frsize - leave)
    with open(filler, "wb") as fh:
        fh.truncate(0)
        chunk = b"\0" * (1 << 20)
        while size > 0:
            fh.write(chunk[: min(len(chunk), size)])
            size -= len(chunk)
    return filler


def svg_plot(samples: list[dict[str, Any]], phases: list[tuple[float, str]], path: Path) -> None:
    """RSS (MB) and open files over time, phases shaded: a plain SVG, no dependencies."""
    width, height, pad = 900, 320, 50
    t_end = max(s["t"] for s in samples) or 1
    rss_max = max(s["rss"] for s in samples) * 1.2 or 1
    fd_max = max(s["fds"] for s in samples) * 1.2 or 1
    x = lambda t: pad + (width - 2 * pad) * t / t_end  # noqa: E731
    y = lambda v, top: height - pad - (height - 2 * pad) * v / top  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
             '<rect width="100%" height="100%" fill="white"/>']
    shades = ["#f4f6f8", "#fdf1e6"]
    for i, (start, name) in enumerate(phases):
        end = phases[i + 1][0] if i + 1 < len(phases) else t_end
        parts.append(f'<rect x="{x(start):.1f}" y="{pad}" width="{max(0, x(end) - x(start)):.1f}" height="{height - 2 * pad}" fill="{shades[name != "normal"]}"/>')
        parts.append(f'<text x="{x(start) + 3:.1f}" y="{pad - 6}" fill="#555">{name}</text>')
    for key, top, colour in (("rss", rss_max, "#1f6feb"), ("fds", fd_max, "#d1242f")):
        points = " ".join(f"{x(s['t']):.1f},{y(s[key], top):.1f}" for s in samples)
        parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
    parts.append(f'<text x="{pad}" y="{height - 15}" fill="#1f6feb">RSS (MB, max {rss_max / 1.2:.0f})</text>')
    parts.append(f'<text x="{pad + 200}" y="{height - 15}" fill="#d1242f">open files (max {fd_max / 1.2:.0f})</text>')
    parts.append(f'<text x="{width - pad - 120}" y="{height - 15}" fill="#555">time: {t_end:.0f} s</text>')
    parts.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))


async def soak(args: argparse.Namespace) -> int:
    duration = args.minutes * 60
    vendor = Vendor()
    runner, vendor_port = await vendor.serve()
    tmp = Path(tempfile.mkdtemp(prefix="fp-soak-"))
    tiny: Path | None = tmp / "tiny"
    tiny.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(tiny)], capture_output=True)
    if mounted.returncode != 0:
        tiny = None
    procs = Processes(tmp, vendor_port, tiny)
    tally = Tally()
    phase = ["normal"]
    samples: list[dict[str, Any]] = []
    seen_phases: list[tuple[float, str]] = []
    try:
        procs.start_redis()
        procs.start_proxy()
        await procs.wait_proxy()
        t0 = time.monotonic()
        until = t0 + duration
        base = f"http://127.0.0.1:{procs.port}"
        load = [asyncio.ensure_future(browser(base, tally, phase, until)) for _ in range(args.clients)]
        filler: Path | None = None
        schedule = list(SCHEDULE)
        while time.monotonic() < until:
            now = time.monotonic() - t0
            while schedule and now >= schedule[0][0] * duration:
                _, name = schedule.pop(0)
                phase[0] = name
                seen_phases.append((now, name))
                vendor.down = name == "vendor down"
                if name == "redis killed":
                    procs.stop_redis()
                elif name == "redis back":
                    procs.start_redis()
                elif name == "disk pressure" and tiny is not None:
                    filler = fill(tiny, 4 * 1024 * 1024)
                elif name == "normal" and filler is not None:
                    filler.unlink()
                    filler = None
                elif name == "restart":
                    procs.stop_proxy()
                    procs.start_proxy()
                    await procs.wait_proxy()
            if procs.proxy is not None:
                rss, fds = sample(procs.proxy.pid)
                samples.append({"t": now, "rss": rss, "fds": fds, "phase": phase[0], "acked": len(tally.acked),
                                "delivered": len(vendor.seen)})
            await asyncio.sleep(1)
        await asyncio.gather(*load)
        seen_phases.append((time.monotonic() - t0, "drain"))
        drain_until = time.monotonic() + 120
        while time.monotonic() < drain_until and not tally.acked <= vendor.seen.keys():
            await asyncio.sleep(0.5)
    finally:
        procs.stop_proxy()
        procs.stop_redis()
        await runner.cleanup()
        if tiny is not None:
            subprocess.run(["umount", "-l", str(tiny)], check=False)
    lost = tally.acked - vendor.seen.keys()
    dupes = sum(1 for i in tally.acked if vendor.seen.get(i, 0) > 1)

    def p99(values: list[float]) -> str:
        if not values:
            return "-"
        values = sorted(values)
        return f"{values[min(len(values) - 1, int(len(values) * 0.99))] * 1000:.1f} ms"

    print(f"\nsoak: {args.minutes:g} min, {args.clients} clients, {tally.answered:,} answers, command: "
          f"python bench/soak.py --minutes {args.minutes:g}\n")
    print("| events acknowledged | delivered | lost | duplicated | answers refused (503) | no answer (proxy restarting) |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {len(tally.acked):,} | {len(tally.acked & vendor.seen.keys()):,} | {len(lost)} | {dupes} | {tally.refused:,} | {tally.failed:,} |\n")
    print("| phase | p99 latency | answers |")
    print("|---|---:|---:|")
    for name in dict.fromkeys(n for _, n in seen_phases if n != "drain"):
        print(f"| {name} | {p99(tally.latencies.get(name, []))} | {len(tally.latencies.get(name, [])):,} |")
    rss = [s["rss"] for s in samples if s["rss"]]
    fds = [s["fds"] for s in samples if s["fds"]]
    if rss:
        third = max(1, len(rss) // 3)
        print(f"\nRSS: {min(rss):.0f}-{max(rss):.0f} MB (first third median {sorted(rss[:third])[third // 2]:.0f}, "
              f"last third median {sorted(rss[-third:])[third // 2]:.0f}); open files {min(fds)}-{max(fds)}")
    if tiny is None:
        print("disk pressure: skipped (no tmpfs could be mounted: run as root)")
    plot = Path(args.plot)
    svg_plot(samples, seen_phases, plot)
    (ROOT / "bench" / "out").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "out" / "soak.json").write_text(json.dumps({"samples": samples, "phases": seen_phases}))
    print(f"plot: {plot}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 1 if lost else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--plot", default=str(ROOT / "bench" / "out" / "soak.svg"))
    return asyncio.run(soak(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
