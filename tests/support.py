"""Small helpers several test modules share."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import re
import socket
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, urlsplit

import pytest

# tests/conftest.py imports this module: the helpers import tests.conftest and
# tests.e2e.conftest where they run (not here: a circular import), and the e2e harness
# too (the unit tests need not load it). Here: for annotations only.
if TYPE_CHECKING:
    from aiohttp import web

    from proxy.core.tokens import KeyRing
    from tests.e2e.harness import Run, Site

# What `firstparty serve` logs once its one worker is bound (with --port 0: the port it got).
LISTENING = re.compile(rb"listening on http://[^\s]+?:(\d+)/")

# Database 15 of the machine's Redis: the suite's own (the ``redis_settings`` fixture empties it).
REDIS_URL = "redis://127.0.0.1:6379/15"


async def eventually(condition: Any, timeout: float, what: str, interval: float = 0.02) -> None:
    """Wait until ``condition()`` is true (polled every ``interval``), failing
    after ``timeout`` seconds with ``what`` in the message. The one way the
    suite waits for something asynchronous: never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(interval)


async def eventually_async(condition: Any, timeout: float, what: str, interval: float = 0.05) -> None:
    """``eventually`` for a condition that must await (a request)."""
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(interval)


def metric(text: str, sample: str) -> float:
    """The value of ``sample`` (``name{label="v"}``) in a Prometheus text page.
    A labelled sample that was never incremented is absent: 0, as long as its
    family is exported at all; a family that is not there (renamed, never
    registered) fails the test instead of reading as 0."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    name = sample.split("{", 1)[0]
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    family = next((f for f in families if name == f or name.startswith(f + "_")), None)
    assert family is not None, f"metric {name} is not exported at all (families: {sorted(families)})"
    return 0.0


def reserve_port() -> socket.socket:
    """A socket bound to a free 127.0.0.1 port, not listening: connecting to it
    is refused (an upstream that is down), and no other process can take the
    port while the test holds it. Hand it to ``FakeUpstream.serve(sock=...)``
    to bring that upstream up on the same port later; close it at the end."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def reserve_shared_port() -> socket.socket:
    """A free 127.0.0.1 port held with SO_REUSEPORT and never listening: a
    child that binds it with SO_REUSEPORT too (the ops listener, workers)
    joins it, and no other process can take it meanwhile."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def port_of(sock: socket.socket) -> int:
    return sock.getsockname()[1]


async def wait_listening(log: Path, proc: subprocess.Popen[Any], offset: int = 0, timeout: float = 20.0) -> int:
    """The port a ``firstparty serve --port 0`` child says it listens on, read
    from its log (after byte ``offset``: the lines of this start only)."""
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_bytes()[offset:] if log.exists() else b""
        found = LISTENING.search(text)
        if found:
            return int(found.group(1))
        assert proc.poll() is None, f"proxy exited during start-up:\n{text.decode(errors='replace')}"
        assert time.monotonic() < deadline, f"proxy did not start in {timeout} s:\n{text.decode(errors='replace')}"
        await asyncio.sleep(0.05)


def self_signed(directory: Path, *names: str) -> tuple[Path, Path]:
    """A self-signed certificate (usable as its own CA) for host names and IPs:
    returns (cert.pem, key.pem) written into ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


class ProxyClient:
    """The proxy app served by aiohttp's runner on 127.0.0.1 (as ``firstparty
    serve`` runs it), and an aiohttp session pointed at it (cookies kept, IP
    hosts included, as a browser on the site would)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.serving: Any = None
        self.ops: Any = None
        self.session: Any = None
        self.port = 0

    async def start(self) -> "ProxyClient":
        import aiohttp

        from proxy.web.app import SETTINGS
        from proxy.web.serve import serve

        from proxy.web.ops import create_ops_app

        self.serving = await serve(self.app, self.app[SETTINGS].server, host="127.0.0.1", port=0, shutdown_timeout=5)
        self.port = self.serving.port
        # The ops listener (/metrics, /readyz), on a port of its own as in production.
        self.ops = await serve(create_ops_app(self.app), self.app[SETTINGS].server, host="127.0.0.1", port=0)
        self.session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        return self

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None
        if self.ops is not None:
            await self.ops.stop()
            self.ops = None
        if self.serving is not None:
            await self.serving.stop()
            self.serving = None

    def ops_get(self, path: str, **kwargs: Any) -> Any:
        """GET on the ops listener (``/metrics``, ``/readyz``)."""
        return self.session.get(f"http://127.0.0.1:{self.ops.port}{path}", **kwargs)

    @property
    def services(self) -> Any:
        from proxy.web.app import SERVICES

        return self.app[SERVICES]

    def make_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.session.request(method, self.make_url(path), **kwargs)

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def options(self, path: str, **kwargs: Any) -> Any:
        return self.request("OPTIONS", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> Any:
        return self.request("PUT", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self.request("DELETE", path, **kwargs)

    def head(self, path: str, **kwargs: Any) -> Any:
        return self.request("HEAD", path, **kwargs)


class OwnServer:
    """A server of the test's own (redis-server, nats-server) on a free port of
    127.0.0.1, that can be stopped (``kill``: SIGKILL, or SIGTERM) and started
    again on the same port. Subclasses name the binary and its arguments."""

    binary = ""  # the command's name on the PATH
    fallback = ""  # its path where the PATH does not have it

    def __init__(self, directory: Path, port: int = 0) -> None:
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = port
        self.kill_on_stop = False

    def argv(self, binary: str) -> list[str]:
        raise NotImplementedError

    async def start(self) -> None:
        """Start on a free port (chosen again should another process take it
        first), or, once it has one, on that port again."""
        import shutil
        import socket

        binary = shutil.which(self.binary) or self.fallback
        keep = bool(self.port)
        for _ in range(1 if keep else 5):
            if not keep:
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", 0))
                    self.port = probe.getsockname()[1]
            self.proc = subprocess.Popen(self.argv(binary), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(200):
                if self.proc.poll() is not None:
                    break  # it could not bind: try another port
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", self.port)) == 0:
                        return
                await asyncio.sleep(0.05)
            self.stop()
        pytest.fail(f"could not start a {self.binary} of the test's own (port {self.port})")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if self.kill_on_stop:
                self.proc.kill()
            else:
                self.proc.terminate()
            self.proc.wait(timeout=10)


ROOT = Path(__file__).resolve().parent.parent


async def wait_ready(session: Any, port: int, proc: subprocess.Popen[Any]) -> None:
    """Until a ``firstparty serve`` child answers /healthz on ``port`` (20 s at most)."""
    import aiohttp

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, "proxy exited during start-up"
        try:
            async with session.get(f"http://127.0.0.1:{port}/healthz") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("proxy did not start in 20 s")


async def wait_for_workers(port: int, count: int) -> None:
    """Until every worker listens, SO_REUSEPORT hands all connections to the
    first one: ask /healthz on new connections until `count` pids answered."""
    import aiohttp

    pids: set[int] = set()
    deadline = time.monotonic() + 20
    while len(pids) < count:
        assert time.monotonic() < deadline, f"only {len(pids)} of {count} workers answered in 20 s"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            async with s.get(f"http://127.0.0.1:{port}/healthz") as r:
                pids.add((await r.json())["pid"])
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def serve_workers(config: Path, workers: int = 2) -> AsyncIterator[tuple[int, int, subprocess.Popen[bytes]]]:
    """``firstparty serve --config config`` with ``workers`` workers, on ports held for
    the whole test with SO_REUSEPORT and never listening (the workers join them, no
    other process can take them): yields (port, ops port, process) once every worker
    answers; stopped with SIGTERM after, and it must exit 0."""
    import aiohttp
    import signal

    reserved, ops_reserved = reserve_shared_port(), reserve_shared_port()
    port, ops_port = port_of(reserved), port_of(ops_reserved)
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port), "--ops-port", str(ops_port)],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("FIRSTPARTY_")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, port, proc)
        await wait_for_workers(port, workers)
        yield port, ops_port, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        reserved.close()
        ops_reserved.close()
    assert proc.returncode == 0, proc.stderr.read().decode() if proc.stderr else ""


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("FIRSTPARTY_")}, **(env or {})},
    )


async def serve_tls(app: web.Application, cert: Path, key: Path) -> tuple[web.AppRunner, int]:
    import ssl

    from aiohttp import web

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    return runner, runner.addresses[0][1]


async def log_records(client: Any, tmp_path: Any) -> list[dict[str, Any]]:
    import orjson

    await client.close()  # drains the sender, flushes the log
    path = tmp_path / "data" / "forwarded.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


# ----------------------------------------------------------- analytics.js calls

PLAIN = {"Content-Type": "text/plain"}  # analytics.js: JSON as text/plain, no CORS preflight


def ajs_call(kind: str, anonymous_id: str, *, user_id: str | None = None, write_key: str | None = None, **extra: Any) -> dict[str, Any]:
    """A call shaped like analytics.js 1.x (``@segment/analytics-next``) posts it."""
    # conftest's SEG_KEY by default (read here: conftest imports this module).
    from tests.conftest import BROWSER, SEG_KEY

    call: dict[str, Any] = {
        "type": kind,
        "anonymousId": anonymous_id,
        "messageId": f"ajs-next-{uuid.uuid4().hex}",
        "timestamp": "2026-12-01T12:00:00.000Z",
        "context": {
            "page": {"url": "https://www.example.com/pricing", "path": "/pricing", "search": "", "referrer": ""},
            "library": {"name": "analytics.js", "version": "next-1.70.0"},
            "userAgent": BROWSER["User-Agent"],
        },
        "integrations": {},
        "writeKey": SEG_KEY if write_key is None else write_key,
        "sentAt": "2026-12-01T12:00:00.010Z",
        **extra,
    }
    if user_id:
        call["userId"] = user_id
    return call


# --------------------------------------- cross-domain identity over real HTTP
# Two registrable domains, linked, and a hub (tests/test_crossdomain.py and the
# modules that take the same journeys).

A = "www.site-a.test"
B = "checkout.site-b.test"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
TRACK = "/mp/track/?verbose=1&ip=1"
IDENTITY = {
    "cookie": {"domains": [".site-a.test", ".site-b.test"], "secure": False},
    "cors": {"allowed_origins": ["http://*.site-a.test", "http://*.site-b.test", "http://partner.other.test"]},
    "identity": {"linked_domains": [".site-a.test", ".site-b.test"], "hub_url": "http://hub.id-hub.test"},
}


def browser(host: str, cookie: str | None = None, cookie_name: str = "fp_id") -> dict[str, str]:
    headers = {"Host": host, "Origin": f"http://{host}", "User-Agent": "Mozilla/5.0 (X11) Chrome/120", **FORM}
    if cookie:
        headers["Cookie"] = f"{cookie_name}={cookie}"
    return headers


def keys_of(client: Any) -> KeyRing:
    return client.services.settings.identity.keys


async def visit_a(client: Any) -> str:
    """A visitor tracks on site A; returns the cookie value set there."""
    from tests.conftest import b64_body, cookie_from, device_id, js_event

    resp = await client.post(TRACK, data=b64_body([js_event("Page A", device_id())]), headers=browser(A))
    assert resp.status == 200
    return cookie_from(resp)


async def go_to_b(client: Any, cookie: str, target: str = f"http://{B}/cart?utm_source=mail&x=1") -> str:
    """Follow /mp/go from A; returns the Location (B's URL with the token)."""
    resp = await client.get(f"/mp/go?to={quote(target, safe='')}", headers=browser(A, cookie), allow_redirects=False)
    assert resp.status == 302, await resp.text()
    assert "no-store" in resp.headers["Cache-Control"]
    return resp.headers["Location"]


def token_of(url: str) -> str:
    return dict(parse_qsl(urlsplit(url).query))["fpb"]


def landing_event(url: str, device: str, **props: Any) -> dict[str, Any]:
    from tests.conftest import js_event

    return js_event("Page B", device, **{"$current_url": url, "$referrer": f"http://{A}/pricing", **props})


async def land(client: Any, host: str, token: str, cookie: str | None = None, **extra: str) -> Any:
    """land.js's POST: the page's token and its document.referrer (by default, site A's page)."""
    if "frame" not in extra:
        extra.setdefault("ref", quote(f"http://{A}/pricing", safe=""))
    body = "&".join([f"fpb={quote(token)}", *(f"{k}={v}" for k, v in extra.items() if v is not None)])
    return await client.post("/mp/id", data=body, headers=browser(host, cookie))


# ------------------------------------------------------------------- nginx


def render_nginx(tmp: Path, proxy_port: int, tls_port: int, cert: Path, key: Path, site_locations: str = "") -> Path:
    """nginx.example.conf as shipped, with only ports and certificate paths changed
    (and ``site_locations``, the site's own, where the file says they go)."""
    site = (ROOT / "nginx.example.conf").read_text()
    if site_locations:
        assert "# ... your site's own locations ..." in site
        site = site.replace("# ... your site's own locations ...", site_locations)
    site = site.replace("server 127.0.0.1:8000;", f"server 127.0.0.1:{proxy_port};")
    site = site.replace("listen 443 ssl http2;", f"listen 127.0.0.1:{tls_port} ssl http2;")
    site = site.replace("listen [::]:443 ssl http2;", "")
    site = site.replace("/etc/ssl/certs/www.example.com.pem", str(cert))
    site = site.replace("/etc/ssl/private/www.example.com.key", str(key))
    return wrap_site(tmp, site)


def wrap_site(tmp: Path, site: str) -> Path:
    """An nginx main config of the test's own (pid, logs, temp files under ``tmp``)
    including ``site``, a file meant for http { }."""
    (tmp / "site.conf").write_text(site)
    main = tmp / "nginx.conf"
    main.write_text(
        f"""
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/site.conf;
}}
"""
    )
    return main


async def start_nginx(nginx_bin: str, prefix: Path, conf_for: Any) -> tuple[subprocess.Popen[bytes], int]:
    """nginx binds its own port (it cannot be handed a socket): pick a free one,
    and should another process take it in the moment between, pick again."""
    for _ in range(5):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        conf = conf_for(port)
        check = subprocess.run([nginx_bin, "-t", "-p", str(prefix), "-c", str(conf)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        proc = subprocess.Popen(
            [nginx_bin, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return proc, port
            await asyncio.sleep(0.05)
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)
            pytest.fail("nginx did not listen within 10 s")
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert "Address already in use" in err, err
    pytest.fail("nginx found its port taken 5 times in a row")


# ------------------------------------------------ browser end-to-end (tests/e2e)
# Steps for drive.mjs (tests/e2e/harness.py runs it) and readers of what it reports.


def goto(site: Site, host: str, path: str) -> dict[str, Any]:
    return {"op": "goto", "url": site.url(host, path)}


# Until mixpanel.init has run (a hub page calls it in firstpartyHub.ready, which may
# come after the load event), wait for it in the page: at most 10 s, then go on.
MIXPANEL_READY = (
    "for (let i = 0; i < 400 && !(window.mixpanel && window.mixpanel.__loaded); i++)"
    " await new Promise((r) => setTimeout(r, 25));\n"
)


def js(code: str, save: str | None = None) -> dict[str, Any]:
    """A step that runs ``code`` in the page; code that uses mixpanel runs once it is initialised."""
    if "mixpanel." in code:
        code = MIXPANEL_READY + code
    step: dict[str, Any] = {"op": "eval", "js": code}
    if save:
        step["save"] = save
    return step


def wait(path: str, contains: str = "", count: int = 1, timeout_ms: int = 10000) -> dict[str, Any]:
    return {"op": "wait_requests", "path": path, "contains": contains, "count": count, "timeout_ms": timeout_ms}


def event(name: str) -> str:
    """What a payload carrying event ``name`` contains (compact JSON)."""
    return '"event":' + json.dumps(name)


def sent_events_of(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The events (or profile updates) one browser request carried, as the SDK sent them."""
    from tests.e2e.harness import decode_data

    body = request.get("post_data")
    fields = dict(parse_qsl(body)) if body else dict(parse_qsl(urlsplit(request["url"]).query))
    if not fields.get("data"):
        return []
    payload = decode_data(fields["data"])
    return payload if isinstance(payload, list) else [payload]


def sent_events(run: Run, path: str = "/mp/track/") -> list[dict[str, Any]]:
    """Events as the SDK sent them (before the proxy), from the browser's side."""
    return [e for request in run.browser_requests(path) for e in sent_events_of(request)]


# The cross-domain journeys (www.site-a.test, checkout.site-b.test, the hub on hub.id-hub.test).

A_HOST = "www.site-a.test"
B_HOST = "checkout.site-b.test"
HUB_HOST = "hub.id-hub.test"
LINKED = [".site-a.test", ".site-b.test"]
FAST = {"batch_flush_interval_ms": 100}
IDS = "({distinct: mixpanel.get_distinct_id(), device: mixpanel.get_property('$device_id')})"
TOKEN_PARAM = "fpb"
# The landing URL: the token first in the query string, the target's own query after it.
LANDING = r"^http://checkout\.site-b\.test:\d+/e2e/b\?fpb=([A-Za-z0-9_-]+)&utm_source=mail$"


class TokenClock:
    """The clock the proxy's token code reads (``services.tokens``' and
    ``web.crossdomain``'s ``time``), movable
    forward by the browser scenario through ``/__e2e/clock?advance=<seconds>``: a token
    can expire without the test waiting out its lifetime."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset


def modes(**extra: Any) -> Any:
    return pytest.mark.parametrize(
        "xsite", [{"mode": m, **extra} for m in ("spool", "sync")], indirect=True, ids=["spool", "sync"]
    )


def b_target(site: Site) -> str:
    return site.url(B_HOST, "/e2e/b?utm_source=mail")


def go_href(site: Site) -> str:
    return "/mp/go?to=" + quote(b_target(site), safe="")


async def token_metrics(site: Site) -> dict[str, float]:
    """``firstparty_identity_tokens_total`` by result, read from the proxy's /metrics."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(site.ops_url("/metrics"), timeout=aiohttp.ClientTimeout(5)) as r:
            assert r.status == 200
            text = await r.text()
    out = {}
    for m in re.finditer(r'^firstparty_identity_tokens_total\{result="([^"]+)"\} ([0-9.e+]+)$', text, re.M):
        out[m.group(1)] = float(m.group(2))
    return out


def cookies_named(run: Run, key: str, name: str) -> list[dict[str, Any]]:
    return [c for c in run.results[key] if c["name"] == name]


def one_cookie(run: Run, key: str, name: str, domain: str) -> dict[str, Any]:
    found = [c for c in cookies_named(run, key, name) if c["domain"] == domain]
    assert len(found) == 1, f"{name} cookies for {domain} in {key}: {run.results[key]}"
    return found[0]


def web_events(site: Site) -> list[dict[str, Any]]:
    """Every browser event the upstream received on /track."""
    from tests.e2e.harness import tracked_events

    return [e for e in tracked_events(site.upstream) if e.get("properties", {}).get("mp_lib") == "web"]


async def settled(site: Site, names: list[str]) -> list[dict[str, Any]]:
    """Wait (bounded) until every event name in ``names`` has arrived upstream; all web events."""
    from tests.e2e.harness import event_named

    for name in names:
        await event_named(site.upstream, name)
    return web_events(site)


def upstream_texts(site: Site) -> list[str]:
    """Everything the upstream received, as text: queries, raw bodies, decoded payloads."""
    texts = []
    for rec in site.upstream.requests:
        texts.append(json.dumps(rec.query))
        texts.append(rec.body.decode("latin-1"))
        if rec.path.rstrip("/") in ("/track", "/engage", "/groups"):
            texts.append(json.dumps(rec.payload()))
    return texts


def assert_no_token_upstream(site: Site, tokens: list[str], canonical: str | None) -> None:
    """No token (nor ``fpb=``) anywhere the upstream received; no URL-valued string
    property (``$current_url``, ``$referrer``, ``$initial_referrer``, any string with
    ``://``) carries ``fpb=`` or the canonical id."""
    from tests.e2e.harness import tracked_events

    assert not site.upstream.surprises, site.upstream.surprises
    for text in upstream_texts(site):
        assert TOKEN_PARAM + "=" not in text, f"{TOKEN_PARAM}= reached the upstream: {text[:400]}"
        for token in tokens:
            assert token not in text, "an identity token reached the upstream"
    for e in tracked_events(site.upstream) + tracked_events(site.upstream, "/engage"):
        props = e.get("properties", e)
        for key, value in props.items():
            if isinstance(value, str) and "://" in value:
                assert TOKEN_PARAM + "=" not in value, (key, value)
                if canonical:
                    assert canonical not in value, (key, value)


def assert_one_identity(events: list[dict[str, Any]], canonical: str) -> None:
    """Every event carries ``canonical`` as $device_id; anonymous ones as distinct_id too."""
    assert events
    for e in events:
        props = e["properties"]
        assert props["$device_id"] == canonical, (e["event"], props["$device_id"], canonical)
        if "$user_id" not in props:
            assert props["distinct_id"] == f"$device:{canonical}", (e["event"], props["distinct_id"])


def observe(run: Run, label: str) -> dict[str, Any]:
    """What the browser did, for the report (printed with -s)."""
    seen = {
        "navigations": [(n["page"], n["url"]) for n in run.navigations],
        "documents": [
            (d["page"], d["url"], d["status"], d.get("location"), (d.get("headers") or {}).get("referer"))
            for d in run.documents
        ],
        "sent": [
            {
                k: e["properties"].get(k)
                for k in ("$current_url", "$referrer", "$initial_referrer", "$device_id", "distinct_id")
            }
            | {"event": e["event"]}
            for e in sent_events(run)
        ],
    }
    print(f"\n--- {label}\n" + json.dumps(seen, indent=1))
    return seen


def browser_clean(run: Run, tolerated: tuple[str, ...] = ()) -> None:
    """No uncaught exception, no console error (but those matching ``tolerated``, matched
    against "<text> <url>"), every request to /mp/ and /hub/ answered (2xx, or the 302 of
    /mp/go and /hub/resolve; with ``tolerated``, /hub/ requests are the test's business)."""
    assert not run.page_errors, run.describe()
    errors = [m for m in run.console_errors() if not any(re.search(t, m["text"] + " " + m["url"]) for t in tolerated)]
    assert not errors, run.describe()
    for r in run.requests:
        path = urlsplit(r["url"]).path
        if path == "/hub/ping" and r["failure"] == "net::ERR_ABORTED" and r["status"] is None:
            # hub.js leaves for /hub/resolve as soon as the ping's answer arrives,
            # without reading its body: chromium reports the ping as aborted.
            assert any(
                urlsplit(d["url"]).path == "/hub/resolve" and d["page"] == r["page"] for d in run.documents
            ), run.describe()
            continue
        if path.startswith("/hub/") and tolerated:
            continue
        if r["resource_type"] == "ping" and r["status"] is None:
            continue  # a beacon's answer is not always reported
        expected = (302,) if path in ("/mp/go", "/hub/resolve") else tuple(range(200, 300))
        assert r["failure"] is None and r["status"] in expected, run.describe()


HUB_JS = '<script src="/mp/hub.js"></script>'
SEARCH = "http://www.search.test/?q=shoes"  # where the visitor came from (its Referer)
LS = "localStorage.getItem('fp_hub_done')"
HUB_IDS = f"Object.assign({IDS}, {{flag: {LS}, referrer: document.referrer}})"


def hub_pages(site: Site, post_a: str = "", config: dict[str, Any] = FAST) -> tuple[str, str]:
    """A and B with hub.js first in <head>, before mixpanel, and mixpanel.init inside
    ``firstpartyHub.ready`` as the README says; A runs ``post_a`` after init."""
    a = site.page("ha", config, head=HUB_JS, post=post_a, hub_ready=True)
    b = site.page("hb", config, head=HUB_JS, hub_ready=True)
    return a, b


async def attackers_link(site: Site) -> tuple[dict[str, Any], str]:
    """A genuine link token for the attacker's own id (anyone can get one from A's
    /mp/bridge, from their own browser): /mp/bridge's answer, and that id."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        headers = {"Host": A_HOST, "User-Agent": "Mozilla/5.0", "Sec-Fetch-Site": "same-origin"}
        async with session.post(site.url("127.0.0.1", "/mp/bridge"), json={"to": b_target(site)}, headers=headers) as r:
            assert r.status == 200
            answer = await r.json()
    attacker = site.services.settings.identity.keys.open(
        answer["token"], purpose="bridge", audience="site-b.test", now=time.time()
    ).canonical_id
    return answer, attacker


async def step(stage: Any, x: Any, c: Any) -> None:
    """One pipeline stage as ``pipeline.run`` takes it: awaited when it hands back a coroutine."""
    pending = stage(x, c)
    if pending is not None:
        await pending
