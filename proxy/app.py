"""The application factory: wires settings into services and routes, once.

Resources (the upstream HTTP client, the alias store, the forwarded log)
are opened and closed in the app's ``cleanup_ctx``, so tests and the server
get the same lifecycle and nothing outlives the app.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiocache import SimpleMemoryCache
from aiohttp import web

from .cookie import CookieJar
from .cors import OriginPolicy
from .delivery import Sender
from .forwardlog import ForwardedLog
from .handlers import EVENT_ROUTES, Proxy, Services
from .httpclient import HTTPClient
from .metrics import Metrics
from .settings import Settings
from .spool import Spool
from .store import AliasStore
from .upstream import Upstreams

SERVICES = web.AppKey("services", Services)


def create_app(settings: Settings) -> web.Application:
    upstreams = Upstreams.from_settings(settings.upstream)  # validates URLs before anything opens
    app = web.Application(
        client_max_size=settings.server.max_body_bytes,
        # Bodies arrive as sent: codec inflates gzip itself, bounded, and an
        # unchanged gzip body is forwarded as it came.
        handler_args={"auto_decompress": False},
    )

    async def resources(app: web.Application) -> AsyncIterator[None]:
        client = HTTPClient(
            max_connections_per_host=settings.upstream.max_connections,
            timeout=settings.upstream.timeout_seconds,
        )
        store = AliasStore.from_settings(settings.store)
        forwarded = ForwardedLog(
            settings.forwarded_log_path, max_bytes=settings.log.max_bytes, backups=settings.log.backups
        )
        forwarded.start()
        metrics = Metrics()
        spool = sender = None
        if settings.delivery.mode == "spool":
            spool = Spool(settings.spool_path, max_rows=settings.delivery.max_rows, fsync=settings.delivery.fsync)
            await spool.open()
            sender = Sender(
                spool,
                client,
                dict(upstreams.regions),
                settings.delivery,
                forwarded,
                timeout=settings.upstream.timeout_seconds,
                metrics=metrics,
            )
            spool.on_commit = sender.accept
            sender.start()
        services = Services(
            settings=settings,
            jar=CookieJar(settings.cookie),
            origins=OriginPolicy(settings.cors.allowed_origins),
            store=store,
            upstreams=upstreams,
            client=client,
            forwarded=forwarded,
            lib_cache=SimpleMemoryCache(timeout=None),
            metrics=metrics,
            spool=spool,
            sender=sender,
        )
        app[SERVICES] = services
        proxy.bind(services)
        try:
            yield
        finally:
            # The server has stopped accepting and in-flight requests are done:
            # send what can be sent within drain_seconds, keep the rest spooled.
            if sender is not None:
                await sender.stop(asyncio.get_running_loop().time() + settings.delivery.drain_seconds)
            if spool is not None:
                await spool.close()
            await forwarded.close()
            await client.close()
            await store.close()

    app.cleanup_ctx.append(resources)
    proxy = Proxy(settings)
    # The SDKs' hot paths get plain routes (a dict lookup in aiohttp's router);
    # everything else under /mp/ reaches the same handler through the catch-all.
    for name in EVENT_ROUTES:
        for path in (f"/mp/{name}", f"/mp/{name}/"):
            app.router.add_route("*", path, proxy.mp)
    cross = proxy.cross
    app.router.add_get("/mp/go", cross.go)
    app.router.add_route("POST", "/mp/bridge", cross.bridge)
    app.router.add_route("OPTIONS", "/mp/bridge", proxy.preflight_route)
    app.router.add_get("/mp/id", cross.identity)
    app.router.add_get("/mp/link.js", cross.link_js)
    app.router.add_get("/mp/hub.js", cross.hub_js)
    app.router.add_get("/hub/resolve", cross.hub_resolve)
    app.router.add_get("/hub/ping", cross.hub_ping)
    app.router.add_route("*", "/mp/{tail:.*}", proxy.mp)
    app.router.add_route("*", "/mp-decide/{tail:.*}", proxy.mp_decide)
    app.router.add_get("/healthz", proxy.healthz)
    app.router.add_get("/readyz", proxy.readyz)
    app.router.add_get("/metrics", proxy.metrics)
    return app
