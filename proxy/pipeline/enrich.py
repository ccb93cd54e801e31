"""Stage 5, enrich: what the visitor's earlier events knew, added to these.

Carried properties (``core.carry``): the values this visitor's events set
before, on any domain, are added where missing, and what these set is kept.
First touch (the protocol's ``first_touch``, for protocols that keep one): the first
external touch is kept once per canonical id, and a touch that names one of
the site's own domains (a visitor crossing between them) is repaired to it.
Browser events only; anonymised ones are left alone.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from ..core import carry
from ..core.identity import Resolution
from ..core.rewrite import Rewrite
from ..protocols.base import Touches, WireProtocol
from .context import Context
from .exchange import Exchange


def enrich(x: Exchange, c: Context) -> Coroutine[Any, Any, None] | None:
    """Nothing to add (not a browser's, anonymised, or neither rule on): done at
    once; else the coroutine that reads what the store kept for this visitor."""
    protocol, route = x.protocol, x.route
    carries = c.carry is not None and route in protocol.spooled_routes
    touches = bool(c.own_domains) and protocol.first_touch is not None
    if x.anonymous or not x.visit.browser or not (carries or touches):
        if x.per_event:
            count_rewrites(x, c)
        return None
    return _enrich(x, c, carries, touches)


def count_rewrites(x: Exchange, c: Context) -> None:
    if x.per_event:
        count = sum(map(len, x.per_event))
        if count:
            c.s.metrics.rewrites.inc(count)


async def _enrich(x: Exchange, c: Context, carries: bool, touches: bool) -> None:
    protocol, route = x.protocol, x.route
    events = x.payload.events if x.payload is not None else []
    for a, b, part in x.parts:
        if not part.canonical:
            continue
        if carries:
            x.changed |= await carry_properties(c, protocol, route, events[a:b], part.canonical)
        if touches:
            assert protocol.first_touch is not None
            touched = await first_touch(c, protocol.first_touch, route, events[a:b], part)
            if touched:
                per_event = x.per_event = x.per_event or [[] for _ in events]
                for i, changes in touched.items():
                    per_event[a + i] = per_event[a + i] + changes
                x.changed = True
    count_rewrites(x, c)


async def carry_properties(
    c: Context, protocol: WireProtocol, route: str, events: list[dict[str, Any]], canonical: str
) -> bool:
    """Carried properties added where missing, the new ones kept. True when an event gained one."""
    assert c.carry is not None
    store = c.s.store
    kept = await store.carried(canonical)
    running = dict(kept)
    seen: dict[str, Any] = {}
    changed = False
    for event in events:
        props = protocol.properties(route, event)
        if props is None:
            continue
        changed |= bool(carry.add_missing(props, running))
        fresh = carry.collect(props, c.carry)
        seen.update(fresh)
        running.update(fresh)
    if seen and any(kept.get(k) != v for k, v in seen.items()):
        await store.set_carried(canonical, carry.merge(kept, seen))
    return changed


async def first_touch(
    c: Context, touches: Touches, route: str, events: list[dict[str, Any]], resolution: Resolution
) -> dict[int, list[Rewrite]]:
    """Keep this visitor's first external touch; repair what names one of
    our own domains instead (a profile's only after a domain hop, a bridge
    or the hub). Index -> rewrites."""
    canonical = resolution.canonical
    assert canonical is not None
    own_domains = c.own_domains
    hopped = resolution.source in ("bridge", "hub")
    out: dict[int, list[Rewrite]] = {}
    for i, event in enumerate(events):
        touch = touches.external(route, event, own_domains)
        if touch is not None:
            if canonical not in c.touches:  # kept once per id (set once, like the SDK)
                kept = await kept_touch(c, canonical)
                if not kept and await c.s.store.set_first_touch(canonical, touch):
                    remember_touch(c, canonical, touch)
            continue
        if touches.names_own(route, event, own_domains) or (hopped and touches.on_profile(route, event)):
            changes = touches.repair(route, event, await kept_touch(c, canonical), own_domains)
            if changes:
                out[i] = changes
    return out


async def kept_touch(c: Context, canonical: str) -> dict[str, Any]:
    """The first touch kept for ``canonical`` ({} if none yet): from this
    process's memo once known (a kept touch never changes), else the store."""
    kept = c.touches.get(canonical)
    if kept is not None:
        return kept
    kept = await c.s.store.first_touch(canonical)
    if kept:  # nothing kept yet may change (another instance): not memoised
        remember_touch(c, canonical, kept)
    return kept


def remember_touch(c: Context, canonical: str, touch: dict[str, Any]) -> None:
    if len(c.touches) >= 100_000:
        c.touches.clear()
    c.touches[canonical] = touch
