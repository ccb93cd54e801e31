"""Stage 2, consent: a browser that refused tracking is not tracked.

A refusal (``core.consent``: opt-out cookies, GPC, DNT; a token carrying
another domain's refusal; Segment's ``context.consent`` per event) ends in
one of two outcomes, per ``consent.mode``: the events are dropped (answered
as accepted, so the SDK does not retry), or anonymised (counted without
identity: a throwaway id per request, no IP, nothing resolved, rewritten or
remembered; profile updates and identify calls dropped). Either way the
identity cookie is deleted when the answer is rendered (``Exchange.refused``).
"""

from __future__ import annotations

import uuid
from collections.abc import Coroutine
from typing import Any

from ..core import consent as rules
from ..core.identity import Resolution
from ..core.ids import valid_id
from ..protocols.mixpanel import RECORD_ACCEPTED
from .context import Context
from .exchange import Exchange


def consent(x: Exchange, c: Context) -> Coroutine[Any, Any, None] | None:
    """Decided at once, or (a request carrying a token) the coroutine that asks
    the token service whether the token carries a refusal."""
    protocol, route, visit = x.protocol, x.route, x.visit
    if not (visit.browser and route in protocol.spooled_routes):
        return None
    why = rules.refusal(x.headers, c.signals)
    if why is None and x.token:
        return _consent_with_token(x, c)
    if why is not None or protocol.event_consent:
        _decide(x, c, why)
    return None


async def _consent_with_token(x: Exchange, c: Context) -> None:
    _decide(x, c, await token_refusal(x, c, x.protocol.anonymous_ids(x.route, x.events)))


def _decide(x: Exchange, c: Context, why: str | None) -> None:
    protocol, route = x.protocol, x.route
    if why is None and protocol.event_consent:
        why = event_consent(x, c)
    if why is None:
        return
    x.refused = why
    if c.settings.consent.mode == "anonymise":
        anonymise(x, c, why)
    else:
        x.drop(why, protocol.names(route, x.events))
        x.answer = protocol.accepted(x.verbose)


async def token_refusal(x: Exchange, c: Context, named: list[str]) -> str | None:
    """"token" when the request's token carries another domain's refusal of
    tracking that this browser may apply (``services.tokens``), else None."""
    assert x.token is not None
    visit = x.visit
    valid = [i for i in named if valid_id(i)]
    owner = visit.hint or visit.cookie_id or (valid[0] if valid else f"landing:{uuid.uuid4().hex}")
    if await c.tokens.refusal_follows(x.token, visit.host, owner):
        return "token"  # refused on another domain; the refusal follows the visitor
    return None


def event_consent(x: Exchange, c: Context) -> str | None:
    """Events whose own consent (Segment's ``context.consent``) refuses tracking
    are dropped here; "segment_consent" when that is all of them."""
    settings = c.settings.consent
    protocol, payload = x.protocol, x.payload
    assert payload is not None
    if not settings.honor_segment_consent or not payload.mentions("categoryPreferences"):
        return None
    required = settings.segment_required_categories
    kept = [e for e in payload.events if not protocol.refuses(e, required)]
    if not kept:
        return "segment_consent"
    if len(kept) < len(payload.events):
        refused = [e for e in payload.events if protocol.refuses(e, required)]
        x.drop("segment_consent", protocol.names(x.route, refused))
        payload.events = kept
        x.changed = True  # the body changed: re-encoded if forwarded as is
    return None


def anonymise(x: Exchange, c: Context, why: str) -> None:
    """``consent.mode = "anonymise"``: the events that are more than identity
    go on under a throwaway id; the rest are dropped."""
    protocol, route, payload = x.protocol, x.route, x.payload
    assert payload is not None
    throwaway = f"anon-{uuid.uuid4()}"
    kept: list[Any] = []
    dropped: list[Any] = []
    for event in payload.events:
        (kept if protocol.anonymise(route, event, throwaway) else dropped).append(event)
    if dropped:
        x.drop(why, protocol.names(route, dropped))
    if not kept:
        x.answer = protocol.accepted(x.verbose)
        return
    payload.events = kept
    payload.wants_ip = False
    x.anonymous = True
    c.s.metrics.consent_anonymised.labels(why).inc(len(kept))
    x.parts = [(0, len(kept), Resolution(None, "anonymous"))]


async def replay_consent(x: Exchange, c: Context) -> None:
    """A session replay (``/record``) from a refusing browser is dropped: the
    most personal record of all is never anonymised."""
    if x.visit.browser:
        x.token = next((v for k, v in x.query if k == c.token_param), None)
    if not (x.visit.browser and x.route == "record"):
        return
    why = rules.refusal(x.headers, c.signals)
    if why is None and x.token:
        why = await token_refusal(x, c, [])
    if why:
        x.refused = why
        x.project = next((v for k, v in x.query if k == "token"), None)
        x.decoded = 1
        x.drop(why, ["$session_replay"])
        x.answer = RECORD_ACCEPTED
