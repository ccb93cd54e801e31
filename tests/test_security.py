"""A hostile client against the identity layer (issue 21): it must not read,
write or fix another visitor's identity, nor exhaust what the proxy keeps.
Each test is written to fail on the code before the fix it names."""

from __future__ import annotations

import copy
import uuid
from typing import Any

import orjson
import pytest

from proxy.core.ids import MAX_ID_CHARS, valid_id
from proxy.services.store import AliasStore, BoundedMemoryCache
from tests.conftest import SEG_KEY, b64_body, canonical_of, cookie_from, device_id, js_event, json_body
from tests.test_crossdomain import A, B, IDENTITY, browser
from tests.test_store import redis_settings  # noqa: F401 - the fixture

TRACK = "/mp/track/?verbose=1&ip=1"
SERVER = {"User-Agent": "python-requests/2.31", "Content-Type": "application/x-www-form-urlencoded"}
CARRY = copy.deepcopy(IDENTITY)
CARRY["identity"]["carry_properties"] = ["plan"]


def crafted_ids(victim: str) -> list[str]:
    """Ids naming the proxy's own records of ``victim``, in every key spelling
    the store used or uses (``kind:...`` before, ``kind/...`` now)."""
    kinds = [f"carry:{victim}", f"touch:{victim}", f"devices:{victim}", f"host:{victim}:{A}:test-token-us",
             f"host:{victim}:{A}:", f"claim:token:{victim}", f"fp:alias:{victim}"]
    return kinds + [k.replace(":", "/", 1) for k in kinds]


@pytest.fixture(params=["memory", "redis"])
async def hostile(request: Any, proxy_client: Any, redis_settings: Any) -> Any:  # noqa: F811
    sections = copy.deepcopy(CARRY)
    if request.param == "redis":
        sections["store"] = redis_settings
    return await proxy_client(**sections)


async def test_crafted_ids_cannot_read_or_write_another_visitors_records(hostile, upstream):
    client = hostile
    # The victim: a browser on A with a carried property and a first touch.
    own_device = device_id()
    first = js_event("Landing", own_device, plan="enterprise-secret",
                     **{"$initial_referrer": "https://search.test/?q=secret", "$initial_referring_domain": "search.test"})
    cookie = cookie_from(await client.post(TRACK, data=b64_body([first]), headers=browser(A)))
    victim = canonical_of(cookie)
    assert (await client.services.store.carried(victim)) == {"plan": "enterprise-secret"}
    # The attacker: no cookie of the victim's, every crafted id in every identity field.
    for crafted in crafted_ids(victim):
        for props in ({"$device_id": crafted, "distinct_id": f"$device:{crafted}"},
                      {"$anon_distinct_id": f"$device:{crafted}"}):
            event = js_event("Probe", device_id(), plan="ATTACKER-INJECTED", **props)
            resp = await client.post(TRACK, data=b64_body([event]), headers=browser(A))
            assert resp.status < 500, (crafted, await resp.text())
            for header in resp.headers.getall("Set-Cookie", []):
                value = header.split(";", 1)[0].split("=", 1)[1]
                canonical = canonical_of(value)
                assert valid_id(canonical), header  # never a record's value
                assert canonical != victim and "secret" not in header and "search.test" not in header
        # Segment's anonymousId, and a server SDK's lookups, the same way.
        call = {"type": "track", "event": "Probe", "anonymousId": crafted, "writeKey": SEG_KEY,
                "properties": {"plan": "ATTACKER-INJECTED"}}
        resp = await client.post("/seg/v1/t", data=orjson.dumps(call), headers={**browser(A), "Content-Type": "text/plain"})
        assert resp.status < 500 and victim not in str(resp.headers)
        resp = await client.post("/mp/track", data=json_body(js_event("Server", crafted)), headers=SERVER)
        assert resp.status == 200
    # The victim's next event still carries their own value, never the attacker's.
    later = js_event("Purchase", own_device)
    await client.post(TRACK, data=b64_body([later]), headers=browser(A, cookie))
    events = await upstream.wait(1 + 3 * len(crafted_ids(victim)) + 1, "us", "/track")
    purchase = next(e for e in events if e["event"] == "Purchase")["properties"]
    assert purchase["plan"] == "enterprise-secret" and purchase["$device_id"] == victim
    for event in events:  # no server event was rewritten to a record's value
        assert "secret" not in str(event["properties"].get("$device_id")), event
    store = client.services.store
    assert (await store.carried(victim)) == {"plan": "enterprise-secret"}
    assert (await store.first_touch(victim)).get("$initial_referring_domain") == "search.test"


def test_store_keys_are_one_kind_each_and_refuse_unsafe_parts():
    store = AliasStore(BoundedMemoryCache(1 << 20, timeout=None))
    victim = str(uuid.uuid4())
    keys = {
        store._key("alias", f"carry/{victim}"),  # noqa: SLF001
        store._key("carry", victim),  # noqa: SLF001
        store._key("alias", f"carry:{victim}"),  # noqa: SLF001
        store._key("host", victim, A, "-"),  # noqa: SLF001
        store._key("host", f"{victim}:{A}", "-", "-"),  # noqa: SLF001
    }
    assert None in keys  # "/" is never part of a part
    assert len(keys - {None}) == 4  # and the others are all distinct
    for bad in ("", "a/b", "a\nb", "x" * 300, "caf\u00e9", "a b"):
        assert store._key("alias", bad) is None  # noqa: SLF001


async def test_an_alias_named_by_an_unproven_request_is_not_repointed(proxy_client, upstream):
    client = await proxy_client(**IDENTITY)
    # The visitor: cookie C on A, then their other device id D on A's shop (alias D -> C).
    cookie = cookie_from(await client.post(TRACK, data=b64_body([js_event("A", device_id())]), headers=browser(A)))
    victim = canonical_of(cookie)
    d = device_id()
    await client.post(TRACK, data=b64_body([js_event("Shop", d)]), headers=browser("shop.site-a.test", cookie))
    # Another browser, no cookie, names D beside its own id.
    hostile = js_event("Hostile", device_id(), **{"$anon_distinct_id": f"$device:{d}"})
    resp = await client.post(TRACK, data=b64_body([hostile]), headers=browser(A))
    assert canonical_of(cookie_from(resp)) != victim
    # A server-side event for D still goes to the visitor.
    await client.post("/mp/track", data=json_body(js_event("Server", d)), headers=SERVER)
    events = await upstream.wait(4, "us", "/track")
    server = next(e for e in events if e["event"] == "Server")["properties"]
    assert server["$device_id"] == victim
    # A request that proves its canonical id (its own signed cookie) may move it.
    other = cookie_from(await client.post(TRACK, data=b64_body([js_event("B", device_id())]), headers=browser(A)))
    await client.post(TRACK, data=b64_body([js_event("Moved", d)]), headers=browser("blog.site-a.test", other))
    await client.post("/mp/track", data=json_body(js_event("Server 2", d)), headers=SERVER)
    events = await upstream.wait(7, "us", "/track")
    server = next(e for e in events if e["event"] == "Server 2")["properties"]
    assert server["$device_id"] == canonical_of(other)


async def test_ids_over_the_limit_are_refused_and_memory_stays_flat(proxy_client, upstream):
    client = await proxy_client(**IDENTITY)
    cache = client.services.store._cache  # noqa: SLF001
    await client.post(TRACK, data=b64_body([js_event("Warm", device_id())]), headers=browser(A))
    before = cache.bytes
    huge = "d" * 100_000
    for props in ({"$device_id": huge}, {"distinct_id": f"$device:{huge}"}, {"$anon_distinct_id": f"$device:{huge}"}):
        resp = await client.post(TRACK, data=b64_body([js_event("Huge", device_id(), **props)]), headers=browser(A))
        assert resp.status == 400
        body = await resp.json()
        assert body["status"] == 0 and str(MAX_ID_CHARS) in body["error"] and huge[:200] not in body["error"]
    call = {"type": "track", "event": "Huge", "anonymousId": "a" * (MAX_ID_CHARS + 1), "writeKey": SEG_KEY}
    resp = await client.post("/seg/v1/t", data=orjson.dumps(call), headers={**browser(A), "Content-Type": "text/plain"})
    assert resp.status == 400 and (await resp.json())["success"] is False
    # A server SDK's long id is its own business: forwarded, never looked up or kept.
    resp = await client.post("/mp/track", data=json_body(js_event("Server", huge)), headers=SERVER)
    assert resp.status == 200
    assert cache.bytes == before
    received = await upstream.wait(2, "us", "/track")
    assert [e["event"] for e in received] == ["Warm", "Server"]
