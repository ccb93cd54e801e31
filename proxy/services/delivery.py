"""The background sender: spool -> batches -> upstream -> exactly one outcome.

One task per region walks that region's queued rows in id order, groups
them by (protocol, route, project, ip flag) into batches of at most ``batch_size``
(a partial batch leaves once its oldest row has waited ``batch_window``),
and sends up to ``max_in_flight`` batches at a time.

The row's protocol (``protocols/``) encodes each batch and sorts the
upstream's answer into a class (``WireProtocol.classify``); the sender acts
on the class, whatever the vendor:
- accepted (2xx): rows deleted;
- retry (network error, timeout, 5xx): the region pauses with exponential
  backoff and jitter (``backoff_initial`` doubling to ``backoff_max``), the
  rows go back to the front of their group;
- rate limited (429): the region pauses for ``Retry-After``;
- too large (413): the batch is split in halves; a single event -> dead letter;
- rejected (400, or a 2xx whose verbose body says ``status: 0``): the events
  named in ``failed_records`` go to dead letters and the rest count as
  accepted (Mixpanel ingests them); without that list the batch is bisected
  until the bad events stand alone;
- refused (other 4xx: 401, 403, 404...): the whole batch goes to dead
  letters with the upstream's words (``firstparty replay`` after the fix);
  never retried blindly.

Invariants: every row read ends with exactly one outcome in the forwarded
log (forwarded, dead_letter, expired) or stays queued for a later attempt;
a row is deleted only after the upstream accepted it; nothing is retried
sooner than the backoff allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import random
import time
from collections import deque
from itertools import islice
from collections.abc import Callable, Mapping
from typing import Protocol
from dataclasses import dataclass, field

from . import memory
from .forwardlog import ForwardedLog, outcome_record
from ..errors import UpstreamError
from ..lograte import Throttled
from .live import LiveFeed
from .metrics import Metrics
from ..settings import DeliverySettings
from .queue.rows import DeadLetter, Row, facts_of
from .queue.base import Queue
from .queue.sqlite import Spool
from .upstream import Endpoint, UpstreamClient
from ..protocols.base import (
    ACCEPTED, RATE_LIMITED, REFUSED, REJECTED, RETRY, TOO_LARGE, Verdict, WireProtocol, events_per_batch,
)

log = logging.getLogger(__name__)

GroupKey = tuple[str, str, str | None, bool]  # protocol, route, project, ip flag
MAINTAIN_SECONDS = 5.0
# A backlog of at least this many events, once drained, is worth a malloc_trim.
TRIM_AFTER_ROWS = 1000


def backoff_delay(failures: int, initial: float, maximum: float, rand: Callable[[], float] = random.random) -> float:
    """Exponential backoff with jitter: never below the plain doubling, at most +20 %."""
    base = min(maximum, initial * 2 ** max(0, failures - 1))
    return base * (1 + 0.2 * rand())


@dataclass
class RegionState:
    region: str
    endpoint: Endpoint
    cursor: int = 0
    groups: dict[GroupKey, deque[Row]] = field(default_factory=dict)
    held: int = 0  # events in memory (grouped or in flight)
    in_flight: int = 0
    # live: caught up with the spool, fresh rows arrive from commits in memory;
    # otherwise (start-up, backlog, memory full) rows are read from disk.
    live: bool = False
    # While a read from disk is in flight, fresh commits wait here: the read and
    # the commits run on the spool's one thread, so a read that comes back short
    # plus these rows is everything committed so far (see _step).
    reading: bool = False
    # A commit came after rows another process added while the region was
    # reading: that read may have missed them, so it does not make it live.
    reread: bool = False
    pending: list[Row] = field(default_factory=list)
    last_read: float = 0.0
    from_disk: int = 0  # events read from disk since the region was last live (a backlog)
    failures: int = 0
    paused_until: float = 0.0
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class Feed(Protocol):
    """Where the sender's rows come from, and where a batch waiting for its
    retry goes: the local spool's way (``SpoolFeed``: commits handed over in
    memory, the file read when behind, a failed batch kept at the front of its
    group) or a shared stream's (``queue.jetstream.StreamFeed``: fetched,
    given back with a delay). The sender's batching, classification, splitting
    and dead letters are the same over either."""

    def attach(self, sender: Sender) -> None: ...

    def accept(self, rows: list[Row]) -> None:
        """Rows a commit just made durable (``Queue.on_commit``)."""

    def notify(self, region: str) -> None:
        """Rows were queued for ``region``."""

    async def refill(self, state: RegionState) -> None:
        """Rows into the region's groups, within the sender's limit."""

    def next_wakeup(self, state: RegionState) -> float:
        """Seconds the region's loop may sleep (a commit or a finished send wakes it sooner)."""

    def hold_back(
        self, state: RegionState, key: GroupKey, batch: list[Row], delay: float, behind: list[Row] | None = None
    ) -> None:
        """A batch to try again in ``delay`` seconds (the region is paused that
        long), at the front of its group (behind the rows ``behind``, when
        they are there: the first half of a split)."""

    def unfinished(self) -> bool:
        """Work a drain at shutdown may still finish."""

    async def stopped(self) -> None:
        """The sender stopped: what it held is the queue's again."""


class Sender:
    def __init__(
        self,
        spool: Queue,
        client: UpstreamClient,
        endpoints: dict[str, Endpoint],
        settings: DeliverySettings,
        forwarded: ForwardedLog,
        timeout: float,
        protocols: Mapping[str, WireProtocol],
        metrics: Metrics | None = None,
        live: LiveFeed | None = None,
        feed: Feed | None = None,
    ) -> None:
        self.spool = spool
        self.live = live  # the live view's feed: batch outcomes, while someone watches
        self._warn = Throttled(log)
        self.protocols = protocols
        self.client = client
        self.settings = settings
        self.forwarded = forwarded
        self.timeout = timeout
        self.regions = {r: RegionState(r, ep) for r, ep in endpoints.items()}
        self._tasks: list[asyncio.Task[None]] = []
        self._sends: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.draining = False  # shutting down: partial batches leave at once
        self.metrics = metrics or Metrics()
        self.upstream_requests = 0
        self._loop: asyncio.AbstractEventLoop  # set by start()
        if feed is None:
            assert isinstance(spool, Spool), "a queue other than the local spool brings its own feed"
            feed = SpoolFeed(spool)
        self.feed = feed
        feed.attach(self)
        self.notify = feed.notify  # type: ignore[method-assign]  # one call on the request path, not two

    # ----------------------------------------------------------- lifecycle

    def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(state)) for state in self.regions.values()]
        self._tasks.append(loop.create_task(self._maintain()))

    async def _maintain(self) -> None:
        """Every few seconds: true up the spool depth (another process may have
        replayed dead letters) and refresh the spool gauges."""
        while not self._stopping:
            try:
                stats = await self.spool.stats()
            except Exception:  # noqa: BLE001 - a failed read is retried next round
                log.exception("reading spool stats failed")
            else:
                self.spool.depth = stats["depth"]
                self.metrics.spool_depth.set(stats["depth"])
                self.metrics.spool_oldest.set(stats["oldest_age_seconds"])
                self.metrics.dead_letters.set(stats["dead_letters"])
            await asyncio.sleep(MAINTAIN_SECONDS)

    def notify(self, region: str) -> None:
        """Rows were queued for ``region`` (the feed's, bound in ``__init__``)."""
        self.feed.notify(region)

    @property
    def sending(self) -> bool:
        """Batches on their way to an upstream now."""
        return bool(self._sends)

    def accept(self, rows: list[Row]) -> None:
        """Freshly committed rows (``Queue.on_commit``), for the feed."""
        self.feed.accept(rows)

    def limit(self, state: RegionState | None = None) -> int:
        """Rows a region may hold in memory. While its upstream is failing, no
        more than it already holds: the batches it was sending wait there for
        their retry, and everything newer waits on disk, so an outage at full
        traffic costs no memory (it cost ~100 MB before, in the soak)."""
        if state is not None and state.failures:
            return 0
        return self.settings.batch_size * self.settings.max_in_flight * 4

    async def stop(self, deadline: float) -> None:
        """Send what can be sent before ``deadline`` (monotonic), then stop;
        the rest stays spooled for the next start."""
        loop = asyncio.get_running_loop()
        self.draining = True
        while loop.time() < deadline and self.feed.unfinished():
            if all(s.paused_until > time.time() for s in self.regions.values() if s.held):
                break  # every region with work is backing off: waiting would not help
            for s in self.regions.values():
                s.wake.set()
            await asyncio.sleep(0.05)
        self._stopping = True
        for task in [*self._tasks, *self._sends]:
            task.cancel()
        for task in [*self._tasks, *self._sends]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.feed.stopped()

    # ------------------------------------------------------------ the loop

    async def _run(self, state: RegionState) -> None:
        while not self._stopping:
            try:
                await self._step(state)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the sender must outlive any one bad batch
                log.exception("sender for region %s failed; retrying in 1 s", state.region)
                await asyncio.sleep(1)
                continue
            timeout = self.feed.next_wakeup(state)
            state.wake.clear()
            # Woken by a commit, a finished send, or the timer: no wait_for, which
            # would build a task and a timeout scope on every wake.
            timer = self._loop.call_later(timeout, state.wake.set)
            try:
                await state.wake.wait()
            finally:
                timer.cancel()

    async def _step(self, state: RegionState) -> None:
        await self.feed.refill(state)
        if state.paused_until > time.time():
            return
        self._launch_ready(state)

    def _launch_ready(self, state: RegionState) -> None:
        """Send every batch that is full, or whose first row has waited a batch
        window (all of them while draining), up to ``max_in_flight``."""
        cfg = self.settings
        now = time.time()
        for key, rows in state.groups.items():
            while rows and state.in_flight < cfg.max_in_flight:
                full = len(rows) >= cfg.batch_size
                waited = now - rows[0].enqueued_at >= cfg.batch_window_seconds
                if not (full or waited or self.draining):
                    break
                self._launch(state, key, self._take(rows, cfg.batch_size, self.protocols[key[0]]))

    @staticmethod
    def _take(rows: deque[Row], size: int, protocol: WireProtocol) -> list[Row]:
        """The next batch: at most ``size`` events, and no more calls or bytes
        of bodies than the protocol's upstream takes in one request (Segment:
        100 calls, 500 KB); one row always goes, whatever it holds (the
        upstream then answers for it)."""
        most = events_per_batch(protocol, size)
        limit = protocol.max_batch_bytes
        batch = [rows.popleft()]
        events = batch[0].count
        total = len(batch[0].body)
        while rows and events + rows[0].count <= most and (limit is None or total + len(rows[0].body) + 1 <= limit):
            row = rows.popleft()
            events += row.count
            total += len(row.body) + 1
            batch.append(row)
        return batch

    def _launch(self, state: RegionState, key: GroupKey, batch: list[Row]) -> None:
        state.in_flight += 1
        task = self._loop.create_task(self._deliver(state, key, batch))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _deliver(self, state: RegionState, key: GroupKey, batch: list[Row]) -> None:
        handled = _HANDLED.set(set())  # this task's own: the ids of rows given an outcome so far
        try:
            await self._send(state, key, batch)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a bug must not strand a batch in memory
            log.exception("sending a batch to %s failed unexpectedly; it will be retried", state.region)
            # Only the rows with no outcome yet (expired ones were buried, a
            # split's first half sent): at worst a resend of rows the vendor
            # accepted, which it de-duplicates by $insert_id.
            done = _HANDLED.get()
            rest = [r for r in batch if r.id not in done]
            if rest:
                self._retry(state, key, rest, None, "internal error")
        finally:
            _HANDLED.reset(handled)
            state.in_flight -= 1
            state.wake.set()

    # ------------------------------------------------------------ a batch

    async def _send(self, state: RegionState, key: GroupKey, batch: list[Row]) -> None:
        protocol_name, route, project, ip = key
        protocol = self.protocols[protocol_name]
        if route in protocol.expiring_routes:
            batch = self._without_expired(state, batch)
            if not batch:
                return
        outbound = protocol.batch(route, ip, [r.body for r in batch], project)
        started = time.perf_counter()
        try:
            self.upstream_requests += 1
            response = await self.client.request(
                state.endpoint,
                "POST",
                outbound.target,
                [("content-type", outbound.content_type), ("user-agent", "firstparty-proxy")],
                outbound.body,
                timeout=self.timeout,
            )
        except UpstreamError as exc:
            self._retry(state, key, batch, None, str(exc))
            return
        latency = time.perf_counter() - started
        self.metrics.upstream_latency.labels(state.region).observe(latency)
        verdict = protocol.classify(response.status, response.body, response.header("retry-after"))
        if verdict.kind == ACCEPTED:
            state.failures = 0
            self._done(state, batch, "forwarded", response.status, latency)
        elif verdict.kind == RETRY:
            self._retry(state, key, batch, None, verdict.detail)
        elif verdict.kind == RATE_LIMITED:
            self._retry(state, key, batch, verdict.retry_after, verdict.detail or "rate limited")
        elif verdict.kind == REFUSED:
            state.failures = 0
            self._bury(state, batch, f"http_{response.status}", verdict.detail, response.status, latency)
        else:  # TOO_LARGE, REJECTED: about some of the batch
            await self._partly_refused(state, key, batch, verdict, response.status, latency)

    def _without_expired(self, state: RegionState, batch: list[Row]) -> list[Row]:
        """The batch without its events that aged past the vendor's limit while
        queued (an outage longer than the limit; the pipeline buries those too
        old on arrival). A row's time is its oldest event's: a row of several
        goes back one a row, each of its events judged on its own next time."""
        max_age = self.settings.max_age_seconds
        cutoff = time.time() - max_age
        expired = [r for r in batch if r.event_time is not None and r.event_time < cutoff]
        if not expired:
            return batch
        self._requeue(state, [r for r in expired if r.count > 1])
        alone = [r for r in expired if r.count == 1]
        if alone:
            self._bury(state, alone, "expired", f"event older than {max_age / 86400:g} days", None, 0.0)
        gone = {r.id for r in expired}
        return [r for r in batch if r.id not in gone]

    async def _partly_refused(
        self, state: RegionState, key: GroupKey, batch: list[Row], verdict: Verdict, status: int, latency: float
    ) -> None:
        """A 413 or a 400: the upstream named the bad records (buried, the others
        ingested), or the batch is split until the bad ones stand alone."""
        reason = "too_large" if verdict.kind == TOO_LARGE else "rejected"
        if verdict.kind == TOO_LARGE:
            status = 413
        else:
            state.failures = 0
        if verdict.kind == REJECTED and verdict.failed:
            # The upstream named the bad records (by their place among the
            # batch's events); it ingested the others.
            events = [e for r in batch for e in r.split()] if any(r.count > 1 for r in batch) else batch
            for i, r in enumerate(events):
                if i in verdict.failed:
                    self._bury(state, [r], reason, verdict.failed[i], status, latency)
            good = [r for i, r in enumerate(events) if i not in verdict.failed]
            if good:
                self._done(state, good, "forwarded", status, latency)
        elif len(batch) == 1 and batch[0].count > 1:
            self._requeue(state, batch)  # its events one a row, bisected further if need be
        elif len(batch) == 1:
            self._bury(state, batch, reason, verdict.detail, status, latency)
        else:
            await self._split(state, key, batch)

    async def _split(self, state: RegionState, key: GroupKey, batch: list[Row]) -> None:
        mid = len(batch) // 2
        # The halves go out one after the other on this task: a split is rare
        # and must not break the in-flight limit.
        await self._send(state, key, batch[:mid])
        if state.paused_until > time.time():
            # The first half was held back (the region is paused): the second
            # waits behind it, in order, rather than go out during the pause.
            # Not attempted, so its rows count no attempt.
            self.feed.hold_back(state, key, batch[mid:], state.paused_until - time.time(), behind=batch[:mid])
            _handled(batch[mid:])
            return
        await self._send(state, key, batch[mid:])

    def _retry(self, state: RegionState, key: GroupKey, batch: list[Row], after: float | None, detail: str) -> None:
        state.failures += 1
        delay = after if after is not None else backoff_delay(
            state.failures, self.settings.backoff_initial_seconds, self.settings.backoff_max_seconds
        )
        state.paused_until = max(state.paused_until, time.time() + delay)
        _handled(batch)
        self.spool.count_attempt(batch)
        self.feed.hold_back(state, key, batch, delay)
        events = sum([r.count for r in batch])
        self.metrics.outcome("retry", key[1], events)
        # At most a line a minute per region, however many sends fail meanwhile.
        self._warn.warning(
            ("retry", state.region),
            "upstream %s: %s; %d events kept, next try in %.1f s", state.region, detail, events, delay,
        )

    def _done(self, state: RegionState, rows: list[Row], outcome: str, status: int, latency: float) -> None:
        _handled(rows)
        self.spool.ack(rows)
        state.held -= sum([r.count for r in rows])
        self._log(state.region, rows, outcome, status, latency)

    def _bury(self, state: RegionState, rows: list[Row], reason: str, detail: str, status: int | None, latency: float) -> None:
        # A dead letter is one event: a row of several is buried event by event.
        rows = [e for r in rows for e in r.split()] if any(r.count > 1 for r in rows) else rows
        _handled(rows)
        self.spool.bury(DeadLetter(r, reason, detail, status) for r in rows)
        state.held -= len(rows)
        self.metrics.dead_lettered(reason, len(rows))
        self._log(state.region, rows, "expired" if reason == "expired" else "dead_letter", status, latency, reason, detail)

    def _requeue(self, state: RegionState, rows: list[Row]) -> None:
        """Rows whose events need outcomes of their own: spooled again one a
        row (``Spool.requeue``, in the transaction that deletes them), from
        where they come back as fresh rows; nothing is sent or logged now."""
        _handled(rows)
        for row in rows:
            self.spool.requeue(row)
            state.held -= row.count

    def dead_on_arrival(self, letters: list[DeadLetter]) -> None:
        """Events that were dead letters from the start (the handler buried them
        with their request's rows: too old for the vendor on arrival), counted,
        logged and shown as the sender's own outcomes are."""
        by_region: dict[str, list[DeadLetter]] = {}
        for letter in letters:
            by_region.setdefault(letter.row.region, []).append(letter)
        for region, group in by_region.items():
            first = group[0]
            self.metrics.dead_lettered(first.reason, len(group))
            outcome = "expired" if first.reason == "expired" else "dead_letter"
            self._log(region, [letter.row for letter in group], outcome, None, 0.0, first.reason, first.detail)

    def _log(
        self,
        region: str,
        rows: list[Row],
        outcome: str,
        status: int | None,
        latency: float,
        reason: str | None = None,
        detail: str | None = None,
    ) -> None:
        facts = facts_of(rows)  # one pass over the batch's rows (up to 50)
        attempts = max(r.attempts for r in rows) + (1 if status is not None else 0)
        entry = outcome_record(
            outcome, rows[0].route, rows[0].project, facts.names, region=region, status=status,
            insert_ids=facts.insert_ids, canonical_ids=sorted(facts.canonical), sources=sorted(facts.sources),
            rewrites=facts.rewrites, attempts=attempts, latency=latency,
            queued=time.time() - min(r.enqueued_at for r in rows), reason=reason, detail=detail,
        )
        self.forwarded.record(entry)
        self.metrics.outcome(outcome, rows[0].route, len(facts.names))
        if self.live is not None and self.live.watching:
            self.live.delivery(entry["insert_ids"], outcome, status, reason)


# The rows of the batch a ``_deliver`` task sends that have had an outcome (sent,
# buried, requeued, held back): its catch-all retries only the others.
_HANDLED: contextvars.ContextVar[set[int]] = contextvars.ContextVar("handled")


def _handled(rows: list[Row]) -> None:
    done = _HANDLED.get(None)
    if done is not None:
        done.update([r.id for r in rows])


class SpoolFeed:
    """The local spool's feed (``queue.sqlite.Spool``): each commit's rows are
    handed over in memory while a region is live (caught up); a region that
    is behind (start-up, a backlog, memory full) reads the file from its
    cursor instead, and turns live again once a read comes back short. A
    failed batch waits in memory, at the front of its group."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.sender: Sender  # set by attach

    def attach(self, sender: Sender) -> None:
        self.sender = sender

    def notify(self, region: str) -> None:
        state = self.sender.regions.get(region)
        if state:
            state.wake.set()

    def accept(self, rows: list[Row]) -> None:
        """Freshly committed rows (``Spool.on_commit``): straight into memory
        while a region is live, else left for the next read from disk."""
        regions, limit = self.sender.regions, self.sender.limit
        if self.spool.after_foreign_rows:
            # Rows another process added (a replay) lie between the cursors and
            # these: every region reads the file from its cursor, these included.
            for behind in regions.values():
                behind.live = False
                behind.reread = behind.reading
                behind.wake.set()
            return
        first = rows[0].region if rows else ""
        if all(row.region == first for row in rows):  # one region: nearly every commit
            by_region = {first: rows} if rows else {}
        else:
            by_region = {}
            for row in rows:
                by_region.setdefault(row.region, []).append(row)
        for region, fresh in by_region.items():
            state = regions.get(region)
            if state is None:
                continue
            if state.reading:
                state.pending.extend(fresh)
            elif state.live and state.held + sum([r.count for r in fresh]) <= limit(state):
                self.hold(state, fresh)
            else:
                state.live = False  # left on disk for the next read
            state.wake.set()

    @staticmethod
    def hold(state: RegionState, rows: list[Row]) -> None:
        # The cursor makes a row read from disk and also handed over by a commit
        # count once. Consecutive rows mostly share their group: it is looked
        # up again only when the key changes.
        groups, cursor, held = state.groups, state.cursor, 0
        last: GroupKey | None = None
        group: deque[Row] | None = None
        for row in rows:
            if row.id > cursor:
                key = (row.protocol, row.route, row.project, row.ip)
                if key != last or group is None:
                    group = groups.get(key)
                    if group is None:
                        group = groups[key] = deque()
                    last = key
                group.append(row)
                cursor = row.id
                held += row.count
        state.cursor = cursor
        state.held += held

    def next_wakeup(self, state: RegionState) -> float:
        cfg = self.sender.settings
        now = time.time()
        if state.paused_until > now:
            return state.paused_until - now
        waits = [1.0]  # poll: rows added by another process (`firstparty replay`)
        for rows in state.groups.values():
            if rows:
                waits.append(max(0.0, rows[0].enqueued_at + cfg.batch_window_seconds - now))
        return min(waits)

    async def refill(self, state: RegionState) -> None:
        cfg = self.sender.settings
        # Failing with nothing left in memory: one batch from disk to try with.
        limit = self.sender.limit(state) or (0 if state.held else cfg.batch_size)
        now = time.time()
        # Read from disk while not live, and once a second anyway: rows another
        # process added (`firstparty replay`) only show up there.
        if (state.live and now - state.last_read < 1.0) or state.held >= max(1, limit // 2):
            return
        want = limit - state.held
        state.reading = True
        try:
            rows = await self.spool.read(state.region, state.cursor, want)
        except BaseException:
            # What was committed meanwhile (``pending``) is let go below: it is
            # read from disk next time, before anything moves the cursor past it.
            state.live = False
            raise
        finally:
            state.reading = False
            pending, state.pending = state.pending, []
        state.last_read = now
        # ``want`` is in events and a row may hold several: what is past
        # the budget stays on disk for the next read (the cursor stops at
        # the last row held).
        read = len(rows)
        budget = want
        for i, row in enumerate(rows):
            if budget <= 0:
                rows = rows[:i]
                break
            budget -= row.count
        self.hold(state, rows)
        was_live = state.live
        # A short read saw every commit made before it ran; commits made
        # since are in ``pending`` (a row in both counts once: the cursor).
        # Together they are the whole queue: live from here on.
        pending_events = sum([r.count for r in pending])
        state.live = read < want and len(rows) == read and state.held + pending_events <= limit and not state.reread
        state.reread = False
        if state.live:
            self.hold(state, pending)
        if not was_live:
            state.from_disk += sum([r.count for r in rows])
            if state.live:
                self._drained(state)

    def _drained(self, state: RegionState) -> None:
        """Caught up after reading a backlog from disk: hand the memory it took
        back to the system (``services.memory``), so RSS returns to its level
        before the outage instead of staying at the high-water mark."""
        backlog, state.from_disk = state.from_disk, 0
        if backlog >= TRIM_AFTER_ROWS and memory.due():
            self.sender.metrics.memory_trims.inc()
            asyncio.get_running_loop().run_in_executor(None, memory.release)

    def hold_back(
        self, state: RegionState, key: GroupKey, batch: list[Row], delay: float, behind: list[Row] | None = None
    ) -> None:
        rows = state.groups.setdefault(key, deque())
        skip = len(behind) if behind and [r.id for r in islice(rows, len(behind))] == [r.id for r in behind] else 0
        rows.rotate(-skip)
        rows.extendleft(reversed(batch))  # back to the front (behind ``behind``), in order
        rows.rotate(skip)

    def unfinished(self) -> bool:
        """Work a drain may still finish: the spool is this process's own."""
        return self.spool.depth > 0 or self.sender.sending

    async def stopped(self) -> None:
        await self.spool.flush()
