"""The HTTP front end as ``firstparty serve`` runs it (aiohttp's server with
our limits, ``proxy.web.serve``), on raw sockets: framing, smuggling, limits,
the Host rule, timeouts, shutdown, and a log that stays quiet under a flood
of malformed requests."""

from __future__ import annotations

import asyncio
import logging
import random
import resource
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import orjson
import pytest

from proxy.web.app import create_app
from tests.conftest import BROWSER, TOKEN, device_id, js_event, b64_body, make_settings
from tests.fakeupstream import FakeUpstream

TRACK = "/mp/track/?verbose=1&ip=1"


@pytest.fixture
async def front(serve_proxy: Any, tmp_path: Any, upstream: FakeUpstream) -> Callable[..., Awaitable[Any]]:
    async def start(**sections: Any) -> Any:
        sections.setdefault("cors", {"allowed_origins": ["https://www.example.com"]})
        sections.setdefault("identity", {"linked_domains": [".example.com", ".brand-b.test"]})
        return await serve_proxy(create_app(make_settings(tmp_path, upstream, **sections)))

    return start


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), value.strip())
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 5)
    return status, headers, body


async def exchange(port: int, raw: bytes, responses: int = 1) -> list[tuple[int, dict[str, str], bytes]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        return [await read_response(reader) for _ in range(responses)]
    finally:
        writer.close()


def request(method: str, target: str, *headers: str, body: bytes = b"", host: str | None = "www.example.com") -> bytes:
    lines = [f"{method} {target} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += headers
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def track_body() -> bytes:
    return b64_body([js_event("Viewed", device_id())]).encode()


async def test_pipelined_requests_are_answered_in_order(front):
    client = await front()
    raw = request("GET", "/healthz") + request("GET", "/mp/id", "Origin: https://www.example.com") + request("GET", "/healthz")
    answers = await exchange(client.port, raw, responses=3)
    assert [s for s, _, _ in answers] == [200, 200, 200]
    assert "pid" in orjson.loads(answers[0][2]) and "id" in orjson.loads(answers[1][2])


async def test_chunked_body_is_assembled_and_its_trailer_never_sets_the_client_ip(front, upstream):
    """A trailer is not a header: ``X-Forwarded-For`` sent after a chunked body,
    even by a trusted peer (127.0.0.1 is one by default), names no visitor."""
    client = await front()
    body = track_body()
    half = len(body) // 2
    raw = (
        f"POST {TRACK} HTTP/1.1\r\nHost: www.example.com\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        "User-Agent: Mozilla/5.0 (a browser: its IP is the visitor's)\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    raw += b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\nX-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n\r\n" % (
        half, body[:half], len(body) - half, body[half:]
    )
    [(status, _, answer)] = await exchange(client.port, raw)
    assert status == 200 and orjson.loads(answer) == {"status": 1, "error": None}
    [event] = await upstream.wait(1)
    [forwarded] = upstream.by("us", "/track")
    seen = {event["properties"].get("ip"), forwarded.headers.get("x-real-ip"), forwarded.headers.get("x-forwarded-for")}
    assert "6.6.6.6" not in " ".join(str(v) for v in seen)
    assert seen & {"127.0.0.1"}  # the peer itself, in one of the places the spool or sync mode puts it


async def test_oversized_body_is_refused_with_mixpanels_error(front, upstream):
    client = await front(server={"max_body_bytes": 2048})
    raw = request("POST", TRACK, "Content-Type: application/x-www-form-urlencoded", body=b"data=" + b"a" * 3000)
    [(status, headers, body)] = await exchange(client.port, raw)
    assert status == 413 and orjson.loads(body)["status"] == 0 and "2048" in orjson.loads(body)["error"]
    assert upstream.requests == []


async def test_an_endless_header_line_is_cut_off_early_with_memory_bounded(front):
    """8 MiB of one header line without its end: answered 400 after aiohttp's
    8 KB line limit, the connection closed, the process's memory unchanged."""
    client = await front()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    sent = 0
    chunk = b"a" * 65536
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Long: ")
        while sent < 8 * 1024 * 1024:
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), 5)
            sent += len(chunk)
    except (ConnectionResetError, BrokenPipeError):
        pass
    try:
        head = await asyncio.wait_for(reader.read(200), 5)
    except ConnectionResetError:
        head = b""
    writer.close()
    # Refused (400, then closed; or reset while we were still sending) long before 8 MiB.
    assert sent < 8 * 1024 * 1024 or head.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400"))
    assert head == b"" or head.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400"))
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kb < 4 * 1024, f"the server grew {grown_kb} kB holding a header it should have refused"


@pytest.mark.parametrize(
    "head",
    [
        # Both framings: a front end and this server could disagree on where the body ends.
        b"POST /mp/track HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /mp/track HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n",
        b"POST /mp/track HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked, identity\r\n\r\n",
        b"POST /mp/track HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n",
        b"GET /mp/id HTTP/1.1\r\nHost: t\r\nBad Header: v\r\n\r\n",
    ],
    ids=["cl-and-te", "two-lengths", "te-not-last-chunked", "negative-length", "space-in-name"],
)
async def test_ambiguous_framing_is_refused_not_guessed(front, upstream, head):
    client = await front()
    [(status, _, _)] = await exchange(client.port, head + b"0\r\n\r\nGET /mp/id?smuggled=1 HTTP/1.1\r\nHost: t\r\n\r\n")
    assert status == 400
    metrics = await (await client.ops_get("/metrics")).text()
    assert 'route="id"' not in metrics  # nothing smuggled behind the refused request reached a handler
    assert upstream.requests == []


@pytest.mark.parametrize(
    "raw",
    [
        request("GET", "/mp/id", host=None),
        request("GET", "/mp/id", "Host: other.example.com"),
        request("POST", TRACK, host=None, body=track_body()),
    ],
    ids=["id-no-host", "id-two-hosts", "track-no-host"],
)
async def test_http11_needs_exactly_one_host(front, upstream, raw):
    client = await front()
    [(status, headers, _)] = await exchange(client.port, raw)
    assert status == 400 and "set-cookie" not in headers
    assert upstream.requests == []


async def test_go_to_a_url_outside_latin1_answers_a_percent_encoded_location(front):
    client = await front()
    target = "https://www.example.com/caf\u00e9/\u20ac?q=\u00fc#fr\u00e4g"
    raw = request("GET", "/mp/go?to=" + quote(target, safe=""), "User-Agent: Mozilla/5.0")
    [(status, headers, _)] = await exchange(client.port, raw)
    assert status == 302
    location = headers["location"]
    assert location.isascii()
    assert location.startswith("https://www.example.com/caf%C3%A9/%E2%82%AC?fpb=")
    assert "q=%C3%BC" in location and location.endswith("#fr%C3%A4g")


async def test_idle_keep_alive_closes_after_the_configured_time(front):
    client = await front(server={"keepalive_timeout_seconds": 1})
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(request("GET", "/healthz"))
    assert (await read_response(reader))[0] == 200
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server once idle
    assert time.monotonic() - started >= 0.9
    writer.close()


async def test_a_body_slower_than_the_request_timeout_is_answered_408(front, upstream):
    client = await front(server={"request_timeout_seconds": 1})
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(b"POST " + TRACK.encode() + b" HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\ndata=")
    status, _, body = await read_response(reader)
    writer.close()
    assert status == 408 and orjson.loads(body)["status"] == 0
    assert upstream.requests == []


async def test_shutdown_lets_a_running_request_finish(serve_proxy, tmp_path, upstream):
    """Sync mode, a slow vendor: stopping the server while the request waits
    still answers it (with the vendor's answer), and refuses new connections."""

    async def slow(_recorded: Any) -> None:
        await asyncio.sleep(0.5)
        return None

    upstream.behave = slow
    client = await serve_proxy(create_app(make_settings(tmp_path, upstream, delivery={"mode": "sync"})))
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(request("POST", TRACK, "Content-Type: application/x-www-form-urlencoded", body=track_body()))
    await upstream.wait_for_requests(1)
    stopping = asyncio.ensure_future(client.serving.stop())
    status, _, body = await read_response(reader)
    assert status == 200 and orjson.loads(body) == {"status": 1, "error": None}
    await stopping
    client.serving = None
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", client.port)
    writer.close()


def _fuzz_cases(rng: random.Random, n: int) -> list[bytes]:
    heads = [b"GET", b"POST", b"G\x00T", b"\x16\x03\x01\x02\x00", b"PRI * HTTP/2.0", b"OPTIONS", b"BREW"]
    out = []
    for _ in range(n):
        parts = [rng.choice(heads), b" ", rng.choice([b"/mp/track/", b"/mp/go?to=%", b"*", b"/" + bytes(rng.randrange(1, 255) for _ in range(8))])]
        parts.append(rng.choice([b" HTTP/1.1", b" HTTP/9.9", b"", b" HTTP/1.1 extra"]))
        parts.append(rng.choice([b"\r\n", b"\n", b"\r\r\n"]))
        for _ in range(rng.randrange(0, 4)):
            parts.append(rng.choice([b"Host: t\r\n", b"Content-Length: 5\r\n", b"Content-Length: x\r\n", b": v\r\n",
                                     b"Transfer-Encoding: chunked\r\n", b"X\x7f: 1\r\n", b"Host\r\n"]))
        parts.append(b"\r\n")
        parts.append(rng.choice([b"", b"zz\r\n", b"0\r\n\r\n", b"hello"]))
        out.append(b"".join(parts))
    return out


async def test_a_fuzz_run_of_malformed_requests_leaves_the_server_answering_and_the_log_quiet(front, upstream, caplog):
    """300 malformed requests, generated from a fixed seed, each on its own
    connection: none is forwarded, the server still answers, and the log holds
    at most one line about them, without a traceback."""
    client = await front()
    caplog.set_level(logging.DEBUG)
    rng = random.Random(20261201)

    async def one(raw: bytes) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        try:
            writer.write(raw)
            await asyncio.wait_for(reader.read(4096), 5)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    cases = _fuzz_cases(rng, 300)
    for start in range(0, len(cases), 30):
        await asyncio.gather(*(one(raw) for raw in cases[start : start + 30]))
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert [r.path for r in upstream.requests] == []
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith(("aiohttp", "firstparty"))]
    assert len(noisy) <= 1, [r.getMessage() for r in noisy]
    assert all(r.exc_info is None for r in caplog.records if r.name.startswith(("aiohttp", "firstparty.http")))


async def test_a_client_that_sent_a_good_request_is_answered_after_a_flood(front, upstream):
    client = await front()
    for raw in _fuzz_cases(random.Random(7), 50):
        try:
            await exchange(client.port, raw)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass
    resp = await client.post(TRACK, data=track_body(), headers={**BROWSER, "Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status == 200
    [event] = await upstream.wait(1)
    assert event["properties"]["token"] == TOKEN
