"""The ops listener: /metrics, /readyz and /healthz on their own port, for the
allowed networks only; the public port keeps /healthz alone."""

from __future__ import annotations

import pytest

from proxy.errors import ConfigError
from proxy.settings import build_settings
from tests.support import metric


async def test_ops_endpoints_are_not_on_the_public_port(client):
    for path in ("/metrics", "/readyz"):
        assert (await client.get(path)).status == 404
        assert (await client.ops_get(path)).status == 200
    public = await client.get("/healthz")
    assert public.status == 200 and (await public.json())["status"] == "ok"
    assert (await client.ops_get("/healthz")).status == 200
    text = await (await client.ops_get("/metrics")).text()
    assert metric(text, "firstparty_spool_depth") == 0


async def test_only_allowed_networks_reach_the_ops_listener(proxy_client):
    client = await proxy_client(ops={"allowed_networks": ["10.0.0.0/8"]})
    resp = await client.ops_get("/metrics")
    assert resp.status == 403
    assert "ops.allowed_networks" in await resp.text()


async def test_ops_methods(client):
    resp = await client.session.post(f"http://127.0.0.1:{client.ops.port}/metrics")
    assert resp.status == 405 and resp.headers["Allow"] == "GET, HEAD"


def test_the_ops_port_is_not_the_public_one(tmp_path):
    with pytest.raises(ConfigError) as err:
        build_settings({"server": {"data_dir": str(tmp_path), "port": 9000}, "ops": {"port": 9000}}, {})
    assert err.value.key == "ops.port"
    assert build_settings({"server": {"data_dir": str(tmp_path)}, "ops": {"port": 0}}, {}).ops.port == 0
