"""The alias store on aiocache: bounded memory, real Redis shared by instances."""

from __future__ import annotations

import uuid
from typing import Any

from aiocache import SimpleMemoryCache

from proxy.web.app import create_app
from proxy.settings import StoreSettings
from proxy.services.store import AliasStore, BoundedMemoryCache
from tests.conftest import BROWSER, b64_body, canonical_of, cookie_from, device_id, js_event, json_body, make_settings
from tests.support import OwnServer, port_of, reserve_port



def _dev(i: int) -> str:
    return f"device-{i:06d}"


async def test_memory_store_is_bounded_in_bytes():
    cache = BoundedMemoryCache(100_000, timeout=None)
    store = AliasStore(cache)
    for i in range(1500):
        await store.add_aliases({_dev(i): f"canon-{i:06d}"})
    assert cache.bytes <= 100_000
    assert 100 < len(cache._cache) < 1500  # noqa: SLF001 - the oldest went first
    assert await store.aliases([_dev(0), _dev(1499)]) == {_dev(1499): "canon-001499"}
    # A few large records cost what they weigh, not one entry each.
    before = len(cache._cache)  # noqa: SLF001
    for i in range(10):
        await store.set_carried(f"canon-{i:06d}", {"blob": "x" * 9000})
    assert cache.bytes <= 100_000 and len(cache._cache) < before  # noqa: SLF001


async def test_writes_are_not_repeated():
    calls = []

    class Counting(SimpleMemoryCache):  # a backend behind aiocache's async API, as Redis is
        async def _multi_set(self, pairs, ttl=None, _conn=None):  # type: ignore[override]
            calls.append(list(pairs))
            return await super()._multi_set(pairs, ttl=ttl)

    store = AliasStore(Counting(timeout=None))
    for _ in range(5):
        await store.add_aliases({"device-1": "canon-01"}, repoint=True)
    await store.add_aliases({"device-1": "canon-02"}, repoint=True)  # a new pair for the same id is written
    assert calls == [[("alias/device-1", "canon-01")], [("alias/device-1", "canon-02")]]


async def test_unreachable_redis_degrades_without_failing():
    store = AliasStore.from_settings(StoreSettings(url="redis://127.0.0.1:1/0"))
    assert await store.aliases(["device-x"]) == {}
    await store.add_aliases({"device-x": "canon-yy"}, repoint=True)
    assert store.errors == 2
    assert await store.ping() is False
    await store.close()


async def test_readyz_follows_the_store(serve_proxy, tmp_path, upstream, redis_settings):
    up = await serve_proxy(create_app(make_settings(tmp_path / "up", upstream, store=redis_settings)))
    ready = await up.ops_get("/readyz")
    assert ready.status == 200 and await ready.json() == {"store": True, "spool": True}
    with reserve_port() as down:  # nothing answers there: Redis is down
        lost = {"url": f"redis://127.0.0.1:{port_of(down)}/0"}
        proxy = await serve_proxy(create_app(make_settings(tmp_path / "down", upstream, store=lost)))
        ready = await proxy.ops_get("/readyz")
        assert ready.status == 503 and await ready.json() == {"store": False, "spool": True}
        # Not ready, still serving: events are accepted and spooled meanwhile.
        resp = await proxy.post(
            "/mp/track/?verbose=1", data=b64_body([js_event("x", device_id())]),
            headers={**BROWSER, "Content-Type": "application/x-www-form-urlencoded"},
        )
        assert resp.status == 200


async def test_two_instances_share_aliases_through_redis(serve_proxy, tmp_path, upstream, redis_settings):
    """A browser seen by instance A; a server-side event with its original
    device id, sent to instance B, is rewritten to the same canonical id."""
    sync = {"mode": "sync"}
    a = await serve_proxy(create_app(make_settings(tmp_path / "a", upstream, store=redis_settings, delivery=sync)))
    b = await serve_proxy(create_app(make_settings(tmp_path / "b", upstream, store=redis_settings, delivery=sync)))
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    first = await a.post("/mp/track/", data=b64_body([js_event("x", device_id())]), headers={**BROWSER, **form})
    cookie = cookie_from(first)
    original = f"dev-{uuid.uuid4()}"
    # The same browser on another subdomain, where mixpanel-js has its own device id.
    await a.post(
        "/mp/track/",
        data=b64_body([js_event("y", original)]),
        headers={**BROWSER, **form, "Cookie": f"fp_id={cookie}", "Host": "shop.example.com"},
    )
    resp = await b.post("/mp/track", data=json_body(js_event("server", original)), headers={"User-Agent": "python-requests/2", **form})
    assert resp.status == 200
    sent = upstream.requests[-1].events()[0]["properties"]
    assert sent["$device_id"] == canonical_of(cookie)
    assert sent["distinct_id"] == f"$device:{canonical_of(cookie)}"


class OwnRedis(OwnServer):
    """A redis-server of this test's own (no persistence: a restart forgets),
    killed (SIGKILL) when stopped."""

    binary, fallback = "redis-server", "/usr/bin/redis-server"

    def __init__(self, directory: Any) -> None:
        super().__init__(directory)
        self.kill_on_stop = True

    def argv(self, binary: str) -> list[str]:
        return [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.directory)]


async def test_redis_lost_and_back_mid_load_loses_nothing(serve_proxy, tmp_path, upstream):
    """Redis killed in the middle of the load and started again on its port:
    every event is accepted and delivered once meanwhile (the store degrades),
    and once Redis is back, aliases are written and used again."""
    import asyncio

    from tests.support import eventually

    redis = OwnRedis(tmp_path)
    await redis.start()
    try:
        store = {"url": f"redis://127.0.0.1:{redis.port}/0"}
        client = await serve_proxy(create_app(make_settings(tmp_path, upstream, store=store, delivery={"mode": "spool"})))
        form = {**BROWSER, "Content-Type": "application/x-www-form-urlencoded"}
        sent: list[str] = []

        async def load(n: int) -> None:
            for _ in range(n):
                event = js_event("load", device_id())
                resp = await client.post("/mp/track/", data=b64_body([event]), headers=form)
                assert resp.status == 200
                sent.append(event["properties"]["$insert_id"])
                await asyncio.sleep(0)

        await load(50)
        redis.stop()  # lost mid-load
        await load(50)
        ready = await client.ops_get("/readyz")
        assert ready.status == 503 and (await ready.json())["store"] is False
        await redis.start()  # back, empty, on the same port
        await load(50)

        async def store_back() -> bool:
            return (await client.ops_get("/readyz")).status == 200

        from tests.support import eventually_async

        await eventually_async(store_back, 10, "the store to answer again")
        # Aliases again: a browser seen now, then a server-side event with its other id.
        first = await client.post("/mp/track/", data=b64_body([js_event("browser", device_id())]), headers=form)
        cookie = cookie_from(first)
        original = f"dev-{uuid.uuid4()}"
        await client.post("/mp/track/", data=b64_body([js_event("other host", original)]),
                          headers={**form, "Cookie": f"fp_id={cookie}", "Host": "shop.example.com"})
        await client.post("/mp/track", data=json_body(js_event("server", original)),
                          headers={"User-Agent": "python-requests/2", "Content-Type": "application/x-www-form-urlencoded"})
        await eventually(lambda: len(upstream.received("us", "/track")) == 153, 20, "every event")
        received = upstream.received("us", "/track")
        loaded = [e["properties"]["$insert_id"] for e in received if e["event"] == "load"]
        assert sorted(loaded) == sorted(sent)  # all 150, each once
        server = next(e for e in received if e["event"] == "server")["properties"]
        assert server["$device_id"] == canonical_of(cookie)  # through the alias Redis holds again
        text = await (await client.ops_get("/metrics")).text()
        from tests.support import metric

        assert metric(text, "firstparty_store_errors") > 0
    finally:
        redis.stop()
