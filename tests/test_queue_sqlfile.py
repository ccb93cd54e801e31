"""The spool's file in process (``proxy/services/queue/sqlfile.py``): the
pragmas it is opened with, older schemas brought up to date, the soundness
check, and what happens to a file SQLite cannot read: moved aside (with its
WAL) under a dated name, every readable row salvaged into a fresh spool, ids
kept."""

from __future__ import annotations

import calendar
import os
import struct
import re
import sqlite3
import stat
import threading
import time
from pathlib import Path

import orjson
import pytest

from proxy.services.queue.sqlfile import (
    WAL_SIZE_LIMIT,
    _COLUMNS,
    _DEAD_COLUMNS,
    _readable_rows,
    check,
    connect,
    open_or_salvage,
    salvage_into,
)


def fill(path: Path, n: int, pad: int = 300) -> list[bytes]:
    """A spool of ``n`` one-event rows, checkpointed into its main file."""
    c = connect(path)
    bodies = [orjson.dumps({"event": f"e{i}", "pad": "x" * pad}) for i in range(n)]
    c.execute("BEGIN")
    c.executemany("INSERT INTO queue (route, region, project, ip, body, meta, enqueued_at) VALUES ('track', 'us', 'p', 1, ?, x'7b7d', 1.0)",
                  [(b,) for b in bodies])
    c.execute("COMMIT")
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    c.close()
    return bodies


def damage_one_leaf(path: Path) -> None:
    """Garbage over one table-leaf page in the middle of the file (a bad sector)."""
    with sqlite3.connect(path) as c:
        size = c.execute("PRAGMA page_size").fetchone()[0]
    data = path.read_bytes()
    leaves = [n for n in range(1, len(data) // size) if data[n * size] == 0x0D]
    with open(path, "r+b") as fh:
        fh.seek(leaves[len(leaves) // 2] * size)
        fh.write(b"\xff" * 8 + b"\x5a" * (size - 8))


# ----------------------------------------------------------------- connect


def test_a_new_spool_is_private_and_opened_with_its_pragmas(tmp_path):
    path = tmp_path / "spool.sqlite3"
    c = connect(path)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        pragma = lambda name: c.execute(f"PRAGMA {name}").fetchone()[0]  # noqa: E731
        assert pragma("journal_mode") == "wal"
        assert pragma("synchronous") == 2  # FULL: every commit fsyncs the log
        assert pragma("auto_vacuum") == 2  # incremental
        assert pragma("busy_timeout") == 10000
        assert pragma("temp_store") == 2  # memory
        assert pragma("journal_size_limit") == WAL_SIZE_LIMIT == 16 * 1024 * 1024
        assert {r[1] for r in c.execute("PRAGMA table_info(queue)")} == set(_COLUMNS.split(", "))
        assert {r[1] for r in c.execute("PRAGMA table_info(dead)")} == set(_DEAD_COLUMNS.split(", "))
        # We run our own transactions: a statement outside one is committed at once...
        c.execute("INSERT INTO queue (route, region, ip, body, meta, enqueued_at) VALUES ('t', 'us', 1, x'00', x'00', 1)")
        assert not c.in_transaction
        with sqlite3.connect(path) as other:
            assert other.execute("SELECT COUNT(*) FROM queue").fetchone()[0] == 1
        # ...and the spool's thread may use a connection opened on another one.
        errors: list[BaseException] = []

        def use() -> None:
            try:
                c.execute("SELECT COUNT(*) FROM queue").fetchone()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        worker = threading.Thread(target=use)
        worker.start()
        worker.join()
        assert errors == []
    finally:
        c.close()
    again = connect(path, fsync=False)
    try:
        assert again.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert again.execute("SELECT COUNT(*) FROM queue").fetchone()[0] == 1  # reopened, not recreated
    finally:
        again.close()


def test_a_spool_of_an_older_version_gains_the_new_columns(tmp_path):
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as c:  # 0.1.0's tables
        c.execute("CREATE TABLE queue (id INTEGER PRIMARY KEY AUTOINCREMENT, route TEXT NOT NULL, region TEXT NOT NULL,"
                  " project TEXT, ip INTEGER NOT NULL, body BLOB NOT NULL, meta BLOB NOT NULL,"
                  " enqueued_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0)")
        c.execute("CREATE TABLE dead (id INTEGER PRIMARY KEY AUTOINCREMENT, queue_id INTEGER NOT NULL, route TEXT NOT NULL,"
                  " region TEXT NOT NULL, project TEXT, ip INTEGER NOT NULL, body BLOB NOT NULL, meta BLOB NOT NULL,"
                  " enqueued_at REAL NOT NULL, attempts INTEGER NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL,"
                  " status INTEGER, failed_at REAL NOT NULL)")
        c.execute("INSERT INTO queue (route, region, ip, body, meta, enqueued_at) VALUES ('track', 'us', 1, x'01', x'02', 5)")
        c.execute("INSERT INTO dead (queue_id, route, region, ip, body, meta, enqueued_at, attempts, reason, detail, failed_at)"
                  " VALUES (1, 'track', 'us', 1, x'01', x'02', 5, 3, 'rejected', 'no', 6)")
    c = connect(path)
    try:
        assert c.execute(f"SELECT {_COLUMNS} FROM queue").fetchall() == [
            (1, "track", "us", None, 1, b"\x01", b"\x02", 5.0, 0, None, "mixpanel", 1)]
        assert c.execute("SELECT protocol FROM dead").fetchall() == [("mixpanel",)]
        # A spool with only some of them gains the others.
    finally:
        c.close()
    partial = tmp_path / "partial.sqlite3"
    with sqlite3.connect(partial) as c:
        c.execute("CREATE TABLE queue (id INTEGER PRIMARY KEY AUTOINCREMENT, route TEXT NOT NULL, region TEXT NOT NULL,"
                  " project TEXT, ip INTEGER NOT NULL, body BLOB NOT NULL, meta BLOB NOT NULL,"
                  " enqueued_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, event_time REAL,"
                  " protocol TEXT NOT NULL DEFAULT 'segment')")
        c.execute("INSERT INTO queue (route, region, ip, body, meta, enqueued_at, event_time) VALUES ('t', 'eu', 0, x'01', x'02', 5, 4.5)")
    c = connect(partial)
    try:
        assert c.execute("SELECT event_time, protocol, count FROM queue").fetchall() == [(4.5, "segment", 1)]
    finally:
        c.close()


# ------------------------------------------------------------------- check


def test_a_sound_spool_checks_as_sound_and_a_damaged_one_says_why(tmp_path):
    path = tmp_path / "spool.sqlite3"
    fill(path, 400)
    c = sqlite3.connect(path)
    try:
        assert check(c) is None
    finally:
        c.close()
    damage_one_leaf(path)
    c = sqlite3.connect(path)
    try:
        problem = check(c)
        assert problem is not None and problem != "ok"
        assert problem.count("; ") <= 2  # at most SQLite's first three complaints
    finally:
        c.close()
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"no SQLite here " * 400)
    c = sqlite3.connect(garbage)
    try:
        assert check(c) == "file is not a database"
    finally:
        c.close()


def test_a_file_whose_pages_sqlite_reports_is_not_sound_and_is_salvaged(tmp_path):
    """A file SQLite opens and reads, but whose check lists complaints (five
    pages the header counts that nothing uses): not sound, named, salvaged."""
    path = tmp_path / "spool.sqlite3"
    bodies = fill(path, 3)
    data = bytearray(path.read_bytes())
    pages = struct.unpack(">I", data[28:32])[0]  # the header's page count
    data[28:32] = struct.pack(">I", pages + 5)
    path.write_bytes(bytes(data) + b"\0" * 4096 * 5)
    c = sqlite3.connect(path)
    try:
        problem = check(c)
        assert problem is not None and f"Page {pages + 1} is never used" in problem
    finally:
        c.close()
    conn, salvaged = open_or_salvage(path)
    try:
        assert salvaged is not None and salvaged.error == problem and salvaged.queued == 3
        assert [r[0] for r in conn.execute("SELECT body FROM queue ORDER BY id")] == bodies
    finally:
        conn.close()


def test_a_spool_without_its_queue_table_is_not_sound(tmp_path):
    c = sqlite3.connect(tmp_path / "empty.sqlite3")
    try:
        assert check(c) == "no such table: queue"
    finally:
        c.close()


# ---------------------------------------------------------- open or salvage


def test_a_sound_spool_is_opened_as_it_is(tmp_path):
    path = tmp_path / "spool.sqlite3"
    bodies = fill(path, 5)
    conn, salvaged = open_or_salvage(path)
    try:
        assert salvaged is None
        assert [r[0] for r in conn.execute("SELECT body FROM queue ORDER BY id")] == bodies
        assert list(tmp_path.glob("*.corrupt-*")) == []
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL unless told
    finally:
        conn.close()
    conn, salvaged = open_or_salvage(path, fsync=False)
    try:
        assert salvaged is None and conn.execute("PRAGMA synchronous").fetchone()[0] == 1
    finally:
        conn.close()


@pytest.fixture
def far_from_utc(monkeypatch):
    """A local time zone hours away from UTC (the aside's name is in UTC)."""
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize("fsync", [True, False])
def test_an_unreadable_file_and_its_wal_are_moved_aside_under_the_time(tmp_path, far_from_utc, fsync):
    path = tmp_path / "spool.sqlite3"
    path.write_bytes(b"no SQLite here " * 400)
    Path(str(path) + "-wal").write_bytes(b"old wal")
    Path(str(path) + "-shm").write_bytes(b"old shm")
    before = time.time()
    conn, salvaged = open_or_salvage(path, fsync=fsync)
    after = time.time()
    try:
        assert salvaged is not None and salvaged.error == "file is not a database"
        assert (salvaged.queued, salvaged.dead) == (0, 0)
        match = re.fullmatch(r"spool\.sqlite3\.corrupt-(\d{8}T\d{6}Z)", salvaged.moved_to.name)
        assert match and salvaged.moved_to.parent == tmp_path
        stamp = calendar.timegm(time.strptime(match[1], "%Y%m%dT%H%M%SZ"))
        assert int(before) - 1 <= stamp <= after
        assert salvaged.moved_to.read_bytes().startswith(b"no SQLite here")
        assert Path(str(salvaged.moved_to) + "-wal").read_bytes() == b"old wal"
        assert Path(str(salvaged.moved_to) + "-shm").exists()  # SQLite rewrote it: the old file's, moved too
        # The fresh spool is a spool, with the pragmas asked for.
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == (2 if fsync else 1)
        assert conn.execute("SELECT COUNT(*) FROM queue").fetchone()[0] == 0
        assert check(conn) is None
    finally:
        conn.close()


def test_a_damaged_spool_is_salvaged_row_by_row_around_its_bad_page(tmp_path):
    path = tmp_path / "spool.sqlite3"
    bodies = fill(path, 400)
    damage_one_leaf(path)
    conn, salvaged = open_or_salvage(path)
    try:
        assert salvaged is not None and salvaged.error
        rows = conn.execute("SELECT id, body FROM queue ORDER BY id").fetchall()
        # One leaf of ~13 rows lost, every other row kept, with its id.
        assert 380 <= len(rows) < 400 and salvaged.queued == len(rows)
        assert all(bodies[i - 1] == body for i, body in rows)
        lost = sorted(set(range(1, 401)) - {i for i, _ in rows})
        assert lost == list(range(lost[0], lost[-1] + 1)), "only one page's run of rows is lost"
        # The rows after the bad page came through: the walk went on past it.
        assert rows[-1][0] == 400
    finally:
        conn.close()


@pytest.mark.parametrize("chunk", [1, 7, 500, 1000])
def test_readable_rows_walk_every_chunk_past_a_bad_page(tmp_path, chunk):
    path = tmp_path / "spool.sqlite3"
    fill(path, 400)
    damage_one_leaf(path)
    old = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        got = [r[0] for r in _readable_rows(old, "queue", "id, body", chunk)]
        assert got == sorted(set(got)), "each row once, in id order"
        assert 380 <= len(got) < 400 and got[0] == 1 and got[-1] == 400
        # The same rows whatever the chunk.
        assert got == [r[0] for r in _readable_rows(old, "queue", "id, body", 13)]
    finally:
        old.close()


def test_readable_rows_of_a_sound_table_are_all_of_them_in_chunks(tmp_path):
    path = tmp_path / "spool.sqlite3"
    c = connect(path)
    try:
        c.executemany("INSERT INTO queue (id, route, region, ip, body, meta, enqueued_at) VALUES (?, 't', 'us', 1, x'00', x'00', 1)",
                      [(i,) for i in (1, 2, 3, 10, 11, 40)])
        assert [r[0] for r in _readable_rows(c, "queue", "id", 2)] == [1, 2, 3, 10, 11, 40]
        assert [r for r in _readable_rows(c, "dead", "id")] == []
        # A table that is not there at all: nothing, not an error.
        assert list(_readable_rows(c, "missing", "id")) == []
        # The last rows deleted: MAX(id) is below the sequence, the walk ends.
        c.execute("DELETE FROM queue WHERE id > 3")
        assert [r[0] for r in _readable_rows(c, "queue", "id", 2)] == [1, 2, 3]
    finally:
        c.close()


def test_salvage_carries_queued_events_and_dead_letters_whole(tmp_path):
    old_path = tmp_path / "old.sqlite3"
    c = connect(old_path)
    c.execute(f"INSERT INTO queue ({_COLUMNS}) VALUES (5, 'engage', 'eu', 'p', 0, x'01', x'02', 3.5, 2, 1.5, 'segment', 3)")
    c.execute(f"INSERT INTO queue ({_COLUMNS}) VALUES (9, 'track', 'us', NULL, 1, x'03', x'04', 4.5, 0, NULL, 'mixpanel', 1)")
    c.execute(f"INSERT INTO dead ({_DEAD_COLUMNS}) VALUES (2, 4, 'track', 'us', 'p', 1, x'05', x'06', 1.0, 7, 'rejected',"
              " 'no', 400, 8.0, 'segment', 6.25)")
    c.close()
    fresh = connect(tmp_path / "fresh.sqlite3")
    try:
        assert salvage_into(old_path, fresh) == (4, 1)  # events, not rows
        assert fresh.execute(f"SELECT {_COLUMNS} FROM queue ORDER BY id").fetchall() == [
            (5, "engage", "eu", "p", 0, b"\x01", b"\x02", 3.5, 2, 1.5, "segment", 3),
            (9, "track", "us", None, 1, b"\x03", b"\x04", 4.5, 0, None, "mixpanel", 1)]
        assert fresh.execute(f"SELECT {_DEAD_COLUMNS} FROM dead").fetchall() == [
            (2, 4, "track", "us", "p", 1, b"\x05", b"\x06", 1.0, 7, "rejected", "no", 400, 8.0, "segment", 6.25)]
        assert not fresh.in_transaction
    finally:
        fresh.close()


def test_salvage_skips_a_row_it_cannot_write_and_counts_the_rest(tmp_path):
    old_path = tmp_path / "old.sqlite3"
    c = connect(old_path)
    c.executemany("INSERT INTO dead (id, queue_id, route, region, ip, body, meta, enqueued_at, attempts, reason, detail,"
                  " failed_at) VALUES (?, 1, 't', 'us', 1, x'00', x'00', 1, 0, 'r', 'd', 1)", [(1,), (2,), (3,)])
    c.close()
    fresh = connect(tmp_path / "fresh.sqlite3")
    try:
        fresh.execute("INSERT INTO dead (id, queue_id, route, region, ip, body, meta, enqueued_at, attempts, reason, detail,"
                      " failed_at) VALUES (2, 9, 'mine', 'us', 1, x'00', x'00', 1, 0, 'r', 'd', 1)")
        assert salvage_into(old_path, fresh) == (0, 2)
        assert fresh.execute("SELECT id, route FROM dead ORDER BY id").fetchall() == [(1, "t"), (2, "mine"), (3, "t")]
    finally:
        fresh.close()


def test_salvage_of_a_file_without_a_dead_table_carries_its_queue(tmp_path):
    old_path = tmp_path / "old.sqlite3"
    with sqlite3.connect(old_path) as c:
        c.execute("CREATE TABLE queue (id INTEGER PRIMARY KEY AUTOINCREMENT, route TEXT NOT NULL, region TEXT NOT NULL,"
                  " project TEXT, ip INTEGER NOT NULL, body BLOB NOT NULL, meta BLOB NOT NULL, enqueued_at REAL NOT NULL,"
                  " attempts INTEGER NOT NULL DEFAULT 0)")
        c.executemany("INSERT INTO queue (route, region, ip, body, meta, enqueued_at) VALUES ('track', 'us', 1, ?, x'00', 1)",
                      [(b"%d" % i,) for i in range(3)])
    fresh = connect(tmp_path / "fresh.sqlite3")
    try:
        assert salvage_into(old_path, fresh) == (3, 0)
        assert fresh.execute("SELECT id, body, count, protocol FROM queue").fetchall() == [
            (i + 1, b"%d" % i, 1, "mixpanel") for i in range(3)]
    finally:
        fresh.close()


def test_salvage_of_a_file_that_cannot_be_opened_carries_nothing(tmp_path):
    fresh = connect(tmp_path / "fresh.sqlite3")
    try:
        assert salvage_into(tmp_path / "gone.sqlite3", fresh) == (0, 0)
        garbage = tmp_path / "garbage"
        garbage.write_bytes(os.urandom(8192))
        assert salvage_into(garbage, fresh) == (0, 0)
        assert not fresh.in_transaction
        assert fresh.execute("SELECT COUNT(*) FROM queue").fetchone()[0] == 0
    finally:
        fresh.close()


def test_a_salvage_that_cannot_commit_is_rolled_back_whole(tmp_path):
    old_path = tmp_path / "old.sqlite3"
    fill(old_path, 3)
    fresh = connect(tmp_path / "fresh.sqlite3")
    try:
        fresh.execute("BEGIN")  # a transaction already open: salvage's own BEGIN fails
        fresh.execute("INSERT INTO queue (route, region, ip, body, meta, enqueued_at) VALUES ('t', 'us', 1, x'00', x'00', 1)")
        assert salvage_into(old_path, fresh) == (0, 0)
        assert not fresh.in_transaction
        assert fresh.execute("SELECT COUNT(*) FROM queue").fetchone()[0] == 0
    finally:
        fresh.close()


def test_a_damaged_last_page_is_walked_to_the_ids_sequence(tmp_path):
    """The table's rightmost leaf unreadable: MAX(id) fails, so the walk runs to
    the id sequence's last value instead, and keeps every row before the page."""
    path = tmp_path / "spool.sqlite3"
    bodies = fill(path, 400)
    with sqlite3.connect(path) as c:
        size = c.execute("PRAGMA page_size").fetchone()[0]
    data = path.read_bytes()
    last = max(n for n in range(1, len(data) // size) if data[n * size] == 0x0D)
    with open(path, "r+b") as fh:
        fh.seek(last * size)
        fh.write(b"\xff" * 8 + b"\x5a" * (size - 8))
    old = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        with pytest.raises(sqlite3.DatabaseError):
            old.execute("SELECT MAX(id) FROM queue").fetchone()
        got = list(_readable_rows(old, "queue", "id, body", 50))
    finally:
        old.close()
    ids = [r[0] for r in got]
    assert ids == list(range(1, len(ids) + 1)) and 370 <= len(ids) < 400
    assert [r[1] for r in got] == bodies[:len(ids)]
    conn, salvaged = open_or_salvage(path)
    try:
        assert salvaged is not None and salvaged.queued == len(ids)
    finally:
        conn.close()


def test_salvage_fills_the_columns_an_older_file_lacks_with_the_defaults(tmp_path):
    old_path = tmp_path / "old.sqlite3"
    with sqlite3.connect(old_path) as c:
        c.execute("CREATE TABLE queue (id INTEGER PRIMARY KEY AUTOINCREMENT, route TEXT NOT NULL, region TEXT NOT NULL,"
                  " project TEXT, ip INTEGER NOT NULL, body BLOB NOT NULL, meta BLOB NOT NULL,"
                  " enqueued_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0)")
        c.execute("CREATE TABLE dead (id INTEGER PRIMARY KEY AUTOINCREMENT, queue_id INTEGER NOT NULL, route TEXT NOT NULL,"
                  " region TEXT NOT NULL, project TEXT, ip INTEGER NOT NULL, body BLOB NOT NULL, meta BLOB NOT NULL,"
                  " enqueued_at REAL NOT NULL, attempts INTEGER NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL,"
                  " status INTEGER, failed_at REAL NOT NULL)")
        c.executemany("INSERT INTO queue (id, route, region, project, ip, body, meta, enqueued_at, attempts)"
                      " VALUES (?, 'track', 'us', NULL, 1, ?, x'7b7d', 1.5, 2)", [(3, b"a"), (8, b"b")])
        c.execute("INSERT INTO dead (queue_id, route, region, ip, body, meta, enqueued_at, attempts, reason, detail, failed_at)"
                  " VALUES (2, 'engage', 'eu', 0, x'01', x'02', 5, 3, 'rejected', 'no', 6)")
    fresh = connect(tmp_path / "fresh.sqlite3")
    try:
        assert salvage_into(old_path, fresh) == (2, 1)
        assert fresh.execute(f"SELECT {_COLUMNS} FROM queue ORDER BY id").fetchall() == [
            (3, "track", "us", None, 1, b"a", b"{}", 1.5, 2, None, "mixpanel", 1),
            (8, "track", "us", None, 1, b"b", b"{}", 1.5, 2, None, "mixpanel", 1)]
        assert fresh.execute("SELECT queue_id, route, region, reason, detail, status, failed_at, protocol FROM dead").fetchall() == [
            (2, "engage", "eu", "rejected", "no", None, 6.0, "mixpanel")]
    finally:
        fresh.close()
