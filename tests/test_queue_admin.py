"""The operator's side of the SQLite spool in process
(``proxy/services/queue/admin.py``, what ``firstparty spool stats`` and
``firstparty replay`` run): the figures count events, and dead letters go
back into the queue (all, or one reason's), in one transaction, beside a
serving spool."""

from __future__ import annotations

import sqlite3
import time

import pytest

from proxy.services.queue.admin import replay, stats_of
from proxy.services.queue.rows import DeadLetter, NewRow
from proxy.services.queue.sqlfile import connect
from proxy.services.queue.sqlite import Spool


@pytest.fixture
def conn(tmp_path):
    c = connect(tmp_path / "spool.sqlite3")
    yield c
    c.close()


def queue(c: sqlite3.Connection, region: str, count: int, enqueued_at: float) -> None:
    c.execute("INSERT INTO queue (route, region, ip, body, meta, enqueued_at, count) VALUES ('track', ?, 1, x'00', x'00', ?, ?)",
              (region, enqueued_at, count))


def dead(c: sqlite3.Connection, reason: str, body: bytes, **kw: object) -> None:
    row = {"queue_id": 1, "route": "track", "region": "us", "project": "p", "ip": 1, "body": body, "meta": b"{}",
           "enqueued_at": 1.0, "attempts": 3, "reason": reason, "detail": "d", "status": 400, "failed_at": 2.0,
           "protocol": "mixpanel"}
    row.update(kw)
    c.execute(f"INSERT INTO dead ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))


def test_an_empty_spools_figures_are_zero(conn):
    assert stats_of(conn) == {"depth": 0, "oldest_age_seconds": 0.0, "depth_by_region": {}, "dead_letters": 0,
                              "dead_by_reason": {}}


def test_the_figures_count_events_by_region_and_letters_by_reason(conn):
    now = time.time()
    queue(conn, "us", 3, now - 100)
    queue(conn, "us", 1, now - 10)
    queue(conn, "eu", 2, now - 50)
    for reason in ("rejected", "rejected", "expired"):
        dead(conn, reason, b"x")
    before = time.time()
    stats = stats_of(conn)
    after = time.time()
    assert stats["depth"] == 6 and stats["depth_by_region"] == {"us": 4, "eu": 2}
    assert stats["dead_letters"] == 3 and stats["dead_by_reason"] == {"rejected": 2, "expired": 1}
    # The oldest row's age, to the millisecond.
    age = stats["oldest_age_seconds"]
    assert before - (now - 100) - 0.001 <= age <= after - (now - 100) + 0.001
    assert age == round(age, 3)


def test_replay_moves_every_dead_letter_back_in_order_as_new(conn):
    queue(conn, "us", 1, 1.0)
    dead(conn, "rejected", b"first", region="eu", project=None, ip=0, meta=b'{"n":"a"}', protocol="segment", route="engage")
    dead(conn, "expired", b"second")
    before = time.time()
    assert replay(conn) == 2
    after = time.time()
    assert conn.execute("SELECT COUNT(*) FROM dead").fetchone()[0] == 0
    rows = conn.execute("SELECT id, route, region, project, ip, body, meta, enqueued_at, attempts, protocol, count"
                        " FROM queue WHERE id > 1 ORDER BY id").fetchall()
    assert [r[:7] for r in rows] == [(2, "engage", "eu", None, 0, b"first", b'{"n":"a"}'), (3, "track", "us", "p", 1, b"second", b"{}")]
    assert all(before <= r[7] <= after for r in rows)  # queued now, not when first spooled
    assert [(r[8], r[9], r[10]) for r in rows] == [(0, "segment", 1), (0, "mixpanel", 1)]
    assert not conn.in_transaction
    assert replay(conn) == 0


def test_replay_of_one_reason_leaves_the_others(conn):
    dead(conn, "rejected", b"a")
    dead(conn, "expired", b"b")
    dead(conn, "rejected", b"c")
    assert replay(conn, "rejected") == 2
    assert [r[0] for r in conn.execute("SELECT body FROM queue ORDER BY id")] == [b"a", b"c"]
    assert conn.execute("SELECT reason, body FROM dead").fetchall() == [("expired", b"b")]
    assert replay(conn, "nothing") == 0
    assert stats_of(conn)["dead_by_reason"] == {"expired": 1}


def test_replay_keeps_each_letters_event_time(conn):
    dead(conn, "expired", b"old", event_time=1_000.5)
    dead(conn, "rejected", b"untimed")  # a letter of a spool from before the column: no time
    assert replay(conn) == 2
    assert conn.execute("SELECT body, event_time FROM queue ORDER BY id").fetchall() == [(b"old", 1_000.5), (b"untimed", None)]


def test_a_spool_from_before_dead_letters_kept_their_time_gains_the_column(tmp_path):
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE dead (id INTEGER PRIMARY KEY AUTOINCREMENT, queue_id INTEGER NOT NULL, route TEXT NOT NULL,"
                " region TEXT NOT NULL, project TEXT, ip INTEGER NOT NULL, body BLOB NOT NULL, meta BLOB NOT NULL,"
                " enqueued_at REAL NOT NULL, attempts INTEGER NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL,"
                " status INTEGER, failed_at REAL NOT NULL)")
    old.execute("INSERT INTO dead (queue_id, route, region, ip, body, meta, enqueued_at, attempts, reason, detail, failed_at)"
                " VALUES (1, 'track', 'us', 1, x'61', x'7b7d', 1.0, 3, 'rejected', 'd', 2.0)")
    old.commit()
    old.close()
    c = connect(path)
    try:
        assert "event_time" in {row[1] for row in c.execute("PRAGMA table_info(dead)")}
        assert replay(c) == 1
        assert c.execute("SELECT body, event_time, protocol FROM queue").fetchall() == [(b"a", None, "mixpanel")]
    finally:
        c.close()


def test_a_replay_that_fails_moves_nothing(conn):
    dead(conn, "rejected", b"a")
    dead(conn, "rejected", b"b")
    conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON queue WHEN NEW.body = x'62' BEGIN SELECT RAISE(ABORT, 'no room'); END")
    with pytest.raises(sqlite3.IntegrityError, match="no room"):
        replay(conn)
    assert not conn.in_transaction
    assert conn.execute("SELECT COUNT(*) FROM queue").fetchone()[0] == 0
    assert [r[0] for r in conn.execute("SELECT body FROM dead ORDER BY id")] == [b"a", b"b"]


async def test_replay_beside_a_serving_spool_reaches_its_readers(tmp_path):
    path = tmp_path / "spool.sqlite3"
    spool = Spool(path, max_rows=100)
    await spool.open()
    try:
        await spool.enqueue([NewRow("track", "us", "p", True, b'{"e":1}', b'{"n":"e"}', 5.0)])
        [row] = await spool.read("us", 0, 10)
        spool.bury([DeadLetter(row, "rejected", "bad", 400)])
        await spool.flush()
        assert await spool.stats() == {"depth": 0, "oldest_age_seconds": 0.0, "depth_by_region": {}, "dead_letters": 1,
                                       "dead_by_reason": {"rejected": 1}}
        operator = connect(path)
        try:
            assert replay(operator, "rejected") == 1
            assert stats_of(operator)["depth"] == 1
        finally:
            operator.close()
        [back] = await spool.read("us", row.id, 10)
        assert (back.body, back.meta, back.attempts, back.route, back.project) == (b'{"e":1}', b'{"n":"e"}', 0, "track", "p")
        # Its own time came back with it: the sender judges its age again (an
        # expired event is buried again, not sent to a vendor that drops it).
        assert back.event_time == 5.0
        assert back.id > row.id
        stats = await spool.stats()
        assert (stats["depth"], stats["dead_letters"], stats["depth_by_region"]) == (1, 0, {"us": 1})
    finally:
        await spool.close()
