"""``firstparty spool check|stats`` and ``replay``: the durable queue from outside the proxy."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

import orjson

from ..errors import ProxyError
from ..settings import load_settings
from .serve import worker_spool


def add_parser(sub: Any) -> None:
    spool = sub.add_parser("spool", help="inspect the durable spool")
    spool_sub = spool.add_subparsers(dest="spool_command", required=True)
    spool_check = spool_sub.add_parser("check", help="verify every spool file offline (exit 1 if one is unreadable)")
    spool_check.add_argument("--config", "-c", help="settings file, to find the spool (delivery.spool_path)")
    stats = spool_sub.add_parser("stats", help="depth, oldest age, dead letters by reason")
    stats.add_argument("--config", "-c", help="settings file, to find the spool (delivery.spool_path)")
    stats.add_argument("--json", action="store_true", help="print as JSON")

    replay = sub.add_parser("replay", help="move dead letters back into the queue (after fixing their cause)")
    replay.add_argument("--config", "-c", help="settings file, to find the spool (delivery.spool_path)")
    replay.add_argument("--reason", help="only dead letters with this reason (e.g. rejected, http_401)")


def _spool_files(args: argparse.Namespace) -> list[Path]:
    """The spool of every worker (``spool.sqlite3``, ``spool-1.sqlite3``...)."""
    base = load_settings(args.config).spool_path
    files = [p for p in (worker_spool(base, i) for i in range(64)) if p.exists()]
    if not files:
        raise ProxyError(f"no spool at {base}; is delivery.spool_path set as the proxy uses it?")
    return files


def cmd_spool_check(args: argparse.Namespace) -> int:
    """SQLite's integrity check of every spool file, read-only: the proxy need
    not be stopped. A bad file is replaced (and salvaged) at the next start."""
    import sqlite3

    bad = 0
    for path in _spool_files(args):
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
                problems = [row[0] for row in conn.execute("PRAGMA integrity_check(20)")]
        except sqlite3.DatabaseError as exc:
            problems = [str(exc)]
        if problems == ["ok"]:
            print(f"ok       {path}")
            continue
        bad += 1
        print(f"corrupt  {path}: {'; '.join(problems[:5])}")
        print("         the next start moves it aside and salvages every readable row into a fresh spool")
    return 1 if bad else 0


async def _jetstream(args: argparse.Namespace, work: Any) -> Any:
    """``work(queue)`` on the configured JetStream queue (``delivery.queue = "jetstream"``)."""
    from ..services.queue.jetstream import JetStreamQueue
    from ..services.upstream import SEGMENT_PREFIX
    from ..settings import REGIONS, SEGMENT_REGIONS

    settings = load_settings(args.config)
    queue = JetStreamQueue(settings.delivery, [*REGIONS, *(SEGMENT_PREFIX + r for r in SEGMENT_REGIONS)])
    await queue.open()
    try:
        return await work(queue)
    finally:
        await queue.close()


def _jetstream_stats(args: argparse.Namespace) -> dict[str, Any]:
    async def work(queue: Any) -> dict[str, Any]:
        stats = await queue.stats()
        stats["dead_by_reason"] = await queue.dead_by_reason()
        stats["files"] = [f"stream {queue.stream} on {queue.settings.nats_url}"]
        return stats

    import asyncio

    return asyncio.run(_jetstream(args, work))


def cmd_spool_stats(args: argparse.Namespace) -> int:
    from ..services.queue.admin import stats_of
    from ..services.queue.sqlfile import connect

    stats: dict[str, Any] = {"depth": 0, "oldest_age_seconds": 0.0, "depth_by_region": {}, "dead_letters": 0,
                             "dead_by_reason": {}, "files": []}
    if load_settings(args.config).delivery.queue == "jetstream":
        stats = _jetstream_stats(args)
    for path in _spool_files(args) if not stats["files"] else []:
        with contextlib.closing(connect(path)) as conn:
            one = stats_of(conn)
        stats["files"].append(str(path))
        stats["depth"] += one["depth"]
        stats["dead_letters"] += one["dead_letters"]
        stats["oldest_age_seconds"] = max(stats["oldest_age_seconds"], one["oldest_age_seconds"])
        for key in ("depth_by_region", "dead_by_reason"):
            for name, n in one[key].items():
                stats[key][name] = stats[key].get(name, 0) + n
    if args.json:
        print(orjson.dumps(stats).decode())
        return 0
    print(f"queued:      {stats['depth']} events")
    for region, n in sorted(stats["depth_by_region"].items()):
        print(f"  {region}: {n}")
    print(f"oldest:      {stats['oldest_age_seconds']:.1f} s")
    print(f"dead letters: {stats['dead_letters']}")
    for reason, n in sorted(stats["dead_by_reason"].items()):
        print(f"  {reason}: {n}")
    if len(stats["files"]) > 1:
        print(f"spool files: {len(stats['files'])} (one per worker)")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from ..services.queue.admin import replay
    from ..services.queue.sqlfile import connect

    moved = 0
    if load_settings(args.config).delivery.queue == "jetstream":
        import asyncio

        async def work(queue: Any) -> int:
            return await queue.replay(args.reason)

        moved = asyncio.run(_jetstream(args, work))
    for path in _spool_files(args) if load_settings(args.config).delivery.queue != "jetstream" else []:
        with contextlib.closing(connect(path)) as conn:
            moved += replay(conn, args.reason)
    what = f" with reason {args.reason!r}" if args.reason else ""
    print(f"moved {moved} dead letter{'s' if moved != 1 else ''}{what} back into the queue")
    return 0
