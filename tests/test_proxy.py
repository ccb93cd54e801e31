"""The service end to end: the real app, real HTTP, a recording fake upstream."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
from typing import Any
from urllib.parse import quote

import orjson
import pytest

from tests.support import metric
from tests.conftest import (
    BROWSER,
    EU_TOKEN,
    IN_TOKEN,
    TOKEN,
    b64_body,
    canonical_of,
    cookie_from,
    device_id,
    js_event,
    json_body,
)

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
TRACK = "/mp/track/?verbose=1&ip=1&_=1700000000000"


async def first_visit(client: Any, device: str) -> str:
    """A browser's first event: returns the cookie value the proxy set."""
    resp = await client.post(TRACK, data=b64_body([js_event("Page View", device)]), headers={**BROWSER, **FORM})
    assert resp.status == 200, await resp.text()
    cookie = cookie_from(resp)
    assert cookie
    return cookie


def with_cookie(cookie: str) -> dict[str, str]:
    """The same browser on shop.example.com (the cookie's domain is .example.com),
    where mixpanel-js keeps its own storage and so its own device id."""
    return {**BROWSER, **FORM, "Host": "shop.example.com", "Cookie": f"_ga=GA1.1.1; fp_id={cookie}; other=1"}


async def test_first_visit_adopts_device_id_and_sets_cookie(client, upstream):
    d = device_id()
    resp = await client.post(TRACK, data=b64_body([js_event("Page View", d)]), headers={**BROWSER, **FORM})
    assert resp.status == 200
    assert await resp.json() == {"status": 1, "error": None}
    assert canonical_of(cookie_from(resp)) == d  # first come: nothing changes for a single-domain site
    [event] = await upstream.wait(1, "us", "/track")
    [rec] = upstream.by("us", "/track")
    assert rec.path.rstrip("/") == "/track" and dict(rec.query)["ip"] == "1" and dict(rec.query)["verbose"] == "1"
    assert event["properties"]["$device_id"] == d


@pytest.mark.parametrize(
    "shape",
    ["batch_base64", "single_object", "beacon_text_plain", "gzip", "json_format", "get_data"],
)
async def test_js_payload_shapes_rewritten_to_cookie_identity(client, upstream, shape, delivery_mode):
    canonical_cookie = await first_visit(client, device_id())
    canonical = canonical_of(canonical_cookie)
    other_device = device_id()  # e.g. the SDK on another subdomain, or after Safari wiped its storage
    anon = js_event("Viewed", other_device)
    known = js_event("Bought", other_device, user="user-42")
    headers = with_cookie(canonical_cookie)
    if shape == "batch_base64":
        resp = await client.post(TRACK, data=b64_body([anon, known]), headers=headers)
    elif shape == "single_object":
        resp = await client.post(TRACK, data=b64_body(anon), headers=headers)
    elif shape == "beacon_text_plain":
        resp = await client.post(
            TRACK, data=b64_body([anon, known]), headers={**headers, "Content-Type": "text/plain;charset=UTF-8"}
        )
    elif shape == "gzip":
        resp = await client.post(
            TRACK, data=gzip.compress(b64_body([anon, known]).encode()), headers={**headers, "Content-Encoding": "gzip"}
        )
    elif shape == "json_format":
        resp = await client.post(TRACK, data=json_body([anon, known]), headers=headers)
    else:
        raw = base64.b64encode(json.dumps(anon).encode()).decode()
        resp = await client.get(f"/mp/track/?data={quote(raw, safe='')}&ip=1&verbose=1", headers=headers)
    assert resp.status == 200, await resp.text()
    assert cookie_from(resp) == canonical_cookie  # refreshed on every hit
    sent = 1 if shape in ("single_object", "get_data") else 2
    events = (await upstream.wait(1 + sent, "us", "/track"))[1:]
    forwarded = upstream.by("us", "/track")[-1]
    a = events[0]["properties"]
    assert a["distinct_id"] == f"$device:{canonical}" and a["$device_id"] == canonical
    assert a["$insert_id"] == anon["properties"]["$insert_id"]  # everything else intact
    if len(events) > 1:
        k = events[1]["properties"]
        assert k["distinct_id"] == "user-42" and k["$user_id"] == "user-42" and k["$device_id"] == canonical
    if shape == "get_data" and delivery_mode == "sync":
        assert forwarded.method == "GET"
    assert "cookie" not in forwarded.headers


async def test_identify_merges_canonical_with_user(client, upstream):
    cookie = await first_visit(client, device_id())
    canonical = canonical_of(cookie)
    d2 = device_id()
    ident = js_event("$identify", d2, user="user-7", **{"$anon_distinct_id": f"$device:{d2}"})
    await client.post(TRACK, data=b64_body([ident]), headers=with_cookie(cookie))
    p = (await upstream.wait(2, "us", "/track"))[-1]["properties"]
    assert p["$anon_distinct_id"] == f"$device:{canonical}" and p["distinct_id"] == "user-7"


async def test_engage_and_groups(client, upstream, delivery_mode):
    cookie = await first_visit(client, device_id())
    canonical = canonical_of(cookie)
    d2 = device_id()
    engage = [{"$token": TOKEN, "$distinct_id": f"$device:{d2}", "$device_id": d2, "$set": {"plan": "pro"}}]
    resp = await client.post("/mp/engage/?verbose=1&ip=1", data=b64_body(engage), headers=with_cookie(cookie))
    assert resp.status == 200
    [e] = await upstream.wait(1, "us", "/engage")
    assert e["$distinct_id"] == f"$device:{canonical}" and e["$device_id"] == canonical and e["$set"] == {"plan": "pro"}
    if delivery_mode == "spool":
        # Batches mix visitors: each profile update carries its visitor's IP (ip=1) for geolocation.
        assert e["$ip"] == "127.0.0.1"
        await client.post("/mp/engage/?verbose=1&ip=0", data=b64_body(engage), headers=with_cookie(cookie))
        assert "$ip" not in (await upstream.wait(2, "us", "/engage"))[-1]
    else:
        assert "$ip" not in e and dict(upstream.by("us", "/engage")[-1].query)["ip"] == "1"
    groups = [{"$token": TOKEN, "$group_key": "company", "$group_id": "acme", "$set": {"size": 10}}]
    resp = await client.post("/mp/groups/?verbose=1", data=b64_body(groups), headers=with_cookie(cookie))
    assert resp.status == 200
    assert await upstream.wait(1, "us", "/groups") == groups


async def test_tampered_cookie_is_replaced(client, upstream):
    cookie = await first_visit(client, device_id())
    canonical, _, tag = cookie.rpartition(".")
    victim = device_id()
    d2 = device_id()
    for i, forged in enumerate((f"{victim}.{tag}", f"{canonical}.{'A' * len(tag)}", "garbage", "")):
        resp = await client.post(TRACK, data=b64_body([js_event("x", d2)]), headers=with_cookie(forged))
        assert resp.status == 200
        new_cookie = cookie_from(resp)
        assert new_cookie and new_cookie != forged
        assert canonical_of(new_cookie) != victim
        sent = (await upstream.wait(2 + i, "us", "/track"))[-1]["properties"]
        assert sent["$device_id"] != victim


@pytest.mark.parametrize(
    "host,domain",
    [("www.example.com", ".example.com"), ("checkout.brand-b.test", ".brand-b.test"), ("proxy.other.test", None)],
)
async def test_set_cookie_attributes_per_host(client, host, domain):
    resp = await client.post(
        TRACK, data=b64_body([js_event("x", device_id())]), headers={**BROWSER, **FORM, "Host": host}
    )
    [header] = [h for h in resp.headers.getall("Set-Cookie") if h.startswith("fp_id=")]
    attrs = [a.strip() for a in header.split(";")]
    assert "HttpOnly" in attrs and "SameSite=Lax" in attrs and "Secure" in attrs
    assert [a for a in attrs if a.startswith("Domain=")] == ([f"Domain={domain}"] if domain else [])
    max_age = int(next(a for a in attrs if a.startswith("Max-Age=")).split("=")[1])
    assert 0 < max_age <= 400 * 86400


async def test_mixpanel_python_sdk(client, upstream):
    """The official SDK, unmodified, pointed at the proxy."""

    from mixpanel import Consumer, Mixpanel

    # A browser first, so the alias store knows its original device id.
    d = device_id()
    cookie = await first_visit(client, device_id())
    await client.post(TRACK, data=b64_body([js_event("x", d)]), headers=with_cookie(cookie))
    canonical = canonical_of(cookie)

    base = str(client.make_url("/mp"))
    consumer = Consumer(
        events_url=f"{base}/track", people_url=f"{base}/engage", groups_url=f"{base}/groups", import_url=f"{base}/import"
    )
    mp = Mixpanel(TOKEN, consumer=consumer)

    def server_side() -> None:
        mp.track(d, "Server Event", {"plan": "pro"})  # carries the browser's original device id
        mp.track("user-42", "Identified Server Event")
        mp.people_set("user-42", {"name": "Ada"})
        mp.group_set("company", "acme", {"size": 10})
        mp.import_data("api-key", "user-42", "Old Event", 1_700_000_000, api_secret="secret-xyz")

    await asyncio.to_thread(server_side)
    await upstream.wait(4, "us", "/track")
    tracks = upstream.by("us", "/track")
    server_events = [e for r in tracks for e in r.events() if e["event"].endswith("Server Event")]
    by_name = {e["event"]: e["properties"] for e in server_events}
    assert by_name["Server Event"]["distinct_id"] == canonical  # rewritten through the alias store
    assert by_name["Identified Server Event"]["distinct_id"] == "user-42"
    py_req = next(r for r in tracks if any(e["event"] == "Server Event" for e in r.events()))
    # The SDK asked for no geolocation (ip=0): in its body (sync) or the batch's query (spool).
    assert {**dict(py_req.query), **py_req.form()}["ip"] == "0"
    assert "ip" not in by_name["Server Event"]
    assert "cookie" not in py_req.headers
    [engage] = await upstream.wait(1, "us", "/engage")
    assert engage["$distinct_id"] == "user-42"
    assert (await upstream.wait(1, "us", "/groups"))[0]["$group_id"] == "acme"
    imp = upstream.by("us", "/import")[-1]
    assert imp.headers["authorization"] == "Basic " + base64.b64encode(b"secret-xyz:").decode()
    assert imp.events()[0]["event"] == "Old Event"


async def test_server_requests_never_get_the_cookie(client, upstream):
    resp = await client.post(
        "/mp/track", data=json_body(js_event("x", device_id())), headers={"User-Agent": "python-requests/2.32", **FORM}
    )
    assert resp.status == 200
    assert cookie_from(resp) is None
    # A server that replays a browser's cookie is still not treated as that browser.
    cookie = await first_visit(client, device_id())
    d = device_id()
    resp = await client.post(
        "/mp/track",
        data=json_body(js_event("x", d)),
        headers={"User-Agent": "python-requests/2.32", **FORM, "Cookie": f"fp_id={cookie}"},
    )
    events = await upstream.wait(3, "us", "/track")
    assert [e for e in events if e["properties"]["$device_id"] == d]


async def test_record_and_flags_identity_in_query(client, upstream):
    cookie = await first_visit(client, device_id())
    canonical = canonical_of(cookie)
    d2 = device_id()
    replay = gzip.compress(b'[{"type":3,"data":{}}]')
    auth = "Basic " + base64.b64encode(f"{TOKEN}:".encode()).decode()
    resp = await client.post(
        f"/mp/record/?format=gzip&distinct_id=%24device%3A{d2}&%24device_id={d2}&%24user_id=user-1&replay_id=r1&seq=0",
        data=replay,
        headers={**with_cookie(cookie), "Content-Type": "application/octet-stream", "Authorization": auth, "traceparent": "00-abc-def-01"},
    )
    assert resp.status == 200
    rec = upstream.by("us", "/record")[-1]
    q = dict(rec.query)
    assert q["distinct_id"] == f"$device:{canonical}" and q["$device_id"] == canonical and q["$user_id"] == "user-1"
    assert q["replay_id"] == "r1" and q["format"] == "gzip"
    assert rec.body == replay  # byte for byte
    assert rec.headers["authorization"] == auth and rec.headers["traceparent"] == "00-abc-def-01"

    context = json.dumps({"distinct_id": f"$device:{d2}", "device_id": d2, "custom": {"plan": "pro"}})
    resp = await client.get(f"/mp/flags/?context={quote(context)}&token={TOKEN}", headers={**with_cookie(cookie), "Authorization": auth})
    assert resp.status == 200 and "flags" in await resp.json()
    sent = json.loads(dict(upstream.by("us", "/flags")[-1].query)["context"])
    assert sent == {"distinct_id": f"$device:{canonical}", "device_id": canonical, "custom": {"plan": "pro"}}


async def test_decide_asks_about_the_canonical_id(client, upstream):
    cookie = await first_visit(client, device_id())
    canonical = canonical_of(cookie)
    d2 = device_id()  # this domain's own mixpanel-js id
    resp = await client.get(
        f"/mp-decide/decide?verbose=1&version=3&lib=web&token={TOKEN}&distinct_id=%24device%3A{d2}",
        headers=with_cookie(cookie),
    )
    assert resp.status == 200
    query = dict(upstream.by("decide", "/decide")[-1].query)
    assert query["distinct_id"] == f"$device:{canonical}" and query["token"] == TOKEN


async def test_a_spooled_batch_of_two_projects_reaches_each_projects_region(proxy_client, upstream, delivery_mode):
    """The spool routes each event by its own project token, also when a
    batch changes project and changes back."""
    if delivery_mode != "spool":
        pytest.skip("sync mode forwards a request as it came, to its first event's region")
    client = await proxy_client()
    d = device_id()
    events = [js_event(name, d, token=token) for name, token in (("a", EU_TOKEN), ("b", TOKEN), ("c", EU_TOKEN), ("d", IN_TOKEN))]
    resp = await client.post(TRACK, data=b64_body(events), headers={**BROWSER, **FORM})
    assert resp.status == 200
    eu = await upstream.wait(2, "eu", "/track")
    us = await upstream.wait(1, "us", "/track")
    india = await upstream.wait(1, "in", "/track")
    assert sorted(e["event"] for e in eu) == ["a", "c"]
    assert [e["event"] for e in us] == ["b"] and [e["event"] for e in india] == ["d"]


async def test_regions_and_decide(client, upstream):
    for token, region in ((EU_TOKEN, "eu"), (IN_TOKEN, "in"), (TOKEN, "us")):
        resp = await client.post(TRACK, data=b64_body([js_event("x", device_id(), token=token)]), headers={**BROWSER, **FORM})
        assert resp.status == 200
        [event] = await upstream.wait(1, region, "/track")
        assert event["properties"]["token"] == token
    resp = await client.get(f"/mp-decide/decide?verbose=1&version=3&lib=web&token={TOKEN}&distinct_id=%24device%3Aabc12345678")
    assert resp.status == 200
    assert upstream.by("decide", "/decide")
    resp = await client.get(f"/mp/flags/?context=%7B%7D&token={EU_TOKEN}")
    assert upstream.by("eu", "/flags")


@pytest.mark.parametrize("path", ["/mp/track", "/mp/track/", "/mp//track/", "/mp/engage", "/mp//engage/"])
async def test_route_spellings(client, upstream, path):
    payload = [js_event("x", device_id())] if "track" in path else [{"$token": TOKEN, "$distinct_id": "u", "$set": {}}]
    resp = await client.post(path + "?verbose=1", data=b64_body(payload), headers={**BROWSER, **FORM})
    assert resp.status == 200
    await upstream.wait(1)
    assert upstream.requests[-1].path.rstrip("/") == "/" + path.strip("/").split("/")[-1]


@pytest.mark.parametrize(
    "body,headers,status,error",
    [
        ("data=%%%", FORM, 400, "neither JSON nor valid base64"),
        ("data=" + quote(base64.b64encode(b"{oops").decode()), FORM, 400, "not valid JSON"),
        (b"\x1f\x8b garbage", {**FORM, "Content-Encoding": "gzip"}, 400, "not valid gzip"),
        ("data=" + quote("[1,2,3]"), FORM, 400, "is not a JSON object"),
        (json.dumps([{"event": "e", "properties": {}}] * 2001), {"Content-Type": "application/json"}, 400, "too many events"),
    ],
)
async def test_bad_input_is_refused_and_not_forwarded(client, upstream, body, headers, status, error):
    resp = await client.post(TRACK, data=body, headers={**BROWSER, **headers})
    assert resp.status == status
    answer = await resp.json()
    assert answer["status"] == 0 and error in answer["error"]
    assert upstream.requests == []
    # Not verbose: Mixpanel's plain "0".
    resp = await client.post("/mp/track/", data=body, headers={**BROWSER, **headers})
    assert resp.status == status and await resp.text() == "0"
    # The process is unharmed, and only the good event ever reaches the upstream.
    ok = await client.post(TRACK, data=b64_body([js_event("x", device_id())]), headers={**BROWSER, **FORM})
    assert ok.status == 200
    # Queued in order: a bad event that had been let through would be ahead of this one.
    await upstream.wait(1)
    assert len(upstream.received()) == 1


async def test_oversized_body(proxy_client, upstream):
    client = await proxy_client(server={"max_body_bytes": 4096})
    resp = await client.post(TRACK, data="data=" + "A" * 10_000, headers={**BROWSER, **FORM})
    assert resp.status == 413
    assert "larger than 4096" in (await resp.json())["error"]
    assert upstream.requests == []


async def test_client_ip_from_trusted_proxy_only(proxy_client, upstream, delivery_mode):
    def seen_ip() -> tuple[str, str]:
        """(IP the upstream is told, left-most X-Forwarded-For) for the last event."""
        rec = upstream.requests[-1]
        if delivery_mode == "sync":
            return rec.headers["x-real-ip"], rec.headers["x-forwarded-for"].split(",")[0].strip()
        ip = rec.events()[-1]["properties"]["ip"]  # spooled batches carry it per event
        return ip, ip

    trusting = await proxy_client()  # 127.0.0.1 is a trusted proxy by default
    headers = {**BROWSER, **FORM, "X-Forwarded-For": "198.51.100.7", "X-Real-IP": "198.51.100.7"}
    await trusting.post(TRACK, data=b64_body([js_event("x", device_id())]), headers=headers)
    await upstream.wait(1)
    assert seen_ip() == ("198.51.100.7", "198.51.100.7")

    untrusting = await proxy_client(server={"trusted_proxies": ["10.0.0.0/8"]})
    await untrusting.post(TRACK, data=b64_body([js_event("x", device_id())]), headers=headers)
    await upstream.wait(2)
    assert seen_ip() == ("127.0.0.1", "127.0.0.1")
    if delivery_mode == "sync":
        assert "198.51.100.7" not in upstream.requests[-1].headers["x-forwarded-for"]


async def test_header_hygiene(client, upstream):
    cookie = await first_visit(client, device_id())
    headers = {
        **with_cookie(cookie),
        "Authorization": "Basic c2VjcmV0Og==",
        "Connection": "keep-alive",
        "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic eA==",
        "X-Internal-Secret": "nope",
    }
    await client.post(TRACK, data=b64_body([js_event("x", device_id())]), headers=headers)
    await upstream.wait(2)
    rec = upstream.requests[-1]
    for name in ("cookie", "authorization", "keep-alive", "proxy-authorization", "x-internal-secret", "origin"):
        assert name not in rec.headers, name
    assert rec.headers["host"] == upstream.urls["us"].split("//")[1]


async def test_cors(client):
    resp = await client.options(
        "/mp/record/",
        headers={"Origin": "https://shop.example.com", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,traceparent"},
    )
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == "https://shop.example.com"
    assert resp.headers["Access-Control-Allow-Credentials"] == "true"
    allowed = resp.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed and "traceparent" in allowed
    resp = await client.post(TRACK, data=b64_body([js_event("x", device_id())]), headers={**BROWSER, **FORM})
    assert resp.headers["Access-Control-Allow-Origin"] == "https://www.example.com"
    assert resp.headers["Access-Control-Allow-Credentials"] == "true"
    resp = await client.post(
        TRACK, data=b64_body([js_event("x", device_id())]), headers={**BROWSER, **FORM, "Origin": "https://evil.test"}
    )
    assert resp.status == 200  # the event still counts, as at api.mixpanel.com
    assert "Access-Control-Allow-Origin" not in resp.headers
    resp = await client.options("/mp/track/", headers={"Origin": "https://evil.test", "Access-Control-Request-Method": "POST"})
    assert resp.status == 403 and "Access-Control-Allow-Origin" not in resp.headers


@pytest.mark.parametrize("delivery_mode", ["sync"])
async def test_upstream_unreachable_answers_502(proxy_client, upstream):
    client = await proxy_client(upstream={"us": "http://127.0.0.1:9", "timeout_seconds": 2})
    resp = await client.post(TRACK, data=b64_body([js_event("x", device_id())]), headers={**BROWSER, **FORM})
    assert resp.status == 502
    assert "unreachable" in (await resp.json())["error"]


@pytest.mark.parametrize("delivery_mode", ["sync"])
async def test_upstream_errors_pass_through_for_sdk_retry(client, upstream):
    upstream.script.append((503, b'{"status":0,"error":"busy"}', {"Content-Type": "application/json"}))
    upstream.script.append((429, b"", {"Retry-After": "7"}))
    resp = await client.post(TRACK, data=b64_body([js_event("x", device_id())]), headers={**BROWSER, **FORM})
    assert resp.status == 503
    resp = await client.post(TRACK, data=b64_body([js_event("x", device_id())]), headers={**BROWSER, **FORM})
    assert resp.status == 429 and resp.headers["Retry-After"] == "7"


async def test_lib_served_first_party_and_cached(client, upstream):
    for _ in range(3):
        resp = await client.get("/mp/lib.min.js")
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/javascript")
        assert b"fake mixpanel-js" in await resp.read()
    assert len(upstream.by("cdn")) == 1
    assert upstream.by("cdn")[0].path == "/libs/mixpanel-2-latest.min.js"


async def test_unknown_endpoint(client, upstream):
    resp = await client.post("/mp/nope/?verbose=1", data="data=x")
    assert resp.status == 404 and upstream.requests == []


async def test_forwarded_log_records_each_request(proxy_client, upstream, tmp_path):
    client = await proxy_client()
    cookie = await first_visit(client, device_id())
    d2 = device_id()
    await client.post(
        TRACK, data=b64_body([js_event("Checkout", d2)]),
        headers={**with_cookie(cookie), "Authorization": "Basic c2VjcmV0Og=="},
    )
    await upstream.wait(2)
    await client.close()  # drains the sender, flushes the log
    lines = (tmp_path / "data" / "forwarded.jsonl").read_bytes().splitlines()
    records = [orjson.loads(line) for line in lines]
    assert sum(r["count"] for r in records) == 2  # every event: exactly one outcome
    assert all(r["outcome"] == "forwarded" and r["status"] == 200 and r["route"] == "track" for r in records)
    [checkout] = [r for r in records if "Checkout" in r["events"]]
    canonical = canonical_of(cookie)
    assert canonical in checkout["canonical_ids"] and "cookie" in checkout["sources"]
    assert d2 in checkout["original_ids"]
    assert {"field": "$device_id", "from": d2, "to": canonical} in checkout["rewrites"]
    assert checkout["region"] == "us" and checkout["project"] == TOKEN and checkout["latency_ms"] >= 0
    assert {"new", "cookie"} == {s for r in records for s in r["sources"]}
    text = b"\n".join(lines).decode()
    assert cookie not in text and "c2VjcmV0Og" not in text and "127.0.0.1" not in text


async def test_forwarded_log_records_a_batch_event_by_event(proxy_client, upstream, tmp_path, delivery_mode):
    """A request of three events is one spool row: its log record still names
    each event and insert id in order, the request's identity once, and each
    rewrite with the id it replaced (the row keeps them as columns)."""
    client = await proxy_client()
    cookie = await first_visit(client, device_id())
    await upstream.wait(1)  # delivered on its own: the batch below is one record
    d2 = device_id()  # this host's own device id (one SDK's batch has one)
    events = [js_event("A", d2), js_event("B", d2, user="user-1", **{"$anon_distinct_id": f"$device:{d2}"}), js_event("C", d2)]
    await client.post(TRACK, data=b64_body(events), headers=with_cookie(cookie))
    await upstream.wait(4)
    await client.close()
    records = [orjson.loads(line) for line in (tmp_path / "data" / "forwarded.jsonl").read_bytes().splitlines()]
    [batch] = [r for r in records if "B" in r["events"]]
    ids = [e["properties"]["$insert_id"] for e in events]
    assert batch["count"] == 3 and batch["events"] == ["A", "B", "C"]
    if delivery_mode == "spool":  # the sender's records name each event's insert id too
        assert batch["insert_ids"] == ids
    canonical = canonical_of(cookie)
    assert batch["canonical_ids"] == [canonical] and batch["sources"] == ["cookie"]
    assert batch["original_ids"] == sorted({rw["from"] for rw in batch["rewrites"]}) and d2 in batch["original_ids"]
    # Event by event, field by field: A's two ids, B's device and anonymous id (its user
    # id untouched), C's two ids.
    assert [rw["field"] for rw in batch["rewrites"]] == [
        "distinct_id", "$device_id", "$device_id", "$anon_distinct_id", "distinct_id", "$device_id"
    ]
    assert all(rw["to"] in (canonical, f"$device:{canonical}") for rw in batch["rewrites"])


async def test_metrics_expose_identity_sources_and_outcomes(client, upstream, delivery_mode):
    cookie = await first_visit(client, device_id())
    await client.post(TRACK, data=b64_body([js_event("x", device_id())]), headers=with_cookie(cookie))
    await client.post(TRACK, data="data=%%%", headers={**BROWSER, **FORM})
    await upstream.wait(2)

    value = metric
    async def scrape() -> str:
        resp = await client.ops_get("/metrics")
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        return await resp.text()

    text = await scrape()
    assert value(text, 'firstparty_identity_source_total{source="new"}') == 1
    assert value(text, 'firstparty_identity_source_total{source="cookie"}') == 1
    assert value(text, "firstparty_rewrites_total") == 2  # distinct_id and $device_id of the second event
    assert value(text, "firstparty_bad_requests_total") == 1
    assert value(text, 'firstparty_requests_total{route="track",status="400"}') == 1
    assert value(text, 'firstparty_events_accepted_total{route="track"}') == 2
    if delivery_mode == "spool":
        for _ in range(100):  # the outcome is counted when the sender's batch completes
            if 'firstparty_delivery_outcomes_total{outcome="forwarded",route="track"}' in text:
                break
            await asyncio.sleep(0.02)
            text = await scrape()
        assert value(text, 'firstparty_delivery_outcomes_total{outcome="forwarded",route="track"}') == 2
        assert "firstparty_spool_depth" in text


async def test_neutral_mounts_and_route_aliases(proxy_client, upstream):
    """``server.mounts`` and ``server.route_aliases``: ``/a1/e/`` is ``/track/``
    on Mixpanel's side, ``/a1/flags/`` its flags; the default ``/mp/`` is gone."""
    client = await proxy_client(server={"mounts": ["/a1/"], "route_aliases": {"e": "track", "p": "engage"}})
    device = device_id()
    resp = await client.post("/a1/e/?verbose=1&ip=1", data=b64_body([js_event("Aliased", device)]), headers=FORM)
    assert resp.status == 200
    [event] = await upstream.wait(1)
    assert event["event"] == "Aliased"
    assert [r.path.rstrip("/") for r in upstream.by("us")] == ["/track"]
    resp = await client.get("/a1/flags/?context=%7B%22distinct_id%22%3A%22u%22%7D&token=t", headers=BROWSER)
    assert resp.status == 200 and upstream.by("us", "/flags")
    resp = await client.post("/mp/track/?verbose=1", data=b64_body([js_event("Old", device)]), headers=FORM)
    assert resp.status == 404
    link = await (await client.get("/a1/link.js")).text()
    assert '"/a1/go"' in link


async def test_a_large_replay_is_streamed_byte_for_byte_with_its_length(proxy_client, upstream):
    """A /record body over 64 kB goes upstream as it arrives: the same bytes,
    the same Content-Length (not re-chunked), identity rewritten in the query;
    one over server.max_body_bytes is refused 413 before anything is sent."""
    import os

    client = await proxy_client(server={"max_body_bytes": 1024 * 1024})
    device = device_id()
    blob = os.urandom(300 * 1024)  # incompressible: what a gzip'd replay looks like
    query = f"/mp/record/?format=gzip&distinct_id=%24device%3A{device}&%24device_id={device}&replay_id=r1"
    headers = {**BROWSER, "Content-Type": "application/octet-stream", "Authorization": "Basic dDo="}

    async def slowly() -> Any:
        # The second half is sent only once the vendor has the request's head:
        # a proxy that read the whole body first would never get there.
        yield blob[: len(blob) // 2]
        for _ in range(500):
            if upstream.arrivals:
                break
            await asyncio.sleep(0.01)
        assert upstream.arrivals, "the upstream saw nothing before the body was complete: not streamed"
        yield blob[len(blob) // 2 :]

    resp = await client.post(query, data=slowly(), headers={**headers, "Content-Length": str(len(blob))})
    assert resp.status == 200
    [forwarded] = upstream.by("us", "/record")
    assert forwarded.body == blob
    assert forwarded.headers["content-length"] == str(len(blob))
    assert "transfer-encoding" not in forwarded.headers
    assert forwarded.headers["authorization"] == "Basic dDo="
    resp = await client.post(query, data=os.urandom(2 * 1024 * 1024), headers=headers)
    assert resp.status == 413
    assert len(upstream.by("us", "/record")) == 1
