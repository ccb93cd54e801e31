"""Small helpers several test modules share."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import re
import socket
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

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
