"""The edge: one middleware every answer of the main listener passes through.

Each route is registered with its ``Spec`` (``Edge.add``): the name it is
counted under, the error shape of its answers (the vendor's, or ours), whether
it takes event bodies (and so is shed under load) and whether it answers CORS.
The middleware then does, for every route, what handlers used to repeat:

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
    """The middleware, and the table of route specs it reads."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.specs: dict[AbstractRoute, Spec] = {}
        # Event requests in progress in this process, and how many it takes on.
        self.inflight = 0
        self.max_inflight = front.settings.server.max_inflight_requests
        self._overload = Throttled(log)

    def add(self, app: web.Application, path: str, handler: Handler, spec: Spec, method: str = "*") -> None:
        self.specs[app.router.add_route(method, path, handler)] = spec

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        spec = self.specs.get(request.match_info.route)
        if spec is None:
            return await handler(request)
        if spec.name == UNKNOWN and "//" in request.path:
            request, handler, spec = await self._without_repeated_slashes(request, handler, spec)
        origin = request.headers.get("origin")
        if request.method == "OPTIONS" and spec.cors:
            return self.preflight(origin)
        if not spec.sheds:
            try:
                response = await handler(request)
            except (Refused, UpstreamError) as exc:
                response = self.refusal(request, spec, exc)
        elif self.inflight >= self.max_inflight:
            response = self.shed(request, spec)
        else:
            self.inflight += 1
            try:
                response = await handler(request)
            except Refused as exc:
                response = self.refusal(request, spec, exc)
            finally:
                self.inflight -= 1
        if origin and spec.cors:
            response.headers.update(self.front.origins.headers(origin))
        return response

    async def _without_repeated_slashes(
        self, request: web.Request, handler: Handler, spec: Spec
    ) -> tuple[web.Request, Handler, Spec]:
        """The route of the path with its slashes merged, from aiohttp's own table
        (as its ``normalize_path_middleware`` asks it, without the redirect an
        SDK's POST would not follow)."""
        url = request.rel_url
        merged = request.clone(
            rel_url=URL.build(path=_SLASHES.sub("/", url.raw_path), query_string=url.raw_query_string, encoded=True)
        )
        match = await request.app.router.resolve(merged)
        found = self.specs.get(match.route)
        if found is None or match.http_exception is not None:
            return request, handler, spec
        match.add_app(request.app)
        match.freeze()
        merged._match_info = match  # what aiohttp's router does for the request it routes
        return merged, match.handler, found

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
