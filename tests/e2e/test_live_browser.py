"""The live view in a real browser: ``/live`` on the ops listener, open in one
tab while another runs a cross-domain journey (mixpanel-browser on A,
``/mp/go``, B). The live tab shows one group for the visitor with both
domains, the id merged through the bridge token, and the events with their
delivery outcomes; its screenshot is kept (``tests/e2e/artifacts/live.png``,
the one in ``docs/`` was taken the same way)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.harness import Site, drive
from tests.e2e.test_browser import event, goto, js, wait
from tests.e2e.test_crossdomain_browser import (  # noqa: F401 (fixtures)
    A_HOST,
    B_HOST,
    FAST,
    IDS,
    LANDING,
    browser_clean,
    dead_port,
    go_href,
    xsite,
)

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@pytest.mark.parametrize("xsite", [{"mode": "spool"}], indirect=True, ids=["spool"])
async def test_live_view_shows_a_journey_across_domains(xsite: Site) -> None:
    site = xsite
    a = site.page("a", FAST, body=f'<a id="go" href="{go_href(site)}">Checkout</a>')
    site.page("b", FAST)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "live.png"
    run = await drive(
        [
            {"op": "goto", "url": site.ops_url("/live")},
            {"op": "wait_js", "js": "document.getElementById('status').dataset.state === 'live'"},
            {"op": "new_page"},
            goto(site, A_HOST, a),
            js(f"mixpanel.track('Page A'); return {IDS};", "a"),
            wait("/mp/track/", event("Page A")),
            {"op": "click", "selector": "#go"},
            {"op": "wait_url", "pattern": LANDING},
            js("mixpanel.track('Page B'); mixpanel.track('Purchase', {total: 30});"),
            wait("/mp/track/", event("Purchase")),
            {"op": "use_page", "page": 0},
            # Both domains, and every event forwarded (the sender's outcome, updated in place).
            {"op": "wait_js", "timeout_ms": 15000,
             "js": "document.querySelectorAll(\"section.group tr[data-outcome='forwarded']\").length >= 3"},
            js(
                "var g = document.querySelector(\"section.group\");"
                " return {canonical: g.dataset.canonical,"
                " groups: document.querySelectorAll('section.group').length,"
                " hosts: Array.from(g.querySelectorAll('.domains .chip')).map(function (c) { return c.dataset.host; }),"
                " links: Array.from(g.querySelectorAll('.links li[data-original]')).map(function (l) { return l.dataset.source; }),"
                " origin: g.querySelector('.links li').dataset.source,"
                " events: Array.from(g.querySelectorAll('tr')).map(function (r) { return [r.dataset.name, r.dataset.host, r.dataset.outcome]; }),"
                " marks: g.querySelectorAll('svg.strip rect[data-host]').length,"
                " text: document.body.innerText};",
                "live",
            ),
            {"op": "screenshot", "path": str(shot), "width": 1280, "height": 640},
        ]
    )
    browser_clean(run)
    live = run["live"]
    canonical = run["a"]["device"]  # A's device id, first come
    assert live["groups"] == 1 and live["canonical"] == canonical
    assert sorted(live["hosts"]) == sorted([A_HOST, B_HOST])
    assert live["origin"] == "new" and live["links"] == ["bridge"]  # B's own device id, merged through the token
    assert sorted(live["events"]) == sorted([
        ["Page A", A_HOST, "forwarded"], ["Page B", B_HOST, "forwarded"], ["Purchase", B_HOST, "forwarded"],
    ])
    assert live["marks"] == 3  # the journey strip: one mark per event, coloured by domain
    # No IPs, cookie values or tokens on the page.
    assert "127.0.0.1" not in live["text"] and "fpb" not in live["text"] and "fp_id" not in live["text"]
    assert shot.stat().st_size > 10_000
