"""The durable spool: accepted events wait here until the upstream takes them.

SQLite in WAL mode, driven from one dedicated thread (the event loop never
blocks on the disk). Invariants:

- an event is acknowledged to its client only after the transaction that
  holds it is committed and fsync'd (``synchronous=FULL``);
- a row leaves ``queue`` only in the same transaction that records its
  outcome: deleted after an upstream 2xx, or moved to ``dead`` with a reason;
- a row holds ``count`` events that arrived in one request (their JSON joined
  by commas, their facts in one meta, as columns; a single event is its own
  JSON and meta): a batch of 10 events is one B-tree cell and one id, not ten. Depth,
  ``max_rows`` and every figure count events, never rows;
- ids come from ``AUTOINCREMENT`` and are never reused, so a reader that
  walks ``id > cursor`` sees every row exactly once per process lifetime
  (a restart walks from 0 again: whatever is still queued is sent again,
  and the vendor de-duplicates by ``$insert_id``);
- writes are group-committed: every insert, delete and move queued while a
  transaction runs goes into the next one, so one fsync serves many requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import SpoolFull, SpoolUnwritable
from .rows import DeadLetter, NewRow, Row
from .admin import stats_of
from .sqlfile import _COLUMNS, _PAGE, Salvage, open_or_salvage

log = logging.getLogger(__name__)

_INSERT_HEAD = (
    "INSERT INTO queue (route, region, project, ip, body, meta, enqueued_at, event_time, protocol, count) VALUES "
)
_INSERT_ROW = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_ROWS_PER_INSERT = 256  # 10 parameters each, far below SQLite's 32,766 limit


@dataclass(slots=True)
class _Pending:
    """One transaction's share of the writes waiting (``Spool._take_pending``)."""

    inserts: list[tuple[NewRow, float]]
    door: list[DeadLetter]  # dead letters written with their request (expired on arrival)
    inserted: int  # events the inserts hold
    waiters: list[asyncio.Future[None]]
    deletes: list[tuple[int, int]]  # (row id, its events)
    dead: list[DeadLetter]
    attempts: list[tuple[int, int]]
    requeued: list[tuple[Row, list[NewRow]]]


def _fail(waiters: list[asyncio.Future[None]], failure: Exception) -> None:
    for w in waiters:
        if not w.done():
            w.set_exception(failure)

# SQLite's words for a write the disk refused (SQLITE_FULL, SQLITE_IOERR, SQLITE_CANTOPEN).
_WRITE_ERRORS = ("full", "disk i/o error", "unable to open", "readonly")
# While the spool refuses, how often it looks whether it can write again.
RECOVERY_CHECK_SECONDS = 1.0
# Outcomes per transaction while space is tight.
TIGHT_OUTCOMES = 16


def is_write_error(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.DatabaseError) and any(w in str(exc).lower() for w in _WRITE_ERRORS)


def _row(t: tuple[Any, ...]) -> Row:
    return Row(t[0], t[1], t[2], t[3], bool(t[4]), t[5], t[6], t[7], t[8], t[9], t[10], None, t[11])


class Spool:
    # The handler spools a request's events of one project as one row.
    rows_hold_requests = True

    def __init__(
        self,
        path: Path,
        *,
        max_rows: int,
        fsync: bool = True,
        min_free_bytes: int = 0,
        max_dead: int = 100_000,
        dead_seconds: float = 30 * 86400,
    ) -> None:
        self.path = path
        self.max_rows = max_rows
        # Dead letters: at most this many, none older (pruned as new ones are written).
        self.max_dead = max_dead
        self.dead_seconds = dead_seconds
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        # Why new events are refused (low space, a write the disk refused), or None.
        self.refusing: str | None = None
        self._disk_refused = False  # a write failed; outcomes wait for the disk
        self._room = 0  # bytes that may still be written above min_free_bytes (an estimate, re-measured)
        self._watch: asyncio.Task[None] | None = None
        self.on_state: Callable[[bool], None] | None = None  # told when accepting flips
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        self._conn: sqlite3.Connection | None = None
        self.depth = 0  # events in queue, kept in memory for the backpressure check
        # Pending work for the next transaction.
        self._inserts: list[tuple[NewRow, float]] = []
        self._inserted = 0  # events in _inserts
        self._committing = 0  # events in the transaction running now (not in depth yet)
        self.last_id = 0  # the highest row id this process knows to be taken
        self.after_foreign_rows = False  # the last commit's rows came after rows another process added
        self._requeued: list[tuple[Row, list[NewRow]]] = []  # rows to store one event a row (requeue)
        self._insert_waiters: list[asyncio.Future[None]] = []
        self._door: list[DeadLetter] = []  # dead letters from the start, with their request's inserts
        self._deletes: list[tuple[int, int]] = []  # (row id, its events)
        self._dead: list[DeadLetter] = []
        self._attempts: list[tuple[int, int]] = []
        self._flushing: asyncio.Task[None] | None = None
        # Set by open(): on Python 3.11 every asyncio.get_running_loop() is a
        # getpid() system call, too many for a per-request path.
        self._loop: asyncio.AbstractEventLoop | None = None
        self.commits = 0
        self.salvaged: Salvage | None = None  # set by open() when the file had to be replaced
        # Called with the rows of each committed transaction (ids assigned), so
        # the sender gets fresh rows without reading them back from disk.
        self.on_commit: Callable[[list[Row]], None] | None = None

    # ----------------------------------------------------------- lifecycle

    async def open(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._conn, salvaged = await loop.run_in_executor(self._executor, open_or_salvage, self.path, self.fsync)
        self.salvaged = salvaged
        if salvaged is not None:
            log.error(
                "spool %s could not be read (%s): moved aside to %s; %d queued events and %d dead letters "
                "salvaged into a fresh spool, which is in use",
                self.path, salvaged.error, salvaged.moved_to, salvaged.queued, salvaged.dead,
            )
        self.depth = await self._call(lambda c: c.execute("SELECT COALESCE(SUM(count), 0) FROM queue").fetchone()[0])
        self.last_id = await self._call(
            lambda c: c.execute("SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'queue'").fetchone()[0]
        )
        await self._check_space()
        self._watch = loop.create_task(self._watch_space())

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self.flush()
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        self._executor.shutdown(wait=True)

    async def _call(self, fn: Any) -> Any:
        conn = self._conn
        assert conn is not None and self._loop is not None, "spool is not open"
        return await self._loop.run_in_executor(self._executor, fn, conn)

    # --------------------------------------------------------------- writes

    @property
    def accepting(self) -> bool:
        return self.refusing is None

    async def enqueue(self, rows: Sequence[NewRow], letters: Sequence[DeadLetter] = ()) -> None:
        """Durably add rows, and ``letters`` (events that are dead letters from
        the start, ``letters_of``) in the same transaction; returns once they
        are committed. Raises SpoolFull (SpoolUnwritable while the disk is full
        or refuses writes): then neither is kept, the client resends both."""
        if self.refusing is not None:
            raise SpoolUnwritable(f"the spool cannot take events now ({self.refusing})")
        events = sum([r.count for r in rows])
        held = self.depth + self._committing + self._inserted  # stored, being written, waiting to be
        if held + events > self.max_rows:
            raise SpoolFull(f"spool holds {held} events, its limit is {self.max_rows}")
        self._inserted += events
        now = time.time()
        self._inserts.extend((r, now) for r in rows)
        self._door.extend(letters)
        assert self._loop is not None, "spool is not open"
        waiter = self._loop.create_future()
        self._insert_waiters.append(waiter)
        self._schedule()
        await waiter

    def ack(self, rows: Iterable[Row]) -> None:
        """The upstream took these rows (or views of one, ``Row.split``):
        delete them in the next transaction."""
        self._deletes.extend([(row.id, row.count) for row in rows])
        self._schedule()

    def requeue(self, row: Row) -> None:
        """Store a row's events one a row instead (new ids, after every row
        so far), in the transaction that deletes it: for an outcome that
        differs per event (an expired event, one the upstream refuses). The
        new rows reach the sender as any committed rows do."""
        singles = [
            NewRow(one.route, one.region, one.project, one.ip, one.body, one.meta, one.event_time, one.protocol, one.info)
            for one in row.split()
        ]
        # Kept apart from clients' inserts (which the free-space check may
        # refuse) and from plain deletes (which a failed write puts back on
        # their own): the row's delete goes only with its events' inserts.
        self._requeued.append((row, singles))
        self._schedule()

    def bury(self, letters: Iterable[DeadLetter]) -> None:
        """Move rows to the dead-letter table in the next transaction."""
        self._dead.extend(letters)
        self._schedule()

    def count_attempt(self, rows: Iterable[Row]) -> None:
        for row in rows:
            row.attempts += 1
            self._attempts.append((row.attempts, row.id))
        self._schedule()

    def _schedule(self) -> None:
        if self._flushing is None or self._flushing.done():
            assert self._loop is not None, "spool is not open"
            self._flushing = self._loop.create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        # Runs while there is pending work; each pass is one transaction.
        while self._inserts or self._door or self._deletes or self._dead or self._attempts or self._requeued:
            p = self._take_pending()
            # Near the threshold every page counts: retry counts are only for the
            # log (an UPDATE rewrites each row's page), and the WAL is cut after
            # each transaction so that deletes, which touch a page per row, fit.
            tight = bool(self.min_free_bytes) and (self.refusing is not None or self._room < self.min_free_bytes)
            if tight:
                self._tighten(p)
            if p.inserts and self.min_free_bytes and not await self._room_for(p.inserts):
                # Below the threshold: these events are refused (503, the clients
                # keep them); the outcomes still go in, into the room kept for them.
                _fail(p.waiters, SpoolUnwritable(f"the spool cannot take events now ({self.refusing})"))
                p.inserts, p.door, p.waiters, p.inserted = [], [], [], 0
                self._committing = 0
                if not (p.deletes or p.dead or p.attempts or p.requeued):
                    continue
            # A requeue replaces a row by as many bytes in single rows: it is
            # never refused for space, and goes in whole or not at all.
            now = time.time()
            inserts = p.inserts + [(r, now) for _, singles in p.requeued for r in singles]
            deletes = p.deletes + [(row.id, row.count) for row, _ in p.requeued]
            try:
                last_id = await self._call(
                    lambda c: _transaction(
                        c, inserts, [i for i, _ in deletes], p.dead + p.door, p.attempts, self.max_dead, self.dead_seconds
                    )
                )
            except BaseException as exc:
                self._committing = 0  # its writers are told it failed
                if not self._write_failed(exc, p):
                    return  # retried by _watch_space once the disk takes writes again
                continue
            await self._committed(p, tight, inserts, last_id)

    def _take_pending(self) -> _Pending:
        """Everything waiting for the next transaction, taken at once."""
        p = _Pending(self._inserts, self._door, self._inserted, self._insert_waiters, self._deletes, self._dead,
                     self._attempts, self._requeued)
        self._inserts, self._door, self._inserted, self._insert_waiters = [], [], 0, []
        self._deletes, self._dead, self._attempts, self._requeued = [], [], [], []
        self._committing = p.inserted
        return p

    def _tighten(self, p: _Pending) -> None:
        """Short of room: no retry counts, and small transactions (a delete
        rewrites each row's page into the WAL); the rest waits its turn. Whole
        rows only: the views of one row (``Row.split``: its events' acks and
        dead letters) go in one transaction, since any of them deletes the row."""
        p.attempts = []
        if len(p.deletes) + len(p.dead) <= TIGHT_OUTCOMES:
            return
        outcomes: dict[int, int] = {}  # row id -> its outcomes pending, deletes first
        for i, _ in p.deletes:
            outcomes[i] = outcomes.get(i, 0) + 1
        for letter in p.dead:
            outcomes[letter.row.id] = outcomes.get(letter.row.id, 0) + 1
        now: set[int] = set()
        taken = 0
        for i, n in outcomes.items():
            if now and taken + n > TIGHT_OUTCOMES:
                break
            now.add(i)
            taken += n
        self._deletes[:0] = [d for d in p.deletes if d[0] not in now]
        self._dead[:0] = [d for d in p.dead if d.row.id not in now]
        p.deletes = [d for d in p.deletes if d[0] in now]
        p.dead = [d for d in p.dead if d.row.id in now]

    def _write_failed(self, exc: BaseException, p: _Pending) -> bool:
        """The transaction failed: its writers are told. False when the disk
        refused (the loop stops until it takes writes again)."""
        if is_write_error(exc):
            # The disk refused: the clients are told 503 (they keep their
            # copies), outcomes wait for the disk to take them again.
            self._disk_refused = True
            self._refuse(f"the disk refused a write: {exc}")
            failure: Exception = SpoolUnwritable(f"the spool cannot take events now ({self.refusing})")
            self._deletes[:0], self._dead[:0], self._attempts[:0] = p.deletes, p.dead, p.attempts
            self._requeued[:0] = p.requeued
        else:
            # As with other outcomes: the row stays queued, whole, and is sent again.
            failure = exc if isinstance(exc, Exception) else RuntimeError("spool write cancelled")
        _fail(p.waiters, failure)
        # Outcomes not written stay pending: the rows remain queued and will be resent.
        if not isinstance(exc, Exception):
            raise exc
        return self.refusing is None

    async def _committed(self, p: _Pending, tight: bool, inserts: list[tuple[NewRow, float]], last_id: int) -> None:
        """After a transaction: room and state brought up to date, the new rows
        handed to the sender, the writers answered."""
        self.commits += 1
        # Views of one row (Row.split) share its id: each counts its own event.
        # Counted before anything is awaited: ``enqueue`` reads it meanwhile.
        self.depth += p.inserted - sum([n for _, n in p.deletes]) - len(p.dead)
        self._committing = 0
        if tight or self.refusing is not None:
            self._room -= _PAGE * (len(p.deletes) + len(p.dead))
            with contextlib.suppress(sqlite3.DatabaseError):
                await self._call(lambda c: c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())
        if self._disk_refused and not (self._deletes or self._dead or self._requeued):
            # The disk took every outcome it had refused: the threshold decides now.
            self._disk_refused = False
            if self.min_free_bytes:
                await self._check_space()
            else:
                self._accept()
        # One writer, one transaction: the inserted ids are consecutive. Ids
        # between the last this process wrote and these are rows another
        # process added (``firstparty replay``): the feed must read them.
        first = last_id - len(inserts) + 1
        self.after_foreign_rows = bool(inserts) and first != self.last_id + 1
        if inserts:
            self.last_id = last_id
        if inserts and self.on_commit is not None:
            self.on_commit(
                [
                    Row(first + i, r.route, r.region, r.project, r.ip, r.body, r.meta, t, 0, r.event_time, r.protocol, r.info,
                        r.count)
                    for i, (r, t) in enumerate(inserts)
                ]
            )
        for w in p.waiters:
            if not w.done():
                w.set_result(None)

    async def flush(self) -> None:
        """Wait until everything pending is committed."""
        while self._flushing is not None and not self._flushing.done():
            await asyncio.shield(self._flushing)

    # ---------------------------------------------------------- disk space

    def _refuse(self, why: str) -> None:
        if self.refusing is None:
            log.error("spool %s refuses new events: %s; clients are answered 503 with Retry-After and resend",
                      self.path, why)
            if self.on_state is not None:
                self.on_state(False)
        self.refusing = why

    def _accept(self) -> None:
        if self.refusing is not None:
            log.warning("spool %s accepts events again (it refused them: %s)", self.path, self.refusing)
            self.refusing = None
            if self.on_state is not None:
                self.on_state(True)

    async def _room_for(self, inserts: list[tuple[NewRow, float]]) -> bool:
        """Whether these rows fit above ``min_free_bytes``; the free space is
        measured again only when the estimate of what is left runs short."""
        # A commit appends every page it touches to the WAL (the leaves the rows
        # fill, their parents, sqlite_sequence), and the checkpoint copies them
        # into the file, which grows by the new ones.
        size = sum(len(r.body) + len(r.meta) + 64 for r, _ in inserts)
        need = 2 * (size + _PAGE * 4)
        if self._room < need:
            await self._check_space()
        if self.refusing is not None or self._room < need:
            if self.refusing is None:
                self._refuse(f"below delivery.min_free_bytes ({self.min_free_bytes // 1024} KiB free kept for the queue to drain)")
                # Cut the WAL now, while there is room for the checkpoint to do it.
                await self._call(_give_back_space(self.path))
            return False
        self._room -= need
        return True

    @property
    def _resume_margin(self) -> int:
        """Room above ``min_free_bytes`` needed before a refusing spool takes events again."""
        return max(self.min_free_bytes // 4, 64 * _PAGE)

    async def _check_space(self) -> None:
        """Refuse below ``min_free_bytes`` of usable space (the file system's
        free space plus the spool's own free pages), after giving back what
        SQLite can (checkpoint and truncate the WAL, free pages)."""
        if not self.min_free_bytes:
            return
        usable = await self._call(_usable_space_of(self.path))
        if usable < 2 * self.min_free_bytes:
            # Give space back while there is still room to: a checkpoint must copy
            # the WAL's pages into the file (which grows) before it can cut the
            # WAL, so on a full disk it fails, and the WAL never shrinks.
            usable = await self._call(_give_back_space(self.path))
        self._room = usable - self.min_free_bytes
        if usable < self.min_free_bytes:
            self._refuse(
                f"{usable // 1024} KiB usable under it, below delivery.min_free_bytes ({self.min_free_bytes // 1024} KiB)"
            )
        elif self.refusing is not None and not self._disk_refused and usable >= self.min_free_bytes + self._resume_margin:
            # Hysteresis: taking events again the moment a few pages come free
            # would refuse again at the next insert, flapping (and logging) each second.
            self._accept()

    async def _watch_space(self) -> None:
        """Every second: the free-space threshold, and whether a disk that
        refused a write takes one again (pending outcomes first)."""
        while True:
            await asyncio.sleep(RECOVERY_CHECK_SECONDS)
            try:
                await self._check_space()
                if self._disk_refused:
                    await self._call(_give_back_space(self.path))
                    if self._deletes or self._dead or self._requeued:
                        self._schedule()  # the outcomes it refused, in small transactions
                    elif await self._call(_probe_write):
                        self._disk_refused = False
                        if self.min_free_bytes:
                            await self._check_space()
                        else:
                            self._accept()
            except Exception:  # never let the watcher die: it is how the spool recovers
                log.exception("spool %s: checking free space failed", self.path)

    # ---------------------------------------------------------------- reads

    async def read(self, region: str, after: int, limit: int) -> list[Row]:
        """Queued rows of a region with ``id > after``, oldest first."""

        def q(c: sqlite3.Connection) -> list[Row]:
            cur = c.execute(
                f"SELECT {_COLUMNS} FROM queue WHERE region = ? AND id > ? ORDER BY id LIMIT ?", (region, after, limit)
            )
            return [_row(t) for t in cur.fetchall()]

        return await self._call(q)

    async def stats(self) -> dict[str, Any]:
        return await self._call(stats_of)


def _transaction(
    c: sqlite3.Connection,
    inserts: list[tuple[NewRow, float]],
    deletes: list[int],
    dead: list[DeadLetter],
    attempts: list[tuple[int, int]],
    max_dead: int = 1 << 62,
    dead_seconds: float = float("inf"),
) -> int:
    """One transaction; returns the id of the last row inserted (0 if none).
    Writing dead letters prunes the table to ``max_dead`` letters, none older
    than ``dead_seconds``."""
    now = time.time()
    last_id = 0
    c.execute("BEGIN IMMEDIATE")
    try:
        # Multi-row statements: the sqlite3 module lets go of the GIL around every
        # statement step, and each hand-back contends with the event loop's
        # thread; one step per 256 rows instead of one per row.
        for start in range(0, len(inserts), _ROWS_PER_INSERT):
            chunk = inserts[start : start + _ROWS_PER_INSERT]
            params: list[Any] = []
            for r, t in chunk:
                params += (r.route, r.region, r.project, int(r.ip), r.body, r.meta, t, r.event_time, r.protocol, r.count)
            # The cursor's lastrowid is the last row this statement inserted:
            # no statement of its own (each one is two GIL hand-overs).
            last_id = c.execute(_INSERT_HEAD + ", ".join([_INSERT_ROW] * len(chunk)), params).lastrowid or 0
        if deletes:
            # The sender acknowledges batches of consecutive ids: one range
            # delete per run instead of one statement per row.
            c.executemany("DELETE FROM queue WHERE id BETWEEN ? AND ?", id_runs(deletes))
        if dead:
            c.executemany(
                "INSERT INTO dead (queue_id, route, region, project, ip, body, meta, enqueued_at, attempts,"
                " reason, detail, status, failed_at, protocol, event_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (d.row.id, d.row.route, d.row.region, d.row.project, int(d.row.ip), d.row.body, d.row.meta,
                     d.row.enqueued_at, d.row.attempts, d.reason, d.detail[:2000], d.status, now, d.row.protocol,
                     d.row.event_time)
                    for d in dead
                ],
            )
            c.executemany("DELETE FROM queue WHERE id = ?", [(d.row.id,) for d in dead])
            # Ids only grow (AUTOINCREMENT): the newest max_dead are the highest ids.
            c.execute("DELETE FROM dead WHERE id <= (SELECT MAX(id) FROM dead) - ?", (max_dead,))
            if dead_seconds != float("inf"):
                c.execute("DELETE FROM dead WHERE failed_at < ?", (now - dead_seconds,))
        if attempts:
            c.executemany("UPDATE queue SET attempts = ? WHERE id = ?", attempts)
        c.execute("COMMIT")
    except BaseException:
        # SQLite rolls back by itself after some errors (SQLITE_FULL, SQLITE_IOERR):
        # a ROLLBACK then would fail with "no transaction is active".
        if c.in_transaction:
            c.execute("ROLLBACK")
        raise
    return last_id


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path.parent)
    return st.f_bavail * st.f_frsize


def _usable_space_of(path: Path) -> Callable[[sqlite3.Connection], int]:
    def measure(c: sqlite3.Connection) -> int:
        free_pages = c.execute("PRAGMA freelist_count").fetchone()[0]
        page = c.execute("PRAGMA page_size").fetchone()[0]
        return _free_bytes(path) + free_pages * page

    return measure


def _give_back_space(path: Path) -> Callable[[sqlite3.Connection], int]:
    def give_back(c: sqlite3.Connection) -> int:
        with contextlib.suppress(sqlite3.DatabaseError):
            c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            # Every free page: executed as a statement, the pragma would run one
            # step (one page); as a script it runs to its end.
            c.executescript("PRAGMA incremental_vacuum;")
            c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        return _usable_space_of(path)(c)

    return give_back


def _probe_write(c: sqlite3.Connection) -> bool:
    """Whether a committed write goes through again (a one-row table)."""
    try:
        c.execute("BEGIN IMMEDIATE")
        c.execute("CREATE TABLE IF NOT EXISTS probe (k INTEGER PRIMARY KEY, at REAL)")
        c.execute("INSERT OR REPLACE INTO probe VALUES (1, ?)", (time.time(),))
        c.execute("COMMIT")
        return True
    except sqlite3.DatabaseError:
        if c.in_transaction:
            with contextlib.suppress(sqlite3.DatabaseError):
                c.execute("ROLLBACK")
        return False


def id_runs(ids: Iterable[int]) -> list[tuple[int, int]]:
    """[5, 1, 2, 3, 7, 6] -> [(1, 3), (5, 7)]: sorted runs of consecutive ids."""
    runs: list[tuple[int, int]] = []
    start = end = None
    for i in sorted(set(ids)):
        if end is not None and i == end + 1:
            end = i
            continue
        if start is not None:
            runs.append((start, end))  # type: ignore[arg-type]
        start = end = i
    if start is not None:
        runs.append((start, end))  # type: ignore[arg-type]
    return runs


