#!/usr/bin/env python3
"""A slow fake Mixpanel upstream for bench/run.py.

Answers every request with ``200 {"status":1,"error":null}`` (the shape of
Mixpanel's ``/track?verbose=1``) after a fixed delay (default 100 ms), and counts
what it received:

- ``requests``: requests answered (``/__stats`` itself is not counted),
- ``events``: events in those requests, decoded from the body or query
  (``data=<urlencoded base64 JSON>`` or ``data=<urlencoded JSON>``, a single
  object or an array; a body it cannot decode counts as 1 event and as ``undecoded``),
- ``connections``: distinct client connections seen (peer address/port pairs),
  which shows whether the caller reuses keep-alive connections.

``GET /__stats`` returns these counters as JSON.  aiohttp + uvloop (when installed),
one process; run it pinned with ``taskset``.  Stop it with SIGTERM or SIGINT.

    python bench/slow_upstream.py --port 9100 --delay-ms 100
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import signal
import urllib.parse
from typing import Any

from aiohttp import web

try:  # uvloop is optional: the delay dominates, the loop only has to keep up
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

ANSWER = b'{"status":1,"error":null}'


class Stats:
    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.requests = 0
        self.events = 0
        self.undecoded = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.peers: set[Any] = set()

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "events": self.events,
            "undecoded": self.undecoded,
            "connections": len(self.peers),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "delay_ms": round(self.delay_s * 1000, 3),
        }


def count_events(data: str | None) -> int | None:
    """Number of events in a ``data`` value (already URL-decoded), None if undecodable."""
    if not data:
        return None
    raw: bytes | str = data
    stripped = data.lstrip()
    if not stripped.startswith(("{", "[")):
        try:
            raw = base64.b64decode(data.strip().replace(" ", "+"), validate=False)
        except (binascii.Error, ValueError):
            return None
    try:
        payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(payload, list):
        return len(payload)
    if isinstance(payload, dict):
        return 1
    return None


def events_in(request: web.Request, body: bytes) -> int | None:
    data = None
    if body:
        text = body.decode("utf-8", "replace")
        stripped = text.lstrip()
        if stripped.startswith(("{", "[")):
            data = stripped
        else:
            values = urllib.parse.parse_qs(text, keep_blank_values=True).get("data")
            data = values[0] if values else None
    if data is None:
        data = request.query.get("data")
    return count_events(data)


def make_app(stats: Stats) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            peer = request.transport.get_extra_info("peername") if request.transport else None
            if peer is not None:
                stats.peers.add(peer)
            body = await request.read()
            n = events_in(request, body)
            if n is None:
                stats.undecoded += 1
                n = 1
            await asyncio.sleep(stats.delay_s)
            # Counted when answered, so a caller that reads the counters after its
            # own request completed sees that request.
            stats.requests += 1
            stats.events += n
            return web.Response(body=ANSWER, content_type="application/json")
        finally:
            stats.in_flight -= 1

    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response(stats.as_dict())

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/__stats", get_stats)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def serve(host: str, port: int, delay_s: float) -> None:
    stats = Stats(delay_s)
    runner = web.AppRunner(make_app(stats), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"slow upstream on http://{host}:{port}/ (delay {delay_s * 1000:g} ms, "
          f"loop {type(loop).__module__})", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        print(json.dumps(stats.as_dict()), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay-ms", type=float, default=100.0, help="delay before each answer (default 100)")
    a = p.parse_args()
    coro = serve(a.host, a.port, a.delay_ms / 1000)
    if uvloop is not None and hasattr(uvloop, "run"):
        uvloop.run(coro)
    else:
        asyncio.run(coro)


if __name__ == "__main__":
    main()
