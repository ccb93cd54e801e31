"""The request path stage by stage, timed in process (no network): what one
mixpanel-js track POST costs in each step of the proxy, in µs.

    python bench/stages.py

Uses the bench's request body (one `Page View` with 26 properties, no cookie)
against the real app in sync mode with an unreachable upstream, which no
stage here calls. Each stage is run 20,000 times after a warm-up.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson  # noqa: E402

from proxy.core import codec  # noqa: E402
from proxy.web.app import create_app  # noqa: E402
from proxy.web.handlers import _prepare_event, accepted_response, project_token  # noqa: E402
from proxy.core.identity import anonymous_ids, is_anonymous  # noqa: E402
from proxy.server import HTTPServer, Request, _Connection  # noqa: E402
from proxy.settings import build_settings  # noqa: E402

N = 20_000
TARGET = b"/mp/track/?verbose=1&ip=1&_=1795374436452"
HEADERS = {
    "host": "www.site-a.test",
    "content-type": "application/x-www-form-urlencoded",
    "origin": "http://www.site-a.test",
    "user-agent": "Mozilla/5.0 (bench)",
}


def body() -> bytes:
    d = str(uuid.uuid4())
    props = {"token": "bench-token", "time": time.time(), "distinct_id": "$device:" + d, "$device_id": d,
             "$insert_id": "abcdefgh12345678", "$browser": "Chrome", "$browser_version": 120, "$os": "Linux",
             "$current_url": "https://www.site-a.test/pricing?utm_source=bench", "$host": "www.site-a.test",
             "$pathname": "/pricing", "$referrer": "https://www.google.com/", "$referring_domain": "www.google.com",
             "$initial_referrer": "$direct", "$initial_referring_domain": "$direct", "$screen_height": 1080,
             "$screen_width": 1920, "$lib_version": "2.83.0", "mp_lib": "web",
             "$mp_api_endpoint": "api-js.mixpanel.com", "$mp_api_timestamp_ms": int(time.time() * 1000),
             "mp_page_view_id": "x1", "mp_sent_by_lib_version": "2.83.0", "$search_engine": "google",
             "$device": "Linux", "$had_persisted_distinct_id": False}
    raw = json.dumps({"event": "Page View", "properties": props}).encode()
    return ("data=" + quote(base64.b64encode(raw).decode(), safe="")).encode()


def timed(name: str, fn: Callable[[], Any]) -> None:
    fn()
    start = time.perf_counter()
    for _ in range(N):
        fn()
    print(f"{name:34s} {1e6 * (time.perf_counter() - start) / N:6.2f} µs")


class _Transport:
    def write(self, data: bytes) -> None:
        pass

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else None

    def close(self) -> None:
        pass


async def main() -> None:
    data = body()
    raw = b"POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s" % (
        TARGET, b"".join(f"{k}: {v}\r\n".encode() for k, v in HEADERS.items()), len(data), data)
    with tempfile.TemporaryDirectory() as tmp:
        settings = build_settings({"server": {"data_dir": tmp}, "cookie": {"secure": False, "secret": "x" * 32},
                                   "delivery": {"mode": "sync"}, "upstream": {"us": "http://127.0.0.1:9"}}, {})
        app = create_app(settings)
        await app.start()
        proxy = app.proxy
        conn = _Connection(HTTPServer(app.handle, max_body=10**6))
        conn.connection_made(_Transport())  # type: ignore[arg-type]
        conn.task = asyncio.get_running_loop().create_future()  # parked: parsed requests queue up

        def parse() -> None:
            conn.parser.feed_data(raw)
            conn.queue.clear()

        request = Request("POST", TARGET, dict(HEADERS), data, "127.0.0.1")
        timed("parse (httptools + Request)", parse)
        timed("query string", lambda: Request("POST", TARGET, {}, b"", None).query)
        timed("visit (browser, cookie)", lambda: proxy._visit(request))
        decode = lambda: codec.decode(body=data, query=request.query, content_type=HEADERS["content-type"],  # noqa: E731
                                      content_encoding="", limit=10**6)
        timed("decode (form, base64, JSON)", decode)
        events = decode().events
        timed("anonymous ids, project", lambda: (anonymous_ids("track", events), is_anonymous("track", events),
                                                 project_token("track", events)))
        visit = proxy._visit(request)

        async def resolve(n: int) -> None:
            for _ in range(n):
                await proxy._resolve(visit, "track", anonymous_ids("track", events), [], None, True, "bench-token")

        await resolve(100)
        start = time.perf_counter()
        await resolve(N)
        print(f"{'identity (first-visit traffic)':34s} {1e6 * (time.perf_counter() - start) / N:6.2f} µs")
        resolution = await proxy._resolve(visit, "track", anonymous_ids("track", events), [], None, True, "bench-token")

        def prepare() -> None:
            name, insert_id, _token, _when = _prepare_event("track", events[0], "127.0.0.1")
            meta = {"c": resolution.canonical, "s": resolution.source, "n": name, "i": insert_id, "r": []}
            orjson.dumps(events[0]), orjson.dumps(meta)

        timed("spool row (prepare, two dumps)", prepare)
        timed("answer (+ cookie, CORS headers)", lambda: proxy._finish(accepted_response(True), visit, resolution, "track"))
        answer = proxy._finish(accepted_response(True), visit, resolution, "track")
        timed("write the answer (no syscall)", lambda: conn._write(answer, True))
        await app.stop()


if __name__ == "__main__":
    import uvloop

    uvloop.install()
    asyncio.run(main())
