"""The last stage, outcome: what became of the request's events, written once.

Each ``Outcome`` the stages recorded becomes a forwarded-log record (in the
one shape the sender writes too: ``forwardlog.outcome_record``), counters,
and, while someone watches, a live-view record. Spooled and expired events
get their records from the sender, when they are delivered or buried.
Events no stage settled are recorded as failed, and logged: a path that
forgets its outcome shows up here, not as a silent gap.
"""

from __future__ import annotations

import logging
import time

from ..lograte import Throttled
from ..services.forwardlog import outcome_record
from .context import Context
from .exchange import DROPPED, EXPIRED, FAILED, SPOOLED, Exchange, Outcome

log = logging.getLogger(__name__)
_quiet = Throttled(log)


def report(x: Exchange, c: Context) -> None:
    watching = c.s.live.watching if x.outcomes else False
    for o in x.outcomes:
        if o.kind == DROPPED:
            dropped(x, c, o)
        elif o.kind not in (SPOOLED, EXPIRED):
            forwarded(x, c, o)
        if watching and o.kind != EXPIRED and o.names:
            live(x, c, o)
    missing = x.decoded - x.settled if x.error is None else 0  # ``Exchange.unsettled``
    if missing:
        _quiet.log(logging.ERROR, "unsettled", "%d events of a %s request ended without an outcome", missing, x.route)
        o = Outcome(FAILED, ["?"] * missing, "no outcome recorded")
        x.outcomes.append(o)
        forwarded(x, c, o)


def dropped(x: Exchange, c: Context, o: Outcome) -> None:
    """Not tracked (consent refused, a bot): logged and counted, without any id."""
    metrics = c.s.metrics
    count = len(o.names)
    assert o.reason is not None
    rule, _, why = o.reason.partition(": ")
    if rule == "consent":
        metrics.consent_dropped.labels(why).inc(count)
    metrics.outcome(DROPPED, x.route, count)
    c.s.forwarded.record(outcome_record(DROPPED, x.route, x.project, o.names, reason=o.reason))


def forwarded(x: Exchange, c: Context, o: Outcome) -> None:
    """A synchronous forward (or its failure), as the sender records a batch."""
    resolution = x.resolution
    c.s.forwarded.record(
        outcome_record(
            o.kind, x.route, x.project, o.names, region=x.region, status=o.status,
            canonical_ids=[resolution.canonical] if resolution and resolution.canonical else [],
            sources=[resolution.source] if resolution else [],
            rewrites=[(r.field, r.original, r.canonical) for r in x.rewrites()],
            attempts=1, latency=time.perf_counter() - x.started, detail=o.reason,
        )
    )


def live(x: Exchange, c: Context, o: Outcome) -> None:
    resolution = None if o.kind == DROPPED else x.resolution
    c.s.live.request(
        protocol=x.protocol.name,
        route=x.route,
        host=x.visit.host,
        canonical=resolution.canonical if resolution else None,
        source=resolution.source if resolution else "none",
        rewrites=[] if o.kind == DROPPED else [(r.field, r.original, r.canonical) for r in x.rewrites()],
        names=o.names,
        ids=o.ids or [None] * len(o.names),
        outcome=o.kind,
        reason=o.reason,
        status=o.status,
    )
