"""Shared fixtures: a recording fake upstream per region and the real app
built with test settings pointed at it."""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

# The helpers in tests/support.py fail with the values they compared, as tests do
# (before anything imports it).
pytest.register_assert_rewrite("tests.support")

from tests.offline_site import firstparty_offline as offline
from proxy.web.app import create_app
from proxy.provision import generate_missing
from proxy.settings import Settings, build_settings
from tests.fakeupstream import FakeUpstream
from tests.support import IDENTITY, REDIS_URL, ProxyClient

# Never online: this process and every Python process a test starts may only
# reach loopback (tests/offline_site/firstparty_offline.py).
_OFFLINE_SITE = str(Path(__file__).parent / "offline_site")
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_OFFLINE_SITE, os.environ.get("PYTHONPATH")]))
offline.install()

TOKEN = "test-token-us"
EU_TOKEN = "test-token-eu"
IN_TOKEN = "test-token-in"
SEG_KEY = "seg-write-key-us"
SEG_EU_KEY = "seg-write-key-eu"
BROWSER = {
    "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36",
    "Origin": "https://www.example.com",
}


@pytest.fixture
async def upstream(aiohttp_server: Any) -> Any:
    fake = FakeUpstream()
    urls = {}
    for name in ("us", "eu", "in", "decide", "cdn", "seg-us", "seg-eu", "seg-cdn"):
        server = await aiohttp_server(fake.app(name))
        urls[name] = f"http://127.0.0.1:{server.port}"
    fake.urls = urls  # type: ignore[attr-defined]
    yield fake
    assert not fake.surprises, fake.surprises


def make_settings(tmp_path: Path, fake: FakeUpstream, **sections: dict[str, Any]) -> Settings:
    urls = fake.urls  # type: ignore[attr-defined]
    raw: dict[str, Any] = {
        "server": {"data_dir": str(tmp_path / "data")},
        "upstream": {
            **{k: v for k, v in urls.items() if not k.startswith("seg-")},
            "projects": {EU_TOKEN: "eu", IN_TOKEN: "in"},
            "timeout_seconds": 5,
        },
        "segment": {"us": urls["seg-us"], "eu": urls["seg-eu"], "cdn": urls["seg-cdn"], "write_keys": {SEG_EU_KEY: "eu"}},
        "cookie": {"domains": [".example.com", ".brand-b.test"], "secret": "s" * 32},
        "cors": {"allowed_origins": ["https://www.example.com", "*.example.com"]},
        # Fast enough for tests: partial batches leave after 5 ms, retries start at 0.2 s.
        "delivery": {"batch_window_ms": 5, "backoff_initial_seconds": 0.2, "backoff_max_seconds": 1.0, "drain_seconds": 5},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return generate_missing(build_settings(raw, {}))  # as `firstparty serve` does on a first start


@pytest.fixture
def settings(tmp_path: Path, upstream: FakeUpstream) -> Settings:
    return make_settings(tmp_path, upstream)


@pytest.fixture
async def redis_settings() -> Any:
    """Database 15 of the machine's Redis, this suite's own, emptied before and after."""
    import redis.asyncio as redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except redis.ConnectionError:
        await client.aclose()
        pytest.fail("Redis is not running on 127.0.0.1:6379; scripts/test starts it")
    await client.flushdb()
    yield {"url": REDIS_URL}
    await client.flushdb()
    await client.aclose()


ClientFactory = Callable[..., Awaitable[ProxyClient]]


@pytest.fixture(params=["memory", "redis"])
async def store(request: Any, redis_settings: Any) -> Any:
    """The identity store on its own: in memory, and on Redis (its own database)."""
    from proxy.services.store import AliasStore
    from proxy.settings import StoreSettings

    if request.param == "redis":
        store = AliasStore.from_settings(StoreSettings(url=redis_settings["url"]))
    else:
        store = AliasStore.from_settings(StoreSettings())
    yield store
    await store.close()


@pytest.fixture
async def serve_proxy() -> Any:
    """Start a built app behind the real HTTP server; everything started is
    stopped at the end of the test."""
    started: list[ProxyClient] = []

    async def start(app: Any) -> ProxyClient:
        client = ProxyClient(app)
        started.append(client)
        return await client.start()

    yield start
    for client in reversed(started):
        await client.close()


@pytest.fixture(params=["spool", "sync"])
def delivery_mode(request: Any) -> str:
    """Service tests run in both delivery modes: durable spool (the default) and sync."""
    return request.param


@pytest.fixture
def proxy_client(serve_proxy: Any, tmp_path: Path, upstream: FakeUpstream, delivery_mode: str) -> ClientFactory:
    """Build the real app with test settings (overrides per section) and a client for it."""

    async def factory(**sections: dict[str, Any]) -> ProxyClient:
        sections.setdefault("delivery", {}).setdefault("mode", delivery_mode)
        settings = make_settings(tmp_path, upstream, **sections)
        return await serve_proxy(create_app(settings))

    return factory


@pytest.fixture
async def client(proxy_client: ClientFactory) -> ProxyClient:
    return await proxy_client()


# ---------------------------------------------------------- payload makers


def device_id() -> str:
    return str(uuid.uuid4())


def js_event(name: str, device: str, *, user: str | None = None, token: str = TOKEN, **props: Any) -> dict[str, Any]:
    """A track event shaped like mixpanel-js 2.x sends it."""
    properties = {
        "$os": "Linux",
        "$browser": "Chrome",
        "$current_url": "https://www.example.com/pricing",
        "$browser_version": 120,
        "$screen_height": 1080,
        "$screen_width": 1920,
        "mp_lib": "web",
        "$lib_version": "2.83.0",
        "$insert_id": uuid.uuid4().hex[:16],
        "time": time.time(),
        "distinct_id": user or f"$device:{device}",
        "$device_id": device,
        "$initial_referrer": "$direct",
        "$initial_referring_domain": "$direct",
        "token": token,
    }
    if user:
        properties["$user_id"] = user
    properties.update(props)
    return {"event": name, "properties": properties}


def b64_body(payload: Any) -> str:
    """``data=<urlencoded base64(JSON)>`` as mixpanel-js posts it."""
    raw = base64.b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode()
    return "data=" + quote(raw, safe="")


def json_body(payload: Any) -> str:
    """``data=<urlencoded JSON>`` (api_payload_format: 'json')."""
    return "data=" + quote(json.dumps(payload, separators=(",", ":")), safe="")


def cookie_from(response: Any, name: str = "fp_id") -> str | None:
    """The value of our cookie in a response's Set-Cookie, if any."""
    for header in response.headers.getall("Set-Cookie", []):
        if header.startswith(name + "="):
            return header.split(";", 1)[0].split("=", 1)[1]
    return None


def canonical_of(cookie_value: str) -> str:
    return cookie_value.rpartition(".")[0]


# ------------------------------------------------ cross-domain and nginx


@pytest.fixture
async def xclient(proxy_client: Any) -> Any:
    """The proxy with two linked domains (``support.IDENTITY``)."""
    return await proxy_client(**IDENTITY)


@pytest.fixture
def nginx_bin() -> str:
    import shutil

    path = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(path).exists():
        pytest.fail("nginx is not installed; scripts/test installs Debian's nginx")
    return path
