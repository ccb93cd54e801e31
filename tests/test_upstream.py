"""The upstream side on aiohttp's ClientSession: TLS verification and a
private CA, compressed and redirected CDN answers, header hygiene, errors
wrapped into ``UpstreamError``."""

from __future__ import annotations

import asyncio
import gzip
from typing import Any

import pytest
from aiohttp import web

from proxy.provision import generate_missing
from proxy.errors import ConfigError, UpstreamTimeout, UpstreamTLSError, UpstreamUnreachable
from proxy.services.upstream import Endpoint, UpstreamClient, response_headers
from proxy.settings import build_settings
from proxy.web.app import create_app
from tests.conftest import BROWSER, b64_body, device_id, js_event, make_settings
from tests.fakeupstream import LIB_JS, FakeUpstream
from tests.support import port_of, reserve_port, self_signed, serve_tls

TRACK = "/mp/track/?verbose=1&ip=1"
FORM = {**BROWSER, "Content-Type": "application/x-www-form-urlencoded"}


async def test_a_self_signed_upstream_is_refused_until_its_ca_is_trusted(serve_proxy, tmp_path, upstream):
    """Spool mode against an HTTPS vendor whose certificate no system CA signed:
    nothing is sent (the event stays spooled, retried, not dead-lettered);
    restarted with ``upstream.ca_file`` naming that certificate, the same spool
    delivers it."""
    cert, key = self_signed(tmp_path / "tls", "127.0.0.1")
    tls_upstream = FakeUpstream()
    runner, port = await serve_tls(tls_upstream.app("us"), cert, key)
    try:
        url = f"https://127.0.0.1:{port}"
        client = await serve_proxy(create_app(make_settings(tmp_path, upstream, upstream={"us": url})))
        resp = await client.post(TRACK, data=b64_body([js_event("Paid", device_id())]), headers=FORM)
        assert resp.status == 200
        metrics = client.services.metrics
        for _ in range(500):
            if metrics.outcomes.labels("retry", "track")._value.get() >= 1:
                break
            await asyncio.sleep(0.01)
        assert metrics.outcomes.labels("retry", "track")._value.get() >= 1
        assert tls_upstream.requests == []
        assert (await client.services.spool.stats())["depth"] == 1
        assert (await client.services.spool.stats())["dead_letters"] == 0
        await client.close()

        trusted = await serve_proxy(
            create_app(make_settings(tmp_path, upstream, upstream={"us": url, "ca_file": str(cert)}))
        )
        [event] = await tls_upstream.wait(1)
        assert event["event"] == "Paid"
        assert tls_upstream.surprises == []
        del trusted
    finally:
        await runner.cleanup()


def test_an_unreadable_ca_file_is_a_config_error_naming_the_key(tmp_path):
    settings = build_settings(
        {"server": {"data_dir": str(tmp_path)}, "cookie": {"secret": "s" * 32},
         "upstream": {"ca_file": str(tmp_path / "missing.pem")}}, {}
    )
    with pytest.raises(ConfigError, match="upstream.ca_file"):
        create_app(generate_missing(settings))


async def test_a_gzip_answering_cdn_still_serves_real_javascript(client, upstream):
    async def gzip_cdn(recorded: Any) -> web.Response | None:
        if recorded.name != "cdn":
            return None
        return web.Response(
            body=gzip.compress(LIB_JS), headers={"Content-Encoding": "gzip", "Content-Type": "application/javascript"}
        )

    upstream.behave = gzip_cdn
    resp = await client.get("/mp/lib.min.js")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("application/javascript")
    assert "Content-Encoding" not in resp.headers
    assert await resp.read() == LIB_JS
    [recorded] = upstream.by("cdn")
    assert "gzip" in recorded.headers.get("accept-encoding", "")


async def test_a_cdn_redirect_is_followed(client, upstream):
    async def moved(recorded: Any) -> web.Response | None:
        if recorded.name == "cdn" and recorded.path.startswith("/libs/"):
            raise web.HTTPFound(location="/moved/mixpanel.min.js")
        return None

    upstream.behave = moved
    resp = await client.get("/mp/lib.min.js")
    assert resp.status == 200 and await resp.read() == LIB_JS
    assert [r.path for r in upstream.by("cdn")][-1] == "/moved/mixpanel.min.js"


async def test_errors_are_wrapped_into_the_upstream_error_tree(tmp_path):
    client = UpstreamClient(max_connections_per_host=2, timeout=0.5)
    await client.open()
    try:
        with reserve_port() as down:
            closed = Endpoint.parse(f"http://127.0.0.1:{port_of(down)}")
            with pytest.raises(UpstreamUnreachable, match="unreachable"):
                await client.request(closed, "GET", "/", [])

        async def hang(request: web.Request) -> web.Response:
            await asyncio.sleep(5)
            return web.Response(text="late")

        app = web.Application()
        app.router.add_get("/", hang)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            slow = Endpoint.parse(f"http://127.0.0.1:{runner.addresses[0][1]}")
            with pytest.raises(UpstreamTimeout):
                await client.request(slow, "GET", "/", [], timeout=0.2)
        finally:
            await runner.cleanup()

        cert, key = self_signed(tmp_path / "tls", "127.0.0.1")
        async def ok(request: web.Request) -> web.Response:
            return web.Response(text="ok")

        tls_app = web.Application()
        tls_app.router.add_get("/", ok)
        tls_runner, port = await serve_tls(tls_app, cert, key)
        try:
            with pytest.raises(UpstreamTLSError, match="certificate"):
                await client.request(Endpoint.parse(f"https://127.0.0.1:{port}"), "GET", "/", [])
        finally:
            await tls_runner.cleanup()
    finally:
        await client.close()


async def test_vendor_answers_never_relay_their_cookies_or_encoding(client, upstream):
    """What the vendor sets (a cookie) stays with us and is never sent back to
    the vendor either: the session keeps no cookie jar."""

    async def cookie_setting(recorded: Any) -> web.Response | None:
        if recorded.path.startswith("/flags"):
            response = web.json_response({"flags": {}})
            response.set_cookie("vendor_session", "secret-value")
            return response
        return None

    upstream.behave = cookie_setting
    for _ in range(2):
        resp = await client.get(
            "/mp/flags/?context=%7B%22distinct_id%22%3A%22u1%22%7D&token=t", headers=BROWSER
        )
        assert resp.status == 200
        assert not any("vendor_session" in v for v in resp.headers.getall("Set-Cookie", []))
    assert all("cookie" not in r.headers for r in upstream.by(None, "/flags"))
    assert upstream.surprises == []


def test_response_headers_are_an_allow_list():
    from multidict import CIMultiDict, CIMultiDictProxy

    from proxy.services.upstream import UpstreamResponse

    answer = UpstreamResponse(
        200,
        CIMultiDictProxy(CIMultiDict([("Content-Type", "application/json"), ("Set-Cookie", "a=1"),
                                      ("Content-Encoding", "gzip"), ("Retry-After", "3"), ("Connection", "close")])),
        b"{}",
    )
    assert response_headers(answer) == {"Content-Type": "application/json", "Retry-After": "3"}


async def test_an_egress_proxy_from_the_environment_carries_upstream_calls(serve_proxy, tmp_path, upstream):
    """``HTTP_PROXY`` (read once at start-up): the sender reaches a vendor host
    this machine cannot resolve through the proxy; ``NO_PROXY`` sends the CDN
    direct."""
    egress = FakeUpstream()
    runner = web.AppRunner(egress.app("us"))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        raw = {
            "server": {"data_dir": str(tmp_path / "data")},
            "upstream": {"us": "http://api.mixpanel.invalid", "cdn": upstream.urls["cdn"], "timeout_seconds": 5},
            "cookie": {"secret": "s" * 32},
            "delivery": {"batch_window_ms": 5},
        }
        environ = {"HTTP_PROXY": f"http://127.0.0.1:{runner.addresses[0][1]}", "no_proxy": "127.0.0.1,localhost"}
        settings = build_settings(raw, environ)
        assert settings.upstream.http_proxy.startswith("http://127.0.0.1:")
        client = await serve_proxy(create_app(generate_missing(settings)))
        resp = await client.post(TRACK, data=b64_body([js_event("Proxied", device_id())]), headers=FORM)
        assert resp.status == 200
        [event] = await egress.wait(1)
        assert event["event"] == "Proxied"
        [through] = egress.by("us")
        assert through.headers["host"] == "api.mixpanel.invalid" and through.path == "/track"
        assert (await client.get("/mp/lib.min.js")).status == 200
        assert upstream.by("cdn") and not egress.by("us", "/libs")
    finally:
        await runner.cleanup()
