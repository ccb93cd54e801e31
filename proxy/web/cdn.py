"""The vendors' SDKs served first-party: mixpanel-js under ``/mp/lib.min.js``,
analytics.js, its bundles and its settings under ``/seg/cdn/``.

Each asset is fetched from the vendor's CDN once, cached in memory
(``aiocache``) for its TTL, and served from the site's own origin, so filter
lists that block the vendors' CDNs do not stop the SDK from loading.

Invariants:
- only allow-listed paths are fetched (``protocols.segment_cdn.asset``,
  ``LIB_PATHS``): ``/seg/cdn/`` is not a general fetcher;
- one fetch per asset at a time, however many visitors ask at once (a cold
  cache at a traffic peak costs the CDN one request per asset, not one per
  visitor), and at most ``MAX_CACHED`` assets are kept: paths made up by a
  client (write keys by the thousand) are served through, never hoarded;
- redirects are followed and compressed answers arrive decoded: what is
  cached is the script itself;
- the settings are rewritten per request (the host the visitor used), never
  cached rewritten, and never stored by a shared cache (``private``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..errors import CdnRefused
from ..protocols import segment_cdn
from ..services.upstream import Endpoint
from .visit import Front

log = logging.getLogger(__name__)

LIB_PATHS = {"lib.min.js": "/libs/mixpanel-2-latest.min.js", "lib.js": "/libs/mixpanel-2-latest.js"}
LIB_CACHE_SECONDS = 3600
MAX_CACHED = 256
_HOST = re.compile(r"^[A-Za-z0-9.\-]{1,253}(?::[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]{2,45}\](?::[0-9]{1,5})?$")


class FirstPartyCdn:
    def __init__(self, front: Front) -> None:
        self.front = front
        self._inflight: dict[str, asyncio.Future[bytes]] = {}
        self._cached: dict[str, float] = {}  # cache key -> expiry (monotonic), to bound the cache
        self._warned_regions: set[str] = set()

    async def fetch(self, endpoint: Endpoint, path: str, ttl: int) -> bytes:
        """The asset at ``path`` on ``endpoint``: from the cache, from a fetch
        already under way, or fetched now. Raises ``UpstreamError`` (``CdnRefused`` among them)."""
        key = f"{endpoint.host_header}{path}"
        cache = self.front.lib_cache
        cached = await cache.get(key)
        if cached is not None:
            return bytes(cached)
        running = self._inflight.get(key)
        if running is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            upstream = await self.front.s.client.request(
                endpoint, "GET", path, [("accept", "*/*")], None,
                timeout=self.front.upstreams.timeout, follow_redirects=True,
            )
            if upstream.status != 200:
                raise CdnRefused(f"the CDN answered {upstream.status} for {path}")
            body = upstream.body
            if self._room_for(key):
                await cache.set(key, body, ttl=ttl)
                self._cached[key] = time.monotonic() + ttl
            future.set_result(body)
            return body
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody waited
            raise
        finally:
            del self._inflight[key]

    def _room_for(self, key: str) -> bool:
        if key in self._cached or len(self._cached) < MAX_CACHED:
            return True
        now = time.monotonic()
        for stale in [k for k, expiry in self._cached.items() if expiry <= now]:
            del self._cached[stale]
        return len(self._cached) < MAX_CACHED

    # ------------------------------------------------------------ routes

    async def mixpanel_lib(self, request: web.Request, name: str) -> web.Response:
        """mixpanel-js itself (``/mp/lib.min.js``), first-party, cached."""
        body = await self.fetch(self.front.upstreams.cdn, LIB_PATHS[name], LIB_CACHE_SECONDS)  # or 502 (the edge)
        return _script(body, LIB_CACHE_SECONDS)

    def segment(self, mount: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        """``<mount>cdn/<path>``: analytics.js, its bundles and its settings."""
        skip = len(mount) + len("cdn/")

        async def handle(request: web.Request) -> web.Response:
            if request.method not in ("GET", "HEAD"):
                return web.Response(status=405, text=f"{request.method} is not allowed here\n", headers={"Allow": "GET, HEAD"})
            asset = segment_cdn.asset(request.path[skip:])
            if asset is None:
                return web.Response(status=404, text="not a Segment CDN path this proxy serves\n")
            body = await self.fetch(self.front.segment.cdn, asset.path, asset.ttl)  # or 502 (the edge)
            if not asset.settings:
                return _script(body, asset.ttl)
            return self._settings(request, mount, asset, body)

        return handle

    def _settings(self, request: web.Request, mount: str, asset: segment_cdn.Asset, body: bytes) -> web.Response:
        host = self.front.public_host(request)
        if not _HOST.match(host):
            return web.Response(status=400, text="a Host header naming this site is needed to point the settings here\n")
        scheme = self.front.public_scheme(request)
        try:
            settings = segment_cdn.rewrite_settings(
                body,
                api_host=f"{host}{mount}v1",
                protocol=scheme,
                cdn_url=f"{scheme}://{host}{mount}cdn",
                cdn_origins=(self.front.segment.cdn.origin, segment_cdn.SEGMENT_CDN),
            )
        except ValueError as exc:
            return web.Response(status=502, text=f"the CDN's settings for this write key are not usable: {exc}\n")
        self._check_region(asset.write_key, settings.workspace_region)
        return web.Response(
            body=settings.body,
            content_type="application/json",
            # Rewritten for the host asked for: never shared between hosts by a cache.
            headers={"Cache-Control": f"private, max-age={asset.ttl}", "Vary": "Host, X-Forwarded-Host"},
        )

    def _check_region(self, write_key: str | None, workspace_region: str | None) -> None:
        """Warn once per write key whose settings name another region than the
        one its calls are sent to: Segment drops events sent to the wrong region."""
        if not write_key or not workspace_region or write_key in self._warned_regions:
            return
        routed = self.front.segment.region_for(write_key).removeprefix("segment-")
        if routed != workspace_region and len(self._warned_regions) < MAX_CACHED:
            self._warned_regions.add(write_key)
            log.warning(
                "Segment write key %s…: its workspace is in the %s region (its settings say so) but its calls are "
                "sent to %s; add it to segment.write_keys = { \"<key>\" = \"%s\" }",
                write_key[:6], workspace_region.upper(), routed.upper(), workspace_region,
            )


def _script(body: bytes, ttl: int) -> web.Response:
    return web.Response(
        body=body,
        content_type="application/javascript",
        charset="utf-8",
        headers={"Cache-Control": f"public, max-age={ttl}"},
    )
