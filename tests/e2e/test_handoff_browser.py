"""Identity hand-offs in a real browser: mixpanel-browser in headless chromium, the
real proxy app serving every host, the recording fake Mixpanel behind it.

1. The hub with a link that copies the query string: site A's server renders its
   links with A's own query string (many sites keep UTM parameters that way), so
   the link holds A's hub token. hub.js sends the click through /mp/go, whose
   fresh token replaces the copied one: B redeems it with no trip to the hub, and
   both domains end on one id; no token is left in either address bar.
2. App to web: the app's backend asks POST /mp/bridge with its server key for a
   link carrying the app's device id; the browser opens it on B (land.js): B's
   events carry the app's id, and the address bar loses the token.
3. A widget: a page on A embeds an iframe from B; frame.js on both sides hands a
   fresh token to the iframe's exact origin by postMessage; the widget's events
   carry A's canonical id and its id is kept in a partitioned cookie (CHIPS), with
   chromium blocking third-party cookies. An iframe from an unlinked origin gets
   nothing.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import TOKEN, canonical_of, device_id, make_settings
from proxy.core.apikeys import generate_key_line
from proxy.web.app import create_app
from tests.e2e.conftest import COOKIE, CORS
from tests.e2e.harness import TLS_ARGS, Site, add_site_routes, drive, tls_context
from tests.fakeupstream import FakeUpstream
from tests.support import (
    A_HOST, B_HOST, FAST, HUB_HOST, IDS, SEARCH, assert_no_token_upstream, assert_one_identity,
    browser_clean, event, goto, js, observe, one_cookie, sent_events, settled, token_metrics, wait,
)

pytestmark = pytest.mark.browser

HUB_JS = '<script src="/mp/hub.js"></script>'
LAND_JS = '<script src="/mp/land.js"></script>'
FRAME_JS = '<script src="/mp/frame.js"></script>'
WIDGET_HOST = "widget.site-b.test"
STRANGER_HOST = "widget.stranger.test"
HREF = "Object.assign(" + IDS + ", {href: location.href})"
LOADED = {"op": "wait_js", "js": "window.__e2e && window.__e2e.loaded"}


def landing_pattern(host: str, path: str, rest: str = "") -> str:
    return rf"^http://{re.escape(host)}:\d+{re.escape(path)}\?fpb=([A-Za-z0-9_-]+){re.escape(rest)}$"


# ------------------------------------------------------ 1. a copied query string


@pytest.mark.parametrize("xsite", [{"hub": "up"}], indirect=True, ids=["hub"])
async def test_a_link_copying_the_query_string_still_ends_with_one_id(xsite: Site) -> None:
    site = xsite
    b = site.page("hb", FAST, head=HUB_JS, hub_ready=True)
    a_path = "/e2e/hq"
    b_base = site.url(B_HOST, b)

    async def page_a(request: web.Request) -> web.Response:
        # What a server-rendered site does: its links keep the page's query string.
        query = request.query_string
        link = b_base + ("?" + query if query else "")
        html = site.pages["hq-template"].replace("__LINK__", link)
        return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-store"})

    site.page("hq-template", FAST, head=HUB_JS, hub_ready=True, body='<a id="tob" href="__LINK__">to B</a>')
    site.routes[a_path] = page_a
    a_url = site.url(A_HOST, a_path) + "?utm_source=news"
    run = await drive(
        [
            {"op": "goto", "url": a_url, "wait_until": "commit", "referer": SEARCH},
            {"op": "wait_landing", "pattern": landing_pattern(A_HOST, a_path, "&utm_source=news"), "save": "a_landing"},
            LOADED,
            js(f"mixpanel.track('Page A'); return Object.assign({HREF}, {{link: document.getElementById('tob').href}});", "a"),
            wait("/mp/track/", event("Page A")),
            {"op": "click", "selector": "#tob", "wait_until": "commit"},
            # hub.js sends the click through /mp/go, whose token replaces the copied one.
            {"op": "wait_landing", "pattern": landing_pattern(B_HOST, b, "&utm_source=news"), "save": "b_landing"},
            LOADED,
            js(f"mixpanel.track('Page B'); return {HREF};", "b"),
            wait("/mp/track/", event("Page B")),
            {"op": "cookies", "save": "cookies"},
        ]
    )
    observe(run, "copied query string")
    browser_clean(run)
    (a_token,) = re.match(landing_pattern(A_HOST, a_path, "&utm_source=news"), run["a_landing"]).groups()
    # A's link copied A's hub token (the site's own query string)...
    assert f"fpb={a_token}" in run["a"]["link"]
    # ...but the click left through /mp/go (hub.js decorates links as link.js does):
    # its fresh token replaced the copied one, and B needed no trip to the hub.
    (b_token,) = re.match(landing_pattern(B_HOST, b, "&utm_source=news"), run["b_landing"]).groups()
    assert b_token != a_token
    paths = [urlsplit(d["url"]).path for d in run.documents]
    assert paths == [a_path, "/hub/resolve", a_path, "/mp/go", b], run.describe()
    # No token left in either address bar; the rest of the query kept.
    assert run["a"]["href"] == a_url
    assert run["b"]["href"] == b_base + "?utm_source=news"

    canonical = canonical_of(one_cookie(run, "cookies", "fp_hub", HUB_HOST)["value"])
    for domain in (".site-a.test", ".site-b.test"):
        assert canonical_of(one_cookie(run, "cookies", "fp_id", domain)["value"]) == canonical
    events = await settled(site, ["Page A", "Page B"])
    assert_one_identity(events, canonical)
    assert all("fpb" not in e["properties"]["$current_url"] for e in sent_events(run))
    assert_no_token_upstream(site, [a_token, b_token], canonical)
    counts = await token_metrics(site)
    assert (counts.get("redeemed_hub"), counts.get("redeemed_bridge")) == (1, 1) and not counts.get("invalid"), counts


# --------------------------------------------------------------- 2. app to web


@pytest.fixture
async def server_key_site(tmp_path: Path, upstream: FakeUpstream) -> Any:
    """The proxy with one server key for the app's backend; (site, key)."""
    line = generate_key_line("ios-app")
    (tmp_path / "api_keys").write_text(line + "\n")
    identity = {"linked_domains": [".site-a.test", ".site-b.test"], "api_keys_file": str(tmp_path / "api_keys")}
    settings = make_settings(tmp_path, upstream, cookie=COOKIE, cors=CORS, identity=identity)
    site = Site(port=0, upstream=upstream, token=TOKEN, app=create_app(settings), mode=settings.delivery.mode)
    add_site_routes(site)
    await site.start()
    yield site, line.split()[1]
    await site.stop()


async def test_an_app_link_opens_the_web_under_the_apps_id(server_key_site: tuple[Site, str]) -> None:
    site, key = server_key_site
    b = site.page("welcome", FAST, head=LAND_JS, ready="firstpartyLanding")
    app_device = device_id()
    async with aiohttp.ClientSession() as session:  # the app's backend
        async with session.post(
            f"http://127.0.0.1:{site.port}/mp/bridge",
            json={"to": site.url(B_HOST, b) + "?ref=app", "device_id": app_device},
            headers={"Authorization": f"Bearer {key}", "Host": B_HOST},
        ) as resp:
            assert resp.status == 200, await resp.text()
            link = (await resp.json())["url"]
    run = await drive(
        [
            {"op": "goto", "url": link},
            LOADED,
            js(f"mixpanel.track('Opened from app'); return {HREF};", "b"),
            wait("/mp/track/", event("Opened from app")),
            {"op": "cookies", "save": "cookies"},
        ]
    )
    observe(run, "app to web")
    browser_clean(run)
    assert run["b"]["href"] == site.url(B_HOST, b) + "?ref=app"  # land.js cleaned it
    assert run["b"]["device"] != app_device  # the SDK minted its own...
    assert canonical_of(one_cookie(run, "cookies", "fp_id", ".site-b.test")["value"]) == app_device
    events = await settled(site, ["Opened from app"])
    assert_one_identity(events, app_device)  # ...and the proxy joined it to the app's
    assert_no_token_upstream(site, [link.split("fpb=")[1].split("&")[0]], app_device)
    counts = await token_metrics(site)
    assert counts.get("issued_app") == 1 and counts.get("redeemed_app") == 1, counts


# ------------------------------------------------------------------ 3. widgets


# Chromium blocking third-party cookies, as Safari and Firefox do by default: only a
# partitioned cookie is kept inside the iframe. Partitioned cookies need https, so
# this journey is served over TLS (a self-signed certificate chromium is told to accept).
NO_THIRD_PARTY = ["--test-third-party-cookie-phaseout"]


@pytest.fixture
async def tls_site(tmp_path: Path, upstream: FakeUpstream) -> Any:
    """The proxy with the test pages over https, linked domains .site-a.test and .site-b.test."""
    identity = {"linked_domains": [".site-a.test", ".site-b.test"]}
    settings = make_settings(tmp_path, upstream, cookie=COOKIE, cors=CORS, identity=identity)
    site = Site(port=0, upstream=upstream, token=TOKEN, app=create_app(settings), mode=settings.delivery.mode)
    add_site_routes(site)
    await site.start(ssl_context=tls_context(tmp_path, ["site-a.test", "site-b.test", "stranger.test"]))
    yield site
    await site.stop()


async def test_a_widget_in_an_iframe_shares_the_parents_id(tls_site: Site) -> None:
    site = tls_site
    widget = site.page("widget", FAST, head=FRAME_JS, ready="firstpartyFrame", post="mixpanel.track('Widget view');")
    parent = site.page(
        "parent", FAST, head=FRAME_JS,
        body=f'<iframe id="w" src="{site.url(WIDGET_HOST, widget)}"></iframe>'
             f'<iframe id="s" src="{site.url(STRANGER_HOST, "/e2e/stranger")}"></iframe>'
             '<script>window.addEventListener("message", function (ev) {'
             ' if (ev.data && ev.data.stranger) window.strangerGot = ev.data.got; });</script>',
    )
    site.pages["stranger"] = STRANGER
    run = await drive(
        [
            goto(site, A_HOST, parent),
            js(f"mixpanel.track('Parent view'); return {IDS};", "a"),
            wait("/mp/track/", event("Parent view")),
            wait("/mp/track/", event("Widget view")),
            {"op": "wait_js", "js": "window.strangerGot !== undefined"},
            js("return window.strangerGot;", "stranger"),
            {"op": "cookies", "save": "cookies"},
        ],
        args=TLS_ARGS + NO_THIRD_PARTY,
    )
    observe(run, "widget")
    # With third-party cookies blocked chromium also refuses the iframe its storage:
    # mixpanel-js says so and runs on memory; the partitioned cookie is what keeps the id.
    browser_clean(run, tolerated=(rf"^Mixpanel error: .* https://{re.escape(WIDGET_HOST)}:\d+/static/mixpanel\.js$",))
    canonical = canonical_of(one_cookie(run, "cookies", "fp_id", ".site-a.test")["value"])
    widget_cookie = one_cookie(run, "cookies", "fp_id", ".site-b.test")
    assert canonical_of(widget_cookie["value"]) == canonical
    # Kept for this embedding only (the top-level site is its partition).
    assert widget_cookie.get("partitionKey") == "https://site-a.test", widget_cookie
    assert widget_cookie["secure"] and widget_cookie["sameSite"] == "None" and widget_cookie["httpOnly"]
    events = await settled(site, ["Parent view", "Widget view"])
    assert_one_identity(events, canonical)
    assert {e["properties"]["$current_url"].split("/e2e/")[1] for e in events} == {"parent", "widget"}
    # Only the linked iframe was given a token; the stranger's hellos were ignored.
    assert run["stranger"] == []
    bridges = run.browser_requests("/mp/bridge")
    assert len(bridges) == 1 and bridges[0]["status"] == 200
    counts = await token_metrics(site)
    # frame.js asked for a frame token: it opens only on frame.js's own way in.
    assert counts.get("issued_frame") == 1 and counts.get("redeemed_frame") == 1, counts


async def test_a_widget_takes_no_token_from_an_unlinked_page(tls_site: Site) -> None:
    """The other way round: a page on an unlinked domain embeds the widget and posts it a
    genuine token for B (anyone can get one for their own id from A's /mp/bridge): the
    widget ignores it, redeems nothing and keeps an id of its own."""
    site = tls_site
    async with aiohttp.ClientSession() as session:  # the attacker's own token, from site A
        async with session.post(
            site.url("127.0.0.1", "/mp/bridge"), json={"to": site.url(WIDGET_HOST, "/")}, ssl=False,
            headers={"Host": A_HOST, "User-Agent": "Mozilla/5.0", "Sec-Fetch-Site": "same-origin"},
        ) as resp:
            assert resp.status == 200
            forged = (await resp.json())["token"]
    widget = site.page("widget", FAST, head=FRAME_JS, ready="firstpartyFrame", post="mixpanel.track('Widget view');")
    site.pages["evil"] = EVIL.format(src=site.url(WIDGET_HOST, widget), token=forged)
    run = await drive(
        [
            goto(site, STRANGER_HOST, "/e2e/evil"),
            wait("/mp/track/", event("Widget view")),  # after frame.js gave up waiting
            {"op": "cookies", "save": "cookies"},
        ],
        args=TLS_ARGS + NO_THIRD_PARTY,
    )
    observe(run, "unlinked parent")
    browser_clean(run, tolerated=(rf"^Mixpanel error: .* https://{re.escape(WIDGET_HOST)}:\d+/static/mixpanel\.js$",))
    assert not run.browser_requests("/mp/id")
    (event_,) = await settled(site, ["Widget view"])
    claims = site.services.settings.identity.keys.open(forged, purpose="bridge", audience="site-b.test", now=time.time())
    assert event_["properties"]["$device_id"] != claims.canonical_id
    counts = await token_metrics(site)
    assert not counts.get("redeemed_bridge") and not counts.get("redeemed_frame"), counts


# A page on an unlinked domain that embeds the widget and pushes a token at it.
EVIL = """<!doctype html><html><body><iframe id="w" src="{src}"></iframe><script>
  window.addEventListener("message", function (ev) {{
    if (ev.data && ev.data.type === "firstparty:hello")
      ev.source.postMessage({{type: "firstparty:token", token: "{token}"}}, "*");
  }});
</script></body></html>"""

# An iframe from an unlinked domain saying hello as frame.js does, recording
# anything the parent sends back.
STRANGER = """<!doctype html><html><body><script>
  window.got = [];
  window.addEventListener("message", function (ev) { window.got.push(ev.data); });
  window.parent.postMessage({type: "firstparty:hello", id: "stranger"}, "*");
  setTimeout(function () { window.parent.postMessage({stranger: true, got: window.got}, "*"); }, 1200);
</script></body></html>"""
