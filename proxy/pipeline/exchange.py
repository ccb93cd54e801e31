"""The Exchange: one request's way through the pipeline, carried by every stage.

The web layer builds it from an aiohttp request (``web.visit``), the stages
(``pipeline``) fill it in, the web layer renders its answer. Nothing here
knows aiohttp: headers are a plain mapping, the body bytes (or, for a large
session-replay chunk, an opaque stream the forwarder passes on).

Every event a request brought ends with exactly one outcome, recorded here
(``accept``, ``drop``, ``fail``) and written out once by the outcome stage:
``unsettled`` is what a path forgot, and the outcome stage records that too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..core.identity import Resolution
from ..core.rewrite import Rewrite
from ..errors import Refused
from ..protocols.base import Answer, Payload, WireProtocol

# What became of a request's events (the forwarded log's and the live view's words).
SPOOLED = "spooled"
FORWARDED = "forwarded"
FAILED = "failed"
DROPPED = "dropped"
EXPIRED = "expired"  # too old for the vendor: a dead letter from the start (the sender records it)


@dataclass(slots=True)
class Visit:
    """What we know about the requester before looking at the payload."""

    browser: bool
    origin: str | None
    host: str
    cookie_id: str | None
    cookie_raw: str | None
    # With no identity cookie: analytics.js's own id from its cookie, if any.
    hint: str | None = None
    # Sent by a script of the deployment's own pages, not by another site and
    # not as a navigation (``core.bridge.from_own_page``): only then may a
    # token the request carries change the browser's identity.
    from_page: bool = False


@dataclass(slots=True)
class Outcome:
    """What became of some of a request's events."""

    kind: str  # SPOOLED, FORWARDED, FAILED, DROPPED
    names: list[str]
    reason: str | None = None
    status: int | None = None
    # The events' insert ids where known (the live view pairs deliveries with them).
    ids: list[str | None] | None = None


class Exchange:
    """One request, from the web layer's hand-over to its answer."""

    __slots__ = (
        "protocol", "route", "path", "visit", "headers", "remote", "method", "query", "raw_query", "body",
        "length", "started", "verbose", "payload", "token", "mentioned", "project", "refused", "anonymous",
        "parts", "per_event", "changed", "stripped", "incoming", "server_ids", "context", "region",
        "outcomes", "settled", "answer", "upstream", "error", "body_read", "decoded",
    )

    def __init__(
        self,
        protocol: WireProtocol,
        route: str,
        path: str,
        visit: Visit,
        headers: Mapping[str, str],
        remote: str | None,
        method: str,
        query: list[tuple[str, str]],
        raw_query: str,
        started: float,
    ) -> None:
        self.protocol = protocol
        self.route = route  # the route as routed; decoding may name it exactly (``payload.route``)
        self.path = path  # the upstream path of a synchronous forward
        self.visit = visit
        self.headers = headers
        self.remote = remote
        self.method = method
        self.query = query
        self.raw_query = raw_query
        self.started = started
        # Whether the client asks for verbose answers: the decoded payload's say
        # (``decode``), or the query's (``read_query``).
        self.verbose = False
        self.body: Any = b""
        self.length: int | None = None  # a streamed body's length
        self.payload: Payload | None = None
        self.decoded = 0  # how many events the request brought
        self.token: str | None = None  # a bridge token the request carries (browsers only)
        self.mentioned = False  # whether any event's text can hold a token
        self.project: str | None = None
        self.refused: str | None = None  # why tracking was refused (consent), if it was
        self.anonymous = False  # consent.mode = "anonymise" took the refused events
        # Each identity's events: (start, end, resolution); one, unless a batch held a reset().
        self.parts: list[tuple[int, int, Resolution]] = []
        self.per_event: list[list[Rewrite]] = []  # per event rewrites, or [] when none
        self.changed = False  # the events changed beyond their ids (re-encode to forward)
        self.stripped = 0  # tokens taken out of the events
        self.incoming: list[str] = []  # query routes: the ids the query names
        self.server_ids: list[str] = []
        self.context: str | None = None  # /flags: its JSON context
        self.region: str | None = None
        self.outcomes: list[Outcome] = []
        self.settled = 0  # how many events the outcomes name
        self.answer: Answer | None = None  # set by the stage that ends the exchange
        self.upstream: Any = None  # a synchronous forward's upstream answer, relayed as it came
        self.error: Refused | None = None
        self.body_read = False  # whether an error comes after the body was read

    # ------------------------------------------------------------ reading

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.payload.events if self.payload is not None else []

    @property
    def resolution(self) -> Resolution | None:
        """The browser's identity from now on (its cookie): the last run's."""
        return self.parts[-1][2] if self.parts else None

    def rewrites(self) -> list[Rewrite]:
        return [r for rs in self.per_event for r in rs]

    # ----------------------------------------------------------- outcomes

    def accept(self, kind: str, names: list[str], status: int | None = None, ids: list[str | None] | None = None) -> None:
        """These events went on: spooled, or forwarded (``status``: the upstream's)."""
        self.outcomes.append(Outcome(kind, names, None, status, ids))
        self.settled += len(names)

    def drop(self, why: str, names: list[str], rule: str = "consent") -> None:
        """These events are not tracked (``rule``: consent, a bot): answered as
        accepted, never sent. Their reason reads "consent: gpc", "bot: seo"."""
        self.outcomes.append(Outcome(DROPPED, names, f"{rule}: {why}"))
        self.settled += len(names)

    def fail(
        self, exc: Exception, names: list[str], status: int | None = None, ids: list[str | None] | None = None
    ) -> None:
        """These events could not go on: the client is told and keeps them."""
        self.outcomes.append(Outcome(FAILED, names, str(exc), status, ids))
        self.settled += len(names)

    def refuse(self, exc: Refused, *, body_read: bool = False) -> None:
        """The request is refused as a whole: nothing of it went anywhere."""
        self.error = exc
        self.body_read = body_read

    def unsettled(self) -> int:
        """Events this request brought that no outcome names (0 on every path)."""
        if self.error is not None:
            return 0
        return self.decoded - self.settled
