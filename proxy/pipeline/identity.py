"""Stage 3, resolve identity: one canonical id for each identity the request holds.

Every id the request names passes the one rule (``core.ids``) before it is
looked up, stored, put in a cookie or logged. A browser's token is redeemed
here (``services.tokens``: single use, with its proof), then the resolver
(``services.resolver``) decides from the cookie, the alias store and the ids.

mixpanel-browser batches for 5 s: identify, track, reset() and the next
person's track can share one request. Each event's own device id says who it
is: a change inside a browser's batch starts a new identity from there
(``Exchange.parts``).
"""

from __future__ import annotations

from ..core import ids
from ..core.identity import Resolution
from ..protocols.base import Run
from .context import Context
from .exchange import Exchange

# A batch splits into at most this many identities (a real one holds a reset() or two).
MAX_RUNS = 8


def capped(runs: list[Run]) -> list[Run]:
    """At most ``MAX_RUNS`` runs: the last one holds every event from there on."""
    if len(runs) <= MAX_RUNS:
        return runs
    rest = runs[MAX_RUNS - 1:]
    ids = list(dict.fromkeys(i for run in rest for i in run.ids))
    return [*runs[:MAX_RUNS - 1], Run(rest[0].start, rest[-1].end, ids, all(run.anonymous for run in rest))]


async def identify(x: Exchange, c: Context) -> None:
    if x.anonymous:
        return  # anonymised: nothing is resolved (``consent``)
    if x.payload is None:  # a query route: its ids are in the query (``query.read_query``)
        x.parts = [(0, 0, await resolve(x, c, x.incoming, x.server_ids))]
        return
    protocol, route, browser = x.protocol, x.route, x.visit.browser
    events = x.payload.events
    # One pass over the events: each device's run (a server's request is one), its ids.
    runs = capped(protocol.runs(route, events, browser))
    incoming = [ids.accept(run.ids, refuse_long=browser) for run in runs]
    server_ids = [] if browser and route != "import" else ids.accept(protocol.lookup_ids(route, events), refuse_long=False)
    parts = x.parts
    for n, run in enumerate(runs):
        a, b = run.start, run.end
        if n == 0:
            # Where the landing navigation came from: a link token's proof.
            referrer = protocol.referrer(route, events[a:b] if len(runs) > 1 else events) if x.token else None
            resolution = await resolve(x, c, incoming[0], server_ids, run.anonymous, referrer)
        else:  # reset() inside the batch: a new person on this browser
            resolution = await c.resolver.restart(x.visit.host, route, incoming[n], x.project)
        parts.append((a, b, resolution))


async def resolve(
    x: Exchange,
    c: Context,
    incoming: list[str],
    server_ids: list[str],
    anonymous: bool = False,
    referrer: str | None = None,
) -> Resolution:
    visit = x.visit
    browser = visit.browser and x.route != "import"
    carried = (
        await c.tokens.redeem(x.token, visit.host, incoming, visit.cookie_id, visit.hint, referrer=referrer,
                              from_page=visit.from_page)
        if browser and x.token
        else None
    )
    return await c.resolver.resolve(
        browser=browser,
        cookie_id=visit.cookie_id,
        host=visit.host,
        route=x.route,
        incoming=incoming,
        server_ids=server_ids,
        carried=carried,
        anonymous=anonymous,
        project=x.project,
        hint=visit.hint,
        from_page=visit.from_page,
    )
