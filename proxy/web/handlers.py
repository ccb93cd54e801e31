"""The handlers: aiohttp requests in, the pipeline's answers out.

A handler reads what only the web layer can (the body, within its limits;
the visit, through ``web.visit``), hands an ``Exchange`` to the pipeline
(``pipeline.EVENTS`` for the routes that carry events, ``pipeline.QUERIES``
for record, flags, settings and decide) and renders what came back. The
routes themselves are in ``web.app``; under a mount, one catch-all finds the
route for spellings the plain resources do not take (``/mp//track/``, an
alias, a query route, the library script).

Invariants: bad input is answered 400/413/408 in the protocol's error shape
and nothing is forwarded; past ``server.max_inflight_requests`` an event
request is answered 503 at once, its body unread (``_shed``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from urllib.parse import quote

from aiohttp import web

from ..errors import PayloadTooLarge, Refused, Unavailable
from ..lograte import Throttled
from ..pipeline import EVENTS, QUERIES, run
from ..protocols.base import WireProtocol
from ..protocols.mixpanel import EVENT_ROUTES, MIXPANEL, QUERY_ROUTES
from ..protocols.segment import SEGMENT
from .cdn import LIB_PATHS, FirstPartyCdn
from .crossdomain import CrossDomain
from .http import query_pairs, read_body
from .visit import Front, answer

log = logging.getLogger(__name__)

# /record bodies above this are streamed to the upstream instead of read whole.
STREAM_BODY_BYTES = 64 * 1024

Handler = Callable[[web.Request], Awaitable[web.Response]]


class Proxy:
    """The handlers. Routes are registered when the app is built; the services
    they use are opened at start-up and handed over with ``Front.bind``."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.settings = front.settings
        self.aliases = dict(front.settings.server.route_aliases)
        # Event requests in progress in this process, and how many it takes on (``_shed``).
        self.inflight = 0
        self.max_inflight = front.settings.server.max_inflight_requests
        self._overload = Throttled(log)
        self.cross = CrossDomain(front)
        self.cdn = FirstPartyCdn(front)

    def event_route(self, name: str, path: str, protocol: WireProtocol = MIXPANEL) -> Handler:
        """The handler of one plain event path (``/mp/track/``, ``/seg/v1/t``),
        bound once: what ``mp`` would work out from the path, done at start-up."""

        async def handle(request: web.Request) -> web.Response:
            if request.method == "OPTIONS":
                return self.preflight(request)
            if self.inflight >= self.max_inflight:
                return self._shed(request, name, protocol)
            self.inflight += 1
            try:
                return await self.events(request, name, path, protocol)
            finally:
                self.inflight -= 1

        return handle

    async def events(self, request: web.Request, route: str, path: str, protocol: WireProtocol = MIXPANEL) -> web.Response:
        """Routes whose payloads carry events, whatever the protocol (``pipeline.EVENTS``)."""
        front = self.front
        x = front.exchange(request, protocol, route, path)
        if request.method not in ("GET", "POST"):
            return front.finish(answer(protocol.error(405, f"{request.method} is not supported here", True)), x.visit, None)
        try:
            x.body = await read_body(request, self.settings.server)
        except Refused as exc:
            return front.refusal(exc, x.visit, x.verbose, route, protocol)
        await run(EVENTS, x, front.c)
        return front.render(x)

    async def query_route(self, request: web.Request, route: str, path: str) -> web.Response:
        """record / flags / settings / decide (``pipeline.QUERIES``): a large
        replay chunk goes upstream as it arrives, never held whole."""
        front = self.front
        x = front.exchange(request, MIXPANEL, route, path)
        length = request.content_length
        limit = self.settings.server.max_body_bytes
        try:
            if route == "record" and length is not None and length > STREAM_BODY_BYTES:
                if length > limit:
                    raise PayloadTooLarge(f"body is larger than {limit} bytes")
                x.body, x.length = request.content, length
            else:
                x.body = await read_body(request, self.settings.server)
        except Refused as exc:
            return front.refusal(exc, x.visit, x.verbose, route, MIXPANEL)
        await run(QUERIES, x, front.c)
        return front.render(x)

    def _shed(self, request: web.Request, route: str, protocol: WireProtocol) -> web.Response:
        """Past ``server.max_inflight_requests``: 503 at once, body unread, so a
        burst above what this process can handle costs neither memory nor a
        queue of seconds for everyone; the SDKs keep their events and resend."""
        front = self.front
        front.s.metrics.shed.inc()
        self._overload.warning(
            "shed", "overloaded: %d requests in progress (server.max_inflight_requests); answering 503", self.inflight
        )
        response = answer(protocol.error(503, "overloaded; retry later", protocol.verbose(query_pairs(request))))
        response.headers["Retry-After"] = Unavailable.RETRY_AFTER
        if not request.content.is_eof():
            response.force_close()  # a body still arriving is not read: never linger draining it
        front.s.metrics.request(route, 503)
        if request.headers.get("origin"):
            response.headers.update(front.origins.headers(request.headers["origin"]))
        return response

    # ------------------------------------------------------------ routing

    def mount(self, prefix: str) -> Handler:
        """Everything under one mount (``/mp/``) the plain resources did not take."""
        skip = len(prefix)

        async def handle(request: web.Request) -> web.Response:
            return await self.mp(request, request.path[skip:])

        return handle

    async def mp(self, request: web.Request, tail: str) -> web.Response:
        parts = [p for p in tail.split("/") if p]
        trailing = "/" if tail.endswith("/") else ""
        if request.method == "OPTIONS":
            return self.preflight(request)
        if len(parts) == 1:
            name = self.aliases.get(parts[0], parts[0])
            if name in EVENT_ROUTES:
                return await self.events(request, name, f"/{name}{trailing}")
            if name in QUERY_ROUTES:
                return await self.query_route(request, name, f"/{name}{trailing}")
            if name in LIB_PATHS:
                return await self.cdn.mixpanel_lib(request, name)
        if len(parts) == 3 and self.aliases.get(parts[0], parts[0]) == "flags" and parts[2] == "first-time-events":
            # The flag's id came decoded from the path: it goes upstream as one quoted
            # segment (no "?", "/" or space of its own), and never as "." or "..".
            flag = parts[1]
            if flag in (".", "..") or len(flag) > 256:
                return answer(MIXPANEL.error(400, "not a valid flag id", MIXPANEL.verbose(query_pairs(request))))
            path = f"/flags/{quote(flag, safe='')}/first-time-events{trailing}"
            return await self.query_route(request, "flags-first-time", path)
        return self._not_found(request)

    def decide_mount(self, prefix: str) -> Handler:
        """``/mp-decide/decide``: the legacy decide endpoint on its own host."""
        skip = len(prefix)

        async def handle(request: web.Request) -> web.Response:
            if request.method == "OPTIONS":
                return self.preflight(request)
            tail = request.path[skip:]
            if [p for p in tail.split("/") if p] == ["decide"]:
                return await self.query_route(request, "decide", "/decide" + ("/" if tail.endswith("/") else ""))
            return self._not_found(request)

        return handle

    def _not_found(self, request: web.Request) -> web.Response:
        verbose = MIXPANEL.verbose(query_pairs(request))
        return answer(MIXPANEL.error(404, f"unknown endpoint {request.path}", verbose))

    def preflight(self, request: web.Request) -> web.Response:
        headers = self.front.origins.preflight_headers(request.headers.get("origin"))
        if headers is None:
            # No CORS headers: the browser refuses; the body helps whoever debugs it.
            return web.Response(status=403, text="origin not allowed; add it to cors.allowed_origins\n")
        return web.Response(status=204, headers=headers)

    async def bridge(self, request: web.Request) -> web.Response:
        if request.method == "OPTIONS":
            return self.preflight(request)
        return await self.cross.bridge(request)

    async def sdk_metrics(self, request: web.Request) -> web.Response:
        """analytics.js's own telemetry (``/v1/m``: load errors, retries, sampled):
        about the SDK, not the visitor, and of use only to Segment. Answered
        here, counted, never forwarded."""
        if request.method == "OPTIONS":
            return self.preflight(request)
        self.front.s.metrics.request("sdk-metrics", 200)
        response = answer(SEGMENT.accepted(True))
        if request.headers.get("origin"):
            response.headers.update(self.front.origins.headers(request.headers["origin"]))
        return response
