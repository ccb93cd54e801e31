"""A recording fake of the vendors: Mixpanel's upstreams (api, api-eu,
api-in, decide, cdn) and Segment's (api, events.eu1, cdn).

It answers like them (``1`` / ``{"status":1,"error":null}``, flags and decide
JSON, ``{"success": true}``, a workspace's settings, the SDK scripts),
records every request it receives, and notes surprises: a ``Cookie`` header,
a hop-by-hop header; the test suite's fixture fails a test at teardown if
any was seen.

The suite serves one fake per upstream (``name``: ``us``, ``cdn``,
``seg-us``, ``seg-cdn`` ...). ``firstparty fake-upstream`` serves them all on
one port (``ALL``: each request answered by what its path is), printing a
line per request, for a staging site that must not send real traffic: point
every ``upstream.*`` and ``segment.*`` URL at it.
"""

from __future__ import annotations

import asyncio
import socket
import base64
import time
import gzip
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import orjson
from aiohttp import web

ALL = "all"  # one port for every upstream, told apart by path (``firstparty fake-upstream``)
HOP_BY_HOP = ("connection-specific", "keep-alive", "proxy-authorization", "te", "trailer", "upgrade", "proxy-connection")
LIB_JS = b"/* fake mixpanel-js */ window.mixpanel = window.mixpanel || {};\n"
AJS_JS = b"/* fake analytics.js */ window.analytics = window.analytics || [];\n"
# Write keys whose workspace the fake Segment CDN places in the EU.
SEG_EU_WORKSPACES: set[str] = {"seg-write-key-eu", "seg-eu-unrouted"}


def segment_settings(write_key: str) -> dict[str, Any]:
    """A project's settings as Segment's CDN serves them (the fields analytics.js
    reads), its apiHost naming the workspace's region."""
    api_host = "events.eu1.segmentapis.com/v1" if write_key in SEG_EU_WORKSPACES else "api.segment.io/v1"
    return {
        "integrations": {
            "Segment.io": {
                "apiKey": write_key,
                "unbundledIntegrations": [],
                "addBundledMetadata": True,
                "maybeBundledConfigIds": {},
                "versionSettings": {"version": "4.4.7", "componentTypes": ["browser"]},
                "apiHost": api_host,
            }
        },
        "plan": {"track": {"__default": {"enabled": True, "integrations": {}}}},
        "edgeFunction": {},
        "analyticsNextEnabled": True,
        "middlewareSettings": {},
        "enabledMiddleware": {},
        "metrics": {"sampleRate": 0, "host": api_host},
        "legacyVideoPluginsEnabled": False,
        "remotePlugins": [
            {
                "name": "Example Destination (Actions)",
                "creationName": "Example Destination (Actions)",
                "libraryName": "example-destinationDestination",
                "url": "https://cdn.segment.com/next-integrations/actions/example/0123abcd.js",
                "settings": {"subscriptions": []},
            }
        ],
    }


@dataclass
class Recorded:
    name: str  # which upstream: us, eu, in, decide, cdn
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes
    at: float = 0.0  # monotonic arrival time

    def form(self) -> dict[str, str]:
        return dict(parse_qsl(self.body.decode(), keep_blank_values=True))

    def payload(self) -> Any:
        """The JSON the request carried, whatever form it came in."""
        body = self.body
        # aiohttp's server inflates a gzip'd request body itself (auto_decompress).
        if self.headers.get("content-encoding") == "gzip" and body[:2] == b"\x1f\x8b":
            body = gzip.decompress(body)
        if body[:1] in (b"[", b"{"):
            return orjson.loads(body)
        data = dict(parse_qsl(body.decode(), keep_blank_values=True)).get("data") if body else None
        if data is None:
            data = dict(self.query).get("data")
        assert data is not None, f"no data in {self}"
        if data.lstrip()[:1] in ("{", "["):
            return orjson.loads(data)
        return orjson.loads(base64.b64decode(data + "=" * (-len(data) % 4)))

    def events(self) -> list[dict[str, Any]]:
        p = self.payload()
        if isinstance(p, dict) and isinstance(p.get("batch"), list):  # Segment's /v1/batch
            return p["batch"]
        return p if isinstance(p, list) else [p]


@dataclass
class FakeUpstream:
    requests: list[Recorded] = field(default_factory=list)
    surprises: list[str] = field(default_factory=list)
    # Scripted answers, taken in order before the default one: (status, body, headers)
    script: deque[tuple[int, bytes, dict[str, str]]] = field(default_factory=deque)
    # A behaviour for fault tests: given the recorded request, return an answer
    # (or None for the default one); it may sleep to play a slow upstream.
    behave: Callable[[Recorded], Awaitable[web.Response | None]] | None = None
    # Requests that got a non-2xx answer are kept apart from accepted ones.
    refused: list[Recorded] = field(default_factory=list)
    # Requests whose head has arrived (their bodies may still be on the way).
    arrivals: int = 0
    # The real SDK builds to serve from the fake CDNs (else a one-line stand-in):
    # mixpanel-js's snippet build (npm mixpanel-browser's dist/mixpanel.min.js) and
    # analytics.js's standalone build and bundles (npm @segment/analytics-next's dist/umd).
    mixpanel_js: Path | None = None
    analytics_js: Path | None = None
    # Workspace settings name a destination plugin (on cdn.segment.com): the tests'
    # rewrite checks want it, a browser on a staging site would try to load it.
    plugins: bool = True
    # Called with each request as it is recorded (the command prints a line).
    on_request: Callable[[Recorded], None] | None = None
    # False: nothing is kept (a long-running staging fake prints and forgets).
    keep: bool = True

    def by(self, name: str | None = None, path_prefix: str = "") -> list[Recorded]:
        return [r for r in self.requests if (name is None or r.name == name) and r.path.startswith(path_prefix)]

    def received(self, name: str | None = None, path_prefix: str = "") -> list[dict[str, Any]]:
        """Every event or update received, in order, across requests."""
        return [e for r in self.by(name, path_prefix) for e in r.events()]

    async def wait(self, count: int = 1, name: str | None = None, path_prefix: str = "", timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until ``count`` events have arrived (spooled delivery is asynchronous)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while len(events := self.received(name, path_prefix)) < count:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"expected {count} events at {name or '*'}{path_prefix}, got {len(events)}")
            await asyncio.sleep(0.01)
        return events

    async def wait_for_requests(self, count: int = 1, timeout: float = 10.0) -> None:
        """Wait until ``count`` requests have arrived (recorded before they are answered)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.requests) + len(self.refused) < count:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"expected {count} requests, got {len(self.requests)}")
            await asyncio.sleep(0.01)

    def app(self, name: str) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            self.arrivals += 1  # counted before the body is read: a streamed body is still arriving
            body = await request.read()
            headers = {k.lower(): v for k, v in request.headers.items()}
            rec = Recorded(
                name, request.method, request.path, list(request.rel_url.query.items()), headers, body, time.monotonic()
            )
            if self.keep:
                self.requests.append(rec)
            if self.on_request is not None:
                self.on_request(rec)
            if "cookie" in headers:
                self.surprises.append(f"{name}: Cookie header forwarded: {headers['cookie']!r}")
            for h in HOP_BY_HOP:
                if h in headers:
                    self.surprises.append(f"{name}: hop-by-hop header {h} forwarded")
            if self.behave is not None:
                answer = await self.behave(rec)
                if answer is not None:
                    if answer.status >= 300 and self.keep:
                        self.requests.remove(rec)
                        self.refused.append(rec)
                    return answer
            if self.script:
                status, payload, extra = self.script.popleft()
                return web.Response(status=status, body=payload, headers=extra)
            return self.answer(name, request, body)

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", handle)
        return app

    async def serve(self, name: str = "us", sock: socket.socket | None = None) -> tuple[web.AppRunner, int]:
        """Serve one upstream on 127.0.0.1 outside the aiohttp fixtures (for a
        proxy in another process), on a port of its own, or on ``sock``: a
        port the test reserved (``support.reserve_port``) while this upstream
        was down. Returns (runner to clean up, port)."""
        runner = web.AppRunner(self.app(name))
        await runner.setup()
        site = web.SockSite(runner, sock) if sock is not None else web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, runner.addresses[0][1]

    def answer(self, name: str, request: web.Request, body: bytes) -> web.Response:
        """What the upstream ``name`` answers (``ALL``: the one its path names)."""
        path = request.path.rstrip("/")
        if name == ALL:
            name = role_of(path)
        if name == "cdn":
            if self.mixpanel_js is not None and path.startswith("/libs/"):
                return web.Response(body=self.mixpanel_js.read_bytes(), content_type="application/javascript")
            return web.Response(body=LIB_JS, content_type="application/javascript")
        if name == "seg-cdn":  # Segment's CDN: settings per write key, scripts
            parts = path.split("/")
            if len(parts) == 5 and parts[1:3] == ["v1", "projects"] and parts[4] == "settings":
                settings = segment_settings(parts[3])
                if not self.plugins:
                    settings["remotePlugins"] = []
                return web.json_response(settings)
            script = self._analytics_js(path)
            if script is not None:
                return web.Response(body=script, content_type="application/javascript")
            return web.Response(status=404, text="Not Found")
        return self.default_answer(name, request, body)

    def _analytics_js(self, path: str) -> bytes | None:
        """analytics.js as Segment's CDN serves it: the standalone script with the
        write key in it, and the bundles it loads."""
        if not path.endswith(".js"):
            return None
        if self.analytics_js is None:
            return AJS_JS
        parts = path.split("/")
        if path.startswith("/analytics.js/v1/") and len(parts) == 5:
            return (self.analytics_js / "standalone.js").read_bytes().replace(b"__WRITE_KEY__", parts[3].encode())
        bundle = self.analytics_js / parts[-1]
        if path.startswith("/analytics-next/bundles/") and bundle.is_file() and "/" not in parts[-1]:
            return bundle.read_bytes()
        return None

    @staticmethod
    def default_answer(name: str, request: web.Request, body: bytes) -> web.Response:
        path = request.path.rstrip("/")
        if name == "cdn":
            return web.Response(body=LIB_JS, content_type="application/javascript")
        if name.startswith("seg-"):  # Segment's tracking API
            if path != "/v1/batch":
                return web.json_response({"success": False, "message": f"no route {path}"}, status=404)
            return web.json_response({"success": True})
        if path.endswith("/decide"):
            return web.json_response({"notifications": [], "config": {"enable_collect_everything": False}})
        if path.startswith("/flags"):
            return web.json_response({"flags": {"new-checkout": {"variant_key": "on", "variant_value": True}}})
        if path == "/settings":
            return web.json_response({"settings": {}})
        if path == "/record":
            return web.json_response({"code": 200, "status": "OK"})
        verbose = request.query.get("verbose") == "1"
        if not verbose and request.content_type == "application/x-www-form-urlencoded":
            # mixpanel-python sends verbose=1 in the body, not the query.
            verbose = dict(parse_qsl(body.decode(errors="replace"))).get("verbose") == "1"
        if verbose:
            return web.json_response({"status": 1, "error": None})
        return web.Response(text="1", content_type="text/plain")


def role_of(path: str) -> str:
    """Which upstream a path on the one-port fake is for."""
    if path.startswith("/libs/"):
        return "cdn"
    if path.startswith(("/analytics.js/", "/analytics-next/", "/next-integrations/", "/v1/projects/")):
        return "seg-cdn"
    if path.startswith("/v1/"):
        return "seg-us"
    return "us"


def describe(rec: Recorded) -> str:
    """One line for a recorded request: what it carried, not its bytes."""
    line = f"{rec.method} {rec.path}"
    if rec.method != "POST":
        return line
    try:
        events = rec.events()
    except Exception:  # noqa: BLE001 - whatever it was, the line still names the request
        return line + f" ({len(rec.body)} bytes)"
    names = [str(e.get("event") or e.get("type") or "?") for e in events if isinstance(e, dict)]
    ids = {str((e.get("properties") or {}).get("$device_id") or e.get("anonymousId") or "")
           for e in events if isinstance(e, dict)} - {""}
    return line + f" {len(names)}x {', '.join(dict.fromkeys(names))}" + (f" (ids {', '.join(sorted(ids))})" if ids else "")


async def serve_fake(host: str, port: int, *, mixpanel_js: Path | None = None, analytics_js: Path | None = None,
                     printer: Callable[[str], None] = print) -> tuple[web.AppRunner, int]:
    """The one-port fake of both vendors (``firstparty fake-upstream``)."""
    fake = FakeUpstream(mixpanel_js=mixpanel_js, analytics_js=analytics_js, plugins=False, keep=False,
                        on_request=lambda rec: printer(describe(rec)))
    runner = web.AppRunner(fake.app(ALL), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, runner.addresses[0][1]
