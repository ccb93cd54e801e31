"""The edge: what every answer of the main listener passes through.

Each route is registered with its ``Spec`` (``Edge.add``): the name it is
counted under, the error shape of its answers (the vendor's, or ours), whether
it takes event bodies (and so is shed under load) and whether it answers CORS.
Its handler is wrapped then, once (a middleware bound to its route: no lookup
and no middleware chain per request), and the wrapper does, for every route,
what handlers used to repeat:

- ``OPTIONS`` on a CORS route: the preflight (``core.cors``), never the handler;
- shedding: past ``server.max_inflight_requests`` event requests in progress,
  503 with ``Retry-After`` at once, the body unread, so a burst above what this
  process can take costs neither memory nor a queue of seconds for everyone
  (the SDKs keep their events and resend);
- errors: a ``Refused`` a handler raises (a body too large, too slow, over the
  body budget), or an ``UpstreamError`` (the CDN's), is answered with its
  status, in the route's shape, counted;
- CORS headers for the configured origins on every answer of a CORS route;
- under a mount, a path with repeated slashes (``/mp//track/``: an ``api_host``
  ending in "/") is looked up again in aiohttp's route table without them.

Routes without a Spec (the hub's, the ops probes) pass through untouched.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

from aiohttp import web
from yarl import URL
from aiohttp.web_urldispatcher import AbstractRoute

from ..errors import Refused, Unavailable, UpstreamError
from ..lograte import Throttled
from ..protocols.base import Answer
from .http import json_error, query_pairs
from .visit import Front, answer

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ErrorShape = Callable[[int, str, bool], Answer]  # (status, message, verbose) -> the answer
Verbose = Callable[[list[tuple[str, str]]], bool]


@dataclass(frozen=True, slots=True)
class Spec:
    """What the edge knows of a route."""

    name: str  # the metrics' route label
    error: ErrorShape = json_error
    verbose: Verbose | None = None  # whether the query asks for verbose errors (the vendor's rule)
    sheds: bool = False  # an event route: 503 at once past server.max_inflight_requests
    cors: bool = True  # preflight and the configured origins' CORS headers


_SLASHES = re.compile("//+")
UNKNOWN = "unknown"  # the spec of a mount's catch-all


class Edge:
    """The edge of every route, and the table of route specs."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.specs: dict[AbstractRoute, Spec] = {}
        # Event requests in progress in this process, and how many it takes on.
        self.inflight = 0
        self.max_inflight = front.settings.server.max_inflight_requests
        self._overload = Throttled(log)

    def add(self, app: web.Application, path: str, handler: Handler, spec: Spec, method: str = "*") -> None:
        """``handler`` on ``path``, behind the edge (``wrap``)."""
        self.specs[app.router.add_route(method, path, self.wrap(handler, spec))] = spec

    def wrap(self, handler: Handler, spec: Spec) -> Handler:
        """``handler`` behind the edge, its spec bound now: a middleware made once
        per route, so a request pays neither a spec lookup nor aiohttp's
        middleware chain (``bench/inprocess.py`` counts it)."""
        front = self.front
        if spec.name == UNKNOWN:  # a mount's catch-all: first, the path without repeated slashes
            return partial(self._unknown, self.wrap_plain(handler, spec))
        if not spec.sheds:
            return self.wrap_plain(handler, spec)

        async def shedding(request: web.Request) -> web.StreamResponse:
            origin = request.headers.get("origin")
            if request.method == "OPTIONS" and spec.cors:
                return self.preflight(origin)
            if self.inflight >= self.max_inflight:
                response: web.StreamResponse = self.shed(request, spec)
            else:
                self.inflight += 1
                try:
                    response = await handler(request)
                except Refused as exc:
                    response = self.refusal(request, spec, exc)
                finally:
                    self.inflight -= 1
            if origin and spec.cors:
                response.headers.update(front.origins.headers(origin))
            return response

        return shedding

    def wrap_plain(self, handler: Handler, spec: Spec) -> Handler:
        front = self.front

        async def edged(request: web.Request) -> web.StreamResponse:
            origin = request.headers.get("origin")
            if request.method == "OPTIONS" and spec.cors:
                return self.preflight(origin)
            try:
                response = await handler(request)
            except (Refused, UpstreamError) as exc:
                response = self.refusal(request, spec, exc)
            if origin and spec.cors:
                response.headers.update(front.origins.headers(origin))
            return response

        return edged

    async def _unknown(self, not_found: Handler, request: web.Request) -> web.StreamResponse:
        """A mount's catch-all. A path with repeated slashes (an ``api_host``
        ending in "/") is looked up again in aiohttp's own table without them
        (as its ``normalize_path_middleware`` does, without the redirect an SDK's
        POST would not follow), and answered by that route, edge and all."""
        if "//" in request.path:
            url = request.rel_url
            merged = request.clone(
                rel_url=URL.build(path=_SLASHES.sub("/", url.raw_path), query_string=url.raw_query_string, encoded=True)
            )
            match = await request.app.router.resolve(merged)
            spec = self.specs.get(match.route)
            if spec is not None and spec.name != UNKNOWN and match.http_exception is None:
                match.add_app(request.app)
                match.freeze()
                merged._match_info = match  # what aiohttp's router does for the request it routes
                return await match.handler(merged)
        return await not_found(request)

    # ------------------------------------------------------------ answers

    def preflight(self, origin: str | None) -> web.Response:
        headers = self.front.origins.preflight_headers(origin)
        if headers is None:
            # No CORS headers: the browser refuses; the body helps whoever debugs it.
            return web.Response(status=403, text="origin not allowed; add it to cors.allowed_origins\n")
        return web.Response(status=204, headers=headers)

    def _verbose(self, request: web.Request, spec: Spec) -> bool:
        return spec.verbose(query_pairs(request)) if spec.verbose is not None else True

    def refusal(self, request: web.Request, spec: Spec, exc: Refused | UpstreamError) -> web.Response:
        """A request refused before its body was read whole, or an upstream a
        handler could not get an answer from (the CDN's): its status from the
        tree (``errors``), in the route's shape; an ``Unavailable`` one with
        Retry-After, the connection closed (its body is never drained)."""
        metrics = self.front.s.metrics
        if exc.status < 500:
            metrics.bad_requests.inc()
        response = answer(spec.error(exc.status, str(exc), self._verbose(request, spec)))
        if isinstance(exc, Unavailable):
            response.headers["Retry-After"] = exc.RETRY_AFTER
            response.force_close()
        metrics.request(spec.name, exc.status)
        return response

    def shed(self, request: web.Request, spec: Spec) -> web.Response:
        self.front.s.metrics.shed.inc()
        self._overload.warning(
            "shed", "overloaded: %d requests in progress (server.max_inflight_requests); answering 503", self.inflight
        )
        response = answer(spec.error(503, "overloaded; retry later", self._verbose(request, spec)))
        response.headers["Retry-After"] = Unavailable.RETRY_AFTER
        if not request.content.is_eof():
            response.force_close()  # a body still arriving is not read: never linger draining it
        self.front.s.metrics.request(spec.name, 503)
        return response
