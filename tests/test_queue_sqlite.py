"""The SQLite spool in process (``proxy/services/queue/sqlite.py``): enqueue
and group commit, rows read back field by field, acks, dead letters and their
cap, attempts, ``max_rows``, the free-space threshold and its hysteresis (the
file system's free bytes replaced by a figure the test sets), a write the disk
refuses and the recovery, and the transaction itself. The durability tests
(test_crash, the soak) run the proxy as a child process; these run here, so
that a broken line of the spool fails a test mutmut can see."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.services.queue import sqlite as spool_module
from proxy.services.queue.base import SpoolFull, SpoolUnwritable
from proxy.services.queue.rows import DeadLetter, NewRow, Row, letters_of
from proxy.services.queue.sqlfile import connect
from proxy.services.queue.sqlite import (
    TIGHT_OUTCOMES,
    Spool,
    _free_bytes,
    _give_back_space,
    _probe_write,
    _transaction,
    _usable_space_of,
    id_runs,
    is_write_error,
)
from tests.support import eventually

KIB = 1024
MIB = 1024 * 1024
PAGE = 4096


def new_row(n: int = 0, *, region: str = "us", count: int = 1, **kw: object) -> NewRow:
    body = b",".join(orjson.dumps({"event": f"e{n}.{k}"}) for k in range(count))
    meta = {"n": [f"e{n}.{k}" for k in range(count)]} if count > 1 else {"n": f"e{n}"}
    fields = {"route": "track", "region": region, "project": "p", "ip": True, "body": body, "meta": orjson.dumps(meta),
              "event_time": 1000.0 + n, "protocol": "mixpanel", "info": meta, "count": count}
    fields.update(kw)
    return NewRow(**fields)  # type: ignore[arg-type]


def dead_rows(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as c:
        return c.execute("SELECT queue_id, route, region, project, ip, body, meta, enqueued_at, attempts, reason, detail,"
                         " status, failed_at, protocol FROM dead ORDER BY id").fetchall()


def queued_ids(path: Path) -> list[int]:
    with sqlite3.connect(path) as c:
        return [r[0] for r in c.execute("SELECT id FROM queue ORDER BY id")]


class FreeSpace:
    """The file system's free bytes under the spool, as the test sets them."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.asked = 0

    def __call__(self, path: Path) -> int:
        assert isinstance(path, Path) and path.name.endswith(".sqlite3"), path  # the spool's own file
        self.asked += 1
        return self.free


@pytest.fixture
async def spool(tmp_path):
    s = Spool(tmp_path / "spool.sqlite3", max_rows=1000)
    await s.open()
    yield s
    await s.close()


@pytest.fixture
def fast_watch(monkeypatch):
    monkeypatch.setattr(spool_module, "RECOVERY_CHECK_SECONDS", 0.01)


# ------------------------------------------------------------ pure helpers


def test_id_runs_are_sorted_runs_of_consecutive_ids():
    assert id_runs([5, 1, 2, 3, 7, 6]) == [(1, 3), (5, 7)]
    assert id_runs([]) == []
    assert id_runs([4]) == [(4, 4)]
    assert id_runs([3, 1]) == [(1, 1), (3, 3)]
    assert id_runs([2, 2, 3, 3, 9]) == [(2, 3), (9, 9)]
    assert id_runs(iter([10, 11, 12, 14])) == [(10, 12), (14, 14)]


@pytest.mark.parametrize("words", ["database or disk is full", "Disk I/O Error", "unable to open database file",
                                   "attempt to write a READONLY database"])
def test_write_errors_are_sqlites_words_for_a_refusing_disk(words):
    assert is_write_error(sqlite3.OperationalError(words))
    assert is_write_error(sqlite3.DatabaseError(words.upper()))


@pytest.mark.parametrize("exc", [sqlite3.IntegrityError("UNIQUE constraint failed"), OSError("disk is full"),
                                 RuntimeError("readonly"), sqlite3.OperationalError("database is locked")])
def test_other_errors_are_not_write_errors(exc):
    assert not is_write_error(exc)


def test_free_bytes_are_the_file_systems_for_an_unprivileged_writer(tmp_path):
    st = os.statvfs(tmp_path)
    measured = _free_bytes(tmp_path / "spool.sqlite3")
    # Other work shares the disk: the same figure within a few MiB.
    assert abs(measured - st.f_bavail * st.f_frsize) < 64 * MIB


def test_usable_space_counts_the_spools_free_pages_and_giving_back_frees_them(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_module, "_free_bytes", FreeSpace(10 * MIB))
    path = tmp_path / "spool.sqlite3"
    c = connect(path)
    try:
        _transaction(c, [(new_row(i, body=b"x" * 3000), 1.0) for i in range(50)], [], [], [])
        assert _usable_space_of(path)(c) == 10 * MIB  # no free page yet
        _transaction(c, [], queued_ids(path), [], [])
        free_pages = c.execute("PRAGMA freelist_count").fetchone()[0]
        assert free_pages > 10
        assert _usable_space_of(path)(c) == 10 * MIB + free_pages * PAGE
        wal = Path(str(path) + "-wal")
        assert wal.stat().st_size > 0
        # Giving back: the WAL cut, free pages returned to the file system, the
        # usable space what is left.
        usable = _give_back_space(path)(c)
        left = c.execute("PRAGMA freelist_count").fetchone()[0]
        assert left < free_pages and usable == 10 * MIB + left * PAGE
        assert wal.stat().st_size == 0
    finally:
        c.close()


def test_giving_back_space_returns_every_free_page(tmp_path):
    """Every free page goes back, not one: run as a statement the pragma takes
    one step (the sqlite3 module steps a statement without result columns once)."""
    path = tmp_path / "spool.sqlite3"
    c = connect(path)
    try:
        _transaction(c, [(new_row(i, body=b"x" * 3000), 1.0) for i in range(50)], [], [], [])
        _transaction(c, [], queued_ids(path), [], [])
        assert c.execute("PRAGMA freelist_count").fetchone()[0] > 10
        _give_back_space(path)(c)
        assert c.execute("PRAGMA freelist_count").fetchone()[0] == 0
    finally:
        c.close()


def test_giving_back_space_on_a_file_that_refuses_writes_only_measures(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_module, "_free_bytes", FreeSpace(3 * MIB))
    path = tmp_path / "spool.sqlite3"
    connect(path).close()
    ro = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        assert _give_back_space(path)(ro) == 3 * MIB
    finally:
        ro.close()


def test_a_probe_write_says_whether_the_file_takes_writes(tmp_path):
    path = tmp_path / "spool.sqlite3"
    c = connect(path)
    try:
        assert _probe_write(c) is True
        assert _probe_write(c) is True  # again: one row, replaced
        assert c.execute("SELECT k FROM probe").fetchall() == [(1,)]
        assert not c.in_transaction
    finally:
        c.close()
    ro = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        assert _probe_write(ro) is False
        assert not ro.in_transaction
    finally:
        ro.close()


# ------------------------------------------------------------ the transaction


def test_one_transaction_inserts_in_chunks_and_returns_the_last_id(tmp_path):
    path = tmp_path / "spool.sqlite3"
    c = connect(path)
    try:
        assert _transaction(c, [], [], [], []) == 0
        rows = [(new_row(i, region="eu" if i % 2 else "us", count=1 + i % 3), 50.0 + i) for i in range(300)]
        last = _transaction(c, rows, [], [], [])
        got = c.execute("SELECT id, route, region, project, ip, body, meta, enqueued_at, attempts, event_time, protocol, count"
                        " FROM queue ORDER BY id").fetchall()
        assert last == 300 and [g[0] for g in got] == list(range(1, 301))
        assert got == [(i + 1, r.route, r.region, r.project, 1, r.body, r.meta, t, 0, r.event_time, r.protocol, r.count)
                       for i, (r, t) in enumerate(rows)]
        # Deletes by id, in runs; attempts set; one transaction.
        _transaction(c, [], [3, 1, 2, 10, 300], [], [(4, 5), (7, 6)])
        assert c.execute("SELECT COUNT(*) FROM queue").fetchone()[0] == 295
        assert c.execute("SELECT id FROM queue WHERE id IN (1, 2, 3, 10, 300)").fetchall() == []
        assert c.execute("SELECT id, attempts FROM queue WHERE id IN (4, 5, 6, 7) ORDER BY id").fetchall() == [
            (4, 0), (5, 4), (6, 7), (7, 0)]
        assert _transaction(c, [(new_row(1, ip=False), 1.0)], [], [], []) == 301
        assert c.execute("SELECT ip FROM queue WHERE id = 301").fetchone() == (0,)
    finally:
        c.close()


def test_a_failed_transaction_leaves_nothing_and_no_transaction_open(tmp_path):
    path = tmp_path / "spool.sqlite3"
    c = connect(path)
    try:
        _transaction(c, [(new_row(1), 1.0)], [], [], [])
        bad = DeadLetter(Row(1, "track", "us", None, True, object(), b"{}", 1.0, 0), "x", "y", None)  # type: ignore[arg-type]
        with pytest.raises(sqlite3.Error):
            _transaction(c, [(new_row(2), 1.0)], [1], [bad], [])
        assert not c.in_transaction
        assert c.execute("SELECT id FROM queue").fetchall() == [(1,)]
        # The connection still works; the failed insert's id was rolled back with it.
        assert _transaction(c, [(new_row(3), 1.0)], [], [], []) == 2
    finally:
        c.close()


def test_dead_letters_are_moved_with_their_reason_and_pruned(tmp_path):
    path = tmp_path / "spool.sqlite3"
    c = connect(path)
    try:
        _transaction(c, [(new_row(i), 10.0 + i) for i in range(6)], [], [], [])
        rows = [Row(i, "track", "us", "p", True, b"b%d" % i, b"{}", 10.0 + i, i, None, "segment") for i in range(1, 7)]
        before = time.time()
        _transaction(c, [], [], [DeadLetter(r, "rejected", "d" * 3000, 400) for r in rows[:2]], [], 4)
        after = time.time()
        got = dead_rows(path)
        assert [g[:10] for g in got] == [(r.id, "track", "us", "p", 1, r.body, b"{}", r.enqueued_at, r.attempts, "rejected")
                                         for r in rows[:2]]
        assert [(len(g[10]), g[11], g[13]) for g in got] == [(2000, 400, "segment")] * 2
        assert all(before <= g[12] <= after for g in got)
        assert queued_ids(path) == [3, 4, 5, 6]
        # Past max_dead (4), the oldest letters go: the newest four stay.
        _transaction(c, [], [], [DeadLetter(r, "expired", "old", None) for r in rows[2:]], [], 4)
        assert [g[0] for g in dead_rows(path)] == [3, 4, 5, 6] and queued_ids(path) == []
        assert [g[11] for g in dead_rows(path)] == [None] * 4
        # None older than dead_seconds: a letter failed 100 s ago goes, one of 10 s stays.
        c.execute("UPDATE dead SET failed_at = ? WHERE queue_id = 3", (time.time() - 100,))
        c.execute("UPDATE dead SET failed_at = ? WHERE queue_id = 4", (time.time() - 10,))
        _transaction(c, [], [], [DeadLetter(rows[0], "expired", "old", None)], [], 100, 50.0)
        assert [g[0] for g in dead_rows(path)] == [4, 5, 6, 1]
        # Without a cap in time (the default), nothing goes for its age.
        c.execute("UPDATE dead SET failed_at = 0")
        _transaction(c, [], [], [DeadLetter(rows[1], "expired", "old", None)], [])
        assert len(dead_rows(path)) == 5
    finally:
        c.close()


# ---------------------------------------------------------- enqueue and read


async def test_rows_read_back_with_every_field_by_region_after_a_cursor(spool):
    before = time.time()
    await spool.enqueue([new_row(1), new_row(2, region="eu", ip=False, project=None, protocol="segment", event_time=None),
                         new_row(3, count=3, route="engage")])
    after = time.time()
    us = await spool.read("us", 0, 10)
    assert [r.id for r in us] == [1, 3]
    one, three = us
    assert (one.route, one.region, one.project, one.ip, one.body, one.meta, one.attempts, one.event_time,
            one.protocol, one.info, one.count) == ("track", "us", "p", True, b'{"event":"e1.0"}', b'{"n":"e1"}', 0, 1001.0,
                                                   "mixpanel", None, 1)
    assert before <= one.enqueued_at <= after and one.enqueued_at == three.enqueued_at
    assert (three.route, three.count, three.body) == ("engage", 3, b'{"event":"e3.0"},{"event":"e3.1"},{"event":"e3.2"}')
    [eu] = await spool.read("eu", 0, 10)
    assert (eu.id, eu.ip, eu.project, eu.protocol, eu.event_time) == (2, False, None, "segment", None)
    assert type(eu.ip) is bool and type(one.ip) is bool
    assert [r.id for r in await spool.read("us", 1, 10)] == [3]
    assert [r.id for r in await spool.read("us", 0, 1)] == [1]
    assert await spool.read("in", 0, 10) == []


async def test_depth_counts_events_and_survives_a_reopen(tmp_path):
    path = tmp_path / "spool.sqlite3"
    first = Spool(path, max_rows=100)
    await first.open()
    assert first.depth == 0
    await first.enqueue([new_row(1, count=3), new_row(2)])
    assert first.depth == 4
    assert (await first.stats())["depth"] == 4
    await first.close()
    again = Spool(path, max_rows=100)
    await again.open()
    try:
        assert again.depth == 4 and again.salvaged is None
        assert await again._call(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 2  # FULL by default
    finally:
        await again.close()
    lax = Spool(path, max_rows=100, fsync=False)
    await lax.open()
    try:
        assert await lax._call(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 1  # NORMAL
        assert lax.depth == 4
    finally:
        await lax.close()


async def test_a_group_commit_is_one_transaction_and_hands_its_rows_over(spool):
    handed: list[list[Row]] = []
    spool.on_commit = handed.append
    commits = spool.commits
    before = time.time()
    await asyncio.gather(*(spool.enqueue([new_row(i, count=1 + i % 2)]) for i in range(5)))
    assert spool.commits == commits + 1 and len(handed) == 1
    on_disk = await spool.read("us", 0, 10)
    fields = lambda r: (r.id, r.route, r.region, r.project, r.ip, r.body, r.meta, r.enqueued_at, r.attempts,  # noqa: E731
                        r.event_time, r.protocol, r.count)
    assert [fields(r) for r in handed[0]] == [fields(r) for r in on_disk]
    assert [r.id for r in handed[0]] == [1, 2, 3, 4, 5]
    assert [r.info for r in handed[0]] == [new_row(i, count=1 + i % 2).info for i in range(5)]
    assert all(r.attempts == 0 and r.enqueued_at >= before and r.ip is True and r.protocol == "mixpanel"
               for r in handed[0])
    assert [r.enqueued_at for r in handed[0]] == [r.enqueued_at for r in on_disk]
    assert spool.depth == 7
    # A second commit's ids follow the first's.
    await spool.enqueue([new_row(9), new_row(10)])
    assert [r.id for r in handed[1]] == [6, 7] and spool.commits == commits + 2


async def test_max_rows_counts_events_queued_and_pending(tmp_path):
    s = Spool(tmp_path / "spool.sqlite3", max_rows=5)
    await s.open()
    try:
        await s.enqueue([new_row(1, count=3)])
        # Two more fit exactly; a third event would not, even while the first two wait.
        results = await asyncio.gather(s.enqueue([new_row(2, count=2)]), s.enqueue([new_row(3)]), return_exceptions=True)
        assert results[0] is None and type(results[1]) is SpoolFull
        assert str(results[1]) == "spool holds 5 events, its limit is 5"  # 3 stored, 2 on their way
        assert s.depth == 5 and s.accepting
        with pytest.raises(SpoolFull):
            await s.enqueue([new_row(4)])
        [row, _] = await s.read("us", 0, 10)
        s.ack([row])
        await s.flush()
        assert s.depth == 2
        await s.enqueue([new_row(5, count=3)])
        assert s.depth == 5
    finally:
        await s.close()


async def test_max_rows_counts_the_events_of_a_transaction_in_flight(tmp_path, monkeypatch):
    """Events taken into a transaction still running are neither pending nor
    in ``depth`` yet: the limit counts them all the same."""
    started, release = threading.Event(), threading.Event()
    real = spool_module._transaction

    def slow(*args, **kwargs):
        started.set()
        assert release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(spool_module, "_transaction", slow)
    s = Spool(tmp_path / "spool.sqlite3", max_rows=3)
    await s.open()
    try:
        first = asyncio.ensure_future(s.enqueue([new_row(1, count=2)]))
        await eventually(started.is_set, 10, "the transaction to start")
        with pytest.raises(SpoolFull, match="spool holds 2 events, its limit is 3"):
            await s.enqueue([new_row(2, count=2)])
        release.set()
        await first
        assert s.depth == 2
        await s.enqueue([new_row(3)])  # the one that fits
        assert s.depth == 3
    finally:
        release.set()
        await s.close()


async def test_letters_from_the_start_go_in_their_requests_transaction(spool):
    handed: list[list[Row]] = []
    spool.on_commit = handed.append
    commits = spool.commits
    letters = letters_of([new_row(7)], "expired", "event older than 5 days")
    await spool.enqueue([new_row(1, count=2)], letters)
    assert spool.commits == commits + 1
    [dead] = dead_rows(spool.path)
    assert (dead[0], dead[5], dead[9], dead[10]) == (0, b'{"event":"e7.0"}', "expired", "event older than 5 days")
    assert [r.count for r in handed[0]] == [2] and spool.depth == 2
    assert (await spool.stats())["dead_by_reason"] == {"expired": 1}


# ---------------------------------------------------------------- outcomes


async def test_acks_delete_rows_and_count_their_events(spool):
    await spool.enqueue([new_row(i, count=2 if i == 2 else 1) for i in range(1, 6)])
    assert spool.depth == 6
    rows = await spool.read("us", 0, 10)
    spool.ack([rows[0], rows[1], rows[3]])
    await spool.flush()
    assert queued_ids(spool.path) == [3, 5] and spool.depth == 2
    # Views of one row (Row.split) share its id, each counting its own event.
    await spool.enqueue([new_row(6, count=3)])
    [big] = [r for r in await spool.read("us", 0, 10) if r.count == 3]
    spool.ack(big.split())
    await spool.flush()
    assert queued_ids(spool.path) == [3, 5] and spool.depth == 2
    assert (await spool.stats())["depth"] == 2


async def test_bury_moves_rows_to_dead_letters_and_counts_events(spool):
    await spool.enqueue([new_row(1), new_row(2, count=3)])
    one, three = await spool.read("us", 0, 10)
    spool.bury([DeadLetter(one, "rejected", "bad event", 400)])
    spool.bury(DeadLetter(v, "too_large", "413", 413) for v in three.split())
    await spool.flush()
    assert queued_ids(spool.path) == [] and spool.depth == 0
    dead = dead_rows(spool.path)
    assert [(d[0], d[9], d[11]) for d in dead] == [(1, "rejected", 400)] + [(2, "too_large", 413)] * 3
    assert [d[5] for d in dead[1:]] == [b'{"event":"e2.%d"}' % k for k in range(3)]
    assert (await spool.stats())["dead_by_reason"] == {"rejected": 1, "too_large": 3}


async def test_the_dead_letter_cap_of_the_spool_keeps_the_newest(tmp_path):
    s = Spool(tmp_path / "spool.sqlite3", max_rows=100, max_dead=3, dead_seconds=60)
    await s.open()
    try:
        await s.enqueue([new_row(i) for i in range(5)])
        rows = await s.read("us", 0, 10)
        s.bury([DeadLetter(r, "rejected", "x", 400) for r in rows])
        await s.flush()
        assert [d[0] for d in dead_rows(s.path)] == [3, 4, 5]
        with sqlite3.connect(s.path) as c:
            c.execute("UPDATE dead SET failed_at = ? WHERE queue_id = 4", (time.time() - 61,))
        await s.enqueue([new_row(9)], letters_of([new_row(8)], "expired", "old"))
        # The oldest by id goes for the cap, the one failed over a minute ago for its age.
        assert [d[0] for d in dead_rows(s.path)] == [5, 0]
    finally:
        await s.close()


async def test_attempts_are_counted_in_memory_and_on_disk(spool):
    await spool.enqueue([new_row(1), new_row(2)])
    first, second = await spool.read("us", 0, 10)
    spool.count_attempt([first])
    spool.count_attempt([first, second])
    await spool.flush()
    assert (first.attempts, second.attempts) == (2, 1)
    assert [r.attempts for r in await spool.read("us", 0, 10)] == [2, 1]


async def test_close_commits_what_is_pending_and_the_spool_is_closed(tmp_path):
    path = tmp_path / "spool.sqlite3"
    s = Spool(path, max_rows=100)
    await s.open()
    await s.enqueue([new_row(1), new_row(2)])
    first, _ = await s.read("us", 0, 10)
    s.ack([first])  # not awaited: close commits it
    watcher = s._watch
    await s.close()
    assert watcher is not None and watcher.cancelled()
    assert queued_ids(path) == [2]
    with pytest.raises(AssertionError, match="^spool is not open$"):
        await s.read("us", 0, 10)


async def test_an_unopened_spool_says_so():
    s = Spool(Path("/nonexistent/spool.sqlite3"), max_rows=1)
    with pytest.raises(AssertionError, match="^spool is not open$"):
        await s.enqueue([new_row(1)])
    with pytest.raises(AssertionError, match="^spool is not open$"):
        s.ack([])
    await s.close()  # a spool that was never opened closes (a start-up that failed before it)


async def test_a_damaged_file_is_salvaged_at_open_and_said_so(tmp_path, caplog):
    path = tmp_path / "spool.sqlite3"
    path.write_bytes(b"not a database at all" * 300)
    s = Spool(path, max_rows=100)
    caplog.set_level(logging.ERROR, logger="proxy.services.queue.sqlite")
    await s.open()
    try:
        assert s.salvaged is not None and s.salvaged.moved_to.exists() and s.depth == 0
        [line] = [r.getMessage() for r in caplog.records if r.name == "proxy.services.queue.sqlite"]
        assert line.startswith(f"spool {path} could not be read (file is not a database): moved aside to "
                               f"{s.salvaged.moved_to}; 0 queued events and 0 dead letters salvaged")
        await s.enqueue([new_row(1)])
        assert s.depth == 1
    finally:
        await s.close()


# ------------------------------------------------------ a write the disk refuses


def failing_once(monkeypatch, exc: BaseException) -> list[int]:
    """The next transaction raises ``exc``; later ones run. Returns the calls' count."""
    calls: list[int] = []
    real = spool_module._transaction

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(spool_module, "_transaction", flaky)
    return calls


async def test_a_refused_write_is_a_503_and_its_outcomes_wait_for_the_disk(fast_watch, spool, monkeypatch, caplog):
    await spool.enqueue([new_row(1), new_row(2), new_row(3, count=2)])
    first, second, third = await spool.read("us", 0, 10)
    states: list[bool] = []
    spool.on_state = states.append
    calls = failing_once(monkeypatch, sqlite3.OperationalError("database or disk is full"))
    caplog.set_level(logging.INFO, logger="proxy.services.queue.sqlite")
    # Probe writes fail: the outcomes going in are what shows the disk takes writes again.
    monkeypatch.setattr(spool_module, "_probe_write", lambda c: False)
    spool.ack([first])
    spool.bury([DeadLetter(second, "rejected", "no", 400)])
    spool.count_attempt([third])
    with pytest.raises(SpoolUnwritable) as refused:
        await spool.enqueue([new_row(4)])
    assert str(refused.value) == ("the spool cannot take events now (the disk refused a write: database or disk is full)")
    assert states[0] is False
    # The outcomes it refused are written once the disk takes them (the watcher's next look).
    await eventually(lambda: spool.accepting, 5, "the spool to take events again")
    await spool.flush()
    assert states == [False, True] and len(calls) >= 2
    assert queued_ids(spool.path) == [3]
    assert [d[0] for d in dead_rows(spool.path)] == [2]
    assert [r.attempts for r in await spool.read("us", 0, 10)] == [1]
    assert spool.depth == 2
    # New events are taken again; no event of the refused request was kept.
    await spool.enqueue([new_row(5)])
    assert [r.body for r in await spool.read("us", 3, 10)] == [b'{"event":"e5.0"}']
    messages = [r.getMessage() for r in caplog.records if r.name == "proxy.services.queue.sqlite"]
    assert messages == [
        f"spool {spool.path} refuses new events: the disk refused a write: database or disk is full; "
        "clients are answered 503 with Retry-After and resend",
        f"spool {spool.path} accepts events again (it refused them: the disk refused a write: database or disk is full)",
    ]


async def test_with_no_outcome_waiting_a_probe_write_ends_the_refusal(fast_watch, spool, monkeypatch):
    probes: list[bool] = []
    real_probe = spool_module._probe_write

    def probe(c):
        probes.append(len(probes) >= 2)  # the disk takes writes from the third look on
        return real_probe(c) and probes[-1]

    monkeypatch.setattr(spool_module, "_probe_write", probe)
    failing_once(monkeypatch, sqlite3.OperationalError("disk I/O error"))
    with pytest.raises(SpoolUnwritable):
        await spool.enqueue([new_row(1)])
    assert not spool.accepting
    with pytest.raises(SpoolUnwritable, match=r"\(the disk refused a write: disk I/O error\)"):
        await spool.enqueue([new_row(2)])  # refused at once, while refusing
    await eventually(lambda: spool.accepting, 5, "the probe write to go through")
    assert probes[:3] == [False, False, True] and len(probes) == 3
    assert spool.depth == 0 and queued_ids(spool.path) == []
    await spool.enqueue([new_row(3)])
    assert spool.depth == 1


def gated_failure(monkeypatch, exc: BaseException) -> tuple[threading.Event, threading.Event, list[int]]:
    """The next transaction waits for ``release``, then raises ``exc``; later ones run."""
    entered, release = threading.Event(), threading.Event()
    calls: list[int] = []
    real = spool_module._transaction

    def gated(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            entered.set()
            release.wait(10)
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(spool_module, "_transaction", gated)
    return entered, release, calls


@pytest.mark.parametrize("failure", [sqlite3.OperationalError("database or disk is full"), sqlite3.IntegrityError("other")])
async def test_outcomes_arriving_during_a_failed_transaction_are_not_lost(fast_watch, spool, monkeypatch, failure):
    await spool.enqueue([new_row(i, count=2 if i == 5 else 1) for i in range(1, 7)])
    rows = await spool.read("us", 0, 10)
    entered, release, calls = gated_failure(monkeypatch, failure)
    spool.ack([rows[0]])
    spool.bury([DeadLetter(rows[1], "rejected", "x", 400)])
    spool.count_attempt([rows[2]])
    await eventually(entered.is_set, 5, "the failing transaction to start")
    # While it runs, more outcomes come: they go in the next transaction whatever happens to this one.
    spool.ack([rows[3]])
    spool.bury([DeadLetter(rows[5], "expired", "y", None)])
    spool.count_attempt([rows[2]])
    spool.requeue(rows[4])
    release.set()
    await eventually(lambda: 4 not in queued_ids(spool.path) and 5 not in queued_ids(spool.path), 5,
                     "the later outcomes to be written")
    await eventually(lambda: spool.accepting, 5, "the spool to take events again")
    await spool.flush()
    left = queued_ids(spool.path)
    dead = [d[0] for d in dead_rows(spool.path)]
    attempts = dict(sqlite3.connect(spool.path).execute("SELECT id, attempts FROM queue").fetchall())
    assert 6 in dead and attempts[3] >= 1 and len(left) == len(set(left))
    if is_write_error(failure):
        # The disk refused: the failed transaction's outcomes waited and went in too.
        assert 1 not in left and dead == [2, 6] and attempts[3] == 2
    else:
        # Another failure: its outcomes are dropped, the rows stay queued (sent again).
        assert 1 in left and dead == [6] and attempts[3] == 2
    # The requeued row's two events are rows of one event each, after every row so far.
    assert [r.count for r in await spool.read("us", 6, 10)] == [1, 1]
    assert spool.depth == sum(r.count for r in await spool.read("us", 0, 20))


async def test_while_the_disk_refuses_the_writer_waits_for_the_watcher(spool, monkeypatch):
    calls: list[int] = []

    def refused(*args, **kwargs):
        calls.append(1)
        raise sqlite3.OperationalError("database or disk is full")

    await spool.enqueue([new_row(1)])
    [row] = await spool.read("us", 0, 10)
    monkeypatch.setattr(spool_module, "_transaction", refused)
    spool.ack([row])
    # The writer stops after the refusal (no retry loop against a full disk): flush returns.
    await asyncio.wait_for(spool.flush(), 5)
    assert calls == [1] and not spool.accepting
    assert queued_ids(spool.path) == [1]


async def test_another_failure_fails_its_writers_and_the_spool_goes_on(spool, monkeypatch):
    await spool.enqueue([new_row(1)])
    [row] = await spool.read("us", 0, 10)
    failure = sqlite3.IntegrityError("something else")
    failing_once(monkeypatch, failure)
    spool.ack([row])
    with pytest.raises(sqlite3.IntegrityError) as got:
        await spool.enqueue([new_row(2)])
    assert got.value is failure
    assert spool.accepting
    await spool.flush()
    # The ack went with the failed transaction: the row stays queued, to be sent again.
    assert queued_ids(spool.path) == [1] and spool.depth == 1
    await spool.enqueue([new_row(3)])
    assert spool.depth == 2


async def test_a_cancelled_write_fails_its_writers_without_hanging_them(spool, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    real = spool_module._transaction

    def slow(*args, **kwargs):
        entered.set()
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(spool_module, "_transaction", slow)
    writer = asyncio.ensure_future(spool.enqueue([new_row(1)]))
    await eventually(entered.is_set, 5, "the transaction to start")
    spool._flushing.cancel()
    release.set()
    with pytest.raises(RuntimeError, match="^spool write cancelled$"):
        await writer


# -------------------------------------------------------------- free space


async def test_below_the_threshold_new_events_are_refused_and_taken_again_past_a_margin(tmp_path, monkeypatch, fast_watch):
    free = FreeSpace(5 * MIB)
    monkeypatch.setattr(spool_module, "_free_bytes", free)
    s = Spool(tmp_path / "spool.sqlite3", max_rows=100, min_free_bytes=2 * MIB)
    states: list[bool] = []
    s.on_state = states.append
    await s.open()
    try:
        assert s.accepting and free.asked >= 1
        await s.enqueue([new_row(1)])
        free.free = 2 * MIB - 1
        await eventually(lambda: not s.accepting, 5, "the watcher to see the space short")
        assert s.refusing == "2047 KiB usable under it, below delivery.min_free_bytes (2048 KiB)"
        with pytest.raises(SpoolUnwritable, match=r"2047 KiB usable under it"):
            await s.enqueue([new_row(2)])
        # At the threshold, and within the margin (a quarter of it, 512 KiB): still refusing.
        await s._check_space()
        free.free = 2 * MIB
        await s._check_space()
        assert not s.accepting
        free.free = 2 * MIB + 512 * KIB - 1
        await s._check_space()
        assert not s.accepting
        # Outcomes still go in while refusing.
        [row] = await s.read("us", 0, 10)
        s.ack([row])
        await s.flush()
        assert queued_ids(s.path) == []
        free.free = 2 * MIB + 512 * KIB
        await eventually(lambda: s.accepting, 5, "the spool to take events again")
        assert states == [False, True]
        await s.enqueue([new_row(3)])
    finally:
        await s.close()


@pytest.mark.parametrize("min_free", [256 * KIB, 512 * KIB])
async def test_the_margin_is_at_least_64_pages(tmp_path, monkeypatch, min_free):
    free = FreeSpace(min_free - 1)
    monkeypatch.setattr(spool_module, "_free_bytes", free)
    s = Spool(tmp_path / "spool.sqlite3", max_rows=100, min_free_bytes=min_free)
    await s.open()
    try:
        assert not s.accepting
        free.free = min_free + 64 * PAGE - 1
        await s._check_space()
        assert not s.accepting
        free.free = min_free + 64 * PAGE
        await s._check_space()
        assert s.accepting
    finally:
        await s.close()


async def test_exactly_the_threshold_free_is_not_short(tmp_path, monkeypatch):
    free = FreeSpace(4 * MIB)
    monkeypatch.setattr(spool_module, "_free_bytes", free)
    s = Spool(tmp_path / "spool.sqlite3", max_rows=100, min_free_bytes=1 * MIB)
    await s.open()
    try:
        free.free = 1 * MIB
        await s._check_space()
        assert s.accepting
        free.free = 1 * MIB - 1
        await s._check_space()
        assert not s.accepting
    finally:
        await s.close()


async def test_without_a_threshold_free_space_is_never_measured(tmp_path, monkeypatch):
    free = FreeSpace(0)
    monkeypatch.setattr(spool_module, "_free_bytes", free)
    s = Spool(tmp_path / "spool.sqlite3", max_rows=100)
    await s.open()
    try:
        await s.enqueue([new_row(1)])
        await s._check_space()
        assert s.accepting and free.asked == 0
    finally:
        await s.close()


def need_of(rows: list[NewRow]) -> int:
    """What the spool reserves for these rows: each row's bytes and 64, four pages, twice."""
    return 2 * (sum(len(r.body) + len(r.meta) + 64 for r in rows) + 4 * PAGE)


async def test_an_insert_is_taken_only_with_room_for_it_above_the_threshold(tmp_path, monkeypatch):
    rows = [new_row(1, body=b"x" * 5000), new_row(2, count=2)]
    need = need_of(rows)
    free = FreeSpace(4 * MIB + need)  # room exactly for these rows
    monkeypatch.setattr(spool_module, "_free_bytes", free)
    s = Spool(tmp_path / "spool.sqlite3", max_rows=100, min_free_bytes=4 * MIB)
    await s.open()
    try:
        assert await s._call(lambda c: c.execute("PRAGMA freelist_count").fetchone()[0]) == 0
        await s.enqueue(rows)
        assert s.accepting and s.depth == 3
        # One byte short: refused, the threshold named, nothing kept.
        free.free = 4 * MIB + need - 1
        with pytest.raises(SpoolUnwritable) as refused:
            await s.enqueue(rows)
        assert str(refused.value) == (
            "the spool cannot take events now (below delivery.min_free_bytes (4096 KiB free kept for the queue to drain))")
        assert not s.accepting and s.depth == 3 and len(queued_ids(s.path)) == 2
    finally:
        await s.close()


async def test_the_room_measured_is_spent_by_inserts_before_measuring_again(tmp_path, monkeypatch):
    rows = [new_row(1, body=b"y" * 3000)]
    need = need_of(rows)
    free = FreeSpace(8 * MIB + 3 * need)
    monkeypatch.setattr(spool_module, "_free_bytes", free)
    s = Spool(tmp_path / "spool.sqlite3", max_rows=100, min_free_bytes=4 * MIB)
    await s.open()
    try:
        asked = free.asked
        # Room for three more inserts above the threshold, measured once...
        free.free = 4 * MIB + 3 * need
        await s._check_space()
        asked = free.asked
        for i in range(3):
            await s.enqueue([new_row(i, body=b"y" * 3000)])
        assert free.asked == asked, "measured again with room left"
        # ...the fourth finds none left and measures: the disk (unchanged here) has it no more.
        free.free = 4 * MIB + need - 1
        with pytest.raises(SpoolUnwritable):
            await s.enqueue([new_row(9, body=b"y" * 3000)])
        assert free.asked > asked and s.depth == 3
    finally:
        await s.close()


async def test_short_of_room_outcomes_go_sixteen_a_transaction_without_attempts(tmp_path, monkeypatch):
    free = FreeSpace(64 * MIB)
    monkeypatch.setattr(spool_module, "_free_bytes", free)
    sizes: list[tuple[int, int, int]] = []
    real = spool_module._transaction

    def recording(c, inserts, deletes, dead, attempts, *rest):
        sizes.append((len(deletes), len(dead), len(attempts)))
        return real(c, inserts, deletes, dead, attempts, *rest)

    monkeypatch.setattr(spool_module, "_transaction", recording)
    s = Spool(tmp_path / "spool.sqlite3", max_rows=1000, min_free_bytes=1 * MIB)
    await s.open()
    try:
        await s.enqueue([new_row(i) for i in range(40)])
        rows = await s.read("us", 0, 100)
        # With room to spare: one transaction, attempts written.
        sizes.clear()
        s.count_attempt(rows[:2])
        s.ack(rows[:20])
        await s.flush()
        assert sizes == [(20, 0, 2)]
        wal = Path(str(s.path) + "-wal")
        assert wal.stat().st_size > 0  # with room, the WAL is left to SQLite's checkpoints
        # Short of room (below the threshold): sixteen outcomes a transaction, deletes first, no attempts.
        free.free = 1 * MIB - 1
        await s._check_space()
        assert not s.accepting
        sizes.clear()
        s.count_attempt(rows[20:22])
        s.ack(rows[20:30])
        s.bury([DeadLetter(r, "rejected", "x", 400) for r in rows[30:40]])
        await s.flush()
        assert sizes == [(10, 6, 0), (0, 4, 0)]
        assert wal.stat().st_size == 0  # cut after each transaction while short of room
        assert queued_ids(s.path) == [] and s.depth == 0
        assert len(dead_rows(s.path)) == 10
        with sqlite3.connect(s.path) as c:
            assert c.execute("SELECT COUNT(*) FROM queue WHERE attempts > 0").fetchone()[0] == 0
        assert TIGHT_OUTCOMES == 16
    finally:
        await s.close()


async def test_short_of_room_more_deletes_than_sixteen_wait_their_turn(tmp_path, monkeypatch):
    free = FreeSpace(64 * MIB)
    monkeypatch.setattr(spool_module, "_free_bytes", free)
    sizes: list[tuple[int, int]] = []
    real = spool_module._transaction

    def recording(c, inserts, deletes, dead, attempts, *rest):
        sizes.append((len(deletes), len(dead)))
        return real(c, inserts, deletes, dead, attempts, *rest)

    monkeypatch.setattr(spool_module, "_transaction", recording)
    s = Spool(tmp_path / "spool.sqlite3", max_rows=1000, min_free_bytes=1 * MIB)
    await s.open()
    try:
        await s.enqueue([new_row(i) for i in range(40)])
        rows = await s.read("us", 0, 100)
        free.free = 1 * MIB + 100 * KIB  # above the threshold, but with less room than it
        await s._check_space()
        assert s.accepting
        sizes.clear()
        s.ack(rows[:20])
        s.bury([DeadLetter(r, "rejected", "x", 400) for r in rows[20:23]])
        await s.flush()
        assert sizes == [(16, 0), (4, 3)]
        assert s.depth == 17 and len(queued_ids(s.path)) == 17
    finally:
        await s.close()


async def test_the_watcher_survives_a_failed_look(tmp_path, monkeypatch, fast_watch, caplog):
    looks: list[int] = []

    def broken(path):
        looks.append(1)
        if len(looks) in (2, 3):
            raise OSError("statvfs failed")
        return 64 * MIB

    monkeypatch.setattr(spool_module, "_free_bytes", broken)
    caplog.set_level(logging.ERROR, logger="proxy.services.queue.sqlite")
    s = Spool(tmp_path / "spool.sqlite3", max_rows=100, min_free_bytes=1 * MIB)
    await s.open()
    try:
        await eventually(lambda: len(looks) >= 5, 5, "the watcher to look again after failing")
        assert not s._watch.done()
        failed = [r for r in caplog.records if r.name == "proxy.services.queue.sqlite"]
        assert failed and failed[0].getMessage() == f"spool {s.path}: checking free space failed"
        assert failed[0].exc_info[0] is OSError
    finally:
        await s.close()


# ------------------------------------------------------------ more paths


async def test_a_request_of_dead_letters_only_is_written_and_answered(spool):
    handed: list[list[Row]] = []
    spool.on_commit = handed.append
    await asyncio.wait_for(spool.enqueue([], letters_of([new_row(1), new_row(2)], "expired", "old")), 5)
    assert [d[5] for d in dead_rows(spool.path)] == [b'{"event":"e1.0"}', b'{"event":"e2.0"}']
    assert handed == [] and spool.depth == 0


async def test_a_requeue_alone_stores_the_rows_events_one_a_row(spool):
    handed: list[list[Row]] = []
    spool.on_commit = handed.append
    meta = {"c": "k", "s": "cookie", "n": ["a", "b"], "i": ["1", "2"], "t": [7.0, 8.0], "r": [[1, "distinct_id", "o", "k"]]}
    await spool.enqueue([new_row(1, count=2, region="eu", route="engage", ip=False, project="q", protocol="segment",
                                 meta=orjson.dumps(meta), info=meta)])
    [row] = await spool.read("eu", 0, 10)
    spool.requeue(row)
    await asyncio.wait_for(spool.flush(), 5)
    singles = await spool.read("eu", 0, 10)
    assert [(r.id, r.route, r.region, r.project, r.ip, r.protocol, r.count, r.event_time) for r in singles] == [
        (2, "engage", "eu", "q", False, "segment", 1, 7.0), (3, "engage", "eu", "q", False, "segment", 1, 8.0)]
    assert [r.body for r in singles] == [b'{"event":"e1.0"}', b'{"event":"e1.1"}']
    assert [orjson.loads(r.meta)["n"] for r in singles] == ["a", "b"]
    assert [r.id for r in handed[-1]] == [2, 3] and [r.info["n"] for r in handed[-1]] == ["a", "b"]
    assert spool.depth == 2


@pytest.mark.parametrize("outcome", ["ack", "bury", "attempt", "requeue"])
async def test_an_insert_refused_for_room_lets_the_outcomes_of_its_pass_go_in(tmp_path, monkeypatch, outcome):
    free = FreeSpace(64 * MIB)
    monkeypatch.setattr(spool_module, "_free_bytes", free)
    s = Spool(tmp_path / "spool.sqlite3", max_rows=100, min_free_bytes=4 * MIB)
    await s.open()
    try:
        await s.enqueue([new_row(1, count=2), new_row(2)])
        first, second = await s.read("us", 0, 10)
        free.free = 4 * MIB + 1000  # above the threshold, too little for a row
        await s._check_space()
        if outcome == "ack":
            s.ack([first])
        elif outcome == "bury":
            s.bury([DeadLetter(view, "rejected", "x", 400) for view in first.split()])  # a letter is one event
        elif outcome == "attempt":
            s.count_attempt([second])
        else:
            s.requeue(first)
        with pytest.raises(SpoolUnwritable):
            await s.enqueue([new_row(3)], letters_of([new_row(4)], "expired", "old"))
        await s.flush()
        expected = {"ack": ([2], 1), "bury": ([2], 1), "attempt": ([1, 2], 3), "requeue": ([2, 3, 4], 3)}[outcome]
        assert (queued_ids(s.path), s.depth) == expected
        assert [d[0] for d in dead_rows(s.path)] == ([1, 1] if outcome == "bury" else [])  # not the refused request's letter
        # The attempts are not written short of room (tight), only counted in memory.
        assert second.attempts == (1 if outcome == "attempt" else 0)
    finally:
        await s.close()


async def test_a_request_arriving_while_the_disk_is_measured_is_answered_too(tmp_path, monkeypatch):
    measuring, release = threading.Event(), threading.Event()

    class Gated(FreeSpace):
        gate = False

        def __call__(self, path: Path) -> int:
            if self.gate:
                measuring.set()
                release.wait(10)
            return super().__call__(path)

    free = Gated(64 * MIB)
    monkeypatch.setattr(spool_module, "_free_bytes", free)
    s = Spool(tmp_path / "spool.sqlite3", max_rows=100, min_free_bytes=4 * MIB)
    await s.open()
    try:
        free.free = 4 * MIB + 1000
        await s._check_space()
        free.gate = True
        big = asyncio.ensure_future(s.enqueue([new_row(1, body=b"z" * 5000)]))
        await eventually(measuring.is_set, 5, "the spool to measure the disk")
        small = asyncio.ensure_future(s.enqueue([new_row(2)]))
        await asyncio.sleep(0)  # let it join the queue of writes
        free.gate = False
        release.set()
        results = await asyncio.wait_for(asyncio.gather(big, small, return_exceptions=True), 5)
        assert [type(r) for r in results] == [SpoolUnwritable, SpoolUnwritable]
        assert s.depth == 0
    finally:
        await s.close()


async def test_the_spool_works_on_one_thread_of_its_own(tmp_path, monkeypatch):
    names: list[str] = []
    real = spool_module.open_or_salvage

    def opening(*args):
        names.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(spool_module, "open_or_salvage", opening)
    s = Spool(tmp_path / "spool.sqlite3", max_rows=100)
    await s.open()
    try:
        assert s.commits == 0

        def where(c):
            time.sleep(0.005)
            return threading.get_ident(), threading.current_thread().name

        seen = set(await asyncio.gather(*(s._call(where) for _ in range(10))))
        assert len(seen) == 1
        [(_, name)] = seen
        assert name.startswith("spool_") and names == [name]
    finally:
        await s.close()


async def test_space_is_given_back_only_under_twice_the_threshold(tmp_path, monkeypatch):
    free = FreeSpace(64 * MIB)
    monkeypatch.setattr(spool_module, "_free_bytes", free)
    s = Spool(tmp_path / "spool.sqlite3", max_rows=100, min_free_bytes=1 * MIB)
    await s.open()
    wal = Path(str(s.path) + "-wal")
    try:
        await s.enqueue([new_row(1)])
        assert wal.stat().st_size > 0
        free.free = 2 * MIB
        await s._check_space()
        assert wal.stat().st_size > 0 and s.accepting
        # At twice the threshold there is room to spare: outcomes go as usual, attempts counted.
        [row] = await s.read("us", 0, 10)
        s.count_attempt([row])
        await s.flush()
        assert [r.attempts for r in await s.read("us", 0, 10)] == [1]
        free.free = 2 * MIB - 1
        await s._check_space()
        assert wal.stat().st_size == 0 and s.accepting
    finally:
        await s.close()


async def test_outcomes_short_of_room_spend_the_estimate_until_measured_again(tmp_path, monkeypatch):
    free = FreeSpace(64 * MIB)
    monkeypatch.setattr(spool_module, "_free_bytes", free)
    s = Spool(tmp_path / "spool.sqlite3", max_rows=100, min_free_bytes=1 * MIB)
    await s.open()
    try:
        await s.enqueue([new_row(i) for i in range(20)])
        rows = await s.read("us", 0, 100)
        small = [new_row(99)]
        # Short of room (under the threshold's size above it), but with room for a small row and 19 pages.
        free.free = 1 * MIB + need_of(small) + 19 * PAGE
        await s._check_space()
        assert s.accepting
        s.ack(rows[:10])  # 20 outcomes: 20 pages of the estimate
        s.bury([DeadLetter(r, "rejected", "x", 400) for r in rows[10:]])
        await s.flush()
        asked = free.asked
        await s.enqueue(small)  # the estimate is spent: measured again, and the room is there
        assert free.asked > asked and s.depth == 1
    finally:
        await s.close()


@pytest.mark.parametrize("short", [False, True])
async def test_after_a_refused_write_the_threshold_decides(fast_watch, tmp_path, monkeypatch, short):
    free = FreeSpace(64 * MIB)
    monkeypatch.setattr(spool_module, "_free_bytes", free)
    s = Spool(tmp_path / "spool.sqlite3", max_rows=100, min_free_bytes=1 * MIB)
    await s.open()
    try:
        await s.enqueue([new_row(1)])
        [row] = await s.read("us", 0, 10)
        failing_once(monkeypatch, sqlite3.OperationalError("database or disk is full"))
        s.ack([row])
        await s.flush()
        assert s.refusing == "the disk refused a write: database or disk is full"
        if short:
            free.free = 1 * MIB - 5 * KIB
            # The outcome goes in all the same; the threshold gives the reason.
            await eventually(lambda: queued_ids(s.path) == [] and not s._disk_refused, 5, "the outcome to go in")
            await s._check_space()
            assert s.refusing == "1019 KiB usable under it, below delivery.min_free_bytes (1024 KiB)"
        else:
            await eventually(lambda: s.accepting, 5, "the spool to take events again")
            assert queued_ids(s.path) == []
    finally:
        await s.close()


@pytest.mark.parametrize("short", [False, True])
async def test_a_probe_write_after_a_refusal_hands_over_to_the_threshold(fast_watch, tmp_path, monkeypatch, short):
    free = FreeSpace(64 * MIB)
    monkeypatch.setattr(spool_module, "_free_bytes", free)
    s = Spool(tmp_path / "spool.sqlite3", max_rows=100, min_free_bytes=1 * MIB)
    await s.open()
    try:
        failing_once(monkeypatch, sqlite3.OperationalError("disk I/O error"))
        with pytest.raises(SpoolUnwritable):
            await s.enqueue([new_row(1)])
        if short:
            free.free = 1 * MIB - 5 * KIB
            await eventually(lambda: s.refusing is not None and "usable under it" in s.refusing, 5,
                             "the threshold to give the reason")
        else:
            await eventually(lambda: s.accepting, 5, "the spool to take events again")
            await s.enqueue([new_row(2)])
            assert s.depth == 1
    finally:
        await s.close()


async def test_a_refusal_is_said_once_and_its_reason_kept_current(tmp_path, monkeypatch, caplog):
    free = FreeSpace(1 * MIB - 10 * KIB)
    monkeypatch.setattr(spool_module, "_free_bytes", free)
    caplog.set_level(logging.INFO, logger="proxy.services.queue.sqlite")
    s = Spool(tmp_path / "spool.sqlite3", max_rows=100, min_free_bytes=1 * MIB)
    states: list[bool] = []
    s.on_state = states.append
    await s.open()
    try:
        assert s.refusing == "1014 KiB usable under it, below delivery.min_free_bytes (1024 KiB)"
        free.free = 1 * MIB - 20 * KIB
        await s._check_space()
        assert s.refusing == "1004 KiB usable under it, below delivery.min_free_bytes (1024 KiB)"
        lines = [r for r in caplog.records if r.name == "proxy.services.queue.sqlite"]
        assert [r.levelname for r in lines] == ["ERROR"]
        assert lines[0].getMessage() == (f"spool {s.path} refuses new events: 1014 KiB usable under it, below "
                                         "delivery.min_free_bytes (1024 KiB); clients are answered 503 with Retry-After and resend")
        assert states == [False]  # told once, at the first refusal
        free.free = 64 * MIB
        await s._check_space()
        assert s.accepting and states == [False, True]
        await s._check_space()
        assert states == [False, True]
    finally:
        await s.close()


async def test_after_a_refused_write_events_are_taken_only_once_every_outcome_is_in(fast_watch, tmp_path, monkeypatch):
    monkeypatch.setattr(spool_module, "_free_bytes", FreeSpace(64 * MIB))
    monkeypatch.setattr(spool_module, "_probe_write", lambda c: False)
    s = Spool(tmp_path / "spool.sqlite3", max_rows=100, min_free_bytes=1 * MIB)
    await s.open()
    try:
        await s.enqueue([new_row(i) for i in range(20)])
        rows = await s.read("us", 0, 100)
        seen: list[tuple[bool, int]] = []
        s.on_state = lambda accepting: seen.append((accepting, len(dead_rows(s.path))))
        failing_once(monkeypatch, sqlite3.OperationalError("database or disk is full"))
        s.bury([DeadLetter(r, "rejected", "x", 400) for r in rows])
        await eventually(lambda: seen, 5, "the refusal")
        await eventually(lambda: s.accepting, 5, "the spool to take events again")
        # Refused with none written; taken again once all twenty are (in two transactions, short of room).
        assert seen == [(False, 0), (True, 20)]
        await s.flush()
        assert s.depth == 0
    finally:
        await s.close()


async def test_short_of_room_a_rows_outcomes_never_straddle_two_transactions(tmp_path, monkeypatch):
    """A 401 for a batch holding a row of 20 events buries each event (the
    row's views, ``Row.split``); short of room, outcomes go sixteen a
    transaction. Split inside the row, the first transaction would delete the
    row with only some of its dead letters, and a full disk (or a kill -9)
    before the next would leave the others neither queued nor dead."""
    free = FreeSpace(64 * MIB)
    monkeypatch.setattr(spool_module, "_free_bytes", free)
    s = Spool(tmp_path / "spool.sqlite3", max_rows=1000, min_free_bytes=1 * MIB)
    await s.open()
    await s.enqueue([new_row(1, count=20)])
    [row] = await s.read("us", 0, 10)
    free.free = 1 * MIB - 1
    await s._check_space()
    real, calls = spool_module._transaction, []

    def full_after_one(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) > 1:
            raise sqlite3.OperationalError("database or disk is full")
        return real(*args, **kwargs)

    monkeypatch.setattr(spool_module, "_transaction", full_after_one)
    s.bury([DeadLetter(view, "http_401", "invalid token", 401) for view in row.split()])
    await s.flush()
    await s.close()
    with sqlite3.connect(s.path) as c:
        queued = c.execute("SELECT COALESCE(SUM(count), 0) FROM queue").fetchone()[0]
        dead = c.execute("SELECT COUNT(*) FROM dead").fetchone()[0]
    assert (queued, dead) == (0, 20)  # the row's outcomes went in whole, in one transaction
