"""Memory under floods: the proxy's RSS against idle connections and against
bodies in flight (issue 10: bounded everything).

Starts `python -m proxy serve` (embedded defaults, a temporary data dir, no
ops listener) on 127.0.0.1 twice: once with `server.max_inflight_body_bytes`
at `--budget-mb` (default 64), once with it out of the way (1 TiB), and for
each:

1. opens N idle keep-alive connections (each makes one request, then waits);
2. starts U slow uploads of `--body-mb` (default 1) each that send all but
   their last byte and hold there (the proxy has read what came, and waits).

It prints RSS after each step, how many uploads were refused with 503, and
stops the proxies it started, by PID.

    python bench/floods.py                       # 2,000 idle, 300 uploads of 1 MB
    python bench/floods.py --idle 5000 --uploads 500
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from idle_connections import free_port, hold as idle, rss_mb  # noqa: E402  (bench/ is no package)


async def slow_upload(port: int, size: int) -> tuple[asyncio.StreamWriter, asyncio.Task[bytes]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /mp/track/?verbose=1 HTTP/1.1\r\nHost: bench\r\nUser-Agent: Mozilla/5.0\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n" + f"Content-Length: {size}\r\n\r\n".encode()
    )
    chunk = b"x" * 65536
    sent = 0
    while sent < size - 1:
        piece = chunk[: min(len(chunk), size - 1 - sent)]
        writer.write(piece)
        sent += len(piece)
        await writer.drain()
    # An answer before the last byte is a refusal (503): read it if it comes.
    return writer, asyncio.ensure_future(reader.read(12))


def start(port: int, tmp: str, budget: int, limit: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIRSTPARTY_")}
    env.update(
        FIRSTPARTY_SERVER_DATA_DIR=f'"{tmp}"', FIRSTPARTY_COOKIE_SECURE="false",
        FIRSTPARTY_SERVER_MAX_INFLIGHT_BODY_BYTES=str(budget), FIRSTPARTY_SERVER_REQUEST_TIMEOUT_SECONDS="300",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--port", str(port), "--ops-port", "0"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)),
    )
    deadline = time.monotonic() + 15
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"proxy did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
            time.sleep(0.1)


def measure(label: str, budget: int, args: argparse.Namespace, limit: int) -> None:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="fp-floods-") as tmp:
        proc = start(port, tmp, budget, limit)
        try:
            base = rss_mb(proc.pid)

            async def run() -> tuple[float, float, int]:
                held = await idle(port, args.idle)
                await asyncio.sleep(1)
                with_idle = rss_mb(proc.pid)
                size = int(args.body_mb * 1024 * 1024)
                uploads = [await slow_upload(port, size) for _ in range(args.uploads)]
                await asyncio.sleep(2)
                with_uploads = rss_mb(proc.pid)
                refused = 0
                for writer, answer in uploads:
                    if answer.done() and answer.result().startswith(b"HTTP/1.1 503"):
                        refused += 1
                    answer.cancel()
                    writer.close()
                for writer in held:
                    writer.close()
                return with_idle, with_uploads, refused

            with_idle, with_uploads, refused = asyncio.run(run())
            print(
                f"{label:<34} RSS {base:5.0f} MB at rest, {with_idle:5.0f} MB with {args.idle:,} idle connections, "
                f"{with_uploads:5.0f} MB with {args.uploads} uploads of {args.body_mb:g} MB in flight "
                f"({refused} refused with 503)"
            )
        finally:
            proc.terminate()
            proc.wait(timeout=15)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--uploads", type=int, default=300)
    parser.add_argument("--body-mb", type=float, default=1.0)
    parser.add_argument("--budget-mb", type=float, default=64)
    args = parser.parse_args()
    limit = (args.idle + args.uploads) * 2 + 1000
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1])))
    measure(f"max_inflight_body_bytes {args.budget_mb:g} MB", int(args.budget_mb * 1024 * 1024), args, limit)
    measure("max_inflight_body_bytes 1 TiB (off)", 1 << 40, args, limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
