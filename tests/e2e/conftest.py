"""Fixtures for the browser end-to-end tests: the proxy with test pages on 127.0.0.1.

Every test here is marked ``browser`` (deselect with ``-m "not browser"``).
Missing chromium or npm packages fail the tests (never skip them) with the
command that installs them (see ``harness.drive``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.web.app import create_app
from tests.conftest import TOKEN, make_settings
from tests.e2e.harness import Site, add_site_routes
from tests.fakeupstream import FakeUpstream

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
