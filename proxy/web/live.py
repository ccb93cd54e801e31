"""The live view on the ops listener: ``/live`` (a self-contained page, its
script and styles served here, no CDN, a strict CSP) and ``/live/events``,
server-sent events (``aiohttp-sse``) from ``services.live.LiveFeed``.

Invariants: the page and the stream are served only by the ops app (allowed
networks only); the feed records nothing while no ``/live/events`` stream is
open; a stream that stops reading loses its oldest records, never the
proxy's memory.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
from aiohttp import web
from aiohttp_sse import sse_response

from ..services.live import LiveFeed

ASSETS = Path(__file__).with_name("live_assets")
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_TYPES = {"index.html": "text/html", "live.js": "application/javascript", "live.css": "text/css"}
# A stream with nothing to say checks this often that its reader is still there.
IDLE_CHECK_SECONDS = 2.0


def _gone(request: web.Request) -> bool:
    """The reader closed the connection (aiohttp-sse's own check waits for its next ping)."""
    transport = request.transport
    return transport is None or transport.is_closing()


class LiveView:
    def __init__(self, feed: LiveFeed) -> None:
        self.feed = feed
        self._assets = {name: (ASSETS / name).read_bytes() for name in _TYPES}

    def _asset(self, name: str) -> web.Response:
        return web.Response(body=self._assets[name], content_type=_TYPES[name], charset="utf-8", headers=PAGE_HEADERS)

    async def page(self, request: web.Request) -> web.Response:
        return self._asset("index.html")

    async def script(self, request: web.Request) -> web.Response:
        return self._asset("live.js")

    async def styles(self, request: web.Request) -> web.Response:
        return self._asset("live.css")

    async def events(self, request: web.Request) -> web.StreamResponse:
        recent, queue = self.feed.watch()
        try:
            async with sse_response(request, headers={"Cache-Control": "no-store"}, send_timeout=10) as stream:
                for record in recent:
                    await stream.send(orjson.dumps(record).decode())
                while stream.is_connected() and not _gone(request):
                    try:
                        record = await asyncio.wait_for(queue.get(), IDLE_CHECK_SECONDS)
                    except TimeoutError:
                        continue
                    await stream.send(orjson.dumps(record).decode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.feed.unwatch(queue)
        return stream


def add_live_routes(app: web.Application, feed: LiveFeed) -> None:
    view = LiveView(feed)
    add = app.router.add_get
    add("/live", view.page)
    add("/live/", view.page)
    add("/live/live.js", view.script)
    add("/live/live.css", view.styles)
    add("/live/events", view.events)
