"""The spool's SQLite file: its schema and pragmas, and what happens at open
when the file cannot be read (moved aside, its readable rows salvaged into a
fresh one)."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...files import touch_private

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    route       TEXT NOT NULL,
    region      TEXT NOT NULL,
    project     TEXT,
    ip          INTEGER NOT NULL,      -- 1: the client asked Mixpanel to geolocate
    body        BLOB NOT NULL,         -- the rewritten event, JSON
    meta        BLOB NOT NULL,         -- identity facts for the forwarded log, JSON
    enqueued_at REAL NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    event_time  REAL,                  -- the event's own time (s), for the /track age limit
    protocol    TEXT NOT NULL DEFAULT 'mixpanel',  -- whose wire the body speaks (protocols/)
    count       INTEGER NOT NULL DEFAULT 1  -- events in the row (one request's, of one project)
);
-- No index on region: it would be one more b-tree write per insert and per
-- delete, for the sender's backlog reads, which walk ids in order anyway.
DROP INDEX IF EXISTS queue_region;
CREATE TABLE IF NOT EXISTS dead (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    queue_id    INTEGER NOT NULL,
    route       TEXT NOT NULL,
    region      TEXT NOT NULL,
    project     TEXT,
    ip          INTEGER NOT NULL,
    body        BLOB NOT NULL,
    meta        BLOB NOT NULL,
    enqueued_at REAL NOT NULL,
    attempts    INTEGER NOT NULL,
    reason      TEXT NOT NULL,         -- short class: rejected, too_large, expired, ...
    detail      TEXT NOT NULL,         -- the upstream's own words
    status      INTEGER,               -- upstream HTTP status, if any
    failed_at   REAL NOT NULL,
    protocol    TEXT NOT NULL DEFAULT 'mixpanel',
    event_time  REAL                   -- as queue's: a replayed event is judged on its own age again
);
"""


WAL_SIZE_LIMIT = 16 * 1024 * 1024
_PAGE = 4096  # SQLite's default page size, which the spool keeps

_COLUMNS = "id, route, region, project, ip, body, meta, enqueued_at, attempts, event_time, protocol, count"


def connect(path: Path, fsync: bool = True) -> sqlite3.Connection:
    """Open (and create) the spool database with the pragmas it relies on."""
    touch_private(path)  # 0600, and so its -wal and -shm
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per group.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
    # A new spool gives the pages of deleted rows back to the file system on
    # request (``PRAGMA incremental_vacuum``, run when space is short). SQLite
    # honours this only before the file's first write (even the WAL switch
    # below), so older spools keep their free pages for reuse by new rows
    # (counted as free space).
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    # WAL: appends go to a log, readers (the sender, `firstparty spool stats`)
    # never block the writer and the writer never blocks them.
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: in WAL mode every commit fsyncs the log, so an acknowledged event
    # survives a power cut as well as a kill -9. NORMAL (delivery.fsync = false)
    # only survives the latter: the log reaches the OS at each commit and the
    # disk at checkpoints, sparing an fsync on every acknowledgement.
    conn.execute("PRAGMA synchronous=" + ("FULL" if fsync else "NORMAL"))
    # Another process (the CLI) may hold the write lock for a moment.
    conn.execute("PRAGMA busy_timeout=10000")
    # Temporary b-trees for ORDER BY/IN lists stay in memory, never on disk.
    conn.execute("PRAGMA temp_store=MEMORY")
    # After a checkpoint the WAL is cut back to this size: an outage's backlog,
    # once sent, does not leave a WAL of its size behind on the disk.
    conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
    conn.executescript(SCHEMA)
    for table in ("queue", "dead"):  # spools written before these columns existed
        if "event_time" not in {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN event_time REAL")
    # Spools written before protocols/ existed hold Mixpanel events only.
    for table in ("queue", "dead"):
        if "protocol" not in {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN protocol TEXT NOT NULL DEFAULT 'mixpanel'")
    # Spools written before rows held a request's events hold one event a row.
    if "count" not in {row[1] for row in conn.execute("PRAGMA table_info(queue)")}:
        conn.execute("ALTER TABLE queue ADD COLUMN count INTEGER NOT NULL DEFAULT 1")
    return conn


@dataclass(frozen=True, slots=True)
class Salvage:
    """What opening a spool found: an unreadable file moved aside, and how
    many of its rows were carried into the fresh one."""

    moved_to: Path
    error: str
    queued: int
    dead: int


def check(conn: sqlite3.Connection) -> str | None:
    """None when the database reads as sound, else SQLite's first complaint."""
    try:
        problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
        conn.execute("SELECT COUNT(*) FROM queue").fetchone()
    except sqlite3.DatabaseError as exc:
        return str(exc)
    return None if problems == ["ok"] else "; ".join(problems[:3])


def open_or_salvage(path: Path, fsync: bool = True) -> tuple[sqlite3.Connection, Salvage | None]:
    """The spool at ``path``, or, when SQLite cannot read it (``file is not a
    database``, ``database disk image is malformed``), a fresh spool there
    holding every row that could still be read, the old file (and its WAL)
    renamed ``<name>.corrupt-<UTC time>`` beside it. Never a crash loop for a
    file the operator cannot repair by hand."""
    conn: sqlite3.Connection | None = None
    try:
        conn = connect(path, fsync)
        error = check(conn)
    except sqlite3.DatabaseError as exc:
        error = str(exc)
    if error is None:
        assert conn is not None
        return conn, None
    if conn is not None:
        conn.close()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        old = Path(str(path) + suffix)
        if old.exists():
            old.rename(Path(str(aside) + suffix))
    fresh = connect(path, fsync)
    queued, dead = salvage_into(aside, fresh)
    return fresh, Salvage(aside, error, queued, dead)


def _readable_rows(conn: sqlite3.Connection, table: str, columns: str, chunk: int = 500) -> Iterable[tuple[Any, ...]]:
    """Every row of ``table`` SQLite can still read, in id order, stepping past
    the pages it cannot."""
    try:
        top = conn.execute(f"SELECT MAX(id) FROM {table}").fetchone()[0] or 0
    except sqlite3.DatabaseError:
        try:
            found = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
            top = found[0] if found else 0
        except sqlite3.DatabaseError:
            return
    cursor = 0
    while cursor < top:
        try:
            rows = conn.execute(f"SELECT {columns} FROM {table} WHERE id > ? ORDER BY id LIMIT ?", (cursor, chunk)).fetchall()
        except sqlite3.DatabaseError:
            # A bad page in this stretch: row by row across it, then on.
            for rowid in range(cursor + 1, min(cursor + chunk, top) + 1):
                try:
                    row = conn.execute(f"SELECT {columns} FROM {table} WHERE id = ?", (rowid,)).fetchone()
                except sqlite3.DatabaseError:
                    continue
                if row is not None:
                    yield row
            cursor += chunk
            continue
        if not rows:
            return
        yield from rows
        cursor = rows[-1][0]


_DEAD_COLUMNS = (
    "id, queue_id, route, region, project, ip, body, meta, enqueued_at, attempts, reason, detail, status, failed_at, protocol,"
    " event_time"
)


def salvage_into(old_path: Path, fresh: sqlite3.Connection) -> tuple[int, int]:
    """Copy the readable queued rows and dead letters of ``old_path`` into
    ``fresh`` (queued ids kept, so nothing is sent out of order). Returns
    (queued, dead) counts."""
    try:
        old = sqlite3.connect(f"file:{old_path}?mode=ro", uri=True)
    except sqlite3.DatabaseError:
        return 0, 0
    def copy(table: str, wanted: str) -> int:
        # An older file lacks the newer columns: the fresh spool's defaults fill them.
        try:
            have = {row[1] for row in old.execute(f"PRAGMA table_info({table})")}
        except sqlite3.DatabaseError:
            have = set()
        columns = ", ".join(c for c in wanted.split(", ") if not have or c in have)
        insert = f"INSERT INTO {table} ({columns}) VALUES ({', '.join('?' * (columns.count(',') + 1))})"
        copied = 0
        for row in _readable_rows(old, table, columns):
            try:
                fresh.execute(insert, row)
                copied += 1
            except sqlite3.DatabaseError:
                continue
        return copied

    queued = dead = 0
    try:
        fresh.execute("BEGIN")
        copy("queue", _COLUMNS)
        # Events, not rows: a row may hold a request's several.
        queued = fresh.execute("SELECT COALESCE(SUM(count), 0) FROM queue").fetchone()[0]
        dead = copy("dead", _DEAD_COLUMNS)
        fresh.execute("COMMIT")
    except sqlite3.DatabaseError:
        fresh.execute("ROLLBACK")
        queued = dead = 0
    finally:
        old.close()
    return queued, dead
