"""The suite is offline: any connection or DNS lookup that would leave the
machine fails at once, in the test process and in the processes tests start."""

from __future__ import annotations

import socket
import subprocess
import sys

import aiohttp
import pytest

from proxy.services.upstream import Endpoint, UpstreamClient, UpstreamUnreachable
from tests.offline_site.firstparty_offline import OfflineViolation

# TEST-NET-1 (RFC 5737): never routed, so a guard that let it through would hang, not connect.
OUTSIDE = ("192.0.2.1", 443)


def test_connection_outside_loopback_fails_at_once():
    with socket.socket() as s, pytest.raises(OfflineViolation, match="192.0.2.1:443"):
        s.connect(OUTSIDE)
    with socket.socket() as s, pytest.raises(OfflineViolation):
        s.connect_ex(OUTSIDE)
    with pytest.raises(OfflineViolation):
        socket.create_connection(OUTSIDE, timeout=5)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, pytest.raises(OfflineViolation):
        s.sendto(b"x", ("8.8.8.8", 53))


def test_dns_of_vendor_hosts_fails():
    for host in ("api.mixpanel.com", "cdn.mxpnl.com", "api.segment.io"):
        with pytest.raises(OfflineViolation, match=host):
            socket.getaddrinfo(host, 443)
        with pytest.raises(OfflineViolation):
            socket.gethostbyname(host)


def test_loopback_still_works():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname(), timeout=5):
            pass
    assert socket.getaddrinfo("localhost", 80)


def causes(exc: BaseException | None) -> list[BaseException]:
    out = []
    while exc is not None:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


async def test_our_upstream_client_cannot_reach_a_vendor():
    client = UpstreamClient(max_connections_per_host=1, timeout=30)
    await client.open()
    try:
        with pytest.raises(UpstreamUnreachable) as caught:
            await client.request(Endpoint.parse("https://api.mixpanel.com"), "POST", "/track", [], b"data=e30%3D")
        assert any(isinstance(e, OfflineViolation) for e in causes(caught.value))
    finally:
        await client.close()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorError) as caught:
            await session.get("http://192.0.2.1/")
        assert any(isinstance(e, OfflineViolation) for e in causes(caught.value))


def test_processes_started_by_tests_are_offline_too():
    code = "import socket; socket.create_connection(('192.0.2.1', 443), timeout=5)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "OfflineViolation" in result.stderr and "192.0.2.1:443" in result.stderr
