"""analytics.js first-party: /seg/cdn/ serves the script, its bundles and its
settings from Segment's CDN (a recording fake here), the settings pointed at
this proxy; /seg/v1/m (the SDK's own telemetry) is answered, not forwarded."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from aiohttp import web

from proxy.protocols import segment_cdn
from tests.conftest import BROWSER, SEG_EU_KEY, SEG_KEY

SCRIPT = f"/seg/cdn/analytics.js/v1/{SEG_KEY}/analytics.min.js"
SETTINGS = f"/seg/cdn/v1/projects/{SEG_KEY}/settings"


def cdn_requests(upstream: Any) -> list[Any]:
    return upstream.by("seg-cdn")


async def test_the_script_and_its_bundles_are_served_first_party_and_cached(client, upstream):
    for path in (SCRIPT, SCRIPT, "/seg/cdn/analytics-next/bundles/ajs-destination.bundle.40628baed746e9904edc.js"):
        resp = await client.get(path, headers=BROWSER)
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/javascript; charset=utf-8"
        assert resp.headers["Cache-Control"] == "public, max-age=3600"
        assert "fake analytics.js" in await resp.text()
    fetched = [r.path for r in cdn_requests(upstream)]
    # The script once (the second visitor got the cached copy), the bundle once.
    assert fetched == [SCRIPT.removeprefix("/seg/cdn"), "/analytics-next/bundles/ajs-destination.bundle.40628baed746e9904edc.js"]
    assert all("cookie" not in r.headers for r in cdn_requests(upstream))


async def test_settings_point_analytics_js_at_this_proxy(proxy_client, upstream):
    client = await proxy_client()  # the peer, 127.0.0.1, is a trusted proxy by default
    # Behind nginx terminating TLS: the visitor used https.
    resp = await client.get(SETTINGS, headers={**BROWSER, "Host": "www.example.com", "X-Forwarded-Proto": "https"})
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "private, max-age=300"
    assert resp.headers["Vary"] == "Host, X-Forwarded-Host"
    settings = await resp.json()
    segment_io = settings["integrations"]["Segment.io"]
    assert segment_io["apiHost"] == "www.example.com/seg/v1"
    assert segment_io["protocol"] == "https"
    assert segment_io["apiKey"] == SEG_KEY  # the rest is Segment's, untouched
    assert settings["plan"] == {"track": {"__default": {"enabled": True, "integrations": {}}}}
    assert settings["metrics"]["host"] == "www.example.com/seg/v1"
    # Destinations load from the first-party CDN path too.
    assert settings["remotePlugins"][0]["url"] == "https://www.example.com/seg/cdn/next-integrations/actions/example/0123abcd.js"

    # Another host asking: its own apiHost, from the same cached settings.
    other = await client.get(SETTINGS, headers={**BROWSER, "Host": "shop.example.com:8443", "X-Forwarded-Proto": "https"})
    assert (await other.json())["integrations"]["Segment.io"]["apiHost"] == "shop.example.com:8443/seg/v1"
    assert len(cdn_requests(upstream)) == 1


async def test_forwarded_proto_is_believed_only_from_a_trusted_proxy(proxy_client, upstream):
    client = await proxy_client(server={"trusted_proxies": ["10.9.8.0/24"]})
    resp = await client.get(SETTINGS, headers={**BROWSER, "Host": "www.example.com", "X-Forwarded-Proto": "https"})
    # The peer (127.0.0.1) is not a trusted proxy here: the connection's own scheme.
    assert (await resp.json())["integrations"]["Segment.io"]["protocol"] == "http"


@pytest.mark.parametrize(
    "path",
    [
        "/seg/cdn/",
        "/seg/cdn/anything.js",
        "/seg/cdn/v1/projects/key/other",
        "/seg/cdn/analytics.js/v1/key/evil.js",
        "/seg/cdn/next-integrations/../../etc/passwd.js",
        "/seg/cdn/next-integrations/%2e%2e/x.js",
        "/seg/cdn/analytics-next/bundles/a/b.js",
    ],
)
async def test_only_segment_cdn_paths_are_fetched(client, upstream, path):
    resp = await client.get(path, headers=BROWSER)
    assert resp.status == 404
    assert cdn_requests(upstream) == []


async def test_a_cdn_failure_is_a_502_and_is_not_cached(client, upstream):
    upstream.script.append((404, b"Not Found", {}))
    first = await client.get(SCRIPT, headers=BROWSER)
    assert first.status == 502
    assert "404" in await first.text()
    second = await client.get(SCRIPT, headers=BROWSER)  # the CDN is fine again
    assert second.status == 200
    assert len(cdn_requests(upstream)) == 2


async def test_settings_that_are_not_json_are_a_502(client, upstream):
    upstream.script.append((200, b"<html>maintenance</html>", {"Content-Type": "text/html"}))
    resp = await client.get(SETTINGS, headers={**BROWSER, "Host": "www.example.com"})
    assert resp.status == 502
    assert "not usable" in await resp.text()


async def test_a_cold_cache_costs_the_cdn_one_request(client, upstream):
    release = asyncio.Event()

    async def slow(rec: Any) -> web.Response | None:
        await release.wait()
        return None

    upstream.behave = slow
    pending = [asyncio.ensure_future(client.get(SCRIPT, headers=BROWSER)) for _ in range(20)]
    await upstream.wait_for_requests(1)
    release.set()
    answers = await asyncio.gather(*pending)
    assert [a.status for a in answers] == [200] * 20
    assert len(cdn_requests(upstream)) == 1


async def test_a_write_key_routed_to_the_wrong_region_is_named_once(client, upstream, caplog):
    caplog.set_level(logging.WARNING, logger="proxy.web.cdn")
    for key in ("seg-eu-unrouted", "seg-eu-unrouted", SEG_EU_KEY, SEG_KEY):
        resp = await client.get(f"/seg/cdn/v1/projects/{key}/settings", headers={**BROWSER, "Host": "www.example.com"})
        assert resp.status == 200
    warnings = [r.getMessage() for r in caplog.records if r.name == "proxy.web.cdn"]
    # The EU workspace sent to the US host is named, once; the EU key configured
    # as EU and the US key are fine.
    assert len(warnings) == 1, warnings
    assert "EU region" in warnings[0] and "sent to US" in warnings[0] and "segment.write_keys" in warnings[0]


async def test_settings_need_a_host_naming_this_site(client, upstream):
    resp = await client.get(SETTINGS, headers={**BROWSER, "Host": "evil.example/<script>"})
    assert resp.status == 400


async def test_sdk_metrics_are_answered_and_not_forwarded(client, upstream):
    body = b'{"series":[{"type":"Counter","metric":"analytics_js.invoke","value":1,"tags":{"method":"track"}}]}'
    resp = await client.post("/seg/v1/m", data=body, headers={**BROWSER, "Content-Type": "text/plain"})
    assert resp.status == 200
    assert await resp.json() == {"success": True}
    assert upstream.requests == []
    metrics = await (await client.ops_get("/metrics")).text()
    assert 'firstparty_requests_total{route="sdk-metrics",status="200"} 1.0' in metrics


def test_rewrite_settings_fills_what_is_missing():
    out = segment_cdn.rewrite_settings(b'{"integrations": {}}', "www.example.com/seg/v1", "https", "https://www.example.com/seg/cdn")
    assert out.workspace_region is None
    assert b'"apiHost":"www.example.com/seg/v1"' in out.body and b'"protocol":"https"' in out.body
    with pytest.raises(ValueError):
        segment_cdn.rewrite_settings(b"[1]", "h/seg/v1", "https", "https://h/seg/cdn")


def test_asset_paths():
    assert segment_cdn.asset(f"v1/projects/{SEG_KEY}/settings").write_key == SEG_KEY  # type: ignore[union-attr]
    script = segment_cdn.asset(f"analytics.js/v1/{SEG_KEY}/analytics.min.js")
    assert script is not None and not script.settings and script.write_key == SEG_KEY
    integration = segment_cdn.asset("next-integrations/integrations/vendor/2.0.1/vendor.dynamic.js.gz")
    assert integration is not None and integration.ttl == segment_cdn.SCRIPT_TTL_SECONDS
    assert segment_cdn.asset("next-integrations/a/..x/b.js") is None


async def test_settings_keep_the_port_the_browser_used_behind_nginx(proxy_client, upstream):
    """nginx's ``proxy_set_header Host $host`` drops a non-default port; the README's
    config also sends ``X-Forwarded-Host $http_host``: analytics.js is pointed back at
    the port it came on. From a peer that is not a trusted proxy the header is ignored."""
    client = await proxy_client()
    headers = {**BROWSER, "Host": "www.site-a.test", "X-Forwarded-Host": "www.site-a.test:8080"}
    settings = await (await client.get(SETTINGS, headers=headers)).json()
    assert settings["integrations"]["Segment.io"]["apiHost"] == "www.site-a.test:8080/seg/v1"
    assert settings["remotePlugins"][0]["url"].startswith("http://www.site-a.test:8080/seg/cdn/")
    untrusted = await proxy_client(server={"trusted_proxies": ["10.0.0.0/8"]})
    settings = await (await untrusted.get(SETTINGS, headers={**headers, "X-Forwarded-Host": "evil.test"})).json()
    assert settings["integrations"]["Segment.io"]["apiHost"] == "www.site-a.test/seg/v1"


async def test_analytics_js_under_a_name_no_filter_list_blocks(client, upstream):
    """Any URL holding ``/analytics.js/v1/`` is blocked on every domain; the same
    script is served at ``/seg/cdn/lib/<write key>/a.js`` (one CDN fetch for both names)."""
    neutral = await client.get(f"/seg/cdn/lib/{SEG_KEY}/a.js", headers=BROWSER)
    assert neutral.status == 200 and "fake analytics.js" in await neutral.text()
    assert "/analytics.js/v1/" not in str(neutral.url)
    classic = await client.get(SCRIPT, headers=BROWSER)
    assert await classic.text() == await neutral.text()
    assert [r.path for r in cdn_requests(upstream)] == [SCRIPT.removeprefix("/seg/cdn")]
    for bad in (f"/seg/cdn/lib/{SEG_KEY}/b.js", "/seg/cdn/lib/../a.js", f"/seg/cdn/lib/{SEG_KEY}/x/a.js"):
        assert (await client.get(bad, headers=BROWSER)).status == 404, bad
