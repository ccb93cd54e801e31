"""Several worker processes on one port (`firstparty serve --workers 2`): each
has its own spool, every event is delivered exactly once, SIGTERM stops all."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import aiohttp

from tests.conftest import b64_body, device_id, js_event
from tests.fakeupstream import FakeUpstream
from tests.support import eventually, eventually_async, metric, serve_workers


def workers_config(tmp_path: Path, upstream_port: int, extra: str = "") -> Path:
    """Two workers, the fake upstream as the US region."""
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'[server]\ndata_dir = "{tmp_path / "data"}"\nworkers = 2\n'
        f'[upstream]\nus = "http://127.0.0.1:{upstream_port}"\n'
        f'[cookie]\nsecure = false\nsecret = "workers-test-secret-workers-test"\n' + extra
    )
    return config


async def test_two_workers_deliver_every_event_once(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    runner, up_port = await upstream.serve("us")
    config = workers_config(tmp_path, up_port, "[delivery]\nbatch_window_ms = 20\n")
    try:
        async with serve_workers(config) as (port, ops_port, _proc):
            sent: list[str] = []

            async def one() -> None:
                # A new connection per request, so SO_REUSEPORT spreads them over the workers.
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                    device = device_id()  # one browser's batch: one device id
                    events = [js_event("Worker Load", device) for _ in range(3)]
                    async with s.post(
                        f"http://127.0.0.1:{port}/mp/track/?verbose=1&ip=1",
                        data=b64_body(events),
                        headers={"Content-Type": "application/x-www-form-urlencoded", "User-Agent": "Mozilla/5.0"},
                    ) as r:
                        assert r.status == 200
                        sent.extend(e["properties"]["$insert_id"] for e in events)

            await asyncio.gather(*(one() for _ in range(100)))
            await upstream.wait(300, "us", "/track", timeout=20)

            def queued() -> int:
                total = 0
                for path in (tmp_path / "data").glob("spool*.sqlite3"):
                    with sqlite3.connect(path) as c:
                        total += c.execute("SELECT COUNT(*) FROM queue").fetchone()[0]
                return total

            # Once both spools are empty every row has had its one send: a double
            # send (a worker reading the other's spool) would be in the upstream by now.
            await eventually(lambda: queued() == 0, 20, "both spools to empty")
            received = [e["properties"]["$insert_id"] for e in upstream.received("us", "/track")]
            assert sorted(received) == sorted(sent)  # all of them, each once
            spools = sorted((tmp_path / "data").glob("spool*.sqlite3"))
            assert [p.name for p in spools] == ["spool-1.sqlite3", "spool.sqlite3"]
            accepted = []
            for path in spools:
                with sqlite3.connect(path) as c:
                    accepted.append(c.execute("SELECT seq FROM sqlite_sequence WHERE name = 'queue'").fetchone()[0])
            # One row per request (its three events): both workers took a share.
            assert sum(accepted) == 100 and min(accepted) > 0

            # One scrape of the ops listener, whichever worker answers it, counts
            # every worker's events (their per-request counters reach the shared
            # files within a second).
            async def scrape() -> str:
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                    async with s.get(f"http://127.0.0.1:{ops_port}/metrics") as r:
                        assert r.status == 200
                        return await r.text()

            scraped: list[str] = []

            async def totals_reported() -> bool:
                scraped.append(await scrape())
                return metric(scraped[-1], 'firstparty_events_accepted_total{route="track"}') == 300

            await eventually_async(totals_reported, 10, "a scrape counting all 300 events")
            text = scraped[-1]
            assert metric(text, 'firstparty_requests_total{route="track",status="200"}') == 100
            assert metric(text, 'firstparty_delivery_outcomes_total{outcome="forwarded",route="track"}') == 300
            assert metric(text, "firstparty_spool_depth") == 0
            # Not on the public port.
            async with aiohttp.ClientSession() as s:
                async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
                    assert r.status == 404
    finally:
        await runner.cleanup()


class LiveStream:
    """One ``/live/events`` stream on its own connection (SO_REUSEPORT gives it to
    either worker), collecting every record it is sent."""

    def __init__(self, ops_port: int) -> None:
        self.url = f"http://127.0.0.1:{ops_port}/live/events"
        self.records: list[dict] = []
        self.open = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        import orjson

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            async with s.get(self.url, timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as r:
                assert r.status == 200
                self.open.set()
                async for line in r.content:
                    if line.startswith(b"data: "):
                        self.records.append(orjson.loads(line[6:]))

    def names(self) -> list[str]:
        return [e["name"] for r in self.records if r.get("kind") == "request" for e in r["events"]]

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):  # the server may be gone
                await self._task


async def post_on_one_worker(port: int, name: str) -> int:
    """One event on a new connection; returns the pid of the worker that took it
    (asked on the same keep-alive connection first)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=False, limit=1)) as s:
        async with s.get(f"http://127.0.0.1:{port}/healthz") as r:
            pid = (await r.json())["pid"]
        async with s.post(
            f"http://127.0.0.1:{port}/mp/track/?verbose=1&ip=1",
            data=b64_body([js_event(name, device_id())]),
            headers={"Content-Type": "application/x-www-form-urlencoded", "User-Agent": "Mozilla/5.0"},
        ) as r:
            assert r.status == 200
    return pid


async def test_the_live_view_shows_every_workers_events(tmp_path: Path) -> None:
    """Issue 23, point 1: with two workers, a /live/events stream is served by one of
    them; every stream, whichever worker holds it, sees every event of both workers,
    each once."""
    upstream = FakeUpstream()
    runner, up_port = await upstream.serve("us")
    config = workers_config(tmp_path, up_port)
    streams: list[LiveStream] = []
    try:
        async with serve_workers(config) as (port, ops_port, _proc):
            streams += [LiveStream(ops_port) for _ in range(6)]
            for stream in streams:
                stream.start()
            await asyncio.wait_for(asyncio.gather(*(s.open.wait() for s in streams)), 10)
            # A stream counts for every worker from the moment it is open: no warm-up.
            pids = await asyncio.gather(*(post_on_one_worker(port, f"Live {i}") for i in range(40)))
            assert len(set(pids)) == 2, "both workers took a share of the events"
            sent = [f"Live {i}" for i in range(40)]

            def complete() -> bool:
                return all(sorted(n for n in s.names() if n.startswith("Live ")) == sorted(sent) for s in streams)

            await eventually(complete, 10, "every event on every stream")
            for stream in streams:
                names = [n for n in stream.names() if n.startswith("Live ")]
                assert len(names) == len(set(names)) == 40  # each once
                await stream.stop()  # before the workers stop
    finally:
        for stream in streams:
            await stream.stop()
        await runner.cleanup()
