"""The HTTP/1.1 front end: sockets in, ``Request`` objects to one handler,
``Response`` objects back out.

Why not aiohttp's server: answering a bare ``1`` to the SDK's POST costs it
about 204k instructions per request (``bench/instructions.sh floor-app``)
against about 31k for the same answer on ``httptools`` (llhttp, the parser
aiohttp and uvicorn use), and the proxy's throughput target per process
leaves no room for the difference. This module is that thin layer, with the
limits a server facing browsers needs; routing lives in ``app``.

Scope: HTTP/1.0 and 1.1, keep-alive, pipelining (answered in order), chunked
and ``Content-Length`` request bodies fully buffered up to a limit,
``Expect: 100-continue``; no upgrades, no TLS (nginx or a load balancer
terminates it), no streaming responses.

Invariants:

* A connection carries at most one running handler; requests pipelined
  behind it wait in order, and reading pauses while ``MAX_PIPELINE`` wait.
* Every request gets exactly one response, unless the client went away:
  a handler error answers 500 (logged, the connection stays usable); a
  parse error, an oversized head or body answers 400/413/414/431 and closes
  the connection, since the stream position can no longer be trusted.
* Nothing is kept forever: an idle keep-alive connection closes after
  ``keepalive_timeout``; a request whose head and body take longer than
  ``request_timeout`` to arrive (a slow-loris client) is answered 408 and
  closed.
* Shutdown stops accepting, lets running handlers finish within a deadline
  (their answers carry ``Connection: close``), closes idle connections, and
  only then returns, so resources may be closed after it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote, urlsplit

import httptools
import orjson
from multidict import CIMultiDict

from .core.forms import parse_pairs

log = logging.getLogger(__name__)

MAX_URL = 8190  # as aiohttp and nginx's default large header buffer
MAX_HEAD = 32768  # URL + all header names and values
MAX_HEADERS = 128
MAX_PIPELINE = 16
SWEEP_SECONDS = 1.0

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


class Request:
    """One parsed request, body included.

    ``headers`` has lower-case names; a repeated header's values are joined
    with ``, `` (``; `` for ``Cookie``), as RFC 9110 section 5.3 allows."""

    __slots__ = ("method", "path", "raw_path", "raw_query", "headers", "body", "remote", "version", "_query")

    def __init__(
        self,
        method: str,
        target: bytes,
        headers: dict[str, str],
        body: bytes,
        remote: str | None,
        version: str = "1.1",
    ) -> None:
        self.method = method
        raw = target.decode("latin-1")
        if raw[:1] != "/" and "://" in raw:
            # absolute-form (RFC 9112 section 3.2.2), as a forward proxy sends it
            parts = urlsplit(raw)
            raw = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        path, _, self.raw_query = raw.partition("?")
        self.raw_path = path
        self.path = unquote(path) if "%" in path else path
        self.headers = headers
        self.body = body
        self.remote = remote
        self.version = version
        self._query: list[tuple[str, str]] | None = None

    @property
    def query(self) -> list[tuple[str, str]]:
        """The decoded query string, in order, blank values kept."""
        if self._query is None:
            self._query = parse_pairs(self.raw_query) if self.raw_query else []
        return self._query

    def query_get(self, name: str, default: str | None = None) -> str | None:
        for k, v in self.query:
            if k == name:
                return v
        return default

    @property
    def host(self) -> str:
        return self.headers.get("host", "")


class Response:
    """Status, headers (case-insensitive, as HTTP's are) and a complete body."""

    __slots__ = ("status", "body", "headers")

    def __init__(
        self,
        body: bytes = b"",
        *,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        content_type: str | None = None,
        text: str | None = None,
    ) -> None:
        self.status = status
        self.headers: CIMultiDict[str] = CIMultiDict(headers) if headers else CIMultiDict()
        if text is not None:
            body = text.encode()
            content_type = content_type or "text/plain"
            if "charset" not in content_type:
                content_type += "; charset=utf-8"
        self.body = body
        if content_type:
            self.headers["Content-Type"] = content_type


def json_response(obj: Any, *, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(obj), status=status, headers=headers, content_type="application/json")


Handler = Callable[[Request], Awaitable[Response]]
# (status, message, request target so far) -> the answer to a refused request
Refusal = Callable[[int, str, bytes], Response]


def plain_refusal(status: int, message: str, target: bytes) -> Response:
    return Response(status=status, text=message + "\n")


class _Date:
    """The ``Date`` header, formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode()
        return self._value


class HTTPServer:
    """Owns every connection of one listening socket (or several, with
    ``reuse_port`` across processes each has its own)."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_body: int,
        keepalive_timeout: float = 75.0,
        request_timeout: float = 60.0,
        refusal: Refusal = plain_refusal,
    ) -> None:
        self.handler = handler
        self.refusal = refusal
        self.max_body = max_body
        self.keepalive_timeout = keepalive_timeout
        self.request_timeout = request_timeout
        self.connections: set[_Connection] = set()
        self.date = _Date()
        self.closing = False
        self._servers: list[asyncio.AbstractServer] = []
        self._sweeper: asyncio.Task[None] | None = None

    async def listen(self, host: str, port: int, *, reuse_port: bool = False, backlog: int = 1024) -> int:
        """Start accepting on ``host:port``; returns the bound port (``port=0``
        picks a free one)."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _Connection(self), host, port, reuse_port=reuse_port or None, backlog=backlog
        )
        self._servers.append(server)
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep())
        sock = server.sockets[0]
        return int(sock.getsockname()[1])

    async def _sweep(self) -> None:
        # One pass a second instead of a timer per request: a deadline check is
        # a float compare, a timer is a heap push and a cancel.
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            now = loop.time()
            for conn in list(self.connections):
                conn.check_deadline(now)

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting, let running handlers finish for up to ``timeout``
        seconds, close every connection."""
        self.closing = True
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.close_if_idle()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any(c.busy for c in self.connections) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()


class _Connection(asyncio.Protocol):
    """One client connection: parses requests, runs the handler for them one
    at a time, writes the answers in order."""

    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.remote: str | None = None
        self.queue: deque[tuple[Request, bool]] = deque()
        self.task: asyncio.Task[None] | None = None
        self.reading = True
        self.writable: asyncio.Future[None] | None = None
        self.deadline = 0.0
        self.in_message = False
        self.close_after = False  # the stream can't go on: close once the running answer is out
        self._reset_message()

    # ------------------------------------------------------- connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else None
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover - not a TCP socket
                pass
        self.deadline = self.loop.time() + self.server.keepalive_timeout
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None
        self.queue.clear()
        # A running handler is not cancelled (an event being spooled finishes
        # durably); its answer is simply not written (see _serve).
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    def pause_writing(self) -> None:
        if self.writable is None or self.writable.done():
            self.writable = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    @property
    def busy(self) -> bool:
        return self.in_message or bool(self.queue) or (self.task is not None and not self.task.done())

    def close_if_idle(self) -> None:
        if not self.busy and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def check_deadline(self, now: float) -> None:
        if self.transport is None or now < self.deadline:
            return
        if self.task is not None and not self.task.done():
            return  # the handler has its own (upstream) timeouts
        if self.in_message:
            self._fail(408, "request not received in time")
        else:
            self.transport.close()  # idle keep-alive connection

    # ---------------------------------------------------------- parsing

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No upgrades here: the request itself is answered as plain HTTP
            # (RFC 9110 lets a server ignore Upgrade), then the connection closes.
            if self.in_message:
                self._fail(400, "protocol upgrades are not supported")
            else:
                self.close_after = True
        except httptools.HttpParserCallbackError as exc:
            status = getattr(exc.__context__, "status", 400)
            self._fail(status, str(exc.__context__ or exc))
        except httptools.HttpParserError as exc:
            self._fail(400, f"malformed HTTP request: {exc}")

    def _reset_message(self) -> None:
        self.url = b""
        self.head_bytes = 0
        self.header_count = 0
        self.headers: dict[str, str] = {}
        self.body_parts: list[bytes] = []
        self.body_size = 0

    def on_message_begin(self) -> None:
        self.in_message = True
        self._reset_message()
        self.deadline = self.loop.time() + self.server.request_timeout

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_URL:
            raise _Refusal(414, f"request target is longer than {MAX_URL} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value)
        self.header_count += 1
        if self.head_bytes > MAX_HEAD or self.header_count > MAX_HEADERS:
            raise _Refusal(431, f"request headers exceed {MAX_HEADERS} fields or {MAX_HEAD} bytes")
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers = self.headers
        if key in headers:
            text = headers[key] + ("; " if key == "cookie" else ", ") + text
        headers[key] = text

    def on_headers_complete(self) -> None:
        headers = self.headers
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.server.max_body:
            raise _Refusal(413, f"request body is larger than {self.server.max_body} bytes")
        if headers.get("expect", "").lower() == "100-continue" and self.transport is not None:
            # Only when nothing is owed before it: behind a pipelined request still
            # being answered, the interim answer would overtake that one's (the
            # client sends the body anyway once its own wait is over).
            if (self.task is None or self.task.done()) and not self.queue:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size > self.server.max_body:
            raise _Refusal(413, f"request body is larger than {self.server.max_body} bytes")
        self.body_parts.append(body)

    def on_message_complete(self) -> None:
        self.in_message = False
        parser = self.parser
        parts = self.body_parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        request = Request(
            parser.get_method().decode("ascii", "replace"),
            self.url,
            self.headers,
            body,
            self.remote,
            parser.get_http_version(),
        )
        self._reset_message()
        keep_alive = parser.should_keep_alive() and not self.server.closing
        if self.task is None or self.task.done():
            self.task = self.loop.create_task(self._serve(request, keep_alive))
        else:
            self.queue.append((request, keep_alive))
            if len(self.queue) >= MAX_PIPELINE and self.reading and self.transport is not None:
                self.reading = False
                self.transport.pause_reading()

    # --------------------------------------------------------- answering

    async def _serve(self, request: Request, keep_alive: bool) -> None:
        while True:
            try:
                response = await self.server.handler(request)
            except Exception:  # noqa: BLE001 - one bad request must not take the connection down
                log.exception("handler failed for %s %s", request.method, request.path)
                response = Response(status=500, text="internal error\n")
            keep_alive = keep_alive and not self.server.closing and not (self.close_after and not self.queue)
            if self.transport is None or self.transport.is_closing():
                return  # the client left, or shutdown's deadline passed: nobody to answer
            head, http10 = request.method == "HEAD", request.version == "1.0"
            try:
                self._write(response, keep_alive, head, http10)
            except ValueError:  # a header value with a line break: never let it split the response
                log.exception("refusing to send a malformed response for %s %s", request.method, request.path)
                self._write(Response(status=500, text="internal error\n"), keep_alive, head, http10)
            if not keep_alive:
                self.transport.close()
                return
            if self.writable is not None and not self.writable.done():
                await self.writable  # the client reads slower than we answer
            if not self.queue:
                self.deadline = self.loop.time() + self.server.keepalive_timeout
                return
            request, keep_alive = self.queue.popleft()
            if not self.reading and self.transport is not None:
                self.reading = True
                self.transport.resume_reading()

    def _write(self, response: Response, keep_alive: bool, head: bool = False, http10: bool = False) -> None:
        assert self.transport is not None
        status = response.status
        body = response.body
        headers = response.headers
        lines = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
        # Exactly one CR and one LF per header: one more inside a name or value
        # would start a header (or a body) of someone else's choosing.
        if lines.count("\n") != len(headers) or lines.count("\r") != len(headers):
            raise ValueError("a response header contains a line break")
        head_bytes = b"HTTP/1.1 %d %s\r\nDate: %s\r\nContent-Length: %d\r\n%s%s" % (
            status,
            _REASONS.get(status, b"Unknown"),
            self.server.date.get(),
            len(body),
            lines.encode("latin-1"),
            # HTTP/1.1 keeps the connection by default; a 1.0 client that asked
            # to keep it must be told it was kept.
            (b"Connection: keep-alive\r\n\r\n" if http10 else b"\r\n") if keep_alive else b"Connection: close\r\n\r\n",
        )
        self.transport.write(head_bytes + body if body and not head else head_bytes)

    def _fail(self, status: int, message: str) -> None:
        """Answer a request that could not be parsed, then close: after a bad
        head the next request's start cannot be found reliably."""
        self.in_message = False
        if self.transport is None:
            return
        if self.task is not None and not self.task.done():
            # Answer what was already received, in order, then close.
            self.close_after = True
            self.transport.pause_reading()
            return
        try:
            response = self.server.refusal(status, message, self.url)
        except Exception:  # noqa: BLE001 - the refusal must go out whatever the hook does
            log.exception("building the %d answer failed", status)
            response = plain_refusal(status, message, self.url)
        self._write(response, keep_alive=False)
        self.transport.close()


class _Refusal(Exception):
    """Raised from a parser callback: the request breaks a limit."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
