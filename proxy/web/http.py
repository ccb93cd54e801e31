"""Small helpers over aiohttp's request and response, shared by the handlers.

The query string is parsed with ``core.forms.parse_pairs`` (ordered pairs,
blank values kept, mixpanel-js's base64 unescaped cheaply) rather than
aiohttp's ``request.query``, which builds a MultiDict through yarl's
unquoter on every first access.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from ..core.forms import parse_pairs
from ..protocols.base import Answer
from ..errors import Overloaded, PayloadTooLarge, RequestTimeout
from ..settings import ServerSettings

QUERY_KEY = web.RequestKey("fp_query", list)


def query_pairs(request: web.Request) -> list[tuple[str, str]]:
    """The decoded query string, in order, blank values kept (parsed once per request)."""
    try:
        return request[QUERY_KEY]
    except KeyError:
        raw = request.rel_url.raw_query_string
        pairs = request[QUERY_KEY] = parse_pairs(raw) if raw else []
        return pairs


def query_get(request: web.Request, name: str, default: str | None = None) -> str | None:
    for k, v in query_pairs(request):
        if k == name:
            return v
    return default


def raw_query(request: web.Request) -> str:
    return request.rel_url.raw_query_string


def request_host(host: str | None) -> str:
    """The Host header without its port ("[::1]:8000" -> "[::1]")."""
    if not host:
        return ""
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.split(":", 1)[0].lower()


def json_response(obj: Any, *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, headers=headers, content_type="application/json")


def json_error(status: int, message: str, verbose: bool = True) -> Answer:
    """Our own endpoints' error shape (``/mp/go``, ``/mp/bridge``, ``/mp/id``)."""
    return Answer(status, orjson.dumps({"status": 0, "error": message}), "application/json")


def text_error(status: int, message: str, verbose: bool = True) -> Answer:
    """The first-party CDN's error shape: one line of text."""
    return Answer(status, f"{message}\n".encode(), "text/plain")


def text_response(text: str, *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(text=text, status=status, headers=headers, content_type="text/plain")


class BodyBudget:
    """The bytes of request bodies still arriving, across all connections,
    bounded: past ``limit`` a new slow body is refused (503) instead of being
    buffered. (Bodies that arrived whole with their head cost nothing here;
    aiohttp itself stops reading a connection whose handler is not reading.)"""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


BODY_BUDGET = web.AppKey("body_budget", BodyBudget)


async def read_body(request: web.Request, server: ServerSettings) -> bytes:
    """The whole body, within ``server.max_body_bytes`` (aiohttp's
    ``client_max_size``), ``server.request_timeout_seconds`` and, for a body
    still on its way, the app's ``BodyBudget``."""
    if not request.body_exists:
        return b""
    try:
        if request.content.is_eof():
            # The common case, an SDK's small POST: it has all arrived with the
            # head. Taken from the buffer as it is (one chunk: no copy), not
            # through ``read()``'s loop, bytearray and copy, or a timer.
            body = request.content.read_nowait()
            if len(body) > server.max_body_bytes:
                raise PayloadTooLarge(f"body is larger than {server.max_body_bytes} bytes")
            return body
        budget = request.app.get(BODY_BUDGET)
        claim = min(request.content_length or server.max_body_bytes, server.max_body_bytes)
        if budget is not None and not budget.take(claim):
            raise Overloaded(
                f"too many request bodies arriving at once (server.max_inflight_body_bytes = {budget.limit}); retry later"
            )
        try:
            async with asyncio.timeout(server.request_timeout_seconds):
                return await request.read()
        finally:
            if budget is not None:
                budget.give(claim)
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLarge(f"body is larger than {server.max_body_bytes} bytes") from exc
    except TimeoutError as exc:
        raise RequestTimeout(f"the body did not arrive within {server.request_timeout_seconds:g} s") from exc
