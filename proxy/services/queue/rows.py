"""A queued row: its format, and how a request's events are packed into rows.

A row holds the events one request brought for one project, in order, up to
what one upstream batch takes (``request_rows``): their JSON joined by
commas, their facts (name, insert id, time, rewrites, canonical id, source)
as columns in one meta. ``NewRow`` is a row to write, ``Row`` one read back
(from SQLite or JetStream), ``DeadLetter`` one event with the reason it can
never be delivered. Pure: no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

class Columns(NamedTuple):
    """What a row's meta says of its events, whichever form it was stored in:
    the request's identity once, then a column per fact, in event order."""

    canonical: str | None
    source: str | None
    names: list[str]
    insert_ids: list[str | None]
    times: list[float | None]
    rewrites: list[list[Any]]  # [event index, field, from, to]


def columns(meta: Any, count: int = 1) -> Columns:
    """A row's meta read as columns. Two forms are stored: one event's
    ``{c, s, n, i, r}`` (``r``: [field, from, to] lists; also a dead
    letter's and a JetStream message's), and a row of several's
    ``{c, s, n: [...], i: [...], t: [...], r: [[index, field, from, to]...]}``.
    Columns shorter than ``count`` are padded: an event never goes without
    a meta."""
    if type(meta) is not dict:
        meta = {}
    names = meta.get("n")
    if type(names) is list:
        cols = Columns(meta.get("c"), meta.get("s"), names, meta.get("i") or [], meta.get("t") or [], meta.get("r") or [])
    else:
        changes = meta.get("r")
        cols = Columns(
            meta.get("c"), meta.get("s"), [names if type(names) is str else ""], [meta.get("i")], [meta.get("t")],
            [[0, *r] for r in changes] if changes else [],
        )
        if count <= 1:
            return cols
    if len(cols.names) < count or len(cols.insert_ids) < count or len(cols.times) < count:
        pad = lambda col, fill: col + [fill] * (count - len(col))  # noqa: E731
        cols = cols._replace(names=pad(cols.names, ""), insert_ids=pad(cols.insert_ids, None), times=pad(cols.times, None))
    return cols


class BatchFacts(NamedTuple):
    """What the forwarded log records of a batch of rows, in one pass."""

    names: list[str]
    insert_ids: list[str]
    canonical: set[str]
    sources: set[str]
    rewrites: list[Sequence[Any]]  # [field, from, to]


def facts_of(rows: Iterable[Row]) -> BatchFacts:
    """The facts of every event of ``rows``, in order: the log's one pass over
    a batch (up to 50 rows; a row of one event read without building columns)."""
    names: list[str] = []
    insert_ids: list[str] = []
    canonical: set[str] = set()
    sources: set[str] = set()
    rewrites: list[Sequence[Any]] = []
    for row in rows:
        meta = row.decoded_meta()
        if row.count == 1 and type(meta) is dict and type(meta.get("n")) is not list:
            names.append(meta.get("n") or "")
            if meta.get("i"):
                insert_ids.append(meta["i"])
            if meta.get("c"):
                canonical.add(meta["c"])
            if meta.get("s"):
                sources.add(meta["s"])
            if meta.get("r"):
                rewrites += meta["r"]
            continue
        cols = columns(meta, row.count)
        names += cols.names
        insert_ids += [i for i in cols.insert_ids if i]
        if cols.canonical:
            canonical.add(cols.canonical)
        if cols.source:
            sources.add(cols.source)
        rewrites += [r[1:] for r in cols.rewrites]
    return BatchFacts(names, insert_ids, canonical, sources, rewrites)


def event_metas(meta: Any, count: int = 1) -> list[dict[str, Any]]:
    """Each event's own ``{c, s, n, i, t, r}``, in order, from a row's meta."""
    cols = columns(meta, count)
    out: list[dict[str, Any]] = [
        {"c": cols.canonical, "s": cols.source, "n": n, "i": i, "t": t, "r": []}
        for n, i, t in zip(cols.names, cols.insert_ids, cols.times)
    ]
    for index, *change in cols.rewrites:
        if isinstance(index, int) and 0 <= index < len(out):
            out[index]["r"].append(change)
    return out[:max(count, 1)]


class NewRow(NamedTuple):
    """Events to spool: one, or ``count`` of one request (``body`` their JSON
    joined by commas, ``meta`` their facts as columns, ``columns``). A
    NamedTuple (immutable, built in C), where a frozen dataclass's
    ``__init__`` (``object.__setattr__`` per field) cost three times as much."""

    route: str
    region: str
    project: str | None
    ip: bool
    body: bytes
    meta: bytes
    event_time: float | None = None
    protocol: str = "mixpanel"
    # ``meta`` as the handler built it, handed to the sender with the
    # committed row so the forwarded log does not decode it again (never stored).
    info: dict[str, Any] | None = None
    count: int = 1  # type: ignore[assignment]  # (events in the row; shadows tuple.count, unused here)

    def columns(self) -> Columns:
        return columns(self.info, self.count)


class EventGroup:
    """One request's consecutive events of one region and project, becoming
    one row: their JSON joined by commas (what a batch joins again, what
    ``Row.split`` takes apart), their facts in columns (``columns``), the
    row's time its oldest event's."""

    __slots__ = ("region", "project", "bodies", "names", "insert_ids", "times", "rewrites", "size")

    def __init__(self) -> None:
        self.region = ""
        self.project: str | None = None
        self.bodies: list[bytes] = []
        self.names: list[str] = []
        self.insert_ids: list[str | None] = []
        self.times: list[float | None] = []
        self.rewrites: list[list[Any]] = []
        self.size = 0  # bytes of the joined bodies

    def add_run(
        self, region: str, project: str | None, joined: bytes, facts: Sequence[Any],
        changes: Sequence[Sequence[Sequence[str]]] = (),
    ) -> None:
        """Events of one region and project: ``joined`` their JSON joined by
        commas, ``facts`` each one's ``name``, ``insert_id`` and ``time``,
        ``changes`` each one's rewrites (empty: none)."""
        first = len(self.names)
        for k, rs in enumerate(changes):
            self.rewrites += [[first + k, *r] for r in rs]
        self.region, self.project = region, project
        self.bodies.append(joined)
        self.names += [f.name for f in facts]
        self.insert_ids += [f.insert_id for f in facts]
        self.times += [f.time for f in facts]
        self.size += len(joined) + 1

    def row(self, route: str, ip: bool, protocol: str, canonical: str | None, source: str | None) -> NewRow:
        if len(self.names) == 1:
            meta: dict[str, Any] = {
                "c": canonical, "s": source, "n": self.names[0], "i": self.insert_ids[0],
                "r": [r[1:] for r in self.rewrites],
            }
            return NewRow(route, self.region, self.project, ip, self.bodies[0], orjson.dumps(meta), self.times[0], protocol, meta)
        known = [t for t in self.times if t is not None]
        meta = {"c": canonical, "s": source, "n": self.names, "i": self.insert_ids, "t": self.times, "r": self.rewrites}
        return NewRow(
            route, self.region, self.project, ip, b",".join(self.bodies), orjson.dumps(meta),
            min(known) if known else None, protocol, meta, len(self.names),
        )


def request_rows(
    route: str,
    ip: bool,
    protocol: str,
    events: Sequence[dict[str, Any]],
    facts: Sequence[Any],
    changes: Sequence[Sequence[Sequence[str]]],
    region_for: Callable[[str | None], str],
    most: int,
    limit: int | None,
    canonical: str | None,
    source: str | None,
) -> list[NewRow]:
    """One request's events as rows: each run of consecutive events of one
    project (so of one region), at most ``most`` long, is one row, its JSON
    dumped in one call; a run of more than ``limit`` bytes (what one upstream
    batch may carry) is cut event by event. ``facts``: each event's
    ``project``, ``name``, ``insert_id``, ``time``; ``changes``: each event's
    rewrites (empty: none at all)."""
    rows: list[NewRow] = []
    count = len(events)
    start = 0
    while start < count:
        project = facts[start].project
        end = start + 1
        while end < count and end - start < most and facts[end].project == project:
            end += 1
        region = region_for(project)
        joined = orjson.dumps(events[start]) if end - start == 1 else orjson.dumps(events[start:end])[1:-1]
        group = EventGroup()
        if end - start == 1 or limit is None or len(joined) + 1 <= limit:
            group.add_run(region, project, joined, facts[start:end], changes[start:end] if changes else ())
        else:
            for i in range(start, end):
                body = orjson.dumps(events[i])
                if group.names and group.size + len(body) + 1 > limit:
                    rows.append(group.row(route, ip, protocol, canonical, source))
                    group = EventGroup()
                group.add_run(region, project, body, facts[i:i + 1], changes[i:i + 1] if changes else ())
        rows.append(group.row(route, ip, protocol, canonical, source))
        start = end
    return rows


@dataclass(slots=True)
class Row:
    id: int
    route: str
    region: str
    project: str | None
    ip: bool
    body: bytes
    meta: bytes
    enqueued_at: float
    attempts: int
    event_time: float | None = None  # the oldest of its events' times
    protocol: str = "mixpanel"
    info: dict[str, Any] | None = None  # decoded ``meta``, for rows handed over in memory
    count: int = 1

    def decoded_meta(self) -> Any:
        if self.info is None:
            try:
                self.info = orjson.loads(self.meta)
            except orjson.JSONDecodeError:
                self.info = {}
        return self.info

    def columns(self) -> Columns:
        """Its events' facts (``n`` names, ``i`` insert ids, ``c`` canonical id...)."""
        return columns(self.decoded_meta(), self.count)

    def split(self) -> list[Row]:
        """One row per event, each still this row's id (a view: an outcome for
        them is an outcome for this row). For the rare outcomes that differ
        per event: a dead letter, an expired event."""
        if self.count == 1:
            return [self]
        events = orjson.loads(b"[" + self.body + b"]")
        metas = event_metas(self.decoded_meta(), len(events))
        out = []
        for e, m in zip(events, metas):
            t = m.pop("t")
            out.append(Row(self.id, self.route, self.region, self.project, self.ip, orjson.dumps(e), orjson.dumps(m),
                           self.enqueued_at, self.attempts, t, self.protocol, m))
        return out


@dataclass(frozen=True, slots=True)
class DeadLetter:
    row: Row
    reason: str
    detail: str
    status: int | None


def letters_of(rows: Sequence[NewRow], reason: str, detail: str) -> list[DeadLetter]:
    """Events that are dead letters from the start (too old for the vendor on
    arrival), as the queue's ``enqueue`` takes them: rows never queued (id 0)."""
    now = time.time()
    return [
        DeadLetter(Row(0, r.route, r.region, r.project, r.ip, r.body, r.meta, now, 0, r.event_time, r.protocol, r.info,
                       r.count), reason, detail, None)
        for r in rows
    ]
