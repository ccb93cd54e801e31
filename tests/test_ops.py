"""The ops listener: /metrics, /readyz and /healthz on their own port, for the
allowed networks only; the public port keeps /healthz alone."""

from __future__ import annotations

import pytest

from proxy.errors import ConfigError
from proxy.settings import build_settings
from tests.support import metric


async def test_ops_endpoints_are_not_on_the_public_port(client):
    for path in ("/metrics", "/readyz"):
        assert (await client.get(path)).status == 404
        assert (await client.ops_get(path)).status == 200
    public = await client.get("/healthz")
    assert public.status == 200 and (await public.json())["status"] == "ok"
    assert (await client.ops_get("/healthz")).status == 200
    text = await (await client.ops_get("/metrics")).text()
    assert metric(text, "firstparty_spool_depth") == 0


async def test_only_allowed_networks_reach_the_ops_listener(proxy_client):
    client = await proxy_client(ops={"allowed_networks": ["10.0.0.0/8"]})
    resp = await client.ops_get("/metrics")
    assert resp.status == 403
    assert "ops.allowed_networks" in await resp.text()


async def test_ops_methods(client):
    resp = await client.session.post(f"http://127.0.0.1:{client.ops.port}/metrics")
    assert resp.status == 405 and resp.headers["Allow"] == "GET, HEAD"


def test_the_ops_port_is_not_the_public_one(tmp_path):
    with pytest.raises(ConfigError) as err:
        build_settings({"server": {"data_dir": str(tmp_path), "port": 9000}, "ops": {"port": 9000}}, {})
    assert err.value.key == "ops.port"
    assert build_settings({"server": {"data_dir": str(tmp_path)}, "ops": {"port": 0}}, {}).ops.port == 0


async def test_the_visitors_ip_can_reach_the_vendors_truncated(proxy_client, upstream, delivery_mode):
    import orjson

    from tests.conftest import BROWSER, b64_body, device_id, js_event
    from tests.support import eventually
    from tests.support import PLAIN, ajs_call

    client = await proxy_client(privacy={"ip_prefix_v4": 24, "ip_prefix_v6": 48})
    # The peer, 127.0.0.1, is a trusted proxy: the visitor is the forwarded address.
    for visitor in ("203.0.113.77", "2001:db8:1:2::7"):
        resp = await client.post("/mp/track/?ip=1", data=b64_body([js_event(visitor, device_id())]),
                                 headers={**BROWSER, "Content-Type": "application/x-www-form-urlencoded", "X-Forwarded-For": visitor})
        assert resp.status == 200
    seg = await client.post("/seg/v1/t", data=orjson.dumps(ajs_call("track", device_id(), event="x")),
                            headers={**BROWSER, **PLAIN, "X-Forwarded-For": "198.51.100.9"})
    assert seg.status == 200
    await upstream.wait(2, "us", "/track")
    await eventually(lambda: upstream.by("seg-us"), 10, "the Segment call")
    seen = orjson.dumps([r.body.decode("latin-1") for r in upstream.requests] + [r.headers for r in upstream.requests])
    for whole in (b"203.0.113.77", b"2001:db8:1:2::7", b"198.51.100.9"):
        assert whole not in seen
    if delivery_mode == "spool":  # each event carries its visitor's (cut) IP
        ips = {e["event"]: e["properties"]["ip"] for e in upstream.received("us", "/track")}
        assert ips == {"203.0.113.77": "203.0.113.0", "2001:db8:1:2::7": "2001:db8:1::"}
    else:  # forwarded as the visitor's request, the (cut) IP in the forwarding headers
        forwarded = [r.headers["x-real-ip"] for r in upstream.by("us", "/track")]
        assert forwarded == ["203.0.113.0", "2001:db8:1::"]
    [call] = upstream.by("seg-us")[0].events()
    assert call["context"]["ip"] == "198.51.100.0"


async def test_metrics_count_events_by_protocol_and_identity_source_and_dead_letters_by_reason(proxy_client, upstream):
    import orjson
    from aiohttp import web

    from tests.conftest import BROWSER, b64_body, cookie_from, device_id, js_event
    from tests.support import PLAIN, ajs_call

    async def refuse_poison(rec):
        if rec.path.startswith("/track") and any(e.get("event") == "poison" for e in rec.events()):
            return web.json_response({"error": "bad", "status": 0}, status=400)
        return None

    upstream.behave = refuse_poison
    client = await proxy_client(delivery={"mode": "spool"})
    form = {**BROWSER, "Content-Type": "application/x-www-form-urlencoded"}
    d = device_id()  # one browser's batch: one device id
    first = await client.post("/mp/track/?verbose=1", data=b64_body([js_event("a", d), js_event("b", d)]), headers=form)
    jar = {"Cookie": f"fp_id={cookie_from(first)}"}
    await client.post("/seg/v1/t", data=orjson.dumps(ajs_call("track", device_id(), event="c")), headers={**BROWSER, **PLAIN, **jar})
    await client.post("/mp/track/?verbose=1", data=b64_body([js_event("poison", device_id())]), headers={**form, **jar})
    text = ""

    async def counted() -> bool:
        nonlocal text
        text = await (await client.ops_get("/metrics")).text()
        return metric(text, 'firstparty_dead_lettered_total{reason="rejected"}') == 1

    from tests.support import eventually_async

    await eventually_async(counted, 10, "the poison event's dead letter")
    assert metric(text, 'firstparty_events_total{protocol="mixpanel",source="new"}') == 2
    assert metric(text, 'firstparty_events_total{protocol="segment",source="cookie"}') == 1
    # The poison came from the same browser with a new device id at once: a reset().
    assert metric(text, 'firstparty_events_total{protocol="mixpanel",source="reset"}') == 1
