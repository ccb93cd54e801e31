"""kill -9 in the middle of a load: no acknowledged event is lost.

The proxy runs as a real process (`python -m proxy serve`) in front of the
recording fake upstream, which answers slowly so a backlog builds in the
spool. Mid-load the proxy is killed with SIGKILL, restarted on the same data
directory, and every ``$insert_id`` it acknowledged must reach the upstream.
Duplicates (sent, then killed before the row was deleted) are counted and
reported: the vendor de-duplicates by ``$insert_id``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import b64_body, device_id, js_event
from tests.support import wait_listening, wait_ready
from tests.fakeupstream import FakeUpstream, Recorded

ROOT = Path(__file__).resolve().parent.parent
TOTAL_EVENTS = 4000
KILL_AFTER_ACKED = 1500
WORKERS = 32



def start_proxy(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        # No ops listener: the test needs none, and its port would be a fixed one.
        [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", "0", "--ops-port", "0"],
        cwd=ROOT,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("FIRSTPARTY_")}},
        stdout=subprocess.DEVNULL,
        stderr=open(log, "ab"),  # noqa: SIM115 - the child owns it
    )


@pytest.mark.parametrize("fsync", [True, False], ids=["fsync", "no-fsync"])
async def test_sigkill_mid_load_loses_no_acknowledged_event(tmp_path: Path, fsync: bool) -> None:
    """With ``delivery.fsync = false`` too: a process crash loses nothing (the
    WAL reaches the OS at each commit); only a machine crash could."""
    upstream = FakeUpstream()

    async def slow(rec: Recorded) -> web.Response | None:
        await asyncio.sleep(0.02)  # a backlog builds in the spool
        return None

    upstream.behave = slow
    runner, up_port = await upstream.serve("us")

    config = tmp_path / "proxy.toml"
    config.write_text(
        f"""
[server]
data_dir = "{tmp_path / 'data'}"
[upstream]
us = "http://127.0.0.1:{up_port}"
timeout_seconds = 5
[cookie]
secure = false
secret = "crash-test-secret-crash-test-secret"
[delivery]
batch_window_ms = 20
max_in_flight = 2
backoff_initial_seconds = 0.2
backoff_max_seconds = 1
fsync = {"true" if fsync else "false"}
"""
    )
    log = tmp_path / "proxy.log"
    proc = start_proxy(config, log)
    port = await wait_listening(log, proc)
    acked: list[str] = []
    sent = 0
    killed = asyncio.Event()

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while sent < TOTAL_EVENTS and not killed.is_set():
            n = 1 + sent % 5
            sent += n
            events = [js_event("Crash Load", device_id()) for _ in range(n)]
            try:
                async with session.post(
                    f"http://127.0.0.1:{port}/mp/track/?verbose=1&ip=1",
                    data=b64_body(events),
                    headers={"Content-Type": "application/x-www-form-urlencoded", "User-Agent": "Mozilla/5.0"},
                ) as r:
                    if r.status == 200 and (await r.json())["status"] == 1:
                        acked.extend(e["properties"]["$insert_id"] for e in events)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return  # the proxy died under us: those events were never acknowledged
            if len(acked) >= KILL_AFTER_ACKED and not killed.is_set():
                killed.set()
                os.kill(proc.pid, signal.SIGKILL)

    try:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await wait_ready(session, port, proc)
            await asyncio.wait_for(asyncio.gather(*(worker(session) for _ in range(WORKERS))), 60)
            assert killed.is_set(), "the load finished before the kill"
            proc.wait(timeout=10)
            assert proc.returncode == -signal.SIGKILL
            with sqlite3.connect(tmp_path / "data" / "spool.sqlite3") as c:
                backlog = c.execute("SELECT COUNT(*) FROM queue").fetchone()[0]
            received_before = len(upstream.received())

            offset = log.stat().st_size
            proc = start_proxy(config, log)  # same spool, a port of its own
            port = await wait_listening(log, proc, offset)
            await wait_ready(session, port, proc)
            deadline = time.monotonic() + 60
            while not set(acked) <= {e["properties"]["$insert_id"] for e in upstream.received()}:
                assert time.monotonic() < deadline, "acknowledged events missing after restart"
                await asyncio.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=20)
        await runner.cleanup()

    received = [e["properties"]["$insert_id"] for e in upstream.received()]
    duplicates = len(received) - len(set(received))
    print(
        f"\ncrash test: {len(acked)} acknowledged, {backlog} spooled at the kill, "
        f"{received_before} delivered before it, {len(set(received))} distinct delivered, {duplicates} duplicates"
    )
    assert backlog > 0, "nothing was spooled at the kill: the test proved nothing"
    assert set(acked) <= set(received)
    # Duplicates come only from batches in flight at the kill (sent, not yet deleted).
    assert duplicates <= 2 * 50 * 2
