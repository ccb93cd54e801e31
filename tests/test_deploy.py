"""The shipped deployment files, run for real: the example config validates,
and Debian's nginx with nginx.example.conf passes traffic to the proxy with
the visitor's IP and Host intact."""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp
import orjson

from proxy.web.app import create_app
from proxy.settings import load_settings
from tests.conftest import SEG_KEY, b64_body, device_id, js_event, make_settings
from tests.support import render_nginx, self_signed, start_nginx

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_validates(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("a-production-secret-of-some-length\n")
    s = load_settings(
        ROOT / "deploy" / "config.toml",
        {"FIRSTPARTY_COOKIE_SECRET_FILE": str(secret), "FIRSTPARTY_SERVER_DATA_DIR": str(tmp_path)},
    )
    assert s.cookie.secret == b"a-production-secret-of-some-length"
    assert s.store.url.startswith("redis://") and s.cookie.domains == (".example.com",)


def test_the_fleet_compose_file_configures_the_jetstream_queue(tmp_path):
    import yaml

    compose = yaml.safe_load((ROOT / "deploy" / "compose.jetstream.yaml").read_text())
    env = dict(compose["services"]["firstparty"]["environment"])
    assert compose["services"]["firstparty"]["deploy"]["replicas"] >= 2
    assert "-js" in compose["services"]["nats"]["command"]
    secret = tmp_path / "secret"
    secret.write_text("a-production-secret-of-some-length\n")
    keys = tmp_path / "keys"
    keys.write_text("k1 " + "A" * 43 + "\n")
    env.update(FIRSTPARTY_COOKIE_SECRET_FILE=str(secret), FIRSTPARTY_SERVER_DATA_DIR=str(tmp_path),
               FIRSTPARTY_IDENTITY_KEYS_FILE=str(keys))
    s = load_settings(ROOT / "deploy" / "config.toml", env)
    assert (s.delivery.queue, s.delivery.nats_url) == ("jetstream", "nats://nats:4222")
    assert s.identity.keys.key_ids == ("k1",)


async def test_behind_real_nginx(serve_proxy, tmp_path, upstream, nginx_bin):
    # nginx connects from 127.0.0.1 (trusted); the visitor comes from 127.0.0.2.
    settings = make_settings(tmp_path, upstream, server={"trusted_proxies": ["127.0.0.1/32"]})
    proxy = await serve_proxy(create_app(settings))
    cert, key = self_signed(tmp_path / "tls", "www.example.com")
    nginx, tls_port = await start_nginx(
        nginx_bin, tmp_path, lambda port: render_nginx(tmp_path, proxy.port, port, cert, key)
    )
    try:
        ctx = ssl.create_default_context(cafile=str(cert))
        connector = aiohttp.TCPConnector(ssl=ctx, local_addr=("127.0.0.2", 0))
        async with aiohttp.ClientSession(connector=connector) as session:
            # Connect to 127.0.0.1, but speak to www.example.com (SNI, Host, certificate).
            url = f"https://127.0.0.1:{tls_port}/mp/track/?verbose=1&ip=1"
            resp = await session.post(
                url,
                data=b64_body([js_event("Through nginx", device_id())]),
                headers={
                    "Host": "www.example.com",
                    "Origin": "https://www.example.com",
                    "User-Agent": "Mozilla/5.0",
                    "Content-Type": "application/x-www-form-urlencoded",
                    "X-Forwarded-For": "6.6.6.6",  # spoofed by the visitor
                },
                server_hostname="www.example.com",
            )
            assert resp.status == 200, await resp.text()
            set_cookie = resp.headers.get("Set-Cookie", "")
            assert "Domain=.example.com" in set_cookie and "HttpOnly" in set_cookie
            # analytics.js's settings, fetched first-party through nginx, send it back
            # here over https (X-Forwarded-Proto from nginx, a trusted peer).
            browser = {"Host": "www.example.com", "User-Agent": "Mozilla/5.0"}
            settings_url = f"https://127.0.0.1:{tls_port}/seg/cdn/v1/projects/{SEG_KEY}/settings"
            got = await session.get(settings_url, headers=browser, server_hostname="www.example.com")
            assert got.status == 200, await got.text()
            segment_io = (await got.json())["integrations"]["Segment.io"]
            assert (segment_io["protocol"], segment_io["apiHost"]) == ("https", "www.example.com/seg/v1")
            # A site on a non-default port (staging, local): nginx's `Host $host` drops
            # the port, its X-Forwarded-Host keeps it, and analytics.js comes back to it.
            on_port = {**browser, "Host": "www.example.com:8443"}
            got = await session.get(settings_url, headers=on_port, server_hostname="www.example.com")
            assert (await got.json())["integrations"]["Segment.io"]["apiHost"] == "www.example.com:8443/seg/v1"
            call = {"type": "track", "event": "Segment through nginx", "anonymousId": device_id(), "writeKey": SEG_KEY}
            seg = await session.post(
                f"https://127.0.0.1:{tls_port}/seg/v1/t", data=orjson.dumps(call),
                headers={**browser, "Content-Type": "text/plain", "X-Forwarded-For": "6.6.6.6"},
                server_hostname="www.example.com",
            )
            assert seg.status == 200, await seg.text()
            # The liveness check on the public port, through nginx (README: Operations).
            health = await session.get(f"https://127.0.0.1:{tls_port}/healthz", headers=browser, server_hostname="www.example.com")
            assert health.status == 200 and (await health.json())["status"] == "ok"
        # Spooled (the default): batches mix visitors, so each event carries its visitor's IP.
        [event] = await upstream.wait(1, "us", "/track")
        assert event["event"] == "Through nginx"
        assert event["properties"]["ip"] == "127.0.0.2"  # the visitor, not nginx, not the spoofed value
        [segment_call] = await upstream.wait(1, "seg-us", "/v1/batch")
        assert segment_call["event"] == "Segment through nginx"
        assert segment_call["context"]["ip"] == "127.0.0.2"
    finally:
        nginx.terminate()
        nginx.wait(timeout=10)
