"""The application: an ``aiohttp.web.Application`` built once from settings.

``create_app(settings)`` registers the routes and one ``cleanup_ctx`` per
resource, in the order they depend on each other: the upstream client, the
alias store, the forwarded log, the metrics, the spool, its sender, then the
hand-over to the handlers. aiohttp closes them in the reverse order, so the
sender drains through a client that is still open and into a spool and log
that are still open.

Typed state lives under ``web.AppKey``s (``SETTINGS``, ``UPSTREAM``,
``STORE``, ``FORWARDED``, ``METRICS``, ``SPOOL``, ``SENDER``, ``SERVICES``);
the handlers reach the services through the ``Proxy`` they are bound to, so
the request path does no mapping lookup for them.

Invariants:
- nothing is opened at import or in ``create_app``: only at start-up, by
  aiohttp's runner (or the tests' ``aiohttp_client``), and everything opened
  is closed at clean-up, last opened first;
- the spool's sender stops only after the server stopped accepting and the
  in-flight requests finished (clean-up runs after aiohttp's shutdown), and
  sends what it can within ``delivery.drain_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import asdict
from functools import partial
from collections.abc import AsyncIterator, Awaitable, Callable

from aiocache import SimpleMemoryCache
from aiohttp import web

from ..core.cookie import CookieJar
from ..core.cors import OriginPolicy
from ..services.delivery import Sender
from ..services.forwardlog import ForwardedLog
from ..services.live import LiveFeed
from ..services.metrics import Metrics
from ..services.queue.base import Queue
from ..services.queue.sqlite import Spool
from ..services.store import AliasStore
from ..services.upstream import SegmentUpstreams, UpstreamClient, Upstreams
from ..errors import ConfigError
from ..settings import Settings
from ..protocols.mixpanel import EVENT_ROUTES, MIXPANEL, QUERY_ROUTES
from ..protocols import segment as segment_protocol
from ..protocols.segment import SEGMENT
from ..pipeline import Services
from .edge import UNKNOWN, Edge, Spec
from .handlers import Proxy
from .cdn import LIB_PATHS
from .http import BODY_BUDGET, BodyBudget, text_error, text_response
from .probes import Probes
from .serve import SERVER
from .visit import Front

SETTINGS = web.AppKey("settings", Settings)
SERVICES = web.AppKey("services", Services)
FRONT = web.AppKey("front", Front)
PROXY = web.AppKey("proxy", Proxy)
EDGE = web.AppKey("edge", Edge)
PROBES = web.AppKey("probes", Probes)
UPSTREAM = web.AppKey("upstream", UpstreamClient)
STORE = web.AppKey("store", AliasStore)
FORWARDED = web.AppKey("forwarded", ForwardedLog)
METRICS = web.AppKey("metrics", Metrics)
SPOOL = web.AppKey("spool", Queue)
SENDER = web.AppKey("sender", Sender)
LIVE = web.AppKey("live", LiveFeed)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
GET = frozenset({"GET", "HEAD"})


def only(methods: frozenset[str], handler: Handler) -> Handler:
    """``handler`` for ``methods``; 405 with ``Allow`` for the others. The
    catch-all ``/mp/...`` route would otherwise take the request and answer 404."""
    allow = ", ".join(sorted(methods))

    async def checked(request: web.Request) -> web.StreamResponse:
        if request.method not in methods:
            return text_response(f"{request.method} is not allowed here\n", status=405, headers={"Allow": allow})
        return await handler(request)

    return checked


def add_crossdomain(app: web.Application, edge: Edge, mount: str, proxy: Proxy) -> None:
    """``go``, ``bridge``, ``id`` and the page scripts (``link.js``, ``hub.js``,
    ``land.js``, ``frame.js``) under ``mount``."""
    cross = proxy.cross
    add = partial(edge.add, app)
    add(f"{mount}go", only(GET, cross.go), Spec("go"))
    add(f"{mount}bridge", only(frozenset({"POST"}), cross.bridge), Spec("bridge"))
    # /mp/id answers CORS itself: only linked origins may read an id, with credentials.
    add(f"{mount}id", only(GET | {"POST"}, cross.identity), Spec("id", cors=False))
    for script, handler in (("link.js", cross.link_js), ("hub.js", cross.hub_js), ("land.js", cross.land_js),
                            ("frame.js", cross.frame_js)):
        add(f"{mount}{script}", only(GET, handler), Spec("script", cors=False))  # loaded by <script>: no CORS


async def server_header(request: web.Request, response: web.StreamResponse) -> None:
    """``Server`` names the product, not the versions of Python and aiohttp under it."""
    response.headers["Server"] = SERVER


def create_app(settings: Settings) -> web.Application:
    if not settings.cookie.secret or settings.identity.keys is None:
        missing = "cookie.secret" if not settings.cookie.secret else "identity.keys_file"
        raise ConfigError(missing, "not generated yet: serve through `firstparty serve` (or pass the settings through "
                          "provision.generate_missing), which creates it in server.data_dir")
    upstreams = Upstreams.from_settings(settings.upstream)  # validates URLs before anything opens
    segment = SegmentUpstreams.from_settings(settings.segment)
    app = web.Application(client_max_size=settings.server.max_body_bytes)
    app.on_response_prepare.append(server_header)
    app[SETTINGS] = settings
    app[BODY_BUDGET] = BodyBudget(settings.server.max_inflight_body_bytes)
    app[LIVE] = LiveFeed()  # the live view's feed: idle (and free) until someone watches
    front = app[FRONT] = Front(settings, upstreams, segment)
    proxy = app[PROXY] = Proxy(front)
    probes = app[PROBES] = Probes(front)
    edge = app[EDGE] = Edge(front)
    add_routes(app, settings, edge, proxy, probes)

    # Built here (TLS context, ca_file checked: a bad file fails start-up with
    # one line), opened in the clean-up context below.
    client = UpstreamClient(
        max_connections_per_host=settings.upstream.max_connections,
        timeout=settings.upstream.timeout_seconds,
        ca_file=settings.upstream.ca_file,
        proxies={"https": settings.upstream.https_proxy, "http": settings.upstream.http_proxy},
        no_proxy=settings.upstream.no_proxy,
    )
    # One clean-up context per resource, in the order they depend on each
    # other; aiohttp closes them in reverse (the sender drains first, through
    # a client that is still open, into a spool and a log still open).
    app[UPSTREAM] = client
    app.cleanup_ctx.extend(
        [_client_ctx, _store_ctx, _forwarded_ctx, _metrics_ctx, _spool_ctx, _sender_ctx, _bind_ctx]
    )
    return app


def add_routes(app: web.Application, settings: Settings, edge: Edge, proxy: Proxy, probes: Probes) -> None:
    """Every path the proxy answers on its main listener, each with what the
    edge needs to know of it (``web.edge.Spec``): one table, aiohttp's."""
    cross = proxy.cross
    add = partial(edge.add, app)
    server = settings.server
    mixpanel = partial(Spec, error=MIXPANEL.error, verbose=MIXPANEL.verbose)  # a Mixpanel-shaped route
    # Every route by every name it answers to: its own, and the aliases that name
    # it (mixpanel-js's api_routes: {track: "e/"} -> e = "track"), with and
    # without the trailing slash the SDKs add.
    names = [(name, name) for name in sorted(EVENT_ROUTES | QUERY_ROUTES)]
    names += sorted(server.route_aliases.items())
    for mount in server.mounts:
        for spelling, route in names:
            for trailing in ("", "/"):
                if route in EVENT_ROUTES:
                    handler = proxy.events(route, f"/{route}{trailing}")
                    add(f"{mount}{spelling}{trailing}", handler, mixpanel(route, sheds=True))
                else:
                    add(f"{mount}{spelling}{trailing}", proxy.queries(route, f"/{route}{trailing}"), mixpanel(route))
                if route == "flags":
                    add(f"{mount}{spelling}/{{flag}}/first-time-events{trailing}", proxy.queries("flags-first-time"),
                        mixpanel("flags-first-time"))
        for name in LIB_PATHS:
            add(f"{mount}{name}", only(GET, partial(proxy.cdn.mixpanel_lib, name=name)), Spec("lib", error=text_error, cors=False))
        add_crossdomain(app, edge, mount, proxy)
        # Anything else under the mount: Mixpanel's 404 (and, for a path with
        # repeated slashes, the route without them: ``web.edge``).
        add(f"{mount}{{tail:.*}}", proxy.not_found, mixpanel(UNKNOWN))
    # Segment: analytics.js's per-call paths (/v1/t ...), its batches (/v1/b),
    # the HTTP API's names and /v1/batch of the server SDKs.
    # analytics.js, its bundles and settings first-party (/seg/cdn/...), and
    # its own metrics (/v1/m), answered here and not forwarded.
    segment = partial(Spec, error=SEGMENT.error, verbose=SEGMENT.verbose)
    for mount in settings.segment.mounts:
        for route in sorted(segment_protocol.EVENT_ROUTES):
            add(f"{mount}v1/{route}", proxy.events(route, f"/v1/{route}", SEGMENT), segment(route, sheds=True))
        add(f"{mount}v1/m", proxy.sdk_metrics, segment("sdk-metrics"))
        # The same cross-domain endpoints as under /mp/: nothing in them is Mixpanel's.
        add_crossdomain(app, edge, mount, proxy)
        add(f"{mount}cdn/{{tail:.*}}", proxy.cdn.segment(mount), Spec("cdn", error=text_error, cors=False))
    for mount in server.decide_mounts:  # /mp-decide/decide: the legacy decide endpoint on its own host
        for trailing in ("", "/"):
            add(f"{mount}decide{trailing}", proxy.queries("decide", f"/decide{trailing}"), mixpanel("decide"))
        add(f"{mount}{{tail:.*}}", proxy.not_found, mixpanel(UNKNOWN))
    app.router.add_route("*", "/hub/resolve", only(GET, cross.hub_resolve))
    app.router.add_route("*", "/hub/ping", only(GET, cross.hub_ping))
    # For load balancers; /metrics and /readyz are on the ops listener only (web/ops).
    app.router.add_route("*", "/healthz", only(GET, probes.healthz))


async def _client_ctx(app: web.Application) -> AsyncIterator[None]:
    await app[UPSTREAM].open()
    yield
    await app[UPSTREAM].close()


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    store = app[STORE] = AliasStore.from_settings(app[SETTINGS].store)
    yield
    await store.close()


async def _forwarded_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    forwarded = app[FORWARDED] = ForwardedLog(
        settings.forwarded_log_path, max_bytes=settings.log.max_bytes, backups=settings.log.backups,
        retention_days=settings.log.retention_days,
    )
    forwarded.start()
    yield
    await forwarded.close()


async def _metrics_ctx(app: web.Application) -> AsyncIterator[None]:
    metrics = app[METRICS] = Metrics()
    if not metrics.shared:
        yield
        return
    # Several workers: the per-request counters reach the shared files every
    # second (and before a scrape this worker answers).
    async def copy_every_second() -> None:
        while True:
            await asyncio.sleep(1)
            metrics.copy_to_shared()

    task = asyncio.create_task(copy_every_second())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    metrics.copy_to_shared()


async def _spool_ctx(app: web.Application) -> AsyncIterator[None]:
    """Spool mode: the durable queue (sync mode has none)."""
    delivery = app[SETTINGS].delivery
    if delivery.mode != "spool":
        yield
        return
    spool: Queue
    if delivery.queue == "jetstream":
        from ..services.queue.jetstream import JetStreamQueue

        spool = app[SPOOL] = JetStreamQueue(delivery, app[FRONT].endpoints)
    else:
        spool = app[SPOOL] = Spool(
            app[SETTINGS].spool_path, max_rows=delivery.max_rows, fsync=delivery.fsync,
            min_free_bytes=delivery.min_free_bytes, max_dead=delivery.max_dead_letters,
            dead_seconds=delivery.dead_letter_days * 86400,
        )
    await spool.open()
    yield
    await spool.close()


async def _sender_ctx(app: web.Application) -> AsyncIterator[None]:
    """Spool mode: the background sender; stopped once the server stopped
    accepting and the in-flight requests finished, after sending what it can
    within ``delivery.drain_seconds`` (the rest stays spooled)."""
    if SPOOL not in app:
        yield
        return
    settings = app[SETTINGS]
    spool = app[SPOOL]
    feed = None  # the local spool's (``delivery.SpoolFeed``)
    if settings.delivery.queue == "jetstream":
        from ..services.queue.jetstream import JetStreamQueue, StreamFeed

        assert isinstance(spool, JetStreamQueue)  # delivery.queue chose it (_spool_ctx)
        feed = StreamFeed(spool)
    sender = app[SENDER] = Sender(
        spool,
        app[UPSTREAM],
        dict(app[FRONT].endpoints),
        settings.delivery,
        app[FORWARDED],
        timeout=settings.upstream.timeout_seconds,
        protocols={MIXPANEL.name: MIXPANEL, SEGMENT.name: SEGMENT},
        metrics=app[METRICS],
        live=app[LIVE],
        feed=feed,
    )
    spool.on_commit = sender.accept
    spool.on_state = lambda accepting: app[METRICS].spool_accepting.set(1 if accepting else 0)
    if not spool.accepting:
        app[METRICS].spool_accepting.set(0)
    sender.start()
    yield
    await sender.stop(asyncio.get_running_loop().time() + settings.delivery.drain_seconds)


async def _bind_ctx(app: web.Application) -> AsyncIterator[None]:
    """Hand the opened resources to the handlers."""
    settings = app[SETTINGS]
    services = app[SERVICES] = Services(
        settings=settings,
        store=app[STORE],
        upstreams=app[FRONT].upstreams,
        client=app[UPSTREAM],
        forwarded=app[FORWARDED],
        metrics=app[METRICS],
        spool=app.get(SPOOL),
        sender=app.get(SENDER),
        live=app[LIVE],
    )
    app[FRONT].bind(
        services, CookieJar(**asdict(settings.cookie)), OriginPolicy(settings.cors.allowed_origins), SimpleMemoryCache(timeout=None)
    )
    yield
