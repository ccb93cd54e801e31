"""The live view's feed: what the proxy does with each event, as it happens.

The handlers publish one record per event-carrying request (``request``:
the canonical id, where it came from, the ids rewritten to it, the host, the
events and their first outcome) and the sender one per delivered batch
(``delivery``: the events' ids and their final outcome). Each watcher of
``/live/events`` (``web/live``) gets the recent records, then every new one.

Invariants:
- nothing is built or kept while nobody watches: ``watching`` is the only
  cost on the request path then (one attribute read);
- memory is bounded: a ring of ``RING`` records, and a queue of ``BACKLOG``
  per watcher (a watcher that stops reading loses the oldest, and is told);
- no IPs, cookie values, tokens or URLs: ids, host names, event names and
  outcomes only;
- with several workers, a stream on any of them sees every worker's records
  (``liverelay``: each record copied once to each worker that has a watcher).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol


class Relay(Protocol):
    """What the feed needs of ``liverelay.LiveRelay`` (the workers' copies)."""

    dropped: int  # copies not made because the other worker's buffer was full

    def send(self, record: dict[str, Any]) -> None: ...

    def watched(self, local: bool) -> None: ...

    def others_watched(self) -> bool: ...


RING = 2000
BACKLOG = 500
MAX_EVENTS_PER_RECORD = 50


class LiveFeed:
    def __init__(self, ring: int = RING, backlog: int = BACKLOG) -> None:
        self._ring: deque[dict[str, Any]] = deque(maxlen=ring)
        self._watchers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._backlog = backlog
        self._seq = 0
        # With several workers (``liverelay``): the other workers' watchers count
        # too, and what this worker publishes is copied to them.
        self.relay: Relay | None = None

    # -------------------------------------------------------------- watchers

    def watch(self) -> tuple[list[dict[str, Any]], asyncio.Queue[dict[str, Any]]]:
        """The recent records and a queue of the next ones; ``unwatch`` it when done."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=self._backlog)
        self._watchers.add(queue)
        self._changed()
        return list(self._ring), queue

    def unwatch(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._watchers.discard(queue)
        self._changed()

    @property
    def watching(self) -> bool:
        """Whether anyone watches: here, or (``relay``) on another worker."""
        return bool(self._watchers) or (self.relay is not None and self.relay.others_watched())

    def _changed(self) -> None:
        if self.relay is not None:
            self.relay.watched(bool(self._watchers))

    @property
    def watchers(self) -> int:
        return len(self._watchers)

    def relayed(self, record: dict[str, Any]) -> None:
        """A record another worker published: shown here, not copied on."""
        self._publish(record, copy=False)

    def _publish(self, record: dict[str, Any], copy: bool = True) -> None:
        if copy and self.relay is not None:
            self.relay.send(record)
        self._seq += 1
        record["seq"] = self._seq
        self._ring.append(record)
        for queue in self._watchers:
            if queue.full():  # a watcher that stopped reading: drop its oldest
                queue.get_nowait()
                record = {**record, "lagging": True}
            queue.put_nowait(record)

    # ------------------------------------------------------------- publishers

    def request(
        self,
        *,
        protocol: str,
        route: str,
        host: str,
        canonical: str | None,
        source: str,
        rewrites: Sequence[tuple[str, str, str]],
        names: Sequence[str],
        ids: Sequence[str | None],
        outcome: str,
        reason: str | None = None,
        status: int | None = None,
    ) -> None:
        """One request's events and what became of them (``spooled``,
        ``forwarded``, ``failed``, ``dropped``)."""
        if not self.watching:
            return
        self._publish(
            {
                "kind": "request",
                "time": time.time(),
                "protocol": protocol,
                "route": route,
                "host": host,
                "canonical": canonical,
                "source": source,
                # original -> canonical, each with the link's source (this request's)
                "links": sorted({(orig, source) for _field, orig, canon in rewrites if canon == canonical}),
                "events": [
                    {"name": n, "id": i} for n, i in list(zip(names, ids))[:MAX_EVENTS_PER_RECORD]
                ],
                "count": len(names),
                "outcome": outcome,
                "reason": reason,
                "status": status,
            }
        )

    def delivery(self, ids: Sequence[str], outcome: str, status: int | None, reason: str | None) -> None:
        """A spooled batch's outcome (``forwarded``, ``dead_letter``, ``expired``,
        ``retry``) for the events with these ids."""
        if not self.watching or not ids:
            return
        self._publish(
            {"kind": "delivery", "time": time.time(), "ids": list(ids), "outcome": outcome, "status": status, "reason": reason}
        )
