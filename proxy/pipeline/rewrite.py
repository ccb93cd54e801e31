"""Stage 4, rewrite: bridge tokens out of every event, ids made canonical.

Tokens are stripped from every string of an event whether they were honoured
or not (``protocol.strip_tokens``). Only ids that are keys of a resolution's
mapping change (``protocol.rewrite``); user ids never do.
"""

from __future__ import annotations

from .context import Context
from .exchange import Exchange


def rewrite(x: Exchange, c: Context) -> None:
    protocol, route = x.protocol, x.route
    events = x.payload.events if x.payload is not None else []
    if x.mentioned:
        stripped = x.stripped = sum(protocol.strip_tokens(route, e, c.token_param) for e in events)
        if stripped:
            c.s.metrics.tokens_stripped.inc(stripped)
    if x.anonymous:
        return
    per_event = x.per_event
    for a, b, part in x.parts:
        mapping = part.mapping
        if mapping:
            if not per_event:  # the runs before this one: nothing to rewrite
                per_event += [[] for _ in range(a)]
            per_event += [protocol.rewrite(route, e, mapping) for e in events[a:b]]
        elif per_event:
            per_event += [[] for _ in range(a, b)]
