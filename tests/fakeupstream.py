"""A recording fake of Mixpanel's upstreams (api, api-eu, api-in, decide, cdn).

It answers like Mixpanel (``1`` / ``{"status":1,"error":null}``, flags and
decide JSON, the library script), records every request it receives, and
notes surprises: a ``Cookie`` header, a hop-by-hop header, a token-looking
secret; the fixture fails the test at teardown if any was seen.
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
from typing import Any
from urllib.parse import parse_qsl

import orjson
from aiohttp import web

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
            self.requests.append(rec)
            if "cookie" in headers:
                self.surprises.append(f"{name}: Cookie header forwarded: {headers['cookie']!r}")
            for h in HOP_BY_HOP:
                if h in headers:
                    self.surprises.append(f"{name}: hop-by-hop header {h} forwarded")
            if self.behave is not None:
                answer = await self.behave(rec)
                if answer is not None:
                    if answer.status >= 300:
                        self.requests.remove(rec)
                        self.refused.append(rec)
                    return answer
            if self.script:
                status, payload, extra = self.script.popleft()
                return web.Response(status=status, body=payload, headers=extra)
            return self.default_answer(name, request, body)

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

    @staticmethod
    def default_answer(name: str, request: web.Request, body: bytes) -> web.Response:
        path = request.path.rstrip("/")
        if name == "cdn":
            return web.Response(body=LIB_JS, content_type="application/javascript")
        if name == "seg-cdn":  # Segment's CDN: settings per write key, scripts
            parts = path.split("/")
            if len(parts) == 5 and parts[1:3] == ["v1", "projects"] and parts[4] == "settings":
                return web.json_response(segment_settings(parts[3]))
            if path.endswith(".js"):
                return web.Response(body=AJS_JS, content_type="application/javascript")
            return web.Response(status=404, text="Not Found")
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
