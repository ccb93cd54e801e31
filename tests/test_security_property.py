"""A property of the edge (issue 21): whatever strings a client puts in any
identity field (each protocol's ids, cookies, query ids, a token), the proxy
never answers 5xx, never builds a store key outside its validator's language,
and never sets a cookie whose value is not a valid id."""

from __future__ import annotations

import asyncio
import base64
import copy
import re
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.core.ids import valid_id
from proxy.web.app import create_app
from tests.conftest import SEG_KEY, TOKEN, b64_body, js_event, make_settings
from tests.fakeupstream import FakeUpstream
from tests.support import A, IDENTITY, ProxyClient

# What a hostile client would try, beside arbitrary text.
CRAFTED = ["carry:x", "touch/abc", "alias/x", "host:a:b:c", "claim:token:x", "../../etc", "a\nb", "a;b", "a b",
           "\u202e", "x" * 129, "x" * 5000, "$device:", "$device:\n", "ok-id-12345678", "{\"a\":1}", ""]
ids = st.one_of(st.sampled_from(CRAFTED), st.text(max_size=300),
                st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_:./", min_size=0, max_size=200))
KEY_PART = re.compile(r"[A-Za-z0-9_\-:.\[\]]{1,253}")


@pytest.fixture(scope="module")
def loop() -> Any:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def proxy(loop: Any, tmp_path_factory: Any) -> Any:
    """One proxy (memory store, sync delivery) for every example, served by the real server."""
    fake = FakeUpstream()
    runners = []

    async def start() -> tuple[ProxyClient, aiohttp.ClientSession]:
        from aiohttp.test_utils import TestServer

        urls = {}
        for name in ("us", "eu", "in", "decide", "cdn", "seg-us", "seg-eu", "seg-cdn"):
            server = TestServer(fake.app(name), host="127.0.0.1")
            await server.start_server()
            runners.append(server)
            urls[name] = f"http://127.0.0.1:{server.port}"
        fake.urls = urls  # type: ignore[attr-defined]
        sections = copy.deepcopy(IDENTITY)
        sections["delivery"] = {"mode": "sync"}
        sections["identity"]["carry_properties"] = ["plan"]
        client = await ProxyClient(create_app(make_settings(tmp_path_factory.mktemp("prop"), fake, **sections))).start()
        return client, aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())

    client, session = loop.run_until_complete(start())
    yield client, session, fake
    loop.run_until_complete(session.close())
    loop.run_until_complete(client.close())
    for server in runners:
        loop.run_until_complete(server.close())


def _cookie_safe(value: str) -> str:
    return "".join(c for c in value if 0x20 < ord(c) < 0x7F and c not in ';,"\\')


async def _probe(client: ProxyClient, session: aiohttp.ClientSession, v: list[str]) -> list[aiohttp.ClientResponse]:
    base = f"http://127.0.0.1:{client.port}"
    cookie = f"fp_id={_cookie_safe(v[6])}; ajs_anonymous_id={_cookie_safe(v[7])}"
    headers = {"Host": A, "Origin": f"http://{A}", "User-Agent": "Mozilla/5.0", "Cookie": cookie,
               "Content-Type": "application/x-www-form-urlencoded"}
    event = js_event("Probe", v[0], plan="p", **{"distinct_id": v[1], "$anon_distinct_id": v[2], "$user_id": v[3],
                                                 "$current_url": f"http://{A}/?fpb={quote(v[8])}"})
    event["properties"]["$device_id"] = v[0]
    engage = {"$token": TOKEN, "$distinct_id": v[1], "$device_id": v[0], "$set": {"a": 1}}
    call = {"type": "alias", "anonymousId": v[4] or "x", "userId": v[3], "previousId": v[5], "writeKey": SEG_KEY}
    server = {"User-Agent": "python-requests/2", "Content-Type": "application/x-www-form-urlencoded"}
    out = []
    requests = [
        ("POST", "/mp/track/?verbose=1&ip=1", b64_body([event]), headers),
        ("POST", "/mp/engage/?verbose=1", b64_body([engage]), headers),
        ("POST", "/mp/track", "data=" + quote(orjson.dumps([event]).decode()), server),
        ("POST", "/seg/v1/a", orjson.dumps(call), {**headers, "Content-Type": "text/plain"}),
        ("POST", "/seg/v1/batch", orjson.dumps({"batch": [call]}),
         {**server, "Authorization": "Basic " + base64.b64encode(f"{SEG_KEY}:".encode()).decode()}),
        ("GET", f"/mp/record/?format=body&distinct_id={quote(v[1])}&$device_id={quote(v[0])}&token={TOKEN}", None, headers),
        ("GET", "/mp/flags/?context=" + quote(orjson.dumps({"distinct_id": v[1], "device_id": v[0]}).decode()), None, headers),
        ("POST", "/mp/id", f"fpb={quote(v[8])}&ref={quote(v[5])}", headers),
        ("GET", f"/mp/go?to={quote(v[9])}", None, headers),
    ]
    for method, path, data, h in requests:
        async with session.request(method, base + path, data=data, headers=h, allow_redirects=False) as resp:
            await resp.read()
            out.append(resp)
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(ids, min_size=10, max_size=10))
def test_any_identity_field_is_safe(loop: Any, proxy: Any, values: list[str]) -> None:
    client, session, fake = proxy
    before = len(fake.requests)
    responses = loop.run_until_complete(_probe(client, session, values))
    assert len(fake.requests) > before  # the probe went through the pipeline, not only its refusals
    for resp in responses:
        assert resp.status < 500, (resp.method, resp.url.path, resp.status)
        for header in resp.headers.getall("Set-Cookie", []):
            name, _, rest = header.partition("=")
            value = rest.split(";", 1)[0]
            if name == "fp_id" and value:
                canonical, _, tag = value.rpartition(".")
                assert valid_id(canonical) and len(tag) == 22, header
            if name == "ajs_anonymous_id":
                assert valid_id(value), header
    store = client.services.store
    for key in list(store._cache._cache):  # noqa: SLF001 - the memory store's own dict
        kind, _, rest = key.partition("/")
        parts = rest.split("/")
        assert kind in ("alias", "devices", "host", "carry", "touch", "claim"), key
        assert all(KEY_PART.fullmatch(p) for p in parts), key
        if kind in ("alias", "devices", "carry", "touch", "host"):
            assert valid_id(parts[0]), key
