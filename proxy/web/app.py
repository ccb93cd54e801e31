"""The application: wires settings into services and routes, once.

``App.start`` opens the resources (the upstream HTTP client, the alias store,
the forwarded log, the spool and its sender) and ``App.stop`` closes them, so
tests and the server get the same lifecycle and nothing outlives the app.
``App.handle`` is the one entry point the HTTP server calls: a dict lookup
for every fixed path, a prefix test for ``/mp/...`` and ``/mp-decide/...``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiocache import SimpleMemoryCache

from ..core.cookie import CookieJar
from ..core.cors import OriginPolicy
from ..services.delivery import Sender
from ..core.forms import parse_pairs
from ..services.forwardlog import ForwardedLog
from .handlers import EVENT_ROUTES, Proxy, Services, error_response, wants_verbose
from ..httpclient import HTTPClient
from ..services.metrics import Metrics
from ..server import HTTPServer, Request, Response
from ..settings import Settings
from ..services.spool import Spool
from ..services.store import AliasStore
from ..services.upstream import Upstreams

Handler = Callable[[Request], Awaitable[Response]]
ANY = None  # a route that takes every method
GET = frozenset({"GET", "HEAD"})


class App:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.upstreams = Upstreams.from_settings(settings.upstream)  # validates URLs before anything opens
        self.proxy = proxy = Proxy(settings)
        self._services: Services | None = None
        self._closers: list[Callable[[], Awaitable[None]]] = []
        cross = proxy.cross
        routes: dict[str, tuple[frozenset[str] | None, Handler]] = {}
        # The SDKs' hot paths are plain dict hits; everything else under /mp/
        # reaches the same handler through the prefix test.
        for name in EVENT_ROUTES:
            for trailing in ("", "/"):
                routes[f"/mp/{name}{trailing}"] = (ANY, proxy.event_route(name, f"/{name}{trailing}"))
        routes["/mp/go"] = (GET, cross.go)
        routes["/mp/bridge"] = (frozenset({"POST", "OPTIONS"}), self._bridge)
        routes["/mp/id"] = (GET, cross.identity)
        routes["/mp/link.js"] = (GET, cross.link_js)
        routes["/mp/hub.js"] = (GET, cross.hub_js)
        routes["/hub/resolve"] = (GET, cross.hub_resolve)
        routes["/hub/ping"] = (GET, cross.hub_ping)
        routes["/healthz"] = (GET, proxy.healthz)
        routes["/readyz"] = (GET, proxy.readyz)
        routes["/metrics"] = (GET, proxy.metrics)
        self._routes = routes

    @property
    def services(self) -> Services:
        assert self._services is not None, "the app is not started"
        return self._services

    async def handle(self, request: Request) -> Response:
        route = self._routes.get(request.path)
        if route is not None:
            methods, handler = route
            if methods is not None and request.method not in methods:
                allow = ", ".join(sorted(methods))
                return Response(status=405, text=f"{request.method} is not allowed here\n", headers={"Allow": allow})
            return await handler(request)
        path = request.path
        if path.startswith("/mp/"):
            return await self.proxy.mp(request)
        if path.startswith("/mp-decide/"):
            return await self.proxy.mp_decide(request)
        return Response(status=404, text="404: Not Found\n")

    async def _bridge(self, request: Request) -> Response:
        if request.method == "OPTIONS":
            return self.proxy.preflight(request)
        return await self.proxy.cross.bridge(request)

    def http_server(self, handler: Handler | None = None) -> HTTPServer:
        """The HTTP front end for this app, with the limits its settings name;
        ``handler`` wraps ``handle`` (the tests' pages)."""
        server = self.settings.server
        return HTTPServer(
            handler or self.handle,
            max_body=server.max_body_bytes,
            keepalive_timeout=server.keepalive_timeout_seconds,
            request_timeout=server.request_timeout_seconds,
            refusal=self.refusal,
        )

    def refusal(self, status: int, message: str, target: bytes) -> Response:
        """The answer to a request the server refused before it was complete
        (too large, malformed): Mixpanel's error shape when the client asked
        for ``verbose``."""
        query = parse_pairs(target.partition(b"?")[2].decode("latin-1"))
        return error_response(status, message, wants_verbose(query))

    # ---------------------------------------------------------- lifecycle

    async def start(self) -> None:
        settings = self.settings
        client = HTTPClient(
            max_connections_per_host=settings.upstream.max_connections,
            timeout=settings.upstream.timeout_seconds,
        )
        self._closers.append(client.close)
        store = AliasStore.from_settings(settings.store)
        self._closers.append(store.close)
        forwarded = ForwardedLog(
            settings.forwarded_log_path, max_bytes=settings.log.max_bytes, backups=settings.log.backups
        )
        forwarded.start()
        self._closers.append(forwarded.close)
        metrics = Metrics()
        spool = sender = None
        if settings.delivery.mode == "spool":
            spool = Spool(settings.spool_path, max_rows=settings.delivery.max_rows, fsync=settings.delivery.fsync)
            await spool.open()
            self._closers.append(spool.close)
            sender = Sender(
                spool,
                client,
                dict(self.upstreams.regions),
                settings.delivery,
                forwarded,
                timeout=settings.upstream.timeout_seconds,
                metrics=metrics,
            )
            spool.on_commit = sender.accept
            sender.start()

            async def stop_sender() -> None:
                # The server has stopped accepting and in-flight requests are done:
                # send what can be sent within drain_seconds, keep the rest spooled.
                deadline = asyncio.get_running_loop().time() + settings.delivery.drain_seconds
                await sender.stop(deadline)

            self._closers.append(stop_sender)
        self._services = Services(
            settings=settings,
            jar=CookieJar(settings.cookie),
            origins=OriginPolicy(settings.cors.allowed_origins),
            store=store,
            upstreams=self.upstreams,
            client=client,
            forwarded=forwarded,
            lib_cache=SimpleMemoryCache(timeout=None),
            metrics=metrics,
            spool=spool,
            sender=sender,
        )
        self.proxy.bind(self._services)

    async def stop(self) -> None:
        """Close what ``start`` opened, last opened first."""
        while self._closers:
            await self._closers.pop()()


def create_app(settings: Settings) -> App:
    return App(settings)
