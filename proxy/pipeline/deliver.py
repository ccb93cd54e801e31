"""Stage 6, deliver: the events spooled (answered once durable) or forwarded now.

Spool mode (``delivery.mode = "spool"``, the protocol's spooled routes): the
request's rows go into the queue in one transaction, with the events too old
for the vendor as dead letters beside them (never queued); the sender
forwards the rows in batches. Otherwise the request goes upstream now: a
passthrough protocol's own request (Mixpanel's, re-encoded only when its
events changed), or a batch of its calls (Segment's). An unreachable
upstream is a 502 the SDK retries; the upstream's own answer is relayed.
"""

from __future__ import annotations

import time
from collections.abc import Coroutine
from typing import Any
from urllib.parse import urlencode

import orjson

from ..errors import UpstreamError
from ..protocols.base import EventFacts, events_per_batch
from ..services.queue.rows import DeadLetter, NewRow, letters_of, request_rows
from ..services.upstream import Endpoint, request_headers
from .context import Context
from .exchange import EXPIRED, FAILED, FORWARDED, SPOOLED, Exchange


def deliver(x: Exchange, c: Context) -> Coroutine[Any, Any, None]:
    """The way these events go: spooled, or forwarded now (its coroutine, for ``run`` to await)."""
    if c.s.spool is not None and x.route in x.protocol.spooled_routes:
        return spool(x, c)
    if x.protocol.passthrough:
        return forward_request(x, c)
    return forward_batch(x, c)


async def spool(x: Exchange, c: Context) -> None:
    s = c.s
    assert s.spool is not None and s.sender is not None
    protocol, route, payload = x.protocol, x.route, x.payload
    assert payload is not None
    # Batches mix visitors, so each event carries its visitor's IP for
    # geolocation when the client asked for it (ip=1). A server SDK's
    # events belong to many people: the peer is the backend, never theirs.
    wants_ip = payload.wants_ip and x.visit.browser
    ip = c.client(x)[0] if wants_ip else None
    # The SQLite spool keeps a request's consecutive events of one project
    # in one row (one B-tree cell, one id), up to what one upstream batch
    # holds; JetStream keeps one message per event.
    most = events_per_batch(protocol, c.settings.delivery.batch_size) if s.spool.rows_hold_requests else 1
    events = payload.events
    facts = [protocol.prepare(route, event, ip) for event in events]
    region_for = c.region_for[protocol.name]
    per_event = x.per_event
    rows: list[NewRow] = []
    for a, b, part in x.parts:  # each identity's events: rows of their own
        rows += request_rows(route, wants_ip, protocol.name, events[a:b], facts[a:b], per_event[a:b], region_for,
                             most, protocol.max_batch_bytes, part.canonical, part.source)
    letters: list[DeadLetter] = []
    if route in protocol.expiring_routes:
        # Events older than the vendor takes (Mixpanel's /track: 5 days) are dead
        # letters from the start: written with the request's rows, never queued.
        # A row's time is its oldest event's: one look per row, the usual answer.
        cutoff = time.time() - c.max_age_seconds
        for row in rows:
            if row.event_time is not None and row.event_time < cutoff:
                rows, letters = expired_apart(x, c, wants_ip, facts, most, cutoff)
                break
    # The rows hold the events now, as JSON: the decoded ones are let go before
    # the commit is awaited, not held by every request waiting on the disk.
    payload.release()
    events = []
    await s.spool.enqueue(rows, letters)  # PayloadTooLarge (over a JetStream message), SpoolFull: refused
    if letters:
        s.sender.dead_on_arrival(letters)  # their records are the sender's, like every dead letter's
    for a, b, part in x.parts:
        s.metrics.accepted(route, b - a, protocol.name, part.source)
    for region in {row.region for row in rows}:
        s.sender.notify(region)
    if letters:
        old = [f for f in facts if _older(f, cutoff)]
        facts = [f for f in facts if not _older(f, cutoff)]
        x.accept(EXPIRED, [f.name for f in old])
    # The insert ids only for the live view (the sender pairs its deliveries with them).
    ids = [f.insert_id for f in facts] if s.live.watching else None
    x.accept(SPOOLED, [f.name for f in facts], ids=ids)
    x.answer = protocol.accepted(payload.verbose)


def _older(f: EventFacts, cutoff: float) -> bool:
    """Whether an event's time (when it has one) is before ``cutoff``."""
    return f.time is not None and f.time < cutoff


def expired_apart(
    x: Exchange, c: Context, wants_ip: bool, facts: list[EventFacts], most: int, cutoff: float
) -> tuple[list[NewRow], list[DeadLetter]]:
    """A request's rows again without its events older than ``cutoff``, and
    those events as dead letters (one each, as the sender buries them)."""
    protocol, route, events, per_event = x.protocol, x.route, x.events, x.per_event
    region_for = c.region_for[protocol.name]
    rows: list[NewRow] = []
    expired: list[NewRow] = []
    for a, b, part in x.parts:
        for old, into, size in ((False, rows, most), (True, expired, 1)):
            chosen = [i for i in range(a, b) if _older(facts[i], cutoff) == old]
            if chosen:
                into += request_rows(route, wants_ip, protocol.name, [events[i] for i in chosen],
                                     [facts[i] for i in chosen], [per_event[i] for i in chosen] if per_event else [],
                                     region_for, size, protocol.max_batch_bytes, part.canonical, part.source)
    days = c.settings.delivery.max_age_days
    return rows, letters_of(expired, "expired", f"event older than {days:g} days")


async def forward_request(x: Exchange, c: Context) -> None:
    """A passthrough protocol's request, forwarded now: its own body and query,
    re-encoded only when the events changed, the token parameter never."""
    protocol, payload, param = x.protocol, x.payload, c.token_param
    assert payload is not None
    query = x.query
    raw_query = x.raw_query
    content_type = x.headers.get("content-type")
    content_encoding = x.headers.get("content-encoding")
    body = x.body
    changed = x.changed or x.stripped or x.anonymous or any(x.per_event)
    if x.anonymous or not (payload.wants_ip and x.visit.browser):
        # No visitor's IP to geolocate (anonymised, privacy.forward_ip off, a
        # server SDK whose ip=1 would have the vendor geolocate the proxy):
        # ip=0 wherever the flag came (an event's own "ip" property still counts).
        if any(k == "ip" and v != "0" for k, v in query):
            query = [(k, "0" if k == "ip" else v) for k, v in query]
            raw_query = urlencode(query)
        if any(k == "ip" and v != "0" for k, v in payload.form.params):
            payload.form.params = [(k, "0" if k == "ip" else v) for k, v in payload.form.params]
            changed = True  # the body's own ip=1: re-encoded
    if param + "=" in raw_query:
        raw_query = urlencode([(k, v) for k, v in query if k != param])
    if changed:
        assert protocol.reencode is not None  # every passthrough protocol has one
        new_body, new_type, new_query = protocol.reencode(payload, [(k, v) for k, v in query if k != param])
        if new_query is not None:
            raw_query = new_query
        else:
            body, content_type = new_body, new_type
            content_encoding = None  # re-encoded uncompressed
    region = x.region = c.s.upstreams.region_for(x.project)
    target = x.path + ("?" + raw_query if raw_query else "")
    names = protocol.names(x.route, payload.events)
    # A server's IP is not its visitors': only a browser's, and only when asked for.
    anonymous = x.anonymous or not (x.visit.browser and payload.wants_ip)
    await forward(x, c, c.s.upstreams.regions[region], x.method, target, body, content_type, content_encoding,
                  names, anonymous=anonymous)


async def forward_batch(x: Exchange, c: Context) -> None:
    """Sync mode for a batching protocol (Segment): the request's calls, made
    ready as the sender would, go upstream as one batch now; its 2xx is
    answered in the SDK's words."""
    protocol, route, payload = x.protocol, x.route, x.payload
    assert payload is not None
    wants_ip = payload.wants_ip and x.visit.browser  # a server's IP is not its visitors'
    ip = c.client(x)[0] if wants_ip else None
    facts = [protocol.prepare(route, e, ip) for e in payload.events]
    project = facts[0].project if facts else None
    region = x.region = c.region_for[protocol.name](project)
    outbound = protocol.batch(route, wants_ip, [orjson.dumps(e) for e in payload.events], project)
    headers = [("content-type", outbound.content_type), ("user-agent", "firstparty-proxy")]
    names = [f.name for f in facts]
    try:
        upstream = await c.s.client.request(
            c.endpoints[region], "POST", outbound.target, headers, outbound.body, timeout=c.s.upstreams.timeout
        )
    except UpstreamError as exc:
        x.fail(exc, names, 502, ids=[f.insert_id for f in facts])
        x.answer = protocol.error(502, str(exc), True)
        return
    ids = [f.insert_id for f in facts]
    if 200 <= upstream.status < 300:
        c.s.metrics.accepted(route, len(names), protocol.name, x.parts[0][2].source)
        x.accept(FORWARDED, names, upstream.status, ids)
        x.answer = protocol.accepted(True)
    else:
        x.accept(FAILED, names, upstream.status, ids)
        x.upstream = upstream


async def forward(
    x: Exchange,
    c: Context,
    endpoint: Endpoint,
    method: str,
    target: str,
    body: object,
    content_type: str | None,
    content_encoding: str | None,
    names: list[str],
    *,
    anonymous: bool,
) -> None:
    """One request upstream now, its answer relayed (``Exchange.upstream``)."""
    ip, chain = (None, []) if anonymous else c.client(x)
    headers = request_headers(x.headers, x.route, ip, chain, content_type, content_encoding)
    if x.length is not None:  # a streamed body keeps its length (no chunked encoding upstream)
        headers.append(("content-length", str(x.length)))
    try:
        upstream = await c.s.client.request(endpoint, method, target, headers, body, timeout=c.s.upstreams.timeout)  # type: ignore[arg-type]
    except UpstreamError as exc:
        x.fail(exc, names, 502)
        x.answer = x.protocol.error(502, str(exc), x.verbose)
        return
    ok = 200 <= upstream.status < 300
    if ok and names:
        source = x.resolution.source if x.resolution else "none"
        c.s.metrics.accepted(x.route, len(names), x.protocol.name, source)
    x.accept(FORWARDED if ok else FAILED, names, upstream.status)
    x.upstream = upstream
