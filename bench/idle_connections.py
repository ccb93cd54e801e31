"""Memory with many idle keep-alive connections (PERFORMANCE.md: RSS <= 150 MB
per worker holding 5,000).

Starts the proxy (`python -m proxy serve`, embedded defaults, a temporary data
directory) on 127.0.0.1, opens N keep-alive connections that each make one
request and then stay idle, and prints the proxy's RSS before and after.
Stops the proxy it started, by PID.

    python bench/idle_connections.py            # 5,000 connections
    python bench/idle_connections.py --connections 10000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def hold(port: int, n: int) -> list[asyncio.StreamWriter]:
    writers = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        writers.append(writer)
    return writers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=5000)
    args = parser.parse_args()
    limit = args.connections * 2 + 1000
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1])))
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="fp-idle-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FIRSTPARTY_")}
        env.update(FIRSTPARTY_SERVER_DATA_DIR=f'"{tmp}"', FIRSTPARTY_COOKIE_SECURE="false")
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--port", str(port), "--ops-port", "0"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)),
        )
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        print("proxy did not start:", proc.stderr.read().decode() if proc.stderr else "")
                        return 2
                    time.sleep(0.1)
            before = rss_mb(proc.pid)

            async def run() -> float:
                writers = await hold(port, args.connections)
                await asyncio.sleep(2)
                after = rss_mb(proc.pid)
                for w in writers:
                    w.close()
                return after

            after = asyncio.run(run())
            print(f"proxy RSS: {before:.0f} MB idle, {after:.0f} MB holding {args.connections:,} "
                  f"keep-alive connections ({(after - before) * 1024 / args.connections:.1f} kB each); "
                  f"target <= 150 MB")
        finally:
            proc.terminate()
            proc.wait(timeout=15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
