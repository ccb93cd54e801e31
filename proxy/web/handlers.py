"""The handlers: the only code that touches aiohttp requests.

``Proxy.events`` is the pipeline every event-carrying route runs, whatever
the vendor: the route's ``WireProtocol`` decodes the request, consent is
checked, ``services.resolver`` resolves the canonical id, the protocol
rewrites the events, then they are spooled (``services.spool``, answered once
durable) or forwarded (``services.upstream``) and logged. Query routes
(record, flags, settings, decide) and the library script are proxied
synchronously.

Invariants:
- bad input is answered 400/413/408 in the protocol's error shape and
  nothing is forwarded;
- 2xx reaches the client only when the events are durably spooled or the
  upstream accepted them; an unreachable upstream answers 502 so SDKs retry;
- the identity cookie is read and set only for browser requests, never for
  server SDKs, whose events belong to many people;
- every forwarded request leaves exactly one forwarded-log record.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import quote, urlencode

import orjson
from aiocache.base import BaseCache
from aiohttp import StreamReader, web

from ..core import carry, consent, firsttouch, ids
from ..core.clientip import TrustedProxies, client_ip, truncate
from ..core.cookie import CookieJar, cookie_values, own_cookie_values
from ..core.ids import valid_id
from ..core.cors import OriginPolicy
from ..errors import BadRequest, PayloadTooLarge, Refused, Unavailable, UpstreamError
from ..services.forwardlog import MAX_LISTED, ForwardedLog
from ..services.live import LiveFeed
from ..services.metrics import CONTENT_TYPE, Metrics
from ..services.resolver import Resolver
from ..core.identity import SOURCE_COOKIE, Resolution
from ..core.bridge import strip_param
from ..services.delivery import Sender
from ..core.rewrite import Rewrite, rewrite_query
from ..protocols import mixpanel
from ..protocols.base import Answer, EventFacts, Payload, WireProtocol, basic_user, events_per_batch
from ..protocols.mixpanel import EVENT_ROUTES, MIXPANEL, QUERY_ID_FIELDS, QUERY_ROUTES
from ..protocols.segment import SEGMENT
from .cdn import LIB_PATHS, FirstPartyCdn
from .crossdomain import CrossDomain
from .http import json_response, query_pairs, read_body, request_host
from .http import raw_query as raw_query_of
from ..settings import Settings
from ..lograte import Throttled
from ..services.spool import DeadLetter, NewRow, Spool, SpoolFull, letters_of, request_rows
from ..services.store import AliasStore
from ..services.upstream import (
    Endpoint,
    SegmentUpstreams,
    UpstreamClient,
    UpstreamResponse,
    Upstreams,
    request_headers,
    response_headers,
)

log = logging.getLogger(__name__)

# /record bodies above this are streamed to the upstream instead of read whole.
STREAM_BODY_BYTES = 64 * 1024
AJS_COOKIE = "ajs_anonymous_id"


@dataclass(slots=True)
class Services:
    """Everything a handler needs, built once by the app factory."""

    settings: Settings
    jar: CookieJar
    origins: OriginPolicy
    store: AliasStore
    upstreams: Upstreams
    client: UpstreamClient
    forwarded: ForwardedLog
    lib_cache: BaseCache
    # Spool mode: where fire-and-forget events go (None in sync mode).
    metrics: Metrics = field(default_factory=Metrics)
    spool: Spool | None = None
    sender: Sender | None = None
    live: LiveFeed = field(default_factory=LiveFeed)


@dataclass(slots=True)
class Visit:
    """What we know about the requester before looking at the payload."""

    browser: bool
    origin: str | None
    host: str
    cookie_id: str | None
    cookie_raw: str | None
    # With no identity cookie: analytics.js's own id from its cookie, if any.
    hint: str | None = None


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


# A batch splits into at most this many identities (a real one holds a reset() or two).
MAX_RUNS = 8


def _runs(changes: list[int], count: int) -> list[tuple[int, int]]:
    """(start, end) of each run of events between device changes, at most MAX_RUNS."""
    starts = [0, *changes[: MAX_RUNS - 1]]
    return list(zip(starts, [*starts[1:], count]))


def answer(a: Answer) -> web.Response:
    """An SDK answer as the protocol shaped it."""
    return web.Response(status=a.status, body=a.body, content_type=a.content_type)


def error_response(status: int, message: str, verbose: bool) -> web.Response:
    return answer(mixpanel.error(status, message, verbose))


class Proxy:
    """The handlers. Routes are registered when the app is built; the services
    they use are opened at start-up and handed over with ``bind``."""

    def __init__(self, settings: Settings, upstreams: Upstreams, segment: SegmentUpstreams) -> None:
        self.upstreams = upstreams
        self.segment = segment
        # Per protocol: the spool region (sender) of a project token / write key, and its endpoints.
        self.region_for: dict[str, Callable[[str | None], str]] = {
            MIXPANEL.name: upstreams.region_for,
            SEGMENT.name: segment.region_for,
        }
        self.endpoints: dict[str, Endpoint] = {**upstreams.regions, **segment.regions}
        self.max_age_seconds = settings.delivery.max_age_seconds  # past it, an event is expired on arrival
        # ``only_listed``: the project tokens / write keys relayed, per protocol (None: any).
        self.served: dict[str, frozenset[str] | None] = {
            MIXPANEL.name: frozenset(settings.upstream.projects) if settings.upstream.only_listed else None,
            SEGMENT.name: frozenset(settings.segment.write_keys) if settings.segment.only_listed else None,
        }
        self._trusted = TrustedProxies(settings.server.trusted_proxies)
        privacy = settings.privacy
        whole = privacy.ip_prefix_v4 == 32 and privacy.ip_prefix_v6 == 128
        self._ip_prefixes = None if whole else (privacy.ip_prefix_v4, privacy.ip_prefix_v6)
        self.aliases = dict(settings.server.route_aliases)
        # Event requests in progress in this process, and how many it takes on (``_shed``).
        self.inflight = 0
        self.max_inflight = settings.server.max_inflight_requests
        self._overload = Throttled(log)
        self._carry = carry.matcher(settings.identity.carry_properties)
        # First-touch repair: the site's own domains, and the first touches already known.
        own = dict.fromkeys([*settings.cookie.domains, *settings.identity.linked_domains])
        self._own_domains = tuple(own) if settings.identity.repair_first_touch else ()
        self._touches: dict[str, dict[str, Any]] = {}  # canonical id -> its kept first touch
        self.s: Services
        self.cross = CrossDomain(self)
        self.cdn = FirstPartyCdn(self)
        self.resolver: Resolver

    def bind(self, services: Services) -> None:
        self.s = services
        self.resolver = Resolver(services.store, services.metrics, services.settings.identity)

    # ------------------------------------------------------------- plumbing

    def _visit(self, request: web.Request) -> Visit:
        headers = request.headers
        browser = is_browser(headers)
        cookie_id = cookie_raw = None
        if browser:
            for raw in own_cookie_values(headers.get("cookie"), self.s.jar.name):
                cookie_id = self.s.jar.open(raw)
                if cookie_id:
                    cookie_raw = raw
                    break
        hint = None
        if browser and cookie_id is None and self.s.settings.segment.set_ajs_cookie:
            hint = ajs_id(headers.get("cookie"))
        return Visit(browser, headers.get("origin"), request_host(headers.get("host")), cookie_id, cookie_raw, hint)

    def _client(self, request: web.Request) -> tuple[str | None, list[str]]:
        """The visitor's IP and the forwarding chain, trusting only configured
        proxies, cut to ``privacy``'s prefixes: what the vendors may see."""
        ip, chain = client_ip(
            request.remote, request.headers.get("x-forwarded-for"), request.headers.get("x-real-ip"), self._trusted
        )
        if self._ip_prefixes is not None and ip:
            v4, v6 = self._ip_prefixes
            return truncate(ip, v4, v6), [truncate(hop, v4, v6) for hop in chain]
        return ip, chain

    def public_scheme(self, request: web.Request) -> str:
        """The scheme the visitor used: ``X-Forwarded-Proto`` from a trusted
        proxy (nginx terminating TLS), else this connection's own."""
        if request.remote in self._trusted:
            proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
            if proto in ("http", "https"):
                return proto
        return request.scheme

    def public_host(self, request: web.Request) -> str:
        """The host and port the visitor used: ``X-Forwarded-Host`` from a trusted
        proxy (nginx's ``$http_host``: its ``Host $host`` drops a non-default
        port), else the ``Host`` header."""
        if request.remote in self._trusted:
            forwarded = request.headers.get("x-forwarded-host", "").split(",")[0].strip()
            if forwarded:
                return forwarded
        return request.headers.get("host", "")

    def _finish(
        self,
        response: web.Response,
        visit: Visit,
        resolution: Resolution | None,
        route: str = "other",
        protocol: WireProtocol = MIXPANEL,
    ) -> web.Response:
        self.s.metrics.request(route, response.status)
        if visit.origin:
            response.headers.update(self.s.origins.headers(visit.origin))
        if visit.browser and resolution is not None and resolution.canonical:
            sealed = visit.cookie_raw if resolution.source == SOURCE_COOKIE else None
            response.headers["Set-Cookie"] = self.s.jar.set_cookie_header(resolution.canonical, visit.host, sealed)
            if protocol is SEGMENT and self.s.settings.segment.set_ajs_cookie:
                # analytics.js reads its anonymous id from this cookie first: the
                # next page starts with the canonical id, past Safari's 7-day cap
                # on script-set cookies (this one is set by the server).
                response.headers.add(
                    "Set-Cookie", self.s.jar.readable_cookie_header(AJS_COOKIE, resolution.canonical, visit.host)
                )
            # A cookie-bearing answer must never be cached by a shared cache.
            response.headers["Cache-Control"] = "private, no-store"
        return response

    def _error(
        self, exc: Refused, visit: Visit, verbose: bool, route: str, protocol: WireProtocol = MIXPANEL,
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
        return self._finish(response, visit, None, route)

    async def _resolve(
        self,
        visit: Visit,
        route: str,
        incoming: list[str],
        server_ids: list[str],
        token: str | None = None,
        anonymous: bool = False,
        project: str | None = None,
        referrer: str | None = None,
    ) -> Resolution:
        browser = visit.browser and route != "import"
        carried = (
            await self.cross.redeem(token, visit.host, incoming, visit.cookie_id, visit.hint, referrer=referrer)
            if browser and token
            else None
        )
        return await self.resolver.resolve(
            browser=browser,
            cookie_id=visit.cookie_id,
            host=visit.host,
            route=route,
            incoming=incoming,
            server_ids=server_ids,
            carried=carried,
            anonymous=anonymous,
            project=project,
            hint=visit.hint,
        )

    async def _refused(self, request: web.Request, visit: Visit, token: str | None, ids_named: list[str]) -> str | None:
        """Why a browser's events must not be tracked (``consent``), or None."""
        why = consent.refusal(request.headers, self.s.settings.consent)
        if why is None and token:
            valid = [i for i in ids_named if valid_id(i)]
            owner = visit.hint or visit.cookie_id or (valid[0] if valid else f"landing:{uuid.uuid4().hex}")
            if await self.cross.refusal_follows(token, visit.host, owner):
                why = "token"  # refused on another domain; the refusal follows the visitor
        return why

    def _drop(
        self,
        visit: Visit,
        route: str,
        names: list[str],
        count: int,
        project: str | None,
        why: str,
        response: web.Response,
        protocol: WireProtocol = MIXPANEL,
    ) -> web.Response:
        """Consent refused: nothing is resolved, spooled or forwarded. The SDK is
        answered as if accepted (``response``, so it does not retry), the identity
        cookie is deleted, and the drop is logged and counted, without any id."""
        self._record_drop(route, names, count, project, why)
        if self.s.live.watching:
            self._live(visit, protocol, route, None, [], names, [None] * len(names), "dropped", f"consent: {why}")
        self._finish(response, visit, None, route)
        return self._forget(response, visit, why)

    def _forget(self, response: web.Response, visit: Visit, why: str) -> web.Response:
        """A refusing browser's answer: its identity cookie deleted, the refusal
        kept on this domain when a token brought it, never cached."""
        if visit.cookie_raw:
            response.headers.add("Set-Cookie", self.s.jar.expire_header(visit.host))
        if why == "token" and self.s.settings.consent.opt_out_cookie:
            domain = self.s.jar.domain_for(visit.host)
            secure = self.s.settings.cookie.secure
            response.headers.add(
                "Set-Cookie", consent.opt_out_cookie_header(self.s.settings.consent, domain, secure)
            )
        response.headers["Cache-Control"] = "private, no-store"
        return response

    def _live(
        self,
        visit: Visit,
        protocol: WireProtocol,
        route: str,
        resolution: Resolution | None,
        rewrites: list[Rewrite],
        names: list[str],
        ids: list[str | None],
        outcome: str,
        reason: str | None = None,
        status: int | None = None,
    ) -> None:
        """What the live view shows of this request (called only while someone watches)."""
        self.s.live.request(
            protocol=protocol.name,
            route=route,
            host=visit.host,
            canonical=resolution.canonical if resolution else None,
            source=resolution.source if resolution else "none",
            rewrites=[(r.field, r.original, r.canonical) for r in rewrites],
            names=names,
            ids=ids,
            outcome=outcome,
            reason=reason,
            status=status,
        )

    async def _first_touch(
        self, route: str, events: list[dict[str, Any]], resolution: Resolution
    ) -> dict[int, list[Rewrite]]:
        """Keep this visitor's first external touch; repair what names one of
        our own domains instead (``core.firsttouch``). Index -> rewrites."""
        canonical = resolution.canonical
        assert canonical is not None
        own_domains = self._own_domains
        out: dict[int, list[Rewrite]] = {}
        for i, event in enumerate(events):
            props = event.get("properties") if route == "track" else None
            if route == "track" and isinstance(props, dict):
                touch = firsttouch.touch_of(props, own_domains)
                if touch is not None:
                    if canonical not in self._touches:  # kept once per id (set once, like the SDK)
                        kept = await self._kept_touch(canonical)
                        if not kept and await self.s.store.set_first_touch(canonical, touch):
                            self._remember_touch(canonical, touch)
                    continue
                if firsttouch.own(props.get("$initial_referring_domain"), own_domains):
                    changes = firsttouch.repair_event(props, await self._kept_touch(canonical), own_domains)
                    if changes:
                        out[i] = changes
            elif route == "engage" and resolution.source in ("bridge", "hub") and isinstance(event.get("$set_once"), dict):
                kept = await self._kept_touch(canonical)
                if kept:
                    changes = firsttouch.repair_profile(event["$set_once"], kept)
                    if changes:
                        out[i] = changes
        return out

    async def _kept_touch(self, canonical: str) -> dict[str, Any]:
        """The first touch kept for ``canonical`` ({} if none yet): from this
        process's memo once known (a kept touch never changes), else the store."""
        kept = self._touches.get(canonical)
        if kept is not None:
            return kept
        kept = await self.s.store.first_touch(canonical)
        if kept:  # nothing kept yet may change (another instance): not memoised
            self._remember_touch(canonical, kept)
        return kept

    def _remember_touch(self, canonical: str, touch: dict[str, Any]) -> None:
        if len(self._touches) >= 100_000:
            self._touches.clear()
        self._touches[canonical] = touch

    async def _carry_properties(
        self, protocol: WireProtocol, route: str, events: list[dict[str, Any]], canonical: str
    ) -> bool:
        """Carried properties (``core.carry``): the values this visitor's events
        set before, on any domain, added where missing; what these set, kept.
        True when an event gained one."""
        assert self._carry is not None
        kept = await self.s.store.carried(canonical)
        running = dict(kept)
        seen: dict[str, Any] = {}
        changed = False
        for event in events:
            props = protocol.properties(route, event)
            if props is None:
                continue
            changed |= bool(carry.add_missing(props, running))
            fresh = carry.collect(props, self._carry)
            seen.update(fresh)
            running.update(fresh)
        if seen and any(kept.get(k) != v for k, v in seen.items()):
            await self.s.store.set_carried(canonical, carry.merge(kept, seen))
        return changed

    async def _rewrite(
        self, visit: Visit, protocol: WireProtocol, route: str, events: list[dict[str, Any]], resolution: Resolution
    ) -> tuple[list[list[Rewrite]], bool]:
        """One identity's events made its own: carried properties added, ids
        rewritten, the first touch repaired. (Per event rewrites or [], and
        whether the events changed beyond their ids.)"""
        changed = False
        canonical = resolution.canonical
        if self._carry is not None and canonical and visit.browser and route in protocol.spooled_routes:
            changed = await self._carry_properties(protocol, route, events, canonical)
        mapping = resolution.mapping
        per_event = [protocol.rewrite(route, e, mapping) for e in events] if mapping else []
        if self._own_domains and canonical and visit.browser and protocol is MIXPANEL:
            touched = await self._first_touch(route, events, resolution)
            if touched:
                per_event = per_event or [[] for _ in events]
                for i, changes in touched.items():
                    per_event[i] = per_event[i] + changes
                changed = True
        return per_event, changed

    def _record_drop(self, route: str, names: list[str], count: int, project: str | None, why: str) -> None:
        self.s.metrics.consent_dropped.labels(why).inc(count)
        self.s.metrics.outcome("dropped", route, count)
        self.s.forwarded.record(
            {
                "time": time.time(),
                "outcome": "dropped",
                "reason": f"consent: {why}",
                "route": route,
                "project": project,
                "events": names[:MAX_LISTED],
                "count": count,
                "status": None,
            }
        )

    def _consented(
        self, protocol: WireProtocol, route: str, payload: Payload, project: str | None
    ) -> list[dict[str, Any]]:
        """The events whose own consent (Segment's ``context.consent``) does not
        refuse tracking; the others are dropped here, logged and counted."""
        settings = self.s.settings.consent
        if not (protocol.event_consent and settings.honor_segment_consent):
            return payload.events
        if not payload.mentions("categoryPreferences"):
            return payload.events
        required = settings.segment_required_categories
        kept = [e for e in payload.events if not protocol.refuses(e, required)]
        if len(kept) < len(payload.events) and kept:
            refused = [e for e in payload.events if protocol.refuses(e, required)]
            self._record_drop(route, protocol.names(route, refused), len(refused), project, "segment_consent")
        return kept

    def _strip_tokens(self, protocol: WireProtocol, route: str, events: list[dict[str, Any]]) -> int:
        param = self.s.settings.identity.token_param
        stripped = sum(protocol.strip_tokens(route, e, param) for e in events)
        if stripped:
            self.s.metrics.tokens_stripped.inc(stripped)
        return stripped

    async def _forward(
        self,
        request: web.Request,
        route: str,
        endpoint: Endpoint,
        target: str,
        body: bytes | StreamReader,
        content_type: str | None,
        content_encoding: str | None,
        method: str | None = None,
        length: int | None = None,
        anonymous: bool = False,
    ) -> UpstreamResponse:
        ip, chain = (None, []) if anonymous else self._client(request)
        headers = request_headers(request.headers, route, ip, chain, content_type, content_encoding)
        if length is not None:  # a streamed body keeps its length (no chunked encoding upstream)
            headers.append(("content-length", str(length)))
        return await self.s.client.request(
            endpoint, method or request.method, target, headers, body, timeout=self.s.upstreams.timeout
        )

    def _log(
        self,
        route: str,
        region: str,
        project: str | None,
        names: list[str],
        resolution: Resolution | None,
        rewrites: list[Rewrite],
        status: int,
        started: float,
        error: str | None = None,
    ) -> None:
        """One forwarded-log record for a synchronously forwarded request (the
        sender writes the same shape for spooled batches)."""
        entry: dict[str, Any] = {
            "time": time.time(),
            "outcome": "forwarded" if 200 <= status < 300 else "failed",
            "route": route,
            "region": region,
            "project": project,
            "events": names[:MAX_LISTED],
            "count": len(names),
            "canonical_ids": [resolution.canonical] if resolution and resolution.canonical else [],
            "sources": [resolution.source] if resolution else [],
            "original_ids": sorted({r.original for r in rewrites})[:MAX_LISTED],
            "rewrites": [
                {"field": r.field, "from": r.original, "to": r.canonical} for r in rewrites[:MAX_LISTED]
            ],
            "status": status,
            "attempts": 1,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        }
        if error:
            entry["detail"] = error
        self.s.forwarded.record(entry)

    # --------------------------------------------------------------- routes

    def event_route(
        self, name: str, path: str, protocol: WireProtocol = MIXPANEL
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
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

    def _shed(self, request: web.Request, route: str, protocol: WireProtocol) -> web.Response:
        """Past ``server.max_inflight_requests``: 503 at once, body unread, so a
        burst above what this process can handle costs neither memory nor a
        queue of seconds for everyone; the SDKs keep their events and resend."""
        self.s.metrics.shed.inc()
        self._overload.warning(
            "shed", "overloaded: %d requests in progress (server.max_inflight_requests); answering 503",
            self.inflight,
        )
        verbose = request.query.get("verbose") == "1" or protocol is not MIXPANEL
        response = answer(protocol.error(503, "overloaded; retry later", verbose))
        response.headers["Retry-After"] = Unavailable.RETRY_AFTER
        if not request.content.is_eof():
            response.force_close()  # a body still arriving is not read: never linger draining it
        self.s.metrics.request(route, 503)
        if request.headers.get("origin"):
            response.headers.update(self.s.origins.headers(request.headers["origin"]))
        return response

    async def bridge(self, request: web.Request) -> web.Response:
        if request.method == "OPTIONS":
            return self.preflight(request)
        return await self.cross.bridge(request)

    def mount(self, prefix: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        """Everything under one mount (``/mp/``): one entry point, so
        ``/mp//track/``, ``/mp/track`` and an alias (``/mp/e/``) reach the same code."""
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
                endpoint = self.s.upstreams.decide if name == "decide" else None
                return await self.query_route(request, name, f"/{name}{trailing}", endpoint)
            if name in LIB_PATHS:
                return await self.cdn.mixpanel_lib(request, name)
        if len(parts) == 3 and self.aliases.get(parts[0], parts[0]) == "flags" and parts[2] == "first-time-events":
            # The flag's id came decoded from the path: it goes upstream as one quoted
            # segment (no "?", "/" or space of its own), and never as "." or "..".
            flag = parts[1]
            if flag in (".", "..") or len(flag) > 256:
                return error_response(400, "not a valid flag id", mixpanel.wants_verbose(query_pairs(request)))
            path = f"/flags/{quote(flag, safe='')}/first-time-events{trailing}"
            return await self.query_route(request, "flags-first-time", path, None)
        return self._not_found(request)

    def decide_mount(self, prefix: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        """``/mp-decide/decide``: the legacy decide endpoint on its own host."""
        skip = len(prefix)

        async def handle(request: web.Request) -> web.Response:
            return await self.mp_decide(request, request.path[skip:])

        return handle

    async def mp_decide(self, request: web.Request, tail: str) -> web.Response:
        if request.method == "OPTIONS":
            return self.preflight(request)
        parts = [p for p in tail.split("/") if p]
        if parts == ["decide"]:
            trailing = "/" if tail.endswith("/") else ""
            return await self.query_route(request, "decide", f"/decide{trailing}", self.s.upstreams.decide)
        return self._not_found(request)

    def _not_found(self, request: web.Request) -> web.Response:
        verbose = mixpanel.wants_verbose(query_pairs(request))
        return error_response(404, f"unknown endpoint {request.path}", verbose)

    def preflight(self, request: web.Request) -> web.Response:
        headers = self.s.origins.preflight_headers(request.headers.get("origin"))
        if headers is None:
            # No CORS headers: the browser refuses; the body helps whoever debugs it.
            return web.Response(status=403, text="origin not allowed; add it to cors.allowed_origins\n")
        return web.Response(status=204, headers=headers)

    async def events(
        self, request: web.Request, route: str, path: str, protocol: WireProtocol = MIXPANEL
    ) -> web.Response:
        """Routes whose payloads carry events, whatever the protocol: decode ->
        consent -> identity -> rewrite -> spool (or forward) -> log."""
        started = time.perf_counter()
        visit = self._visit(request)
        query = query_pairs(request)
        if request.method not in ("GET", "POST"):
            refusal = answer(protocol.error(405, f"{request.method} is not supported here", True))
            return self._finish(refusal, visit, None)
        verbose = mixpanel.wants_verbose(query)
        try:
            body = await read_body(request, self.s.settings.server)
            payload = protocol.decode(
                route,
                body,
                query,
                request.headers.get("content-type", ""),
                request.headers.get("content-encoding", ""),
                self.s.settings.server.max_body_bytes,
                request.headers.get("authorization", ""),
            )
        except Refused as exc:
            return self._error(exc, visit, verbose, route, protocol)
        route = payload.route
        verbose = payload.verbose
        events = payload.events
        served = self.served[protocol.name]
        if served is not None and any(protocol.project(route, [e]) not in served for e in events):
            refusal = BadRequest("a project token or write key this proxy does not serve (only_listed)")
            return self._error(refusal, visit, verbose, route, protocol)
        param = self.s.settings.identity.token_param
        token = None
        stripped = 0
        filtered = False
        # Tokens can only be in events whose text mentions the parameter.
        mentioned = payload.mentions(param + "=")
        if visit.browser and route != "import":
            token = protocol.find_token(query, events if mentioned else [], param)
        project = protocol.project(route, events)
        if visit.browser and route in protocol.spooled_routes:
            named = protocol.anonymous_ids(route, events) if token else []
            refused = await self._refused(request, visit, token, named)
            if not refused:
                kept = self._consented(protocol, route, payload, project)
                if not kept:
                    refused = "segment_consent"
                elif len(kept) < len(events):
                    events = payload.events = kept
                    filtered = True  # the body changed: re-encoded if forwarded as is
            if refused:
                if self.s.settings.consent.mode == "anonymise":
                    return await self._anonymised(request, visit, protocol, payload, query, refused, project, mentioned, started)
                names = protocol.names(route, events)
                accepted = answer(protocol.accepted(verbose))
                return self._drop(visit, route, names, len(events), project, refused, accepted, protocol)
        if mentioned:
            stripped = self._strip_tokens(protocol, route, events)

        # mixpanel-browser batches for 5 s: identify, track, reset() and the next
        # person's track can share one request. Each event's own device id says who
        # it is: a change inside a browser's batch starts a new identity from there.
        runs = _runs(protocol.device_changes(route, events), len(events)) if visit.browser else [(0, len(events))]
        try:
            # Every id the request names passes the one rule (``core.ids``) before
            # it is looked up, stored, put in a cookie or logged.
            incoming = [ids.accept(protocol.anonymous_ids(route, events[a:b]), refuse_long=visit.browser) for a, b in runs]
        except Refused as exc:
            return self._error(exc, visit, verbose, route, protocol)
        server_ids = [] if visit.browser and route != "import" else ids.accept(protocol.lookup_ids(route, events), refuse_long=False)
        parts: list[tuple[int, int, Resolution]] = []
        changes_by_run: list[tuple[list[list[Rewrite]], int]] = []  # (per event rewrites or [], events)
        for n, (a, b) in enumerate(runs):
            part = events[a:b]
            if n == 0:
                resolution = await self._resolve(
                    visit,
                    route,
                    incoming[0],
                    server_ids,
                    token,
                    protocol.is_anonymous(route, part),
                    project,
                    # Where the landing navigation came from: a link token's proof.
                    protocol.referrer(route, part) if token else None,
                )
            else:  # reset() inside the batch: a new person on this browser
                resolution = await self.resolver.restart(visit.host, route, incoming[n], project)
            parts.append((a, b, resolution))
            changes, changed = await self._rewrite(visit, protocol, route, part, resolution)
            filtered |= changed
            changes_by_run.append((changes, b - a))
        # Per event rewrites for the whole request, or [] when nothing was rewritten.
        per_event = (
            [rs for changes, count in changes_by_run for rs in (changes or [[] for _ in range(count)])]
            if any(changes for changes, _ in changes_by_run)
            else []
        )
        rewrites = [r for rs in per_event for r in rs]
        if rewrites:
            self.s.metrics.rewrites.inc(len(rewrites))
        if self.s.spool is not None and route in protocol.spooled_routes:
            return await self._spool(request, visit, protocol, payload, parts, per_event)
        if protocol is not MIXPANEL:
            return await self._forward_batch(request, visit, protocol, payload, resolution, rewrites, started)

        raw_query = raw_query_of(request)
        if payload.wants_ip and not visit.browser:
            # ip=1 from a server SDK would have Mixpanel geolocate the proxy: ip=0
            # (an event's own "ip" property still counts), wherever the flag came.
            query = [(k, "0" if k == "ip" else v) for k, v in query]
            raw_query = urlencode(query)
            if any(k == "ip" for k, _ in payload.form.params):
                payload.form.params = [(k, "0" if k == "ip" else v) for k, v in payload.form.params]
                filtered = True  # the body's own ip=1: re-encoded
        if param + "=" in raw_query:
            raw_query = urlencode([(k, v) for k, v in query if k != param])
        content_type = request.headers.get("content-type")
        content_encoding = request.headers.get("content-encoding")
        if rewrites or stripped or filtered:
            new_body, new_type, new_query = mixpanel.reencode(payload, [(k, v) for k, v in query if k != param])
            if new_query is not None:
                raw_query = new_query
            else:
                body, content_type = new_body, new_type
                content_encoding = None  # re-encoded uncompressed

        region = self.s.upstreams.region_for(project)
        target = path + ("?" + raw_query if raw_query else "")
        names = protocol.names(route, events)
        try:
            upstream = await self._forward(
                request, route, self.s.upstreams.regions[region], target, body, content_type, content_encoding,
                anonymous=not (visit.browser and payload.wants_ip),  # a server's IP is not its visitors'
            )
        except UpstreamError as exc:
            self._log(route, region, project, names, resolution, rewrites, 502, started, str(exc))
            if self.s.live.watching:
                self._live(visit, protocol, route, resolution, rewrites, names, [None] * len(names), "failed", str(exc), 502)
            return self._finish(error_response(502, str(exc), verbose), visit, resolution, route)
        self._log(route, region, project, names, resolution, rewrites, upstream.status, started)
        if 200 <= upstream.status < 300:
            self.s.metrics.accepted(route, len(events), protocol.name, resolution.source)
        if self.s.live.watching:
            outcome = "forwarded" if 200 <= upstream.status < 300 else "failed"
            self._live(visit, protocol, route, resolution, rewrites, names, [None] * len(names), outcome, None, upstream.status)
        response = web.Response(status=upstream.status, body=upstream.body, headers=response_headers(upstream))
        return self._finish(response, visit, resolution, route)

    async def _anonymised(
        self,
        request: web.Request,
        visit: Visit,
        protocol: WireProtocol,
        payload: Payload,
        query: list[tuple[str, str]],
        why: str,
        project: str | None,
        mentioned: bool,
        started: float,
    ) -> web.Response:
        """``consent.mode = "anonymise"``: a refusing browser's events counted
        without identity. Each keeps only a throwaway id (one per request,
        shared with nothing), no IP reaches the vendor, nothing is resolved,
        rewritten or remembered, the identity cookie is deleted. Profile
        updates and identify calls (identity and nothing else) are dropped."""
        route = payload.route
        throwaway = f"anon-{uuid.uuid4()}"
        kept, dropped = [], []
        for event in payload.events:
            (kept if protocol.anonymise(route, event, throwaway) else dropped).append(event)
        if not kept:
            accepted = answer(protocol.accepted(payload.verbose))
            return self._drop(visit, route, protocol.names(route, dropped), len(dropped), project, why, accepted, protocol)
        if dropped:
            self._record_drop(route, protocol.names(route, dropped), len(dropped), project, why)
        payload.events = kept
        payload.wants_ip = False
        if mentioned:
            self._strip_tokens(protocol, route, kept)
        self.s.metrics.consent_anonymised.labels(why).inc(len(kept))
        resolution = Resolution(None, "anonymous")
        if self.s.spool is not None and route in protocol.spooled_routes:
            response = await self._spool(request, visit, protocol, payload, [(0, len(kept), resolution)], [])
        elif protocol is not MIXPANEL:
            response = await self._forward_batch(request, visit, protocol, payload, resolution, [], started)
        else:
            param = self.s.settings.identity.token_param
            clean = [(k, "0" if k == "ip" else v) for k, v in query if k != param]
            body, content_type, new_query = mixpanel.reencode(payload, clean)
            target = f"/{route}?" + (new_query if new_query is not None else urlencode(clean))
            region = self.s.upstreams.region_for(project)
            names = protocol.names(route, kept)
            try:
                upstream = await self._forward(
                    request, route, self.s.upstreams.regions[region], target, body, content_type or None, None,
                    anonymous=True,
                )
            except UpstreamError as exc:
                self._log(route, region, project, names, resolution, [], 502, started, str(exc))
                return self._finish(error_response(502, str(exc), payload.verbose), visit, None, route)
            self._log(route, region, project, names, resolution, [], upstream.status, started)
            response = web.Response(status=upstream.status, body=upstream.body, headers=response_headers(upstream))
            response = self._finish(response, visit, None, route)
        return self._forget(response, visit, why)

    async def _spool(
        self,
        request: web.Request,
        visit: Visit,
        protocol: WireProtocol,
        payload: Payload,
        parts: list[tuple[int, int, Resolution]],
        per_event: list[list[Rewrite]],
    ) -> web.Response:
        """Spool mode: answer once the events are durably written; the sender
        forwards them in batches. ``parts``: the events' runs (start, end) and
        each one's identity (one run, unless a batch held a reset())."""
        assert self.s.spool is not None and self.s.sender is not None
        route = payload.route
        # Batches mix visitors, so each event carries its visitor's IP for
        # geolocation when the client asked for it (ip=1). A server SDK's
        # events belong to many people: the peer is the backend, never theirs.
        wants_ip = payload.wants_ip and visit.browser
        ip = self._client(request)[0] if wants_ip else None
        # The SQLite spool keeps a request's consecutive events of one project
        # in one row (one B-tree cell, one id), up to what one upstream batch
        # holds; JetStream keeps one message per event.
        most = events_per_batch(protocol, self.s.settings.delivery.batch_size) if self.s.spool.rows_hold_requests else 1
        events = payload.events
        facts = [protocol.prepare(route, event, ip) for event in events]
        region_for = self.region_for[protocol.name]
        rows = []
        for a, b, part in parts:  # each identity's events: rows of their own
            rows += request_rows(route, wants_ip, protocol.name, events[a:b], facts[a:b], per_event[a:b], region_for,
                                 most, protocol.max_batch_bytes, part.canonical, part.source)
        letters: list[DeadLetter] = []
        if route in protocol.expiring_routes:
            # Events older than the vendor takes (Mixpanel's /track: 5 days) are dead
            # letters from the start: written with the request's rows, never queued.
            # A row's time is its oldest event's: one look per row, the usual answer.
            cutoff = time.time() - self.max_age_seconds
            for row in rows:
                if row.event_time is not None and row.event_time < cutoff:
                    rows, letters = self._expired_apart(route, wants_ip, protocol, events, facts, per_event, parts, most, cutoff)
                    break
        resolution = parts[-1][2]  # the browser's identity from now on: its cookie
        try:
            await self.s.spool.enqueue(rows, letters)
        except (PayloadTooLarge, SpoolFull) as exc:  # over a queue message (JetStream's max_payload); full
            return self._error(exc, visit, payload.verbose, route, protocol, body_read=True)
        if letters:
            self.s.sender.dead_on_arrival(letters)
        for a, b, part in parts:
            self.s.metrics.accepted(route, b - a, protocol.name, part.source)
        for region in {row.region for row in rows}:
            self.s.sender.notify(region)
        if self.s.live.watching:
            cols = [row.columns() for row in rows]
            self._live(visit, protocol, route, resolution, [r for rs in per_event for r in rs],
                       [n for c in cols for n in c.names], [i for c in cols for i in c.insert_ids], "spooled")
        return self._finish(answer(protocol.accepted(payload.verbose)), visit, resolution, route, protocol)

    def _expired_apart(
        self,
        route: str,
        wants_ip: bool,
        protocol: WireProtocol,
        events: list[dict[str, Any]],
        facts: list[EventFacts],
        per_event: list[list[Rewrite]],
        parts: list[tuple[int, int, Resolution]],
        most: int,
        cutoff: float,
    ) -> tuple[list[NewRow], list[DeadLetter]]:
        """A request's rows again without its events older than ``cutoff``, and
        those events as dead letters (one each, as the sender buries them)."""
        region_for = self.region_for[protocol.name]
        rows: list[NewRow] = []
        expired: list[NewRow] = []
        for a, b, part in parts:
            for old, into, size in ((False, rows, most), (True, expired, 1)):
                chosen = [i for i in range(a, b) if (facts[i].time is not None and facts[i].time < cutoff) == old]
                if chosen:
                    into += request_rows(route, wants_ip, protocol.name, [events[i] for i in chosen],
                                         [facts[i] for i in chosen], [per_event[i] for i in chosen] if per_event else [],
                                         region_for, size, protocol.max_batch_bytes, part.canonical, part.source)
        days = self.s.settings.delivery.max_age_days
        return rows, letters_of(expired, "expired", f"event older than {days:g} days")

    async def _forward_batch(
        self,
        request: web.Request,
        visit: Visit,
        protocol: WireProtocol,
        payload: Payload,
        resolution: Resolution,
        rewrites: list[Rewrite],
        started: float,
    ) -> web.Response:
        """Sync mode for a batching protocol (Segment): the request's calls,
        made ready as the sender would, go upstream as one batch now."""
        route = payload.route
        wants_ip = payload.wants_ip and visit.browser  # a server's IP is not its visitors'
        ip = self._client(request)[0] if wants_ip else None
        facts = [protocol.prepare(route, e, ip) for e in payload.events]
        project = facts[0].project if facts else None
        region = self.region_for[protocol.name](project)
        outbound = protocol.batch(route, wants_ip, [orjson.dumps(e) for e in payload.events], project)
        names = [f.name for f in facts]
        headers = [("content-type", outbound.content_type), ("user-agent", "firstparty-proxy")]
        try:
            upstream = await self.s.client.request(
                self.endpoints[region], "POST", outbound.target, headers, outbound.body, timeout=self.s.upstreams.timeout
            )
        except UpstreamError as exc:
            self._log(route, region, project, names, resolution, rewrites, 502, started, str(exc))
            if self.s.live.watching:
                self._live(visit, protocol, route, resolution, rewrites, names, [f.insert_id for f in facts], "failed", str(exc), 502)
            return self._finish(answer(protocol.error(502, str(exc), True)), visit, resolution, route, protocol)
        self._log(route, region, project, names, resolution, rewrites, upstream.status, started)
        if self.s.live.watching:
            outcome = "forwarded" if 200 <= upstream.status < 300 else "failed"
            self._live(visit, protocol, route, resolution, rewrites, names, [f.insert_id for f in facts], outcome, None, upstream.status)
        if 200 <= upstream.status < 300:
            self.s.metrics.accepted(route, len(payload.events), protocol.name, resolution.source)
            return self._finish(answer(protocol.accepted(True)), visit, resolution, route, protocol)
        response = web.Response(status=upstream.status, body=upstream.body, headers=response_headers(upstream))
        return self._finish(response, visit, resolution, route, protocol)

    async def query_route(
        self, request: web.Request, route: str, path: str, endpoint: Endpoint | None
    ) -> web.Response:
        """record / flags / settings / decide: identity in the query string, the
        body (a gzip'd replay, a flags request) forwarded byte for byte."""
        started = time.perf_counter()
        visit = self._visit(request)
        query = query_pairs(request)
        verbose = mixpanel.wants_verbose(query)
        body: bytes | StreamReader
        length = request.content_length
        try:
            if route == "record" and length is not None and length > STREAM_BODY_BYTES:
                # A large replay chunk goes upstream as it arrives, never held whole
                # (its identity is in the query; its bytes are forwarded untouched).
                if length > self.s.settings.server.max_body_bytes:
                    raise PayloadTooLarge(f"body is larger than {self.s.settings.server.max_body_bytes} bytes")
                body = request.content
            else:
                body = await read_body(request, self.s.settings.server)
        except Refused as exc:
            return self._error(exc, visit, verbose, route)
        param = self.s.settings.identity.token_param
        token = next((v for k, v in query if k == param), None) if visit.browser else None
        if visit.browser and route == "record":
            refused = await self._refused(request, visit, token, [])
            if refused:  # a session replay is the most personal record of all
                project = next((v for k, v in query if k == "token"), None)
                answer = json_response({"code": 200, "status": "OK"})
                return self._drop(visit, route, ["$session_replay"], 1, project, refused, answer)
        served = self.served[MIXPANEL.name]
        if served is not None:
            project = next((v for k, v in query if k == "token"), None) or basic_user(
                request.headers.get("authorization", "")
            )
            if project not in served:
                refusal = BadRequest("a project token this proxy does not serve (upstream.only_listed)")
                return self._error(refusal, visit, verbose, route)
        clean = [(k, v) for k, v in query if k != param]
        clean = [(k, strip_param(v, param) or v) if param + "=" in v else (k, v) for k, v in clean]
        tokens_removed = clean != query
        query = clean
        incoming, server_ids, context = mixpanel.query_identity(route, query)
        try:
            incoming = ids.accept(incoming, refuse_long=visit.browser)
        except Refused as exc:
            return self._error(exc, visit, verbose, route)
        server_ids = ids.accept(server_ids, refuse_long=False)
        resolution = await self._resolve(visit, route, incoming, server_ids, token)
        rewrites: list[Rewrite] = []
        new_query = query
        if route in QUERY_ID_FIELDS:
            new_query = rewrite_query(query, QUERY_ID_FIELDS[route], resolution.mapping, rewrites)
        elif route == "flags" and context is not None:
            new_context = mixpanel.rewrite_flags_context(context, resolution.mapping, rewrites)
            new_query = [(k, new_context if k == "context" else v) for k, v in query]
        raw_query = urlencode(new_query) if rewrites or tokens_removed else raw_query_of(request)

        token = next((v for k, v in query if k == "token"), None)
        region = self.s.upstreams.region_for(token)
        endpoint = endpoint or self.s.upstreams.regions[region]
        target = path + ("?" + raw_query if raw_query else "")
        try:
            upstream = await self._forward(
                request,
                route,
                endpoint,
                target,
                body,
                request.headers.get("content-type") if body else None,
                request.headers.get("content-encoding") if body else None,
                length=length if isinstance(body, StreamReader) else None,
                anonymous=not visit.browser,
            )
        except UpstreamError as exc:
            self._log(route, region, token, [], resolution, rewrites, 502, started, str(exc))
            return self._finish(error_response(502, str(exc), verbose), visit, resolution, route)
        self._log(route, region, token, [], resolution, rewrites, upstream.status, started)
        response = web.Response(status=upstream.status, body=upstream.body, headers=response_headers(upstream))
        return self._finish(response, visit, resolution, route)

    async def sdk_metrics(self, request: web.Request) -> web.Response:
        """analytics.js's own telemetry (``/v1/m``: load errors, retries, sampled):
        about the SDK, not the visitor, and of use only to Segment. Answered
        here, counted, never forwarded."""
        if request.method == "OPTIONS":
            return self.preflight(request)
        self.s.metrics.request("sdk-metrics", 200)
        response = answer(SEGMENT.accepted(True))
        if request.headers.get("origin"):
            response.headers.update(self.s.origins.headers(request.headers["origin"]))
        return response

    async def metrics(self, request: web.Request) -> web.Response:
        self.s.metrics.store_errors.set(self.s.store.errors)
        return web.Response(body=self.s.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def healthz(self, request: web.Request) -> web.Response:
        # The pid tells which worker answered when several share the port.
        return json_response({"status": "ok", "pid": os.getpid()})

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready when the alias store answers and the spool accepts events."""
        store_ok = await self.s.store.ping()
        body: dict[str, Any] = {"store": store_ok}
        ok = store_ok
        if self.s.spool is not None:
            spool_ok = self.s.spool.depth < self.s.spool.max_rows and self.s.spool.accepting
            body["spool"] = spool_ok
            if self.s.spool.refusing:
                body["spool_refusing"] = self.s.spool.refusing
            ok = ok and spool_ok
        return json_response(body, status=200 if ok else 503)
