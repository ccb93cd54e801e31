"""Settings validation and the command line, run as a user runs them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest

from proxy.errors import ConfigError
from proxy.provision import generate_missing
from proxy.settings import build_settings, load_settings
from tests.support import port_of, reserve_shared_port, run_cli, wait_listening

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_need_no_server(tmp_path):
    s = build_settings({"server": {"data_dir": str(tmp_path)}}, {})
    assert s.store.url == "memory://"
    assert s.upstream.regions["eu"] == "https://api-eu.mixpanel.com"
    assert s.cookie.secure is True and s.cookie.max_age_days == 400
    # The first start generates a secret (provision), kept so a restart keeps
    # every visitor's cookie valid (tests/test_provision.py has the rest).
    s = generate_missing(s)
    again = build_settings({"server": {"data_dir": str(tmp_path)}}, {})
    assert s.cookie.secret == again.cookie.secret and len(s.cookie.secret) >= 32
    assert (tmp_path / "cookie_secret").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize(
    "raw,key,fix",
    [
        ({"server": {"prot": 80}}, "server.prot", "known keys in [server]"),
        ({"sevrer": {}}, "sevrer", "known sections"),
        ({"server": {"port": "eighty"}}, "server.port", "whole number"),
        ({"server": {"port": 70000}}, "server.port", "from 0 to 65535"),
        ({"upstream": {"eu": "api-eu.mixpanel.com"}}, "upstream.eu", 'write it like "https://'),
        ({"upstream": {"default_region": "asia"}}, "upstream.default_region", "use one of us, eu, in"),
        ({"upstream": {"projects": {"tok": "mars"}}}, "upstream.projects.tok", "unknown region"),
        ({"cookie": {"domains": ["example"]}}, "cookie.domains", 'write it like ".example.com"'),
        ({"cookie": {"max_age_days": 500}}, "cookie.max_age_days", "from 1 to 400"),
        ({"cookie": {"secret": "short"}}, "cookie.secret", "at least 16 bytes"),
        ({"cookie": {"name": "fp id"}}, "cookie.name", "not a valid cookie name"),
        ({"server": {"trusted_proxies": ["10.0.0.0/33"]}}, "server.trusted_proxies", "CIDR"),
        ({"cors": {"allowed_origins": ["ftp://x.test"]}}, "cors.allowed_origins", "http or https"),
        ({"store": {"url": "mysql://x"}}, "store.url", "redis://"),
        ({"segment": {"mounts": ["/mp/seg/"]}}, "segment.mounts", "a path of its own"),
        ({"segment": {"set_ajs_cookie": "maybe"}}, "segment.set_ajs_cookie", "true or false"),
        ({"consent": {"segment_required_categories": 3}}, "consent.segment_required_categories", "list of strings"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(tmp_path, raw, key, fix):
    raw.setdefault("server", {})["data_dir"] = str(tmp_path)
    with pytest.raises(ConfigError) as err:
        build_settings(raw, {})
    assert err.value.key == key
    assert fix in str(err.value)


def test_environment_overrides(tmp_path):
    env = {
        "FIRSTPARTY_SERVER_PORT": "9100",
        "FIRSTPARTY_COOKIE_SECURE": "false",
        "FIRSTPARTY_CORS_ALLOWED_ORIGINS": '["https://a.example.com"]',
        "FIRSTPARTY_COOKIE_SECRET": "an-env-secret-of-enough-length",
        "FIRSTPARTY_SERVER_DATA_DIR": str(tmp_path),
    }
    s = load_settings(None, env)
    assert s.server.port == 9100 and s.cookie.secure is False
    assert s.cors.allowed_origins == ("https://a.example.com",)
    assert s.cookie.secret == b"an-env-secret-of-enough-length"
    with pytest.raises(ConfigError, match="FIRSTPARTY_SERVER_PROT"):
        load_settings(None, {**env, "FIRSTPARTY_SERVER_PROT": "1"})


def test_bad_config_exits_2_with_one_line(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[server]\nport = "eighty"\n')
    result = run_cli("serve", "--config", str(cfg))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "server.port" in lines[0]
    result = run_cli("serve", "--config", str(tmp_path / "missing.toml"))
    assert result.returncode == 2 and "no such file" in result.stderr
    cfg.write_text("[server\n")
    result = run_cli("serve", "--config", str(cfg))
    assert result.returncode == 2 and "not valid TOML" in result.stderr


def test_help_lists_environment_overrides():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "FIRSTPARTY_SERVER_PORT" in result.stdout and "FIRSTPARTY_COOKIE_DOMAINS" in result.stdout



async def test_serve_starts_on_defaults_and_stops_on_sigterm(tmp_path, upstream):
    log = tmp_path / "serve.log"
    ops_sock = reserve_shared_port()  # the ops listener's port, held for it
    ops_port = port_of(ops_sock)
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--port", "0"],
        cwd=tmp_path,  # embedded defaults: files under ./firstparty-data
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("FIRSTPARTY_")},
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "FIRSTPARTY_SERVER_MAX_BODY_BYTES": "4096",
            # Every default but the vendor: this machine may have network, tests never use it.
            "FIRSTPARTY_UPSTREAM_US": upstream.urls["us"],
            "FIRSTPARTY_OPS_PORT": str(ops_port),
        },
        stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"),  # noqa: SIM115 - the child owns it
    )
    try:
        port = await wait_listening(log, proc)
        assert f"ops on http://127.0.0.1:{ops_port} (/metrics, /readyz, /healthz)" in log.read_text()

        def get(path: str, on: int = port) -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{on}{path}", timeout=5) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as err:
                return err.code, err.read()

        def post(path: str, body: bytes) -> tuple[int, bytes]:
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}{path}", data=body, method="POST",
                headers={"Content-Type": "application/x-www-form-urlencoded", "User-Agent": "Mozilla/5.0"},
            )
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as err:
                return err.code, err.read()

        # Blocking calls in a thread: the fake upstream answers on this loop meanwhile.
        assert (await asyncio.to_thread(get, "/healthz"))[0] == 200
        status, ready = await asyncio.to_thread(get, "/readyz", ops_port)
        assert (status, orjson.loads(ready)) == (200, {"store": True, "spool": True})
        # The ops endpoints are not on the public port (but /healthz, for load balancers).
        assert (await asyncio.to_thread(get, "/readyz"))[0] == 404
        assert (await asyncio.to_thread(get, "/metrics"))[0] == 404
        assert (await asyncio.to_thread(get, "/healthz", ops_port))[0] == 200
        assert (tmp_path / "firstparty-data" / "cookie_secret").exists()

        event = {"event": "Served", "properties": {"token": "t", "$device_id": "abcdef12-3456", "time": time.time()}}
        status, answer = await asyncio.to_thread(
            post, "/mp//track/?verbose=1&ip=1", b"data=" + orjson.dumps(event).replace(b"&", b"")
        )
        assert (status, orjson.loads(answer)) == (200, {"status": 1, "error": None})  # spooled
        [sent] = await upstream.wait(1, "us", "/track")  # ... and delivered, to the local fake only
        assert sent["event"] == "Served"
        status, answer = await asyncio.to_thread(post, "/mp/track/?verbose=1", b"data=" + b"A" * 8000)
        assert status == 413 and b"larger than 4096" in answer
        assert (await asyncio.to_thread(post, "/nowhere", b""))[0] == 404
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        ops_sock.close()
    assert proc.returncode == 0


def test_port_zero_needs_one_worker():
    result = run_cli("serve", "--port", "0", "--workers", "2")
    assert result.returncode != 0
    assert "server.port" in result.stderr and "one worker" in result.stderr


def test_logs_command_filters_and_prints(tmp_path):
    log = tmp_path / "forwarded.jsonl"
    records = [
        {"time": 1_700_000_000.5, "outcome": "forwarded", "route": "track", "region": "us", "project": "tok",
         "events": ["Page View"], "count": 1, "canonical_ids": ["c-1"], "sources": ["new"], "original_ids": [],
         "rewrites": [], "status": 200, "attempts": 1, "latency_ms": 3.2},
        {"time": 1_700_000_001.0, "outcome": "forwarded", "route": "track", "region": "eu", "project": "tok2",
         "events": ["Checkout"], "count": 1, "canonical_ids": ["c-2"], "sources": ["cookie"], "original_ids": ["d-9"],
         "rewrites": [{"field": "$device_id", "from": "d-9", "to": "c-2"}], "status": 200, "attempts": 3,
         "latency_ms": 5.0},
        {"time": 1_700_000_002.0, "outcome": "dead_letter", "route": "track", "region": "us", "project": "tok",
         "events": ["Bad"], "count": 1, "canonical_ids": [], "sources": ["none"], "original_ids": [], "rewrites": [],
         "status": 400, "attempts": 1, "latency_ms": 1.0, "reason": "rejected", "detail": "'time' is invalid"},
        {"time": 1_700_000_003.0, "outcome": "dropped", "reason": "consent: gpc", "route": "track",
         "project": "tok", "events": ["Page View"], "count": 1, "status": None},
    ]
    log.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records) + b'{"partial')
    out = run_cli("logs", "--file", str(log)).stdout
    assert "Page View" in out and "Checkout" in out and "rewrote $device_id: d-9 -> c-2" in out
    assert "attempts 3" in out and "rejected: 'time' is invalid" in out and "dead_letter" in out
    out = run_cli("logs", "--file", str(log), "--id", "d-9").stdout
    assert "Checkout" in out and "Page View" not in out
    out = run_cli("logs", "--file", str(log), "--event", "Page View", "--json").stdout
    found = [orjson.loads(line) for line in out.splitlines()]
    assert [(r["outcome"], r.get("canonical_ids")) for r in found] == [("forwarded", ["c-1"]), ("dropped", None)]
    out = run_cli("logs", "--file", str(log), "--outcome", "dropped").stdout
    assert out.count("\n    consent: gpc\n") == 1 and "Checkout" not in out and out.split()[1] == "dropped"
    missing = run_cli("logs", "--file", str(tmp_path / "none.jsonl"))
    assert missing.returncode == 1 and "no forwarded log" in missing.stderr


def test_keygen_rotates_keys(tmp_path):
    from proxy.core.tokens import KeyRing

    keys = tmp_path / "keys"
    first = run_cli("keygen", "--file", str(keys), "--id", "k1")
    assert first.returncode == 0 and "added key k1" in first.stdout
    ring1 = KeyRing.from_file(keys.read_text())
    token = ring1.seal("abc-12345678", purpose="bridge", audience="site-b.test", now=time.time(), ttl=60)
    second = run_cli("keygen", "--file", str(keys), "--id", "k2")
    assert "1 older key(s) still verify" in second.stdout
    ring2 = KeyRing.from_file(keys.read_text())
    assert ring2.current == "k2"  # the new key signs
    # A token sealed before the rotation still opens.
    assert ring2.open(token, purpose="bridge", audience="site-b.test", now=time.time()).canonical_id == "abc-12345678"
    assert keys.stat().st_mode & 0o077 == 0
    bad = run_cli("keygen", "--file", str(keys), "--id", "bad id!")
    assert bad.returncode == 2 and "--id" in bad.stderr
    env = {"FIRSTPARTY_SERVER_DATA_DIR": str(tmp_path / "d"), "FIRSTPARTY_COOKIE_SECRET": "x" * 20}
    broken = tmp_path / "broken"
    broken.write_text("k1 not-base64!!\n")
    result = run_cli("serve", env={**env, "FIRSTPARTY_IDENTITY_KEYS_FILE": str(broken)})
    assert result.returncode == 2 and "identity.keys_file" in result.stderr and "line 1" in result.stderr


def test_serving_freezes_start_up_objects_and_collects_young_objects_less_often():
    import gc

    from proxy.cli import GC_YOUNG_THRESHOLD, tune_gc

    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_freeze_count() > 1000  # modules, settings, services
        assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD > before[0]
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


@pytest.mark.parametrize(
    "server, key",
    [
        ({"mounts": ["mp"]}, "server.mounts"),
        ({"mounts": []}, "server.mounts"),
        ({"route_aliases": {"e": "tracks"}}, "server.route_aliases.e"),
        ({"route_aliases": {"track": "engage"}}, "server.route_aliases.track"),
    ],
)
def test_bad_mounts_and_aliases_name_the_key(tmp_path, server, key):
    with pytest.raises(ConfigError) as err:
        build_settings({"server": {"data_dir": str(tmp_path), **server}, "cookie": {"secret": "s" * 32}}, {})
    assert err.value.key == key


@pytest.mark.parametrize("level, listening_line", [("info", True), ("warning", False)])
def test_log_level_sets_the_process_log(tmp_path, level, listening_line):
    """`[log] level` is the process log's level: at "warning" the start-up line (info) is not written."""
    config = tmp_path / "proxy.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n[log]\nlevel = "{level}"\n')
    reserved = reserve_shared_port()  # the ops listener's (it joins a held port): asked until it answers
    port = port_of(reserved)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIRSTPARTY_")}
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", "0",
                             "--ops-port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:  # until it answers: the start-up line, if any, is written by then
            assert proc.poll() is None and time.monotonic() < deadline, "the proxy did not start"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.05)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
        reserved.close()
    assert ("listening on" in err) is listening_line, err
