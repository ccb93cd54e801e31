"""The forwarded log: one JSON line per forwarded request.

Records are buffered in memory and written by a background flusher (every
``FLUSH_SECONDS`` or when the buffer is large), so the request path never
waits on the disk. The file rotates by size: ``forwarded.jsonl`` ->
``forwarded.jsonl.1`` -> ... -> ``.<backups>``; with a retention
(``log.retention_days``) it also rotates once a day, and a rotated file is
removed once its last line is older than the retention: no line outlives
it by more than the day it was written in.

Invariants: records hold ids, event names, routes, statuses and timings;
never cookies, authorization headers, secrets or the client IP. A record is
bounded (``MAX_LISTED`` items per list; past ``MAX_RECORD_BYTES``, every
string cut to ``MAX_FIELD_CHARS``), so no request can rotate the history
away. The file is private (``files``: ``0600``, its directory ``0700``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import orjson

from ..files import open_private, private_dir

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.2
ROTATE_SECONDS = 86400.0  # with a retention: a new file at least daily
EXPIRE_EVERY_SECONDS = 3600.0  # how often rotated files are checked against it
FLUSH_BYTES = 256 * 1024
# A record lists at most this many event names, ids and rewrites.
MAX_LISTED = 50
# A record longer than this has each of its strings cut to MAX_FIELD_CHARS:
# an event name or a project token is client text of any length.
MAX_RECORD_BYTES = 16 * 1024
MAX_FIELD_CHARS = 256


def _clip(value: Any) -> Any:
    if isinstance(value, str):
        return value if len(value) <= MAX_FIELD_CHARS else value[:MAX_FIELD_CHARS] + "\u2026"
    if isinstance(value, list):
        return [_clip(v) for v in value]
    if isinstance(value, dict):
        return {k: _clip(v) for k, v in value.items()}
    return value


def outcome_record(
    outcome: str,
    route: str,
    project: str | None,
    names: list[str],
    *,
    region: str | None = None,
    status: int | None = None,
    insert_ids: Sequence[str | None] | None = None,
    canonical_ids: list[str] | None = None,
    sources: list[str] | None = None,
    rewrites: Sequence[Sequence[str]] | None = None,
    attempts: int = 0,
    latency: float | None = None,
    queued: float | None = None,
    reason: str | None = None,
    detail: str | None = None,
) -> dict[str, Any]:
    """The one shape of an outcome record, whoever writes it: the pipeline for
    a request it forwarded or dropped, the sender for a batch it delivered,
    buried or retried. ``rewrites``: (field, original, canonical) triples."""
    rewrites = rewrites or []
    entry: dict[str, Any] = {
        "time": time.time(),
        "outcome": outcome,
        "route": route,
        "region": region,
        "project": project,
        "events": names[:MAX_LISTED],
        "count": len(names),
        "insert_ids": (insert_ids or [])[:MAX_LISTED],
        "canonical_ids": canonical_ids or [],
        "sources": sources or [],
        "original_ids": sorted({r[1] for r in rewrites})[:MAX_LISTED],
        "rewrites": [{"field": f, "from": o, "to": c} for f, o, c in rewrites[:MAX_LISTED]],
        "status": status,
        "attempts": attempts,
        "latency_ms": None if latency is None else round(latency * 1000, 3),
    }
    if queued is not None:
        entry["queued_ms"] = round(queued * 1000, 1)
    if reason or detail:
        entry["reason"] = reason
        entry["detail"] = (detail or "")[:500]
    return entry


class ForwardedLog:
    def __init__(self, path: Path, *, max_bytes: int, backups: int, retention_days: int = 0) -> None:
        self.path = path
        self._max_bytes = max_bytes
        self._backups = backups
        self._retention = retention_days * 86400.0
        self._began = 0.0  # when the current file's first line was written (0: it has none)
        self._expired_at = 0.0
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._fh: Any = None
        self._size = 0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def open(self) -> None:
        private_dir(self.path.parent)
        self._fh = os.fdopen(open_private(self.path, os.O_WRONLY | os.O_APPEND), "ab")
        self._size = self._fh.seek(0, os.SEEK_END)
        self._began = self._first_line_time() if self._size else 0.0
        self._expire(time.time())

    def _first_line_time(self) -> float:
        """When the file's first record was written (its ``time``; now if unreadable)."""
        try:
            with open(self.path, "rb") as fh:
                first = orjson.loads(fh.readline())
            return float(first["time"])
        except (OSError, ValueError, KeyError, TypeError):
            return time.time()

    def record(self, entry: dict[str, Any]) -> None:
        line = orjson.dumps(entry) + b"\n"
        if len(line) > MAX_RECORD_BYTES:  # rare: only then is every string looked at
            line = orjson.dumps(_clip(entry)) + b"\n"
        self._buffer.append(line)
        self._buffered += len(line)
        if self._buffered >= FLUSH_BYTES:
            self._wake.set()

    def flush(self) -> None:
        """Write out everything buffered (synchronously: a page-cache write)."""
        if not self._buffer or self._fh is None:
            return
        data = b"".join(self._buffer)
        self._buffer.clear()
        self._buffered = 0
        now = time.time()
        try:
            if self._size and (
                self._size + len(data) > self._max_bytes or (self._retention and now - self._began >= ROTATE_SECONDS)
            ):
                self._rotate()
                self._expire(now)
            if not self._size:
                self._began = now
            self._fh.write(data)
            self._fh.flush()
            self._size += len(data)
        except OSError as exc:
            log.error("cannot write the forwarded log %s: %s", self.path, exc)

    def housekeeping(self, now: float) -> None:
        """With a retention, hourly: a file begun more than a day ago rotates even
        when nothing is written (no traffic), and rotated files past it go."""
        if self._retention and self._size and self._fh is not None and now - self._began >= ROTATE_SECONDS:
            try:
                self._rotate()
            except OSError as exc:
                log.error("cannot rotate the forwarded log %s: %s", self.path, exc)
        self._expire(now)

    def _rotate(self) -> None:
        self._fh.close()
        if self._backups:
            for i in range(self._backups - 1, 0, -1):
                src = self.path.with_name(f"{self.path.name}.{i}")
                if src.exists():
                    os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        self._fh = os.fdopen(open_private(self.path, os.O_WRONLY | os.O_APPEND), "ab")
        self._size = 0

    def _expire(self, now: float) -> None:
        """Rotated files whose last line is older than the retention, removed."""
        self._expired_at = now
        if not self._retention:
            return
        for i in range(1, self._backups + 1):
            rotated = self.path.with_name(f"{self.path.name}.{i}")
            try:
                if rotated.stat().st_mtime < now - self._retention:
                    rotated.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.error("cannot remove the expired forwarded log %s: %s", rotated, exc)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), FLUSH_SECONDS)
            self._wake.clear()
            self.flush()
            now = time.time()
            if self._retention and now - self._expired_at >= EXPIRE_EVERY_SECONDS:
                self.housekeeping(now)

    def start(self) -> None:
        self.open()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.flush()
        if self._fh:
            self._fh.close()
            self._fh = None
