"""Minimal HTTP/1.1 client with a keep-alive connection pool, used to forward
requests to the Mixpanel upstreams.

Why not aiohttp's ClientSession: on the forwarding hot path it costs ~180 µs
of CPU per request; this client does the same job with a plain
``asyncio.Protocol`` per connection, ``httptools.HttpResponseParser`` (llhttp)
for parsing and one Future per request, so it runs under asyncio and uvloop
alike at a fraction of that cost.

Scope: one request per connection at a time (no pipelining), bodies fully
buffered in memory on both sides, no redirects, no decompression (bodies are
passed through as received), no proxies, no cookies.

Invariants:

* A connection goes back to the pool only after a complete response was
  parsed on a connection both sides agreed to keep alive, and no byte arrived
  beyond that response.  Anything else (``Connection: close``, HTTP/1.0
  without keep-alive, a body delimited by EOF, a timeout, a parse error,
  cancellation of the caller, unsolicited bytes) closes the connection.
* Every connection, and every connection being opened, holds one of the
  ``max_connections_per_host`` slots of its pool; a slot is released exactly
  once, when the connection is marked closed or its connect attempt fails.
  Released slots and returned connections go to waiting requests in FIFO
  order before anything else.
* Idle connections are reused LIFO (the most recently used one is the most
  likely to still be open); those idle for longer than ``keepalive_expiry``
  are closed, never reused.
* A request is retried at most once, and only when a *reused* connection was
  closed or reset before a single byte of the response arrived (a keep-alive
  connection the server closed while we were sending).  The retry never
  happens once response bytes were seen or on a freshly opened connection.
* The ``timeout`` covers the whole request: waiting for a slot, connecting
  (additionally bounded by ``connect_timeout``), sending and reading the
  response.
* Every failure surfaces as an ``HTTPClientError`` subclass, except invalid
  arguments (``ValueError``) and cancellation of the calling task.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

__all__ = [
    "ConnectError",
    "Endpoint",
    "HTTPClient",
    "HTTPClientError",
    "ProtocolError",
    "RequestTimeout",
    "Response",
]


class HTTPClientError(Exception):
    """Base for all network-level failures of :class:`HTTPClient`."""


class ConnectError(HTTPClientError):
    """Could not connect (refused, DNS failure, TLS handshake failure)."""


class RequestTimeout(HTTPClientError):
    """The connect timeout or the whole-request timeout elapsed."""


class ProtocolError(HTTPClientError):
    """Malformed response, connection closed mid-response, response too large."""


class _StaleConnection(ProtocolError):
    """A reused keep-alive connection died before any response byte arrived.

    Internal: the request is retried once on a fresh connection and callers
    never see this type (it is a ProtocolError just in case)."""


_DEFAULT_PORTS = {"http": 80, "https": 443}
# Request methods whose requests always carry Content-Length, even when 0:
# servers may answer 411 Length Required otherwise.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"}
)
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# llhttp sets no limit on the header section; an upstream that never ends its
# headers must not grow our memory without bound.
_MAX_HEAD_BYTES = 256 * 1024
# How long close() lets connections finish closing before aborting them.
_CLOSE_GRACE = 1.0


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An upstream base URL, parsed once at start-up."""

    scheme: str
    host: str
    port: int
    base_path: str
    host_header: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """Parse ``http://host[:port][/base]`` or ``https://...``.

        Raises ValueError for anything else, including credentials, query
        strings and fragments (they have no meaning for a base URL)."""
        if not isinstance(url, str) or not url:
            raise ValueError(f"upstream URL must be a non-empty string, got {url!r}")
        if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
            raise ValueError(f"upstream URL {url!r} contains whitespace or control characters")
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise ValueError(
                f"upstream URL {url!r} must be an absolute http:// or https:// URL"
            )
        if not parts.netloc:
            raise ValueError(f"upstream URL {url!r} has no host")
        if parts.username is not None or parts.password is not None:
            raise ValueError(f"upstream URL {url!r} must not contain credentials")
        if parts.query or parts.fragment or url.endswith(("?", "#")):
            raise ValueError(f"upstream URL {url!r} must not contain a query or fragment")
        host = parts.hostname  # lower-cased, IPv6 brackets stripped
        if not host:
            raise ValueError(f"upstream URL {url!r} has no host")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"upstream URL {url!r} has an invalid port") from None
        if port == 0:
            raise ValueError(f"upstream URL {url!r} has an invalid port")
        if not host.isascii():
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError:
                raise ValueError(f"upstream URL {url!r} has an invalid host name") from None
        default_port = _DEFAULT_PORTS[scheme]
        if port is None:
            port = default_port
        header_host = f"[{host}]" if ":" in host else host
        host_header = header_host if port == default_port else f"{header_host}:{port}"
        base_path = parts.path.rstrip("/")
        return cls(scheme, host, port, base_path, host_header)


@dataclass(frozen=True, slots=True)
class Response:
    """A complete upstream response."""

    status: int
    # As received (order and duplicates kept), names lower-cased, decoded as
    # latin-1 so arbitrary bytes survive.  Trailers of chunked bodies are
    # not included.
    headers: list[tuple[str, str]]
    # De-chunked but not decompressed: bodies are passed through.
    body: bytes

    def header(self, name: str, default: str | None = None) -> str | None:
        """First value of header ``name`` (given lower-case), else ``default``."""
        for key, value in self.headers:
            if key == name:
                return value
        return default


def _encode_request(
    method: str,
    path: str,
    host_header: str,
    headers: Sequence[tuple[str, str]],
    body: bytes,
) -> bytes:
    """Serialise a request in one pass; validation is folded into a couple of
    whole-string scans so the common case does no per-header checks."""
    if method not in _KNOWN_METHODS and (not method or not _TCHAR.issuperset(method)):
        raise ValueError(f"invalid HTTP method {method!r}")
    parts = [f"{method} {path} HTTP/1.1\r\nHost: {host_header}\r\n"]
    append = parts.append
    for name, value in headers:
        append(f"{name}: {value}\r\n")
    # Every legitimate line break: request line, Host, one per caller header,
    # the blank line; any extra CR or LF came from the caller (injection).
    breaks = len(parts) + 2
    has_length = bool(body) or method in _BODY_METHODS
    if has_length:
        append(f"Content-Length: {len(body)}\r\n\r\n")
        breaks += 1
    else:
        append("\r\n")
    head = "".join(parts)
    if (
        head.count("\n") != breaks
        or head.count("\r") != breaks
        or " " in path
        or "\t" in path
        or not path.startswith("/")
    ):
        _raise_invalid_request(path, headers)
    # The client owns framing and connection management: a caller-supplied
    # Content-Length or Transfer-Encoding would desynchronise a pooled
    # connection shared by many users' requests.  With stray line breaks ruled
    # out, "\n<name>:" only matches at the start of a header line; Host and
    # Content-Length may appear once (ours).
    lowered = head.lower()
    if (
        lowered.count("\nhost:") != 1
        or lowered.count("\ncontent-length:") != has_length
        or "\ntransfer-encoding:" in lowered
        or "\nconnection:" in lowered
    ):
        raise ValueError(
            "headers Host, Content-Length, Transfer-Encoding and Connection are "
            "managed by HTTPClient and must not be passed"
        )
    # UTF-8 with surrogateescape: aiohttp decodes incoming header bytes that
    # way, so forwarded values round-trip byte for byte.
    encoded = head.encode("utf-8", "surrogateescape")
    return encoded + body if body else encoded


def _raise_invalid_request(path: str, headers: Sequence[tuple[str, str]]) -> None:
    if not path.startswith("/"):
        raise ValueError(f"request target must start with '/', got {path!r}")
    if any(c in path for c in " \t\r\n"):
        raise ValueError(f"request target contains whitespace, CR or LF: {path!r}")
    for name, value in headers:
        if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
            raise ValueError(f"header {name!r} contains CR or LF (header injection)")
    raise ValueError("host header contains CR or LF")


def _connection_tokens(headers: list[tuple[str, str]]) -> set[str]:
    return {
        token.strip().lower()
        for name, value in headers
        if name == "connection"
        for token in value.split(",")
    }


class _Connection(asyncio.Protocol):
    """One upstream connection; resolves one Future per request.

    The protocol only parses and reports.  Deciding whether the connection
    returns to the pool is the pool's job, based on ``_keep_alive`` and
    ``_closed`` once the Future resolved."""

    __slots__ = (
        "_pool",
        "_loop",
        "_transport",
        "_parser",
        "_parser_stale",
        "_max_body",
        "_waiter",
        "_timer",
        "_may_retry",
        "_is_head",
        "_got_bytes",
        "_headers_done",
        "_status",
        "_headers",
        "_body",
        "_body_size",
        "_head_bytes",
        "_error",
        "_keep_alive",
        "_closed",
        "_lost",
        "_lost_waiter",
        "_registered",
        "_in_idle",
        "idle_since",
        "requests",
    )

    def __init__(self, pool: _Pool, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        # llhttp cannot be told a response answers HEAD, so after a HEAD it
        # may still expect a body: such a parser is replaced before reuse.
        self._parser_stale = False
        self._max_body = pool._max_body
        self._waiter: asyncio.Future[Response] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._may_retry = False
        self._is_head = False
        self._got_bytes = False
        self._headers_done = False
        self._status = 0
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []
        self._body_size = 0
        self._head_bytes = 0
        self._error: ProtocolError | None = None
        self._keep_alive = False
        self._closed = False  # marked closed: its pool slot is released
        self._lost = False  # connection_lost() has run
        self._lost_waiter: asyncio.Future[None] | None = None
        self._registered = False  # counted in the pool (connect completed)
        self._in_idle = False
        self.idle_since = 0.0
        self.requests = 0

    # -- driving a request --------------------------------------------------

    def _send(
        self, data: bytes, is_head: bool, deadline: float, may_retry: bool
    ) -> asyncio.Future[Response]:
        waiter: asyncio.Future[Response] = self._loop.create_future()
        self.requests += 1
        transport = self._transport
        if self._closed or transport is None or transport.is_closing():
            # Already closing: nothing was sent, so this is the stale case.
            waiter.set_exception(
                _StaleConnection("keep-alive connection closed before the request was sent")
                if may_retry
                else ProtocolError("connection closed before the request was sent")
            )
            self._abort()
            return waiter
        if self._parser_stale:
            self._parser = httptools.HttpResponseParser(self)
            self._parser_stale = False
        self._waiter = waiter
        self._may_retry = may_retry
        self._is_head = is_head
        self._got_bytes = False
        self._headers_done = False
        self._status = 0
        self._head_bytes = 0
        self._error = None
        self._keep_alive = False
        self._timer = self._loop.call_at(deadline, self._on_timeout)
        transport.write(data)
        return waiter

    def _finish(self, keep_alive: bool) -> None:
        waiter = self._waiter
        self._waiter = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._keep_alive = keep_alive
        body = self._body
        response = Response(
            self._status,
            self._headers,
            body[0] if len(body) == 1 else b"".join(body),
        )
        # An idle connection must not pin the chunks of its last response.
        body.clear()
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    def _fail(self, exc: BaseException) -> None:
        waiter = self._waiter
        self._waiter = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        # Whatever state the stream is in, it can't carry another request.
        self._abort()

    def _on_timeout(self) -> None:
        self._timer = None
        self._fail(RequestTimeout("timed out waiting for the response"))

    def _abort(self) -> None:
        if self._transport is not None and not self._lost:
            self._transport.abort()
        self._mark_closed()

    def _close(self) -> None:
        if self._transport is not None and not self._lost:
            self._transport.close()
        self._mark_closed()

    def _mark_closed(self) -> None:
        if not self._closed:
            self._closed = True
            if self._registered:
                self._pool._conn_gone(self)

    def _lost_future(self) -> asyncio.Future[None] | None:
        if self._lost or self._transport is None:
            return None
        if self._lost_waiter is None:
            self._lost_waiter = self._loop.create_future()
        return self._lost_waiter

    def _eof_delimited(self) -> bool:
        """Whether the body in progress ends at EOF (RFC 9112 section 6.3),
        mirroring llhttp's rule; httptools has no way to feed it EOF."""
        if self._status in (204, 304):
            return False
        has_length = False
        for name, value in self._headers:
            if name == "transfer-encoding":
                return value.rsplit(",", 1)[-1].strip().lower() != "chunked"
            if name == "content-length":
                has_length = True
        return not has_length

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:
            # Bytes nobody asked for: the framing of this stream is unknown.
            self._abort()
            return
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolError("unexpected protocol upgrade in response"))
        except httptools.HttpParserError as exc:
            self._fail(self._error or ProtocolError(f"malformed response: {exc}"))
        else:
            if not self._headers_done and self._waiter is not None:
                self._head_bytes += len(data)
                if self._head_bytes > _MAX_HEAD_BYTES:
                    self._fail(ProtocolError("response header section too large"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        waiter = self._waiter
        if waiter is not None:
            if self._headers_done and exc is None and self._eof_delimited():
                # The clean close is the end of the body; not reusable.
                self._finish(False)
            elif not self._got_bytes:
                self._fail(
                    _StaleConnection("keep-alive connection closed before the response")
                    if self._may_retry
                    else ProtocolError("server closed the connection without a response")
                )
            else:
                reason = f": {exc}" if exc is not None else ""
                self._fail(ProtocolError(f"connection closed before the response was complete{reason}"))
        self._mark_closed()
        if self._lost_waiter is not None and not self._lost_waiter.done():
            self._lost_waiter.set_result(None)

    # -- httptools callbacks ------------------------------------------------

    def on_message_begin(self) -> None:
        if self._waiter is None:
            # A second message after the one we asked for.
            self._abort()
            return
        self._headers = []  # a new list: the previous one belongs to a Response
        self._body.clear()
        self._body_size = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._headers_done:
            return  # trailer of a chunked body: not part of the header list
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            if status == 101:
                self._error = ProtocolError("unexpected 101 Switching Protocols")
                raise self._error
            # Interim response (100 Continue, 103 Early Hints...): llhttp ends
            # it here and parses the real response next.
            return
        self._status = status
        self._headers_done = True
        if self._is_head:
            self._parser_stale = True
            self._finish(self._head_keep_alive())

    def on_body(self, chunk: bytes) -> None:
        if self._waiter is None:
            # Body bytes after a HEAD response: the stream is out of sync.
            self._abort()
            return
        size = self._body_size + len(chunk)
        if size > self._max_body:
            self._error = ProtocolError(
                f"response body larger than max_response_bytes ({self._max_body})"
            )
            raise self._error
        self._body_size = size
        self._body.append(chunk)

    def on_message_complete(self) -> None:
        if not self._headers_done or self._waiter is None:
            return  # end of an interim response, or of a HEAD answered earlier
        self._finish(self._parser.should_keep_alive())

    def _head_keep_alive(self) -> bool:
        # llhttp's should_keep_alive() would treat a length-less HEAD
        # response as EOF-delimited, so apply the persistence rule directly.
        tokens = _connection_tokens(self._headers)
        if "close" in tokens:
            return False
        if self._parser.get_http_version() == "1.0":
            return "keep-alive" in tokens
        return True


def _expire_waiter(waiter: asyncio.Future[_Connection | None]) -> None:
    if not waiter.done():
        waiter.set_exception(RequestTimeout("timed out waiting for a free connection"))


class _Pool:
    """Connections to one (scheme, host, port)."""

    __slots__ = (
        "_host",
        "_port",
        "_netloc",
        "_ssl",
        "_server_hostname",
        "_limit",
        "_expiry",
        "_max_body",
        "_connect_timeout",
        "_idle",
        "_waiters",
        "_conns",
        "_count",
        "_closed",
        "created",
        "retried",
    )

    def __init__(
        self,
        endpoint: Endpoint,
        ssl_context: ssl.SSLContext | None,
        limit: int,
        expiry: float,
        max_body: int,
        connect_timeout: float,
    ) -> None:
        self._host = endpoint.host
        self._port = endpoint.port
        self._netloc = f"{endpoint.scheme}://{endpoint.host_header}"
        self._ssl = ssl_context
        self._server_hostname = endpoint.host if ssl_context is not None else None
        self._limit = limit
        self._expiry = expiry
        self._max_body = max_body
        self._connect_timeout = connect_timeout
        self._idle: collections.deque[_Connection] = collections.deque()
        # Each waiter receives a connection, or None meaning "a slot is
        # yours, open a connection".
        self._waiters: collections.deque[asyncio.Future[_Connection | None]] = collections.deque()
        self._conns: set[_Connection] = set()
        self._count = 0  # slots in use: open connections + connects in progress
        self._closed = False
        self.created = 0
        self.retried = 0

    def _pop_idle(self, now: float) -> _Connection | None:
        idle = self._idle
        if not idle:
            return None
        # Oldest first: expiring from the left keeps LIFO reuse from leaving
        # ancient connections at the bottom of the stack forever.
        cutoff = now - self._expiry
        while idle and idle[0].idle_since <= cutoff:
            conn = idle.popleft()
            conn._in_idle = False
            conn._close()
        while idle:
            conn = idle.pop()
            conn._in_idle = False
            transport = conn._transport
            if transport is not None and not transport.is_closing():
                return conn
            conn._abort()
        return None

    async def _acquire(self, deadline: float, fresh: bool) -> _Connection:
        if self._closed:
            raise HTTPClientError("HTTPClient is closed")
        loop = asyncio.get_running_loop()
        if not fresh:
            conn = self._pop_idle(loop.time())
            if conn is not None:
                return conn
        if self._count < self._limit:
            self._count += 1
            return await self._connect(deadline)
        waiter: asyncio.Future[_Connection | None] = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_at(deadline, _expire_waiter, waiter)
        try:
            got = await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Handed a connection or slot, but we are leaving (cancelled
                # after the hand-off): pass it on instead of leaking it.
                handed = waiter.result()
                if handed is None:
                    self._slot_freed()
                else:
                    self._put_back(handed)
            else:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
            raise
        finally:
            timer.cancel()
        if got is None:
            return await self._connect(deadline)
        return got

    async def _connect(self, deadline: float) -> _Connection:
        """Open a connection; the caller already holds a slot for it."""
        loop = asyncio.get_running_loop()
        until = min(loop.time() + self._connect_timeout, deadline)
        try:
            async with asyncio.timeout_at(until):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, loop),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._server_hostname,
                )
        except TimeoutError:
            self._slot_freed()
            raise RequestTimeout(f"timed out connecting to {self._netloc}") from None
        except asyncio.CancelledError:
            self._slot_freed()
            raise
        except Exception as exc:
            self._slot_freed()
            raise ConnectError(f"cannot connect to {self._netloc}: {exc}") from exc
        if self._closed:
            conn._abort()
            self._slot_freed()
            raise HTTPClientError("HTTPClient is closed")
        if conn._closed:
            self._slot_freed()
            raise ConnectError(f"connection to {self._netloc} closed right after connecting")
        conn._registered = True
        self._conns.add(conn)
        self.created += 1
        return conn

    def _put_back(self, conn: _Connection) -> None:
        if conn._closed or not conn._keep_alive or self._closed:
            conn._close()
            return
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle_since = conn._loop.time()
        conn._in_idle = True
        self._idle.append(conn)

    def _conn_gone(self, conn: _Connection) -> None:
        self._conns.discard(conn)
        if conn._in_idle:
            conn._in_idle = False
            try:
                self._idle.remove(conn)
            except ValueError:
                pass
        self._slot_freed()

    def _slot_freed(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot changes hands
                return
        self._count -= 1

    def _shutdown(self) -> list[_Connection]:
        """Fail waiters and in-flight requests, close every connection and
        return those whose transport has not reported connection_lost yet."""
        self._closed = True
        error = HTTPClientError("HTTPClient is closed")
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)
        closing = list(self._conns)
        for conn in closing:
            if conn._waiter is not None:
                conn._fail(error)
            else:
                conn._close()
        return closing


class HTTPClient:
    """HTTP/1.1 client with one keep-alive pool per (scheme, host, port)."""

    __slots__ = (
        "_limit",
        "_connect_timeout",
        "_timeout",
        "_expiry",
        "_max_body",
        "_ssl_context",
        "_pools",
        "_closed",
        "_loop",
    )

    def __init__(
        self,
        *,
        max_connections_per_host: int = 100,
        connect_timeout: float = 5.0,
        timeout: float = 10.0,
        keepalive_expiry: float = 30.0,
        max_response_bytes: int = 16 * 1024 * 1024,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if max_connections_per_host < 1:
            raise ValueError("max_connections_per_host must be at least 1")
        if connect_timeout <= 0 or timeout <= 0:
            raise ValueError("timeouts must be positive")
        if max_response_bytes < 0:
            raise ValueError("max_response_bytes must not be negative")
        self._limit = max_connections_per_host
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        self._expiry = keepalive_expiry
        self._max_body = max_response_bytes
        self._ssl_context = ssl_context
        self._pools: dict[tuple[str, str, int], _Pool] = {}
        self._closed = False
        # The loop of the first request, kept: on Python 3.11 every
        # asyncio.get_running_loop() is a getpid() system call.
        self._loop: asyncio.AbstractEventLoop | None = None

    async def request(
        self,
        endpoint: Endpoint,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        timeout: float | None = None,
    ) -> Response:
        """Send ``method base_path+target`` to ``endpoint`` and return the
        complete response.

        ``headers`` must not include Host, Content-Length, Transfer-Encoding
        or Connection: the client sets framing itself.  Raises ValueError for
        CR/LF in headers or target, HTTPClientError subclasses otherwise."""
        if self._closed:
            raise HTTPClientError("HTTPClient is closed")
        data = _encode_request(method, endpoint.base_path + target, endpoint.host_header, headers, body)
        pool = self._pools.get((endpoint.scheme, endpoint.host, endpoint.port))
        if pool is None:
            pool = self._new_pool(endpoint)
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + (self._timeout if timeout is None else timeout)
        conn = pool._pop_idle(now)
        if conn is None:
            conn = await pool._acquire(deadline, False)
        may_retry = conn.requests > 0
        is_head = method == "HEAD"
        while True:
            waiter = conn._send(data, is_head, deadline, may_retry)
            try:
                response = await waiter
            except _StaleConnection:
                # The server closed this keep-alive connection while we were
                # sending, so nothing says the request was processed: resend
                # once on a new connection, as HTTP clients commonly do.  In
                # rare cases the server did process it (e.g. a POST) and it is
                # then processed twice; Mixpanel de-duplicates events by
                # $insert_id, which makes that harmless for tracking.
                pool.retried += 1
                conn = await pool._acquire(deadline, True)
                may_retry = False
                continue
            except BaseException:
                # Timeout, protocol error, cancellation: the connection is in
                # an unknown state and must never go back to the pool.
                conn._abort()
                raise
            pool._put_back(conn)
            return response

    def _new_pool(self, endpoint: Endpoint) -> _Pool:
        if self._closed:
            raise HTTPClientError("HTTPClient is closed")
        ssl_context: ssl.SSLContext | None = None
        if endpoint.scheme == "https":
            if self._ssl_context is None:
                # Loading the system CA store takes milliseconds: do it once,
                # and only when an https upstream is actually used.
                self._ssl_context = ssl.create_default_context()
            ssl_context = self._ssl_context
        elif endpoint.scheme != "http":
            raise ValueError(f"unsupported scheme {endpoint.scheme!r}")
        pool = _Pool(
            endpoint,
            ssl_context,
            self._limit,
            self._expiry,
            self._max_body,
            self._connect_timeout,
        )
        self._pools[(endpoint.scheme, endpoint.host, endpoint.port)] = pool
        return pool

    async def close(self) -> None:
        """Close idle and in-flight connections (in-flight requests fail with
        HTTPClientError); later requests raise HTTPClientError."""
        if self._closed:
            return
        self._closed = True
        closing: list[_Connection] = []
        for pool in self._pools.values():
            closing.extend(pool._shutdown())
        # Give graceful (TLS) closes a moment, then abort what is left so no
        # transport outlives the client.
        lost = [f for f in (conn._lost_future() for conn in closing) if f is not None]
        if lost:
            await asyncio.wait(lost, timeout=_CLOSE_GRACE)
            for conn in closing:
                conn._abort()
            await asyncio.sleep(0)

    def stats(self) -> dict[str, int]:
        """Counters for metrics and tests: open and idle connections now,
        connections created and stale-connection retries since start."""
        pools = self._pools.values()
        return {
            "open": sum(len(p._conns) for p in pools),
            "idle": sum(len(p._idle) for p in pools),
            "created": sum(p.created for p in pools),
            "retried": sum(p.retried for p in pools),
            "waiting": sum(1 for p in pools for w in p._waiters if not w.done()),
        }
