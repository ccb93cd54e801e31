"""Faults of our own under the spool: a file SQLite cannot read at start is
moved aside, what can be read is salvaged, and the proxy serves (no crash
loop); `firstparty spool check` names a bad file offline."""

from __future__ import annotations

import pytest

import contextlib
import logging
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import orjson

from proxy.protocols.base import EventFacts
from proxy.services.queue.rows import EventGroup, NewRow, columns, event_metas, request_rows
from proxy.services.queue.sqlfile import open_or_salvage
from proxy.services.queue.sqlite import Spool
from proxy.web.http import BODY_BUDGET
from tests.conftest import BROWSER, b64_body, device_id, js_event, make_settings

TRACK = "/mp/track/?verbose=1&ip=1"
BROWSER_FORM = {**BROWSER, "Content-Type": "application/x-www-form-urlencoded"}

ROOT = Path(__file__).resolve().parent.parent


async def fill(path: Path, n: int) -> list[bytes]:
    spool = Spool(path, max_rows=100_000)
    await spool.open()
    bodies = [orjson.dumps({"event": f"e{i}", "properties": {"pad": "x" * 300, "$insert_id": f"id-{i:05d}"}}) for i in range(n)]
    await spool.enqueue([NewRow("track", "us", "t", True, b, b'{"c":null}', time.time()) for b in bodies])
    await spool.close()
    assert not Path(str(path) + "-wal").exists() or Path(str(path) + "-wal").stat().st_size == 0
    return bodies


def damage_pages(path: Path, count: int) -> None:
    """Overwrite ``count`` table-leaf pages from the middle of the file with
    garbage (a bad sector, a torn write): never the header page or an interior
    page, so what is lost is those pages' rows and no more."""
    with sqlite3.connect(path) as c:
        size = c.execute("PRAGMA page_size").fetchone()[0]
    data = path.read_bytes()
    leaves = [n for n in range(1, len(data) // size) if data[n * size] == 0x0D]  # 0x0D: a table b-tree leaf
    middle = len(leaves) // 2
    with open(path, "r+b") as fh:
        for n in leaves[middle:middle + count]:
            fh.seek(n * size)
            fh.write(b"\xff" * 8 + os.urandom(size - 8))


def asides(path: Path) -> list[Path]:
    """The moved-aside database files (their WAL and shared-memory files went with them)."""
    return sorted(p for p in path.parent.glob(path.name + ".corrupt-*") if not p.name.endswith(("-wal", "-shm")))


async def test_damaged_pages_are_salvaged_around(tmp_path):
    path = tmp_path / "spool.sqlite3"
    bodies = await fill(path, 2000)
    damage_pages(path, 3)
    conn, salvaged = open_or_salvage(path)
    try:
        assert salvaged is not None and salvaged.error
        assert asides(path) == [salvaged.moved_to] and salvaged.moved_to.exists()
        # Most rows came through; the few on the damaged pages did not.
        assert 1500 < salvaged.queued < 2000, salvaged
        rows = conn.execute("SELECT id, body FROM queue ORDER BY id").fetchall()
        assert len(rows) == salvaged.queued
        assert all(body in set(bodies) for _id, body in rows)
        assert [r[0] for r in rows] == sorted(r[0] for r in rows)
        # New rows take ids after the salvaged ones: nothing is sent out of order.
        conn.execute("INSERT INTO queue (route, region, ip, body, meta, enqueued_at) VALUES ('track', 'us', 1, x'00', x'00', 0)")
        assert conn.execute("SELECT MAX(id) FROM queue").fetchone()[0] > rows[-1][0]
    finally:
        conn.close()


async def test_a_file_that_is_no_database_is_replaced(tmp_path):
    path = tmp_path / "spool.sqlite3"
    path.write_bytes(b"this is not SQLite" * 500)
    conn, salvaged = open_or_salvage(path)
    conn.close()
    assert salvaged is not None and "not a database" in salvaged.error
    assert (salvaged.queued, salvaged.dead) == (0, 0)
    assert salvaged.moved_to.read_bytes().startswith(b"this is not SQLite")


async def test_the_proxy_serves_and_delivers_what_was_salvaged(serve_proxy, tmp_path, upstream, caplog):
    from proxy.web.app import create_app

    settings = make_settings(tmp_path, upstream, delivery={"mode": "spool"})
    path = settings.spool_path
    path.parent.mkdir(parents=True, exist_ok=True)
    bodies = await fill(path, 2000)
    # The fill's events are Mixpanel /track rows: delivered once the proxy is up.
    damage_pages(path, 2)
    caplog.set_level(logging.ERROR, logger="proxy.services.queue.sqlite")
    client = await serve_proxy(create_app(settings))
    [line] = [r.getMessage() for r in caplog.records if r.name == "proxy.services.queue.sqlite"]
    assert str(asides(path)[0]) in line and "salvaged into a fresh spool" in line
    salvaged = client.services.spool.salvaged
    assert salvaged is not None and salvaged.queued > 1500
    # New events are accepted as ever, and the salvaged ones go out too.
    resp = await client.post("/mp/track/?verbose=1", data=b64_body([js_event("After", device_id())]),
                             headers={**BROWSER, "Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status == 200
    events = await upstream.wait(salvaged.queued + 1, "us", "/track", timeout=20)
    names = [e["event"] for e in events]
    assert "After" in names and len(set(names)) == salvaged.queued + 1
    assert len(bodies) == 2000


def test_spool_check_names_a_bad_file_offline(tmp_path):
    import asyncio

    data = tmp_path / "data"
    data.mkdir()
    asyncio.run(fill(data / "spool.sqlite3", 10))
    conf = tmp_path / "c.toml"
    conf.write_text(f'[server]\ndata_dir = "{data}"\n[cookie]\nsecret = "{"s" * 32}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIRSTPARTY_")}
    good = subprocess.run([sys.executable, "-m", "proxy", "spool", "check", "-c", str(conf)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert good.returncode == 0 and good.stdout.startswith("ok ")
    (data / "spool-1.sqlite3").write_bytes(b"garbage" * 1000)
    bad = subprocess.run([sys.executable, "-m", "proxy", "spool", "check", "-c", str(conf)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert "corrupt  " + str(data / "spool-1.sqlite3") in bad.stdout and "not a database" in bad.stdout
    assert "salvages every readable row" in bad.stdout


@contextlib.contextmanager
def tiny_disk(where: Path, size: str = "1m"):
    """A real file system of ``size`` (tmpfs), mounted for the test and gone after it."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True)
    assert mounted.returncode == 0, f"cannot mount a tmpfs (the test needs root): {mounted.stderr}"
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


async def test_a_full_disk_is_a_503_and_the_spool_recovers_by_itself(serve_proxy, tmp_path, upstream, caplog):
    """The issue's scenario: a 1 MB disk under the spool, the vendor down, one
    event per request. Past delivery.min_free_bytes new events are answered
    503 with Retry-After (never 500, no traceback, one log line), /readyz
    fails and the metric says so; once the vendor is back the queue drains into
    the room left, the space is given back, and events are accepted again.
    Every event acknowledged is delivered once."""
    from proxy.web.app import create_app
    from tests.support import eventually, eventually_async, metric, port_of, reserve_port

    down = reserve_port()  # Mixpanel, unreachable for now
    vendor_url = f"http://127.0.0.1:{port_of(down)}"
    caplog.set_level(logging.INFO)
    with tiny_disk(tmp_path / "tiny") as disk:
        settings = make_settings(
            tmp_path, upstream,
            upstream={"us": vendor_url, "timeout_seconds": 2},
            delivery={"mode": "spool", "spool_path": str(disk / "spool.sqlite3"), "min_free_bytes": 300 * 1024,
                      "batch_window_ms": 5, "backoff_initial_seconds": 0.1, "backoff_max_seconds": 0.3},
        )
        client = await serve_proxy(create_app(settings))
        form = {**BROWSER, "Content-Type": "application/x-www-form-urlencoded"}
        accepted: list[str] = []
        statuses: dict[int, int] = {}
        for i in range(400):
            event = js_event(f"e{i}", device_id(), pad="x" * 1500)
            resp = await client.post("/mp/track/?verbose=1", data=b64_body([event]), headers=form)
            statuses[resp.status] = statuses.get(resp.status, 0) + 1
            if resp.status == 200:
                accepted.append(event["properties"]["$insert_id"])
            else:
                assert resp.status == 503 and resp.headers["Retry-After"].isdigit()
                assert "min_free_bytes" in (await resp.json())["error"]
        assert set(statuses) == {200, 503} and 10 < len(accepted) < 400, statuses
        ready = await client.ops_get("/readyz")
        assert ready.status == 503 and "min_free_bytes" in (await ready.json())["spool_refusing"]
        text = await (await client.ops_get("/metrics")).text()
        assert metric(text, "firstparty_spool_accepting") == 0

        # The vendor comes back on its port: the queue drains into the headroom,
        # space is given back, and new events are taken again.
        runner, _ = await upstream.serve("us", sock=down)
        try:
            await upstream.wait(len(accepted), "us", "/track", timeout=30)

            async def accepting_again() -> bool:
                return (await client.ops_get("/readyz")).status == 200

            await eventually_async(accepting_again, 15, "the spool to accept events again")
            late = js_event("after", device_id())
            resp = await client.post("/mp/track/?verbose=1", data=b64_body([late]), headers=form)
            assert resp.status == 200
            await eventually(lambda: len(upstream.received("us", "/track")) == len(accepted) + 1, 15, "the late event")
            got = [e["properties"]["$insert_id"] for e in upstream.received("us", "/track")]
            assert sorted(got) == sorted(accepted + [late["properties"]["$insert_id"]])  # each once, none lost
            text = await (await client.ops_get("/metrics")).text()
            assert metric(text, "firstparty_spool_accepting") == 1
        finally:
            await client.close()
            await runner.cleanup()
            down.close()
    # One line per change of state, never one per request: a refusal, then its
    # recovery. On a 1 MB disk the drain itself may briefly meet a full disk
    # (SQLite's journal needs room to delete), a second refusal and recovery.
    spool_lines = [r for r in caplog.records if r.name == "proxy.services.queue.sqlite"]
    levels = [r.levelname for r in spool_lines]
    assert levels in (["ERROR", "WARNING"], ["ERROR", "WARNING", "ERROR", "WARNING"]), [r.getMessage() for r in spool_lines]
    for refused, recovered in zip(spool_lines[::2], spool_lines[1::2]):
        assert "refuses new events" in refused.getMessage() and "accepts events again" in recovered.getMessage()
    assert "min_free_bytes" in spool_lines[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info], "no tracebacks"


async def test_a_disk_that_refuses_writes_is_a_503_not_a_500(tmp_path):
    """SQLite's own wall (SQLITE_FULL, here through max_page_count): the
    waiting clients get SpoolUnwritable, pending outcomes are kept, and the
    spool takes writes again when the disk does."""
    from proxy.services.queue.base import SpoolUnwritable

    spool = Spool(tmp_path / "spool.sqlite3", max_rows=100_000, min_free_bytes=0)
    await spool.open()
    try:
        await spool._call(lambda c: c.execute("PRAGMA max_page_count = 40").fetchall())
        row = lambda i: NewRow("track", "us", "t", True, b"x" * 2000, b"{}", time.time())  # noqa: E731
        refused = None
        for i in range(200):
            try:
                await spool.enqueue([row(i)])
            except SpoolUnwritable as exc:
                refused = exc
                break
        assert refused is not None and "full" in str(refused)
        assert not spool.accepting
        # Later calls are refused at once, without touching the disk.
        try:
            await spool.enqueue([row(0)])
            raise AssertionError("accepted while refusing")
        except SpoolUnwritable:
            pass
        await spool._call(lambda c: c.execute("PRAGMA max_page_count = 100000").fetchall())
        from tests.support import eventually

        await eventually(lambda: spool.accepting, 10, "the spool to take writes again")
        await spool.enqueue([row(1)])
    finally:
        await spool.close()


@pytest.mark.parametrize("path", ["/mp/track/?verbose=1", "/mp/bridge", "/mp/id"])
async def test_bodies_arriving_at_once_are_bounded(proxy_client, upstream, path):
    """Slow uploads hold at most server.max_inflight_body_bytes between them: one
    more (an event request, or a landing script's POST) is answered 503 with
    Retry-After at once, not buffered; once the first has arrived the room is back."""
    import asyncio

    client = await proxy_client(server={"max_inflight_body_bytes": 100_000})
    body = b64_body([js_event("slow", device_id(), pad="x" * 50_000)]).encode()

    async def start_upload(target: str = "/mp/track/?verbose=1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        writer.write(
            f"POST {target} HTTP/1.1\r\n".encode() + b"Host: www.example.com\r\nUser-Agent: Mozilla/5.0\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:1000]
        )
        await writer.drain()
        return reader, writer

    first = await start_upload()
    await asyncio.sleep(0)  # let the proxy start reading it
    from tests.support import eventually

    await eventually(lambda: client.app[BODY_BUDGET].used > 0, 5, "the first upload to hold the budget")
    second = await start_upload(path)
    head = await asyncio.wait_for(second[0].readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 5" in head
    second[1].close()
    first[1].write(body[1000:])
    await first[1].drain()
    head = await asyncio.wait_for(first[0].readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    first[1].close()
    assert client.app[BODY_BUDGET].used == 0
    third = await start_upload()
    third[1].write(body[1000:])
    await third[1].drain()
    head = await asyncio.wait_for(third[0].readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    third[1].close()


async def test_past_max_inflight_requests_new_ones_are_shed(proxy_client, upstream):
    """A process with server.max_inflight_requests event requests in progress answers
    the next one 503 with Retry-After and the vendor's error shape at once (its events
    are not taken, so the SDK's resend is not a duplicate); once one finishes, the room
    is back, and nothing accepted is lost."""
    import asyncio

    from proxy.web.app import EDGE
    from tests.support import eventually, metric

    release = asyncio.Event()

    async def slow(rec):  # the vendor holds sync-mode requests until released
        await release.wait()
        return None

    upstream.behave = slow
    client = await proxy_client(server={"max_inflight_requests": 2}, delivery={"mode": "sync"})
    held = [
        asyncio.ensure_future(client.post(TRACK, data=b64_body([js_event(f"held {i}", device_id())]), headers=BROWSER_FORM))
        for i in range(2)
    ]
    await eventually(lambda: client.app[EDGE].inflight == 2, 5, "two requests in progress")
    shed = await client.post(TRACK, data=b64_body([js_event("shed", device_id())]), headers=BROWSER_FORM)
    assert shed.status == 503 and shed.headers["Retry-After"] == "5"
    assert await shed.json() == {"status": 0, "error": "overloaded; retry later"}
    seg = await client.post("/seg/v1/t", json={"type": "track", "event": "x", "anonymousId": "a" * 12, "writeKey": "k"})
    assert seg.status == 503 and (await seg.json())["code"] == "server_error"
    release.set()
    assert [r.status for r in await asyncio.gather(*held)] == [200, 200]
    assert client.app[EDGE].inflight == 0
    ok = await client.post(TRACK, data=b64_body([js_event("after", device_id())]), headers=BROWSER_FORM)
    assert ok.status == 200
    names = sorted(e["event"] for e in upstream.received("us", "/track"))
    assert names == ["after", "held 0", "held 1"]  # the shed one was never taken
    text = await (await client.ops_get("/metrics")).text()
    assert metric(text, "firstparty_shed_requests_total") == 2


async def test_a_refusing_spool_takes_events_again_only_with_room_to_spare(tmp_path):
    """Hysteresis: a spool refusing below min_free_bytes does not take events again
    the moment a few pages come free (it would refuse at the next insert, flapping
    and logging every second); it waits for a margin above the threshold."""
    import os

    from proxy.services.queue.sqlite import Spool

    with tiny_disk(tmp_path / "tiny", "4m") as disk:
        spool = Spool(disk / "spool.sqlite3", max_rows=1000, min_free_bytes=1024 * 1024)
        await spool.open()
        try:
            filler = disk / "filler"

            def leave_free(n: int) -> None:
                """Grow or shrink the filler file so that ``n`` bytes stay free."""
                st = os.statvfs(disk)
                size = filler.stat().st_size if filler.exists() else 0
                target = max(0, size + st.f_bavail * st.f_frsize - n)
                with open(filler, "ab") as fh:
                    fh.truncate(target)
                    if target:
                        os.posix_fallocate(fh.fileno(), 0, target)  # tmpfs counts allocated pages

            leave_free(900 * 1024)
            await spool._check_space()
            assert spool.refusing is not None
            leave_free(1024 * 1024 + 100 * 1024)  # above the threshold, within the margin
            await spool._check_space()
            assert spool.refusing is not None, "took events again with only 100 KiB to spare"
            leave_free(1024 * 1024 + 400 * 1024)  # past the margin (a quarter of min_free_bytes)
            await spool._check_space()
            assert spool.refusing is None
        finally:
            await spool.close()


def test_salvage_carries_rows_of_a_spool_older_than_its_columns(tmp_path):
    """A damaged spool written before ``protocol`` and ``count`` existed: its
    rows are carried over, the fresh spool's defaults filling the new columns
    (one Mixpanel event a row)."""
    from proxy.services.queue.sqlfile import connect, salvage_into

    old = tmp_path / "old.sqlite3"
    with sqlite3.connect(old) as c:  # what 0.1.0 created
        c.execute("CREATE TABLE queue (id INTEGER PRIMARY KEY AUTOINCREMENT, route TEXT NOT NULL, region TEXT NOT NULL,"
                  " project TEXT, ip INTEGER NOT NULL, body BLOB NOT NULL, meta BLOB NOT NULL,"
                  " enqueued_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0)")
        c.executemany("INSERT INTO queue (route, region, project, ip, body, meta, enqueued_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                      [("track", "us", None, 1, b'{"event":"e%d"}' % i, b"{}", 1.0) for i in range(3)])
    fresh = connect(tmp_path / "fresh.sqlite3")
    try:
        assert salvage_into(old, fresh) == (3, 0)
        rows = fresh.execute("SELECT id, body, protocol, count FROM queue ORDER BY id").fetchall()
        assert rows == [(i + 1, b'{"event":"e%d"}' % i, "mixpanel", 1) for i in range(3)]
    finally:
        fresh.close()


async def test_a_requeued_row_becomes_its_events_one_a_row_in_one_transaction(tmp_path):
    """Spool.requeue: the row's events go back as rows of one event (new ids,
    after every row so far, handed to the sender as committed rows), and the
    row itself is gone in the same commit; the depth still counts 3 events."""
    path = tmp_path / "spool.sqlite3"
    spool = Spool(path, max_rows=100)
    handed: list[list[tuple[int, bytes, int]]] = []
    spool.on_commit = lambda rows: handed.append([(r.id, r.body, r.count) for r in rows])
    await spool.open()
    try:
        group = EventGroup()
        bodies = [orjson.dumps({"event": f"e{i}"}) for i in range(3)]
        facts = [EventFacts(f"e{i}", f"id{i}", None, 100.0 + i) for i in range(3)]
        group.add_run("us", None, b",".join(bodies), facts, [[], [("distinct_id", "a", "b")], []])
        await spool.enqueue([group.row("track", False, "mixpanel", "canon", "cookie")])
        [row] = await spool.read("us", 0, 10)
        assert row.info is None  # read back from disk: the columns come from the stored meta
        cols = row.columns()
        assert (row.count, cols.names, cols.insert_ids, cols.times) == (3, ["e0", "e1", "e2"], ["id0", "id1", "id2"], [100.0, 101.0, 102.0])
        assert (cols.canonical, cols.source, cols.rewrites) == ("canon", "cookie", [[1, "distinct_id", "a", "b"]])
        commits = spool.commits
        spool.requeue(row)
        await spool.flush()
        assert spool.commits == commits + 1 and spool.depth == 3
        singles = await spool.read("us", 0, 10)
        assert [(r.body, r.count, r.event_time) for r in singles] == [(b, 1, 100.0 + i) for i, b in enumerate(bodies)]
        # each single row's meta is one event's own: its name, id, the request's identity, its rewrite only
        assert [orjson.loads(r.meta) for r in singles] == [
            {"c": "canon", "s": "cookie", "n": f"e{i}", "i": f"id{i}", "r": [["distinct_id", "a", "b"]] if i == 1 else []}
            for i in range(3)
        ]
        assert all(r.id > row.id for r in singles)
        assert handed[-1] == [(r.id, r.body, 1) for r in singles]
        assert (await spool.stats())["depth"] == 3
    finally:
        await spool.close()


def test_a_meta_reads_as_columns_in_either_stored_form():
    """One event's {c, s, n, i, r} (a dead letter, a JetStream message, a spool
    of 0.x) and a row's columns read alike; columns shorter than the row's
    count (a damaged meta) are padded, so no event goes without one, and an
    event's own meta comes back whole from either form."""
    one = {"c": "canon", "s": "alias", "n": "Signup", "i": "x1", "r": [["$device_id", "d", "canon"]]}
    assert columns(one) == ("canon", "alias", ["Signup"], ["x1"], [None], [[0, "$device_id", "d", "canon"]])
    assert event_metas(one) == [{"c": "canon", "s": "alias", "n": "Signup", "i": "x1", "t": None, "r": [["$device_id", "d", "canon"]]}]
    assert columns({}) == (None, None, [""], [None], [None], [])
    assert columns(None, 2).names == ["", ""]
    row = {"c": "k", "s": "cookie", "n": ["a", "b"], "i": ["1", None], "t": [5.0, None], "r": [[1, "distinct_id", "o", "k"]]}
    cols = columns(row, 3)
    assert (cols.names, cols.insert_ids, cols.times) == (["a", "b", ""], ["1", None, None], [5.0, None, None])
    metas = event_metas(row, 3)
    assert [m["r"] for m in metas] == [[], [["distinct_id", "o", "k"]], []]
    assert [(m["n"], m["i"], m["t"], m["c"]) for m in metas] == [("a", "1", 5.0, "k"), ("b", None, None, "k"), ("", None, None, "k")]


def test_a_requests_events_become_rows_by_project_count_and_bytes():
    """request_rows: consecutive events of one project are one row, at most
    `most` events long; a run over `limit` bytes is cut event by event; each
    row's body is its events' JSON joined by commas (what a batch joins
    again), its columns name them in order, rewrites indexed within the row."""
    events = [{"event": f"e{i}", "properties": {"token": p, "pad": "x" * 40}} for i, p in enumerate("aabaaa")]
    facts = [EventFacts(e["event"], f"id{i}", e["properties"]["token"], 10.0 - i) for i, e in enumerate(events)]
    changes = [[], [("distinct_id", "old", "new")], [], [], [("$device_id", "d", "c")], []]
    regions = {"a": "us", "b": "eu"}
    rows = request_rows("track", True, "mixpanel", events, facts, changes, regions.get, 2, None, "c", "cookie")
    assert [(r.region, r.project, r.count) for r in rows] == [("us", "a", 2), ("eu", "b", 1), ("us", "a", 2), ("us", "a", 1)]
    assert [r.body for r in rows] == [
        b",".join(orjson.dumps(e) for e in events[i:j]) for i, j in ((0, 2), (2, 3), (3, 5), (5, 6))
    ]
    assert [columns(r.info, r.count).names for r in rows] == [["e0", "e1"], ["e2"], ["e3", "e4"], ["e5"]]
    assert columns(rows[0].info, 2).rewrites == [[1, "distinct_id", "old", "new"]]
    assert columns(rows[2].info, 2).rewrites == [[1, "$device_id", "d", "c"]]
    assert [r.event_time for r in rows] == [9.0, 8.0, 6.0, 5.0]  # a row's time: its oldest event's
    assert orjson.loads(rows[1].meta) == {"c": "c", "s": "cookie", "n": "e2", "i": "id2", "r": []}
    # A byte limit two events' JSON exceeds: the run of five a's is cut one event a row.
    one = len(orjson.dumps(events[0]))
    cut = request_rows("track", True, "mixpanel", events[3:], facts[3:], changes[3:], regions.get, 50, one + 1, None, "new")
    assert [(r.count, r.body) for r in cut] == [(1, orjson.dumps(e)) for e in events[3:]]
    assert orjson.loads(cut[1].meta)["r"] == [["$device_id", "d", "c"]]
    # Under a limit that takes them all, one row; no rewrites at all: an empty changes list.
    whole = request_rows("track", False, "mixpanel", events[3:], facts[3:], [], regions.get, 50, 10 * one, None, "new")
    assert [(r.count, r.ip) for r in whole] == [(3, False)] and columns(whole[0].info, 3).rewrites == []
