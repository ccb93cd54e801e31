"""The durable queue's declared interface: what the pipeline and the sender
may ask of it, whichever stores it (``sqlite.Spool`` on one host,
``jetstream.JetStreamQueue`` for a fleet).

Invariants every queue keeps:
- ``enqueue`` returns only once the rows (and the request's dead letters)
  are durable; it raises ``SpoolFull`` (503, the client keeps its events)
  rather than buffer in memory what it cannot store;
- a row leaves the queue only with its outcome: ``ack`` after the vendor's
  2xx, ``bury`` with the reason it can never be delivered;
- depth, ``max_rows`` and every figure count events, never rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from ...errors import Unavailable
from .rows import DeadLetter, NewRow, Row


class SpoolFull(Unavailable):
    """The spool cannot take these events now (it holds ``max_rows``, or it
    cannot write): the client must keep its copy and retry (503)."""


class SpoolUnwritable(SpoolFull):
    """The disk under the spool is (nearly) full, or refuses writes."""


class Queue(Protocol):
    """What the pipeline (``deliver``), the sender and the operator's probes use."""

    # True: a row may hold several events of one request (SQLite); False: one
    # event a message (JetStream), so the pipeline packs one a row.
    rows_hold_requests: bool
    max_rows: int
    depth: int
    # Why new events are refused now (None: they are taken).
    refusing: str | None
    # Called with the rows each commit made durable (the sender's feed), and
    # with whether the queue takes events after each change of that.
    on_commit: Callable[[list[Row]], None] | None
    on_state: Callable[[bool], None] | None

    @property
    def accepting(self) -> bool: ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def enqueue(self, rows: Sequence[NewRow], letters: Sequence[DeadLetter] = ()) -> None: ...

    def ack(self, rows: Iterable[Row]) -> None: ...

    def bury(self, letters: Iterable[DeadLetter]) -> None: ...

    def count_attempt(self, rows: Iterable[Row]) -> None: ...

    def requeue(self, row: Row) -> None:
        """A row of several events stored again one event a row, in the
        transaction that removes it (their outcomes differ). Only a queue
        whose ``rows_hold_requests`` has such rows to be asked about."""
        ...

    async def flush(self) -> None: ...

    async def stats(self) -> dict[str, Any]: ...
