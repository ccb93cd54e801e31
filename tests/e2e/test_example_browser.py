"""The two-domain example of ``deploy/example/`` exactly as shipped (its config,
its nginx file with both server blocks and TLS, its two pages with both vendors'
snippets, land.js and link.js), in chromium: a visitor on site A clicks through
to site B. Only what a real deployment changes differs: ports, certificate and
file paths, the data directory and the vendors (the fake, as `firstparty
fake-upstream` serves it, with the real SDK builds)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.provision import generate_missing
from proxy.fake import ALL, FakeUpstream
from proxy.settings import load_settings
from proxy.web.app import create_app
from tests.conftest import canonical_of
from tests.e2e.harness import AJS_DIST, NODE_MODULES, TLS_ARGS, drive
from tests.support import (
    browser_clean, event, eventually, one_cookie, self_signed, start_nginx, wait, wrap_site,
)

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "example"
A, B = "www.site-a.test", "checkout.site-b.test"
TOKEN, WRITE_KEY = "YOUR_MIXPANEL_PROJECT_TOKEN", "YOUR_SEGMENT_WRITE_KEY"
BOTH_READY = ("window.mixpanel && window.mixpanel.__loaded && window.analytics && window.analytics.initialized"
              " && !location.search")
IDS = "({device: mixpanel.get_property('$device_id'), anon: analytics.user().anonymousId(), href: location.href})"


def render_example(tmp: Path, proxy_port: int, tls_port: int, cert: Path, key: Path) -> Path:
    text = (EXAMPLE / "nginx.conf").read_text()
    text = text.replace("server 127.0.0.1:8000;", f"server 127.0.0.1:{proxy_port};")
    text = text.replace("listen 443 ssl;", f"listen 127.0.0.1:{tls_port} ssl;")
    for site in ("site-a", "site-b"):
        text = text.replace(f"/etc/ssl/firstparty-example/{site}.test.pem", str(cert))
        text = text.replace(f"/etc/ssl/firstparty-example/{site}.test.key", str(key))
        text = text.replace(f"/srv/firstparty-example/{site}", str(EXAMPLE / site))
    assert "/etc/ssl/" not in text and "/srv/" not in text and "127.0.0.1:8000" not in text
    return wrap_site(tmp, text)


async def test_the_two_domain_example_as_shipped(tmp_path: Path, serve_proxy: Any, nginx_bin: str) -> None:  # noqa: F811
    fake = FakeUpstream(mixpanel_js=NODE_MODULES / "mixpanel-browser" / "dist" / "mixpanel.min.js",
                        analytics_js=AJS_DIST, plugins=False)
    runner = web.AppRunner(fake.app(ALL))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    vendor = f"http://127.0.0.1:{runner.addresses[0][1]}"
    secret = tmp_path / "cookie_secret"
    secret.write_text("an-example-secret-of-some-length\n")
    env = {"FIRSTPARTY_SERVER_DATA_DIR": str(tmp_path / "data"), "FIRSTPARTY_COOKIE_SECRET_FILE": str(secret)}
    env |= {f"FIRSTPARTY_UPSTREAM_{k}": vendor for k in ("US", "EU", "IN", "DECIDE", "CDN")}
    env |= {f"FIRSTPARTY_SEGMENT_{k}": vendor for k in ("US", "EU", "CDN")}
    proxy = await serve_proxy(create_app(generate_missing(load_settings(str(EXAMPLE / "config.toml"), env))))
    cert, key = self_signed(tmp_path / "tls", "*.site-a.test", "*.site-b.test")
    nginx, port = await start_nginx(nginx_bin, tmp_path, lambda p: render_example(tmp_path, proxy.port, p, cert, key))
    try:
        run = await drive(
            [
                {"op": "goto", "url": f"https://{A}:{port}/"},
                {"op": "wait_js", "js": BOTH_READY, "timeout_ms": 15000},
                {"op": "eval", "js": f"mixpanel.track('Shop'); analytics.track('Shop Viewed'); return {IDS};", "save": "a"},
                # mixpanel-js's default batching: the batch leaves within 5 s.
                wait("/mp/track/", event("Shop"), timeout_ms=15000),
                wait("/seg/v1/t", "Shop Viewed"),
                {"op": "cookies", "save": "cookies_a"},
                {"op": "click", "selector": "#other"},
                {"op": "wait_url", "pattern": rf"^https://{re.escape(B)}:{port}/$"},  # the token redeemed and cleaned
                {"op": "wait_js", "js": BOTH_READY, "timeout_ms": 15000},
                {"op": "eval", "js": f"mixpanel.track('Checkout'); analytics.track('Order Completed'); return {IDS};",
                 "save": "b"},
                wait("/mp/track/", event("Checkout"), timeout_ms=15000),
                wait("/seg/v1/t", "Order Completed"),
                {"op": "cookies", "save": "cookies_b"},
            ],
            args=TLS_ARGS,
        )
        browser_clean(run)
        canonical = canonical_of(one_cookie(run, "cookies_a", "fp_id", ".site-a.test")["value"])
        assert canonical_of(one_cookie(run, "cookies_b", "fp_id", ".site-b.test")["value"]) == canonical
        assert run["a"]["anon"] == canonical  # analytics.js on A: the id the proxy chose is its own
        landing = [d["url"] for d in run.documents if d["url"].startswith(f"https://{B}")]
        assert landing and "fpb=" in landing[0]  # B was reached through /mp/go, with a token

        def mixpanel_events() -> list[dict[str, Any]]:
            return [e for rec in fake.by(ALL, "/track") for e in rec.events()]

        def segment_calls() -> list[dict[str, Any]]:
            return [c for rec in fake.by(ALL, "/v1/batch") for c in rec.events()]

        await eventually(lambda: {"Shop", "Checkout"} <= {e["event"] for e in mixpanel_events()}, 15, "both Mixpanel events")
        await eventually(lambda: {"Shop Viewed", "Order Completed"} <= {c.get("event") for c in segment_calls()}, 15,
                         "both Segment tracks")
        for e in mixpanel_events():
            assert e["properties"]["$device_id"] == canonical, e
            assert e["properties"]["token"] == TOKEN
        for c in segment_calls():
            assert c["anonymousId"] == canonical and c["writeKey"] == WRITE_KEY, c
        assert {c["type"] for c in segment_calls()} == {"page", "track"}
        hosts = {c["context"]["page"]["url"].split("/")[2] for c in segment_calls()}
        assert hosts == {f"{A}:{port}", f"{B}:{port}"}
        for rec in fake.requests:  # no token, no cookie anywhere upstream
            assert b"fpb=" not in rec.body and "fpb=" not in str(rec.query), rec.path
            assert "cookie" not in rec.headers
        assert fake.surprises == []
        assert not [e for e in mixpanel_events() if "fpb=" in str(e)]
    finally:
        nginx.terminate()
        nginx.wait(timeout=10)
        await runner.cleanup()
