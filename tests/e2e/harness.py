"""The Python side of the browser end-to-end tests.

- ``Site``/``add_site_routes``: the real proxy app (``create_app``) with test
  pages and the real mixpanel-browser build added as routes, so pages and
  ``/mp/`` share one origin exactly as behind nginx in production;
- ``drive``: runs ``drive.mjs`` (playwright-core + Debian's chromium) as a
  subprocess of this event loop, bounded in time, and returns what it saw;
- small readers for what the fake upstream recorded.

Everything listens on 127.0.0.1; the browser reaches ``*.test`` host names
through ``--host-resolver-rules``.
"""

from __future__ import annotations

import asyncio
import socket
import base64
import contextlib
import json
import os
import shutil
import re
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest

from aiohttp import web

from proxy.web.app import SERVICES, SETTINGS
from proxy.web.http import json_response, query_get
from proxy.web.serve import Serving, serve

from tests.fakeupstream import FakeUpstream, Recorded

E2E_DIR = Path(__file__).resolve().parent
NODE_MODULES = E2E_DIR / "node_modules"
DRIVER = E2E_DIR / "drive.mjs"
CHROMIUM = "/usr/bin/chromium"
# Firefox: Debian's firefox-esr over WebDriver BiDi (puppeteer-core), the subset of
# ops the cross-domain journeys use (drive_firefox.mjs says which).
FIREFOX_DRIVER = E2E_DIR / "drive_firefox.mjs"
FIREFOX = "/usr/bin/firefox-esr"
# WebKit: WebKitGTK's MiniBrowser under Xvfb through WebKitWebDriver (selenium-webdriver).
WEBKIT_DRIVER = E2E_DIR / "drive_webkit.mjs"
MINIBROWSER = "/usr/lib/x86_64-linux-gnu/webkit2gtk-4.1/MiniBrowser"
ENGINE_BINARIES = {"firefox": [FIREFOX], "webkit": [MINIBROWSER, "/usr/bin/WebKitWebDriver", "/usr/bin/Xvfb"]}
# Names the test pages use; Firefox resolves each to 127.0.0.1 (network.dns.localDomains).
TEST_HOSTS = ["www.site-a.test", "checkout.site-b.test", "shop.site-a.test", "hub.id-hub.test", "www.search.test"]
# The UMD build defines window.mixpanel when loaded by a plain <script> and
# bundles the session recorder (no extra download from a CDN).
MIXPANEL_JS = NODE_MODULES / "mixpanel-browser" / "dist" / "mixpanel.umd.js"


def sdk_build(version: str) -> Path:
    """mixpanel-browser's UMD build of an older ``version`` the suite installs beside
    the latest (npm aliases ``mixpanel-browser-<version>`` in package.json)."""
    return NODE_MODULES / f"mixpanel-browser-{version}" / "dist" / "mixpanel.umd.js"
# analytics.js as Segment's CDN serves it (the standalone build and its
# code-split bundles); the fake Segment CDN serves these files.
AJS_DIST = NODE_MODULES / "@segment" / "analytics-next" / "dist" / "umd"
INSTALL_HINT = "run `bash tests/e2e/install.sh` (installs Debian's chromium and the npm packages)"

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--host-resolver-rules=MAP *.test 127.0.0.1",
]


def visitor_user_agent() -> str:
    """Chrome's own user agent for the installed chromium, without "Headless":
    headless Chrome announces itself (``HeadlessChrome``), and it is on the
    public crawler list the proxy screens (``privacy.bots``). Passed as
    ``--user-agent`` so every request has it, a page-hide beacon too (a
    context's override does not reach those)."""
    global _VISITOR_UA
    if _VISITOR_UA is None:
        out = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True, timeout=30).stdout
        match = re.search(r"(\d+\.\d+\.\d+\.\d+)", out)
        version = match.group(1) if match else "120.0.0.0"
        _VISITOR_UA = f"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/{version} Safari/537.36"
    return _VISITOR_UA


_VISITOR_UA: str | None = None

# Whole driver run, and the margin the Python side adds before killing it.
SCENARIO_TIMEOUT_S = 40
KILL_MARGIN_S = 10


def missing_prerequisites() -> list[str]:
    """What the browser tests need and is not installed."""
    missing = []
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"{CHROMIUM} (Debian package chromium)")
    if shutil.which("node") is None:
        missing.append("node")
    if not (AJS_DIST / "standalone.js").is_file():
        missing.append("tests/e2e/node_modules/@segment/analytics-next/dist/umd/standalone.js")
    for package in ("playwright-core", "mixpanel-browser"):
        if not (NODE_MODULES / package / "package.json").is_file():
            missing.append(f"tests/e2e/node_modules/{package}")
        elif package == "mixpanel-browser" and not MIXPANEL_JS.is_file():
            missing.append(f"tests/e2e/node_modules/mixpanel-browser/dist/{MIXPANEL_JS.name}")
    return missing


# ------------------------------------------------------------------- the site


PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>{title}</title><link rel="icon" href="data:,">{head}</head>
<body>
<h1>{title}</h1>
<p>First-party proxy end-to-end page.</p>
<input id="email" type="text" value="">
{body}
<script>{pre}</script>
<script src="/static/mixpanel.js"></script>
<script>
window.__e2e = {{loaded: false}};
{init_open}mixpanel.init({token}, Object.assign({{
  api_host: {api_host},
  debug: true,
  loaded: function () {{ window.__e2e.loaded = true; }}
}}, {config}));
{post}{init_close}
</script>
</body>
</html>
"""

# Keeps a copy of every binary body the page fetch()es to /mp/record/ (the real
# fetch still sends it): the browser's network log does not report Blob bodies.
KEEP_RECORD_BODIES = """
window.__recordBodies = [];
(function (realFetch) {
  window.fetch = function (url, init) {
    if (String(url).indexOf('/mp/record/') !== -1 && init && init.body instanceof Blob) {
      var copy = init.body.slice();
      window.__recordBodies.push(copy.arrayBuffer().then(function (buf) {
        var bytes = new Uint8Array(buf), text = '';
        for (var i = 0; i < bytes.length; i++) { text += String.fromCharCode(bytes[i]); }
        return {url: String(url), body: btoa(text)};
      }));
    }
    return realFetch.apply(this, arguments);
  };
})(window.fetch);
"""

# The analytics.js snippet, as Segment's own does it: a stub that queues calls
# until the script (from the first-party CDN path) replaces it. On an https
# site analytics.js finds its CDN in the script's src; over the tests' plain
# http it must be told (analytics._cdn), as the README says for http set-ups.
SEGMENT_SNIPPET = """
(function () {{
  var analytics = window.analytics = window.analytics || [];
  if (analytics.initialize || analytics.invoked) return;
  analytics.invoked = true;
  analytics.methods = ["track", "page", "identify", "group", "alias", "screen", "ready", "reset", "user",
                       "on", "once", "off", "trackLink", "trackForm", "debug", "setAnonymousId"];
  analytics.factory = function (method) {{
    return function () {{
      var args = Array.prototype.slice.call(arguments);
      args.unshift(method);
      analytics.push(args);
      return analytics;
    }};
  }};
  for (var i = 0; i < analytics.methods.length; i++) {{
    analytics[analytics.methods[i]] = analytics.factory(analytics.methods[i]);
  }}
  analytics.load = function (key, options) {{
    var script = document.createElement("script");
    script.async = true;
    script.src = analytics._cdn + "/analytics.js/v1/" + key + "/analytics.min.js";
    document.head.appendChild(script);
    analytics._loadOptions = options;
  }};
  analytics._writeKey = {key};
  analytics._cdn = location.origin + "/seg/cdn";
  {load}
}})();
"""

SEGMENT_PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>{title}</title><link rel="icon" href="data:,"></head>
<body>
<h1>{title}</h1>
{body}
{mixpanel}
<script>{snippet}</script>
<script>{post}</script>
</body>
</html>
"""

MIXPANEL_BLOCK = """<script src="/static/mixpanel.js"></script>
<script>mixpanel.init({token}, Object.assign({{api_host: location.origin + '/mp', debug: true}}, {config}));</script>"""


def segment_calls(upstream: FakeUpstream) -> list[dict[str, Any]]:
    """Every call the fake Segment API (US) received, in order."""
    return [c for rec in upstream.by("seg-us", "/v1/batch") for c in rec.events()]


def serve_segment_cdn(upstream: FakeUpstream) -> None:
    """Make the fake Segment CDN answer as cdn.segment.com does, with the real
    analytics.js build: the standalone script (its write key embedded, as the
    CDN does), its bundles and a project's settings (no destinations)."""
    from tests.fakeupstream import segment_settings

    async def behave(rec: Recorded) -> web.Response | None:
        if rec.name != "seg-cdn":
            return None
        parts = rec.path.split("/")
        if rec.path.startswith("/analytics.js/v1/") and len(parts) == 5:
            body = (AJS_DIST / "standalone.js").read_bytes().replace(b"__WRITE_KEY__", parts[3].encode())
            return web.Response(body=body, content_type="application/javascript")
        if rec.path.startswith("/analytics-next/bundles/") and (AJS_DIST / parts[-1]).is_file():
            return web.Response(body=(AJS_DIST / parts[-1]).read_bytes(), content_type="application/javascript")
        if len(parts) == 5 and parts[1:3] == ["v1", "projects"] and parts[4] == "settings":
            settings = segment_settings(parts[3])
            settings["remotePlugins"] = []
            return web.json_response(settings)
        return web.Response(status=404, text="Not Found")

    upstream.behave = behave


BLANK = "<!doctype html><html><head><meta charset='utf-8'><title>blank</title></head><body>left</body></html>"


@dataclass
class Site:
    """The proxy app serving test pages on 127.0.0.1:``port``."""

    port: int
    upstream: FakeUpstream
    token: str
    app: web.Application
    mode: str  # delivery mode: "spool" (acknowledged once spooled, sent in batches) or "sync"
    pages: dict[str, str] = field(default_factory=dict)
    # Test-only routes (exact paths) answered before the proxy's own, and
    # per-path latency added before answering.
    routes: dict[str, Callable[[web.Request], Any]] = field(default_factory=dict)
    delays: dict[str, float] = field(default_factory=dict)
    serving: Serving | None = None
    ops: Serving | None = None
    scheme: str = "http"  # "https" once started with an ssl context (``tls_context``)
    # The mixpanel-browser build the pages load (``sdk_build``: another version).
    sdk: Path = MIXPANEL_JS

    @web.middleware
    async def handle(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Test pages and latency in front of the proxy's own routes (test-only middleware)."""
        if self.delays:
            await asyncio.sleep(self.delays.get(request.path, 0))
        route = self.routes.get(request.path)
        if route is None and request.path.startswith("/e2e/"):
            route = self.routes["/e2e/"]
        if route is not None:
            return await route(request)  # type: ignore[no-any-return]
        return await handler(request)  # type: ignore[no-any-return]

    @property
    def services(self) -> Any:
        return self.app[SERVICES]

    async def start(self, sock: socket.socket | None = None, ssl_context: Any = None) -> None:
        """Open the proxy's services and serve it, with the test pages, on a port
        of its own on 127.0.0.1, or on ``sock`` (a port reserved before the app was built);
        over https with ``ssl_context``."""
        from proxy.web.ops import create_ops_app

        self.app.middlewares.append(self.handle)
        self.serving = await serve(
            self.app, self.app[SETTINGS].server, host="127.0.0.1", port=0, shutdown_timeout=5, sock=sock,
            ssl_context=ssl_context,
        )
        if ssl_context is not None:
            self.scheme = "https"
        self.port = self.serving.port
        self.ops = await serve(create_ops_app(self.app), self.app[SETTINGS].server, host="127.0.0.1", port=0)

    async def stop(self) -> None:
        if self.ops is not None:
            await self.ops.stop()
        if self.serving is not None:
            await self.serving.stop()

    def ops_url(self, path: str) -> str:
        """A URL on the ops listener (``/metrics``)."""
        assert self.ops is not None
        return f"http://127.0.0.1:{self.ops.port}{path}"

    def url(self, host: str, path: str = "/") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def seen_upstream(self, path: str, contains: str = "", count: int = 1) -> str:
        """A URL (for the driver's ``poll`` op) that answers 200 once the fake upstream
        has received ``count`` requests on ``path`` whose payload contains ``contains``."""
        query = urlencode({"path": path, "contains": contains, "count": count})
        return f"http://127.0.0.1:{self.port}/__e2e/upstream?{query}"

    def segment_page(
        self,
        name: str,
        write_key: str,
        *,
        mixpanel: dict[str, Any] | None = None,
        load: bool = True,
        body: str = "",
        post: str = "",
    ) -> str:
        """Register a page running analytics.js (the snippet, loading from
        ``/seg/cdn/``) and, with ``mixpanel`` (its config), mixpanel-browser
        too; ``post`` runs after both. ``load=False`` leaves ``analytics.load``
        to ``post``. Returns the page's path."""
        self.pages[name] = SEGMENT_PAGE.format(
            title=name,
            body=body,
            mixpanel=MIXPANEL_BLOCK.format(token=json.dumps(self.token), config=json.dumps(mixpanel)) if mixpanel is not None else "",
            snippet=SEGMENT_SNIPPET.format(key=json.dumps(write_key), load=f"analytics.load({json.dumps(write_key)});" if load else ""),
            post=post,
        )
        return f"/e2e/{name}"

    def page(
        self,
        name: str,
        config: dict[str, Any] | None = None,
        *,
        pre: str = "",
        api_host: str | None = None,
        head: str = "",
        body: str = "",
        post: str = "",
        hub_ready: bool = False,
        ready: str | None = None,
    ) -> str:
        """Register a page that loads mixpanel-browser and calls ``mixpanel.init`` with
        ``config`` (merged over api_host and debug), after the script ``pre``; returns its
        path. ``api_host`` defaults to the page's own origin + "/mp". ``head`` is HTML
        added at the end of <head> (e.g. ``<script src="/mp/hub.js"></script>``),
        ``body`` HTML before the scripts (links), ``post`` script run right after init
        (what the page itself tracks as it loads). ``hub_ready`` wraps init and ``post``
        in ``firstpartyHub.ready(...)``, as the README tells hub sites to; ``ready`` names
        another landing script's object for the same (``firstpartyLanding``, ``firstpartyFrame``)."""
        ready = ready or ("firstpartyHub" if hub_ready else None)
        host = json.dumps(api_host) if api_host else "location.origin + '/mp'"
        self.pages[name] = PAGE.format(
            title=name,
            token=json.dumps(self.token),
            config=json.dumps(config or {}),
            pre=pre,
            api_host=host,
            head=head,
            body=body,
            post=post,
            init_open=f"{ready}.ready(function () {{\n" if ready else "",
            init_close="\n});" if ready else "",
        )
        return f"/e2e/{name}"


# With ``tls_context``: chromium accepts the test's self-signed certificate.
TLS_ARGS = ["--ignore-certificate-errors"]


def tls_context(directory: Path, domains: list[str]) -> Any:
    """A server TLS context with a fresh self-signed certificate for ``*.<domain>``
    of each domain (chromium runs with ``TLS_ARGS``): for what browsers only do
    over https, such as partitioned cookies (CHIPS)."""
    import ssl

    from tests.support import self_signed

    cert, key = self_signed(directory / "e2e-tls", *(f"*.{d.lstrip('.')}" for d in domains))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def add_site_routes(site: Site) -> None:
    """Pages, the SDK build and a blank page, beside the proxy (same origin as /mp/)."""
    sdk: dict[Path, bytes] = {}  # read on first use: a missing install is reported by drive()

    async def page(request: web.Request) -> web.Response:
        html = site.pages.get(request.path[len("/e2e/"):])
        if html is None:
            return web.Response(status=404, text="no such page")
        return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def script(request: web.Request) -> web.Response:
        if site.sdk not in sdk:
            sdk[site.sdk] = site.sdk.read_bytes()
        return web.Response(body=sdk[site.sdk], content_type="application/javascript", charset="utf-8")

    async def blank(request: web.Request) -> web.Response:
        return web.Response(text=BLANK, content_type="text/html")

    async def seen_upstream(request: web.Request) -> web.Response:
        # Test-only: lets the driver wait for what reached the fake upstream.
        path = query_get(request, "path") or ""
        contains = query_get(request, "contains", "") or ""
        want = int(query_get(request, "count", "1") or "1")
        matched = [rec for rec in site.upstream.requests if rec.path.startswith(path) and contains in payload_text(rec)]
        return json_response({"count": len(matched)}, status=200 if len(matched) >= want else 404)

    async def no_favicon(request: web.Request) -> web.Response:
        return web.Response(status=204)

    site.routes.update(
        {
            "/e2e/": page,
            "/static/mixpanel.js": script,
            "/blank": blank,
            "/favicon.ico": no_favicon,
            "/__e2e/upstream": seen_upstream,
        }
    )


# ----------------------------------------------------------------- the driver


@dataclass
class Run:
    """What one driver run reported."""

    ok: bool
    error: str | None
    results: dict[str, Any]
    console: list[dict[str, str]]
    page_errors: list[str]
    requests: list[dict[str, Any]]
    stderr: str
    # Committed main-frame navigations of every tab, and main-frame document requests
    # (redirect hops included), in order: see drive.mjs.
    navigations: list[dict[str, Any]] = field(default_factory=list)
    documents: list[dict[str, Any]] = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        return self.results[key]

    def console_errors(self) -> list[dict[str, str]]:
        return [m for m in self.console if m["type"] == "error"]

    def browser_requests(self, path: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if urlsplit(r["url"]).path.startswith(path)]

    def describe(self) -> str:
        lines = [f"driver error: {self.error}"] if self.error else []
        lines += [f"page error: {e}" for e in self.page_errors]
        lines += [f"console {m['type']}: {m['text']}" for m in self.console if m["type"] in ("error", "warning")]
        lines += [
            f"document (page {d['page']}): {d['method']} {d['url']} -> {d['status']} "
            f"{d.get('location') or ''}{d.get('failure') or ''}"
            for d in self.documents
        ]
        lines += [
            f"request: {r['method']} {r['url']} -> {r['status']} {r.get('failure') or ''}" for r in self.requests
        ]
        if self.stderr.strip():
            lines.append("stderr: " + self.stderr.strip()[-2000:])
        return "\n".join(lines)


async def drive(
    steps: list[dict[str, Any]],
    timeout_s: float = SCENARIO_TIMEOUT_S,
    headers: dict[str, str] | None = None,
    args: list[str] | None = None,
    engine: str = "chromium",
    prefs: dict[str, Any] | None = None,
    user_agent: str | None = None,
) -> Run:
    """Run a scenario in a fresh headless chromium; fails the test if the driver does.

    Missing chromium or npm packages fail the test (never skip it), naming the
    install script. ``args`` are chromium flags added for this run. The driver is our child in its own session; it is stopped by
    its pid (SIGTERM lets playwright close the browser, SIGKILL to its process group
    after). ``engine`` is chromium, firefox or webkit; ``prefs`` are Firefox preferences
    for this run; ``user_agent`` is chromium's (a visitor's Chrome by default:
    ``visitor_user_agent``)."""
    missing = missing_prerequisites()
    if missing:
        pytest.fail(f"browser e2e prerequisites missing: {', '.join(missing)}; {INSTALL_HINT}", pytrace=False)
    scenario = {
        "chromium": CHROMIUM,
        "args": [*CHROMIUM_ARGS, f"--user-agent={user_agent or visitor_user_agent()}", *(args or [])],
        "timeout_ms": int(timeout_s * 1000),
        "steps": steps,
        "headers": headers or {},
    }
    absent = [b for b in ENGINE_BINARIES.get(engine, []) if not os.access(b, os.X_OK)]
    if absent:
        pytest.fail(f"browser e2e prerequisites missing: {', '.join(absent)}; {INSTALL_HINT}", pytrace=False)
    if engine == "firefox":
        hosts = {urlsplit(step["url"]).hostname for step in steps if step.get("url")}
        scenario.update(firefox=FIREFOX, hosts=sorted({*TEST_HOSTS, *(h for h in hosts if h and h.endswith(".test"))}),
                        prefs=prefs or {})
    if engine == "webkit":
        # The site (one app serves every test host) is the browser's HTTP proxy.
        port = next(urlsplit(step["url"]).port for step in steps if step.get("url"))
        scenario.update(webkit=MINIBROWSER, site=f"127.0.0.1:{port}")
    driver = {"firefox": FIREFOX_DRIVER, "webkit": WEBKIT_DRIVER}.get(engine, DRIVER)
    proc = await asyncio.create_subprocess_exec(
        shutil.which("node") or "node",
        str(driver),
        cwd=str(E2E_DIR),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        env={**os.environ, "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1", "NODE_NO_WARNINGS": "1"},
    )
    try:
        stdout, stderr = await asyncio.wait_for(
            proc.communicate(json.dumps(scenario).encode()), timeout_s + KILL_MARGIN_S
        )
    except asyncio.TimeoutError:
        await _stop(proc)
        pytest.fail(f"browser driver did not finish within {timeout_s + KILL_MARGIN_S} s")
    finally:
        if proc.returncode is None:
            await _stop(proc)
    err = stderr.decode(errors="replace")
    try:
        data = json.loads(stdout.decode().strip().splitlines()[-1])
    except (IndexError, ValueError):
        pytest.fail(f"browser driver printed no result (exit {proc.returncode}); stderr:\n{err[-4000:]}")
    run = Run(
        ok=data["ok"],
        error=data["error"],
        results=data["results"],
        console=data["console"],
        page_errors=data["page_errors"],
        requests=data["requests"],
        stderr=err,
        navigations=data.get("navigations", []),
        documents=data.get("documents", []),
    )
    if not run.ok:
        pytest.fail("browser scenario failed:\n" + run.describe())
    return run


async def _stop(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), 5)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


# ------------------------------------------------------- reading the upstream


def tracked_events(upstream: FakeUpstream, path: str = "/track") -> list[dict[str, Any]]:
    """Every event (or profile update) the fake upstream received on ``path``, in arrival order."""
    return [event for rec in upstream.by("us", path) for event in rec.events()]


async def arrived(
    upstream: FakeUpstream,
    predicate: Callable[[dict[str, Any]], bool],
    path: str = "/track",
    timeout: float = 10.0,
) -> list[dict[str, Any]]:
    """The events on ``path`` matching ``predicate``, once at least one has arrived.

    The browser's request is answered once the proxy accepted the events; in
    spool mode they reach the upstream a little later, in batches."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = [e for e in tracked_events(upstream, path) if predicate(e)]
        if found:
            return found
        if loop.time() > deadline:
            seen = [e.get("event") or sorted(e) for e in tracked_events(upstream, path)]
            raise AssertionError(f"nothing matching arrived upstream at {path} within {timeout} s; got {seen}")
        await asyncio.sleep(0.02)


async def event_named(upstream: FakeUpstream, name: str, timeout: float = 10.0) -> dict[str, Any]:
    """The last event called ``name`` the upstream received (waiting for it if needed)."""
    return (await arrived(upstream, lambda e: e.get("event") == name, timeout=timeout))[-1]


def payload_text(rec: Recorded) -> str:
    """The events a recorded request carried as compact JSON, for substring matching."""
    if rec.path.rstrip("/") not in ("/track", "/engage", "/groups", "/import"):
        return ""
    try:
        return json.dumps(rec.payload(), separators=(",", ":"), ensure_ascii=False)
    except Exception:  # a malformed body matches nothing; the tests look at it themselves
        return ""


def decode_data(value: str) -> Any:
    """A (form-decoded) ``data`` value as mixpanel-js sends it: base64 JSON, or JSON."""
    if value.lstrip()[:1] in ("{", "["):
        return json.loads(value)
    return json.loads(base64.b64decode(value + "=" * (-len(value) % 4)))


def assert_no_cookie_leak(upstream: FakeUpstream, cookie_values: list[str]) -> None:
    """No sealed cookie value (nor its HMAC tag) in any query, body or payload sent upstream."""
    assert not upstream.surprises, upstream.surprises
    needles = set()
    for value in cookie_values:
        needles.add(value)
        needles.add(value.rpartition(".")[2])  # the tag alone
    for rec in upstream.requests:
        assert "cookie" not in rec.headers, f"Cookie header forwarded to {rec.path}"
        haystacks = [json.dumps(rec.query), rec.body.decode("latin-1")]
        if rec.path.rstrip("/") in ("/track", "/engage", "/groups"):
            haystacks.append(json.dumps(rec.payload()))
        for needle in needles:
            for hay in haystacks:
                assert needle not in hay, f"fp_id value leaked upstream in {rec.method} {rec.path}"


def query_of(rec: Recorded) -> dict[str, str]:
    return dict(rec.query)
