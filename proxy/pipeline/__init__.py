"""The request pipeline: one ``Exchange`` through a fixed list of stages.

Read top-down, a request's whole path is here::

    EVENTS = decode -> screen -> consent -> identify -> rewrite -> scrub -> enrich -> deliver
    QUERIES = replay_consent -> screen_query -> read_query -> identify -> rewrite_query -> forward_query

and, after either, ``report`` (the outcome stage: forwarded log, counters,
live view). A stage is a plain function that reads and fills in the
Exchange, async where it waits on the store, the queue or the upstream (or
returning the coroutine that does: ``deliver`` picks its way); one that
answers (a drop, a failure) sets ``Exchange.answer`` and the rest are
skipped. A refusal (``errors.Refused``: a bad body, an id over the limit, a
full spool) ends the exchange with its status; the web layer renders it in
the vendor's shape. Stages see the Exchange, services, protocols and core,
never aiohttp or ``web``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ..errors import Refused
from .consent import consent, replay_consent
from .context import Context, Services
from .decode import decode
from .deliver import deliver
from .enrich import enrich
from .exchange import Exchange, Visit
from .identity import identify
from .outcome import report
from .privacy import screen, screen_query, scrub
from .query import forward_query, read_query, rewrite_query
from .rewrite import rewrite

Stage = Callable[[Exchange, Context], Awaitable[None] | None]

EVENTS: tuple[Stage, ...] = (decode, screen, consent, identify, rewrite, scrub, enrich, deliver)
QUERIES: tuple[Stage, ...] = (replay_consent, screen_query, read_query, identify, rewrite_query, forward_query)


async def run(stages: tuple[Stage, ...], x: Exchange, c: Context) -> Exchange:
    """``x`` through ``stages`` until one answers, then its outcome recorded."""
    try:
        for stage in stages:
            pending = stage(x, c)  # None, or the coroutine of an async stage
            if pending is not None:
                await pending
            if x.answer is not None or x.upstream is not None:  # the stage answered
                break
    except Refused as exc:
        x.refuse(exc, body_read=True)
    report(x, c)
    return x


__all__ = ["EVENTS", "QUERIES", "Context", "Exchange", "Services", "Visit", "run"]
