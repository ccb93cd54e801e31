"""A burst of 10x the normal rate: what the proxy's memory and answers do (issue 10).

Everything runs on 127.0.0.1 and stops by itself: the proxy (`python -m proxy
serve`, spool mode, its defaults), its own redis-server, and the soak's
counting fake vendor (bench/soak.py). An open-loop load (requests leave on a
schedule, whether or not earlier ones were answered, as a crowd of browsers
does) sends mixpanel-js batches of one event:

    normal  --rate req/s for --seconds
    burst   10 x --rate for --seconds
    after   --rate for --seconds

It prints, per phase: requests sent, answered 200, refused 503 (with
Retry-After), failed (no answer), p50/p99 latency, the proxy's RSS (max) and
open connections (max); then events acknowledged, delivered and lost.

    python bench/burst.py                     # 150 req/s, 1,500 in the burst, 15 s each
    python bench/burst.py --rate 300 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak import Processes, Vendor, form, mp_event, sample  # noqa: E402  (bench/ is no package)

PHASES = (("normal", 1), ("burst", 10), ("after", 1))
MAX_OUTSTANDING = 4000  # the load's own bound: past it a request counts as failed, not queued


async def run(args: argparse.Namespace) -> int:
    vendor = Vendor()
    runner, vendor_port = await vendor.serve()
    with tempfile.TemporaryDirectory(prefix="fp-burst-") as tmp:
        procs = Processes(Path(tmp), vendor_port, None)
        procs.start_redis()
        procs.start_proxy()
        try:
            await procs.wait_proxy()
            report = await load(args, procs)
            acked = report.pop("acked")
            # The spool drains: wait (bounded) until the vendor has every acknowledged event.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and any(i not in vendor.seen for i in acked):
                await asyncio.sleep(0.5)
            assert procs.proxy is not None
            report["rss_drained"] = sample(procs.proxy.pid)[0]
        finally:
            procs.stop_proxy()
            procs.stop_redis()
    await runner.cleanup()
    delivered = sum(1 for i in acked if vendor.seen.get(i))
    print_report(args, report, len(acked), delivered)
    return 0 if delivered == len(acked) else 1


async def load(args: argparse.Namespace, procs: Processes) -> dict[str, Any]:
    base = f"http://127.0.0.1:{procs.port}"
    headers = {"User-Agent": "Mozilla/5.0 (burst) Chrome/120", "Origin": "https://www.example.com",
               "Content-Type": "application/x-www-form-urlencoded"}
    acked: set[str] = set()
    phases: dict[str, dict[str, Any]] = {}
    outstanding = 0
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def one(stats: dict[str, Any]) -> None:
            nonlocal outstanding
            event = mp_event("Page View", str(uuid.uuid4()))
            started = time.perf_counter()
            try:
                async with session.post(f"{base}/mp/track/?ip=1", data=form([event]), headers=headers) as r:
                    await r.read()
                    if r.status == 200:
                        acked.add(event["properties"]["$insert_id"])
                        stats["ok"] += 1
                    elif r.status == 503:
                        stats["refused"] += 1
                    else:
                        stats["failed"] += 1
            except (aiohttp.ClientError, asyncio.TimeoutError):
                stats["failed"] += 1
            finally:
                outstanding -= 1
                stats["latency"].append(time.perf_counter() - started)

        tasks: set[asyncio.Task[None]] = set()
        for name, factor in PHASES:
            stats: dict[str, Any] = {"sent": 0, "ok": 0, "refused": 0, "failed": 0, "latency": [], "rss": 0.0, "fds": 0}
            phases[name] = stats
            rate = args.rate * factor
            start = time.monotonic()
            next_sample = start
            sent = 0
            while (now := time.monotonic()) - start < args.seconds:
                due = int((now - start) * rate)
                while sent < due:
                    sent += 1
                    stats["sent"] += 1
                    if outstanding >= MAX_OUTSTANDING:
                        stats["failed"] += 1
                        continue
                    outstanding += 1
                    task = asyncio.ensure_future(one(stats))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if now >= next_sample and procs.proxy is not None:
                    rss, fds = sample(procs.proxy.pid)
                    stats["rss"], stats["fds"] = max(stats["rss"], rss), max(stats["fds"], fds)
                    next_sample = now + 0.5
                await asyncio.sleep(0.002)
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"phases": phases, "acked": acked}


def print_report(args: argparse.Namespace, report: dict[str, Any], acked: int, delivered: int) -> None:
    print(f"\nburst: {args.rate} req/s, then {args.rate * 10} req/s, then {args.rate} req/s, {args.seconds:g} s each"
          f" (command: python bench/burst.py --rate {args.rate} --seconds {args.seconds:g})\n")
    print("| phase | sent | 200 | 503 | failed | p50 | p99 | proxy RSS (max) | open files (max) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, s in report["phases"].items():
        lat = sorted(s["latency"]) or [0.0]
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        print(f"| {name} | {s['sent']:,} | {s['ok']:,} | {s['refused']:,} | {s['failed']:,} | "
              f"{statistics.median(lat) * 1000:.1f} ms | {p99 * 1000:.1f} ms | {s['rss']:.0f} MB | {s['fds']} |")
    after = report.get("rss_drained")
    print(f"\nevents acknowledged {acked:,}, delivered {delivered:,}, lost {acked - delivered:,}"
          + (f"; RSS once drained {after:.0f} MB" if after else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=150, help="normal requests per second (the burst is 10x)")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each phase")
    args = parser.parse_args()
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
