"""The backend helper: a site's server reads the visitor's verified canonical
id from the fp_id cookie and tracks with it (the real mixpanel Python SDK)."""

from __future__ import annotations

import asyncio

from proxy.hybrid import canonical_id
from tests.conftest import BROWSER, b64_body, canonical_of, cookie_from, device_id, js_event

SECRET = "s" * 32  # tests.conftest.make_settings's cookie.secret


async def test_a_verified_cookie_gives_the_canonical_id_and_a_tampered_one_none(client):
    resp = await client.post("/mp/track/", data=b64_body([js_event("Page", device_id())]),
                             headers={**BROWSER, "Content-Type": "application/x-www-form-urlencoded"})
    cookie = cookie_from(resp)
    assert canonical_id(cookie, SECRET) == canonical_of(cookie)
    assert canonical_id(cookie, SECRET.encode()) == canonical_of(cookie)
    assert canonical_id(f'"{cookie}"', SECRET) == canonical_of(cookie)  # as some frameworks quote it
    tag_flipped = cookie[:-1] + ("A" if cookie[-1] != "A" else "B")
    assert canonical_id(tag_flipped, SECRET) is None
    other_id = "0" * 36 + cookie[36:]
    assert canonical_id(other_id, SECRET) is None  # someone else's id under this tag
    assert canonical_id(cookie, "another-deployments-secret") is None
    assert canonical_id(None, SECRET) is None and canonical_id("", SECRET) is None


async def test_backend_events_with_it_join_the_browsers_identity(client, upstream):
    from mixpanel import Consumer, Mixpanel

    device = device_id()
    form = {**BROWSER, "Content-Type": "application/x-www-form-urlencoded"}
    first = await client.post("/mp/track/", data=b64_body([js_event("Browser page", device)]), headers=form)
    cookie = cookie_from(first)
    # The backend, handling a request that carried the cookie:
    canonical = canonical_id(cookie, SECRET)
    assert canonical is not None
    mp = Mixpanel("test-token-us", consumer=Consumer(events_url=client.make_url("/mp/track"), request_timeout=5))
    await asyncio.to_thread(mp.track, f"$device:{canonical}", "Order Completed", {"$device_id": canonical, "total": 30})
    await asyncio.to_thread(mp.track, "user-7", "Logged in", {"$device_id": canonical, "$user_id": "user-7"})
    events = await upstream.wait(3, "us", "/track")
    by_name = {e["event"]: e["properties"] for e in events}
    assert by_name["Browser page"]["$device_id"] == by_name["Order Completed"]["$device_id"] == canonical
    assert by_name["Order Completed"]["distinct_id"] == f"$device:{canonical}"
    assert by_name["Logged in"]["$device_id"] == canonical and by_name["Logged in"]["$user_id"] == "user-7"
