"""Quiet logs under repeated faults: one line per condition per minute, with
the count of those held back; an outage at full traffic stays a handful of lines."""

from __future__ import annotations

import logging

from proxy.lograte import Throttled
from tests.conftest import BROWSER, b64_body, device_id, js_event, make_settings
from tests.support import metric, port_of, reserve_port


def test_one_line_per_condition_per_interval_with_counts(caplog):
    now = [100.0]
    throttled = Throttled(logging.getLogger("t"), every=60, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="t")
    wrote = [throttled.warning(("retry", "us"), "upstream %s down", "us") for _ in range(50)]
    assert wrote == [True] + [False] * 49
    assert throttled.warning(("retry", "eu"), "upstream %s down", "eu")  # another condition: its own line
    now[0] += 61
    assert throttled.warning(("retry", "us"), "upstream %s down", "us")
    assert [r.getMessage() for r in caplog.records] == [
        "upstream us down",
        "upstream eu down",
        "upstream us down (49 more like it in the last 61 s)",
    ]


async def test_a_vendor_outage_under_load_writes_one_line(serve_proxy, tmp_path, upstream, caplog):
    from proxy.web.app import create_app

    down = reserve_port()
    caplog.set_level(logging.WARNING)
    settings = make_settings(tmp_path, upstream, upstream={"us": f"http://127.0.0.1:{port_of(down)}"},
                             delivery={"mode": "spool", "batch_size": 5, "backoff_initial_seconds": 0.05,
                                       "backoff_max_seconds": 0.1})
    client = await serve_proxy(create_app(settings))
    form = {**BROWSER, "Content-Type": "application/x-www-form-urlencoded"}
    for _ in range(20):  # 100 events, 20 batches of 5, each failing again and again
        resp = await client.post("/mp/track/", data=b64_body([js_event("e", device_id()) for _ in range(5)]), headers=form)
        assert resp.status == 200

    async def retried_a_lot() -> bool:
        text = await (await client.ops_get("/metrics")).text()
        return metric(text, 'firstparty_delivery_outcomes_total{outcome="retry",route="track"}') >= 200

    from tests.support import eventually_async

    await eventually_async(retried_a_lot, 20, "many failed sends")
    lines = [r.getMessage() for r in caplog.records if r.name == "proxy.services.delivery"]
    assert len(lines) == 1 and "upstream us:" in lines[0] and "unreachable" in lines[0], lines
    await client.close()
    down.close()
