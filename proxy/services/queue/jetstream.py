"""The durable queue on NATS JetStream (``delivery.queue = "jetstream"``): one
stream shared by a fleet, so an instance that goes away strands nothing.

Layout, created at start (or checked: a stream or consumer that disagrees
with the config stops the start with one line naming the setting):

- stream ``<stream>``: file storage, ``stream_replicas`` copies, work-queue
  retention (a message is deleted once acknowledged), ``stream_max_bytes`` and
  ``stream_max_age_days`` with new messages refused when full, a two-minute
  duplicate window; subjects ``<stream>.<region>`` (the sender's regions:
  ``us``, ``eu``, ``in``, ``segment-us``, ``segment-eu``);
- per region a durable pull consumer ``<stream>-<region>``, shared by every
  instance: each message goes to one of them, is acknowledged only after the
  upstream's 2xx, and comes back (to any instance) after ``ack_wait`` if the
  one holding it dies;
- stream ``<stream>_DEAD`` (limits retention, at most ``max_dead_letters``
  messages of at most ``dead_letter_days``, the oldest discarded): rejected
  events with the reason.

A message is one event: its JSON as the payload; headers ``Nats-Msg-Id`` (the
event's ``$insert_id`` or Segment ``messageId``: a client's resend inside the
duplicate window is stored once), and ``Fp-Route``, ``Fp-Project``, ``Fp-Ip``,
``Fp-Protocol``, ``Fp-Time``, ``Fp-Enqueued``, ``Fp-Meta`` (what the forwarded
log needs).

The SDK's 2xx waits for JetStream's publish acknowledgement of every event of
the request (with replicas > 1, the replicated one). The NATS server
unreachable: new events are answered 503 at once (never buffered in memory),
``/readyz`` fails, one log line per change, and publishing resumes on
reconnect. Stream limits reached: 503 too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import orjson

from ...errors import ConfigError, PayloadTooLarge, ProxyError
from ...settings import DeliverySettings
from .base import SpoolFull, SpoolUnwritable
from .rows import DeadLetter, NewRow, Row

log = logging.getLogger(__name__)

DUPLICATE_WINDOW_SECONDS = 120.0
PUBLISH_TIMEOUT_SECONDS = 5.0
# A cluster still forming cannot place a replicated stream yet (JetStream's
# error 10005); the proxy waits this long for it at start-up.
NO_SUITABLE_PEERS = 10005
PLACEMENT_WAIT_SECONDS = 15.0
# JetStream's error codes for a stream at its limits (nats-server's errors.json).
_FULL_CODES = {10047, 10077, 10027}


def _plain(value: Any) -> str:
    """An enum of nats-py's or the string the server sent, compared as the string."""
    return str(getattr(value, "value", value))


def subject_of(stream: str, region: str) -> str:
    return f"{stream}.{region}"


class JetStreamQueue:
    """What the handlers and the sender use of a queue (``Spool``'s surface), on JetStream."""

    # One message per event: JetStream de-duplicates by each event's insert id.
    rows_hold_requests = False

    def __init__(self, settings: DeliverySettings, regions: Iterable[str]) -> None:
        self.settings = settings
        self.stream = settings.stream
        self.regions = list(regions)
        self.max_rows = 1 << 62  # JetStream's own limits bound the stream (503 when reached)
        self.depth = 0  # messages waiting in the stream, all instances together (refreshed by stats())
        self.refusing: str | None = None
        self.on_state: Callable[[bool], None] | None = None
        self.on_commit: Callable[[list[Row]], None] | None = None  # unused: every instance reads the stream
        self.salvaged = None
        self.commits = 0
        self._nc: Any = None
        self._js: Any = None
        self._subs: dict[str, Any] = {}
        self._held: dict[int, Any] = {}  # stream sequence -> the message, until acked or nak'd
        self._touched = 0.0  # when held messages were last reported in progress
        self._pending: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._reopening: asyncio.Task[None] | None = None

    # ----------------------------------------------------------- lifecycle

    async def open(self) -> None:
        import nats
        from nats.errors import NoServersError

        url = self.settings.nats_url
        try:
            self._nc = await nats.connect(
                url.split(","),
                name="firstparty-proxy",
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=1,
                connect_timeout=5,
                disconnected_cb=self._disconnected,
                reconnected_cb=self._reconnected,
                closed_cb=self._closed,
                error_cb=self._error,
            )
        except (NoServersError, OSError, asyncio.TimeoutError) as exc:
            raise ProxyError(f"delivery.nats_url: cannot reach the NATS server at {url} ({exc.__class__.__name__})") from exc
        self._js = self._nc.jetstream(timeout=PUBLISH_TIMEOUT_SECONDS)
        await self._ensure_streams()
        for region in self.regions:
            await self._ensure_consumer(region)
            self._subs[region] = await self._js.pull_subscribe(
                subject_of(self.stream, region), durable=self._durable(region), stream=self.stream
            )
        await self.stats()

    async def close(self) -> None:
        self._closing = True  # the disconnect that follows is ours, not an outage
        if self._reopening is not None:
            self._reopening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reopening
        await self.flush()
        if self._nc is not None and not self._nc.is_closed:
            # Not drain(): it waits up to 30 s on the pull subscriptions. The acks
            # are written (flush above); make sure the server has them, then close.
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=2)
            with contextlib.suppress(Exception):
                await self._nc.close()
        self._nc = None

    async def _add_stream(self, config: Any) -> None:
        """Creates a stream; a cluster that is still forming (its peers not all
        joined: "no suitable peers for placement") is waited for, up to
        PLACEMENT_WAIT_SECONDS, as a fleet started all at once meets it."""
        from nats.js.errors import APIError

        deadline = time.monotonic() + PLACEMENT_WAIT_SECONDS
        while True:
            try:
                await self._js.add_stream(config)
                return
            except APIError as exc:
                if exc.err_code != NO_SUITABLE_PEERS or time.monotonic() > deadline:
                    raise ProxyError(
                        f"delivery.stream_replicas: the NATS server cannot create the stream {config.name} "
                        f"with {config.num_replicas} replica(s): {exc.description}"
                        + (" (a replicas = N stream needs a JetStream cluster of at least N servers)"
                           if exc.err_code == NO_SUITABLE_PEERS else "")
                    ) from exc
                await asyncio.sleep(0.5)

    def _durable(self, region: str) -> str:
        return f"{self.stream}-{region}"

    async def _ensure_streams(self) -> None:
        from nats.js import api
        from nats.js.errors import NotFoundError

        cfg = self.settings
        want = api.StreamConfig(
            name=self.stream,
            subjects=[f"{self.stream}.*"],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            num_replicas=cfg.stream_replicas,
            max_bytes=cfg.stream_max_bytes,
            max_age=cfg.stream_max_age_days * 86400,
            discard=api.DiscardPolicy.NEW,
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
        )
        try:
            have = (await self._js.stream_info(self.stream)).config
        except NotFoundError:
            await self._add_stream(want)
            log.info("created JetStream stream %s (%d replica(s))", self.stream, cfg.stream_replicas)
        else:
            self._compare(have, want)
        dead = f"{self.stream}_DEAD"
        try:
            await self._js.stream_info(dead)
        except NotFoundError:
            # Bounded like the SQLite spool's dead letters: the oldest go first.
            await self._add_stream(api.StreamConfig(
                name=dead, subjects=[f"{dead}.*"], retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE, num_replicas=cfg.stream_replicas,
                max_msgs=cfg.max_dead_letters, max_age=cfg.dead_letter_days * 86400,
                discard=api.DiscardPolicy.OLD,
            ))

    def _compare(self, have: Any, want: Any) -> None:
        """The existing stream must be the configured one: never change it silently."""
        checks = [
            ("delivery.stream_replicas", have.num_replicas, want.num_replicas),
            ("delivery.stream_max_bytes", have.max_bytes, want.max_bytes),
            ("delivery.stream_max_age_days", round(have.max_age or 0), round(want.max_age)),
            ("delivery.stream (retention)", _plain(have.retention), _plain(want.retention)),
            ("delivery.stream (storage)", _plain(have.storage), _plain(want.storage)),
            ("delivery.stream (subjects)", list(have.subjects or []), list(want.subjects)),
        ]
        for key, got, wanted in checks:
            if got != wanted:
                raise ConfigError(
                    key,
                    f"the JetStream stream {self.stream!r} has {got!r}, the config says {wanted!r}; "
                    "change the config to match, or the stream (nats stream edit / a new stream name)",
                )

    async def _ensure_consumer(self, region: str) -> None:
        from nats.js import api
        from nats.js.errors import NotFoundError

        name = self._durable(region)
        subject = subject_of(self.stream, region)
        try:
            info = await self._js.consumer_info(self.stream, name)
        except NotFoundError:
            await self._js.add_consumer(self.stream, api.ConsumerConfig(
                durable_name=name,
                filter_subject=subject,
                ack_policy=api.AckPolicy.EXPLICIT,
                ack_wait=self.settings.ack_wait_seconds,
                max_deliver=-1,  # an event is retried until delivered or dead-lettered, never dropped
                max_ack_pending=100_000,
            ))
            return
        if info.config.filter_subject != subject:
            raise ConfigError(
                "delivery.stream",
                f"the consumer {name!r} on stream {self.stream!r} reads {info.config.filter_subject!r}, not {subject!r}",
            )

    # ---------------------------------------------------- connection state

    async def _disconnected(self) -> None:
        if not self._closing:
            self._refuse("the NATS server is unreachable")

    async def _reconnected(self) -> None:
        if self.refusing is not None:
            self.refusing = None
            log.warning("NATS server reachable again: accepting events")
            if self.on_state:
                self.on_state(True)

    async def _error(self, exc: Exception) -> None:
        log.debug("NATS client: %s", exc)

    async def _closed(self) -> None:
        """The client gave the connection up for good (the server refused a
        message, or reconnecting ran out): make a new one, so a single bad
        moment never leaves every later request answered 503 until a restart."""
        if self._closing or self._reopening is not None:
            return
        self._refuse("the NATS connection was closed")
        self._reopening = asyncio.create_task(self._reopen())

    async def _reopen(self) -> None:
        delay = 0.2
        try:
            while not self._closing:
                try:
                    await self.open()
                except (ProxyError, OSError, asyncio.TimeoutError) as exc:
                    self._refuse(f"the NATS connection was closed ({exc.__class__.__name__})")
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                await self._reconnected()
                return
        finally:
            self._reopening = None

    def _refuse(self, why: str) -> None:
        if self.refusing is None:
            log.error("JetStream queue: %s; new events are answered 503 until it is back", why)
            if self.on_state:
                self.on_state(False)
        self.refusing = why

    @property
    def accepting(self) -> bool:
        return self.refusing is None and self._nc is not None and self._nc.is_connected

    # --------------------------------------------------------------- writes

    async def enqueue(self, rows: Sequence[NewRow], letters: Sequence[DeadLetter] = ()) -> None:
        """Returns once JetStream acknowledged every row, and every one of
        ``letters`` (dead letters from the start) in the dead-letter stream;
        SpoolFull / SpoolUnwritable (503 to the client) otherwise."""
        if not self.accepting:
            raise SpoolUnwritable(f"the queue cannot take events now ({self.refusing or 'not connected'})")
        now = time.time()
        messages = [(row, self._headers(row, now)) for row in rows]
        # The server closes a connection that sends a message over its max_payload
        # (headers included): such an event is refused here, before any is published.
        limit = self._nc.max_payload
        for row, headers in messages:
            size = len(row.body) + sum(len(k) + len(v) + 4 for k, v in headers.items()) + 16
            if size > limit:
                raise PayloadTooLarge(
                    f"an event is {size} bytes with its headers; the NATS server takes at most {limit} "
                    "per message (its max_payload)"
                )
        for letter in letters:  # the same body and meta, and a reason
            size = len(letter.row.body) + len(letter.row.meta) + len(letter.detail[:1000]) + 400
            if size > limit:
                raise PayloadTooLarge(f"an event is {size} bytes with its headers; the NATS server takes at most {limit}")
        work = [self._publish(r, h) for r, h in messages] + [self._bury(letter) for letter in letters]
        results = await asyncio.gather(*work, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise self._refusal(failed[0])
        self.commits += 1

    @staticmethod
    def _headers(row: NewRow, now: float) -> dict[str, str]:
        meta = row.info or {}
        headers = {
            "Fp-Route": row.route,
            "Fp-Protocol": row.protocol,
            "Fp-Ip": "1" if row.ip else "0",
            "Fp-Enqueued": repr(now),
            "Fp-Meta": row.meta.decode(),
        }
        if row.project:
            headers["Fp-Project"] = row.project
        if row.event_time is not None:
            headers["Fp-Time"] = repr(row.event_time)
        if meta.get("i"):
            headers["Nats-Msg-Id"] = str(meta["i"])
        return headers

    async def _publish(self, row: NewRow, headers: dict[str, str]) -> Any:
        return await self._js.publish(subject_of(self.stream, row.region), row.body, headers=headers)

    def _refusal(self, exc: BaseException) -> SpoolFull:
        from nats.js.errors import APIError

        if isinstance(exc, APIError) and (exc.err_code in _FULL_CODES or "maximum" in (exc.description or "")):
            return SpoolFull(f"the JetStream stream {self.stream} is full ({exc.description})")
        return SpoolUnwritable(f"JetStream did not acknowledge the events ({exc.__class__.__name__})")

    # ---------------------------------------------------------------- reads

    async def fetch(self, region: str, limit: int, wait: float) -> list[Row]:
        """Up to ``limit`` messages for ``region`` (waiting at most ``wait`` s for the first)."""
        from nats.errors import TimeoutError as NatsTimeout

        sub = self._subs.get(region)
        if sub is None or limit <= 0 or not self.accepting:
            if not self.accepting:
                await asyncio.sleep(wait)
            return []
        try:
            msgs = await sub.fetch(batch=limit, timeout=max(wait, 0.05))
        except (NatsTimeout, asyncio.TimeoutError):
            return []
        rows = []
        for msg in msgs:
            row = self._row(region, msg)
            self._held[row.id] = msg
            rows.append(row)
        return rows

    @staticmethod
    def _row(region: str, msg: Any) -> Row:
        h = msg.headers or {}
        meta = h.get("Fp-Meta", "{}").encode()
        try:
            info = orjson.loads(meta)
        except orjson.JSONDecodeError:
            info = {}
        md = msg.metadata
        return Row(
            md.sequence.stream, h.get("Fp-Route", "track"), region, h.get("Fp-Project"), h.get("Fp-Ip") == "1",
            msg.data, meta, float(h.get("Fp-Enqueued", time.time())), md.num_delivered - 1,
            float(h["Fp-Time"]) if "Fp-Time" in h else None, h.get("Fp-Protocol", "mixpanel"), info,
        )

    # ------------------------------------------------------------- outcomes

    def _later(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def keep_alive(self, now: float) -> None:
        """Tell JetStream the messages held here are still being worked on
        (``+WPI``), every half ``ack_wait``: a batch waiting on a slow upstream
        is not handed to another instance meanwhile (sent twice)."""
        if now - self._touched < self.settings.ack_wait_seconds / 2:
            return
        self._touched = now
        for msg in self._held.values():
            self._later(msg.in_progress())

    def ack(self, rows: Iterable[Row]) -> None:
        for row in rows:
            msg = self._held.pop(row.id, None)
            if msg is not None:
                self._later(msg.ack())

    def nak(self, ids: Iterable[int], delay: float | None) -> None:
        """Give messages back to the stream, for any instance, after ``delay``."""
        for i in ids:
            msg = self._held.pop(i, None)
            if msg is not None:
                self._later(msg.nak(delay=delay))

    def give_back(self) -> None:
        """Every message this instance holds back to the stream now (shutting down)."""
        self.nak(list(self._held), None)

    def bury(self, letters: Iterable[DeadLetter]) -> None:
        for letter in letters:
            self._later(self._bury(letter))

    async def _bury(self, letter: DeadLetter) -> None:
        row = letter.row
        headers = {
            "Fp-Route": row.route, "Fp-Protocol": row.protocol, "Fp-Ip": "1" if row.ip else "0",
            "Fp-Meta": row.meta.decode(), "Fp-Reason": letter.reason, "Fp-Detail": letter.detail[:1000],
            "Fp-Status": str(letter.status or ""), "Fp-Enqueued": repr(row.enqueued_at),
        }
        if row.project:
            headers["Fp-Project"] = row.project
        await self._js.publish(f"{self.stream}_DEAD.{row.region}", row.body, headers=headers)
        msg = self._held.pop(row.id, None)
        if msg is not None:
            await msg.ack()

    def requeue(self, row: Row) -> None:
        """Never asked: a message holds one event (``rows_hold_requests`` is
        False), and the sender requeues only rows of several."""
        raise ValueError(f"a JetStream message holds one event; row {row.id} holds {row.count}")

    def count_attempt(self, rows: Iterable[Row]) -> None:
        """JetStream counts deliveries itself (``num_delivered``)."""

    async def flush(self) -> None:
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    async def _dead_letters(self) -> Any:
        """Every message of the dead-letter stream, oldest first (an ephemeral reader)."""
        from nats.errors import TimeoutError as NatsTimeout

        dead = f"{self.stream}_DEAD"
        sub = await self._js.pull_subscribe(f"{dead}.*", stream=dead)
        try:
            while True:
                try:
                    msgs = await sub.fetch(100, timeout=0.5)
                except (NatsTimeout, asyncio.TimeoutError):
                    return
                for msg in msgs:
                    yield msg
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def dead_by_reason(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        async for msg in self._dead_letters():
            reason = (msg.headers or {}).get("Fp-Reason", "?")
            counts[reason] = counts.get(reason, 0) + 1
        return counts

    async def replay(self, reason: str | None = None) -> int:
        """Dead letters (of ``reason``, or all) back into the stream, for any
        instance to send again (``firstparty replay``, once the cause is fixed)."""
        moved = 0
        dead = f"{self.stream}_DEAD"
        async for msg in self._dead_letters():
            headers = dict(msg.headers or {})
            if reason is not None and headers.get("Fp-Reason") != reason:
                continue
            for key in ("Fp-Reason", "Fp-Detail", "Fp-Status", "Nats-Msg-Id"):
                headers.pop(key, None)
            region = msg.subject.rpartition(".")[2]
            await self._js.publish(subject_of(self.stream, region), msg.data, headers=headers)
            await self._js.delete_msg(dead, msg.metadata.sequence.stream)
            moved += 1
        return moved

    async def stats(self) -> dict[str, Any]:
        """The same shape as the SQLite spool's: depth (all instances), by region, dead letters."""
        by_region: dict[str, int] = {}
        for region in self.regions:
            try:
                info = await self._js.consumer_info(self.stream, self._durable(region))
            except Exception:  # noqa: BLE001 - unreachable: keep the last figures
                return {"depth": self.depth, "oldest_age_seconds": 0.0, "depth_by_region": {}, "dead_letters": 0}
            by_region[region] = info.num_pending + info.num_ack_pending
        dead = 0
        with contextlib.suppress(Exception):
            dead = (await self._js.stream_info(f"{self.stream}_DEAD")).state.messages
        oldest = 0.0
        with contextlib.suppress(Exception):
            state = (await self._js.stream_info(self.stream)).state
            if state.messages and state.first_ts:
                from datetime import datetime

                first = datetime.fromisoformat(str(state.first_ts).replace("Z", "+00:00")).timestamp()
                oldest = round(max(0.0, time.time() - first), 3)
        self.depth = sum(by_region.values())
        return {"depth": self.depth, "oldest_age_seconds": oldest, "depth_by_region": by_region,
                "dead_letters": dead, "dead_by_reason": {}}


# ------------------------------------------------------------------ sender

from ..delivery import GroupKey, RegionState, Sender  # noqa: E402  (the feed serves the sender above the queue)


class StreamFeed:
    """The sender's feed from the shared stream (``delivery.Feed``).

    Batching, classification, splitting and dead letters are the sender's.
    What differs from the local spool's feed: rows come only from ``fetch``
    (no hand-over from commits: any instance may deliver any event); a retry
    gives the messages back to the stream with a delay (``nak``) instead of
    holding them, since JetStream would hand them to another instance after
    ``ack_wait`` anyway; and stopping gives back what was not sent, at once."""

    def __init__(self, queue: JetStreamQueue) -> None:
        self.queue = queue
        self.sender: Sender  # set by attach

    def attach(self, sender: Sender) -> None:
        self.sender = sender

    def accept(self, rows: list[Row]) -> None:  # noqa: ARG002 - every instance reads the stream
        return

    def notify(self, region: str) -> None:
        return  # the fetch waiting on the consumer wakes by itself

    @staticmethod
    def hold(state: RegionState, rows: list[Row]) -> None:
        # Redeliveries come with older sequence numbers: no cursor here.
        for row in rows:
            state.groups.setdefault((row.protocol, row.route, row.project, row.ip), deque()).append(row)
            state.held += 1

    async def refill(self, state: RegionState) -> None:
        sender = self.sender
        cfg = sender.settings
        now = time.time()
        self.queue.keep_alive(now)  # paused or not: batches in flight stay this instance's
        if state.paused_until > now:
            return
        room = (sender.limit(state) or (0 if state.held else cfg.batch_size)) - state.held
        if room > 0 and not sender.draining:
            forming = any(state.groups.values())
            rows = await self.queue.fetch(state.region, min(room, cfg.batch_size * cfg.max_in_flight),
                                          cfg.batch_window_seconds if forming else 1.0)
            self.hold(state, rows)

    def next_wakeup(self, state: RegionState) -> float:
        cfg = self.sender.settings
        now = time.time()
        if state.paused_until > now:
            return state.paused_until - now
        if any(state.groups.values()) and state.in_flight >= cfg.max_in_flight:
            return 1.0  # a finished send wakes the loop
        return 0.0  # the next fetch does the waiting

    def hold_back(
        self, state: RegionState, key: GroupKey, batch: list[Row], delay: float, behind: list[Row] | None = None
    ) -> None:
        # Not kept in memory for this instance: handed to the stream, due after the pause.
        state.held -= len(batch)
        self.queue.nak({r.id for r in batch}, max(0.0, state.paused_until - time.time()))

    def unfinished(self) -> bool:
        # The stream is the fleet's: drain what this instance holds, not the stream.
        return self.sender.sending or any(s.held for s in self.sender.regions.values())

    async def stopped(self) -> None:
        # Whatever this instance still held goes back to the stream now, not after ack_wait.
        for state in self.sender.regions.values():
            state.groups.clear()
        self.queue.give_back()
        await self.queue.flush()
