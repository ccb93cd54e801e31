"""The operator's endpoints: ``/healthz`` (the process answers), ``/readyz``
(the store answers and the queue accepts events), ``/metrics`` (Prometheus),
``POST /forget`` (a backend removes what the proxy keeps about a visitor,
with a server key). ``/healthz`` is on the main listener for load balancers;
all of them on the ops listener (``web.ops``)."""

from __future__ import annotations

import logging
import os
from typing import Any

import orjson
from aiohttp import web

from ..core.apikeys import bearer
from ..services.metrics import CONTENT_TYPE
from .http import json_response, read_body
from .visit import Front


log = logging.getLogger(__name__)


class Probes:
    def __init__(self, front: Front) -> None:
        self.front = front

    async def metrics(self, request: web.Request) -> web.Response:
        s = self.front.s
        s.metrics.store_errors.set(s.store.errors)
        if s.live.relay is not None:
            s.metrics.live_relay_dropped.set(s.live.relay.dropped)
        return web.Response(body=s.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def healthz(self, request: web.Request) -> web.Response:
        # The pid tells which worker answered when several share the port.
        return json_response({"status": "ok", "pid": os.getpid()})

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready when the alias store answers and the spool accepts events."""
        s = self.front.s
        store_ok = await s.store.ping()
        body: dict[str, Any] = {"store": store_ok}
        ok = store_ok
        if s.spool is not None:
            spool_ok = s.spool.depth < s.spool.max_rows and s.spool.accepting
            body["spool"] = spool_ok
            if s.spool.refusing:
                body["spool_refusing"] = s.spool.refusing
            ok = ok and spool_ok
        return json_response(body, status=200 if ok else 503)

    async def forget(self, request: web.Request) -> web.Response:
        """``POST /forget {"id": "<canonical or original id>"}`` with
        ``Authorization: Bearer <server key>`` (``identity.api_keys_file``):
        everything the store keeps about that visitor removed
        (``AliasStore.forget``), and what went listed. The id is not logged."""
        keys = self.front.settings.identity.api_keys
        presented = bearer(request.headers.get("authorization"))
        name = keys.verify(presented) if keys is not None and presented else None
        if name is None:
            why = ("no server keys are configured (identity.api_keys_file)" if keys is None
                   else "a server key is needed: Authorization: Bearer <key>")
            return json_response({"error": why}, status=401, headers={"WWW-Authenticate": 'Bearer realm="firstparty"'})
        settings = self.front.settings
        if settings.server.workers > 1 and not settings.store.url.startswith("redis://"):
            # Each worker keeps its own records: one worker's forget would say done and not be.
            return json_response({"error": "with several workers the in-memory store is one per worker; "
                                           "forgetting needs store.url = \"redis://...\""}, status=409)
        try:
            body = orjson.loads(await read_body(request, settings.server) or b"{}")
        except orjson.JSONDecodeError:
            body = None
        given = body.get("id") if isinstance(body, dict) else None
        if not isinstance(given, str):
            return json_response({"error": 'the body must be {"id": "<canonical or original id>"}'}, status=400)
        try:
            removed = await self.front.s.store.forget(given)
        except ValueError as exc:
            return json_response({"error": str(exc)}, status=400)
        count = sum(map(len, removed.values()))
        log.info("forgot a visitor at the request of server key %r: %d records removed", name, count)
        return json_response({"removed": removed, "count": count})
