"""Carried properties (identity.carry_properties): what a visitor's events set
on one domain reaches their events on another, never anyone else's."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from proxy.core import carry
from proxy.errors import ConfigError
from proxy.settings import build_settings
from tests.conftest import SEG_KEY, b64_body, cookie_from, device_id, js_event
from tests.support import A, B, IDENTITY, browser, go_to_b, landing_event

CARRY = copy.deepcopy(IDENTITY)
CARRY["identity"]["carry_properties"] = ["plan", "ab_*", "utm_*"]
TRACK = "/mp/track/?verbose=1&ip=1"


def props_of(upstream: Any, name: str) -> dict[str, Any]:
    return next(e["properties"] for e in upstream.received("us", "/track") if e["event"] == name)


async def test_properties_set_on_a_reach_b_and_never_another_browser(proxy_client, upstream):
    client = await proxy_client(**CARRY)
    # On A: mixpanel-js's super properties (register()) ride in every event.
    a_event = js_event("Page A", device_id(), plan="pro", ab_checkout="blue", utm_source="newsletter", color="red")
    first = await client.post(TRACK, data=b64_body([a_event]), headers=browser(A))
    cookie_a = cookie_from(first)
    location = await go_to_b(client, cookie_a)
    # On B, through /mp/go: B's storage has none of them.
    d_b = device_id()
    await client.post(TRACK, data=b64_body([landing_event(location, d_b)]), headers=browser(B))
    cookie_b = cookie_from(await client.post(TRACK, data=b64_body([js_event("Own plan", d_b, plan="team")]),
                                             headers=browser(B)))
    # analytics.js on B: its track call gets them too, in its properties.
    call = {"type": "track", "event": "Seg on B", "anonymousId": device_id(), "writeKey": SEG_KEY, "properties": {}}
    await client.post("/seg/v1/t", data=orjson.dumps(call),
                      headers={**browser(B, cookie_b), "Content-Type": "text/plain"})
    # Someone else, on B.
    await client.post(TRACK, data=b64_body([js_event("Stranger", device_id())]), headers=browser(B))
    await upstream.wait(4, "us", "/track")
    from tests.support import eventually

    await eventually(lambda: upstream.by("seg-us"), 10, "the Segment call")
    page_b = props_of(upstream, "Page B")
    assert (page_b["plan"], page_b["ab_checkout"], page_b["utm_source"]) == ("pro", "blue", "newsletter")
    assert "color" not in page_b  # not a carried name
    assert props_of(upstream, "Own plan")["plan"] == "team"  # the event's own value wins
    stranger = props_of(upstream, "Stranger")
    assert not {"plan", "ab_checkout", "utm_source"} & set(stranger)
    [seg] = [c for r in upstream.by("seg-us") for c in r.events()]
    assert seg["properties"]["plan"] == "team"  # the newest value seen, kept
    assert seg["properties"]["ab_checkout"] == "blue"


def test_an_own_referring_domain_may_carry_a_port():
    from proxy.protocols import firsttouch

    assert firsttouch.own("www.site-a.test:8443", (".site-a.test",))
    assert firsttouch.own("WWW.SITE-A.TEST", (".site-a.test",))
    assert not firsttouch.own("www.google.com", (".site-a.test",))
    assert not firsttouch.own("evil-site-a.test", (".site-a.test",))


def test_identity_and_the_sdks_own_properties_are_never_carried(tmp_path):
    match = carry.matcher(("*",))
    assert carry.collect({"$device_id": "d", "mp_lib": "web", "plan": "pro", "big": "x" * 2000}, match) == {"plan": "pro"}
    with pytest.raises(ConfigError) as err:
        build_settings({"server": {"data_dir": str(tmp_path)}, "identity": {"carry_properties": ["$browser"]}}, {})
    assert err.value.key == "identity.carry_properties"


def test_kept_values_are_bounded_newest_first():
    kept = {f"p{i}": i for i in range(carry.MAX_CARRIED)}
    merged = carry.merge(kept, {"new": 1})
    assert len(merged) == carry.MAX_CARRIED and merged["new"] == 1
    assert carry.merge({"a": 1}, {"a": 2}) == {"a": 2}


GOOGLE = {"$initial_referrer": "https://www.google.com/search?q=shoes", "$initial_referring_domain": "www.google.com"}


async def test_first_touch_survives_the_hop_to_another_domain(proxy_client, upstream, tmp_path):
    from tests.support import log_records, token_of

    client = await proxy_client(**IDENTITY)
    # Landing on A from a search, with a campaign.
    first = await client.post(TRACK, data=b64_body([js_event("Landing A", device_id(), utm_source="google", **GOOGLE)]),
                              headers=browser(A))
    cookie_a = cookie_from(first)
    location = await go_to_b(client, cookie_a)
    # On B, mixpanel-js's own first touch is site A (the hop), and its first campaign A's link.
    d_b = device_id()
    hop = {"$initial_referrer": f"http://{A}/", "$initial_referring_domain": A}
    landed = await client.post(TRACK, data=b64_body([landing_event(location, d_b, **hop)]), headers=browser(B))
    update = {"$token": "test-token-us", "$distinct_id": f"$device:{d_b}", "$device_id": d_b,
              "$set_once": {"initial_utm_source": "mail", "initial_utm_medium": "email", "plan_at_signup": "free"}}
    # The landing page's profile update: the token in its URL, the cookie the landing set.
    await client.post(f"/mp/engage/?verbose=1&fpb={token_of(location)}", data=b64_body([update]),
                      headers=browser(B, cookie_from(landed)))
    # Another visitor whose first seen referrer is an own domain, with nothing kept: left alone.
    await client.post(TRACK, data=b64_body([js_event("Stranger", device_id(), **hop)]), headers=browser(B))
    await upstream.wait(3, "us", "/track")
    await upstream.wait(1, "us", "/engage")
    page_b = props_of(upstream, "Page B")
    assert (page_b["$initial_referrer"], page_b["$initial_referring_domain"]) == (GOOGLE["$initial_referrer"], "www.google.com")
    [profile] = upstream.received("us", "/engage")
    # The first campaign's source; its medium was none; the rest untouched.
    assert profile["$set_once"] == {"initial_utm_source": "google", "plan_at_signup": "free"}
    assert props_of(upstream, "Stranger")["$initial_referring_domain"] == A
    records = await log_records(client, tmp_path)
    fields = {(rw["field"], rw["to"]) for r in records for rw in r.get("rewrites", [])}
    assert ("$initial_referring_domain", "www.google.com") in fields  # logged as a rewrite


async def test_first_touch_repair_can_be_off(proxy_client, upstream):
    off = copy.deepcopy(IDENTITY)
    off["identity"]["repair_first_touch"] = False
    client = await proxy_client(**off)
    first = await client.post(TRACK, data=b64_body([js_event("Landing A", device_id(), **GOOGLE)]), headers=browser(A))
    location = await go_to_b(client, cookie_from(first))
    hop = {"$initial_referrer": f"http://{A}/", "$initial_referring_domain": A}
    await client.post(TRACK, data=b64_body([landing_event(location, device_id(), **hop)]), headers=browser(B))
    await upstream.wait(2, "us", "/track")
    assert props_of(upstream, "Page B")["$initial_referring_domain"] == A
