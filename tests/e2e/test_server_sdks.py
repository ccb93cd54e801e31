"""The server SDKs from npm against the real proxy (issue 22): mixpanel-node,
@segment/analytics-node (host and path apart) and the legacy analytics-node 6,
run by ``server_sdks.mjs`` as their users configure them. A browser is seen
first, so the alias store knows its device id; the SDKs then send events for
that device."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SEG_KEY, TOKEN, b64_body, canonical_of, cookie_from, device_id, js_event
from tests.support import A, IDENTITY, TRACK, browser, eventually

HERE = Path(__file__).parent


async def run_sdks(base: str, device: str) -> dict[str, str]:
    proc = await asyncio.create_subprocess_exec(
        "node", str(HERE / "server_sdks.mjs"), base, TOKEN, SEG_KEY, device, cwd=HERE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail("the server SDKs did not finish within 60 s")
    assert proc.returncode == 0, err.decode()
    return json.loads(out.decode().strip().splitlines()[-1])


async def test_node_server_sdks_deliver_and_are_rewritten(proxy_client: Any, upstream: Any, delivery_mode: str) -> None:
    client = await proxy_client(**IDENTITY)
    cookie = cookie_from(await client.post(TRACK, data=b64_body([js_event("A", device_id())]), headers=browser(A)))
    canonical = canonical_of(cookie)
    original = device_id()  # the browser's device id on another subdomain: an alias of the canonical id
    await client.post(TRACK, data=b64_body([js_event("Shop", original)]), headers=browser("shop.site-a.test", cookie))
    results = await run_sdks(f"http://127.0.0.1:{client.port}", original)
    assert results == {"mixpanel.track": "ok", "mixpanel.people": "ok", "analytics-node": "ok", "analytics-node@6": "ok"}

    track = next(e for e in await upstream.wait(3, "us", "/track") if e["event"] == "Node track")["properties"]
    assert track["distinct_id"] == canonical  # rewritten through the alias store
    assert "ip" not in track  # a server's call: no IP of the backend's
    if delivery_mode == "spool":
        assert isinstance(track.get("time"), float)  # mixpanel-node sent none: the proxy's acceptance time
    [profile] = await upstream.wait(1, "us", "/engage")
    assert profile["$distinct_id"] == "user-node" and profile["$set"] == {"plan": "pro"}

    await eventually(lambda: len([c for r in upstream.by("seg-us") for c in r.events()]) == 2, 20, "both Segment calls")
    calls = {c["event"]: c for r in upstream.by("seg-us") for c in r.events()}
    for name in ("Node next track", "Node legacy track"):
        assert calls[name]["anonymousId"] == canonical, name
        assert "ip" not in calls[name].get("context", {}), name
    assert {r.path for r in upstream.by("seg-us")} == {"/v1/batch"}
    node = [r for r in upstream.requests if r.path.rstrip("/") in ("/track", "/engage")
            and any(e.get("event") == "Node track" or "$set" in e for e in r.events())]
    assert node and not [r for r in node if "cookie" in r.headers or "x-real-ip" in r.headers]
