"""The live view in a real browser: ``/live`` on the ops listener, open in one
tab while another runs a cross-domain journey (mixpanel-browser on A,
``/mp/go``, B). The live tab shows one group for the visitor with both
domains, the id merged through the bridge token, and the events with their
delivery outcomes; its screenshot is kept (``tests/e2e/artifacts/live.png``,
the one in ``docs/`` was taken the same way)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.conftest import b64_body, device_id, js_event
from tests.e2e.harness import Site, drive, serve_segment_cdn
from tests.fakeupstream import FakeUpstream
from tests.support import (
    A_HOST, B_HOST, FAST, IDS, LANDING, browser_clean, event, go_href, goto, js, serve_workers, wait,
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


# ------------------------------------------------ the live view across two workers

A_URL, B_URL = "https://www.site-a.test", "https://checkout.site-b.test"


async def _on_one_worker(port: int, method: str, path: str, host: str, pids: set[int], **kw: Any) -> Any:
    """One request on a connection of its own (SO_REUSEPORT picks the worker), after a
    /healthz on the same connection that names the worker's pid."""
    headers = {"Host": host, "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/140", **kw.pop("headers", {})}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), cookie_jar=aiohttp.DummyCookieJar()) as s:
        async with s.get(f"http://127.0.0.1:{port}/healthz") as r:
            pids.add((await r.json())["pid"])
        async with s.request(method, f"http://127.0.0.1:{port}{path}", headers=headers, allow_redirects=False, **kw) as r:
            assert r.status in (200, 302), await r.text()
            return r.headers.getall("Set-Cookie", []), r.headers.get("Location"), await r.read()


async def _journey(port: int, pids: set[int], visitor: int) -> None:
    """A visitor tracks on A, follows /mp/go to B, B's land.js redeems the token, and
    both SDKs track on B: each request on whichever worker takes it."""
    form = {"Content-Type": "application/x-www-form-urlencoded"}

    def cookie(set_cookies: list[str]) -> str:
        return next(c.split(";", 1)[0] for c in set_cookies if c.startswith("fp_id="))

    d_a, d_b = device_id(), device_id()
    page_a = js_event("Viewed Pricing", d_a, **{"$current_url": f"{A_URL}/pricing"})
    set_a, _, _ = await _on_one_worker(port, "POST", "/mp/track/?verbose=1&ip=1", "www.site-a.test", pids,
                                       data=b64_body([page_a]), headers=form)
    to = quote(f"{B_URL}/checkout?plan=pro", safe="")
    _, location, _ = await _on_one_worker(port, "GET", f"/mp/go?to={to}", "www.site-a.test", pids,
                                          headers={"Cookie": cookie(set_a)})
    token = location.split("fpb=", 1)[1].split("&", 1)[0]
    set_b, _, _ = await _on_one_worker(port, "POST", "/mp/id", "checkout.site-b.test", pids,
                                       data=f"fpb={token}&ref={quote(A_URL + '/', safe='')}", headers=form)
    events = [js_event("Started Checkout", d_b), js_event("Purchase", d_b, total=30 + visitor)]
    await _on_one_worker(port, "POST", "/mp/track/?verbose=1&ip=1", "checkout.site-b.test", pids,
                         data=b64_body(events), headers={**form, "Cookie": cookie(set_b)})
    call = {"type": "track", "event": "Order Completed", "anonymousId": device_id(), "writeKey": "seg-write-key-us"}
    await _on_one_worker(port, "POST", "/seg/v1/t", "checkout.site-b.test", pids, data=orjson.dumps(call),
                         headers={"Content-Type": "text/plain", "Cookie": cookie(set_b)})


async def test_the_live_view_shows_every_worker(tmp_path: Path, redis_settings: dict[str, str]) -> None:  # noqa: F811
    """Issue 23: the live view with `firstparty serve --workers 2` (the README's
    production setting), open in chromium on the ops listener, shows every request of
    both workers: two visitors crossing from A to B through the bridge, Mixpanel and
    Segment, each event once and forwarded. Its screenshot is the README's
    (``tests/e2e/artifacts/live-workers.png``, copied to ``docs/live-view.png``)."""
    upstream = FakeUpstream()
    serve_segment_cdn(upstream)
    runners = {}
    urls = {}
    for name in ("us", "decide", "cdn", "seg-us", "seg-cdn"):
        runners[name], port = await upstream.serve(name)
        urls[name] = f"http://127.0.0.1:{port}"
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'[server]\ndata_dir = "{tmp_path / "data"}"\nworkers = 2\n'
        f'[upstream]\nus = "{urls["us"]}"\ndecide = "{urls["decide"]}"\ncdn = "{urls["cdn"]}"\n'
        f'[segment]\nus = "{urls["seg-us"]}"\ncdn = "{urls["seg-cdn"]}"\n'
        '[cookie]\nsecure = false\nsecret = "live-workers-secret-live-workers"\n'
        'domains = [".site-a.test", ".site-b.test"]\n'
        '[identity]\nlinked_domains = [".site-a.test", ".site-b.test"]\n'
        "[delivery]\nbatch_window_ms = 20\n"
        f'[store]\nurl = "{redis_settings["url"]}"\n'  # workers share their aliases (README)
    )
    port = 0  # the workers' public port, once they answer
    pids: set[int] = set()
    traffic: asyncio.Task[None] | None = None

    async def go(request: web.Request) -> web.Response:
        """The page is live (the driver asks): send the journeys once, answer 200 when they are in."""
        nonlocal traffic
        if traffic is None:
            traffic = asyncio.ensure_future(asyncio.gather(*(_journey(port, pids, v) for v in range(2))))
        if not traffic.done():
            return web.Response(status=503)
        traffic.result()
        return web.Response(text="sent")

    control = web.Application()
    control.router.add_get("/go", go)
    control_runner = web.AppRunner(control)
    await control_runner.setup()
    await web.TCPSite(control_runner, "127.0.0.1", 0).start()
    control_url = f"http://127.0.0.1:{control_runner.addresses[0][1]}/go"
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "live-workers.png"
    try:
        async with serve_workers(config) as (port, ops_port, _proc):
            run = await drive(
                [
                    {"op": "goto", "url": f"http://127.0.0.1:{ops_port}/live"},
                    {"op": "wait_js", "js": "document.getElementById('status').dataset.state === 'live'"},
                    {"op": "poll", "url": control_url, "timeout_ms": 20000},
                    {"op": "wait_js", "timeout_ms": 15000,
                     "js": "document.querySelectorAll(\"section.group tr[data-outcome='forwarded']\").length >= 8"},
                    js(
                        "return Array.from(document.querySelectorAll('section.group')).map(function (g) { return {"
                        " hosts: Array.from(g.querySelectorAll('.domains .chip')).map(function (c) { return c.dataset.host; }).sort(),"
                        " links: Array.from(g.querySelectorAll('.links li[data-original]')).map(function (l) { return l.dataset.source; }).sort(),"
                        " events: Array.from(g.querySelectorAll('tr')).map(function (r) { return [r.dataset.name, r.dataset.outcome]; }).sort()"
                        " }; });",
                        "groups",
                    ),
                    {"op": "screenshot", "path": str(shot), "width": 1280, "height": 720},
                ]
            )
    finally:
        await control_runner.cleanup()
        for runner in runners.values():
            await runner.cleanup()
    browser_clean(run)
    assert len(pids) == 2, "both workers took part of the journeys"
    assert len(run["groups"]) == 2  # one card per visitor
    for group in run["groups"]:
        assert group["hosts"] == sorted(["www.site-a.test", "checkout.site-b.test"])
        assert group["links"] == ["bridge", "bridge"]  # B's ids (both SDKs') joined through the redeemed token
        assert group["events"] == sorted([
            ["Viewed Pricing", "forwarded"], ["Started Checkout", "forwarded"], ["Purchase", "forwarded"],
            ["Order Completed", "forwarded"],
        ]), group  # every event once, whichever worker took it
    assert shot.stat().st_size > 10_000
