"""Run ``firstparty serve`` with one part of spool mode taken away, to measure
what that part costs (bench/cpu.sh spool-no-sqlite|spool-no-sender). A
benchmark tool only: the events it accepts are NOT durable.

    python bench/ablate.py no-sqlite|no-sender|no-delivery-log|no-upstream-call|no-spool|read-only serve --config FILE --port N

no-sqlite: every spool transaction is a no-op that hands out consecutive ids
(the thread hop stays); no-sender: committed rows are never sent or deleted;
no-delivery-log: the sender writes no forwarded-log records; no-upstream-call:
the sender's batches are answered 200 without an HTTP request; no-spool: the
whole pipeline up to the spool (decode, consent, identity, rewrite, cookie),
then the answer, nothing spooled; read-only: our app and route read the body
and answer what the spool would, no pipeline at all (compare with floor-app).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy import cli  # noqa: E402
from proxy.services import delivery  # noqa: E402
from proxy.services.queue import sqlite as spool  # noqa: E402


def without_sqlite() -> None:
    last = [0]

    def transaction(conn, inserts, deletes, dead, attempts):  # type: ignore[no-untyped-def]
        last[0] += len(inserts)
        return last[0]

    spool._transaction = transaction  # type: ignore[assignment]


def without_delivery_log() -> None:
    """The sender sends and deletes, but writes no forwarded-log record."""
    delivery.Sender._log = lambda self, *args, **kwargs: None  # type: ignore[method-assign]


def without_upstream_call() -> None:
    """The sender batches, deletes and logs, but answers its own batches 200 (no HTTP)."""
    from multidict import CIMultiDict, CIMultiDictProxy

    from proxy.services import upstream

    accepted = upstream.UpstreamResponse(200, CIMultiDictProxy(CIMultiDict()), b'{"status":1,"error":null}')

    async def request(self, endpoint, method, target, headers, body=b"", **kwargs):  # type: ignore[no-untyped-def]
        return accepted

    upstream.UpstreamClient.request = request  # type: ignore[method-assign]


def without_spool() -> None:
    import importlib

    from proxy.pipeline.exchange import SPOOLED

    # The module: ``proxy.pipeline``'s own ``deliver`` is the stage function.
    deliver = importlib.import_module("proxy.pipeline.deliver")

    async def spool(x, c):  # type: ignore[no-untyped-def]
        x.accept(SPOOLED, x.protocol.names(x.route, x.events))
        x.answer = x.protocol.accepted(x.verbose)

    deliver.spool = spool  # type: ignore[assignment]


def read_only() -> None:
    from proxy.protocols.mixpanel import MIXPANEL
    from proxy.web import handlers, visit

    def events(self, route, path, protocol=MIXPANEL):  # type: ignore[no-untyped-def]
        async def handle(request):  # type: ignore[no-untyped-def]
            await request.read()
            return visit.answer(protocol.accepted(True))

        return handle

    handlers.Proxy.events = events  # type: ignore[method-assign]


def without_sender() -> None:
    delivery.Sender.start = lambda self: None  # type: ignore[method-assign]
    delivery.Sender.accept = lambda self, rows: None  # type: ignore[method-assign]
    delivery.Sender.notify = lambda self, region: None  # type: ignore[method-assign]


ABLATIONS = {
    "no-sqlite": without_sqlite,
    "no-sender": without_sender,
    "no-delivery-log": without_delivery_log,
    "no-upstream-call": without_upstream_call,
    "no-spool": without_spool,
    "read-only": read_only,
}

if __name__ == "__main__":
    what, args = sys.argv[1], sys.argv[2:]
    ABLATIONS[what]()
    sys.argv = ["firstparty", *args]
    sys.exit(cli.main())
