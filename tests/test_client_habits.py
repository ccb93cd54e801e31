"""Real clients' habits the proxy must absorb (issue 22), through the real app:
server SDKs' events without a time, server calls that are not the visitor's,
a server-side $merge, mixpanel-browser's reset() inside one batch."""

from __future__ import annotations

import base64
import time

import orjson

from tests.conftest import BROWSER, SEG_KEY, b64_body, device_id, js_event, json_body

SERVER = {"User-Agent": "mixpanel-node/0.24", "Content-Type": "application/x-www-form-urlencoded"}
SEG_SERVER = {"User-Agent": "analytics-node-next/latest", "Content-Type": "application/json",
              "Authorization": "Basic " + base64.b64encode(f"{SEG_KEY}:".encode()).decode()}


async def test_events_without_a_time_carry_the_time_the_proxy_took_them(proxy_client, upstream, delivery_mode):
    """mixpanel-node sends track without ``time`` and engage without ``$time``:
    spooled and sent later, they must not take Mixpanel's arrival time."""
    client = await proxy_client()
    event = js_event("Node track", device_id())
    del event["properties"]["time"]
    profile = {"$token": "test-token-us", "$distinct_id": "user-7", "$set": {"plan": "pro"}}
    before = time.time()
    assert (await client.post("/mp/track?ip=0", data=json_body([event]), headers=SERVER)).status == 200
    assert (await client.post("/mp/engage?ip=0", data=json_body([profile]), headers=SERVER)).status == 200
    after = time.time()
    [sent] = await upstream.wait(1, "us", "/track")
    [update] = await upstream.wait(1, "us", "/engage")
    if delivery_mode == "spool":
        assert before - 0.01 <= sent["properties"]["time"] <= after + 0.01
        assert before * 1000 - 10 <= update["$time"] <= after * 1000 + 10
    else:  # forwarded at once: Mixpanel's own arrival time is the acceptance time
        assert "time" not in sent["properties"] or before - 0.01 <= sent["properties"]["time"] <= after + 0.01
    # An SDK's own time is never touched.
    hour_ago = round(time.time() - 3600, 3)
    own = js_event("Own time", device_id(), time=hour_ago)
    assert (await client.post("/mp/track?ip=0", data=json_body([own]), headers=SERVER)).status == 200
    sent = (await upstream.wait(2, "us", "/track"))[-1]
    assert sent["properties"]["time"] == hour_ago


async def test_server_calls_never_get_the_backends_ip(proxy_client, upstream):
    """Segment sets context.ip for client libraries only; a server call without one
    reaches Segment without one (not the backend's 127.0.0.1). Mixpanel with ip=0 gets
    no forwarding headers; a browser's calls still carry the visitor's IP."""
    client = await proxy_client()
    call = {"type": "track", "event": "Server", "userId": "user-1", "context": {"library": {"name": "analytics-node"}}}
    assert (await client.post("/seg/v1/batch", data=orjson.dumps({"batch": [call]}), headers=SEG_SERVER)).status == 200
    browser_call = {"type": "track", "event": "Browser", "anonymousId": device_id(), "writeKey": SEG_KEY}
    resp = await client.post("/seg/v1/t", data=orjson.dumps(browser_call), headers={**BROWSER, "Content-Type": "text/plain"})
    assert resp.status == 200
    mp = js_event("Server MP", device_id())
    assert (await client.post("/mp/track?ip=1", data=json_body([mp]), headers=SERVER)).status == 200
    from tests.support import eventually

    await eventually(lambda: len([c for r in upstream.by("seg-us") for c in r.events()]) == 2, 10, "both calls")
    calls = {c["event"]: c for r in upstream.by("seg-us") for c in r.events()}
    assert "ip" not in calls["Server"].get("context", {})
    assert calls["Browser"]["context"]["ip"] == "127.0.0.1"  # the browser's own (here: loopback)
    [sent] = await upstream.wait(1, "us", "/track")
    assert "ip" not in sent["properties"]
    for request in upstream.by("us"):
        assert "x-real-ip" not in request.headers and "x-forwarded-for" not in request.headers
        assert dict(request.query).get("ip") in ("0", None)


async def test_a_server_side_merge_names_the_canonical_id(proxy_client, upstream):
    """mixpanel-python's merge() posts $merge to /import with $distinct_ids
    [user, "$device:<original device>"]: the device is rewritten as every other
    event of that device is, so the merge names an id events carry."""
    import asyncio

    from mixpanel import Consumer, Mixpanel

    from tests.conftest import canonical_of, cookie_from
    from tests.support import A, IDENTITY, TRACK, browser

    client = await proxy_client(**IDENTITY)
    cookie = cookie_from(await client.post(TRACK, data=b64_body([js_event("A", device_id())]), headers=browser(A)))
    original = device_id()  # the browser's device id on another subdomain
    await client.post(TRACK, data=b64_body([js_event("Shop", original)]), headers=browser("shop.site-a.test", cookie))
    base = str(client.make_url("/mp"))
    mp = Mixpanel("test-token-us", consumer=Consumer(events_url=f"{base}/track", import_url=f"{base}/import",
                                                     request_timeout=5))
    await asyncio.to_thread(mp.merge, "api-key", "user-42", f"$device:{original}", api_secret="secret-xyz")
    [merge] = [e for r in upstream.by("us", "/import") for e in r.events()]
    assert merge["event"] == "$merge"
    assert merge["properties"]["$distinct_ids"] == ["user-42", f"$device:{canonical_of(cookie)}"]


async def test_reset_inside_one_batch_starts_the_next_person(proxy_client, upstream, delivery_mode):
    """mixpanel-browser batches for 5 s: identify('user-1'), a track, reset() and the
    next person's track share one request. The events before the reset keep the
    browser's identity; 'After logout' and what follows belong to the new device id,
    and the browser's cookie follows it."""
    from tests.conftest import canonical_of, cookie_from
    from tests.support import metric
    from tests.support import A, IDENTITY, TRACK, browser

    client = await proxy_client(**IDENTITY)
    d1 = device_id()
    cookie = cookie_from(await client.post(TRACK, data=b64_body([js_event("Landing", d1)]), headers=browser(A)))
    assert canonical_of(cookie) == d1
    d2 = device_id()  # minted by reset()
    batch = [
        js_event("$identify", d1, user="user-1", **{"$anon_distinct_id": f"$device:{d1}"}),
        js_event("Purchase", d1, user="user-1"),
        js_event("After logout", d2),
        js_event("Browse", d2),
    ]
    resp = await client.post(TRACK, data=b64_body(batch), headers=browser(A, cookie))
    assert resp.status == 200 and canonical_of(cookie_from(resp)) == d2
    events = {e["event"]: e["properties"] for e in await upstream.wait(5, "us", "/track")}
    assert events["$identify"]["$anon_distinct_id"] == f"$device:{d1}" and events["Purchase"]["distinct_id"] == "user-1"
    for name in ("After logout", "Browse"):
        assert events[name]["$device_id"] == d2 and events[name]["distinct_id"] == f"$device:{d2}", name
        assert "$user_id" not in events[name]
    text = await (await client.ops_get("/metrics")).text()
    assert metric(text, "firstparty_identity_resets_total") == 1
    # The next request of the new person: the cookie alone, no second reset.
    later = await client.post(TRACK, data=b64_body([js_event("Later", d2)]), headers=browser(A, cookie_from(resp)))
    assert canonical_of(cookie_from(later)) == d2
    assert (await upstream.wait(6, "us", "/track"))[-1]["properties"]["$device_id"] == d2


async def test_a_flags_alias_reaches_first_time_events(proxy_client, upstream):
    """mixpanel-js with ``api_routes: {flags: "f/"}`` (a name no filter list knows)
    asks ``/<mount>/f/<id>/first-time-events`` as well as ``/<mount>/f/``."""
    client = await proxy_client(server={"route_aliases": {"f": "flags"}})
    query = "?context=%7B%22distinct_id%22%3A%22u%22%7D&token=test-token-us"
    assert (await client.get(f"/mp/f/{query}", headers=BROWSER)).status == 200
    resp = await client.get(f"/mp/f/flag-1/first-time-events{query}", headers=BROWSER)
    assert resp.status == 200
    assert [r.path for r in upstream.by("us")] == ["/flags/", "/flags/flag-1/first-time-events"]
