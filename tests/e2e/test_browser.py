"""End to end: the real mixpanel-browser SDK in Debian's headless chromium
against the real proxy, with the recording fake Mixpanel upstream behind it.

Pages, the SDK build and ``/mp/`` share one origin (the proxy app serves all
three), as in production behind nginx. ``www.site-a.test``,
``shop.site-a.test`` and ``checkout.site-b.test`` all resolve to 127.0.0.1
inside the browser. The browser side only drives and reports
(``drive.mjs``); every assertion is here, mostly against what the fake
upstream received.

Scenarios whose events take the fire-and-forget routes (track, engage,
groups) run in both delivery modes: ``spool`` (answered once durably
spooled, delivered in batches by the sender) and ``sync``.

Identity across *registrable* domains (bridge tokens, link.js, hub) is covered
in ``test_crossdomain_browser.py``; here checkout.site-b.test only shows that
each registrable domain gets its own cookie.

Run: ``bash tests/e2e/install.sh && python -m pytest tests/e2e``;
deselect with ``-m "not browser"``.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import time
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest

from tests.conftest import TOKEN, canonical_of
from tests.e2e.harness import (
    KEEP_RECORD_BODIES,
    Run,
    Site,
    arrived,
    assert_no_cookie_leak,
    decode_data,
    drive,
    event_named,
    query_of,
    sdk_build,
)
from tests.support import event, goto, js, sent_events, sent_events_of, wait

pytestmark = pytest.mark.browser

BOTH_MODES = pytest.mark.parametrize("site", ["spool", "sync"], indirect=True)

IDS = (
    "({distinct: mixpanel.get_distinct_id(), device: mixpanel.get_property('$device_id'),"
    " user: mixpanel.get_property('$user_id') || null})"
)
FAST = {"batch_flush_interval_ms": 100}  # batching stays on; batches leave quickly
MAX_AGE = 400 * 86400
BASIC = "Basic " + base64.b64encode(f"{TOKEN}:".encode()).decode()
# Text that must survive decoding, rewriting and re-encoding unchanged.
AWKWARD = "Café ☕ 日本 + / = & %2B ?x=1#y \"quoted\""


# ----------------------------------------------------------------- helpers


def visit_then_wipe(
    site: Site, host: str, path: str, mp: str = "/mp/", settle: tuple[dict[str, Any], ...] = ()
) -> list[dict[str, Any]]:
    """A first visit that gets the fp_id cookie (results["first"] holds the SDK's ids),
    then Safari-style loss of script storage and a reload (results["second"]).
    ``settle``: waits for the first page's other requests, which the reload would abort.

    Requests of the reloaded page are counted from the mark before the reload."""
    return [
        goto(site, host, path),
        js(f"mixpanel.track('First visit', {{}}, {{send_immediately: true}}); return {IDS};", "first"),
        wait(mp + "track/", event("First visit")),
        *settle,
        {"op": "cookies", "save": "cookies_before"},
        # Some time passes before the storage is gone. With conftest.IDENTITY every
        # device change is a renewal, but the proxy stores sighting times rounded to
        # whole seconds: a change less than 0.5 s after the last sighting can look
        # like one from before it and be taken for a reset().
        {"op": "sleep", "ms": 600},
        {"op": "wipe_script_storage"},
        {"op": "mark"},
        {"op": "reload"},
        js(f"return {IDS};", "second"),
    ]


def check_browser(run: Run) -> None:
    """The page ran clean: no console errors, no uncaught exceptions, every /mp/ request answered 2xx."""
    assert not run.page_errors, run.describe()
    assert not run.console_errors(), run.describe()
    for request in run.requests:
        if request["resource_type"] == "ping" and request["status"] is None:
            continue  # a beacon's answer is not always reported
        assert request["failure"] is None and 200 <= (request["status"] or 0) < 300, run.describe()


def fp_cookie(run: Run, domain: str, key: str = "cookies") -> dict[str, Any]:
    found = [c for c in run.results[key] if c["name"] == "fp_id" and c["domain"] == domain]
    assert len(found) == 1, f"fp_id cookies for {domain}: {run.results[key]}"
    return found[0]


def sent_event(run: Run, name: str) -> dict[str, Any]:
    found = [e for e in sent_events(run) if e.get("event") == name]
    assert found, f"the SDK never sent {name!r}"
    return found[-1]


def request_carrying(run: Run, name: str, path: str = "/mp/track/") -> dict[str, Any]:
    (request,) = [r for r in run.browser_requests(path) if any(e.get("event") == name for e in sent_events_of(r))]
    return request


def header(headers: list[dict[str, str]] | None, name: str) -> list[str]:
    return [h["value"] for h in headers or [] if h["name"].lower() == name]


def cookie_values(run: Run) -> list[str]:
    """Every fp_id value the browser held at any ``cookies`` step."""
    return [
        c["value"]
        for key, cookies in run.results.items()
        if key.startswith("cookies")
        for c in cookies
        if c["name"] == "fp_id"
    ]


def assert_track_wire(site: Site) -> None:
    """What reached upstream /track with the browser's events: the route (with
    mixpanel-js's trailing slash in sync mode, where the request is passed on as it
    came) and ip=1 for geolocation."""
    recs = [
        r for r in site.upstream.by("us", "/track") if all(e["properties"].get("mp_lib") == "web" for e in r.events())
    ]
    assert recs
    for rec in recs:
        assert rec.method == "POST"
        assert rec.path == "/track/" if site.mode == "sync" else rec.path in ("/track", "/track/")
        assert query_of(rec).get("ip") == "1", rec.query


async def forwarded_rewrites(site: Site, expected: set[tuple[str, str, str]], timeout: float = 5.0) -> None:
    """The forwarded log shows each expected rewrite (field, from, to)."""
    services = site.services
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        services.forwarded.flush()
        path = services.forwarded.path
        lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        seen = {(r["field"], r["from"], r["to"]) for line in lines for r in line.get("rewrites", ())}
        if expected <= seen:
            return
        if loop.time() > deadline:
            raise AssertionError(f"forwarded log lacks rewrites {expected - seen}; has {seen}")
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------- tests


@BOTH_MODES
async def test_first_visit_adopts_the_sdk_device_id(site: Site) -> None:
    """a. First visit, batching on: the event reaches upstream /track with ip=1 and the
    SDK's own device id, and the browser holds an HttpOnly fp_id for .site-a.test whose
    canonical id is that device id (first come)."""
    # One run with mixpanel-js's own defaults (its batch leaves after 5 s), the other
    # with a short flush interval so it need not wait as long.
    path = site.page("a", {} if site.mode == "spool" else FAST)
    run = await drive(
        [
            goto(site, "www.site-a.test", path),
            js(f"mixpanel.track('Page A'); return {IDS};", "ids"),
            wait("/mp/track/", event("Page A")),
            js("return document.cookie;", "document_cookie"),
            {"op": "cookies", "save": "cookies"},
        ]
    )
    check_browser(run)
    device = run["ids"]["device"]
    assert run["ids"]["distinct"] == f"$device:{device}"

    # The cookie: server-set, HttpOnly (invisible to scripts), parent domain, first come.
    cookie = fp_cookie(run, ".site-a.test")
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Lax"
    assert cookie["secure"] is False  # cookie.secure = false for local http
    assert canonical_of(cookie["value"]) == device
    assert abs(cookie["expires"] - (time.time() + MAX_AGE)) < 3600
    assert "fp_id" not in run["document_cookie"]

    # What the SDK sent (a batch), and what the proxy answered it.
    request = request_carrying(run, "Page A")
    assert request["method"] == "POST" and request["resource_type"] == "xhr"
    assert request["headers"]["content-type"] == "application/x-www-form-urlencoded"
    assert request["post_data"].startswith("data=")
    query = dict(parse_qsl(urlsplit(request["url"]).query))
    assert query["verbose"] == "1" and query["ip"] == "1" and query["_"].isdigit()
    assert isinstance(decode_data(dict(parse_qsl(request["post_data"]))["data"]), list)
    origin = site.url("www.site-a.test").rstrip("/")
    assert header(request["response_headers"], "access-control-allow-origin") == [origin]
    assert header(request["response_headers"], "access-control-allow-credentials") == ["true"]
    (set_cookie,) = header(request["response_headers"], "set-cookie")
    assert set_cookie.startswith("fp_id=") and "HttpOnly" in set_cookie and "Domain=.site-a.test" in set_cookie

    # What Mixpanel received.
    props = (await event_named(site.upstream, "Page A"))["properties"]
    assert props["$device_id"] == device
    assert props["distinct_id"] == f"$device:{device}"
    assert props["token"] == TOKEN
    assert "$user_id" not in props
    assert_track_wire(site)
    assert_no_cookie_leak(site.upstream, cookie_values(run))


@BOTH_MODES
async def test_storage_wipe_keeps_the_canonical_id(site: Site) -> None:
    """b. Safari-style wipe of localStorage and script-set cookies (the HttpOnly fp_id
    survives; the 7 days Safari waits are configured away, see conftest.IDENTITY):
    mixpanel-js mints a new device id, the upstream sees the original one.
    The proxy remembers new -> canonical, so a server-side event (official Python SDK)
    with the new id is rewritten too; the forwarded log shows the rewrites."""
    path = site.page("b", FAST)
    run = await drive(
        [
            *visit_then_wipe(site, "www.site-a.test", path),
            js(f"mixpanel.track('After wipe', {{note: {json.dumps(AWKWARD)}}}); return 1;"),
            wait("/mp/track/", event("After wipe")),
            {"op": "cookies", "save": "cookies"},
        ]
    )
    check_browser(run)
    first, second = run["first"]["device"], run["second"]["device"]
    assert second != first, "mixpanel-js should have minted a new device id after the wipe"
    assert run["second"]["distinct"] == f"$device:{second}"
    before = fp_cookie(run, ".site-a.test", "cookies_before")["value"]
    canonical = canonical_of(before)
    assert canonical == first
    assert fp_cookie(run, ".site-a.test")["value"] == before

    assert sent_event(run, "After wipe")["properties"]["$device_id"] == second  # the SDK sent the new id
    props = (await event_named(site.upstream, "After wipe"))["properties"]
    assert props["$device_id"] == canonical
    assert props["distinct_id"] == f"$device:{canonical}"
    assert props["note"] == AWKWARD  # re-encoding kept the rest of the event intact

    # A server-side event (the official Python SDK, no browser signals) with the new id.
    from mixpanel import Consumer, Mixpanel

    consumer = Consumer(events_url=f"http://127.0.0.1:{site.port}/mp/track", request_timeout=5)
    await asyncio.to_thread(Mixpanel(TOKEN, consumer=consumer).track, second, "Server side")
    assert (await event_named(site.upstream, "Server side"))["properties"]["distinct_id"] == canonical

    await forwarded_rewrites(
        site,
        {
            ("$device_id", second, canonical),
            ("distinct_id", f"$device:{second}", f"$device:{canonical}"),
            ("distinct_id", second, canonical),  # the server-side event, through the alias store
        },
    )
    assert_track_wire(site)
    assert_no_cookie_leak(site.upstream, cookie_values(run))


@BOTH_MODES
async def test_identify_rewrites_the_anon_id_and_keeps_the_user_id(site: Site) -> None:
    """c. After anonymous tracking, identify('user-1'): upstream gets $identify with
    $anon_distinct_id = $device:<canonical>, and later events keep distinct_id and
    $user_id 'user-1' untouched (their $device_id rewritten)."""
    path = site.page("c", FAST)
    run = await drive(
        [
            *visit_then_wipe(site, "www.site-a.test", path),
            js(f"mixpanel.track('Anon'); mixpanel.identify('user-1'); mixpanel.track('Known'); return {IDS};", "after"),
            wait("/mp/track/", event("$identify")),
            wait("/mp/track/", event("Known")),
        ]
    )
    check_browser(run)
    canonical, second = run["first"]["device"], run["second"]["device"]
    assert run["after"]["distinct"] == "user-1" and run["after"]["user"] == "user-1"
    assert sent_event(run, "$identify")["properties"]["$anon_distinct_id"] == f"$device:{second}"

    anon = (await event_named(site.upstream, "Anon"))["properties"]
    assert anon["distinct_id"] == f"$device:{canonical}" and anon["$device_id"] == canonical

    identify = (await event_named(site.upstream, "$identify"))["properties"]
    assert identify["$anon_distinct_id"] == f"$device:{canonical}"
    assert identify["distinct_id"] == "user-1"
    assert identify["$user_id"] == "user-1"
    assert identify["$device_id"] == canonical

    known = (await event_named(site.upstream, "Known"))["properties"]
    assert known["distinct_id"] == "user-1"
    assert known["$user_id"] == "user-1"
    assert known["$device_id"] == canonical
    assert_track_wire(site)
    assert_no_cookie_leak(site.upstream, cookie_values(run))


@pytest.mark.parametrize("version", ["2.45", "2.55", "latest"])
async def test_older_sdk_versions_take_the_same_journey(site: Site, version: str) -> None:
    """The main journey with the mixpanel-browser versions sites still run (2.45 from
    2022, 2.55, and the latest): a storage wipe, anonymous tracking and identify; the
    upstream sees one canonical id and the user id untouched, whatever the version's
    own wire details (its batching, its $device_id handling)."""
    if version != "latest":
        site.sdk = sdk_build(version)
        assert site.sdk.is_file(), f"tests/e2e/install.sh installs mixpanel-browser {version}"
    path = site.page(f"v{version}", FAST)
    run = await drive(
        [
            *visit_then_wipe(site, "www.site-a.test", path),
            js(f"mixpanel.track('Anon'); mixpanel.identify('user-1'); mixpanel.track('Known'); return {IDS};", "after"),
            wait("/mp/track/", event("Known")),
        ]
    )
    check_browser(run)
    canonical, second = run["first"]["device"], run["second"]["device"]
    assert second != canonical
    lib = sent_event(run, "Known")["properties"]["$lib_version"]
    assert version == "latest" or lib == f"{version}.0", lib
    anon = (await event_named(site.upstream, "Anon"))["properties"]
    # 2.45 sends the bare device id as an anonymous distinct_id, later ones "$device:<id>":
    # the rewrite keeps the SDK's own form.
    prefix = "$device:" if sent_event(run, "Anon")["properties"]["distinct_id"].startswith("$device:") else ""
    assert prefix or version == "2.45"
    assert anon["$device_id"] == canonical and anon["distinct_id"] == prefix + canonical
    known = (await event_named(site.upstream, "Known"))["properties"]
    assert known["distinct_id"] == "user-1" and known["$user_id"] == "user-1" and known["$device_id"] == canonical
    assert_no_cookie_leak(site.upstream, cookie_values(run))


@BOTH_MODES
async def test_subdomains_share_the_canonical_id(site: Site) -> None:
    """d. cookie.domains has .site-a.test: shop.site-a.test, with its own mixpanel storage
    (cross_subdomain_cookie: false), is rewritten to the id www.site-a.test got.
    checkout.site-b.test gets its own cookie scoped to .site-b.test (cross-domain identity
    is not covered here, so nothing is asserted about how its id relates to site A's)."""
    path = site.page("d", {**FAST, "cross_subdomain_cookie": False})
    run = await drive(
        [
            goto(site, "www.site-a.test", path),
            js(f"mixpanel.track('On www'); return {IDS};", "www"),
            wait("/mp/track/", event("On www")),
            goto(site, "shop.site-a.test", path),
            js(f"mixpanel.track('On shop'); return {IDS};", "shop"),
            wait("/mp/track/", event("On shop")),
            goto(site, "checkout.site-b.test", path),
            js(f"mixpanel.track('On checkout'); return {IDS};", "checkout"),
            wait("/mp/track/", event("On checkout")),
            {"op": "cookies", "save": "cookies"},
        ]
    )
    check_browser(run)
    www, shop = run["www"]["device"], run["shop"]["device"]
    assert shop != www, "shop.site-a.test should have had its own mixpanel storage"
    mp_domains = sorted(c["domain"] for c in run["cookies"] if c["name"] == f"mp_{TOKEN}_mixpanel")
    assert mp_domains == ["checkout.site-b.test", "shop.site-a.test", "www.site-a.test"]  # host-only

    assert canonical_of(fp_cookie(run, ".site-a.test")["value"]) == www
    assert sent_event(run, "On shop")["properties"]["$device_id"] == shop
    on_shop = (await event_named(site.upstream, "On shop"))["properties"]
    assert on_shop["$device_id"] == www
    assert on_shop["distinct_id"] == f"$device:{www}"

    site_b = fp_cookie(run, ".site-b.test")
    on_checkout = (await event_named(site.upstream, "On checkout"))["properties"]
    assert on_checkout["$device_id"] == canonical_of(site_b["value"])
    assert_track_wire(site)
    assert_no_cookie_leak(site.upstream, cookie_values(run))


@BOTH_MODES
async def test_send_beacon_events_are_rewritten(site: Site) -> None:
    """e. Beacons (text/plain body, answer unread): an explicit sendBeacon track, and the
    batch mixpanel-js flushes with sendBeacon when the page is hidden (navigating away),
    both arrive upstream rewritten to the canonical id."""
    path = site.page("e", {"batch_flush_interval_ms": 60000})  # the batch leaves only on page hide
    run = await drive(
        [
            *visit_then_wipe(site, "www.site-a.test", path),
            js(
                "mixpanel.track('Beacon now', {}, {transport: 'sendBeacon', send_immediately: true});"
                " mixpanel.track('Queued until hide'); return 1;"
            ),
            wait("/mp/track/", event("Beacon now")),
            goto(site, "www.site-a.test", "/blank"),  # visibilitychange -> hidden -> batch sent as a beacon
            {"op": "poll", "url": site.seen_upstream("/track", event("Queued until hide")), "timeout_ms": 10000},
        ]
    )
    check_browser(run)
    canonical, second = run["first"]["device"], run["second"]["device"]
    assert second != canonical

    beacon = request_carrying(run, "Beacon now")
    assert beacon["resource_type"] == "ping" and beacon["method"] == "POST"
    assert beacon["headers"]["content-type"] == "text/plain;charset=UTF-8"
    assert beacon["post_data"].startswith("data=")
    assert isinstance(decode_data(dict(parse_qsl(beacon["post_data"]))["data"]), dict)  # one event, unbatched
    assert "fp_id=" in beacon["headers"].get("cookie", "")  # beacons carry the cookie

    for name in ("Beacon now", "Queued until hide"):
        props = (await event_named(site.upstream, name))["properties"]
        assert props["$device_id"] == canonical, name
        assert props["distinct_id"] == f"$device:{canonical}", name
    assert_track_wire(site)
    assert_no_cookie_leak(site.upstream, cookie_values(run))


@BOTH_MODES
async def test_people_and_groups_reach_engage_and_groups(site: Site) -> None:
    """f. people.set({plan: 'pro'}) reaches /engage/ with $device_id rewritten. mixpanel-js
    queues people updates of an anonymous user locally ("PENDING IDENTIFY") and sends
    them only after identify(), so the update carries the user id, untouched.
    A group update reaches /groups/ as it was sent (groups carry no person id)."""
    path = site.page("f", FAST)
    run = await drive(
        [
            *visit_then_wipe(site, "www.site-a.test", path),
            js(
                "mixpanel.people.set({plan: 'pro'}); mixpanel.identify('user-1');"
                " mixpanel.get_group('company', 'acme').set({name: 'Acme'}); return 1;"
            ),
            wait("/mp/engage/", '"plan":"pro"'),
            wait("/mp/groups/", '"$group_id":"acme"'),
        ]
    )
    check_browser(run)
    canonical, second = run["first"]["device"], run["second"]["device"]
    sent = [u for u in sent_events(run, "/mp/engage/") if u.get("$set", {}).get("plan") == "pro"]
    assert sent and sent[-1]["$device_id"] == second and sent[-1]["$distinct_id"] == "user-1"

    update = (await arrived(site.upstream, lambda u: u.get("$set", {}).get("plan") == "pro", "/engage"))[-1]
    assert update["$device_id"] == canonical
    assert update["$distinct_id"] == "user-1"
    assert update["$user_id"] == "user-1"
    assert update["$token"] == TOKEN
    for rec in site.upstream.by("us", "/engage"):
        assert rec.path.rstrip("/") == "/engage" and query_of(rec).get("ip") == "1"
        for u in rec.events():
            assert u.get("$device_id") in (None, canonical), u

    sent_group = [g for g in sent_events(run, "/mp/groups/") if g.get("$group_id") == "acme"][-1]
    group = (await arrived(site.upstream, lambda g: g.get("$group_id") == "acme", "/groups"))[-1]
    assert group == sent_group
    assert_no_cookie_leak(site.upstream, cookie_values(run))


async def test_feature_flags_context_is_rewritten(site: Site) -> None:
    """f. flags: true -> GET /mp/flags/?context=<JSON>&token=..: its distinct_id/device_id are
    rewritten, Authorization and traceparent pass, and the SDK gets the fake's variant.
    remote_settings_mode -> GET /mp/settings/ passes as it is, with Authorization."""
    path = site.page("flags", {**FAST, "flags": True, "remote_settings_mode": "fallback"})
    run = await drive(
        [
            # The first page's settings fetch answered before the reload, which would abort it.
            *visit_then_wipe(site, "www.site-a.test", path, settle=(wait("/mp/settings/"),)),
            wait("/mp/flags/"),
            js("return await mixpanel.flags.get_variant_value('new-checkout', 'fallback');", "variant"),
            wait("/mp/track/", event("$experiment_started")),
        ]
    )
    check_browser(run)
    canonical, second = run["first"]["device"], run["second"]["device"]
    assert run["variant"] is True

    request = run.browser_requests("/mp/flags/")[-1]
    assert request["method"] == "GET" and request["resource_type"] == "fetch"
    assert request["headers"]["authorization"] == BASIC
    sent_context = json.loads(dict(parse_qsl(urlsplit(request["url"]).query))["context"])
    assert sent_context == {"distinct_id": f"$device:{second}", "device_id": second}

    rec = site.upstream.by("us", "/flags")[-1]
    assert rec.method == "GET" and rec.path == "/flags/"
    query = query_of(rec)
    assert json.loads(query["context"]) == {"distinct_id": f"$device:{canonical}", "device_id": canonical}
    assert query["token"] == TOKEN and query["mp_lib"] == "web"
    assert rec.headers["authorization"] == BASIC
    assert rec.headers["traceparent"] == request["headers"]["traceparent"]
    started = (await event_named(site.upstream, "$experiment_started"))["properties"]
    assert started["$device_id"] == canonical

    settings = site.upstream.by("us", "/settings")
    assert settings, "the SDK's remote settings request never reached the upstream"
    for rec in settings:
        assert rec.method == "GET" and rec.path == "/settings/"
        assert query_of(rec) == {"$lib_version": query["$lib_version"], "mp_lib": "web", "sdk_config": "1"}
        assert rec.headers["authorization"] == BASIC
    assert_no_cookie_leak(site.upstream, cookie_values(run))


@pytest.mark.parametrize("fmt", ["gzip", "body"])
async def test_session_replay_identity_is_rewritten(site: Site, fmt: str) -> None:
    """f. Session replay (bundled in the UMD build, nothing downloaded): POST
    /mp/record/?...&format=gzip with an application/octet-stream gzip body (or, where
    the browser lacks CompressionStream, format=body with the JSON itself); the ids in
    the query are rewritten and the body reaches the upstream byte for byte."""
    # Without CompressionStream mixpanel-js sends the replay uncompressed (format=body).
    pre = KEEP_RECORD_BODIES + ("window.CompressionStream = undefined;" if fmt == "body" else "")
    path = site.page("record", {**FAST, "record_sessions_percent": 100}, pre=pre)
    run = await drive(
        [
            *visit_then_wipe(site, "www.site-a.test", path),
            {"op": "wait_js", "js": "(mixpanel.get_session_recording_properties() || {})['$mp_replay_id']"},
            {"op": "mouse", "moves": 12},
            js("await mixpanel.stop_session_recording(); return 1;"),
            wait("/mp/record/"),
            js("return await Promise.all(window.__recordBodies);", "record_bodies"),
        ]
    )
    check_browser(run)
    canonical, second = run["first"]["device"], run["second"]["device"]

    request = run.browser_requests("/mp/record/")[-1]
    sent_query = dict(parse_qsl(urlsplit(request["url"]).query))
    assert sent_query["distinct_id"] == f"$device:{second}" and sent_query["$device_id"] == second
    assert sent_query["format"] == fmt
    assert request["headers"]["content-type"] == "application/octet-stream"
    assert request["headers"]["authorization"] == BASIC
    assert "content-encoding" not in request["headers"]
    if fmt == "gzip":
        (sent_body,) = [base64.b64decode(b["body"]) for b in run["record_bodies"] if b["url"] == request["url"]]
    else:
        sent_body = request["post_data"].encode()

    (rec,) = [r for r in site.upstream.by("us", "/record") if query_of(r)["replay_id"] == sent_query["replay_id"]]
    query = query_of(rec)
    assert rec.method == "POST" and rec.path == "/record/"
    assert query["distinct_id"] == f"$device:{canonical}"
    assert query["$device_id"] == canonical
    ids = ("distinct_id", "$device_id")
    assert {k: v for k, v in query.items() if k not in ids} == {k: v for k, v in sent_query.items() if k not in ids}
    assert rec.headers["content-type"] == "application/octet-stream"
    assert "content-encoding" not in rec.headers
    assert rec.headers["authorization"] == BASIC
    assert rec.body == sent_body
    replay = json.loads(gzip.decompress(rec.body) if fmt == "gzip" else rec.body)
    assert isinstance(replay, list) and any(e.get("type") == 2 for e in replay)  # rrweb FullSnapshot
    for r in site.upstream.by("us", "/record"):
        assert query_of(r)["$device_id"] == canonical
    assert_no_cookie_leak(site.upstream, cookie_values(run))


VARIANTS = {
    # api_payload_format 'json': data=<urlencoded JSON> instead of base64.
    "post-json": ({"api_payload_format": "json"}, "{}"),
    # api_method 'GET' (only for requests sent immediately: batches always POST):
    # the payload travels in the query string.
    "get-base64": ({"api_method": "GET"}, "{send_immediately: true}"),
    "get-json": ({"api_method": "GET", "api_payload_format": "json"}, "{send_immediately: true}"),
}


@pytest.mark.parametrize("site", ["sync"], indirect=True)
@pytest.mark.parametrize("variant", list(VARIANTS))
async def test_payload_variants_are_rewritten(site: Site, variant: str) -> None:
    """The other payload forms mixpanel-js can be configured to send are decoded,
    rewritten and re-encoded in the form they came in without damage (sync mode: the
    request is passed on in its own form; the spool sender builds its own batches)."""
    config, options = VARIANTS[variant]
    path = site.page(variant, {**FAST, **config})
    run = await drive(
        [
            *visit_then_wipe(site, "www.site-a.test", path),
            js(f"mixpanel.track('Variant', {{note: {json.dumps(AWKWARD)}}}, {options}); return 1;"),
            wait("/mp/track/", event("Variant")),
        ]
    )
    check_browser(run)
    canonical, second = run["first"]["device"], run["second"]["device"]
    request = request_carrying(run, "Variant")
    assert request["method"] == ("GET" if variant.startswith("get") else "POST")
    assert sent_event(run, "Variant")["properties"]["$device_id"] == second

    props = (await event_named(site.upstream, "Variant"))["properties"]
    assert props["$device_id"] == canonical
    assert props["distinct_id"] == f"$device:{canonical}"
    assert props["note"] == AWKWARD
    (rec,) = [r for r in site.upstream.by("us", "/track") if any(e.get("event") == "Variant" for e in r.events())]
    assert rec.method == request["method"] and rec.path == "/track/"
    data = dict(rec.query).get("data") if rec.method == "GET" else rec.form()["data"]
    assert data.lstrip().startswith(("{", "[")) == ("json" in variant)  # same payload format as sent
    assert_no_cookie_leak(site.upstream, cookie_values(run))


async def test_api_host_with_trailing_slash(site: Site) -> None:
    """api_host ending in "/" makes mixpanel-js request /mp//track/, /mp//flags/,
    /mp//engage/: all are accepted and rewritten."""
    path = site.page("slash", {**FAST, "flags": True}, api_host=site.url("www.site-a.test", "/mp/"))
    run = await drive(
        [
            *visit_then_wipe(site, "www.site-a.test", path, mp="/mp//"),
            wait("/mp//flags/"),
            js("mixpanel.track('Slash'); mixpanel.people.set({plan: 'slash'}); mixpanel.identify('user-2'); return 1;"),
            wait("/mp//track/", event("Slash")),
            wait("/mp//engage/", '"plan":"slash"'),
        ]
    )
    check_browser(run)
    canonical = run["first"]["device"]
    assert run.browser_requests("/mp//track/") and not run.browser_requests("/mp/track/")
    assert (await event_named(site.upstream, "Slash"))["properties"]["$device_id"] == canonical
    update = (await arrived(site.upstream, lambda u: u.get("$set", {}).get("plan") == "slash", "/engage"))[-1]
    assert update["$device_id"] == canonical and update["$distinct_id"] == "user-2"
    contexts = [json.loads(query_of(r)["context"]) for r in site.upstream.by("us", "/flags")]
    assert {"distinct_id": f"$device:{canonical}", "device_id": canonical} in contexts
    assert all(c["device_id"] == canonical and c["distinct_id"] in (f"$device:{canonical}", "user-2") for c in contexts)
    assert_no_cookie_leak(site.upstream, cookie_values(run))


@BOTH_MODES
async def test_large_batches_arrive_complete(site: Site) -> None:
    """120 events tracked at once: mixpanel-js sends batches of at most 50; every event
    arrives upstream exactly once, rewritten."""
    path = site.page("bulk", {"batch_flush_interval_ms": 2000})
    run = await drive(
        [
            *visit_then_wipe(site, "www.site-a.test", path),
            # A few ms apart: enqueueing 120 in one tick makes mixpanel-js's localStorage
            # queue lock time out (its own console errors), which is not what this tests.
            js(
                "for (var i = 0; i < 120; i++) {"
                " mixpanel.track('Bulk', {n: i}); await new Promise(function (r) { setTimeout(r, 4); }); }"
                " return 1;"
            ),
            wait("/mp/track/", event("Bulk"), count=3, timeout_ms=15000),
            {"op": "poll", "url": site.seen_upstream("/track", event("Bulk"), count=1), "timeout_ms": 10000},
        ]
    )
    check_browser(run)
    canonical = run["first"]["device"]
    batches = [[e for e in sent_events_of(r) if e["event"] == "Bulk"] for r in run.browser_requests("/mp/track/")]
    batches = [b for b in batches if b]
    assert sum(len(b) for b in batches) == 120 and max(len(b) for b in batches) <= 50

    bulk = await arrived(site.upstream, lambda e: e.get("event") == "Bulk")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while len(bulk) < 120 and loop.time() < deadline:
        await asyncio.sleep(0.05)
        bulk = await arrived(site.upstream, lambda e: e.get("event") == "Bulk")
    assert sorted(e["properties"]["n"] for e in bulk) == list(range(120))
    assert len({e["properties"]["$insert_id"] for e in bulk}) == 120
    assert all(e["properties"]["$device_id"] == canonical for e in bulk)
    assert all(len(r.events()) <= 50 for r in site.upstream.by("us", "/track"))
    assert_no_cookie_leak(site.upstream, cookie_values(run))


async def test_cross_origin_api_host(site: Site) -> None:
    """The SDK on www.site-a.test with api_host on api.site-a.test (another origin, same
    site, allowed by cors.allowed_origins): chromium accepts the proxy's CORS answers to
    credentialed XHRs and to the preflighted flags fetch (Authorization, traceparent);
    the XHRs carry fp_id, so events are rewritten.

    mixpanel-js's fetch() calls (flags, record, settings) use the default credentials
    mode ("same-origin"), so cross-origin they carry no cookie at all: their identity
    can only come from the alias store, which is not asserted here."""
    api = site.url("api.site-a.test", "/mp")
    path = site.page("cors", {**FAST, "flags": True}, api_host=api)
    run = await drive(
        [
            *visit_then_wipe(site, "www.site-a.test", path),
            js(
                "mixpanel.track('Cross origin');"
                " return await mixpanel.flags.get_variant_value('new-checkout', 'fallback');",
                "variant",
            ),
            wait("/mp/track/", event("Cross origin")),
            {"op": "cookies", "save": "cookies"},
        ]
    )
    check_browser(run)
    canonical = run["first"]["device"]
    assert run["variant"] is True  # the flags answer passed CORS
    origin = site.url("www.site-a.test").rstrip("/")
    for request in run.requests:
        assert urlsplit(request["url"]).hostname == "api.site-a.test"
        assert header(request["response_headers"], "access-control-allow-origin") == [origin]
        assert header(request["response_headers"], "access-control-allow-credentials") == ["true"]
    for request in run.browser_requests("/mp/flags/"):
        assert "fp_id=" not in request["headers"].get("cookie", "")  # fetch() without credentials
    track = request_carrying(run, "Cross origin")
    assert "fp_id=" in track["headers"].get("cookie", "")  # XHR withCredentials
    assert canonical_of(fp_cookie(run, ".site-a.test")["value"]) == canonical
    props = (await event_named(site.upstream, "Cross origin"))["properties"]
    assert props["$device_id"] == canonical
    assert_no_cookie_leak(site.upstream, cookie_values(run))


@pytest.mark.parametrize("site", [{"identity": {}}], indirect=True, ids=["reset-window-7d"])
async def test_reset_starts_a_new_canonical_id(site: Site) -> None:
    """mixpanel.reset() after identify (a logout, maybe on a shared computer): the new
    anonymous device id is not rewritten to the canonical id the previous user was
    merged with; the browser gets a new fp_id."""
    path = site.page("reset", FAST)
    run = await drive(
        [
            goto(site, "www.site-a.test", path),
            js(f"mixpanel.track('Before login'); return {IDS};", "first"),
            wait("/mp/track/", event("Before login")),
            {"op": "cookies", "save": "cookies_before"},
            js("mixpanel.identify('user-1'); mixpanel.track('Logged in'); return 1;"),
            wait("/mp/track/", event("Logged in")),
            js(f"mixpanel.reset(); mixpanel.track('After logout'); return {IDS};", "after"),
            wait("/mp/track/", event("After logout")),
            {"op": "cookies", "save": "cookies"},
        ]
    )
    check_browser(run)
    first, after = run["first"]["device"], run["after"]["device"]
    assert after != first and run["after"]["user"] is None
    assert canonical_of(fp_cookie(run, ".site-a.test", "cookies_before")["value"]) == first

    identify = (await event_named(site.upstream, "$identify"))["properties"]
    assert identify["$anon_distinct_id"] == f"$device:{first}" and identify["distinct_id"] == "user-1"
    logout = (await event_named(site.upstream, "After logout"))["properties"]
    assert logout["distinct_id"] != f"$device:{first}", "post-logout events merged into user-1's identity"
    assert logout["$device_id"] == after
    assert logout["distinct_id"] == f"$device:{after}"
    assert canonical_of(fp_cookie(run, ".site-a.test")["value"]) == after
    assert_no_cookie_leak(site.upstream, cookie_values(run))


@pytest.mark.parametrize("site", [{"identity": {}}], indirect=True, ids=["reset-window-7d"])
async def test_reset_inside_one_default_batch_starts_a_new_person(site: Site) -> None:
    """The same logout with mixpanel-browser's default batching (a flush every 5 s, as
    sites run it): identify, a purchase, reset() and the next person's first event
    leave in one request. The events before reset() stay the user's; 'After logout'
    is the new device's, and the browser's fp_id follows it."""
    path = site.page("reset-batched")  # no batch_flush_interval_ms: the SDK's default
    run = await drive(
        [
            goto(site, "www.site-a.test", path),
            js(f"mixpanel.track('Before login'); return {IDS};", "first"),
            wait("/mp/track/", event("Before login"), timeout_ms=15000),
            js("mixpanel.identify('user-1'); mixpanel.track('Purchase'); mixpanel.reset();"
               f" mixpanel.track('After logout'); return {IDS};", "after"),
            wait("/mp/track/", event("After logout"), timeout_ms=15000),
            js("mixpanel.track('Browse'); return 1;"),
            wait("/mp/track/", event("Browse"), timeout_ms=15000),
            {"op": "cookies", "save": "cookies"},
        ]
    )
    check_browser(run)
    first, after = run["first"]["device"], run["after"]["device"]
    assert after != first
    # One request carried both sides of the logout (what the proxy must untangle).
    names = [e.get("event") for e in sent_events_of(request_carrying(run, "After logout"))]
    assert {"Purchase", "After logout"} <= set(names), names
    purchase = (await event_named(site.upstream, "Purchase"))["properties"]
    assert purchase["distinct_id"] == "user-1" and purchase["$device_id"] == first
    logout = (await event_named(site.upstream, "After logout"))["properties"]
    assert logout["$device_id"] == after and logout["distinct_id"] == f"$device:{after}"
    # The next page view is the new person's too, and so is the browser's fp_id. (The
    # identify's profile update left in parallel with the batch and may answer last
    # with the old cookie; the next request mends it: its device id is not the one
    # the old identity showed on this host.)
    browse = (await event_named(site.upstream, "Browse"))["properties"]
    assert browse["$device_id"] == after and browse["distinct_id"] == f"$device:{after}"
    assert canonical_of(fp_cookie(run, ".site-a.test")["value"]) == after
    assert_no_cookie_leak(site.upstream, cookie_values(run))


@BOTH_MODES
async def test_global_privacy_control_drops_events_without_retries(site: Site) -> None:
    """A browser with Global Privacy Control on (every request carries Sec-GPC: 1) runs
    mixpanel-browser as usual: the proxy answers the SDK as if accepted, so it neither
    retries nor keeps the batch, sets no identity cookie, and nothing reaches Mixpanel."""
    path = site.page("a", FAST)
    run = await drive(
        [
            goto(site, "www.site-a.test", path),
            js("mixpanel.track('Page A'); return true;"),
            {"op": "wait_requests", "path": "/mp/track/", "contains": "Page A"},
            js("mixpanel.track('Page B'); return true;"),
            {"op": "wait_requests", "path": "/mp/track/", "contains": "Page B"},
            {"op": "sleep", "ms": 600},  # a retry (or a batch kept for one) would show by now
            {"op": "cookies", "save": "cookies"},
        ],
        headers={"Sec-GPC": "1"},
    )
    check_browser(run)
    requests = run.browser_requests("/mp/track/")
    assert sorted(e["event"] for r in requests for e in sent_events_of(r)) == ["Page A", "Page B"]  # each once
    for request in requests:
        assert request["headers"].get("sec-gpc") == "1"
        assert request["status"] == 200 and not header(request["response_headers"], "set-cookie")
    assert not [c for c in run["cookies"] if c["name"] == "fp_id"]
    await asyncio.sleep(0.3)
    assert site.upstream.received("us", "/track") == []
    async with aiohttp.ClientSession() as session:
        async with session.get(site.ops_url("/metrics")) as resp:
            metrics = await resp.text()
    assert 'firstparty_consent_dropped_total{reason="gpc"} 2.0' in metrics


NEUTRAL = {
    "server": {"mounts": ["/a1/"], "route_aliases": {"e": "track", "p": "engage", "g": "groups"}},
    "delivery": {"mode": "spool"},
}


@pytest.mark.parametrize("site", [NEUTRAL], indirect=True)
async def test_a_neutral_mount_and_api_routes_get_past_filter_lists(site: Site) -> None:
    """Filter lists block ``/mp/`` and ``*/track``: with ``server.mounts = ["/a1/"]``
    and aliases matching mixpanel-js's ``api_routes``, the SDK posts to
    ``/a1/e/`` and ``/a1/p/``, which the proxy forwards to Mixpanel's real
    ``/track`` and ``/engage``, rewritten as usual; ``/mp/`` is not served."""
    api_host = site.url("www.site-a.test").rstrip("/") + "/a1"
    config = {**FAST, "api_routes": {"track": "e/", "engage": "p/", "groups": "g/"}}
    path = site.page("neutral", config, api_host=api_host)
    run = await drive(
        [
            goto(site, "www.site-a.test", path),
            js(
                f"mixpanel.track('Neutral'); mixpanel.identify('user-n'); mixpanel.people.set({{plan: 'x'}}); return {IDS};",
                "ids",
            ),
            wait("/a1/e", event("Neutral")),
            wait("/a1/p", '"plan":"x"'),
        ]
    )
    check_browser(run)
    assert run.browser_requests("/a1/e") and not run.browser_requests("/mp/")
    props = (await event_named(site.upstream, "Neutral"))["properties"]
    assert props["$device_id"] == run["ids"]["device"] and props["token"] == TOKEN
    assert {r.path.rstrip("/") for r in site.upstream.by("us")} <= {"/track", "/engage"}
    update = (await arrived(site.upstream, lambda u: u.get("$set", {}).get("plan") == "x", "/engage"))[-1]
    assert update["$distinct_id"] == "user-n"
    async with aiohttp.ClientSession() as http:
        async with http.post(site.url("127.0.0.1", "/mp/track/"), data="data=e30%3D") as resp:
            assert resp.status == 404


async def test_mixpanels_own_snippet_loads_the_first_party_library(site: Site) -> None:
    """Mixpanel's own snippet (npm mixpanel-browser's ``mixpanel-jslib-snippet.min.js``,
    read from the install, not kept in this repository) with
    ``MIXPANEL_CUSTOM_LIB_URL = "/mp/lib.min.js"``, as the README says: the snippet
    build comes through the proxy from the CDN, runs the queued init and track, and
    the event reaches Mixpanel with the canonical id."""
    from tests.e2e.harness import NODE_MODULES

    dist = NODE_MODULES / "mixpanel-browser" / "dist"
    site.upstream.mixpanel_js = dist / "mixpanel.min.js"  # what cdn.mxpnl.com serves as mixpanel-2-latest.min.js
    snippet = (dist / "mixpanel-jslib-snippet.min.js").read_text()
    site.pages["official"] = (
        "<!doctype html><html><head><meta charset='utf-8'><link rel='icon' href='data:,'><title>snippet</title>"
        "<script>window.MIXPANEL_CUSTOM_LIB_URL = '/mp/lib.min.js';</script>"
        f"<script>{snippet}</script>"
        f"<script>mixpanel.init({TOKEN!r}, {{api_host: location.origin + '/mp', batch_flush_interval_ms: 100}});"
        " mixpanel.track('Through the snippet');</script></head><body>snippet</body></html>"
    )
    run = await drive(
        [
            goto(site, "www.site-a.test", "/e2e/official"),
            {"op": "wait_js", "js": "window.mixpanel && window.mixpanel.__loaded === true"},
            wait("/mp/track/", event("Through the snippet")),
            {"op": "cookies", "save": "cookies"},
        ]
    )
    check_browser(run)
    assert [r["status"] for r in run.requests if r["url"].endswith("/mp/lib.min.js")] == [200]
    assert [r.path for r in site.upstream.by("cdn")] == ["/libs/mixpanel-2-latest.min.js"]
    canonical = canonical_of(next(c for c in run["cookies"] if c["name"] == "fp_id")["value"])
    props = (await event_named(site.upstream, "Through the snippet"))["properties"]
    assert props["$device_id"] == canonical and props["mp_lib"] == "web"
