"""The handlers: aiohttp requests in, the pipeline's answers out.

A handler reads what only the web layer can (the body, within its limits;
the visit, through ``web.visit``), hands an ``Exchange`` to the pipeline
(``pipeline.EVENTS`` for the routes that carry events, ``pipeline.QUERIES``
for record, flags, settings and decide) and renders what came back. Each is
bound to its route when the route table is built (``web.app``); what every
route shares (preflight, shedding, a refused body's answer, CORS) is the
edge's (``web.edge``).

Invariants: bad input is answered 400/413/408 in the protocol's error shape
and nothing is forwarded.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import quote

from aiohttp import web

from ..errors import BadRequest, PayloadTooLarge
from ..pipeline import EVENTS, QUERIES, run
from ..protocols.base import WireProtocol
from ..protocols.mixpanel import MIXPANEL
from ..protocols.segment import SEGMENT
from .cdn import FirstPartyCdn
from .crossdomain import CrossDomain
from .http import query_pairs, read_body
from .visit import Front, answer

# /record bodies above this are streamed to the upstream instead of read whole.
STREAM_BODY_BYTES = 64 * 1024

Handler = Callable[[web.Request], Awaitable[web.Response]]


class Proxy:
    """The handlers: the SDK routes' (made once per route by ``web.app``), the
    cross-domain endpoints' (``cross``) and the first-party CDN's (``cdn``). The
    services they use are opened at start-up and handed over with ``Front.bind``."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.settings = front.settings
        self.cross = CrossDomain(front)
        self.cdn = FirstPartyCdn(front)

    def events(self, route: str, path: str, protocol: WireProtocol = MIXPANEL) -> Handler:
        """A route whose payloads carry events (``pipeline.EVENTS``), whatever the
        protocol: ``path`` is the upstream's, for a synchronous forward."""
        front, server = self.front, self.settings.server

        async def handle(request: web.Request) -> web.Response:
            x = front.exchange(request, protocol, route, path)
            if request.method not in ("GET", "POST"):
                return front.finish(answer(protocol.error(405, f"{request.method} is not supported here", True)), x.visit, None)
            x.body = await read_body(request, server)
            await run(EVENTS, x, front.c)
            return front.render(x)

        return handle

    def queries(self, route: str, path: str | None = None) -> Handler:
        """record / flags / settings / decide (``pipeline.QUERIES``): a large
        replay chunk goes upstream as it arrives, never held whole. With no
        ``path``, the route is ``/flags/<id>/first-time-events``."""
        front, server = self.front, self.settings.server
        limit = server.max_body_bytes

        async def handle(request: web.Request) -> web.Response:
            upstream_path = path if path is not None else _first_time_events(request)
            x = front.exchange(request, MIXPANEL, route, upstream_path)
            length = request.content_length
            if route == "record" and length is not None and length > STREAM_BODY_BYTES:
                if length > limit:
                    raise PayloadTooLarge(f"body is larger than {limit} bytes")
                x.body, x.length = request.content, length
            else:
                x.body = await read_body(request, server)
            await run(QUERIES, x, front.c)
            return front.render(x)

        return handle

    async def not_found(self, request: web.Request) -> web.Response:
        """Anything else under a mount: Mixpanel's own 404."""
        verbose = MIXPANEL.verbose(query_pairs(request))
        return answer(MIXPANEL.error(404, f"unknown endpoint {request.path}", verbose))

    async def sdk_metrics(self, request: web.Request) -> web.Response:
        """analytics.js's own telemetry (``/v1/m``: load errors, retries, sampled):
        about the SDK, not the visitor, and of use only to Segment. Answered
        here, counted, never forwarded."""
        self.front.s.metrics.request("sdk-metrics", 200)
        return answer(SEGMENT.accepted(True))


def _first_time_events(request: web.Request) -> str:
    """``/flags/<id>/first-time-events``: the flag's id came decoded from the
    path; it goes upstream as one quoted segment (no "?", "/" or space of its
    own), never as "." or "..", never holding a "/" (``%2F`` in the path). A 400
    for anything else."""
    flag = request.match_info["flag"]
    if flag in (".", "..") or "/" in flag or len(flag) > 256:
        raise BadRequest("not a valid flag id")
    trailing = "/" if request.path.endswith("/") else ""
    return f"/flags/{quote(flag, safe='')}/first-time-events{trailing}"
