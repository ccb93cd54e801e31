"""The seam between a vendor's wire protocol and the shared pipeline.

A protocol module turns its SDKs' requests into plain events, names the
identity fields of each event, rewrites them, makes an event ready to travel
in a shared batch, encodes batches for its upstream, sorts the upstream's
answers into classes and shapes the answers its SDKs expect. Everything else,
request -> identity -> rewrite -> spool -> deliver -> log, is written once
(``web.handlers``, ``services.delivery``) and knows no vendor.

Pure: nothing here does I/O or knows aiohttp.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from ..core.rewrite import Rewrite

# Classes of upstream answers (``Protocol.classify``), as the sender acts on them.
ACCEPTED = "accepted"  # 2xx: rows deleted
RETRY = "retry"  # network error, timeout, 5xx: back off, keep the rows
RATE_LIMITED = "rate_limited"  # 429: pause for Retry-After
TOO_LARGE = "too_large"  # 413: split the batch
REJECTED = "rejected"  # 400 about some events: dead-letter those, ingest the rest
REFUSED = "refused"  # a 4xx about the request as a whole (401, 403, 404...)


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: str
    detail: str = ""
    retry_after: float | None = None
    # index in batch -> reason, when the upstream named the bad records
    failed: dict[int, str] | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """What an SDK is told: status, body, content type (the web layer sends it)."""

    status: int
    body: bytes
    content_type: str


@dataclass(slots=True)
class Payload:
    """One request's events as its protocol decoded them."""

    route: str
    events: list[dict[str, Any]]
    verbose: bool
    # The client asked the vendor to geolocate by its IP.
    wants_ip: bool
    # The protocol's own record of how the events arrived, to re-encode alike.
    form: Any = None
    # The raw JSON text, for a substring test (C speed): ``mentions``.
    text: bytes | str = b""

    def release(self) -> None:
        """Let the decoded events go (spooled: their JSON is in the rows): a
        request waiting on the disk holds bytes, not thousands of objects."""
        self.events = []
        self.form = None
        self.text = b""

    def mentions(self, needle: str) -> bool:
        """Whether any value can hold ``needle``: the JSON text holds it, or holds
        a ``\\u`` escape that could spell it once decoded (``fpb\\u003d``: no SDK
        writes one, a hand-made payload may)."""
        text = self.text
        if isinstance(text, str):
            return needle in text or "\\u" in text
        return needle.encode() in text or b"\\u" in text


class EventFacts(NamedTuple):
    """What the spool and the forwarded log keep beside an event (one per
    event: a NamedTuple, cheaper to build than a frozen dataclass)."""

    name: str
    insert_id: str | None
    project: str | None
    time: float | None  # the event's own time in seconds, for age limits


class Run(NamedTuple):
    """A run of a batch's events one device sent: mixpanel-browser and
    analytics.js mint a new device id only on ``reset()``, so one request can
    hold a logout and the next person's first events (two runs)."""

    start: int
    end: int
    ids: list[str]  # its anonymous ids, first seen first, without duplicates
    anonymous: bool  # no event of it names a user


@dataclass(frozen=True, slots=True)
class Outbound:
    """One upstream request for a batch of spooled events."""

    target: str  # path and query, already encoded
    body: bytes
    content_type: str


def basic_user(authorization: str) -> str | None:
    """The user of ``Authorization: Basic base64(user:)``: the project token
    (mixpanel-js's /record, /flags, /settings) or the write key (Segment)."""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        user = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[0]
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user or None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def classify_status(status: int, body: bytes, retry_after: str | None) -> Verdict:
    """The class an HTTP status puts an upstream answer in; a protocol refines
    it from the body where its vendor says more (Mixpanel's ``failed_records``)."""
    text = body[:2000].decode("utf-8", "replace")
    if 200 <= status < 300:
        return Verdict(ACCEPTED)
    if status == 429:
        return Verdict(RATE_LIMITED, text, retry_after=parse_retry_after(retry_after))
    if status == 413:
        return Verdict(TOO_LARGE, text)
    if status >= 500:
        return Verdict(RETRY, f"upstream answered {status}: {text}".strip())
    if status == 400:
        return Verdict(REJECTED, text)
    return Verdict(REFUSED, f"upstream answered {status}: {text}".strip())


class Touches(Protocol):
    """A protocol's first-touch fields, asked about without naming them (``protocols.firsttouch``)."""

    def external(self, route: str, event: Mapping[str, Any], own_domains: Sequence[str]) -> dict[str, Any] | None: ...

    def names_own(self, route: str, event: Mapping[str, Any], own_domains: Sequence[str]) -> bool: ...

    def on_profile(self, route: str, event: Mapping[str, Any]) -> bool: ...

    def repair(self, route: str, event: dict[str, Any], kept: Mapping[str, Any], own_domains: Sequence[str]) -> list[Rewrite]: ...


class WireProtocol(Protocol):
    """What the pipeline needs from a vendor's protocol."""

    name: str
    # Routes acknowledged once spooled (the rest are forwarded synchronously).
    spooled_routes: frozenset[str]
    # What one upstream request may carry (None: only delivery.batch_size bounds it).
    max_batch_calls: int | None
    max_batch_bytes: int | None
    # Whether an event can carry its own consent (``refuses``): Segment's
    # ``context.consent`` does, Mixpanel's events never do (its opt-out is a cookie).
    event_consent: bool
    # Routes whose upstream refuses events older than ``delivery.max_age_days``
    # (Mixpanel's /track, 5 days): such events are dead letters from the start.
    expiring_routes: frozenset[str]
    # Sync mode forwards the client's own request (re-encoded when changed:
    # ``reencode``), not a batch built from its events (``batch``).
    passthrough: bool
    # First touches kept and repaired (``protocols.firsttouch``: Mixpanel's
    # ``$initial_referrer`` fields on /track, ``$set_once`` on /engage); None: not kept.
    first_touch: Touches | None
    # The SDK's own anonymous-id cookie the server may set to the canonical id (None: none).
    cookie: str | None

    def verbose(self, query: list[tuple[str, str]]) -> bool:
        """Whether an answer to this query is the verbose (JSON) one."""
        ...

    # A passthrough protocol's request re-encoded after its events changed:
    # (body, Content-Type, raw query or None). None for protocols that forward batches.
    @property
    def reencode(self) -> Callable[[Payload, list[tuple[str, str]]], tuple[bytes, str, str | None]] | None: ...

    def decode(
        self,
        route: str,
        body: bytes,
        query: list[tuple[str, str]],
        content_type: str,
        content_encoding: str,
        limit: int,
        authorization: str = "",
    ) -> Payload: ...

    # The batch's runs of one device each (``split``: a device change starts a
    # new run; else one run), read in one pass over the events.
    def runs(self, route: str, events: list[dict[str, Any]], split: bool = True) -> list[Run]: ...

    def anonymous_ids(self, route: str, events: list[dict[str, Any]]) -> list[str]: ...

    def lookup_ids(self, route: str, events: list[dict[str, Any]]) -> list[str]: ...

    def project(self, route: str, events: list[dict[str, Any]]) -> str | None: ...

    def names(self, route: str, events: list[dict[str, Any]]) -> list[str]: ...

    def find_token(self, query: list[tuple[str, str]], events: list[dict[str, Any]], param: str) -> str | None: ...
    # Where the landing navigation came from (the page's document.referrer), as the events say.
    def referrer(self, route: str, events: list[dict[str, Any]]) -> str | None: ...

    def strip_tokens(self, route: str, event: dict[str, Any], param: str) -> int: ...
    # Whether the event itself says its visitor refused tracking (a consent
    # object the SDK stamped on it), given the categories that must be granted.
    def refuses(self, event: dict[str, Any], required: tuple[str, ...]) -> bool: ...
    # Consent's anonymise mode: strip the event of every id and IP in place,
    # with ``throwaway`` as its only id; False when it cannot be sent without
    # identity at all (a profile update, an identify) and must be dropped.
    def anonymise(self, route: str, event: dict[str, Any], throwaway: str) -> bool: ...
    # The event's own property bag (carried properties are read from and added
    # to it), or None for an event that has none (a profile update, identify).
    def properties(self, route: str, event: dict[str, Any]) -> dict[str, Any] | None: ...

    # Privacy at the edge (``pipeline.privacy``): the event's URL-valued fields
    # through ``clean`` (in place; how many changed); no IP of any kind on it;
    # flagged as a crawler's, False when it cannot go without identity (dropped).
    def scrub_urls(self, route: str, event: dict[str, Any], clean: Callable[[str], str | None]) -> int: ...

    def forbid_ip(self, route: str, event: dict[str, Any]) -> bool: ...

    def mark_bot(self, route: str, event: dict[str, Any], kind: str) -> bool: ...

    def rewrite(self, route: str, event: dict[str, Any], mapping: Mapping[str, str]) -> list[Rewrite]: ...

    def prepare(self, route: str, event: dict[str, Any], ip: str | None) -> EventFacts: ...

    def batch(self, route: str, ip: bool, bodies: list[bytes], project: str | None = None) -> Outbound: ...

    def classify(self, status: int, body: bytes, retry_after: str | None) -> Verdict: ...

    def accepted(self, verbose: bool) -> Answer: ...

    def error(self, status: int, message: str, verbose: bool) -> Answer: ...


def events_per_batch(protocol: WireProtocol, batch_size: int) -> int:
    """The most events one upstream request of ``protocol`` carries:
    ``delivery.batch_size``, or fewer when the vendor takes fewer calls."""
    return min(batch_size, protocol.max_batch_calls or batch_size)
