"""Tests for proxy.httpclient against real servers on 127.0.0.1.

aiohttp.web serves the ordinary shapes; a tiny asyncio.start_server "raw"
server produces what aiohttp can't (trailers, EOF-delimited bodies,
malformed responses, dropped or hanging connections).  Every async test runs
under the default asyncio loop (pytest-asyncio auto mode) and again under
uvloop via test_under_uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import socket
import ssl
import struct
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.httpclient import (
    ConnectError,
    Endpoint,
    HTTPClient,
    HTTPClientError,
    ProtocolError,
    RequestTimeout,
    Response,
)
from tests.support import free_port, self_signed

TEST_BUDGET = 10.0  # seconds; no single test may take longer


def bounded(fn: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Fail instead of hanging if something never completes."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> None:
        async with asyncio.timeout(TEST_BUDGET):
            await fn(*args, **kwargs)

    return wrapper


async def eventually(cond: Callable[[], bool], within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def make_client(**kwargs: Any) -> AsyncIterator[HTTPClient]:
    kwargs.setdefault("timeout", 3.0)
    kwargs.setdefault("connect_timeout", 2.0)
    client = HTTPClient(**kwargs)
    try:
        yield client
    finally:
        await client.close()


# ---------------------------------------------------------------- aiohttp app


class AppState:
    def __init__(self) -> None:
        self.peers: list[int] = []  # client port of every request
        self.inflight = 0
        self.max_inflight = 0
        self.order: list[str] = []


def build_app(state: AppState) -> web.Application:
    async def track(request: web.Request) -> None:
        state.peers.append(request.transport.get_extra_info("peername")[1])

    async def echo(request: web.Request) -> web.Response:
        await track(request)
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "path": request.raw_path,
                "headers": [[k, v] for k, v in request.headers.items()],
                "body": body.hex(),
            },
            headers={"X-Reply": "yes"},
        )

    async def slow(request: web.Request) -> web.Response:
        await track(request)
        state.order.append(request.query.get("n", ""))
        state.inflight += 1
        state.max_inflight = max(state.max_inflight, state.inflight)
        try:
            await asyncio.sleep(float(request.query.get("delay", "0.1")))
        finally:
            state.inflight -= 1
        return web.Response(text="slow")

    async def chunked(request: web.Request) -> web.StreamResponse:
        await track(request)
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for part in (b"first,", b"second,", b"third"):
            await resp.write(part)
            await asyncio.sleep(0.01)
        await resp.write_eof()
        return resp

    async def close(request: web.Request) -> web.Response:
        await track(request)
        resp = web.Response(text="bye")
        resp.force_close()
        return resp

    async def size(request: web.Request) -> web.Response:
        await track(request)
        return web.Response(body=b"x" * int(request.match_info["n"]))

    async def status(request: web.Request) -> web.Response:
        await track(request)
        return web.Response(status=int(request.match_info["code"]))

    async def cookies(request: web.Request) -> web.Response:
        await track(request)
        resp = web.Response(text="c")
        resp.headers.add("Set-Cookie", "a=1")
        resp.headers.add("Set-Cookie", "b=2")
        return resp

    app = web.Application()
    app.router.add_route("*", "/prefix/echo", echo)
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/slow", slow)
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/close", close)
    app.router.add_get("/size/{n}", size)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/cookies", cookies)
    return app


@contextlib.asynccontextmanager
async def app_server(
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[tuple[int, AppState]]:
    state = AppState()
    runner = web.AppRunner(build_app(state), access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    try:
        yield runner.addresses[0][1], state
    finally:
        await runner.cleanup()


# ----------------------------------------------------------------- raw server

RawHandler = Callable[["RawServer", int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """asyncio.start_server wrapper counting connections and requests."""

    def __init__(self, handler: RawHandler) -> None:
        self._handler = handler
        self.connections = 0
        self.requests: list[bytes] = []  # raw bytes of every request read
        self.client_closed = asyncio.Event()  # a handler saw EOF from the client
        self.got_request = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = 0

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint.parse(f"http://127.0.0.1:{self.port}")

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        index = self.connections
        self.connections += 1
        try:
            await self._handler(self, index, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """One request (head + Content-Length body), or None at EOF."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            self.client_closed.set()
            return None
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        raw = head + (await reader.readexactly(length) if length else b"")
        self.requests.append(raw)
        self.got_request.set()
        return raw

    async def wait_for_eof(self, reader: asyncio.StreamReader) -> None:
        await reader.read()  # everything until EOF
        self.client_closed.set()


def canned(*responses: bytes) -> RawHandler:
    """Answer the n-th request on a connection with responses[n]; then keep
    serving the last one."""

    async def handler(srv: RawServer, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        while await srv.read_request(reader) is not None:
            writer.write(responses[min(n, len(responses) - 1)])
            await writer.drain()
            n += 1

    return handler


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"




# ------------------------------------------------------------------ TLS certs


@functools.cache
def tls_files() -> tuple[str, str]:
    """Self-signed certificate for 127.0.0.1/localhost: (cert path, key path)."""
    cert, key = self_signed(Path(tempfile.mkdtemp(prefix="httpclient-test-")), "localhost", "127.0.0.1")
    return str(cert), str(key)


def server_tls_context() -> ssl.SSLContext:
    cert, key = tls_files()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


def client_tls_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=tls_files()[0])


# ====================================================================== tests


@bounded
async def test_get_and_post_round_trip() -> None:
    async with app_server() as (port, state), make_client() as client:
        endpoint = Endpoint.parse(f"http://127.0.0.1:{port}/prefix/")
        resp = await client.request(
            endpoint, "GET", "/echo?a=1&b=%20x", headers=[("X-Custom", "value 1"), ("Accept", "*/*")]
        )
        assert resp.status == 200
        assert resp.header("x-reply") == "yes"
        assert resp.header("content-type") == "application/json; charset=utf-8"
        assert resp.header("x-missing") is None
        assert resp.header("x-missing", "dflt") == "dflt"
        assert all(name == name.lower() for name, _ in resp.headers)
        got = json.loads(resp.body)
        assert got["method"] == "GET"
        assert got["path"] == "/prefix/echo?a=1&b=%20x"
        headers = dict(got["headers"])
        assert headers["Host"] == f"127.0.0.1:{port}"
        assert headers["X-Custom"] == "value 1"
        assert "Content-Length" not in headers
        assert got["body"] == ""

        payload = bytes(range(256)) * 300  # every byte value, spans several reads
        resp = await client.request(
            endpoint, "POST", "/echo", headers=[("Content-Type", "application/octet-stream")], body=payload
        )
        got = json.loads(resp.body)
        assert got["method"] == "POST"
        assert got["path"] == "/prefix/echo"
        assert dict(got["headers"])["Content-Length"] == str(len(payload))
        assert bytes.fromhex(got["body"]) == payload

        for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
            resp = await client.request(endpoint, method, "/echo", body=b"x" if method != "DELETE" else b"")
            assert json.loads(resp.body)["method"] == method
        assert client.stats()["created"] == 1


@bounded
async def test_exact_request_bytes() -> None:
    async with RawServer(canned(OK)) as srv, make_client() as client:
        endpoint = Endpoint.parse(f"http://127.0.0.1:{srv.port}/base")
        await client.request(
            endpoint, "POST", "/track/?ip=1&verbose=1", [("X-A", "1"), ("User-Agent", "ua/1.0")], b"hello"
        )
        await client.request(endpoint, "GET", "/decide?x=1", [("Accept", "*/*")])
        await client.request(endpoint, "POST", "/engage/")
        assert srv.requests == [
            b"POST /base/track/?ip=1&verbose=1 HTTP/1.1\r\n"
            b"Host: 127.0.0.1:%d\r\nX-A: 1\r\nUser-Agent: ua/1.0\r\nContent-Length: 5\r\n\r\nhello" % srv.port,
            b"GET /base/decide?x=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAccept: */*\r\n\r\n" % srv.port,
            b"POST /base/engage/ HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 0\r\n\r\n" % srv.port,
        ]
        assert srv.connections == 1


@bounded
async def test_keepalive_reuses_one_connection() -> None:
    async with app_server() as (port, state), make_client() as client:
        endpoint = Endpoint.parse(f"http://127.0.0.1:{port}")
        for i in range(20):
            resp = await client.request(endpoint, "POST", "/echo", body=b"%d" % i)
            assert bytes.fromhex(json.loads(resp.body)["body"]) == b"%d" % i
        assert len(state.peers) == 20
        assert len(set(state.peers)) == 1
        stats = client.stats()
        assert stats["created"] == 1
        assert stats["open"] == 1
        assert stats["idle"] == 1


@bounded
async def test_concurrency_limit_per_host() -> None:
    async with app_server() as (port, state), make_client(max_connections_per_host=2) as client:
        endpoint = Endpoint.parse(f"http://127.0.0.1:{port}")
        started = time.monotonic()
        results = await asyncio.gather(
            *(client.request(endpoint, "GET", "/slow?delay=0.1") for _ in range(10))
        )
        elapsed = time.monotonic() - started
        assert [r.status for r in results] == [200] * 10
        assert all(r.body == b"slow" for r in results)
        assert state.max_inflight == 2
        assert len(set(state.peers)) == 2
        assert client.stats()["created"] == 2
        assert client.stats()["waiting"] == 0
        # 10 requests over 2 connections take ~5 rounds of 0.1 s.
        assert elapsed >= 0.45


@bounded
async def test_waiting_requests_are_served_fifo() -> None:
    async with app_server() as (port, state), make_client(max_connections_per_host=1) as client:
        endpoint = Endpoint.parse(f"http://127.0.0.1:{port}")
        tasks = []
        for n in range(6):
            tasks.append(asyncio.create_task(client.request(endpoint, "GET", f"/slow?delay=0.02&n={n}")))
            await asyncio.sleep(0)  # queue them in a known order
        await asyncio.gather(*tasks)
        assert state.order == [str(n) for n in range(6)]
        assert client.stats()["created"] == 1


@bounded
async def test_chunked_response() -> None:
    async with app_server() as (port, state), make_client() as client:
        endpoint = Endpoint.parse(f"http://127.0.0.1:{port}")
        resp = await client.request(endpoint, "GET", "/chunked")
        assert resp.status == 200
        assert resp.header("transfer-encoding") == "chunked"
        assert resp.body == b"first,second,third"
        await client.request(endpoint, "GET", "/chunked")
        assert client.stats()["created"] == 1


@bounded
async def test_chunked_with_trailers_and_extensions() -> None:
    response = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Checksum: abc\r\n\r\n"
    )
    async with RawServer(canned(response)) as srv, make_client() as client:
        for _ in range(3):
            resp = await client.request(srv.endpoint, "GET", "/")
            assert resp.body == b"hello world"
            assert resp.header("trailer") == "X-Checksum"
            assert resp.header("x-checksum") is None  # trailers are not headers
        assert srv.connections == 1


@bounded
async def test_close_delimited_response() -> None:
    async def handler(srv: RawServer, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil ")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"the end")
        await writer.drain()
        writer.close()

    async with RawServer(handler) as srv, make_client() as client:
        resp = await client.request(srv.endpoint, "GET", "/")
        assert resp.status == 200
        assert resp.body == b"until the end"
        assert client.stats()["open"] == 0
        resp = await client.request(srv.endpoint, "GET", "/")
        assert resp.body == b"until the end"
        assert srv.connections == 2
        assert client.stats()["created"] == 2


@bounded
async def test_connection_close_is_not_reused() -> None:
    async with app_server() as (port, state), make_client() as client:
        endpoint = Endpoint.parse(f"http://127.0.0.1:{port}")
        for _ in range(3):
            resp = await client.request(endpoint, "GET", "/close")
            assert resp.body == b"bye"
            assert resp.header("connection") == "close"
        assert len(set(state.peers)) == 3
        assert client.stats()["created"] == 3
        assert client.stats()["open"] == 0


@bounded
async def test_http10_keepalive_rules() -> None:
    plain = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with RawServer(canned(plain)) as srv, make_client() as client:
        for _ in range(2):
            assert (await client.request(srv.endpoint, "GET", "/")).body == b"ok"
        assert srv.connections == 2  # HTTP/1.0 without keep-alive: closed

    keep = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"
    async with RawServer(canned(keep)) as srv, make_client() as client:
        for _ in range(2):
            assert (await client.request(srv.endpoint, "GET", "/")).body == b"ok"
        assert srv.connections == 1


@bounded
async def test_bodyless_responses_keep_connection_in_sync() -> None:
    async with app_server() as (port, state), make_client() as client:
        endpoint = Endpoint.parse(f"http://127.0.0.1:{port}")
        for code in (204, 304):
            resp = await client.request(endpoint, "GET", f"/status/{code}")
            assert resp.status == code
            assert resp.body == b""
        resp = await client.request(endpoint, "HEAD", "/size/1234")
        assert resp.status == 200
        assert resp.header("content-length") == "1234"
        assert resp.body == b""
        # The next response on the same connection must parse correctly.
        resp = await client.request(endpoint, "GET", "/size/5")
        assert resp.body == b"xxxxx"
        resp = await client.request(endpoint, "HEAD", "/size/10")
        assert resp.body == b""
        resp = await client.request(endpoint, "GET", "/size/3")
        assert resp.body == b"xxx"
        assert len(set(state.peers)) == 1
        assert client.stats()["created"] == 1


@bounded
async def test_head_with_chunked_headers_and_no_length() -> None:
    head_chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    head_nolength = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n"

    async def handler(srv: RawServer, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (raw := await srv.read_request(reader)) is not None:
            if raw.startswith(b"HEAD /chunked"):
                writer.write(head_chunked)
            elif raw.startswith(b"HEAD"):
                writer.write(head_nolength)
            else:
                writer.write(OK)

    async with RawServer(handler) as srv, make_client() as client:
        for target in ("/chunked", "/nolength"):
            resp = await client.request(srv.endpoint, "HEAD", target)
            assert (resp.status, resp.body) == (200, b"")
            assert (await client.request(srv.endpoint, "GET", "/")).body == b"ok"
        assert srv.connections == 1


@bounded
async def test_interim_100_continue_is_skipped() -> None:
    response = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\nX-Final: 1\r\n\r\ndone"
    )
    async with RawServer(canned(response, OK)) as srv, make_client() as client:
        resp = await client.request(srv.endpoint, "POST", "/", body=b"data")
        assert resp.status == 201
        assert resp.body == b"done"
        assert resp.header("x-final") == "1"
        assert resp.header("link") is None
        assert (await client.request(srv.endpoint, "GET", "/")).body == b"ok"
        assert srv.connections == 1


@bounded
async def test_duplicate_headers_are_kept_in_order() -> None:
    async with app_server() as (port, state), make_client() as client:
        resp = await client.request(Endpoint.parse(f"http://127.0.0.1:{port}"), "GET", "/cookies")
        assert [v for k, v in resp.headers if k == "set-cookie"] == ["a=1", "b=2"]
        assert resp.header("set-cookie") == "a=1"


@pytest.mark.parametrize("how", ["fin", "rst"])
@bounded
async def test_stale_keepalive_connection_is_retried_once(how: str) -> None:
    async def handler(srv: RawServer, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if index == 0:
            # Serve one request, then drop the connection when the next one
            # arrives, as a server closing an idle connection would.
            await srv.read_request(reader)
            writer.write(OK)
            await writer.drain()
            await srv.read_request(reader)
            if how == "rst":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            return
        await canned(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")(srv, index, reader, writer)

    async with RawServer(handler) as srv, make_client() as client:
        assert (await client.request(srv.endpoint, "POST", "/track", body=b"e1")).body == b"ok"
        resp = await client.request(srv.endpoint, "POST", "/track", body=b"e2")
        assert resp.body == b"fresh"
        stats = client.stats()
        assert stats["retried"] == 1
        assert stats["created"] == 2
        # The server did receive the retried request twice: the documented
        # (and for Mixpanel harmless) cost of retrying.
        assert [r.endswith(b"e2") for r in srv.requests] == [False, True, True]
        assert srv.connections == 2


@bounded
async def test_fresh_connection_closed_without_response_is_not_retried() -> None:
    async def handler(srv: RawServer, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)  # and close without answering

    async with RawServer(handler) as srv, make_client() as client:
        with pytest.raises(ProtocolError):
            await client.request(srv.endpoint, "POST", "/", body=b"x")
        assert srv.connections == 1
        assert len(srv.requests) == 1
        assert client.stats()["retried"] == 0


@pytest.mark.parametrize(
    "partial",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nContent-Len",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
    ],
    ids=["body", "headers", "chunk"],
)
@bounded
async def test_server_dying_mid_response_is_not_retried(partial: bytes) -> None:
    async def handler(srv: RawServer, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        writer.write(OK)
        await srv.read_request(reader)
        writer.write(partial)
        await writer.drain()
        # then close: the handler returns

    async with RawServer(handler) as srv, make_client() as client:
        assert (await client.request(srv.endpoint, "GET", "/")).body == b"ok"
        with pytest.raises(ProtocolError) as info:
            await client.request(srv.endpoint, "GET", "/")
        assert "closed" in str(info.value)
        await asyncio.sleep(0.05)  # a retry, if any, would have connected by now
        assert srv.connections == 1
        assert len(srv.requests) == 2
        assert client.stats()["retried"] == 0
        assert client.stats()["open"] == 0


@bounded
async def test_idle_connection_closed_by_server_is_dropped() -> None:
    async def handler(srv: RawServer, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        writer.write(OK)
        await writer.drain()
        await asyncio.sleep(0.02)
        # close the idle keep-alive connection

    async with RawServer(handler) as srv, make_client() as client:
        await client.request(srv.endpoint, "GET", "/")
        assert client.stats()["idle"] == 1
        await eventually(lambda: client.stats()["open"] == 0)
        assert client.stats()["idle"] == 0
        assert (await client.request(srv.endpoint, "GET", "/")).body == b"ok"
        assert client.stats()["retried"] == 0
        assert client.stats()["created"] == 2


@bounded
async def test_idle_connections_expire() -> None:
    async with RawServer(canned(OK)) as srv, make_client(keepalive_expiry=0.05) as client:
        await client.request(srv.endpoint, "GET", "/")
        await client.request(srv.endpoint, "GET", "/")
        assert srv.connections == 1
        await asyncio.sleep(0.1)
        await client.request(srv.endpoint, "GET", "/")
        assert srv.connections == 2
        stats = client.stats()
        assert (stats["created"], stats["open"], stats["idle"]) == (2, 1, 1)


@bounded
async def test_unsolicited_bytes_close_idle_connection() -> None:
    async def handler(srv: RawServer, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await srv.read_request(reader) is not None:
            writer.write(OK)
            await asyncio.sleep(0.02)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra")

    async with RawServer(handler) as srv, make_client() as client:
        assert (await client.request(srv.endpoint, "GET", "/")).body == b"ok"
        await eventually(lambda: client.stats()["open"] == 0)
        assert (await client.request(srv.endpoint, "GET", "/")).body == b"ok"
        assert srv.connections == 2


@bounded
async def test_connect_refused() -> None:
    async with make_client() as client:
        endpoint = Endpoint.parse(f"http://127.0.0.1:{free_port()}")
        with pytest.raises(ConnectError):
            await client.request(endpoint, "GET", "/")
        assert client.stats()["open"] == 0
        # The failed attempt must not hold a slot.
        with pytest.raises(ConnectError):
            await client.request(endpoint, "GET", "/", timeout=0.5)


@bounded
async def test_unresolvable_host_is_connect_error() -> None:
    async with make_client() as client:
        with pytest.raises(ConnectError):
            await client.request(Endpoint.parse("http://does-not-exist.invalid"), "GET", "/")


@bounded
async def test_hanging_server_times_out_and_connection_is_dropped() -> None:
    async def handler(srv: RawServer, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if index == 0:
            await srv.read_request(reader)
            writer.write(OK)
            await srv.read_request(reader)
            await srv.wait_for_eof(reader)  # never answer
            return
        await canned(OK)(srv, index, reader, writer)

    async with RawServer(handler) as srv, make_client(timeout=5.0) as client:
        await client.request(srv.endpoint, "GET", "/")
        started = time.monotonic()
        with pytest.raises(RequestTimeout):
            await client.request(srv.endpoint, "GET", "/", timeout=0.2)
        elapsed = time.monotonic() - started
        assert 0.15 <= elapsed < 1.0
        assert client.stats()["open"] == 0
        await asyncio.wait_for(srv.client_closed.wait(), 2.0)  # server saw the close
        assert (await client.request(srv.endpoint, "GET", "/")).body == b"ok"
        assert srv.connections == 2
        assert client.stats()["retried"] == 0


@bounded
async def test_client_default_timeout_applies() -> None:
    async def handler(srv: RawServer, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        await srv.wait_for_eof(reader)

    async with RawServer(handler) as srv, make_client(timeout=0.2) as client:
        started = time.monotonic()
        with pytest.raises(RequestTimeout):
            await client.request(srv.endpoint, "GET", "/")
        assert time.monotonic() - started < 1.0


@bounded
async def test_slow_tls_handshake_hits_connect_timeout() -> None:
    async def handler(srv: RawServer, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.wait_for_eof(reader)  # accept TCP, never speak TLS

    async with RawServer(handler) as srv, make_client(connect_timeout=0.2, timeout=5.0) as client:
        endpoint = Endpoint.parse(f"https://127.0.0.1:{srv.port}")
        started = time.monotonic()
        with pytest.raises(RequestTimeout):
            await client.request(endpoint, "GET", "/")
        assert time.monotonic() - started < 1.5
        assert client.stats()["open"] == 0
        await asyncio.wait_for(srv.client_closed.wait(), 2.0)


@bounded
async def test_waiting_for_a_connection_counts_against_timeout() -> None:
    async def handler(srv: RawServer, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await srv.read_request(reader) is not None:
            await asyncio.sleep(0.5)
            writer.write(OK)

    async with RawServer(handler) as srv, make_client(max_connections_per_host=1) as client:
        first = asyncio.create_task(client.request(srv.endpoint, "GET", "/"))
        await srv.got_request.wait()
        started = time.monotonic()
        with pytest.raises(RequestTimeout):
            await client.request(srv.endpoint, "GET", "/", timeout=0.1)
        assert time.monotonic() - started < 0.4
        assert client.stats()["waiting"] == 0
        assert (await first).body == b"ok"
        assert (await client.request(srv.endpoint, "GET", "/")).body == b"ok"
        assert srv.connections == 1


@bounded
async def test_max_response_bytes() -> None:
    async with app_server() as (port, state), make_client(max_response_bytes=1000) as client:
        endpoint = Endpoint.parse(f"http://127.0.0.1:{port}")
        assert len((await client.request(endpoint, "GET", "/size/1000")).body) == 1000
        with pytest.raises(ProtocolError, match="max_response_bytes"):
            await client.request(endpoint, "GET", "/size/1001")
        assert client.stats()["open"] == 0
        with pytest.raises(ProtocolError, match="max_response_bytes"):
            await client.request(endpoint, "GET", "/size/1000000")

    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"100\r\n" + b"y" * 256 + b"\r\n"
    async with RawServer(canned(chunked * 1)) as srv, make_client(max_response_bytes=200) as client:
        with pytest.raises(ProtocolError, match="max_response_bytes"):
            await client.request(srv.endpoint, "GET", "/")

    endless_headers = b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"z" * 300_000
    async with RawServer(canned(endless_headers)) as srv, make_client() as client:
        with pytest.raises(ProtocolError, match="too large"):
            await client.request(srv.endpoint, "GET", "/")


@bounded
async def test_large_body_round_trip() -> None:
    async with app_server() as (port, state), make_client() as client:
        resp = await client.request(Endpoint.parse(f"http://127.0.0.1:{port}"), "GET", "/size/3000000")
        assert resp.body == b"x" * 3_000_000


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n",
        b"hello world\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    ],
    ids=["status", "garbage", "length", "chunk-size", "upgrade"],
)
@bounded
async def test_malformed_response_is_protocol_error(response: bytes) -> None:
    async with RawServer(canned(response)) as srv, make_client() as client:
        with pytest.raises(ProtocolError):
            await client.request(srv.endpoint, "GET", "/")
        assert client.stats()["open"] == 0
        assert client.stats()["retried"] == 0


@bounded
async def test_invalid_requests_raise_value_error_before_connecting() -> None:
    async with RawServer(canned(OK)) as srv, make_client() as client:
        endpoint = srv.endpoint
        bad_calls: list[dict[str, Any]] = [
            {"headers": [("X-A", "v\r\nX-Injected: 1")]},
            {"headers": [("X-A", "v\nX-Injected: 1")]},
            {"headers": [("X-A", "v\r")]},
            {"headers": [("X-A\r\nX-Injected", "1")]},
            {"target": "/a\r\nX-Injected: 1"},
            {"target": "/a b"},
            {"target": "/a\tb"},
            {"target": "a"},
            {"method": "GE T"},
            {"method": ""},
            {"headers": [("Host", "evil.example")]},
            {"headers": [("content-length", "3")], "body": b"abc"},
            {"headers": [("Transfer-Encoding", "chunked")]},
            {"headers": [("Connection", "close")]},
        ]
        for call in bad_calls:
            with pytest.raises(ValueError):
                await client.request(
                    endpoint,
                    call.get("method", "GET"),
                    call.get("target", "/"),
                    headers=call.get("headers", ()),
                    body=call.get("body", b""),
                )
        assert client.stats()["created"] == 0
        assert srv.requests == []
        # Lookalike names are fine.
        await client.request(endpoint, "GET", "/", headers=[("X-Host", "a"), ("X-Connection", "b")])


@bounded
async def test_cancellation_closes_in_flight_connection() -> None:
    async def handler(srv: RawServer, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if index == 0:
            await srv.read_request(reader)
            writer.write(OK)
            await srv.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\npart")  # never finished
            await srv.wait_for_eof(reader)
            return
        await canned(OK)(srv, index, reader, writer)

    async with RawServer(handler) as srv, make_client(timeout=5.0) as client:
        await client.request(srv.endpoint, "GET", "/")
        srv.got_request.clear()
        task = asyncio.create_task(client.request(srv.endpoint, "GET", "/"))
        await eventually(lambda: len(srv.requests) == 2)
        await asyncio.sleep(0.02)  # let the partial response arrive
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert client.stats()["open"] == 0
        assert client.stats()["idle"] == 0
        await asyncio.wait_for(srv.client_closed.wait(), 2.0)
        assert (await client.request(srv.endpoint, "GET", "/")).body == b"ok"
        assert srv.connections == 2


@bounded
async def test_cancellation_while_queued_does_not_leak_slots() -> None:
    release = asyncio.Event()

    async def handler(srv: RawServer, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await srv.read_request(reader) is not None:
            await release.wait()
            writer.write(OK)

    async with RawServer(handler) as srv, make_client(max_connections_per_host=1) as client:
        busy = asyncio.create_task(client.request(srv.endpoint, "GET", "/"))
        await srv.got_request.wait()
        queued = [asyncio.create_task(client.request(srv.endpoint, "GET", "/")) for _ in range(3)]
        await eventually(lambda: client.stats()["waiting"] == 3)
        for task in queued:
            task.cancel()
        await asyncio.gather(*queued, return_exceptions=True)
        assert client.stats()["waiting"] == 0
        release.set()
        assert (await busy).body == b"ok"
        for _ in range(3):
            assert (await client.request(srv.endpoint, "GET", "/", timeout=1.0)).body == b"ok"
        assert srv.connections == 1
        assert len(srv.requests) == 4


@bounded
async def test_cancellation_right_after_slot_handoff_does_not_leak() -> None:
    async def handler(srv: RawServer, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if index == 0:
            await srv.read_request(reader)
            await srv.wait_for_eof(reader)
            return
        await canned(OK)(srv, index, reader, writer)

    async with RawServer(handler) as srv, make_client(max_connections_per_host=1) as client:
        holder = asyncio.create_task(client.request(srv.endpoint, "GET", "/"))
        await srv.got_request.wait()
        queued = asyncio.create_task(client.request(srv.endpoint, "GET", "/"))
        await eventually(lambda: client.stats()["waiting"] == 1)
        # Cancelling the holder frees its slot and hands it to the queued
        # request; the queued request is then cancelled before it runs, so it
        # must hand the slot on rather than drop it.
        holder.cancel()
        asyncio.get_running_loop().call_soon(queued.cancel)
        results = await asyncio.gather(holder, queued, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        assert (await client.request(srv.endpoint, "GET", "/", timeout=1.0)).body == b"ok"
        assert client.stats()["waiting"] == 0


@bounded
async def test_cancellation_during_connect_releases_slot() -> None:
    async def handler(srv: RawServer, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.wait_for_eof(reader)  # TLS handshake never completes

    async with RawServer(handler) as srv, make_client(max_connections_per_host=1, connect_timeout=5.0) as client:
        endpoint = Endpoint.parse(f"https://127.0.0.1:{srv.port}")
        task = asyncio.create_task(client.request(endpoint, "GET", "/"))
        await eventually(lambda: srv.connections == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(srv.client_closed.wait(), 2.0)
        # With one slot per host, a leaked slot would make this wait, not fail fast.
        with pytest.raises(RequestTimeout, match="connecting"):
            await client.request(endpoint, "GET", "/", timeout=0.2)
        assert srv.connections == 2


@bounded
async def test_close_fails_in_flight_and_later_requests() -> None:
    async def handler(srv: RawServer, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if index == 0:
            await canned(OK)(srv, index, reader, writer)
            return
        await srv.read_request(reader)
        await srv.wait_for_eof(reader)

    async with RawServer(handler) as srv:
        client = HTTPClient(timeout=5.0)
        await client.request(srv.endpoint, "GET", "/")  # one idle connection
        hanging = asyncio.create_task(
            client.request(Endpoint.parse(f"http://localhost:{srv.port}"), "GET", "/")
        )
        await eventually(lambda: len(srv.requests) == 2)
        await client.close()
        with pytest.raises(HTTPClientError):
            await hanging
        stats = client.stats()
        assert (stats["open"], stats["idle"]) == (0, 0)
        with pytest.raises(HTTPClientError):
            await client.request(srv.endpoint, "GET", "/")
        await client.close()  # idempotent


@bounded
async def test_https_round_trip_with_self_signed_cert() -> None:
    async with app_server(ssl_context=server_tls_context()) as (port, state):
        async with make_client(ssl_context=client_tls_context()) as client:
            for host in ("127.0.0.1", "localhost"):
                endpoint = Endpoint.parse(f"https://{host}:{port}/prefix")
                for i in range(3):
                    resp = await client.request(endpoint, "POST", "/echo", body=b"secret %d" % i)
                    got = json.loads(resp.body)
                    assert bytes.fromhex(got["body"]) == b"secret %d" % i
                    assert dict(got["headers"])["Host"] == f"{host}:{port}"
            assert client.stats()["created"] == 2  # one per host name

        # The system trust store does not know our certificate.
        async with make_client() as client:
            with pytest.raises(ConnectError, match="certificate"):
                await client.request(Endpoint.parse(f"https://127.0.0.1:{port}"), "GET", "/echo")
            assert client.stats()["open"] == 0


@bounded
async def test_https_pool_is_separate_from_http() -> None:
    # Same host and port but different scheme: must never share connections.
    async with app_server() as (port, state), make_client(connect_timeout=0.5) as client:
        await client.request(Endpoint.parse(f"http://127.0.0.1:{port}"), "GET", "/echo")
        with pytest.raises(ConnectError):
            await client.request(Endpoint.parse(f"https://127.0.0.1:{port}"), "GET", "/echo")
        assert client.stats()["created"] == 1


def test_endpoint_parse_good_urls() -> None:
    cases = {
        "https://api-eu.mixpanel.com": ("https", "api-eu.mixpanel.com", 443, "", "api-eu.mixpanel.com"),
        "https://api.mixpanel.com/": ("https", "api.mixpanel.com", 443, "", "api.mixpanel.com"),
        "http://127.0.0.1:9000/prefix": ("http", "127.0.0.1", 9000, "/prefix", "127.0.0.1:9000"),
        "http://127.0.0.1:9000/prefix/": ("http", "127.0.0.1", 9000, "/prefix", "127.0.0.1:9000"),
        "http://example.com:80/a/b": ("http", "example.com", 80, "/a/b", "example.com"),
        "https://example.com:443": ("https", "example.com", 443, "", "example.com"),
        "https://example.com:8443": ("https", "example.com", 8443, "", "example.com:8443"),
        "HTTPS://API.Mixpanel.COM": ("https", "api.mixpanel.com", 443, "", "api.mixpanel.com"),
        "http://[::1]:8080/x": ("http", "::1", 8080, "/x", "[::1]:8080"),
        "http://[::1]": ("http", "::1", 80, "", "[::1]"),
    }
    for url, expected in cases.items():
        ep = Endpoint.parse(url)
        assert (ep.scheme, ep.host, ep.port, ep.base_path, ep.host_header) == expected, url


@pytest.mark.parametrize(
    "url",
    [
        "",
        "api.mixpanel.com",
        "//api.mixpanel.com",
        "/track",
        "ftp://api.mixpanel.com",
        "ws://api.mixpanel.com",
        "http://",
        "https:///path",
        "http://host:99999",
        "http://host:abc",
        "http://host:0",
        "https://user:pw@api.mixpanel.com",
        "http://host/path?q=1",
        "http://host/path#frag",
        "http://ho st",
        "http://host/a\r\nb",
    ],
)
def test_endpoint_parse_rejects(url: str) -> None:
    with pytest.raises(ValueError):
        Endpoint.parse(url)


def test_response_header_lookup() -> None:
    resp = Response(200, [("content-type", "a"), ("x-dup", "1"), ("x-dup", "2")], b"")
    assert resp.header("content-type") == "a"
    assert resp.header("x-dup") == "1"
    assert resp.header("nope") is None
    assert resp.header("nope", "d") == "d"


def test_constructor_validates_arguments() -> None:
    with pytest.raises(ValueError):
        HTTPClient(max_connections_per_host=0)
    with pytest.raises(ValueError):
        HTTPClient(timeout=0)


# ------------------------------------------------------------ uvloop re-run

ASYNC_CASES: dict[str, Callable[[], Awaitable[None]]] = {
    "round_trip": test_get_and_post_round_trip,
    "exact_bytes": test_exact_request_bytes,
    "keepalive": test_keepalive_reuses_one_connection,
    "concurrency": test_concurrency_limit_per_host,
    "fifo": test_waiting_requests_are_served_fifo,
    "chunked": test_chunked_response,
    "trailers": test_chunked_with_trailers_and_extensions,
    "close_delimited": test_close_delimited_response,
    "connection_close": test_connection_close_is_not_reused,
    "http10": test_http10_keepalive_rules,
    "bodyless": test_bodyless_responses_keep_connection_in_sync,
    "head_raw": test_head_with_chunked_headers_and_no_length,
    "interim": test_interim_100_continue_is_skipped,
    "stale_fin": functools.partial(test_stale_keepalive_connection_is_retried_once, "fin"),
    "stale_rst": functools.partial(test_stale_keepalive_connection_is_retried_once, "rst"),
    "fresh_no_retry": test_fresh_connection_closed_without_response_is_not_retried,
    "mid_response": functools.partial(
        test_server_dying_mid_response_is_not_retried,
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc",
    ),
    "idle_dropped": test_idle_connection_closed_by_server_is_dropped,
    "expiry": test_idle_connections_expire,
    "unsolicited": test_unsolicited_bytes_close_idle_connection,
    "refused": test_connect_refused,
    "hang": test_hanging_server_times_out_and_connection_is_dropped,
    "tls_connect_timeout": test_slow_tls_handshake_hits_connect_timeout,
    "queue_timeout": test_waiting_for_a_connection_counts_against_timeout,
    "max_bytes": test_max_response_bytes,
    "large_body": test_large_body_round_trip,
    "malformed": functools.partial(
        test_malformed_response_is_protocol_error, b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n"
    ),
    "invalid": test_invalid_requests_raise_value_error_before_connecting,
    "cancel_in_flight": test_cancellation_closes_in_flight_connection,
    "cancel_queued": test_cancellation_while_queued_does_not_leak_slots,
    "cancel_handoff": test_cancellation_right_after_slot_handoff_does_not_leak,
    "cancel_connect": test_cancellation_during_connect_releases_slot,
    "close": test_close_fails_in_flight_and_later_requests,
    "https": test_https_round_trip_with_self_signed_cert,
}


@pytest.mark.parametrize("case", list(ASYNC_CASES), ids=list(ASYNC_CASES))
def test_under_uvloop(case: str) -> None:
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert "uvloop" in type(runner.get_loop()).__module__
        runner.run(ASYNC_CASES[case]())
