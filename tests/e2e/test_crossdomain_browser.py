"""Cross-domain identity in a real browser: mixpanel-browser in headless chromium on
``www.site-a.test`` and ``checkout.site-b.test`` (two registrable domains), the real
proxy app serving both (and the identity hub on ``hub.id-hub.test``), the recording
fake Mixpanel behind it.

Journeys:
1. a decorated link (``/mp/go``, no JavaScript on the link);
2. an ordinary link decorated at click time by ``/mp/link.js``;
3. the identity hub (``/mp/hub.js``): A redirects once via the hub, B opened in a
   fresh tab redirects once too, both end on the hub's id, no second redirect;
4. the hub down: no navigation, events flow with the per-domain id;
5. a landing URL whose token was replayed (or has expired) opened in another
   browser does not take over the first browser's id.

3b. a slow hub: with mixpanel.init inside ``firstpartyHub.ready`` (as the README
    says) no event leaves the page that goes to the hub, so one id throughout.

3c. the hub round trip erases the landing document's referrer; hub.js restores
it for the SDK, so $initial_referrer still names the search page.

3d. a hub with other token keys than A's (a proxy of its own): A refuses the token it
    sends back; hub.js's loop guard ends the trip there (one round trip, no loop), the
    page settles, the SDK starts, and the visitor keeps A's own id.

Every assertion is on what the fake upstream received, the proxy's /metrics, and
what the browser reported (cookies, navigations, what the SDK sent before the
proxy rewrote it). Settings: ``identity.reset_window_days`` keeps its default (7 d):
no scenario here changes a device id on a host.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import pytest

from proxy.core.tokens import TokenInvalid
from tests.conftest import canonical_of
from tests.e2e.harness import Run, Site, drive, event_named
from tests.support import (
    A_HOST, B_HOST, FAST, HUB_HOST, HUB_IDS, HUB_JS, IDS, LANDING, SEARCH, TOKEN_PARAM,
    assert_no_token_upstream, assert_one_identity, attackers_link, b_target, browser_clean, cookies_named,
    event, go_href, goto, hub_pages, js, modes, observe, one_cookie, sent_events, settled, token_metrics,
    wait, web_events,
)

pytestmark = pytest.mark.browser


# ----------------------------------------------------------------- helpers


def header_values(headers: list[dict[str, str]] | None, name: str) -> list[str]:
    return [h["value"] for h in headers or [] if h["name"].lower() == name]


def main_documents(run: Run, page: int) -> list[dict[str, Any]]:
    return [d for d in run.documents if d["page"] == page]


# ------------------------------------------------------------------- tests


async def _follow_link(site: Site, link_page: str, link_selector: str) -> tuple[Run, str, str]:
    """A visitor on A tracks "Page A", clicks ``link_selector``, lands on B with a token;
    B tracks "Page B", identifies as user-1, tracks "Purchase". Returns the run, the
    canonical id (A's device id, first come) and the token."""
    b = site.page("b", FAST)
    assert b == "/e2e/b"
    run = await drive(
        [
            goto(site, A_HOST, link_page),
            js(f"mixpanel.track('Page A'); return {IDS};", "a"),
            wait("/mp/track/", event("Page A")),
            {"op": "cookies", "save": "cookies_a"},
            {"op": "mark"},
            {"op": "click", "selector": link_selector},
            {"op": "wait_url", "pattern": LANDING, "save": "landing"},
            js("return {referrer: document.referrer, href: location.href};", "b_doc"),
            js(f"mixpanel.track('Page B'); return {IDS};", "b"),
            wait("/mp/track/", event("Page B")),
            js(f"mixpanel.identify('user-1'); mixpanel.track('Purchase'); return {IDS};", "b_known"),
            wait("/mp/track/", event("$identify")),
            wait("/mp/track/", event("Purchase")),
            {"op": "cookies", "save": "cookies"},
        ]
    )
    canonical = run["a"]["device"]
    (token,) = re.match(LANDING, run["landing"]).groups()
    return run, canonical, token


def _assert_carried(site: Site, run: Run, canonical: str, token: str, events: list[dict[str, Any]]) -> None:
    """Journeys 1 and 2: one canonical id on A and B, the token redeemed once, stripped."""
    b_device = run["b"]["device"]
    assert b_device != canonical, "B should have its own mixpanel storage (another registrable domain)"
    assert run["b"]["distinct"] == f"$device:{b_device}"
    assert run["b_known"]["distinct"] == "user-1"

    # What the SDK on B sent, before the proxy: its own device id and the token in $current_url.
    sent_b = [e for e in sent_events(run) if e["properties"].get("$current_url", "").startswith(site.url(B_HOST))]
    assert {e["event"] for e in sent_b} >= {"Page B", "$identify", "Purchase"}
    for e in sent_b:
        assert e["properties"]["$device_id"] == b_device
        assert f"?{TOKEN_PARAM}={token}&" in e["properties"]["$current_url"]

    # What Mixpanel received: one id across A and B.
    assert {e["event"] for e in events} == {"Page A", "Page B", "$identify", "Purchase"}
    assert_one_identity(events, canonical)
    identify = next(e for e in events if e["event"] == "$identify")["properties"]
    assert identify["$anon_distinct_id"] == f"$device:{canonical}"
    assert identify["distinct_id"] == "user-1" and identify["$user_id"] == "user-1"
    purchase = next(e for e in events if e["event"] == "Purchase")["properties"]
    assert purchase["distinct_id"] == "user-1" and purchase["$user_id"] == "user-1"
    for e in events:
        if e["event"] != "Page A":
            # The token is gone, the rest of the landing URL is intact.
            assert e["properties"]["$current_url"] == b_target(site), e["properties"]["$current_url"]
    assert_no_token_upstream(site, [token], canonical)

    # Cookies: A's and B's registrable domains each hold fp_id with the same canonical id.
    a_cookie = one_cookie(run, "cookies", "fp_id", ".site-a.test")
    b_cookie = one_cookie(run, "cookies", "fp_id", ".site-b.test")
    assert canonical_of(a_cookie["value"]) == canonical
    assert canonical_of(b_cookie["value"]) == canonical
    assert b_cookie["httpOnly"] and b_cookie["sameSite"] == "Lax" and not b_cookie["secure"]
    assert len(cookies_named(run, "cookies", "fp_id")) == 2


@modes()
async def test_decorated_link_carries_the_id(xsite: Site) -> None:
    """1. <a href="/mp/go?to=B"> with no JavaScript: /mp/go answers 302 to B with
    fpb=<token> first in the query; B's events (the SDK's own new device id, the token
    in $current_url) reach Mixpanel with A's canonical id, $identify merges
    $device:<canonical> into user-1, the token never reaches Mixpanel, B's browser
    holds fp_id=<canonical> on .site-b.test, and the token was redeemed exactly once."""
    site = xsite
    a = site.page("a", FAST, body=f'<a id="go" href="{go_href(site)}">Checkout</a>')
    run, canonical, token = await _follow_link(site, a, "#go")
    observe(run, f"decorated link ({site.mode})")
    browser_clean(run)

    # The hop: A -> /mp/go (302, token first) -> B, in one tab.
    docs = main_documents(run, 0)
    assert [urlsplit(d["url"]).path for d in docs] == ["/e2e/a", "/mp/go", "/e2e/b"]
    go = docs[1]
    assert go["status"] == 302 and go["location"] == run["landing"] == docs[2]["url"]
    assert "fp_id=" in go["headers"].get("cookie", "")  # the token is minted from A's cookie
    assert go["headers"].get("referer") == site.url(A_HOST, a)  # same origin: the full URL
    # The hop answers Referrer-Policy: strict-origin-when-cross-origin: B learns A's origin
    # (the referring domain of a cross-domain funnel), never A's path.
    assert header_values(go["response_headers"], "referrer-policy") == ["strict-origin-when-cross-origin"]
    a_origin = site.url(A_HOST, "/")
    assert docs[2]["headers"].get("referer") == a_origin
    assert run["b_doc"] == {"referrer": a_origin, "href": run["landing"]}
    on_b = [e for e in sent_events(run) if B_HOST in e["properties"]["$current_url"]]
    assert on_b and all(e["properties"]["$initial_referrer"] == a_origin for e in on_b)
    assert [n["url"] for n in run.navigations] == [site.url(A_HOST, a), run["landing"]]

    events = await settled(site, ["Page A", "Page B", "$identify", "Purchase"])
    _assert_carried(site, run, canonical, token, events)
    counts = await token_metrics(site)
    assert counts.get("issued_bridge") == 1 and counts.get("redeemed_bridge") == 1, counts
    assert not {k: v for k, v in counts.items() if k not in ("issued_bridge", "redeemed_bridge") and v}, counts


@modes()
async def test_link_js_decorates_ordinary_links(xsite: Site) -> None:
    """2. <script src="/mp/link.js" defer> and an ordinary <a href="http://checkout.site-b.test/...">:
    the click leaves through /mp/go (fresh token at click time), B ends with a token and
    the same single canonical id as journey 1."""
    site = xsite
    a = site.page(
        "a",
        FAST,
        head='<script src="/mp/link.js" defer></script>',
        body=f'<a id="plain" href="{b_target(site)}">Checkout</a>',
    )
    run, canonical, token = await _follow_link(site, a, "#plain")
    observe(run, f"link.js ({site.mode})")
    browser_clean(run)

    docs = main_documents(run, 0)
    assert [urlsplit(d["url"]).path for d in docs] == ["/e2e/a", "/mp/go", "/e2e/b"]
    assert docs[1]["url"] == site.url(A_HOST, go_href(site))  # link.js rewrote the href
    assert docs[1]["status"] == 302 and docs[1]["location"] == run["landing"]

    events = await settled(site, ["Page A", "Page B", "$identify", "Purchase"])
    _assert_carried(site, run, canonical, token, events)
    counts = await token_metrics(site)
    assert counts.get("issued_bridge") == 1 and counts.get("redeemed_bridge") == 1, counts


# -------------------------------------------------------------- the hub

A_BACK = r"^http://www\.site-a\.test:\d+/e2e/ha\?fpb=([A-Za-z0-9_-]+)$"
B_BACK = r"^http://checkout\.site-b\.test:\d+/e2e/hb\?fpb=([A-Za-z0-9_-]+)$"


def hub_cookie(run: Run, key: str) -> dict[str, Any]:
    return one_cookie(run, key, "fp_hub", HUB_HOST)


@modes(hub="up")
async def test_identity_hub_joins_two_domains(xsite: Site) -> None:
    """3. hub.js on A and B. A, opened from a search page, redirects once to the hub and
    back with a hub token (the hub sets its own host-only cookie); B, opened directly in a
    new tab of the same browser (no link from A), redirects once and comes back with a
    token naming the same id. Reloading A (token still in the URL) and visiting A again
    (localStorage flag) do not redirect. Mixpanel sees one canonical id, the hub's, on
    every event of A and B; tokens never reach it; the hub ran once per domain."""
    site = xsite
    a, b = hub_pages(site)
    a_url, b_url = site.url(A_HOST, a), site.url(B_HOST, b)
    run = await drive(
        [
            # hub.js may leave before the load event: wait for the commit, then the way back.
            {"op": "goto", "url": a_url, "wait_until": "commit", "referer": SEARCH},
            {"op": "wait_landing", "pattern": A_BACK, "save": "a_landing"},
            js(f"mixpanel.track('Page A'); return {HUB_IDS};", "a"),
            wait("/mp/track/", event("Page A")),
            {"op": "cookies", "save": "cookies_a"},
            {"op": "new_page"},
            {"op": "goto", "url": b_url, "wait_until": "commit"},
            {"op": "wait_landing", "pattern": B_BACK, "save": "b_landing"},
            js(f"mixpanel.track('Page B'); return {HUB_IDS};", "b"),
            wait("/mp/track/", event("Page B")),
            {"op": "use_page", "page": 0},
            {"op": "reload"},
            js(f"mixpanel.track('A reloaded'); return {HUB_IDS};", "a_reloaded"),
            wait("/mp/track/", event("A reloaded")),
            goto(site, A_HOST, a),
            js(f"mixpanel.track('A again'); return Object.assign({HUB_IDS}, {{href: location.href}});", "a_again"),
            wait("/mp/track/", event("A again")),
            {"op": "cookies", "save": "cookies"},
        ]
    )
    observe(run, f"hub ({site.mode})")
    browser_clean(run)
    (a_token,) = re.match(A_BACK, run["a_landing"]).groups()
    (b_token,) = re.match(B_BACK, run["b_landing"]).groups()
    assert a_token != b_token

    # Navigations: exactly one round trip via the hub per domain, never a second one.
    resolve = site.url(HUB_HOST, "/hub/resolve?return=")
    assert [(d["page"], d["url"], d["status"]) for d in run.documents] == [
        (0, a_url, 200),
        (0, resolve + quote(a_url, safe=""), 302),
        (0, run["a_landing"], 200),
        (1, b_url, 200),
        (1, resolve + quote(b_url, safe=""), 302),
        (1, run["b_landing"], 200),
        (0, a_url, 200),  # the reload: hub.js took the token out of the address bar
        (0, a_url, 200),  # visiting A again
    ], run.describe()
    assert [(n["page"], n["url"]) for n in run.navigations] == [
        (0, a_url),
        (0, run["a_landing"]),
        (0, a_url),  # history.replaceState: the token left the address bar
        (1, b_url),
        (1, run["b_landing"]),
        (1, b_url),
        (0, a_url),
        (0, a_url),
    ]
    pings = run.browser_requests("/hub/ping")
    assert [r["page"] for r in pings] == [0, 1]  # once per domain, not on reload or revisit
    assert run["a"]["flag"] == run["b"]["flag"] == run["a_again"]["flag"] == "1"
    assert run["a_again"]["href"] == a_url

    # Cookies: the hub's own (host-only), and fp_id on both domains, all one id.
    hub = hub_cookie(run, "cookies")
    assert hub["httpOnly"] and hub["sameSite"] == "Lax"
    canonical = canonical_of(hub["value"])
    assert hub_cookie(run, "cookies_a")["value"] == hub["value"]  # B's visit reused it
    for domain in (".site-a.test", ".site-b.test"):
        assert canonical_of(one_cookie(run, "cookies", "fp_id", domain)["value"]) == canonical
    a_device, b_device = run["a"]["device"], run["b"]["device"]
    assert len({a_device, b_device, canonical}) == 3  # each domain's SDK minted its own id
    assert run["a_again"]["device"] == run["a_reloaded"]["device"] == a_device

    events = await settled(site, ["Page A", "Page B", "A reloaded", "A again"])
    assert sorted(e["event"] for e in events) == ["A again", "A reloaded", "Page A", "Page B"]
    assert_one_identity(events, canonical)
    assert_no_token_upstream(site, [a_token, b_token], canonical)
    counts = await token_metrics(site)
    assert counts.get("issued_hub") == 2 and counts.get("redeemed_hub") == 2, counts
    assert not {k: v for k, v in counts.items() if k not in ("issued_hub", "redeemed_hub") and v}, counts


DEAD_HUB_ERROR = r"^Failed to load resource: net::ERR_CONNECTION_REFUSED http://hub\.id-hub\.test:\d+/hub/ping$"


@modes(hub="down")
async def test_hub_down_keeps_the_per_domain_id(xsite: Site) -> None:
    """4. identity.hub_url points at a port that refuses connections: hub.js's ping fails,
    the page never navigates away (one navigation per visit, no /hub/resolve), events
    flow with the per-domain id (the SDK's own, first come), no flag is stored (the next
    visit tries again, and again stays). The only console error is chromium's report of
    the refused ping."""
    site = xsite
    a = site.page("ha", FAST, head=HUB_JS)
    a_url = site.url(A_HOST, a)
    run = await drive(
        [
            goto(site, A_HOST, a),
            wait("/hub/ping"),  # failed
            js(f"mixpanel.track('Page A'); return {HUB_IDS};", "a"),
            wait("/mp/track/", event("Page A")),
            {"op": "mark"},
            goto(site, A_HOST, a),
            wait("/hub/ping"),
            js(f"mixpanel.track('A again'); return Object.assign({HUB_IDS}, {{href: location.href}});", "a_again"),
            wait("/mp/track/", event("A again")),
            {"op": "cookies", "save": "cookies"},
        ]
    )
    observe(run, f"hub down ({site.mode})")
    browser_clean(run, tolerated=(DEAD_HUB_ERROR,))
    # Exactly the refused ping, once per visit, and nothing else.
    assert [(m["text"], urlsplit(m["url"]).path) for m in run.console_errors()] == [
        ("Failed to load resource: net::ERR_CONNECTION_REFUSED", "/hub/ping")
    ] * 2, run.describe()
    pings = run.browser_requests("/hub/ping")
    assert len(pings) == 2 and all(r["failure"] == "net::ERR_CONNECTION_REFUSED" for r in pings), run.describe()
    assert [(n["page"], n["url"]) for n in run.navigations] == [(0, a_url), (0, a_url)]
    assert [d["url"] for d in run.documents] == [a_url, a_url]
    assert run["a"]["flag"] is None and run["a_again"]["flag"] is None
    assert run["a_again"]["href"] == a_url

    device = run["a"]["device"]
    assert run["a_again"]["device"] == device
    assert canonical_of(one_cookie(run, "cookies", "fp_id", ".site-a.test")["value"]) == device
    assert not cookies_named(run, "cookies", "fp_hub")
    events = await settled(site, ["Page A", "A again"])
    assert sorted(e["event"] for e in events) == ["A again", "Page A"]
    assert_one_identity(events, device)
    assert_no_token_upstream(site, [], device)
    counts = await token_metrics(site)
    assert not {k: v for k, v in counts.items() if v}, counts


@pytest.mark.parametrize("xsite", [{"hub": "up", "delay": {"/hub/ping": 1.0}}], indirect=True, ids=["slow-hub"])
async def test_page_view_waits_for_a_slow_hub(xsite: Site) -> None:
    """3b. The page tracks its page view as it loads (what sites do) and the hub answers its
    ping after 1.0 s (a remote hub; test-only latency, under hub.js's 1.5 s limit with room
    for a loaded machine). With mixpanel.init inside firstpartyHub.ready, the SDK never runs on the page that leaves for
    the hub, so every event of this browser reaches Mixpanel under one id, the hub's.
    (Found by this test: with a plain mixpanel.init the first page view went out under the
    SDK's own id before hub.js left, and was never joined to the hub's.)"""
    site = xsite
    a, _ = hub_pages(site, post_a="mixpanel.track('Page A');")
    a_url = site.url(A_HOST, a)
    run = await drive(
        [
            {"op": "goto", "url": a_url, "wait_until": "commit", "referer": SEARCH},
            {"op": "wait_landing", "pattern": A_BACK, "save": "a_landing", "timeout_ms": 5000},
            wait("/mp/track/", event("Page A")),  # on the landing page only
            js(f"mixpanel.track('After hub'); return {HUB_IDS};", "a"),
            wait("/mp/track/", event("After hub")),
            {"op": "cookies", "save": "cookies"},
        ]
    )
    observe(run, "slow hub")
    browser_clean(run)
    (token,) = re.match(A_BACK, run["a_landing"]).groups()
    assert [(d["url"], d["status"]) for d in run.documents] == [
        (a_url, 200),
        (site.url(HUB_HOST, "/hub/resolve?return=") + quote(a_url, safe=""), 302),
        (run["a_landing"], 200),
    ]
    # Nothing left the first document: the SDK waited for the hub check, and the page left.
    device = run["a"]["device"]
    sent = [(e["event"], e["properties"]["$current_url"], e["properties"]["$device_id"]) for e in sent_events(run)]
    assert sent == [  # on the landing page, once hub.js had redeemed the token and cleaned the URL
        ("Page A", a_url, device),
        ("After hub", a_url, device),
    ]
    canonical = canonical_of(hub_cookie(run, "cookies")["value"])
    assert canonical != device
    assert canonical_of(one_cookie(run, "cookies", "fp_id", ".site-a.test")["value"]) == canonical
    events = await settled(site, ["Page A", "After hub"])
    assert sorted(e["event"] for e in events) == ["After hub", "Page A"]
    assert_no_token_upstream(site, [token], canonical)
    assert_one_identity(events, canonical)
    counts = await token_metrics(site)
    assert counts == {"issued_hub": 1.0, "redeemed_hub": 1.0}, counts
    assert sorted({e["properties"]["$device_id"] for e in events}) == [canonical]


@pytest.mark.parametrize(
    "xsite", [{"hub": "up", "delay": {"/static/mixpanel.js": 1.5}}], indirect=True, ids=["slow-sdk"]
)
async def test_referrer_survives_the_hub_round_trip(xsite: Site) -> None:
    """3c. A visitor arrives on A from a search page; hub.js leaves for the hub before the
    SDK (1.5 s away on a slow CDN; test-only latency) has run. The round trip erases the
    landing document's referrer (the hub answers with Referrer-Policy: no-referrer);
    hub.js kept it in sessionStorage for the tab and shows it to the SDK again, so
    mixpanel-js still reports where the visitor came from ($initial_referrer)."""
    site = xsite
    a, _ = hub_pages(site)
    a_url = site.url(A_HOST, a)
    run = await drive(
        [
            {"op": "goto", "url": a_url, "wait_until": "commit", "referer": SEARCH},
            {"op": "wait_landing", "pattern": A_BACK, "save": "a_landing", "timeout_ms": 8000},
            js(f"mixpanel.track('Page A'); return {HUB_IDS};", "a"),
            wait("/mp/track/", event("Page A")),
            {"op": "cookies", "save": "cookies"},
        ]
    )
    observe(run, "slow sdk")
    browser_clean(run)
    first, resolve, landing = run.documents
    assert (first["url"], first["headers"].get("referer")) == (a_url, SEARCH)  # chromium sent it
    assert resolve["status"] == 302 and landing["url"] == run["a_landing"]
    assert header_values(resolve["response_headers"], "referrer-policy") == ["no-referrer"]
    assert "referer" not in landing["headers"]  # the browser sent none after the trip...
    assert run["a"]["referrer"] == SEARCH  # ...hub.js gave the page its own back
    # mixpanel-js never ran on the first document: exactly one event, from the landing.
    assert [e["event"] for e in sent_events(run)] == ["Page A"]
    canonical = canonical_of(hub_cookie(run, "cookies")["value"])
    props = (await event_named(site.upstream, "Page A"))["properties"]
    assert_one_identity([{"event": "Page A", "properties": props}], canonical)
    got = (props.get("$initial_referrer"), props.get("$initial_referring_domain"))
    assert got == (SEARCH, "www.search.test")
    assert (props.get("$referrer"), props.get("$referring_domain")) == (SEARCH, "www.search.test")


@pytest.mark.parametrize("xsite", [{"hub": "other"}], indirect=True, ids=["foreign-hub"])
async def test_a_refused_hub_token_ends_the_trip(xsite: Site) -> None:
    """3d. The hub runs on a proxy of its own with its own token keys (another
    deployment's, or a key rotated on one side only): the token it sends A back with
    cannot be opened on A, so A's /mp/id refuses it. hub.js's loop guard (fp_hub_done,
    set before the page left) keeps it from going to the hub again: exactly one round
    trip, then the page settles on the landing, mixpanel.init inside
    firstpartyHub.ready runs, and the visitor keeps an id of A's own."""
    site = xsite
    hub = site.hub
    a, _ = hub_pages(site, post_a="mixpanel.track('Page A');")
    a_url = site.url(A_HOST, a)
    run = await drive(
        [
            {"op": "goto", "url": a_url, "wait_until": "commit", "referer": SEARCH},
            {"op": "wait_landing", "pattern": A_BACK, "save": "a_landing"},
            # The ready callback ran: the SDK's first event, sent from the landing.
            wait("/mp/track/", event("Page A")),
            js(f"return Object.assign({HUB_IDS}, {{href: location.href}});", "a"),
            {"op": "cookies", "save": "cookies"},
        ]
    )
    observe(run, "foreign hub")
    browser_clean(run)
    (token,) = re.match(A_BACK, run["a_landing"]).groups()

    # The token is the hub's, sealed with a key A does not have.
    now = time.time()
    hub_id = hub.services.settings.identity.keys.open(token, purpose="hub", audience="site-a.test", now=now).canonical_id
    with pytest.raises(TokenInvalid):
        site.services.settings.identity.keys.open(token, purpose="hub", audience="site-a.test", now=now)
    # hub.js posted it as the answer to its own trip, and A refused it.
    (posted,) = run.browser_requests("/mp/id")
    fields = dict(parse_qsl(posted["post_data"]))
    assert (posted["method"], posted["status"], fields["fpb"], fields["via"]) == ("POST", 200, token, "hub")
    counts = await token_metrics(site)
    assert {k: v for k, v in counts.items() if v} == {"invalid": 1.0}, counts
    counts = await token_metrics(hub)
    assert {k: v for k, v in counts.items() if v} == {"issued_hub": 1.0}, counts

    # Exactly one navigation to the hub: the first document, the hub's redirect, the
    # landing, and nothing after it (no second trip).
    resolves = [d for d in run.documents if urlsplit(d["url"]).path == "/hub/resolve"]
    assert len(resolves) == 1, run.describe()
    assert [(d["page"], d["url"], d["status"]) for d in run.documents] == [
        (0, a_url, 200),
        (0, hub.url(HUB_HOST, "/hub/resolve?return=") + quote(a_url, safe=""), 302),
        (0, run["a_landing"], 200),
    ], run.describe()
    assert [n["url"] for n in run.navigations] == [a_url, run["a_landing"], a_url]  # the token left the bar
    assert len(run.browser_requests("/hub/ping")) == 1
    assert run["a"]["flag"] == "1" and run["a"]["href"] == a_url

    # The visitor keeps A's own id, not the hub's; the SDK's event reached Mixpanel under it.
    own = canonical_of(one_cookie(run, "cookies", "fp_id", ".site-a.test")["value"])
    assert canonical_of(hub_cookie(run, "cookies")["value"]) == hub_id != own
    assert [e["event"] for e in sent_events(run)] == ["Page A"]
    events = await settled(site, ["Page A"])
    assert [e["event"] for e in events] == ["Page A"]
    assert_one_identity(events, own)
    assert_no_token_upstream(site, [token], own)


# ------------------------------------------------------- replayed or expired

# Past the token's lifetime (identity.token_ttl_seconds, 60 s) and the 5 s clock skew.
EXPIRE = 60 + 5 + 1


@pytest.mark.parametrize(
    "xsite, case",
    [({"mode": "spool"}, "replayed"), ({"mode": "sync"}, "replayed"), ({"mode": "spool", "clock": True}, "expired")],
    indirect=["xsite"],
    ids=["replayed-spool", "replayed-sync", "expired-spool"],
)
async def test_landing_url_in_another_browser_does_not_hijack(xsite: Site, case: str) -> None:
    """5. Browser 1 follows /mp/go from A to B. Its landing URL (with the token) is then
    opened in a second, separate browser context (another person: a shared link).
    replayed: browser 1's page on B has tracked (the token is redeemed, claimed by its
    device id); browser 2 presenting it is refused (no referrer from a linked domain: it
    would be a replay besides). expired: browser 1 never
    tracked on B (token unused), the token's lifetime (60 s + 5 s skew) passes (the
    proxy's token clock is moved forward, see TokenClock), then browser 2 presents it:
    refused as expired. Either way browser 2 keeps its own id: its events and its fp_id
    on .site-b.test name its own device id, not browser 1's."""
    site = xsite
    a = site.page("a", FAST, body=f'<a id="go" href="{go_href(site)}">Checkout</a>')
    site.page("b", FAST)
    first_on_b = (
        [js(f"mixpanel.track('Page B'); return {IDS};", "b1"), wait("/mp/track/", event("Page B"))]
        if case == "replayed"
        # Browser 1 sends nothing on B (the token stays unused); then its lifetime passes.
        else [{"op": "poll", "url": f"http://127.0.0.1:{site.port}/__e2e/clock?advance={EXPIRE}"}]
    )
    run = await drive(
        [
            goto(site, A_HOST, a),
            js(f"mixpanel.track('Page A'); return {IDS};", "a1"),
            wait("/mp/track/", event("Page A")),
            {"op": "click", "selector": "#go"},
            {"op": "wait_url", "pattern": LANDING, "save": "landing"},
            *first_on_b,
            {"op": "cookies", "save": "cookies_1"},
            {"op": "new_context"},
            {"op": "goto", "url_from": "landing"},
            js(f"mixpanel.track('Intruder'); return Object.assign({IDS}, {{href: location.href}});", "b2"),
            wait("/mp/track/", event("Intruder")),
            {"op": "cookies", "save": "cookies_2"},
        ]
    )
    observe(run, f"{case} ({site.mode})")
    browser_clean(run)
    first = run["a1"]["device"]
    (token,) = re.match(LANDING, run["landing"]).groups()
    intruder = run["b2"]["device"]
    assert run["b2"]["href"] == run["landing"]  # browser 2 really presented the token
    assert intruder != first
    intruder_sent = [e for e in sent_events(run) if e["event"] == "Intruder"]
    assert len(intruder_sent) == 1 and f"?{TOKEN_PARAM}={token}&" in intruder_sent[0]["properties"]["$current_url"]

    # Browser 2: its own id, upstream and in its cookie; no fp_id of browser 1's domains.
    props = (await event_named(site.upstream, "Intruder"))["properties"]
    assert props["$device_id"] == intruder and props["distinct_id"] == f"$device:{intruder}"
    assert first not in json.dumps(props)
    b2_cookie = one_cookie(run, "cookies_2", "fp_id", ".site-b.test")
    assert canonical_of(b2_cookie["value"]) == intruder
    assert [c["domain"] for c in cookies_named(run, "cookies_2", "fp_id")] == [".site-b.test"]

    counts = await token_metrics(site)
    if case == "replayed":
        # Browser 1 did get the id on B: the token was valid. Browser 2 opened the URL with
        # no referrer (a shared link), so it is refused before it could even be a replay.
        assert (await event_named(site.upstream, "Page B"))["properties"]["$device_id"] == first
        assert canonical_of(one_cookie(run, "cookies_1", "fp_id", ".site-b.test")["value"]) == first
        assert counts == {"issued_bridge": 1.0, "redeemed_bridge": 1.0, "unproven": 1.0}, counts
        assert_one_identity([e for e in web_events(site) if e["event"] != "Intruder"], first)
    else:
        # Browser 1's page on B never reached the proxy: its only fp_id is A's.
        assert [c["domain"] for c in cookies_named(run, "cookies_1", "fp_id")] == [".site-a.test"]
        assert not [r for r in run.browser_requests("/mp/track/") if r["page"] == 0 and B_HOST in r["url"]]
        assert counts == {"issued_bridge": 1.0, "expired": 1.0}, counts
    assert_no_token_upstream(site, [token], None)


# ------------------------------------------------------- fixation by a mailed link


@modes()
async def test_a_mailed_link_does_not_fix_an_established_identity(xsite: Site) -> None:
    """6. Identity fixation: an attacker gets a genuine token for their own id (anyone can,
    from A's /mp/bridge) and mails the victim a decorated link to B. The victim already
    has an id on B; opening the link (no referrer: not a navigation from a linked domain)
    changes nothing: the victim's events, before and after, keep the victim's own id,
    the proxy counts the token as unproven and redeems nothing."""
    site = xsite
    b = site.page("b", FAST)
    answer, attacker = await attackers_link(site)
    run = await drive(
        [
            goto(site, B_HOST, b),
            js(f"mixpanel.track('Victim on B'); return {IDS};", "before"),
            wait("/mp/track/", event("Victim on B")),
            {"op": "cookies", "save": "cookies_before"},
            {"op": "goto", "url": answer["url"]},  # typed or opened from a mail: no referrer
            js(f"mixpanel.track('After the link'); return Object.assign({IDS}, {{href: location.href, "
               f"referrer: document.referrer}});", "after"),
            wait("/mp/track/", event("After the link")),
            {"op": "cookies", "save": "cookies_after"},
        ]
    )
    observe(run, f"mailed link ({site.mode})")
    browser_clean(run)
    assert run["after"]["referrer"] == "" and f"{TOKEN_PARAM}=" in run["after"]["href"]  # the token was presented
    victim = run["before"]["device"]
    assert victim != attacker
    before = one_cookie(run, "cookies_before", "fp_id", ".site-b.test")["value"]
    after = one_cookie(run, "cookies_after", "fp_id", ".site-b.test")["value"]
    assert canonical_of(before) == canonical_of(after) == victim
    events = await settled(site, ["Victim on B", "After the link"])
    assert_one_identity(events, victim)
    counts = await token_metrics(site)
    assert counts.get("unproven", 0) >= 1 and not counts.get("redeemed_bridge"), counts
    assert_no_token_upstream(site, [answer["token"]], None)


# ------------------------------------------------- the hub, and links without it


@modes(hub="up")
async def test_hub_js_carries_clicks_without_the_hub(xsite: Site) -> None:
    """3d. hub.js decorates links to linked domains as link.js does: a click from A to B
    leaves through /mp/go and B redeems that link's token, with no second trip through
    the hub. Browsers that purge a bounce tracker's cookies (Firefox's and Safari's
    protections classify a hub the visitor only passes through) forget the hub's id;
    a click between the visitor's domains never needs it."""
    site = xsite
    a = site.page("ha", FAST, head=HUB_JS, hub_ready=True, body=f'<a id="plain" href="{site.url(B_HOST, "/e2e/hb")}">B</a>')
    site.page("hb", FAST, head=HUB_JS, hub_ready=True)
    b_landing = r"^http://checkout\.site-b\.test:\d+/e2e/hb\?fpb=([A-Za-z0-9_-]+)$"
    run = await drive(
        [
            {"op": "goto", "url": site.url(A_HOST, a), "wait_until": "commit"},
            {"op": "wait_landing", "pattern": A_BACK, "save": "a_landing"},
            js(f"mixpanel.track('Page A'); return {HUB_IDS};", "a"),
            wait("/mp/track/", event("Page A")),
            {"op": "click", "selector": "#plain"},
            {"op": "wait_landing", "pattern": b_landing, "save": "b_landing"},
            js(f"mixpanel.track('Page B'); return Object.assign({HUB_IDS}, {{href: location.href}});", "b"),
            wait("/mp/track/", event("Page B")),
            {"op": "cookies", "save": "cookies"},
        ]
    )
    observe(run, f"hub.js link ({site.mode})")
    browser_clean(run)
    paths = [(urlsplit(d["url"]).hostname, urlsplit(d["url"]).path) for d in run.documents]
    assert paths == [
        (A_HOST, "/e2e/ha"), (HUB_HOST, "/hub/resolve"), (A_HOST, "/e2e/ha"),  # A's one round trip
        (A_HOST, "/mp/go"), (B_HOST, "/e2e/hb"),  # the click: through go, never the hub
    ], run.describe()
    assert run["b"]["href"] == site.url(B_HOST, "/e2e/hb") and run["b"]["flag"] == "1"
    canonical = canonical_of(hub_cookie(run, "cookies")["value"])
    events = await settled(site, ["Page A", "Page B"])
    assert_one_identity(events, canonical)
    assert canonical_of(one_cookie(run, "cookies", "fp_id", ".site-b.test")["value"]) == canonical
    counts = await token_metrics(site)
    assert (counts.get("issued_hub"), counts.get("redeemed_hub")) == (1, 1), counts
    assert (counts.get("issued_bridge"), counts.get("redeemed_bridge")) == (1, 1), counts


EVERY_CONTROL = {"bots": "drop", "forward_ip": False, "keep_query_params": ["utm_*"]}  # and the default scrub list


@modes(privacy=EVERY_CONTROL)
async def test_the_journey_links_with_every_privacy_control_on(xsite: Site) -> None:
    """Issue 25: journey 1 (A -> /mp/go -> B, identify on B) with bots dropped,
    no IP and an allow-list of query parameters still makes one identity; what
    reached Mixpanel has no IP, and B's URL only its utm_ parameter. A crawler
    (headless Chrome, as it announces itself) on the same page leaves no cookie
    and no event."""
    site = xsite
    a = site.page("a", FAST, body=f'<a id="go" href="{go_href(site)}">Checkout</a>')
    run, canonical, token = await _follow_link(site, a, "#go")
    events = await settled(site, ["Page A", "Page B", "$identify", "Purchase"])
    _assert_carried(site, run, canonical, token, events)
    assert all("ip" not in e["properties"] for e in events)
    assert all(dict(rec.query).get("ip", "0") == "0" for rec in site.upstream.by("us", "/track"))

    crawler = await drive(
        [goto(site, A_HOST, a), js("mixpanel.track('Crawled'); return true;", "sent"),
         wait("/mp/track/", event("Crawled")), {"op": "cookies", "save": "cookies"}],
        user_agent="Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
                   "HeadlessChrome/120.0.6099.109 Safari/537.36",
    )
    assert cookies_named(crawler, "cookies", "fp_id") == []
    assert "Crawled" not in {e["event"] for e in site.upstream.received("us", "/track")}
