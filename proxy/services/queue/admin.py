"""The operator's side of the SQLite spool (``firstparty spool``, ``replay``):
figures, and dead letters moved back into the queue. Runs beside a serving
proxy (WAL: readers never block its writer)."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

def stats_of(c: sqlite3.Connection) -> dict[str, Any]:
    """Depth, oldest age and dead letters by reason (also used by the CLI)."""
    depth, oldest = c.execute("SELECT COALESCE(SUM(count), 0), MIN(enqueued_at) FROM queue").fetchone()
    by_region = dict(c.execute("SELECT region, SUM(count) FROM queue GROUP BY region").fetchall())
    dead = dict(c.execute("SELECT reason, COUNT(*) FROM dead GROUP BY reason").fetchall())
    return {
        "depth": depth,
        "oldest_age_seconds": round(time.time() - oldest, 3) if oldest else 0.0,
        "depth_by_region": by_region,
        "dead_letters": sum(dead.values()),
        "dead_by_reason": dead,
    }


def replay(c: sqlite3.Connection, reason: str | None = None) -> int:
    """Move dead letters (all, or those with ``reason``) back into the queue."""
    where, args = ("WHERE reason = ?", (reason,)) if reason else ("", ())
    c.execute("BEGIN IMMEDIATE")
    try:
        moved = c.execute(
            "INSERT INTO queue (route, region, project, ip, body, meta, enqueued_at, attempts, protocol, event_time)"
            f" SELECT route, region, project, ip, body, meta, ?, 0, protocol, event_time FROM dead {where} ORDER BY id",
            (time.time(), *args),
        ).rowcount
        c.execute(f"DELETE FROM dead {where}", args)
        c.execute("COMMIT")
    except BaseException:
        c.execute("ROLLBACK")
        raise
    return moved
