"""Fixtures for the browser end-to-end tests: the proxy with test pages on 127.0.0.1.

Every test here is marked ``browser`` (deselect with ``-m "not browser"``).
Missing chromium or npm packages fail the tests (never skip them) with the
command that installs them (see ``harness.drive``).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.web.app import create_app
from tests.conftest import TOKEN, make_settings
from tests.e2e.harness import Site, add_site_routes
from tests.fakeupstream import FakeUpstream
from tests.support import HUB_HOST, LINKED, TokenClock

COOKIE = {"secure": False, "domains": [".site-a.test", ".site-b.test"]}
CORS = {"allowed_origins": ["http://*.site-a.test", "http://*.site-b.test"]}
# Safari deletes script-set storage after 7 days without a visit; a device id
# that changes sooner on the same host is taken for a reset() (a new person).
# A test cannot let 7 days pass between the wipe and the reload, so by default
# every device change counts as that long absence; tests of reset() pass
# {"identity": {}} to keep the real window.
IDENTITY = {"reset_window_days": 0}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "browser: drives real mixpanel-browser in headless chromium (needs tests/e2e/install.sh)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.browser)


@pytest.fixture
async def site(
    request: pytest.FixtureRequest, tmp_path: Path, upstream: FakeUpstream
) -> Any:
    """The real proxy app, plus pages and /static/mixpanel.js on the same app, served on 127.0.0.1.

    Indirect parameter: the delivery mode ("spool", "sync"; without one, the
    configured default, what production runs), or a dict of settings sections
    replacing the defaults here (``{"identity": {}}``)."""
    sections: dict[str, dict[str, Any]] = {"cookie": COOKIE, "cors": CORS, "identity": IDENTITY}
    param = getattr(request, "param", None)
    if isinstance(param, str):
        sections["delivery"] = {"mode": param}
    elif isinstance(param, dict):
        sections.update(param)
    settings = make_settings(tmp_path, upstream, **sections)
    app = create_app(settings)
    mode = getattr(getattr(settings, "delivery", None), "mode", "sync")
    site = Site(port=0, upstream=upstream, token=TOKEN, app=app, mode=mode)
    add_site_routes(site)
    await site.start()
    yield site
    await site.stop()


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A port bound but not listening for the whole test: connecting to it is refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


@pytest.fixture
async def xsite(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    upstream: FakeUpstream,
    dead_port: int,
    monkeypatch: pytest.MonkeyPatch,
) -> Any:
    """The proxy app with test pages, linked domains .site-a.test and .site-b.test.

    Indirect parameter: {"mode": "spool"|"sync", "hub": None|"up"|"down", "identity": {...}, "privacy": {...},
    "delay": {path: seconds} (test-only latency), "clock": True (see TokenClock)}.
    With hub "up", identity.hub_url is this same app on hub.id-hub.test (the port is
    chosen before the app is built); "down" points it at a port that refuses connections;
    "other" at a second proxy on hub.id-hub.test (``site.hub``, a ``Site`` without pages)
    with a data directory and token keys of its own: another deployment's hub, whose
    tokens this one cannot open."""
    from aiohttp import web

    import proxy.services.tokens
    import proxy.web.crossdomain
    from proxy.web.app import create_app
    from proxy.web.http import json_response, query_get
    from tests.conftest import TOKEN, make_settings
    from tests.e2e.conftest import COOKIE, CORS
    from tests.e2e.harness import Site, add_site_routes

    param: dict[str, Any] = getattr(request, "param", None) or {}
    # Reserved now (the hub URL names it), served on when the app starts.
    reserved = socket.socket()
    reserved.bind(("127.0.0.1", 0))
    port = reserved.getsockname()[1]
    identity: dict[str, Any] = {"linked_domains": LINKED, **param.get("identity", {})}
    if param.get("hub") == "up":
        identity["hub_url"] = f"http://{HUB_HOST}:{port}"
    elif param.get("hub") == "down":
        identity["hub_url"] = f"http://{HUB_HOST}:{dead_port}"
    hub_reserved = None
    if param.get("hub") == "other":
        hub_reserved = socket.socket()
        hub_reserved.bind(("127.0.0.1", 0))
        identity["hub_url"] = f"http://{HUB_HOST}:{hub_reserved.getsockname()[1]}"
    settings = make_settings(
        tmp_path,
        upstream,
        cookie=COOKIE,
        cors=CORS,
        identity=identity,
        delivery={"mode": param.get("mode", "spool")},
        privacy=param.get("privacy", {}),
    )
    assert settings.identity.reset_window_days == 7
    app = create_app(settings)
    site = Site(port=port, upstream=upstream, token=TOKEN, app=app, mode=settings.delivery.mode)
    # Network latency, test-only: the answer to these paths leaves this much later.
    site.delays.update(param.get("delay", {}))
    add_site_routes(site)
    if param.get("clock"):
        clock = TokenClock()
        monkeypatch.setattr(proxy.web.crossdomain, "time", clock)
        monkeypatch.setattr(proxy.services.tokens, "time", clock)

        async def advance(request: web.Request) -> web.Response:
            clock.offset += float(query_get(request, "advance") or 0)
            return json_response({"offset": clock.offset})

        site.routes["/__e2e/clock"] = advance
    hub = None
    if hub_reserved is not None:
        from proxy.core.tokens import generate_key_line

        keys = tmp_path / "hub_identity_keys"
        keys.write_text(generate_key_line() + "\n")
        keys.chmod(0o600)
        hub_settings = make_settings(
            tmp_path / "hub",
            upstream,
            cookie=COOKIE,
            cors=CORS,
            identity={"linked_domains": LINKED, "hub_url": identity["hub_url"], "keys_file": str(keys)},
            delivery={"mode": settings.delivery.mode},
        )
        hub = Site(port=0, upstream=upstream, token=TOKEN, app=create_app(hub_settings), mode=settings.delivery.mode)
        await hub.start(sock=hub_reserved)
        site.hub = hub  # type: ignore[attr-defined]
    await site.start(sock=reserved)
    assert site.port == port
    yield site
    await site.stop()
    reserved.close()
    if hub is not None:
        await hub.stop()
        hub_reserved.close()
