"""Privacy at the edge: what of a visitor leaves for the vendors.

Two stages, each one rule of ``[privacy]``:

``screen`` (after decode): a browser request whose user agent is on the
public list of crawlers, monitors and headless browsers (``core.bots``) is,
per ``privacy.bots``, dropped (answered as accepted, an outcome ``bot: <class>``
in the forwarded log), flagged (``$bot`` / ``context.bot`` on each event; no
identity resolved or created, no cookie set; profile updates and identify
calls dropped) or kept. Server SDKs' requests are never screened.

``scrub`` (after the ids are rewritten, before anything is kept or sent):
query parameters named by ``privacy.scrub_query_params`` (or, with
``keep_query_params``, every one not named there) leave every URL-valued
field of either protocol (``core.scrub``, the rule the bridge-token stripping
uses too); with ``privacy.forward_ip = false`` no IP of any kind travels.
"""

from __future__ import annotations

from typing import Any

from ..core.identity import Resolution
from ..protocols.mixpanel import RECORD_ACCEPTED
from .context import Context
from .exchange import Exchange

DROP, FLAG = "drop", "flag"


def bot_kind(x: Exchange, c: Context) -> str | None:
    """The crawler class of a browser request (None: not a crawler, or not screened)."""
    bots = c.bots
    if bots is None or not x.visit.browser:
        return None
    return bots.kind(x.headers.get("user-agent", ""))


def screen_query(x: Exchange, c: Context) -> None:
    """The query routes' screen: a crawler's session replay (``/record``) is
    dropped with ``drop``; otherwise its query goes on without identity (no
    id resolved or rewritten, no cookie, no IP): flags and decide answer it."""
    kind = bot_kind(x, c)
    if kind is None:
        return
    c.s.metrics.bot_events.labels(kind, "dropped" if c.bot_action == DROP else "flagged").inc()
    if c.bot_action == DROP and x.route == "record":
        x.decoded = 1
        x.drop(kind, ["$session_replay"], rule="bot")
        x.answer = RECORD_ACCEPTED
        return
    x.anonymous = True


def screen(x: Exchange, c: Context) -> None:
    kind = bot_kind(x, c)
    if kind is None:
        return
    protocol, route, payload = x.protocol, x.route, x.payload
    assert payload is not None
    events = payload.events
    c.s.metrics.bot_events.labels(kind, "dropped" if c.bot_action == DROP else "flagged").inc(len(events))
    if c.bot_action == DROP:
        x.drop(kind, protocol.names(route, events), rule="bot")
        x.answer = protocol.accepted(x.verbose)
        return
    kept: list[Any] = []
    dropped: list[Any] = []
    for event in events:
        (kept if protocol.mark_bot(route, event, kind) else dropped).append(event)
    if dropped:
        x.drop(kind, protocol.names(route, dropped), rule="bot")
    if not kept:
        x.answer = protocol.accepted(x.verbose)
        return
    payload.events = kept
    x.changed = True
    x.anonymous = True  # no identity: nothing resolved, rewritten, remembered, no cookie
    x.parts = [(0, len(kept), Resolution(None, "bot"))]


def scrub(x: Exchange, c: Context) -> None:
    payload = x.payload
    if payload is None:
        return
    protocol, route, events = x.protocol, x.route, payload.events
    rule = c.query_rule
    if rule is not None:
        clean = rule.clean  # remembers each URL's answer: a site's URLs repeat
        scrubbed = 0
        for event in events:
            scrubbed += protocol.scrub_urls(route, event, clean)
        if scrubbed:
            x.changed = True
            c.s.metrics.urls_scrubbed.inc(scrubbed)
    if not c.forward_ip:
        removed = False
        for event in events:
            removed |= protocol.forbid_ip(route, event)
        payload.wants_ip = False  # ip=0 upstream: nothing geolocated, no forwarding headers
        x.changed |= removed
