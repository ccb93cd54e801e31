"""The operator's endpoints: ``/healthz`` (the process answers), ``/readyz``
(the store answers and the queue accepts events), ``/metrics`` (Prometheus).
``/healthz`` is on the main listener for load balancers; all three on the
ops listener (``web.ops``)."""

from __future__ import annotations

import os
from typing import Any

from aiohttp import web

from ..services.metrics import CONTENT_TYPE
from .http import json_response
from .visit import Front


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
