"""Forgetting a visitor (issue 25): every record kind the store keeps about
one person, reached through any of their ids, in memory and on Redis."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from proxy.services.store import AliasStore
from tests.conftest import TOKEN, device_id

HOST = "www.example.com"


async def remembered(store: AliasStore) -> dict[str, str]:
    """A visitor joined from two devices, with every kind of record; and another one."""
    canonical, first, second = device_id(), device_id(), device_id()
    other, other_device = device_id(), device_id()
    await store.add_aliases({first: canonical, second: canonical})
    await store.add_aliases({other_device: other})
    await store.count_device(canonical)
    await store.count_device(other)
    await store.set_device_record(canonical, HOST, TOKEN, first, int(time.time()))
    await store.set_device_record(canonical, "checkout.site-b.test", None, second, int(time.time()))
    await store.set_device_record(other, HOST, TOKEN, other_device, int(time.time()))
    await store.set_carried(canonical, {"plan": "pro"})
    await store.set_carried(other, {"plan": "free"})
    await store.set_first_touch(canonical, {"$initial_referrer": "https://news.test/"})
    await store.set_landed(canonical, HOST, "bridge", 600)
    assert await store.claim_token("token-of-the-visitor", first, 60) is None
    assert await store.claim_token("token-of-another", other_device, 60) is None
    # ``first`` was a canonical id of its own before a token joined it to ``canonical``.
    await store.set_carried(first, {"plan": "trial"})
    await store.count_device(first)
    await store.set_device_record(first, HOST, TOKEN, first, int(time.time()))
    return {"canonical": canonical, "first": first, "second": second, "other": other, "other_device": other_device}


@pytest.mark.parametrize("through", ["canonical", "first", "second"])
async def test_forget_removes_every_record_reached_through_any_id(store: AliasStore, through: str) -> None:
    ids = await remembered(store)
    canonical = ids["canonical"]
    removed = await store.forget(ids[through])
    assert sorted(removed["alias"]) == sorted([f"alias/{ids['first']}", f"alias/{ids['second']}"])
    first = ids["first"]
    assert sorted(removed["devices"]) == sorted([f"devices/{canonical}", f"devices/{first}"])
    assert sorted(removed["host"]) == sorted([f"host/{canonical}/{HOST}/{TOKEN}", f"host/{canonical}/checkout.site-b.test/-",
                                             f"host/{first}/{HOST}/{TOKEN}"])
    assert sorted(removed["carry"]) == sorted([f"carry/{canonical}", f"carry/{first}"])
    assert removed["touch"] == [f"touch/{canonical}"]
    assert removed["landed"] == [f"landed/{canonical}/{HOST}"]
    assert removed["claim"] == ["claim/token-of-the-visitor"]
    # Gone, read through the store's own calls...
    assert await store.aliases([ids["first"], ids["second"]]) == {}
    assert await store.device_record(canonical, HOST, TOKEN) is None
    assert (await store.carried(canonical), await store.first_touch(canonical)) == ({}, {})
    assert await store.landed(canonical, HOST) is None
    assert await store.count_device(canonical) == 1  # counted afresh
    assert await store.carried(first) == {} and await store.device_record(first, HOST, TOKEN) is None
    # The claim keeps no id, only its expiry: the token stays spent.
    assert await store.claim_token("token-of-the-visitor", "someone", 60) == "forgotten"
    # ... and the process forgot having written them: the same pair is written again.
    await store.add_aliases({ids["first"]: canonical})
    assert await store.aliases([ids["first"]]) == {ids["first"]: canonical}
    # The other visitor is untouched.
    other = ids["other"]
    assert await store.aliases([ids["other_device"]]) == {ids["other_device"]: other}
    assert await store.carried(other) == {"plan": "free"}
    assert await store.device_record(other, HOST, TOKEN) is not None
    assert await store.claim_token("token-of-another", "someone", 60) == ids["other_device"]


async def test_forgetting_an_unknown_id_removes_nothing_and_a_bad_one_is_refused(store: AliasStore) -> None:
    ids = await remembered(store)
    removed = await store.forget(device_id())
    assert all(keys == [] for keys in removed.values())
    assert await store.aliases([ids["first"]]) == {ids["first"]: ids["canonical"]}
    with pytest.raises(ValueError, match="not an id"):
        await store.forget("a/b*")


def server_key(tmp_path: Any) -> tuple[str, str]:
    """An api keys file holding one server key: (its path, the key)."""
    from proxy.core.apikeys import generate_key_line

    line = generate_key_line("crm")
    path = tmp_path / "api_keys"
    path.write_text(line + "\n")
    return str(path), line.split()[1]


@pytest.mark.parametrize("mode", ["memory", "redis"])
async def test_a_backend_forgets_a_visitor_through_the_ops_listener(
    proxy_client: Any, upstream: Any, tmp_path: Any, redis_settings: Any, mode: str
) -> None:
    """The real app: a browser's visit leaves an alias and carried properties;
    ``POST /forget`` with a server key removes them, named by the browser's
    own device id (an original id), and the next event starts afresh."""
    from proxy.web.app import STORE
    from tests.conftest import BROWSER, b64_body, canonical_of, cookie_from, js_event

    path, key = server_key(tmp_path)
    store = {"url": redis_settings["url"]} if mode == "redis" else {}
    client = await proxy_client(store=store, identity={"api_keys_file": path, "carry_properties": ["plan"]})
    device = device_id()
    form = {**BROWSER, "Content-Type": "application/x-www-form-urlencoded"}
    resp = await client.post("/mp/track/", data=b64_body([js_event("Visit", device, plan="pro")]), headers=form)
    canonical = canonical_of(cookie_from(resp))
    live_store = client.app[STORE]
    assert await live_store.carried(canonical) == {"plan": "pro"}
    ops = f"http://127.0.0.1:{client.ops.port}/forget"
    refused = await client.session.post(ops, json={"id": device})
    assert refused.status == 401
    wrong = await client.session.post(ops, json={"id": device}, headers={"Authorization": "Bearer nope"})
    assert wrong.status == 401
    bad = await client.session.post(ops, json={"id": "../etc"}, headers={"Authorization": f"Bearer {key}"})
    assert bad.status == 400 and "not an id" in (await bad.json())["error"]
    done = await client.session.post(ops, json={"id": device}, headers={"Authorization": f"Bearer {key}"})
    assert done.status == 200
    answer = await done.json()
    assert f"carry/{canonical}" in answer["removed"]["carry"] and answer["count"] >= 2
    assert await live_store.carried(canonical) == {}
    if device != canonical:
        assert await live_store.aliases([device]) == {}


async def test_the_cli_forgets_in_redis_and_asks_for_a_key_in_memory(tmp_path: Any, redis_settings: Any) -> None:
    import asyncio

    from proxy.settings import StoreSettings
    from tests.support import run_cli

    store = AliasStore.from_settings(StoreSettings(url=redis_settings["url"]))
    try:
        ids = await remembered(store)
        config = tmp_path / "proxy.toml"
        config.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n[store]\nurl = "{redis_settings["url"]}"\n')
        result = await asyncio.to_thread(run_cli, "forget", ids["second"], "--config", str(config))
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"removed carry    carry/{ids['canonical']}" in result.stdout
        assert result.stdout.strip().endswith("the vendors' copies are theirs to delete (README, Privacy)")
        assert await store.carried(ids["canonical"]) == {} and await store.aliases([ids["first"]]) == {}
        assert await store.carried(ids["other"]) == {"plan": "free"}
    finally:
        await store.close()
    memory = tmp_path / "memory.toml"
    memory.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n')
    result = await asyncio.to_thread(run_cli, "forget", device_id(), "--config", str(memory))
    assert result.returncode == 2 and "--key" in result.stderr + result.stdout
    assert not (tmp_path / "data").exists()


async def test_the_forwarded_log_keeps_no_line_past_its_retention(tmp_path: Any) -> None:
    """``log.retention_days``: a file begun more than a day ago rotates at the
    next write; a rotated file whose last line is older than the retention
    goes; a younger one stays. Without a retention, size alone rotates."""
    import os

    import orjson

    from proxy.services.forwardlog import ForwardedLog

    path = tmp_path / "forwarded.jsonl"
    now = time.time()
    path.write_bytes(orjson.dumps({"time": now - 2 * 86400, "outcome": "forwarded"}) + b"\n")
    old, young = path.with_name("forwarded.jsonl.2"), path.with_name("forwarded.jsonl.3")
    for rotated, age_days in ((old, 31), (young, 29)):
        rotated.write_bytes(b'{"time": 0}\n')
        os.utime(rotated, (now - age_days * 86400, now - age_days * 86400))
    log = ForwardedLog(path, max_bytes=1 << 20, backups=5, retention_days=30)
    log.start()
    assert not old.exists() and young.exists()  # checked at start
    log.record({"time": now, "outcome": "forwarded"})
    await log.close()
    rotated = path.with_name("forwarded.jsonl.1")
    assert b'"outcome":"forwarded"' in rotated.read_bytes() and rotated.read_bytes().count(b"\n") == 1
    assert path.read_bytes().count(b"\n") == 1  # today's line, alone in a new file

    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(orjson.dumps({"time": now - 40 * 86400}) + b"\n")
    log = ForwardedLog(plain, max_bytes=1 << 20, backups=5)
    log.start()
    log.record({"time": now})
    await log.close()
    assert plain.read_bytes().count(b"\n") == 2 and not plain.with_name("plain.jsonl.1").exists()


async def test_an_idle_forwarded_log_still_rotates_and_expires(tmp_path: Any) -> None:
    """No traffic for days: the hourly housekeeping rotates the file begun more
    than a day ago, and drops it once past the retention."""
    import orjson

    from proxy.services.forwardlog import ForwardedLog

    path = tmp_path / "forwarded.jsonl"
    now = time.time()
    path.write_bytes(orjson.dumps({"time": now - 3600}) + b"\n")
    log = ForwardedLog(path, max_bytes=1 << 20, backups=2, retention_days=2)
    log.start()
    log.housekeeping(now)  # begun an hour ago: stays
    assert path.read_bytes() and not path.with_name("forwarded.jsonl.1").exists()
    log.housekeeping(now + 86400)  # a day later, nothing written meanwhile
    assert path.read_bytes() == b"" and path.with_name("forwarded.jsonl.1").exists()
    rotated = path.with_name("forwarded.jsonl.1")
    os.utime(rotated, (now - 3 * 86400, now - 3 * 86400))
    log.housekeeping(now)
    assert not rotated.exists()
    await log.close()


def test_a_first_start_by_many_workers_at_once_makes_one_secret(tmp_path: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from proxy.provision import generate_missing
    from proxy.settings import build_settings

    data = tmp_path / "data"

    def start(_: int) -> tuple[bytes, str]:
        s = generate_missing(build_settings({"server": {"data_dir": str(data)}}, {}))
        return s.cookie.secret, s.identity.keys.current

    with ThreadPoolExecutor(8) as pool:
        results = set(pool.map(start, range(16)))
    assert len(results) == 1  # every worker read the same secret and key, none an empty file
    assert sorted(p.name for p in data.iterdir()) == ["cookie_secret", "identity_keys"]  # no temporary left


async def test_forget_refuses_a_store_split_between_workers(proxy_client: Any, tmp_path: Any) -> None:
    path, key = server_key(tmp_path)
    client = await proxy_client(server={"workers": 2}, identity={"api_keys_file": path})
    resp = await client.session.post(f"http://127.0.0.1:{client.ops.port}/forget", json={"id": device_id()},
                                     headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 409 and "redis://" in (await resp.json())["error"]
