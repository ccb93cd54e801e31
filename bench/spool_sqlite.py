"""SQLite's share of spool mode, alone: CPU of the spool thread per event for
group commits of ``--group`` events (insert + range delete of the previous
group, as the sender's acknowledgements do), with and without fsync, 4 kB and
8 kB pages, and deletes every commit or every 5 / 20. Run it twice:
the first run in a process is slower.

    python bench/spool_sqlite.py [--group 30] [--commits 600]

Writes to a temporary directory on the disk the spool would use (the cwd's);
prints CPU µs per event (time.thread_time) and wall µs per event.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.services.queue.rows import NewRow  # noqa: E402

from proxy.services.queue.sqlfile import connect

from proxy.services.queue.sqlite import _transaction

# A mixpanel-js-sized event (~1.3 kB) and its identity meta.
BODY = b'{"event":"Page View","properties":{' + b''.join(b'"k%d":"%s",' % (i, b"v" * 36) for i in range(28)) + b'"z":1}}'
META = b'{"c":"abd90ea4-581a-43e7-84ee-6dbc899f1625","s":"cookie","n":"Page View","i":"abcdefgh12345678","r":[]}'


def run(label: str, *, group: int, commits: int, fsync: bool = True, page: int = 4096, delete_every: int = 1) -> None:
    with tempfile.TemporaryDirectory(dir=".") as d:
        path = Path(d) / "spool.sqlite3"
        if page != 4096:
            with sqlite3.connect(path) as c:
                c.execute(f"PRAGMA page_size={page}")
        conn = connect(path, fsync=fsync)
        if not fsync:
            conn.execute("PRAGMA synchronous=OFF")
        rows = [(NewRow("track", "us", "tok", True, BODY, META, 1.0), time.time()) for _ in range(group)]
        acked: list[int] = []
        cpu0, wall0 = time.thread_time(), time.perf_counter()
        for i in range(commits):
            deletes = acked if i % delete_every == 0 else []
            if deletes:
                acked = []
            last = _transaction(conn, rows, deletes, [], [])
            acked += range(last - group + 1, last + 1)
        cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
        conn.close()
        n = commits * group
        print(f"{label:36s} {1e6 * cpu / n:6.2f} µs CPU/event   {1e6 * wall / n:6.1f} µs wall/event")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group", type=int, default=30, help="events per group commit")
    parser.add_argument("--commits", type=int, default=600)
    a = parser.parse_args()
    print(f"{len(BODY)}-byte events, {a.group} per group commit, {a.commits} commits")
    run("warm-up (not a result)", group=a.group, commits=a.commits // 4)
    run("fsync, 4 kB pages (the spool's)", group=a.group, commits=a.commits)
    run("fsync, 8 kB pages", group=a.group, commits=a.commits, page=8192)
    run("no fsync, 4 kB pages", group=a.group, commits=a.commits, fsync=False)
    run("no fsync, 8 kB pages", group=a.group, commits=a.commits, fsync=False, page=8192)
    run("fsync, deletes every 5 commits", group=a.group, commits=a.commits, delete_every=5)
    run("fsync, deletes every 20 commits", group=a.group, commits=a.commits, delete_every=20)


if __name__ == "__main__":
    main()
