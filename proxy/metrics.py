"""Prometheus metrics, one registry per app (no module-level state).

Served at ``/metrics``. With several workers each process has its own
counters; scrape each, or sum them in Prometheus.

Identity-source counters make fragmentation a number on a dashboard: a
healthy cross-domain setup shows ``cookie`` (and later ``bridge``/``hub``)
growing, ``new`` only for first visits.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "firstparty_requests", "Client requests by route and answer status", ["route", "status"], registry=r
        )
        self.events_accepted = Counter(
            "firstparty_events_accepted", "Events and profile updates accepted from clients", ["route"], registry=r
        )
        self.identity_sources = Counter(
            "firstparty_identity_source", "Where a request's canonical id came from", ["source"], registry=r
        )
        self.rewrites = Counter("firstparty_rewrites", "Identity fields rewritten to a canonical id", registry=r)
        self.bad_requests = Counter("firstparty_bad_requests", "Requests refused as bad input (400/413)", registry=r)
        self.outcomes = Counter(
            "firstparty_delivery_outcomes",
            "Spooled events by outcome: forwarded, dead_letter, expired; retry counts attempts kept for later",
            ["outcome", "route"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "firstparty_upstream_latency_seconds",
            "Upstream request latency",
            ["region"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.tokens = Counter(
            "firstparty_identity_tokens",
            "Cross-domain tokens: issued_bridge, issued_hub, redeemed_bridge, redeemed_hub, expired, invalid,"
            " replayed, unlinked_host, bad_redirect",
            ["result"],
            registry=r,
        )
        self.device_cap = Counter(
            "firstparty_device_cap_exceeded", "Device ids not joined to a canonical id already holding the cap", registry=r
        )
        self.identity_resets = Counter(
            "firstparty_identity_resets",
            "Browsers that showed a new device id soon after the last one (reset()): given a new canonical id",
            registry=r,
        )
        self.tokens_stripped = Counter(
            "firstparty_tokens_stripped", "Token parameters removed from URL properties before forwarding", registry=r
        )
        self.spool_depth = Gauge("firstparty_spool_depth", "Events waiting in the spool", registry=r)
        self.spool_oldest = Gauge(
            "firstparty_spool_oldest_age_seconds", "Age of the oldest event waiting in the spool", registry=r
        )
        self.dead_letters = Gauge("firstparty_dead_letters", "Events in the dead-letter table", registry=r)
        self.store_errors = Gauge("firstparty_store_errors", "Alias store failures since start", registry=r)

        # Labelled children, looked up once: .labels() is a measurable cost per request.
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def request(self, route: str, status: int) -> None:
        self._child(self.requests, route, str(status)).inc()

    def source(self, source: str) -> None:
        self._child(self.identity_sources, source).inc()

    def accepted(self, route: str, n: int) -> None:
        self._child(self.events_accepted, route).inc(n)

    def outcome(self, outcome: str, route: str, n: int) -> None:
        self._child(self.outcomes, outcome, route).inc(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
