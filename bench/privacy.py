"""The privacy controls' cost per event (issue 25): each stage of
``pipeline.privacy`` run on the bench's request (``bench/stages.py``'s
mixpanel-js ``Page View`` events, 26 properties, a ``$current_url`` with a
query string), on and off, in µs per event.

    python bench/privacy.py [events per request, default 10]

The stages are the real functions (``screen``, ``scrub``) over a real
``Exchange`` and the protocol's decoded payload; the context holds only the
rules they read. Each row: best of 5 rounds of N runs, each on a fresh
Exchange decoded before the clock starts (the stages change the events in
place). Target: each control <= 2 µs per event when on, nothing when off.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import stages  # noqa: E402 - the bench's request, beside this script

from proxy.core.bots import BotList  # noqa: E402
from proxy.core.scrub import DEFAULT_SCRUBBED, QueryRule  # noqa: E402
from proxy.pipeline.exchange import Exchange, Visit  # noqa: E402
from proxy.pipeline.privacy import screen, scrub  # noqa: E402
from proxy.protocols.mixpanel import MIXPANEL  # noqa: E402
from proxy.services.metrics import Metrics  # noqa: E402

N = 2_000
CHROME = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"


def context(**rules: Any) -> Any:
    base = {"bots": None, "bot_action": "flag", "query_rule": None, "forward_ip": True,
            "s": SimpleNamespace(metrics=Metrics())}
    return SimpleNamespace(**{**base, **rules})


def best(run: Any, n: int = N) -> float:
    out = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(n):
            run()
        out = min(out, (time.perf_counter() - started) / n)
    return out


def best_stage(stage: Any, c: Any, make: Any, n: int = N) -> float:
    """Best of 5 rounds of ``n`` stage runs, each on a fresh Exchange made
    before the clock starts (the stages change the events in place)."""
    out = float("inf")
    for _ in range(5):
        exchanges = [make() for _ in range(n)]
        started = time.perf_counter()
        for x in exchanges:
            stage(x, c)
        out = min(out, (time.perf_counter() - started) / n)
    return out


def main(events: int) -> None:
    payload = stages.body(events)
    headers = {**stages.HEADERS, "User-Agent": CHROME}

    def exchange() -> Exchange:
        x = Exchange(MIXPANEL, "track", "/track/", Visit(True, headers["Origin"], "www.site-a.test", None, None),
                     headers, "127.0.0.1", "POST", stages.QUERY, "verbose=1&ip=1", 0.0)
        x.payload = MIXPANEL.decode("track", payload, stages.QUERY, headers["Content-Type"], "", 10**7)
        return x

    bots = BotList()
    rows = [
        ("screen, privacy.bots = keep (off)", screen, context()),
        ("screen, flag: a visitor's browser (memo hit)", screen, context(bots=bots)),
        ("scrub, everything off", scrub, context()),
        ("scrub, the default parameter list", scrub, context(query_rule=QueryRule(DEFAULT_SCRUBBED))),
        ("scrub, an allow-list (utm_*)", scrub, context(query_rule=QueryRule((), ("utm_*",)))),
        ("scrub, forward_ip = false", scrub, context(forward_ip=False)),
    ]
    print(f"{events} event(s) per request, N={N}, best of 5; µs per event")
    # A user agent never seen before (a flood of made-up ones): the list is searched.
    fresh = iter(range(10**9))
    cost = best(lambda: bots.kind(f"{CHROME} r{next(fresh)}"), 500)
    print(f"{'screen: a user agent never seen (per request)':<52} {cost * 1e6:6.2f} µs per request")
    for name, stage, c in rows:
        print(f"{name:<52} {best_stage(stage, c, exchange) * 1e6 / events:6.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
