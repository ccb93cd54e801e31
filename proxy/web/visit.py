"""The visit: what the web layer reads from a request once, and how it answers.

``Front`` is what every handler shares (the cookie jar, the CORS policy the
edge applies, the pipeline's ``Context``), set at start-up. It reads a request into a ``Visit``
(browser or server, its verified identity cookie, analytics.js's cookie hint,
host) and an ``Exchange``, and turns an Exchange back into an aiohttp answer:
the vendor-shaped body, the identity cookie for browsers, ``Cache-Control:
private, no-store`` on anything that carries a cookie.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from aiocache.base import BaseCache
from aiohttp import web

from ..core import consent
from ..core.bridge import from_own_page
from ..core.clientip import TrustedProxies
from ..core.cookie import CookieJar, cookie_values, own_cookie_values
from ..core.cors import OriginPolicy
from ..core.identity import SOURCE_COOKIE, Resolution
from ..core.ids import valid_id
from ..errors import BadRequest, Refused, Unavailable
from ..pipeline import Context, Exchange, Services, Visit
from ..protocols.base import Answer, WireProtocol
from ..protocols.segment import COOKIE as AJS_COOKIE
from ..services.upstream import SegmentUpstreams, Upstreams, response_headers
from ..settings import Settings
from .http import query_pairs, request_host


def ajs_id(cookie_header: str | None) -> str | None:
    """analytics.js's anonymous id from its ``ajs_anonymous_id`` cookie: the id
    as it writes it, or JSON-quoted and URL-encoded as analytics.js 1.0 did."""
    if not cookie_header or AJS_COOKIE not in cookie_header:
        return None
    for value in cookie_values(cookie_header, AJS_COOKIE):
        value = value.replace("%22", "")
        if valid_id(value):
            return value
    return None


def is_browser(headers: Mapping[str, str]) -> bool:
    """Browsers send Fetch Metadata or Origin, and a Mozilla/ user agent; SDKs
    on servers (python-requests, curl, Go) send none of these."""
    if "sec-fetch-site" in headers or "origin" in headers:
        return True
    return headers.get("user-agent", "").startswith("Mozilla/")


def answer(a: Answer) -> web.Response:
    """An SDK answer as the protocol shaped it."""
    return web.Response(status=a.status, body=a.body, content_type=a.content_type)


class Front:
    """The handlers' shared half: built with the app, bound at start-up."""

    def __init__(self, settings: Settings, upstreams: Upstreams, segment: SegmentUpstreams) -> None:
        self.settings = settings
        self.upstreams = upstreams
        self.segment = segment
        # Every upstream by region name, Mixpanel's and Segment's (the sender's, the queue's).
        self.endpoints = {**upstreams.regions, **segment.regions}
        self.trusted = TrustedProxies(settings.server.trusted_proxies)
        self.set_ajs_cookie = settings.segment.set_ajs_cookie
        # The site's own domains: a request from a page on one is the site's.
        self.own_domains = (*settings.identity.linked_domains, *settings.cookie.domains)
        self.s: Services
        self.c: Context
        self.jar: CookieJar
        self.origins: OriginPolicy
        self.lib_cache: BaseCache

    def bind(self, services: Services, jar: CookieJar, origins: OriginPolicy, lib_cache: BaseCache) -> None:
        self.s = services
        self.c = Context(services, self.segment)
        self.jar = jar
        self.origins = origins
        self.lib_cache = lib_cache

    # -------------------------------------------------------------- reading

    def visit(self, request: web.Request) -> Visit:
        headers = request.headers
        browser = is_browser(headers)
        cookie_id = cookie_raw = None
        if browser:
            for raw in own_cookie_values(headers.get("cookie"), self.jar.name):
                cookie_id = self.jar.open(raw)
                if cookie_id:
                    cookie_raw = raw
                    break
        hint = None
        if browser and cookie_id is None and self.set_ajs_cookie:
            hint = ajs_id(headers.get("cookie"))
        host = request_host(headers.get("host"))
        from_page = browser and from_own_page(headers, self.own_domains, host)
        return Visit(browser, headers.get("origin"), host, cookie_id, cookie_raw, hint, from_page)

    def bot(self, request: web.Request) -> str | None:
        """The crawler class of a browser request's user agent (``privacy.bots``
        not "keep"), else None: the cross-domain endpoints give crawlers no
        token, no id and no cookie, as the pipeline's ``screen`` does."""
        bots = self.c.bots
        if bots is None or not is_browser(request.headers):
            return None
        return bots.kind(request.headers.get("user-agent", ""))

    def exchange(self, request: web.Request, protocol: WireProtocol, route: str, path: str) -> Exchange:
        if request.headers.get("sec-fetch-mode") == "navigate":
            # An SDK never navigates to an endpoint; a hostile page can send a
            # visitor's browser there, with the visitor's cookie and taking the
            # answer's (``bridge.from_own_page``). Nothing of it is used.
            raise BadRequest("a navigation is not an SDK's request")
        return Exchange(
            protocol, route, path, self.visit(request), request.headers, request.remote, request.method,
            query_pairs(request), request.rel_url.raw_query_string, time.perf_counter(),
        )

    def public_scheme(self, request: web.Request) -> str:
        """The scheme the visitor used: ``X-Forwarded-Proto`` from a trusted
        proxy (nginx terminating TLS), else this connection's own."""
        if request.remote in self.trusted:
            proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
            if proto in ("http", "https"):
                return proto
        return request.scheme

    def public_host(self, request: web.Request) -> str:
        """The host and port the visitor used: ``X-Forwarded-Host`` from a trusted
        proxy (nginx's ``$http_host``: its ``Host $host`` drops a non-default
        port), else the ``Host`` header."""
        if request.remote in self.trusted:
            forwarded = request.headers.get("x-forwarded-host", "").split(",")[0].strip()
            if forwarded:
                return forwarded
        return request.headers.get("host", "")

    # ------------------------------------------------------------ answering

    def render(self, x: Exchange) -> web.Response:
        """The Exchange's answer: its refusal, the upstream's answer relayed, or the SDK's."""
        if x.error is not None:
            # Refused before the stages read the client's wish for verbose answers: the query's.
            verbose = x.verbose or x.protocol.verbose(x.query)
            return self.refusal(x.error, x.visit, verbose, x.route, x.protocol, body_read=x.body_read)
        if x.upstream is not None:
            upstream = x.upstream
            response = web.Response(status=upstream.status, body=upstream.body, headers=response_headers(upstream))
        else:
            assert x.answer is not None
            response = answer(x.answer)
        if x.refused:
            self.finish(response, x.visit, None, x.route)
            return self.forget(response, x.visit, x.refused)
        parts = x.parts  # ``Exchange.resolution``, without the property call
        return self.finish(response, x.visit, parts[-1][2] if parts else None, x.route, x.protocol)

    def refusal(
        self, exc: Refused, visit: Visit, verbose: bool, route: str, protocol: WireProtocol,
        *, body_read: bool = False,
    ) -> web.Response:
        """The vendor-shaped answer to a refused request: its status from the tree
        (``errors``); an ``Unavailable`` one with Retry-After, the SDK keeping its events."""
        if exc.status < 500:
            self.s.metrics.bad_requests.inc()
        message = f"{exc}; retry later" if isinstance(exc, Unavailable) and body_read else str(exc)
        response = answer(protocol.error(exc.status, message, verbose))
        if isinstance(exc, Unavailable):
            response.headers["Retry-After"] = exc.RETRY_AFTER
            if not body_read:
                response.force_close()  # its body is not read: never linger draining it
        return self.finish(response, visit, None, route)

    def finish(
        self,
        response: web.Response,
        visit: Visit,
        resolution: Resolution | None,
        route: str = "other",
        protocol: WireProtocol | None = None,
    ) -> web.Response:
        """Counted, and for a browser with an identity the cookie that keeps it
        (never cached by a shared cache). CORS is the edge's (``web.edge``)."""
        self.s.metrics.request(route, response.status)
        if visit.browser and resolution is not None and resolution.canonical:
            sealed = visit.cookie_raw if resolution.source == SOURCE_COOKIE else None
            response.headers["Set-Cookie"] = self.jar.set_cookie_header(resolution.canonical, visit.host, sealed)
            if protocol is not None and protocol.cookie and self.set_ajs_cookie:
                # analytics.js reads its anonymous id from this cookie first: the
                # next page starts with the canonical id, past Safari's 7-day cap
                # on script-set cookies (this one is set by the server).
                response.headers.add(
                    "Set-Cookie", self.jar.readable_cookie_header(protocol.cookie, resolution.canonical, visit.host)
                )
            response.headers["Cache-Control"] = "private, no-store"
        return response

    def forget(self, response: web.Response, visit: Visit, why: str) -> web.Response:
        """A refusing browser's answer: its identity cookie deleted, the refusal
        kept on this domain when a token brought it, never cached."""
        if visit.cookie_raw:
            response.headers.add("Set-Cookie", self.jar.expire_header(visit.host))
        if why == "token" and self.settings.consent.opt_out_cookie:
            domain = self.jar.domain_for(visit.host)
            secure = self.settings.cookie.secure
            response.headers.add("Set-Cookie", consent.opt_out_cookie_header(self.settings.consent.opt_out_cookie, domain, secure))
        response.headers["Cache-Control"] = "private, no-store"
        return response
