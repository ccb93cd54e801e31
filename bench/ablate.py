"""Run ``firstparty serve`` with one part of spool mode taken away, to measure
what that part costs (bench/cpu.sh spool-no-sqlite|spool-no-sender). A
benchmark tool only: the events it accepts are NOT durable.

    python bench/ablate.py no-sqlite|no-sender serve --config FILE --port N

no-sqlite: every spool transaction is a no-op that hands out consecutive ids
(the thread hop stays); no-sender: committed rows are never sent or deleted.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy import cli  # noqa: E402
from proxy.services import delivery, spool  # noqa: E402


def without_sqlite() -> None:
    last = [0]

    def transaction(conn, inserts, deletes, dead, attempts):  # type: ignore[no-untyped-def]
        last[0] += len(inserts)
        return last[0]

    spool._transaction = transaction  # type: ignore[assignment]


def without_sender() -> None:
    delivery.Sender.start = lambda self: None  # type: ignore[method-assign]
    delivery.Sender.accept = lambda self, rows: None  # type: ignore[method-assign]
    delivery.Sender.notify = lambda self, region: None  # type: ignore[method-assign]


if __name__ == "__main__":
    what, args = sys.argv[1], sys.argv[2:]
    {"no-sqlite": without_sqlite, "no-sender": without_sender}[what]()
    sys.argv = ["firstparty", *args]
    sys.exit(cli.main())
