"""Segment beside Mixpanel: analytics.js-shaped calls and the real Segment
Python SDK through the same identity, spooled and sent to /v1/batch per write
key and region, in both delivery modes."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import uuid
from typing import Any

import orjson
import pytest

from proxy.protocols import segment
from proxy.errors import BadRequest
from tests.conftest import BROWSER, SEG_EU_KEY, SEG_KEY, b64_body, canonical_of, cookie_from, js_event
from tests.support import PLAIN, ajs_call, eventually


def calls(upstream: Any, name: str = "seg-us") -> list[dict[str, Any]]:
    return [c for rec in upstream.by(name, "/v1/batch") for c in rec.events()]


async def test_analytics_js_calls_carry_the_canonical_id(client, upstream):
    # A Mixpanel event first: the browser's canonical id is set.
    device = str(uuid.uuid4())
    first = await client.post("/mp/track/?verbose=1&ip=1", data=b64_body([js_event("Page View", device)]),
                              headers={**BROWSER, "Content-Type": "application/x-www-form-urlencoded"})
    cookie = cookie_from(first)
    canonical = canonical_of(cookie)
    anon = str(uuid.uuid4())  # analytics.js's own id on this domain
    headers = {**BROWSER, **PLAIN, "Cookie": f"fp_id={cookie}"}
    sent = [
        ("t", ajs_call("track", anon, event="Signed Up", properties={"plan": "pro"})),
        ("p", ajs_call("page", anon, name="Pricing")),
        ("i", ajs_call("identify", anon, user_id="user-42", traits={"email": "a@example.com"})),
        ("g", ajs_call("group", anon, user_id="user-42", groupId="acme")),
    ]
    for path, call in sent:
        resp = await client.post(f"/seg/v1/{path}", data=orjson.dumps(call), headers=headers)
        assert resp.status == 200 and await resp.json() == {"success": True}
    await eventually(lambda: len(calls(upstream)) == 4, 10, "four Segment calls")
    got = {c["type"]: c for c in calls(upstream)}
    assert set(got) == {"track", "page", "identify", "group"}
    for kind, call in got.items():
        assert call["anonymousId"] == canonical, kind
        assert call["writeKey"] == SEG_KEY
        assert call["context"]["ip"] == "127.0.0.1"  # the visitor's, for Segment's geolocation
        original = next(c for _, c in sent if c["type"] == kind)
        assert call["messageId"] == original["messageId"]  # kept: Segment de-duplicates by it
    assert got["identify"]["userId"] == "user-42" and got["group"]["userId"] == "user-42"
    assert got["track"]["event"] == "Signed Up" and got["track"]["properties"] == {"plan": "pro"}
    batch = upstream.by("seg-us", "/v1/batch")[-1]
    body = orjson.loads(batch.body)
    assert body["writeKey"] == SEG_KEY and body["sentAt"].endswith("Z")
    assert "cookie" not in batch.headers and "authorization" not in batch.headers
    [mixpanel] = upstream.received("us", "/track")
    assert mixpanel["properties"]["$device_id"] == canonical  # one id for both vendors


async def test_a_first_segment_call_sets_the_identity_cookie(client, upstream):
    anon = str(uuid.uuid4())
    resp = await client.post("/seg/v1/t", data=orjson.dumps(ajs_call("track", anon, event="x")), headers={**BROWSER, **PLAIN})
    assert resp.status == 200
    assert canonical_of(cookie_from(resp)) == anon  # the first id seen is adopted, as for Mixpanel


async def test_the_segment_python_sdk_delivers_and_is_rewritten(client, upstream, delivery_mode):
    """The real SDK (segment-analytics-python, gzip on, Basic auth) posts
    /v1/batch; a call carrying a browser's original anonymousId reaches
    Segment under that browser's canonical id."""
    from segment.analytics import Client

    cookie = cookie_from(await client.post("/seg/v1/t", data=orjson.dumps(ajs_call("track", str(uuid.uuid4()), event="a")),
                                           headers={**BROWSER, **PLAIN}))
    canonical = canonical_of(cookie)
    browser_anon = str(uuid.uuid4())  # analytics.js's id on another site of the cookie's domain
    await client.post("/seg/v1/t", data=orjson.dumps(ajs_call("track", browser_anon, event="b")),
                      headers={**BROWSER, **PLAIN, "Host": "shop.example.com", "Cookie": f"fp_id={cookie}"})
    await eventually(lambda: len(calls(upstream)) == 2, 10, "the browser's calls")

    errors: list[Any] = []
    sdk = Client(SEG_KEY, host=f"http://127.0.0.1:{client.port}/seg", gzip=True, sync_mode=True,
                 on_error=lambda e, batch: errors.append(e))
    await asyncio.to_thread(sdk.track, anonymous_id=browser_anon, event="Order Completed", properties={"total": 30})
    await asyncio.to_thread(sdk.identify, user_id="user-7", traits={"plan": "pro"})
    assert errors == []
    await eventually(lambda: len(calls(upstream)) == 4, 10, "the SDK's calls")
    order = next(c for c in calls(upstream) if c.get("event") == "Order Completed")
    assert order["anonymousId"] == canonical and order["properties"] == {"total": 30}
    assert order["context"]["library"]["name"] == "analytics-python"
    # Segment sets context.ip for client libraries only: a server's call has none
    # (the backend's address would geolocate every visitor to the data centre).
    assert "ip" not in order["context"]
    ident = next(c for c in calls(upstream) if c["type"] == "identify")
    assert ident["userId"] == "user-7" and not ident.get("anonymousId")
    assert all(orjson.loads(r.body)["writeKey"] == SEG_KEY for r in upstream.by("seg-us", "/v1/batch"))


async def test_an_eu_write_key_goes_to_the_eu_host(client, upstream):
    for key in (SEG_EU_KEY, SEG_KEY):
        resp = await client.post("/seg/v1/t", data=orjson.dumps(ajs_call("track", str(uuid.uuid4()), event=key, write_key=key)),
                                 headers={**BROWSER, **PLAIN})
        assert resp.status == 200
    await eventually(lambda: calls(upstream, "seg-eu") and calls(upstream, "seg-us"), 10, "both regions")
    assert [c["event"] for c in calls(upstream, "seg-eu")] == [SEG_EU_KEY]
    assert [c["event"] for c in calls(upstream, "seg-us")] == [SEG_KEY]


@pytest.mark.parametrize(
    "path,body,message",
    [
        ("t", b"", "empty body: send the call as JSON"),
        ("t", b"{nope", "body is not valid JSON"),
        ("t", b"[1]", "body must be a JSON object"),
        ("t", orjson.dumps({"type": "track", "anonymousId": "a1b2c3d4e5", "writeKey": SEG_KEY}), "call 0: a track call needs an 'event' name"),
        ("t", orjson.dumps({"type": "track", "event": "x", "writeKey": SEG_KEY}), "call 0 needs a userId or an anonymousId"),
        ("t", orjson.dumps({"type": "track", "event": "x", "anonymousId": "a1b2c3d4e5"}), "no write key"),
        ("batch", orjson.dumps({"batch": [], "writeKey": SEG_KEY}), "'batch' must be a non-empty array of calls"),
        ("batch", orjson.dumps({"batch": [{"type": "nope", "anonymousId": "a"}], "writeKey": SEG_KEY}), "call 0 has no valid 'type'"),
        ("t", orjson.dumps({"type": "track", "event": "x", "anonymousId": "a1b2c3d4e5", "writeKey": SEG_KEY,
                            "properties": {"blob": "x" * 33_000}}), "call 0 is larger than Segment's limit of 32 KB"),
    ],
)
async def test_bad_segment_bodies_get_a_400_and_nothing_is_sent(client, upstream, path, body, message):
    resp = await client.post(f"/seg/v1/{path}", data=body, headers={**BROWSER, **PLAIN})
    assert resp.status == 400
    answer = await resp.json()
    assert answer["success"] is False and answer["message"].startswith(message) and answer["code"] == "invalid_request"
    ok = await client.post("/seg/v1/t", data=orjson.dumps(ajs_call("track", str(uuid.uuid4()), event="ok")), headers={**BROWSER, **PLAIN})
    assert ok.status == 200
    await eventually(lambda: calls(upstream), 10, "the good call")
    assert [c["event"] for c in calls(upstream)] == ["ok"]  # queued after the bad ones: nothing else came


async def test_a_batch_over_500_kb_is_refused(client, upstream):
    call = ajs_call("track", str(uuid.uuid4()), event="x", properties={"blob": "x" * 30_000})
    body = orjson.dumps({"batch": [call] * 18, "writeKey": SEG_KEY})
    assert len(body) > 500 * 1024
    resp = await client.post("/seg/v1/batch", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400 and "500 KB" in (await resp.json())["message"]
    assert upstream.by("seg-us") == []


async def test_bridge_tokens_in_segment_urls_are_stripped(client, upstream):
    anon = str(uuid.uuid4())
    call = ajs_call("page", anon)
    call["context"]["page"].update(url="https://www.example.com/cart?fpb=TOKEN123&utm=1", search="?fpb=TOKEN123&utm=1")
    call["properties"] = {"url": "https://www.example.com/cart?fpb=TOKEN123&utm=1", "search": "?fpb=TOKEN123&utm=1"}
    resp = await client.post("/seg/v1/p", data=orjson.dumps(call), headers={**BROWSER, **PLAIN})
    assert resp.status == 200
    await eventually(lambda: calls(upstream), 10, "the page call")
    [page] = calls(upstream)
    assert page["context"]["page"]["url"] == "https://www.example.com/cart?utm=1"
    assert page["context"]["page"]["search"] == "?utm=1"
    assert page["properties"] == {"url": "https://www.example.com/cart?utm=1", "search": "?utm=1"}
    assert b"TOKEN123" not in upstream.by("seg-us")[-1].body


def test_write_key_from_basic_auth():
    from proxy.protocols.base import basic_user

    assert basic_user("Basic " + base64.b64encode(b"wk123:").decode()) == "wk123"
    assert basic_user("Basic " + base64.b64encode(b":").decode()) is None
    assert basic_user("Bearer x") is None and basic_user("Basic %%%") is None
    payload = segment.decode("batch", gzip.compress(json.dumps({"batch": [{"type": "identify", "userId": "u"}]}).encode()),
                             [], "application/json", "gzip", 10**6, "Basic " + base64.b64encode(b"wk123:").decode())
    assert payload.events[0]["writeKey"] == "wk123" and payload.route == "batch"
    with pytest.raises(BadRequest, match="unsupported Content-Encoding"):
        segment.decode("t", b"{}", [], "", "br", 10**6)


def test_prepare_keeps_what_the_call_brought():
    call = {"type": "track", "event": "x", "anonymousId": "a", "writeKey": "k", "context": {"ip": "203.0.113.9"}}
    facts = segment.prepare("track", call, "127.0.0.1")
    assert call["context"]["ip"] == "203.0.113.9"  # a server SDK's own IP wins
    assert facts.insert_id == call["messageId"] and facts.project == "k" and facts.name == "x"
    bare = {"type": "identify", "userId": "u", "writeKey": "k"}
    assert segment.prepare("identify", bare, None).name == "$identify" and "context" not in bare
    alias = {"type": "alias", "previousId": "d1", "userId": "u"}
    assert segment.rewrite("alias", alias, {"d1": "c1"})[0].field == "previousId" and alias["previousId"] == "c1"
    assert segment.rewrite("track", {"type": "track", "userId": "d1"}, {"d1": "c1"}) == []  # userId never touched


async def spooled_client(serve_proxy: Any, tmp_path: Any, upstream: Any) -> Any:
    from proxy.web.app import create_app
    from tests.conftest import make_settings

    return await serve_proxy(create_app(make_settings(tmp_path, upstream, delivery={"mode": "spool"})))


async def test_segment_faults_lose_nothing(serve_proxy, tmp_path, upstream):
    """429 with Retry-After, then a 503, then a 400 for one call: every
    accepted call reaches Segment once or is a dead letter with Segment's words."""
    from aiohttp import web

    answers = [(429, {"Retry-After": "1"}), (503, {})]

    async def behave(rec: Any) -> Any:
        if rec.name != "seg-us":
            return None
        if answers:
            status, headers = answers.pop(0)
            return web.json_response({"success": False, "message": "busy"}, status=status, headers=headers)
        if any(c.get("event") == "Poison" for c in rec.events()):
            return web.json_response({"success": False, "message": "Invalid event: Poison", "code": "invalid_request"}, status=400)
        return None

    upstream.behave = behave
    client = await spooled_client(serve_proxy, tmp_path, upstream)
    sent = [ajs_call("track", str(uuid.uuid4()), event=f"e{i}") for i in range(6)]
    sent.append(ajs_call("track", str(uuid.uuid4()), event="Poison"))
    resp = await client.post("/seg/v1/batch", data=orjson.dumps({"batch": sent, "writeKey": SEG_KEY}),
                             headers={"Content-Type": "application/json"})
    assert resp.status == 200
    good = {c["messageId"] for c in sent[:-1]}
    await eventually(lambda: good <= {c["messageId"] for c in calls(upstream)}, 20, "every good call after the faults")
    import sqlite3

    def dead() -> list[tuple[str, str]]:
        with sqlite3.connect(tmp_path / "data" / "spool.sqlite3") as c:
            return [(orjson.loads(b)["messageId"], d) for b, d in c.execute("SELECT body, detail FROM dead WHERE protocol = 'segment'")]

    await eventually(lambda: len(dead()) == 1, 10, "the poison call's dead letter")
    [(message_id, detail)] = dead()
    assert message_id == sent[-1]["messageId"] and "Invalid event: Poison" in detail
    delivered = [c["messageId"] for c in calls(upstream)]
    assert sorted(delivered) == sorted(good)  # each once, the poison never accepted
    assert len(upstream.refused) >= 3  # the 429, the 503 and the bisected 400s
    await client.close()


async def test_spooled_batches_stay_under_segments_500_kb(serve_proxy, tmp_path, upstream):
    from aiohttp import web

    async def behave(rec: Any) -> Any:
        if rec.name == "seg-us" and len(rec.body) > 500 * 1024:
            return web.json_response({"success": False, "message": "batch too large"}, status=400)
        return None

    upstream.behave = behave
    from proxy.web.app import create_app
    from tests.conftest import make_settings

    client = await serve_proxy(create_app(make_settings(tmp_path, upstream, delivery={"mode": "spool", "batch_window_ms": 200})))
    sent = []
    for _ in range(2):  # 2 x 10 calls of 30 KB: 600 KB, one group, within one batch window
        chunk = [ajs_call("track", str(uuid.uuid4()), event="big", properties={"blob": "x" * 30_000}) for _ in range(10)]
        sent += chunk
        resp = await client.post("/seg/v1/batch", data=orjson.dumps({"batch": chunk, "writeKey": SEG_KEY}),
                                 headers={"Content-Type": "application/json"})
        assert resp.status == 200
    await eventually(lambda: len(calls(upstream)) == 20, 10, "all 20 calls")
    assert upstream.refused == []  # never one request over the limit
    assert len(upstream.by("seg-us", "/v1/batch")) >= 2
    assert all(len(r.body) <= 500 * 1024 for r in upstream.by("seg-us", "/v1/batch"))
    assert sorted(c["messageId"] for c in calls(upstream)) == sorted(c["messageId"] for c in sent)


def set_cookies(response: Any, name: str) -> list[str]:
    return [h for h in response.headers.getall("Set-Cookie", []) if h.startswith(name + "=")]


async def test_the_ajs_cookie_carries_the_canonical_id_for_analytics_js(proxy_client, upstream):
    client = await proxy_client()
    anon = str(uuid.uuid4())
    resp = await client.post("/seg/v1/p", data=orjson.dumps(ajs_call("page", anon)),
                             headers={**BROWSER, **PLAIN, "Host": "www.example.com"})
    assert resp.status == 200
    canonical = canonical_of(cookie_from(resp))
    [ajs] = set_cookies(resp, "ajs_anonymous_id")
    # Server-set, readable by analytics.js (no HttpOnly), the identity cookie's domain and lifetime.
    assert ajs == f"ajs_anonymous_id={canonical}; Domain=.example.com; Path=/; Max-Age={400 * 86400}; SameSite=Lax; Secure"
    # A host outside the cookie domains gets a host-only cookie.
    other = await client.post("/seg/v1/t", data=orjson.dumps(ajs_call("track", anon, event="x")),
                              headers={**BROWSER, **PLAIN, "Host": "shop.elsewhere.test"})
    [host_only] = set_cookies(other, "ajs_anonymous_id")
    assert "Domain=" not in host_only and "HttpOnly" not in host_only

    # Mixpanel's answers and server SDKs' calls set no ajs cookie.
    mp = await client.post("/mp/track/", data=b64_body([js_event("x", str(uuid.uuid4()))]),
                           headers={**BROWSER, "Content-Type": "application/x-www-form-urlencoded"})
    assert cookie_from(mp) and set_cookies(mp, "ajs_anonymous_id") == []
    server = await client.post("/seg/v1/batch", data=orjson.dumps({"batch": [ajs_call("track", anon, event="y")]}),
                               headers={"Content-Type": "application/json", "User-Agent": "analytics-python/2.3"})
    assert server.status == 200 and set_cookies(server, "ajs_anonymous_id") == []


async def test_the_ajs_cookie_can_be_left_to_analytics_js(proxy_client, upstream):
    client = await proxy_client(segment={"set_ajs_cookie": False})
    resp = await client.post("/seg/v1/p", data=orjson.dumps(ajs_call("page", str(uuid.uuid4()))), headers={**BROWSER, **PLAIN})
    assert resp.status == 200 and cookie_from(resp)
    assert set_cookies(resp, "ajs_anonymous_id") == []


def consent(**categories: bool) -> dict[str, Any]:
    """``context.consent`` as Segment's consent tools stamp it on every call."""
    return {"categoryPreferences": categories}


def with_consent(call: dict[str, Any], **categories: bool) -> dict[str, Any]:
    call["context"]["consent"] = consent(**categories)
    return call


async def test_segment_calls_honour_their_own_consent_categories(proxy_client, upstream, tmp_path):
    from tests.support import log_records, metric

    client = await proxy_client(consent={"segment_required_categories": ["Analytics"]})
    anon = str(uuid.uuid4())
    headers = {**BROWSER, **PLAIN}
    # Every category refused: the call is dropped before identity, the SDK told "accepted".
    refused = with_consent(ajs_call("track", anon, event="Refused all"), Analytics=False, Advertising=False)
    resp = await client.post("/seg/v1/t", data=orjson.dumps(refused), headers=headers)
    assert resp.status == 200 and await resp.json() == {"success": True}
    assert cookie_from(resp) is None
    # A batch from analytics.js's batching strategy: one call refuses a required
    # category, one grants it, one says nothing of it (pruned): two go on.
    batch = [
        with_consent(ajs_call("track", anon, event="No analytics"), Analytics=False, Advertising=True),
        with_consent(ajs_call("track", anon, event="Granted"), Analytics=True, Advertising=False),
        with_consent(ajs_call("track", anon, event="Unnamed"), Advertising=True),
    ]
    resp = await client.post("/seg/v1/b", data=orjson.dumps({"batch": batch, "writeKey": SEG_KEY}), headers=headers)
    assert resp.status == 200 and cookie_from(resp)
    # A server SDK's call is not checked: its backend decided to send it.
    server = with_consent(ajs_call("track", anon, event="Server"), Analytics=False)
    resp = await client.post("/seg/v1/batch", data=orjson.dumps({"batch": [server], "writeKey": SEG_KEY}),
                             headers={"Content-Type": "application/json", "User-Agent": "analytics-python/2.3"})
    assert resp.status == 200
    await eventually(lambda: len(calls(upstream)) == 3, 10, "three Segment calls")
    delivered = {c["event"]: c for c in calls(upstream)}
    assert set(delivered) == {"Granted", "Unnamed", "Server"}
    # Forwarded with their consent intact: Segment filters destinations by it.
    assert delivered["Granted"]["context"]["consent"] == consent(Analytics=True, Advertising=False)

    text = await (await client.ops_get("/metrics")).text()
    assert metric(text, 'firstparty_consent_dropped_total{reason="segment_consent"}') == 2
    records = await log_records(client, tmp_path)
    dropped = [(r["route"], r["events"], r["reason"]) for r in records if r["outcome"] == "dropped"]
    assert dropped == [("track", ["Refused all"], "consent: segment_consent"),
                       ("batch", ["No analytics"], "consent: segment_consent")]
    assert anon.encode() not in orjson.dumps(dropped)


async def test_browser_signals_drop_segment_calls_too(proxy_client, upstream):
    client = await proxy_client(consent={"honor_segment_consent": False})
    gpc = await client.post("/seg/v1/t", data=orjson.dumps(ajs_call("track", str(uuid.uuid4()), event="GPC")),
                            headers={**BROWSER, **PLAIN, "Sec-GPC": "1"})
    assert gpc.status == 200 and cookie_from(gpc) is None
    # Segment's consent not honoured: a call refusing everything goes on.
    off = with_consent(ajs_call("track", str(uuid.uuid4()), event="Not honoured"), Analytics=False)
    assert (await client.post("/seg/v1/t", data=orjson.dumps(off), headers={**BROWSER, **PLAIN})).status == 200
    await eventually(lambda: len(calls(upstream)) == 1, 10, "one Segment call")
    assert [c["event"] for c in calls(upstream)] == ["Not honoured"]


def test_refuses_reads_category_preferences():
    call = ajs_call("track", "a" * 12, event="x")
    assert not segment.refuses(call, ())
    assert not segment.refuses(with_consent(call, Analytics=True, Ads=False), ())
    assert segment.refuses(with_consent(call, Analytics=True, Ads=False), ("Ads",))
    assert segment.refuses(with_consent(call, Analytics=False, Ads=False), ())
    assert not segment.refuses(with_consent(call), ("Ads",))  # an empty object says nothing
    call["context"]["consent"] = {"categoryPreferences": {"Ads": "false"}}  # not a boolean: no signal
    assert not segment.refuses(call, ("Ads",))


@pytest.mark.parametrize("written", ["{id}", "%22{id}%22"])  # analytics.js 2.x, and 1.0's JSON
async def test_both_sdks_first_requests_agree_through_the_ajs_cookie(proxy_client, upstream, written):
    """A fresh browser on a page running both SDKs: analytics.js has written its
    ajs_anonymous_id, and mixpanel-js's first request leaves before any answer set
    fp_id. Both requests, each a first visit, adopt analytics.js's id."""
    client = await proxy_client()
    anon, device = str(uuid.uuid4()), str(uuid.uuid4())
    jar = {"Cookie": "ajs_anonymous_id=" + written.format(id=anon) + "; ajs_user_id=null"}
    mp, seg = await asyncio.gather(
        client.post("/mp/track/?ip=1", data=b64_body([js_event("Page", device)]),
                    headers={**BROWSER, **jar, "Content-Type": "application/x-www-form-urlencoded"}),
        client.post("/seg/v1/p", data=orjson.dumps(ajs_call("page", anon)), headers={**BROWSER, **PLAIN, **jar}),
    )
    assert canonical_of(cookie_from(mp)) == canonical_of(cookie_from(seg)) == anon
    [event] = await upstream.wait(1, "us", "/track")
    assert event["properties"]["$device_id"] == anon and event["properties"]["distinct_id"] == f"$device:{anon}"
    await eventually(lambda: len(calls(upstream)) == 1, 10, "the Segment call")
    assert calls(upstream)[0]["anonymousId"] == anon
    # Later, mixpanel-js's own id is known: rewritten through the alias store too.
    server = await client.post("/mp/track", data="data=" + orjson.dumps(js_event("Server", device)).decode(),
                               headers={"Content-Type": "application/x-www-form-urlencoded", "User-Agent": "mixpanel-python/5.4"})
    assert server.status == 200
    events = await upstream.wait(2, "us", "/track")
    assert events[-1]["properties"]["$device_id"] == anon


async def test_the_ajs_cookie_is_no_hint_when_the_proxy_leaves_it_alone(proxy_client, upstream):
    client = await proxy_client(segment={"set_ajs_cookie": False})
    anon, device = str(uuid.uuid4()), str(uuid.uuid4())
    mp = await client.post("/mp/track/", data=b64_body([js_event("Page", device)]),
                           headers={**BROWSER, "Cookie": f"ajs_anonymous_id={anon}",
                                    "Content-Type": "application/x-www-form-urlencoded"})
    assert canonical_of(cookie_from(mp)) == device  # first come: mixpanel-js's own id


def test_a_known_hint_brings_its_canonical_id():
    from proxy.core.identity import resolve_browser

    known = resolve_browser(None, ["dev-00000001"], {"ajs-0000001": "canon-00001"}, hint="ajs-0000001")
    assert (known.canonical, known.source, known.mapping) == ("canon-00001", "alias", {"dev-00000001": "canon-00001"})
    # The payload's own id, when the store knows it, wins over the hint.
    own = resolve_browser(None, ["dev-00000001"], {"dev-00000001": "canon-00002"}, hint="ajs-0000001")
    assert own.canonical == "canon-00002"
    # An id not fit for a cookie is no hint.
    assert resolve_browser(None, ["dev-00000001"], {}, hint="bad id;").canonical == "dev-00000001"


def test_rewrite_reaches_the_traits_in_context_and_leaves_user_ids():
    call = ajs_call("track", "anon-0000001", user_id="user-1", event="x")
    call["context"]["traits"] = {"anonymousId": "anon-0000001", "email": "a@example.com", "userId": "anon-0000001"}
    changes = segment.rewrite("t", call, {"anon-0000001": "canon-00001"})
    assert call["anonymousId"] == call["context"]["traits"]["anonymousId"] == "canon-00001"
    assert call["userId"] == "user-1" and call["context"]["traits"]["userId"] == "anon-0000001"
    assert [(r.field, r.original, r.canonical) for r in changes] == [
        ("anonymousId", "anon-0000001", "canon-00001"),
        ("context.traits.anonymousId", "anon-0000001", "canon-00001"),
    ]
