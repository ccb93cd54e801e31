"""Cross-domain identity over real HTTP: /mp/go, /mp/bridge, /mp/id, the hub,
token redemption and every way a token is refused (the event still flows)."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import orjson
import pytest

from proxy.web.app import create_app
from proxy.core.tokens import KeyRing, generate_key_line
from tests.support import (
    A, B, IDENTITY, TRACK, browser, go_to_b, keys_of, landing_event, log_records, metric, token_of, visit_a,
)
from tests.conftest import b64_body, canonical_of, cookie_from, device_id, js_event, make_settings


async def test_go_decorates_and_b_adopts_the_carried_id(xclient, upstream):
    cookie_a = await visit_a(xclient)
    canonical = canonical_of(cookie_a)
    location = await go_to_b(xclient, cookie_a)
    parts = urlsplit(location)
    assert (parts.scheme, parts.netloc, parts.path) == ("http", B, "/cart")
    assert parts.query.startswith("fpb=")  # first: survives mixpanel-js's 255-character cut
    assert dict(parse_qsl(parts.query)) == {"fpb": token_of(location), "utm_source": "mail", "x": "1"}
    assert len(token_of(location)) <= 110
    claims = keys_of(xclient).open(token_of(location), purpose="bridge", audience="site-b.test", now=time.time())
    assert claims.canonical_id == canonical

    # On B, mixpanel-js has its own fresh device id; the landing URL carries the token.
    d_b = device_id()
    resp = await xclient.post(TRACK, data=b64_body([landing_event(location, d_b)]), headers=browser(B))
    assert resp.status == 200
    cookie_b = cookie_from(resp)
    assert canonical_of(cookie_b) == canonical
    assert "Domain=.site-b.test" in resp.headers["Set-Cookie"]
    # Later events on B: the cookie alone; the landing URL is now the referrer.
    later = js_event("Checkout", d_b, **{"$referrer": location, "$current_url": f"http://{B}/pay"})
    await xclient.post(TRACK, data=b64_body([later]), headers=browser(B, cookie_b))
    events = await upstream.wait(3, "us", "/track")
    for event in events:
        assert event["properties"]["$device_id"] == canonical
        for value in event["properties"].values():
            assert not (isinstance(value, str) and "fpb=" in value), value
    assert events[1]["properties"]["$current_url"] == f"http://{B}/cart?utm_source=mail&x=1"
    assert events[2]["properties"]["$referrer"] == f"http://{B}/cart?utm_source=mail&x=1"
    text = await (await xclient.ops_get("/metrics")).text()
    assert metric(text, 'firstparty_identity_tokens_total{result="redeemed_bridge"}') == 1
    assert metric(text, 'firstparty_identity_source_total{source="bridge"}') >= 1


async def test_a_token_land_js_redeemed_is_named_on_the_next_events(xclient, upstream, tmp_path):
    """Issue 23, point 4: land.js (or hub.js) redeems B's token before any SDK runs, so
    the SDK's first event on B comes with the cookie alone. That event, and the id it
    joins, are still named after the bridge that brought them (forwarded log and live
    view), not "cookie"; a later device on B, or B the next day, is the cookie's."""
    cookie_a = await visit_a(xclient)
    canonical = canonical_of(cookie_a)
    location = await go_to_b(xclient, cookie_a)
    live = xclient.services.live
    _recent, queue = live.watch()
    landed = await xclient.post("/mp/id", data=f"fpb={token_of(location)}&ref={quote(f'http://{A}/', safe='')}",
                                headers=browser(B))
    assert (await landed.json()) == {"id": canonical, "source": "bridge", "token": "accepted"}
    cookie_b = cookie_from(landed)
    d_b, seg_b = device_id(), device_id()
    resp = await xclient.post(TRACK, data=b64_body([js_event("Page B", d_b)]), headers=browser(B, cookie_b))
    assert resp.status == 200
    call = {"type": "page", "anonymousId": seg_b, "writeKey": "seg-write-key-us"}
    resp = await xclient.post("/seg/v1/p", data=orjson.dumps(call),
                              headers={**browser(B, cookie_b), "Content-Type": "text/plain"})
    assert resp.status == 200
    later = await xclient.post(TRACK, data=b64_body([js_event("Later", d_b)]), headers=browser(B, cookie_b))
    assert later.status == 200
    records = []
    while not queue.empty():
        records.append(queue.get_nowait())
    requests = [r for r in records if r["kind"] == "request"]
    assert [(r["source"], r["links"]) for r in requests] == [
        ("bridge", [(d_b, "bridge")]), ("bridge", [(seg_b, "bridge")]), ("cookie", [(d_b, "cookie")]),
    ], requests
    live.unwatch(queue)
    text = await (await xclient.ops_get("/metrics")).text()
    assert metric(text, 'firstparty_identity_source_total{source="bridge"}') == 2  # both SDKs' first requests
    logged = {name: r["sources"] for r in await log_records(xclient, tmp_path) for name in r.get("events") or []}
    # (spooled, a delivered batch may hold several requests: their sources together)
    assert "bridge" in logged["Page B"] and logged["$page"] == ["bridge"], logged


async def test_identify_on_b_merges_the_canonical_id(xclient, upstream):
    cookie_a = await visit_a(xclient)
    location = await go_to_b(xclient, cookie_a)
    d_b = device_id()
    ident = landing_event(location, d_b, **{"$anon_distinct_id": f"$device:{d_b}"})
    ident["event"] = "$identify"
    ident["properties"]["distinct_id"] = ident["properties"]["$user_id"] = "user-9"
    await xclient.post(TRACK, data=b64_body([ident]), headers=browser(B))
    p = (await upstream.wait(2, "us", "/track"))[-1]["properties"]
    assert p["$anon_distinct_id"] == f"$device:{canonical_of(cookie_a)}" and p["distinct_id"] == "user-9"


async def test_token_as_query_parameter_of_a_proxied_request(xclient, upstream, delivery_mode):
    cookie_a = await visit_a(xclient)
    token = token_of(await go_to_b(xclient, cookie_a))
    d_b = device_id()
    resp = await xclient.post(
        f"/mp/track/?fpb={token}&verbose=1&ip=1",
        data=b64_body([js_event("B", d_b, **{"$referrer": f"http://{A}/"})]),  # the page came from A
        headers=browser(B),
    )
    assert canonical_of(cookie_from(resp)) == canonical_of(cookie_a)
    [_, event] = await upstream.wait(2, "us", "/track")
    assert event["properties"]["$device_id"] == canonical_of(cookie_a)
    assert all(k != "fpb" for r in upstream.requests for k, _ in r.query)


def forged_tokens(client: Any, canonical: str) -> dict[str, str]:
    keys = keys_of(client)
    good = keys.seal(canonical, purpose="bridge", audience="site-b.test", now=time.time(), ttl=60)
    flip = "A" if good[40] != "A" else "B"
    other = KeyRing.from_file(generate_key_line("zz"))
    return {
        "expired": keys.seal(canonical, purpose="bridge", audience="site-b.test", now=time.time() - 120, ttl=60),
        "tampered": good[:40] + flip + good[41:],
        "wrong_audience": keys.seal(canonical, purpose="bridge", audience="site-a.test", now=time.time(), ttl=60),
        "unknown_key": other.seal(canonical, purpose="bridge", audience="site-b.test", now=time.time(), ttl=60),
        "garbage": "not-a-token",
    }


@pytest.mark.parametrize("kind", ["expired", "tampered", "wrong_audience", "unknown_key", "garbage"])
async def test_bad_tokens_are_refused_and_the_event_flows(xclient, upstream, kind):
    cookie_a = await visit_a(xclient)
    token = forged_tokens(xclient, canonical_of(cookie_a))[kind]
    d_b = device_id()
    url = f"http://{B}/?fpb={token}&utm_source=x"
    resp = await xclient.post(TRACK, data=b64_body([landing_event(url, d_b)]), headers=browser(B))
    assert resp.status == 200
    assert canonical_of(cookie_from(resp)) == d_b  # the per-domain id, not A's
    event = (await upstream.wait(2, "us", "/track"))[-1]["properties"]
    assert event["$device_id"] == d_b
    assert event["$current_url"] == f"http://{B}/?utm_source=x"  # stripped all the same
    text = await (await xclient.ops_get("/metrics")).text()
    reason = "expired" if kind == "expired" else "invalid"
    assert metric(text, f'firstparty_identity_tokens_total{{result="{reason}"}}') == 1


async def test_replay_by_another_browser_is_refused(xclient, upstream):
    cookie_a = await visit_a(xclient)
    location = await go_to_b(xclient, cookie_a)
    victim_device, attacker_device = device_id(), device_id()
    first = await xclient.post(TRACK, data=b64_body([landing_event(location, victim_device)]), headers=browser(B))
    assert canonical_of(cookie_from(first)) == canonical_of(cookie_a)
    # The same browser again (every event of the landing page carries the URL): fine.
    again = await xclient.post(TRACK, data=b64_body([landing_event(location, victim_device)]), headers=browser(B))
    assert canonical_of(cookie_from(again)) == canonical_of(cookie_a)
    # Someone else who saw the URL (a shared link, a log): refused.
    stolen = await xclient.post(TRACK, data=b64_body([landing_event(location, attacker_device)]), headers=browser(B))
    assert canonical_of(cookie_from(stolen)) == attacker_device
    events = await upstream.wait(4, "us", "/track")
    assert events[-1]["properties"]["$device_id"] == attacker_device
    text = await (await xclient.ops_get("/metrics")).text()
    assert metric(text, 'firstparty_identity_tokens_total{result="replayed"}') == 1


async def test_a_second_sdk_on_the_landing_page_is_the_same_browser(xclient, upstream):
    """mixpanel-js and analytics.js on B both present the landing URL's token, each
    with its own id; the second, sent with the cookie the first one's answer set, is
    the same browser, not a replay."""
    import orjson

    from tests.conftest import SEG_KEY

    cookie_a = await visit_a(xclient)
    location = await go_to_b(xclient, cookie_a)
    canonical = canonical_of(cookie_a)
    first = await xclient.post(TRACK, data=b64_body([landing_event(location, device_id())]), headers=browser(B))
    cookie_b = cookie_from(first)
    assert canonical_of(cookie_b) == canonical
    call = {"type": "page", "anonymousId": device_id(), "writeKey": SEG_KEY, "context": {"page": {"url": location}}}
    seg = await xclient.post("/seg/v1/p", data=orjson.dumps(call), headers={**browser(B, cookie_b), "Content-Type": "text/plain"})
    assert seg.status == 200 and canonical_of(cookie_from(seg)) == canonical
    [forwarded] = await upstream.wait(1, "seg-us", "/v1/batch")
    assert forwarded["anonymousId"] == canonical
    assert "fpb=" not in forwarded["context"]["page"]["url"]
    # A browser holding another canonical id is still refused.
    other = await xclient.post(TRACK, data=b64_body([js_event("Elsewhere", device_id())]), headers=browser(B))
    stolen = await xclient.post(TRACK, data=b64_body([landing_event(location, device_id())]),
                                headers=browser(B, cookie_from(other)))
    assert canonical_of(cookie_from(stolen)) != canonical
    text = await (await xclient.ops_get("/metrics")).text()
    assert metric(text, 'firstparty_identity_tokens_total{result="replayed"}') == 1


async def test_both_sdks_landing_at_once_redeem_the_token_as_one_browser(xclient, upstream):
    """mixpanel-js's and analytics.js's first requests on B leave together, neither with
    fp_id; both carry the ajs_anonymous_id analytics.js wrote: one browser, one claim."""
    import asyncio

    import orjson

    from tests.conftest import SEG_KEY

    cookie_a = await visit_a(xclient)
    location = await go_to_b(xclient, cookie_a)
    canonical = canonical_of(cookie_a)
    anon = device_id()
    jar = {**browser(B), "Cookie": f"ajs_anonymous_id={anon}"}
    page = {"url": location, "referrer": f"http://{A}/"}  # analytics.js: the landing came from A
    call = {"type": "page", "anonymousId": anon, "writeKey": SEG_KEY, "context": {"page": page}}
    mp, seg = await asyncio.gather(
        xclient.post(TRACK, data=b64_body([landing_event(location, device_id())]), headers=jar),
        xclient.post("/seg/v1/p", data=orjson.dumps(call), headers={**jar, "Content-Type": "text/plain"}),
    )
    assert canonical_of(cookie_from(mp)) == canonical_of(cookie_from(seg)) == canonical
    # Someone else opening the landing URL (their own analytics.js id) is refused.
    thief = {**browser(B), "Cookie": f"ajs_anonymous_id={device_id()}"}
    stolen = await xclient.post(TRACK, data=b64_body([landing_event(location, device_id())]), headers=thief)
    assert canonical_of(cookie_from(stolen)) != canonical
    text = await (await xclient.ops_get("/metrics")).text()
    assert metric(text, 'firstparty_identity_tokens_total{result="replayed"}') == 1
    assert metric(text, 'firstparty_identity_tokens_total{result="redeemed_bridge"}') == 1


async def test_a_segment_only_site_crosses_domains_under_its_own_mount(xclient, upstream):
    """/seg/go, /seg/link.js, /seg/id: the cross-domain endpoints need no Mixpanel."""
    import orjson

    from tests.conftest import SEG_KEY

    anon_a = device_id()
    call = {"type": "page", "anonymousId": anon_a, "writeKey": SEG_KEY, "context": {"page": {"url": f"http://{A}/"}}}
    first = await xclient.post("/seg/v1/p", data=orjson.dumps(call), headers={**browser(A), "Content-Type": "text/plain"})
    cookie_a = cookie_from(first)
    assert canonical_of(cookie_a) == anon_a
    link = await xclient.get("/seg/link.js", headers=browser(A))
    assert link.status == 200 and 'GO = "/seg/go"' in await link.text()
    ident = await xclient.get("/seg/id", headers=browser(A, cookie_a))
    assert (await ident.json())["id"] == anon_a
    target = f"http://{B}/cart"
    go = await xclient.get(f"/seg/go?to={quote(target, safe='')}", headers=browser(A, cookie_a), allow_redirects=False)
    assert go.status == 302 and go.headers["Location"].startswith(f"{target}?fpb=")
    page_b = {"url": go.headers["Location"], "referrer": f"http://{A}/"}
    landing = {**call, "anonymousId": device_id(), "context": {"page": page_b}}
    on_b = await xclient.post("/seg/v1/p", data=orjson.dumps(landing), headers={**browser(B), "Content-Type": "text/plain"})
    assert canonical_of(cookie_from(on_b)) == anon_a
    calls = await upstream.wait(2, "seg-us", "/v1/batch")
    assert [c["anonymousId"] for c in calls] == [anon_a, anon_a]
    assert calls[1]["context"]["page"]["url"] == target


@pytest.mark.parametrize(
    "target",
    [
        "https://evil.test/",
        "//evil.test/",
        "https://site-b.test.evil.test/",
        "https://checkout.site-b.test@evil.test/",
        "https://user:pw@checkout.site-b.test/",
        "javascript:alert(1)//checkout.site-b.test",
        "https://evil.test\\@checkout.site-b.test/",
        "/relative/path",
        "",
    ],
)
async def test_no_open_redirect(xclient, target):
    resp = await xclient.get(f"/mp/go?to={quote(target, safe='')}", headers=browser(A), allow_redirects=False)
    assert resp.status == 400 and "Location" not in resp.headers
    resp = await xclient.get(f"/hub/resolve?return={quote(target, safe='')}", allow_redirects=False)
    assert resp.status == 400 and "Location" not in resp.headers


async def test_bridge_endpoint_for_pages_that_decorate_themselves(xclient):
    cookie_a = await visit_a(xclient)
    success = "https://checkout.site-b.test/success?order=42"
    resp = await xclient.post("/mp/bridge", json={"to": success}, headers=browser(A, cookie_a))
    assert resp.status == 200
    body = await resp.json()
    assert body["expires_in"] == 60 and body["param"] == "fpb"
    assert body["url"] == f"https://checkout.site-b.test/success?fpb={body['token']}&order=42"
    claims = keys_of(xclient).open(body["token"], purpose="bridge", audience="site-b.test", now=time.time())
    assert claims.canonical_id == canonical_of(cookie_a)
    assert resp.headers["Access-Control-Allow-Origin"] == f"http://{A}"
    resp = await xclient.post("/mp/bridge", data=f"to={quote(success, safe='')}", headers=browser(A, cookie_a))
    assert (await resp.json())["url"].startswith("https://checkout.site-b.test/success?fpb=")
    bad = await xclient.post("/mp/bridge", json={"to": "https://evil.test/"}, headers=browser(A, cookie_a))
    assert bad.status == 400 and "linked" in (await bad.json())["error"]
    pre = await xclient.options(
        "/mp/bridge", headers={"Origin": f"http://{A}", "Access-Control-Request-Method": "POST",
                               "Access-Control-Request-Headers": "content-type"},
    )
    assert pre.status == 204


async def test_id_endpoint_cors_only_for_linked_origins(xclient):
    cookie_a = await visit_a(xclient)
    resp = await xclient.get("/mp/id", headers=browser(A, cookie_a))
    assert (await resp.json()) == {"id": canonical_of(cookie_a), "source": "cookie"}
    assert resp.headers["Access-Control-Allow-Origin"] == f"http://{A}"
    assert resp.headers["Access-Control-Allow-Credentials"] == "true"
    # An allowed SDK origin that is not a linked domain may send events, not read ids.
    other = {**browser(A, cookie_a), "Origin": "http://partner.other.test"}
    resp = await xclient.get("/mp/id", headers=other)
    assert "Access-Control-Allow-Origin" not in resp.headers
    fresh = await xclient.get("/mp/id", headers=browser(B))
    body = await fresh.json()
    assert body["source"] == "new" and canonical_of(cookie_from(fresh)) == body["id"]


async def test_link_js_names_linked_domains(xclient):
    resp = await xclient.get("/mp/link.js")
    text = await resp.text()
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("application/javascript")
    assert '["site-a.test","site-b.test"]' in text and '"/mp/go"' in text


async def test_hub_recognises_the_browser_across_domains(xclient, upstream):
    hub = {"Host": "hub.id-hub.test", "User-Agent": "Mozilla/5.0"}
    ret_a = f"http://{A}/welcome?utm_source=ad"
    first = await xclient.get(f"/hub/resolve?return={quote(ret_a, safe='')}", headers=hub, allow_redirects=False)
    assert first.status == 302
    hub_cookie = cookie_from(first, "fp_hub")
    assert hub_cookie and "Domain=" not in first.headers["Set-Cookie"]  # host-only on the hub
    token_a = token_of(first.headers["Location"])
    hub_id = keys_of(xclient).open(token_a, purpose="hub", audience="site-a.test", now=time.time()).canonical_id
    assert canonical_of(hub_cookie) == hub_id
    # Site B later: the hub's cookie gives the same id.
    ret_b = f"http://{B}/"
    second = await xclient.get(
        f"/hub/resolve?return={quote(ret_b, safe='')}", headers={**hub, "Cookie": f"fp_hub={hub_cookie}"},
        allow_redirects=False,
    )
    token_b = token_of(second.headers["Location"])
    assert keys_of(xclient).open(token_b, purpose="hub", audience="site-b.test", now=time.time()).canonical_id == hub_id
    # Both sites' hub.js redeem their hub token (the answer to their own trip): one canonical id upstream.
    for host, url in ((A, first.headers["Location"]), (B, second.headers["Location"])):
        redeemed = await xclient.post("/mp/id", data=f"fpb={token_of(url)}&via=hub", headers=browser(host))
        assert (await redeemed.json())["token"] == "accepted"
        cookie = cookie_from(redeemed)
        assert canonical_of(cookie) == hub_id
        resp = await xclient.post(TRACK, data=b64_body([js_event("Page", device_id())]), headers=browser(host, cookie))
        assert canonical_of(cookie_from(resp)) == hub_id
    events = await upstream.wait(2, "us", "/track")
    assert {e["properties"]["$device_id"] for e in events} == {hub_id}
    js = await (await xclient.get("/mp/hub.js")).text()
    assert '"http://hub.id-hub.test"' in js and "fp_hub_done" in js


async def hub_seed(client: Any, cookie: str | None) -> str | None:
    """What hub.js asks its own domain for before the trip: a seed naming the id
    this domain already has (none for a browser without an identity cookie)."""
    resp = await client.post("/mp/bridge", json={"seed": "1"}, headers=browser(A, cookie))
    assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"
    return (await resp.json())["token"]


async def test_a_hub_that_lost_its_cookie_adopts_the_returning_domains_id(xclient, tmp_path):
    """Point 7 of issue 22: bounce-tracking protections purge the hub's cookie; when
    hub.js's trip starts again (Safari also caps script-written storage, so A's
    "done" flag goes too), a hub without its cookie must not mint a new id that
    then replaces A's: it adopts the id A already has (a seed A minted for its own
    cookie id, single use, short-lived, only on the navigation from A itself).
    A hub that still has its cookie keeps its own id, as before."""
    hub = {"Host": "hub.id-hub.test", "User-Agent": "Mozilla/5.0", "Referer": f"http://{A}/"}
    keys = keys_of(xclient)
    cookie_a = await visit_a(xclient)
    x = canonical_of(cookie_a)
    assert await hub_seed(xclient, None) is None  # no identity on A yet: nothing to adopt
    seed = await hub_seed(xclient, cookie_a)
    assert keys.open(seed, purpose="seed", audience="hub.id-hub.test", now=time.time()).canonical_id == x
    ret_a = quote(f"http://{A}/welcome", safe="")

    trip = await xclient.get(f"/hub/resolve?return={ret_a}&seed={seed}", headers=hub, allow_redirects=False)
    assert trip.status == 302
    assert canonical_of(cookie_from(trip, "fp_hub")) == x
    answer = token_of(trip.headers["Location"])
    assert "seed=" not in trip.headers["Location"]
    assert keys.open(answer, purpose="hub", audience="site-a.test", now=time.time()).canonical_id == x
    redeemed = await xclient.post("/mp/id", data=f"fpb={answer}&via=hub", headers=browser(A, cookie_a))
    assert (await redeemed.json())["token"] == "accepted" and canonical_of(cookie_from(redeemed) or cookie_a) == x

    # Single use: the same seed shown again (a copied URL, another browser) is not adopted.
    xclient.session.cookie_jar.clear()  # each trip below is a browser without the hub's cookie
    again = await xclient.get(f"/hub/resolve?return={ret_a}&seed={seed}", headers=hub, allow_redirects=False)
    assert canonical_of(cookie_from(again, "fp_hub")) != x
    # Only on the navigation from the returning domain itself: a seed link opened from a
    # mail (no referrer) or another site is a fixation attempt, and mints as before.
    for referer in (None, "http://evil.test/", f"http://{B}/"):
        fresh = await hub_seed(xclient, cookie_a)
        headers = {k: v for k, v in hub.items() if k != "Referer"} | ({"Referer": referer} if referer else {})
        resp = await xclient.get(f"/hub/resolve?return={ret_a}&seed={fresh}", headers=headers, allow_redirects=False)
        xclient.session.cookie_jar.clear()
        assert resp.status == 302 and canonical_of(cookie_from(resp, "fp_hub")) != x, referer
    # A hub that still has its cookie keeps its own id: the seed is not used.
    y = canonical_of(cookie_from(again, "fp_hub"))
    xclient.session.cookie_jar.clear()
    fresh = await hub_seed(xclient, cookie_a)
    kept = await xclient.get(f"/hub/resolve?return={ret_a}&seed={fresh}",
                             headers={**hub, "Cookie": f"fp_hub={cookie_from(again, 'fp_hub')}"}, allow_redirects=False)
    assert keys.open(token_of(kept.headers["Location"]), purpose="hub", audience="site-a.test", now=time.time()).canonical_id == y
    # A seed is for the hub only: on a landing page it is no token at all.
    fresh = await hub_seed(xclient, cookie_a)
    landing = await xclient.post("/mp/id", data=f"fpb={fresh}&via=hub", headers=browser(B))
    assert (await landing.json())["token"] != "accepted"
    text = await (await xclient.ops_get("/metrics")).text()
    assert metric(text, 'firstparty_identity_tokens_total{result="adopted_seed"}') == 1
    adopted = [r for r in await log_records(xclient, tmp_path) if r["outcome"] == "hub_adopted"]
    assert len(adopted) == 1 and adopted[0]["canonical_ids"] == [x] and seed not in str(adopted)


async def test_device_cap(proxy_client, upstream):
    client = await proxy_client(**{**IDENTITY, "identity": {**IDENTITY["identity"], "max_devices_per_id": 2}})
    cookie = await visit_a(client)
    devices = [device_id() for _ in range(4)]
    for i, d in enumerate(devices):  # four subdomains, four SDK storages
        await client.post(TRACK, data=b64_body([js_event("x", d)]), headers=browser(f"s{i}.site-a.test", cookie))
    events = (await upstream.wait(5, "us", "/track"))[1:]
    joined = [e["properties"]["$device_id"] == canonical_of(cookie) for e in events]
    assert joined == [True, True, False, False]
    text = await (await client.ops_get("/metrics")).text()
    assert metric(text, "firstparty_device_cap_exceeded_total") == 2


async def test_token_redeemed_once_across_processes_sharing_redis(serve_proxy, tmp_path, upstream):
    from tests.support import REDIS_URL

    shared = {**IDENTITY, "store": {"url": REDIS_URL}, "delivery": {"mode": "sync"}}
    a = await serve_proxy(create_app(make_settings(tmp_path / "a", upstream, **shared)))
    # The second instance must hold the same keys: copy A's generated key file.
    keys_file = tmp_path / "a" / "data" / "identity_keys"
    b_settings = make_settings(
        tmp_path / "b", upstream, **{**shared, "identity": {**IDENTITY["identity"], "keys_file": str(keys_file)}}
    )
    b = await serve_proxy(create_app(b_settings))
    cookie_a = await visit_a(a)
    location = await go_to_b(a, cookie_a)
    ok = await b.post(TRACK, data=b64_body([landing_event(location, device_id())]), headers=browser(B))
    assert canonical_of(cookie_from(ok)) == canonical_of(cookie_a)
    again = await a.post(TRACK, data=b64_body([landing_event(location, device_id())]), headers=browser(B))
    assert canonical_of(cookie_from(again)) != canonical_of(cookie_a)  # refused: already used


def test_device_change_classification():
    from proxy.core.identity import device_change

    week = 7 * 86400
    now = 1_800_000_000.0
    assert device_change(None, "d1", now, week, True) == "first"
    assert device_change(f"d1|{now - 10:.0f}", "d1", now, week, True) == "same"
    assert device_change(f"d1|{now - 10:.0f}", "d2", now, week, True) == "reset"
    assert device_change(f"d1|{now - 10:.0f}", "d2", now, week, False) == "renewed"  # identified: never a reset
    assert device_change(f"d1|{now - 8 * 86400:.0f}", "d2", now, week, True) == "renewed"  # Safari expired storage
    # A window of 0 never sees a reset, even for a sighting in the same second.
    assert device_change(f"d1|{int(now)}", "d2", now + 0.2, 0.0, True) == "renewed"


async def test_reset_on_the_same_host_starts_a_new_person(xclient, upstream):


    d1 = device_id()
    first = await xclient.post(TRACK, data=b64_body([js_event("Visit", d1)]), headers=browser(A))
    cookie = cookie_from(first)
    assert canonical_of(cookie) == d1
    ident = js_event("$identify", d1, user="alice", **{"$anon_distinct_id": f"$device:{d1}"})
    await xclient.post(TRACK, data=b64_body([ident]), headers=browser(A, cookie))
    # alice logs out: mixpanel.reset() mints d2; the next person browses anonymously.
    d2 = device_id()
    after = await xclient.post(TRACK, data=b64_body([js_event("Anon", d2)]), headers=browser(A, cookie))
    new_cookie = cookie_from(after)
    assert canonical_of(new_cookie) == d2  # not joined to alice's id
    events = await upstream.wait(3, "us", "/track")
    assert events[-1]["properties"]["$device_id"] == d2 and events[-1]["properties"]["distinct_id"] == f"$device:{d2}"
    text = await (await xclient.ops_get("/metrics")).text()
    assert metric(text, "firstparty_identity_resets_total") == 1
    assert metric(text, 'firstparty_identity_source_total{source="reset"}') == 1

    # Eight days later Safari has deleted mixpanel-js's storage (d3): the same person.
    store = xclient.services.store
    assert (await store.device_record(d2, A, "test-token-us")).startswith(d2 + "|")
    await store.set_device_record(d2, A, "test-token-us", d2, int(time.time() - 8 * 86400))
    d3 = device_id()
    later = await xclient.post(TRACK, data=b64_body([js_event("Back", d3)]), headers=browser(A, new_cookie))
    assert cookie_from(later) == new_cookie
    assert (await upstream.wait(4, "us", "/track"))[-1]["properties"]["$device_id"] == d2


async def test_two_projects_on_one_page_are_not_resets(xclient, upstream):
    d_main, d_other = device_id(), device_id()
    first = await xclient.post(TRACK, data=b64_body([js_event("a", d_main)]), headers=browser(A))
    cookie = cookie_from(first)
    for _ in range(2):
        await xclient.post(TRACK, data=b64_body([js_event("b", d_other, token="second-project")]), headers=browser(A, cookie))
        await xclient.post(TRACK, data=b64_body([js_event("c", d_main)]), headers=browser(A, cookie))
    events = await upstream.wait(5, "us", "/track")
    assert {e["properties"]["$device_id"] for e in events} == {d_main}
    text = await (await xclient.ops_get("/metrics")).text()
    assert metric(text, "firstparty_identity_resets_total") == 0
