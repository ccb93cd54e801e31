"""The request path stage by stage, timed in process (no network): what one
mixpanel-js track POST costs in each step of the proxy, in µs per request.

    python bench/stages.py [events per request, default 1]

Uses the bench's request body (``Page View`` events with 26 properties, no
cookie: a first visit) through the Mixpanel protocol module, the pure part
of the pipeline. aiohttp's HTTP work is row E of ``bench/run.py``; the whole
handler with the spool and the sender is ``bench/cpu.sh spool`` (and its
ablations ``spool-no-sqlite``, ``spool-no-sender``). Each stage runs N times;
the best of 5 rounds is shown (the least disturbed by the rest of the machine).
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson  # noqa: E402

from proxy.protocols.mixpanel import MIXPANEL  # noqa: E402

N = 5_000
QUERY = [("verbose", "1"), ("ip", "1"), ("_", "1795374436452")]
HEADERS = {
    "Host": "www.site-a.test",
    "Content-Type": "application/x-www-form-urlencoded",
    "Origin": "http://www.site-a.test",
    "User-Agent": "Mozilla/5.0 (bench)",
}


def body(events: int) -> bytes:
    out = []
    for i in range(events):
        d = str(uuid.uuid4())
        props = {"token": "bench-token", "time": time.time(), "distinct_id": "$device:" + d, "$device_id": d,
                 "$insert_id": f"abcdefgh{i:08d}", "$browser": "Chrome", "$browser_version": 120, "$os": "Linux",
                 "$current_url": "https://www.site-a.test/pricing?utm_source=bench", "$host": "www.site-a.test",
                 "$pathname": "/pricing", "$referrer": "https://www.google.com/", "$referring_domain": "www.google.com",
                 "$initial_referrer": "$direct", "$initial_referring_domain": "$direct", "$screen_height": 1080,
                 "$screen_width": 1920, "$lib_version": "2.83.0", "mp_lib": "web",
                 "$mp_api_endpoint": "api-js.mixpanel.com", "$mp_api_timestamp_ms": int(time.time() * 1000),
                 "mp_page_view_id": "x1", "mp_sent_by_lib_version": "2.83.0", "$search_engine": "google",
                 "$device": "Linux", "$had_persisted_distinct_id": False}
        out.append({"event": "Page View", "properties": props})
    raw = json.dumps(out[0] if events == 1 else out).encode()
    return ("data=" + quote(base64.b64encode(raw).decode(), safe="")).encode()


async def timed(
    name: str, fn: Callable[[], Awaitable[Any] | Any], n: int, per: int, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Best of 5 rounds of ``n`` calls; ``per`` events per call."""
    best = float("inf")
    for _ in range(5):
        started = clock()
        for _ in range(n):
            result = fn()
            if asyncio.iscoroutine(result):
                await result
        best = min(best, (clock() - started) / n)
    print(f"{name:<48} {best * 1e6 / per:8.1f} µs per event")
    return best


async def main(events: int) -> None:
    payload = body(events)
    query = QUERY
    print(f"{events} event(s) per request, {len(payload)} bytes, N={N}")

    def decode() -> Any:
        return MIXPANEL.decode("track", payload, query, HEADERS["Content-Type"], "", 10**7)

    await timed("protocol.decode (form, base64, JSON, limits)", decode, N, events)
    decoded = decode()

    def identity() -> Any:
        events_ = decoded.events
        return (MIXPANEL.runs("track", events_),
                MIXPANEL.project("track", events_))

    await timed("protocol identity fields", identity, N, events)
    mapping = {MIXPANEL.anonymous_ids("track", decoded.events)[0]: str(uuid.uuid4())}

    def rewrite_prepare() -> Any:
        fresh = decode()
        for event in fresh.events:
            MIXPANEL.rewrite("track", event, mapping)
            MIXPANEL.prepare("track", event, "203.0.113.9")
            orjson.dumps(event)

    await timed("decode + rewrite + prepare + dumps", rewrite_prepare, N, events)

    # The payload's base64 both ways, by the standard library and by pybase64
    # (what the proxy uses): the decode of every request, the encode of a batch.
    import binascii

    import pybase64

    from proxy.core.codec import _unescape_base64

    value = _unescape_base64(payload[5:])
    raw = pybase64.b64decode(value, validate=True)
    await timed("base64 decode, binascii strict mode", lambda: binascii.a2b_base64(value, strict_mode=True), N, events)
    await timed("base64 decode, pybase64 validate", lambda: pybase64.b64decode(value, validate=True), N, events)
    await timed("base64 encode, binascii", lambda: binascii.b2a_base64(raw, newline=False), N, events)
    await timed("base64 encode, pybase64", lambda: pybase64.b64encode(raw), N, events)



if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1))
