"""The floor under spool mode: the least a durable spool on this stack does
per request, with none of the proxy's own work. An aiohttp app (uvloop,
access log off, as row E) that takes mixpanel-js's ``data=<base64>`` POST,
decodes it (pybase64, orjson), writes every event to a SQLite spool with the
proxy's own schema, pragmas (WAL, ``synchronous=FULL``) and multi-row insert,
group-committed on one thread, answers ``{"status":1,"error":null}`` once
the commit is on disk, and forwards the events in batches of up to 50
(``data=<base64 JSON array>``, one ``ClientSession``), deleting each batch's
rows once the upstream took it.

No identity, cookies, CORS, consent, metrics, forwarded log, live view,
dead letters, retries or disk-space checks: what is left is the framework,
the decode, the durable write and the batched send, which any proxy that
acknowledges only what is on disk pays. ``bench/cpu.sh floor-spool`` loads
it exactly as it loads the proxy (``EVENTS=10`` for the 10-event POST):

    python bench/floor_spool.py PORT UPSTREAM_URL DATA_DIR [--sync | --row-per-request]

``--sync`` (``bench/cpu.sh floor-sync``) is the floor under sync mode
instead: the same decode, the body forwarded as it came, the answer relayed.
``--row-per-request`` (``floor-spool-rows``) spools one row per request, its
events' JSON joined, instead of one per event: the floor of a spool that
stores together what arrived together.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pybase64
import uvloop
from aiohttp import ClientSession, DummyCookieJar, TCPConnector, web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.core.codec import _unescape_base64  # noqa: E402
from proxy.services.queue.rows import NewRow  # noqa: E402
from proxy.services.queue.sqlfile import connect
from proxy.services.queue.sqlite import _transaction

BATCH = 50
WINDOW = 0.05  # seconds a partial batch waits, as delivery.batch_window_ms = 50
ACCEPTED = b'{"status":1,"error":null}'


class FloorSpool:
    def __init__(self, data_dir: Path, upstream: str, per_request: bool = False) -> None:
        # per_request: one row per request (its events' JSON joined), not per event:
        # the floor of a spool redesigned to store what arrived together together.
        self.per_request = per_request
        self.conn = connect(data_dir / "floor.db")
        self.thread = ThreadPoolExecutor(max_workers=1)
        self.upstream = upstream.rstrip("/") + "/track?verbose=1&ip=1"
        self.inserts: list[tuple[NewRow, float]] = []
        self.waiters: list[asyncio.Future[None]] = []
        self.deletes: list[int] = []
        self.flushing: asyncio.Task[None] | None = None
        self.ready: deque[tuple[int, bytes, float]] = deque()  # committed: id, event JSON, enqueued at
        self.wake = asyncio.Event()
        self.sends: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        # The bench sends one batch size per run: rows of 10 events go 5 to a batch.
        self.rows_per_batch = BATCH
        self.session = ClientSession(connector=TCPConnector(limit_per_host=32), cookie_jar=DummyCookieJar())
        self.sender = self.loop.create_task(self.send_loop())

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        raw = pybase64.b64decode(_unescape_base64(body[5:]) or b"", validate=True)
        obj = orjson.loads(raw)
        events = obj if isinstance(obj, list) else [obj]
        now = time.time()
        if self.per_request and len(events) > 1:
            self.rows_per_batch = max(1, BATCH // len(events))
        if self.per_request:
            joined = b",".join([orjson.dumps(e) for e in events])
            self.inserts.append((NewRow("track", "us", None, True, joined, b"{}"), now))
        else:
            self.inserts += [(NewRow("track", "us", None, True, orjson.dumps(e), b"{}"), now) for e in events]
        waiter = self.loop.create_future()
        self.waiters.append(waiter)
        self.schedule()
        await waiter
        return web.Response(body=ACCEPTED, content_type="application/json")

    def schedule(self) -> None:
        if self.flushing is None or self.flushing.done():
            self.flushing = self.loop.create_task(self.flush_loop())

    async def flush_loop(self) -> None:
        while self.inserts or self.deletes:
            inserts, self.inserts = self.inserts, []
            waiters, self.waiters = self.waiters, []
            deletes, self.deletes = self.deletes, []
            last = await self.loop.run_in_executor(self.thread, _transaction, self.conn, inserts, deletes, [], [])
            first = last - len(inserts) + 1
            self.ready.extend([(first + i, r.body, t) for i, (r, t) in enumerate(inserts)])
            self.wake.set()
            for w in waiters:
                w.set_result(None)

    async def send_loop(self) -> None:
        while True:
            self.wake.clear()
            while self.ready and (len(self.ready) >= self.rows_per_batch or time.time() - self.ready[0][2] >= WINDOW):
                batch = [self.ready.popleft() for _ in range(min(self.rows_per_batch, len(self.ready)))]
                task = self.loop.create_task(self.send(batch))
                self.sends.add(task)
                task.add_done_callback(self.sends.discard)
            timer = self.loop.call_later(WINDOW, self.wake.set)
            await self.wake.wait()
            timer.cancel()

    async def send(self, batch: list[tuple[int, bytes, float]]) -> None:
        payload = b"data=" + pybase64.b64encode(b"[" + b",".join(b for _, b, _ in batch) + b"]").replace(
            b"+", b"%2B"
        ).replace(b"/", b"%2F").replace(b"=", b"%3D")
        headers = {"content-type": "application/x-www-form-urlencoded"}
        async with self.session.post(self.upstream, data=payload, headers=headers) as response:
            await response.read()
            if 200 <= response.status < 300:
                self.deletes += [i for i, _, _ in batch]
                self.schedule()
            else:  # the bench's upstream always takes them; keep the rows for a look
                print(f"upstream answered {response.status}", file=sys.stderr)


class FloorForward:
    """The floor under sync mode: the same decode, then the request's body
    forwarded as it came (one ``ClientSession``, keep-alive) and the
    upstream's answer relayed."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/") + "/track?verbose=1&ip=1"

    async def start(self) -> None:
        self.session = ClientSession(connector=TCPConnector(limit_per_host=64), cookie_jar=DummyCookieJar())

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        orjson.loads(pybase64.b64decode(_unescape_base64(body[5:]) or b"", validate=True))
        headers = {"content-type": "application/x-www-form-urlencoded"}
        async with self.session.post(self.upstream, data=body, headers=headers) as response:
            answer = await response.read()
            return web.Response(status=response.status, body=answer, content_type="application/json")


async def main(port: int, upstream: str, data_dir: Path, mode: str) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    floor: FloorSpool | FloorForward = (
        FloorForward(upstream) if mode == "--sync" else FloorSpool(data_dir, upstream, per_request=mode == "--row-per-request")
    )
    await floor.start()
    app = web.Application()
    app.router.add_post("/mp/track/", floor.handle)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.install()
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else ""))
