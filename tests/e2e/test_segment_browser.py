"""Segment in a real browser: analytics.js (``@segment/analytics-next``, its
standalone build, loaded by the snippet through the first-party ``/seg/cdn/``
path) in headless chromium, alone and beside mixpanel-browser, against the real
proxy and the recording fakes of Segment's CDN and API and of Mixpanel.

1. analytics.js alone: ``page``, ``track``, ``identify``, ``group`` reach Segment
   with ``anonymousId`` the canonical id, ``userId`` intact, ``context.ip`` the
   visitor's, the write key intact; after script storage is wiped, analytics.js
   mints a new id and the proxy rewrites it, and the server-set
   ``ajs_anonymous_id`` gives analytics.js the canonical id back on the next page.
2. One page, both SDKs: Mixpanel's ``$device_id`` and Segment's ``anonymousId``
   are the same id; a journey through ``/mp/go`` to another registrable domain
   keeps it there for both.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

from tests.conftest import SEG_KEY, canonical_of
from tests.e2e.harness import TLS_ARGS, Run, Site, drive, event_named, segment_calls, serve_segment_cdn
from tests.support import (
    A_HOST, B_HOST, browser_clean, eventually, goto, js, modes, one_cookie, render_nginx, self_signed,
    start_nginx, wait,
)

pytestmark = pytest.mark.browser

BOTH_MODES = pytest.mark.parametrize("site", ["spool", "sync"], indirect=True)
READY = "await new Promise(function (r) { analytics.ready(r); });"
AJS_IDS = READY + " return {anon: analytics.user().anonymousId(), user: analytics.user().id()};"
CALLS = (
    "analytics.page('Pricing');"
    " analytics.track('Signed Up', {plan: 'pro'});"
    " analytics.identify('user-42', {email: 'ada@example.com'});"
    " analytics.group('acme', {name: 'Acme'});"
)


def calls_of(upstream: Any, kind: str) -> list[dict[str, Any]]:
    return [c for c in segment_calls(upstream) if c["type"] == kind]


def sdk_requests(run: Run, path: str) -> list[dict[str, Any]]:
    return [r for r in run.requests if urlsplit(r["url"]).path.startswith(path)]


@BOTH_MODES
async def test_analytics_js_through_the_first_party_cdn(site: Site) -> None:
    serve_segment_cdn(site.upstream)
    page = site.segment_page("seg", SEG_KEY, post=CALLS)
    run = await drive(
        [
            goto(site, A_HOST, page),
            wait("/seg/v1/g"),
            js(AJS_IDS, "first"),
            {"op": "cookies", "save": "cookies"},
            # Safari-style loss of script storage (conftest.IDENTITY makes any later
            # device change a renewal; the sighting times are whole seconds).
            {"op": "sleep", "ms": 600},
            {"op": "wipe_script_storage"},
            {"op": "mark"},
            {"op": "reload"},
            wait("/seg/v1/g"),
            js(AJS_IDS, "second"),
            {"op": "mark"},
            {"op": "reload"},
            wait("/seg/v1/g"),
            js(AJS_IDS, "third"),
            js("return document.cookie;", "document_cookie"),
            {"op": "cookies", "save": "cookies_after"},
        ]
    )
    browser_clean(run)
    canonical = canonical_of(one_cookie(run, "cookies", "fp_id", ".site-a.test")["value"])
    assert canonical == run["first"]["anon"]  # first visit: analytics.js's own id, first come
    # What analytics.js sent, page by page: after the wipe it minted a new id ...
    sent_ids = [json.loads(r["post_data"])["anonymousId"] for r in sdk_requests(run, "/seg/v1/")]
    assert len(sent_ids) == 12
    wiped_id = sent_ids[4]
    assert set(sent_ids[:4]) == {canonical} and wiped_id != canonical
    # ... which the proxy rewrote; its answers set ajs_anonymous_id to the canonical id,
    # which analytics.js reads back at once: the rest of that page and the next carry it.
    assert run["second"]["anon"] == run["third"]["anon"] == canonical
    assert set(sent_ids[8:]) == {canonical}
    ajs = one_cookie(run, "cookies_after", "ajs_anonymous_id", ".site-a.test")
    assert ajs["value"] == canonical and ajs["httpOnly"] is False
    assert f"ajs_anonymous_id={canonical}" in run["document_cookie"]

    # The script, its settings and bundles came through /seg/cdn/; the script was
    # fetched from the CDN once (cached for the two reloads).
    script = sdk_requests(run, f"/seg/cdn/analytics.js/v1/{SEG_KEY}/analytics.min.js")
    assert len(script) == 3 and all(r["status"] == 200 for r in script)
    assert sdk_requests(run, f"/seg/cdn/v1/projects/{SEG_KEY}/settings")
    assert len(site.upstream.by("seg-cdn", "/analytics.js/")) == 1
    # analytics.js sent its calls to the apiHost the settings named: this origin's /seg/v1.
    sent = sdk_requests(run, "/seg/v1/")
    assert {urlsplit(r["url"]).path for r in sent} == {"/seg/v1/p", "/seg/v1/t", "/seg/v1/i", "/seg/v1/g"}
    assert all(urlsplit(r["url"]).netloc == f"{A_HOST}:{site.port}" for r in sent)

    await eventually(lambda: len(segment_calls(site.upstream)) == 12, 15, "12 Segment calls")
    for call in segment_calls(site.upstream):
        assert call["anonymousId"] == canonical, call
        assert call["writeKey"] == SEG_KEY
        assert call["context"]["ip"] == "127.0.0.1"  # the visitor's, for Segment's geolocation
        assert call["context"]["library"]["name"] == "analytics.js"
    assert [c["userId"] for c in calls_of(site.upstream, "identify")] == ["user-42"] * 3
    assert all(c["userId"] == "user-42" and c["groupId"] == "acme" for c in calls_of(site.upstream, "group"))
    assert {c["event"] for c in calls_of(site.upstream, "track")} == {"Signed Up"}
    assert {c["name"] for c in calls_of(site.upstream, "page")} == {"Pricing"}
    # The browser's own ids were rewritten, never forwarded.
    assert all(wiped_id not in rec.body.decode() for rec in site.upstream.by("seg-us"))


def both_sdks(site: Site, name: str, body: str = "", post: str = "") -> str:
    """A page with mixpanel-browser and analytics.js: the snippet's calls
    (``post``, queued while analytics.js loads, as the standard snippet's
    ``analytics.page()``) and mixpanel-js's first event leave together once
    analytics.js is ready. A fresh browser's first requests are in flight at
    once, none carrying fp_id yet: the ajs_anonymous_id cookie analytics.js
    wrote, sent with both, makes them agree."""
    together = f"{post} analytics.ready(function () {{ mixpanel.track('Page ' + location.hostname); }});"
    return site.segment_page(name, SEG_KEY, mixpanel={"batch_requests": False}, body=body, post=together)


@modes()
async def test_one_page_two_sdks_one_id_across_domains(xsite: Site) -> None:
    site = xsite
    serve_segment_cdn(site.upstream)
    b_url = site.url(B_HOST, "/e2e/b?utm_source=mail")
    a = both_sdks(site, "a", body=f'<a id="go" href="/mp/go?to={quote(b_url, safe="")}">Checkout</a>',
                  post="analytics.page('A'); analytics.track('Cart viewed');")
    both_sdks(site, "b", post="analytics.page('B'); analytics.track('Purchased');")
    ids = "return {device: mixpanel.get_property('$device_id'), anon: analytics.user().anonymousId()};"
    run = await drive(
        [
            goto(site, A_HOST, a),
            wait("/seg/v1/t"),
            wait("/mp/track/"),
            js(READY + ids, "a"),
            {"op": "cookies", "save": "cookies_a"},
            {"op": "mark"},
            {"op": "click", "selector": "#go"},
            {"op": "wait_url", "pattern": r"/e2e/b\?fpb="},
            wait("/seg/v1/t"),
            wait("/mp/track/"),
            js(READY + ids, "b"),
            {"op": "cookies", "save": "cookies"},
        ]
    )
    browser_clean(run)
    # analytics.js's id: its cookie went with mixpanel-js's first request too.
    canonical = canonical_of(one_cookie(run, "cookies_a", "fp_id", ".site-a.test")["value"])
    assert run["a"]["anon"] == canonical and run["a"]["device"] != canonical
    # On B both SDKs started with ids of their own (another registrable domain) ...
    assert run["b"]["device"] != canonical
    sent_on_b = [json.loads(r["post_data"]) for r in sdk_requests(run, "/seg/v1/") if B_HOST in r["url"]]
    assert sent_on_b and sent_on_b[0]["anonymousId"] != canonical
    # (analytics.js then holds the canonical id: the answers set ajs_anonymous_id.)
    assert run["b"]["anon"] == canonical

    # ... and what reached Mixpanel and Segment carries one id, on A and on B.
    page_a = (await event_named(site.upstream, f"Page {A_HOST}"))["properties"]
    page_b = (await event_named(site.upstream, f"Page {B_HOST}"))["properties"]
    assert page_a["$device_id"] == page_b["$device_id"] == canonical
    await eventually(lambda: len(segment_calls(site.upstream)) == 4, 15, "four Segment calls")
    seg = segment_calls(site.upstream)
    assert sorted(c.get("name") or c.get("event") for c in seg) == ["A", "B", "Cart viewed", "Purchased"]
    assert {c["anonymousId"] for c in seg} == {canonical}
    on_b = [c for c in seg if (c.get("name") or c.get("event")) in ("B", "Purchased")]
    for call in on_b:
        # The landing URL's token was redeemed from Segment's calls too, and stripped.
        assert call["context"]["page"]["url"] == b_url, call["context"]["page"]
        assert "fpb=" not in call["context"]["page"]["search"]
    assert one_cookie(run, "cookies", "ajs_anonymous_id", ".site-b.test")["value"] == canonical
    assert canonical_of(one_cookie(run, "cookies", "fp_id", ".site-b.test")["value"]) == canonical
    assert not any(re.search(r"fpb=", rec.body.decode("latin-1")) for rec in site.upstream.requests)


async def test_analytics_js_behind_the_readmes_nginx_on_a_non_default_port(site: Site, tmp_path: Any, nginx_bin: str) -> None:  # noqa: F811
    """Issue 22, point 5: the site behind nginx.example.conf (TLS) on a port that is not
    443, as staging and local sites run. The settings the proxy serves point
    analytics.js at this very host and port (nginx sends X-Forwarded-Host
    ``$http_host``; ``Host $host`` alone drops the port), so every call comes back
    through nginx and reaches Segment with the canonical id."""
    serve_segment_cdn(site.upstream)
    page = site.segment_page("segnginx", SEG_KEY, post="analytics.track('Behind nginx');")
    cert, key = self_signed(tmp_path / "tls", "www.example.com")
    pages = "location /e2e/ { proxy_pass http://firstparty; }"
    nginx, port = await start_nginx(
        nginx_bin, tmp_path, lambda p: render_nginx(tmp_path, site.port, p, cert, key, pages)
    )
    origin = f"https://{A_HOST}:{port}"
    try:
        run = await drive(
            [
                {"op": "goto", "url": origin + page},
                wait("/seg/v1/t"),
                js(AJS_IDS, "ids"),
                {"op": "cookies", "save": "cookies"},
            ],
            args=TLS_ARGS,
        )
    finally:
        nginx.terminate()
        nginx.wait(timeout=10)
    browser_clean(run)
    settings = sdk_requests(run, f"/seg/cdn/v1/projects/{SEG_KEY}/settings")
    assert settings and all(urlsplit(r["url"]).netloc == f"{A_HOST}:{port}" for r in settings)
    sent = sdk_requests(run, "/seg/v1/")
    assert [urlsplit(r["url"]).path for r in sent] == ["/seg/v1/t"], run.describe()
    assert all(r["url"].startswith(origin + "/seg/v1/") and r["status"] == 200 for r in sent), run.describe()
    canonical = canonical_of(one_cookie(run, "cookies", "fp_id", ".site-a.test")["value"])
    await eventually(lambda: len(segment_calls(site.upstream)) == 1, 15, "the track call")
    [call] = segment_calls(site.upstream)
    assert (call["event"], call["anonymousId"]) == ("Behind nginx", canonical)
    assert canonical == run["ids"]["anon"]
