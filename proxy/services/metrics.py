"""Prometheus metrics, one registry per app (no module-level state).

Served at ``/metrics`` on the ops listener. With several workers
(``server.workers``) prometheus-client's multiprocess mode is on: every
worker writes its samples to memory-mapped files in one directory
(``enable_multiprocess``, before the metrics are built), and whichever worker
a scrape reaches answers with the totals of all of them (counters and
histograms summed, spool gauges summed over the live workers, the oldest
age their maximum). The per-request ``HotCounter``s stay plain dicts and are
copied into their multiprocess counters every second and before a scrape.

Identity-source counters make fragmentation a number on a dashboard: a
healthy cross-domain setup shows ``cookie`` (and later ``bridge``/``hub``)
growing, ``new`` only for first visits.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess, values
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

CONTENT_TYPE = CONTENT_TYPE_LATEST
_STATUS = {code: str(code) for code in range(100, 600)}


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def enable_multiprocess(directory: Path) -> None:
    """In a worker process, before its ``Metrics`` are built: samples go to
    files under ``directory`` (one per process), shared by every worker."""
    os.environ[MULTIPROC_ENV] = str(directory)
    values.ValueClass = values.MultiProcessValue()


def reset_multiprocess_dir(directory: Path) -> None:
    """Before the workers start: no samples of an earlier run are counted."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()


def worker_exited(pid: int) -> None:
    """A worker is gone: its live gauges (spool depth) stop counting."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)


class HotCounter(Collector):
    """A labelled counter bumped on every request: a plain dict of floats, turned
    into Prometheus samples only when scraped. A ``prometheus_client.Counter``
    takes a lock per increment, which the request path can do without (one
    event loop thread writes these)."""

    def __init__(self, name: str, documentation: str, labels: list[str], registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.counts: dict[tuple[str, ...], float] = {}
        registry.register(self)
        # Multiprocess mode: a file-backed counter the counts are copied into.
        self._shared: Counter | None = None
        self._copied: dict[tuple[str, ...], float] = {}
        if os.environ.get(MULTIPROC_ENV):
            self._shared = Counter(name, documentation, labels, registry=None)

    def inc(self, key: tuple[str, ...], amount: float = 1) -> None:
        counts = self.counts
        counts[key] = counts.get(key, 0) + amount

    def copy_to_shared(self) -> None:
        if self._shared is None:
            return
        for key, value in list(self.counts.items()):
            delta = value - self._copied.get(key, 0)
            if delta:
                self._shared.labels(*key).inc(delta)
                self._copied[key] = value

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, value in list(self.counts.items()):
            family.add_metric(list(key), value)
        yield family

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, labels=self.labels)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = HotCounter(
            "firstparty_requests", "Client requests by route and answer status", ["route", "status"], registry=r
        )
        self.events_accepted = HotCounter(
            "firstparty_events_accepted", "Events and profile updates accepted from clients", ["route"], registry=r
        )
        self.identity_sources = HotCounter(
            "firstparty_identity_source", "Where a request's canonical id came from", ["source"], registry=r
        )
        self.events_by_source = HotCounter(
            "firstparty_events",
            "Events accepted, by protocol and where their canonical id came from",
            ["protocol", "source"],
            registry=r,
        )
        self.rewrites = Counter("firstparty_rewrites", "Identity fields rewritten to a canonical id", registry=r)
        self.bad_requests = Counter("firstparty_bad_requests", "Requests refused as bad input (400/413)", registry=r)
        self.shed = Counter(
            "firstparty_shed_requests",
            "Event requests answered 503 at once because server.max_inflight_requests were in progress",
            registry=r,
        )
        self.memory_trims = Counter(
            "firstparty_memory_trims", "Freed memory handed back to the system after a drained backlog (malloc_trim)",
            registry=r,
        )
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
        self.consent_dropped = Counter(
            "firstparty_consent_dropped",
            "Events dropped because the browser refused tracking, by signal: opt_out_cookie, mixpanel_opt_out,"
            " gpc, dnt, token, segment_consent",
            ["reason"],
            registry=r,
        )
        self.consent_anonymised = Counter(
            "firstparty_consent_anonymised",
            "Events of refusing browsers sent without identity or IP (consent.mode = anonymise), by signal",
            ["reason"],
            registry=r,
        )
        self.bot_events = Counter(
            "firstparty_bot_events",
            "Browser events of crawlers, monitors and headless browsers (privacy.bots), by the list's class"
            " (search-engine, seo, monitoring, browser-automation...) and what became of them: dropped, flagged",
            ["class", "action"],
            registry=r,
        )
        self.urls_scrubbed = Counter(
            "firstparty_urls_scrubbed",
            "URL-valued fields that lost query parameters (privacy.scrub_query_params, keep_query_params)",
            registry=r,
        )
        self.tokens_stripped = Counter(
            "firstparty_tokens_stripped", "Token parameters removed from URL properties before forwarding", registry=r
        )
        # Each worker has its own spool: depths add up, the oldest is the oldest of all.
        self.spool_depth = Gauge(
            "firstparty_spool_depth", "Events waiting in the spool", registry=r, multiprocess_mode="livesum"
        )
        self.spool_oldest = Gauge(
            "firstparty_spool_oldest_age_seconds",
            "Age of the oldest event waiting in the spool",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.spool_accepting = Gauge(
            "firstparty_spool_accepting",
            "1 while the spool takes new events, 0 while it refuses them (disk nearly full or refusing writes)",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.spool_accepting.set(1)
        self.dead_letters = Gauge(
            "firstparty_dead_letters", "Events in the dead-letter table", registry=r, multiprocess_mode="livesum"
        )
        self.store_errors = Gauge(
            "firstparty_store_errors", "Alias store failures since start", registry=r, multiprocess_mode="livesum"
        )
        self.live_relay_dropped = Gauge(
            "firstparty_live_relay_dropped",
            "Live-view records not copied to another worker since start (its buffer was full: it was not reading)",
            registry=r, multiprocess_mode="livesum",
        )
        self._hot = [self.requests, self.events_accepted, self.identity_sources, self.events_by_source]
        self.dead_letter_reasons = Counter(
            "firstparty_dead_lettered",
            "Events moved to the dead-letter table, by reason (rejected, expired, http_401...)",
            ["reason"],
            registry=r,
        )

        # Labelled children, looked up once: .labels() is a measurable cost per request.
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def request(self, route: str, status: int) -> None:
        self.requests.inc((route, _STATUS.get(status) or str(status)))

    def source(self, source: str) -> None:
        self.identity_sources.inc((source,))

    def accepted(self, route: str, n: int, protocol: str = "mixpanel", source: str = "none") -> None:
        self.events_accepted.inc((route,), n)
        self.events_by_source.inc((protocol, source), n)

    def dead_lettered(self, reason: str, n: int) -> None:
        self._child(self.dead_letter_reasons, reason).inc(n)

    def outcome(self, outcome: str, route: str, n: int) -> None:
        self._child(self.outcomes, outcome, route).inc(n)

    @property
    def shared(self) -> bool:
        """Multiprocess mode: a scrape answers for every worker."""
        return bool(os.environ.get(MULTIPROC_ENV))

    def copy_to_shared(self) -> None:
        for counter in self._hot:
            counter.copy_to_shared()

    def render(self) -> bytes:
        directory = os.environ.get(MULTIPROC_ENV)
        if not directory:
            return generate_latest(self.registry)
        self.copy_to_shared()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)
        return generate_latest(registry)
