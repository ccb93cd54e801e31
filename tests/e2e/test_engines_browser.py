"""The cross-domain journeys in the two other engines, beside chromium's detailed
journeys in ``test_crossdomain_browser.py``: Debian's firefox-esr over WebDriver BiDi
(puppeteer-core, ``drive_firefox.mjs``) and WebKitGTK's MiniBrowser under Xvfb through
WebKitWebDriver (selenium-webdriver, ``drive_webkit.mjs``). What each asserts is what
the proxy and the fake upstream saw and the browser's own cookies: neither driver
sees request bodies, and WebDriver shows only the current page's cookies.

1. a decorated link (``/mp/go``, no JavaScript);
2. an ordinary link decorated by ``/mp/link.js`` at click time;
3. a mailed link carrying a genuine token for someone else's id, opened by a
   visitor who already has an id on B: nothing changes (identity fixation);
4. the identity hub: hub.js on A and B goes once to the hub and back, and redeems
   the hub's answer as the answer to its own round trip (a per-tab marker)."""

from __future__ import annotations

import re

import pytest

from tests.conftest import canonical_of
from tests.e2e.harness import Site, drive
from tests.support import (
    A_HOST, B_HOST, FAST, HUB_IDS, HUB_JS, IDS, LANDING, TOKEN_PARAM, assert_no_token_upstream,
    assert_one_identity, attackers_link, b_target, cookies_named, event, go_href, goto, hub_pages, js,
    one_cookie, settled, token_metrics, wait,
)

pytestmark = pytest.mark.browser
ENGINES = pytest.mark.parametrize("engine", ["firefox", "webkit"])


# mixpanel-js's two ways out: batched XHRs (the default) and beacons (``api_transport:
# 'sendBeacon'``: the answer is never read, yet its Set-Cookie must hold).
TRANSPORTS = pytest.mark.parametrize("config", [FAST, {**FAST, "api_transport": "sendBeacon"}], ids=["batched", "beacon"])


async def _journey(site: Site, link_page: str, selector: str, engine: str, config: dict = FAST) -> None:
    b = site.page("b", config)
    run = await drive(
        [
            goto(site, A_HOST, link_page),
            js(f"mixpanel.track('Page A'); return {IDS};", "a"),
            wait("/mp/track/", event("Page A")),
            {"op": "click", "selector": selector},
            {"op": "wait_url", "pattern": LANDING, "save": "landing"},
            js(f"mixpanel.track('Page B'); return Object.assign({IDS}, {{referrer: document.referrer, "
               f"transport: mixpanel.get_config('api_transport')}});", "b"),
            wait("/mp/track/", event("Page B")),
            js("mixpanel.identify('user-1'); mixpanel.track('Purchase'); return 1;"),
            wait("/mp/track/", event("Purchase")),
            {"op": "cookies", "save": "cookies"},
        ],
        engine=engine,
    )
    assert b == "/e2e/b"
    canonical = run["a"]["device"]
    (token,) = re.match(LANDING, run["landing"]).groups()
    assert run["b"]["device"] != canonical  # B's own storage: another registrable domain
    assert run["b"]["referrer"] == site.url(A_HOST, "/")  # /go's Referrer-Policy: A's origin
    assert run["b"]["transport"] == config.get("api_transport", "XHR")
    if engine == "firefox":  # WebDriver (WebKit) shows no requests: Firefox's say how each left
        kinds = {r["headers"].get("content-type") for r in run.requests if "/mp/track" in r["url"]}
        beacon = "api_transport" in config
        assert kinds == {"text/plain;charset=UTF-8" if beacon else "application/x-www-form-urlencoded"}, kinds
    events = await settled(site, ["Page A", "Page B", "$identify", "Purchase"])
    assert_one_identity(events, canonical)
    purchase = next(e for e in events if e["event"] == "Purchase")["properties"]
    assert purchase["distinct_id"] == "user-1"
    for name in ("Page B", "Purchase"):
        props = next(e for e in events if e["event"] == name)["properties"]
        assert props["$current_url"] == b_target(site), props["$current_url"]
    assert_no_token_upstream(site, [token], canonical)
    # WebDriver (WebKit) shows the current page's cookies only: B's, where the journey ends.
    for domain in (".site-a.test", ".site-b.test") if engine != "webkit" else (".site-b.test",):
        cookie = one_cookie(run, "cookies", "fp_id", domain)
        assert canonical_of(cookie["value"]) == canonical and cookie["httpOnly"]
    counts = await token_metrics(site)
    assert counts.get("issued_bridge") == 1 and counts.get("redeemed_bridge") == 1, counts


@ENGINES
@TRANSPORTS
async def test_decorated_link_carries_the_id(xsite: Site, engine: str, config: dict) -> None:  # noqa: F811
    site = xsite
    a = site.page("a", config, body=f'<a id="go" href="{go_href(site)}">Checkout</a>')
    await _journey(site, a, "#go", engine, config)


@ENGINES
async def test_link_js_decorates_ordinary_links(xsite: Site, engine: str) -> None:  # noqa: F811
    site = xsite
    a = site.page("a", FAST, head='<script src="/mp/link.js" defer></script>',
                  body=f'<a id="plain" href="{b_target(site)}">Checkout</a>')
    await _journey(site, a, "#plain", engine)


@ENGINES
async def test_a_mailed_link_does_not_fix_an_established_identity(xsite: Site, engine: str) -> None:  # noqa: F811
    site = xsite
    b = site.page("b", FAST)
    answer, attacker = await attackers_link(site)
    run = await drive(
        [
            goto(site, B_HOST, b),
            js(f"mixpanel.track('Victim on B'); return {IDS};", "before"),
            wait("/mp/track/", event("Victim on B")),
            {"op": "goto", "url": answer["url"]},  # from a mail: no referrer
            js(f"mixpanel.track('After the link'); return Object.assign({IDS}, {{referrer: document.referrer, "
               f"href: location.href}});", "after"),
            wait("/mp/track/", event("After the link")),
            {"op": "cookies", "save": "cookies"},
        ],
        engine=engine,
    )
    assert run["after"]["referrer"] == "" and f"{TOKEN_PARAM}=" in run["after"]["href"]
    victim = run["before"]["device"]
    assert victim != attacker
    assert [canonical_of(c["value"]) for c in cookies_named(run, "cookies", "fp_id")] == [victim]
    events = await settled(site, ["Victim on B", "After the link"])
    assert_one_identity(events, victim)
    counts = await token_metrics(site)
    assert counts.get("unproven", 0) >= 1 and not counts.get("redeemed_bridge"), counts
    assert_no_token_upstream(site, [answer["token"]], None)


HUB_BACK = "window.mixpanel && window.mixpanel.__loaded && localStorage.getItem('fp_hub_done') === '1'"


@pytest.mark.parametrize("xsite", [{"mode": "spool", "hub": "up"}], indirect=True, ids=["hub"])
@pytest.mark.parametrize("engine", ["firefox", "webkit"])
@TRANSPORTS
async def test_identity_hub_joins_two_domains(xsite: Site, engine: str, config: dict) -> None:  # noqa: F811
    site = xsite
    a, b = hub_pages(site, config=config)
    run = await drive(
        [
            {"op": "goto", "url": site.url(A_HOST, a), "wait_until": "commit"},
            {"op": "wait_js", "js": HUB_BACK, "timeout_ms": 15000},  # back from the hub, SDK started
            js(f"mixpanel.track('Page A'); return Object.assign({HUB_IDS}, {{href: location.href}});", "a"),
            wait("/mp/track/", event("Page A")),
            {"op": "goto", "url": site.url(B_HOST, b), "wait_until": "commit"},
            {"op": "wait_js", "js": HUB_BACK, "timeout_ms": 15000},
            js(f"mixpanel.track('Page B'); return Object.assign({HUB_IDS}, {{href: location.href}});", "b"),
            wait("/mp/track/", event("Page B")),
            {"op": "cookies", "save": "cookies"},
        ],
        engine=engine,
    )
    assert run["a"]["href"] == site.url(A_HOST, a) and run["b"]["href"] == site.url(B_HOST, b)  # tokens cleaned
    canonical = canonical_of(one_cookie(run, "cookies", "fp_id", ".site-b.test")["value"])
    assert canonical not in (run["a"]["device"], run["b"]["device"])  # the hub's id, not an SDK's
    events = await settled(site, ["Page A", "Page B"])
    assert_one_identity(events, canonical)
    counts = await token_metrics(site)
    assert counts.get("issued_hub") == 2 and counts.get("redeemed_hub") == 2, counts
    assert not counts.get("unproven"), counts


# Firefox with strict tracking protection, and bounce-tracking protection's timers
# shortened from hours to a second: a site the visitor only passes through (the hub)
# that set a cookie is purged as soon as the redirect chain through it has ended.
STRICT_FIREFOX = {
    "browser.contentblocking.category": "strict",
    "network.cookie.cookieBehavior": 5,
    "privacy.trackingprotection.enabled": True,
    "privacy.bounceTrackingProtection.mode": 1,
    "privacy.bounceTrackingProtection.bounceTrackingGracePeriodSec": 0,
    "privacy.bounceTrackingProtection.bounceTrackingPurgeTimerPeriodSec": 1,
    "privacy.bounceTrackingProtection.clientBounceDetectionTimerPeriodMS": 100,
}


@pytest.mark.parametrize("xsite", [{"mode": "spool", "hub": "up"}], indirect=True, ids=["hub"])
async def test_the_hub_keeps_one_identity_when_firefox_purges_its_cookie(xsite: Site) -> None:  # noqa: F811
    """Issue 22, point 7. In strict Firefox the hub's cookie is purged once the visitor
    has bounced through it. Then (1) a click from A to B still carries A's id: hub.js
    decorates links to linked domains, through /mp/go, with no hop through the hub; and
    (2) when B's hub.js makes its trip again (its "done" flag gone, as Safari's cap on
    script-written storage does), the hub without its cookie adopts the id B already has
    instead of minting one that would replace it: one identity. (The hub's cookie, set
    again to that id, is purged again a second later with these timers.)"""
    site = xsite
    b = site.page("hb", FAST, head=HUB_JS, hub_ready=True)
    a = site.page("ha", FAST, head=HUB_JS, hub_ready=True,
                  body=f'<a id="b" href="{site.url(B_HOST, b)}">Checkout</a>')
    run = await drive(
        [
            {"op": "goto", "url": site.url(A_HOST, a), "wait_until": "commit"},
            {"op": "wait_js", "js": HUB_BACK, "timeout_ms": 15000},  # back from the hub, SDK started
            js(f"mixpanel.track('Page A'); return {HUB_IDS};", "a"),
            wait("/mp/track/", event("Page A")),
            {"op": "cookies", "save": "before_purge"},
            # Another page of A ends the navigation that bounced through the hub.
            {"op": "goto", "url": site.url(A_HOST, a)},
            {"op": "wait_cookie", "name": "fp_hub", "present": False, "timeout_ms": 20000},
            {"op": "wait_js", "js": HUB_BACK},
            {"op": "click", "selector": "#b"},
            {"op": "wait_url", "pattern": r"/e2e/hb$"},  # the token redeemed and cleaned
            {"op": "wait_js", "js": HUB_BACK},
            js(f"mixpanel.track('Page B'); return {HUB_IDS};", "b"),
            wait("/mp/track/", event("Page B")),
            # B's flag lost: hub.js makes its trip again, to a hub without its cookie.
            js("localStorage.removeItem('fp_hub_done'); return 1;"),
            {"op": "goto", "url": site.url(B_HOST, b), "wait_until": "commit"},
            {"op": "wait_js", "js": HUB_BACK, "timeout_ms": 15000},
            js(f"mixpanel.track('B again'); return Object.assign({HUB_IDS}, {{href: location.href}});", "again"),
            wait("/mp/track/", event("B again")),
            {"op": "cookies", "save": "cookies"},
        ],
        engine="firefox",
        prefs=STRICT_FIREFOX,
    )
    # A's id is the hub's (not the SDK's); the hub's own cookie may be gone already
    # when the driver looks (the purge runs every second).
    canonical = canonical_of(one_cookie(run, "before_purge", "fp_id", ".site-a.test")["value"])
    assert canonical != run["a"]["device"]
    assert run["again"]["href"] == site.url(B_HOST, b)  # back from the second trip, token cleaned
    events = await settled(site, ["Page A", "Page B", "B again"])
    assert_one_identity(events, canonical)
    assert canonical_of(one_cookie(run, "cookies", "fp_id", ".site-b.test")["value"]) == canonical
    counts = await token_metrics(site)
    assert counts.get("redeemed_bridge") == 1 and counts.get("adopted_seed") == 1, counts
    assert counts.get("issued_hub") == 2 and not counts.get("unproven"), counts
