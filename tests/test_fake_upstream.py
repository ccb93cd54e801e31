"""``firstparty fake-upstream``: both vendors on one port for a staging site. The
proxy pointed at it delivers there; the fake answers as the vendors do, serves
the real SDK builds it is given, and prints one line per request."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import orjson

from proxy.provision import generate_missing
from proxy.settings import build_settings
from proxy.web.app import create_app
from tests.conftest import BROWSER, b64_body, canonical_of, cookie_from, device_id, js_event

ROOT = Path(__file__).resolve().parent.parent
MIXPANEL_JS = ROOT / "tests" / "e2e" / "node_modules" / "mixpanel-browser" / "dist" / "mixpanel.min.js"


async def read_line(proc: asyncio.subprocess.Process, timeout: float = 10.0) -> str:
    assert proc.stdout is not None
    return (await asyncio.wait_for(proc.stdout.readline(), timeout)).decode().rstrip("\n")


async def test_the_proxy_delivers_to_the_fake_and_it_prints_each_request(tmp_path, serve_proxy):
    lib = tmp_path / "mixpanel.min.js"  # the npm build when installed, else a stand-in file
    lib.write_bytes(MIXPANEL_JS.read_bytes() if MIXPANEL_JS.is_file() else b"/* the snippet build */")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "fake-upstream", "--port", "0", "--mixpanel-js", str(lib),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("FIRSTPARTY_")},
    )
    try:
        banner = await read_line(proc)
        assert banner.startswith("fake Mixpanel and Segment on http://127.0.0.1:"), banner
        base = re.match(r"fake Mixpanel and Segment on (http://127\.0\.0\.1:\d+):", banner).group(1)
        assert f"FIRSTPARTY_SEGMENT_CDN={base}" in banner
        settings = build_settings({
            "server": {"data_dir": str(tmp_path / "data")},
            "upstream": {"us": base, "decide": base, "cdn": base},
            "segment": {"us": base, "cdn": base},
            "cookie": {"secret": "s" * 32},
            "delivery": {"mode": "sync"},
        }, {})
        client = await serve_proxy(create_app(generate_missing(settings)))
        device = device_id()
        resp = await client.post("/mp/track/?verbose=1&ip=1", data=b64_body([js_event("Staging page", device)]),
                                 headers={**BROWSER, "Content-Type": "application/x-www-form-urlencoded"})
        assert await resp.json() == {"status": 1, "error": None}  # the fake's answer, through the proxy
        canonical = canonical_of(cookie_from(resp))
        assert await read_line(proc) == f"POST /track/ 1x Staging page (ids {canonical})"
        call = {"type": "track", "event": "Server call", "anonymousId": device_id(), "writeKey": "staging-key"}
        seg = await client.post("/seg/v1/batch", data=orjson.dumps({"batch": [call]}),
                                headers={"Content-Type": "application/json"})
        assert seg.status == 200 and (await seg.json())["success"] is True
        assert (await read_line(proc)).startswith("POST /v1/batch 1x Server call (ids ")
        script = await client.get("/mp/lib.min.js", headers=BROWSER)
        assert script.status == 200 and await script.read() == lib.read_bytes()
        assert await read_line(proc) == "GET /libs/mixpanel-2-latest.min.js"
        settings_page = await client.get("/seg/cdn/v1/projects/staging-key/settings", headers={**BROWSER, "Host": "www.example.com"})
        answered = await settings_page.json()
        # No destination a staging browser would fetch from the internet; calls come back here.
        assert answered["remotePlugins"] == []
        assert answered["integrations"]["Segment.io"]["apiHost"] == "www.example.com/seg/v1"
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 10)
    assert proc.returncode == 0, (await proc.stderr.read()).decode() if proc.stderr else ""


def test_a_missing_sdk_file_names_the_option(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "fake-upstream", "--port", "0", "--analytics-js", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2 and "--analytics-js" in result.stderr and "standalone.js" in result.stderr
