"""``firstparty logs``: the forwarded log, readable, filtered, followed, control characters escaped."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from ..errors import ProxyError
from ..lograte import escape_control
from ..settings import load_settings


def add_parser(sub: Any) -> None:
    logs = sub.add_parser("logs", help="print the forwarded log readably")
    logs.add_argument("--config", "-c", help="settings file, to find the log (log.forwarded)")
    logs.add_argument("--file", help="read this log file instead")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new records")
    logs.add_argument("--id", help="only records whose canonical or original ids include this id")
    logs.add_argument("--event", help="only records with this event name")
    logs.add_argument("--route", help="only records of this route (track, engage, ...)")
    logs.add_argument(
        "--outcome", help="only records with this outcome (forwarded, failed, dead_letter, expired, dropped)"
    )
    logs.add_argument("--json", action="store_true", help="print matching records as JSON lines")


def _records(path: Path, follow: bool) -> Iterator[dict[str, Any]]:
    if not path.exists() and not follow:
        raise ProxyError(f"no forwarded log at {path}; is log.forwarded set as the proxy uses it?")
    while not path.exists():
        time.sleep(0.2)
    fh = open(path, "rb")
    inode = os.fstat(fh.fileno()).st_ino
    try:
        while True:
            line = fh.readline()
            if line.endswith(b"\n"):
                try:
                    yield orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                continue
            if not follow:
                return
            time.sleep(0.2)
            fh.seek(fh.tell() - len(line))  # re-read a partial line when complete
            try:
                if os.stat(path).st_ino != inode:  # rotated: continue with the new file
                    fh.close()
                    fh = open(path, "rb")
                    inode = os.fstat(fh.fileno()).st_ino
            except FileNotFoundError:
                pass
    finally:
        fh.close()


def matches(record: dict[str, Any], args: argparse.Namespace) -> bool:
    if args.route and record.get("route") != args.route:
        return False
    if getattr(args, "outcome", None) and record.get("outcome") != args.outcome:
        return False
    if args.event and args.event not in (record.get("events") or []):
        return False
    if args.id:
        ids = {*(record.get("canonical_ids") or []), *(record.get("original_ids") or [])}
        ids.update(r.get("to") for r in record.get("rewrites") or [])
        if args.id not in ids:
            return False
    return True


def format_record(record: dict[str, Any]) -> str:
    """A record as readable lines; every value from the log is escaped
    (``escape_control``): event names and ids are client text."""
    ts = datetime.fromtimestamp(record.get("time", 0), timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    names = [str(n) for n in record.get("events") or []]
    shown = ", ".join(dict.fromkeys(names)) if names else "-"
    status = record.get("status")
    head = (
        f"{ts} {record.get('outcome', '?'):<11} {record.get('route', '?'):<7} {record.get('region', '?'):<2} "
        f"{status if status is not None else '-':>3} {record.get('latency_ms', 0):>8.1f}ms "
        f"{record.get('count', 0)}x {shown}"
    )
    ids = ", ".join(map(str, record.get("canonical_ids") or [])) or "-"
    sources = ", ".join(map(str, record.get("sources") or [])) or "-"
    second = f"id {ids} ({sources})"
    if record.get("project"):
        second += f"  project {record['project']}"
    if (record.get("attempts") or 1) > 1:
        second += f"  attempts {record['attempts']}"
    if record.get("host"):
        second += f"  host {record['host']}"
    lines = [head, second]
    if record.get("replaced"):
        lines.append(f"replaced {record['replaced']} ({record.get('source', '?')})")
    for r in record.get("rewrites") or []:
        lines.append(f"rewrote {r.get('field')}: {r.get('from')} -> {r.get('to')}")
    if record.get("detail"):
        lines.append(f"{record.get('reason') or 'error'}: {record['detail']}")
    elif record.get("reason"):
        lines.append(str(record["reason"]))
    return "\n    ".join(escape_control(line) for line in lines)


def cmd_logs(args: argparse.Namespace) -> int:
    if args.file:
        path = Path(args.file)
    else:
        path = load_settings(args.config).forwarded_log_path
    out = sys.stdout
    try:
        for record in _records(path, args.follow):
            if matches(record, args):
                out.write((orjson.dumps(record).decode() if args.json else format_record(record)) + "\n")
                if args.follow:
                    out.flush()
    except KeyboardInterrupt:
        pass
    return 0
