"""A hostile client against the identity layer (issue 21): it must not read,
write or fix another visitor's identity, nor exhaust what the proxy keeps.
Each test is written to fail on the code before the fix it names."""

from __future__ import annotations

import copy
import uuid
from typing import Any

import orjson
import pytest
from multidict import CIMultiDict

from proxy.core.ids import MAX_ID_CHARS, valid_id
from proxy.services.store import AliasStore, BoundedMemoryCache
from tests.conftest import BROWSER, SEG_KEY, TOKEN, b64_body, canonical_of, cookie_from, device_id, js_event, json_body
from tests.support import A, B, IDENTITY, browser, go_to_b, token_of, visit_a

TRACK = "/mp/track/?verbose=1&ip=1"
SERVER = {"User-Agent": "python-requests/2.31", "Content-Type": "application/x-www-form-urlencoded"}
CARRY = copy.deepcopy(IDENTITY)
CARRY["identity"]["carry_properties"] = ["plan"]


def crafted_ids(victim: str) -> list[str]:
    """Ids naming the proxy's own records of ``victim``, in every key spelling
    the store used or uses (``kind:...`` before, ``kind/...`` now)."""
    kinds = [f"carry:{victim}", f"touch:{victim}", f"devices:{victim}", f"host:{victim}:{A}:test-token-us",
             f"host:{victim}:{A}:", f"claim:token:{victim}", f"fp:alias:{victim}"]
    return kinds + [k.replace(":", "/", 1) for k in kinds]


@pytest.fixture(params=["memory", "redis"])
async def hostile(request: Any, proxy_client: Any, redis_settings: Any) -> Any:
    sections = copy.deepcopy(CARRY)
    if request.param == "redis":
        sections["store"] = redis_settings
    return await proxy_client(**sections)


async def test_crafted_ids_cannot_read_or_write_another_visitors_records(hostile, upstream):
    client = hostile
    # The victim: a browser on A with a carried property and a first touch.
    own_device = device_id()
    first = js_event("Landing", own_device, plan="enterprise-secret",
                     **{"$initial_referrer": "https://search.test/?q=secret", "$initial_referring_domain": "search.test"})
    cookie = cookie_from(await client.post(TRACK, data=b64_body([first]), headers=browser(A)))
    victim = canonical_of(cookie)
    assert (await client.services.store.carried(victim)) == {"plan": "enterprise-secret"}
    # The attacker: no cookie of the victim's, every crafted id in every identity field.
    for crafted in crafted_ids(victim):
        for props in ({"$device_id": crafted, "distinct_id": f"$device:{crafted}"},
                      {"$anon_distinct_id": f"$device:{crafted}"}):
            event = js_event("Probe", device_id(), plan="ATTACKER-INJECTED", **props)
            resp = await client.post(TRACK, data=b64_body([event]), headers=browser(A))
            assert resp.status < 500, (crafted, await resp.text())
            for header in resp.headers.getall("Set-Cookie", []):
                value = header.split(";", 1)[0].split("=", 1)[1]
                canonical = canonical_of(value)
                assert valid_id(canonical), header  # never a record's value
                assert canonical != victim and "secret" not in header and "search.test" not in header
        # Segment's anonymousId, and a server SDK's lookups, the same way.
        call = {"type": "track", "event": "Probe", "anonymousId": crafted, "writeKey": SEG_KEY,
                "properties": {"plan": "ATTACKER-INJECTED"}}
        resp = await client.post("/seg/v1/t", data=orjson.dumps(call), headers={**browser(A), "Content-Type": "text/plain"})
        assert resp.status < 500 and victim not in str(resp.headers)
        resp = await client.post("/mp/track", data=json_body(js_event("Server", crafted)), headers=SERVER)
        assert resp.status == 200
    # The victim's next event still carries their own value, never the attacker's.
    later = js_event("Purchase", own_device)
    await client.post(TRACK, data=b64_body([later]), headers=browser(A, cookie))
    events = await upstream.wait(1 + 3 * len(crafted_ids(victim)) + 1, "us", "/track")
    purchase = next(e for e in events if e["event"] == "Purchase")["properties"]
    assert purchase["plan"] == "enterprise-secret" and purchase["$device_id"] == victim
    for event in events:  # no server event was rewritten to a record's value
        assert "secret" not in str(event["properties"].get("$device_id")), event
    store = client.services.store
    assert (await store.carried(victim)) == {"plan": "enterprise-secret"}
    assert (await store.first_touch(victim)).get("$initial_referring_domain") == "search.test"


def test_store_keys_are_one_kind_each_and_refuse_unsafe_parts():
    store = AliasStore(BoundedMemoryCache(1 << 20, timeout=None))
    victim = str(uuid.uuid4())
    keys = {
        store._key("alias", f"carry/{victim}"),  # noqa: SLF001
        store._key("carry", victim),  # noqa: SLF001
        store._key("alias", f"carry:{victim}"),  # noqa: SLF001
        store._key("host", victim, A, "-"),  # noqa: SLF001
        store._key("host", f"{victim}:{A}", "-", "-"),  # noqa: SLF001
    }
    assert None in keys  # "/" is never part of a part
    assert len(keys - {None}) == 4  # and the others are all distinct
    for bad in ("", "a/b", "a\nb", "x" * 300, "caf\u00e9", "a b"):
        assert store._key("alias", bad) is None  # noqa: SLF001


@pytest.fixture(params=["memory", "redis"])
async def linked(request: Any, proxy_client: Any, redis_settings: Any) -> Any:
    """The app with linked domains, on the memory store or Redis."""
    sections = copy.deepcopy(IDENTITY)
    if request.param == "redis":
        sections["store"] = redis_settings
    return await proxy_client(**sections)


async def test_an_alias_named_by_an_unproven_request_is_not_repointed(linked, upstream):
    client = linked
    # The visitor: cookie C on A, then their other device id D on A's shop (alias D -> C).
    cookie = cookie_from(await client.post(TRACK, data=b64_body([js_event("A", device_id())]), headers=browser(A)))
    victim = canonical_of(cookie)
    d = device_id()
    await client.post(TRACK, data=b64_body([js_event("Shop", d)]), headers=browser("shop.site-a.test", cookie))
    # Another browser, no cookie, names D beside its own id.
    hostile = js_event("Hostile", device_id(), **{"$anon_distinct_id": f"$device:{d}"})
    resp = await client.post(TRACK, data=b64_body([hostile]), headers=browser(A))
    assert canonical_of(cookie_from(resp)) != victim
    # A server-side event for D still goes to the visitor.
    await client.post("/mp/track", data=json_body(js_event("Server", d)), headers=SERVER)
    events = await upstream.wait(4, "us", "/track")
    server = next(e for e in events if e["event"] == "Server")["properties"]
    assert server["$device_id"] == victim
    # A request that proves its canonical id (its own signed cookie) may move it.
    other = cookie_from(await client.post(TRACK, data=b64_body([js_event("B", device_id())]), headers=browser(A)))
    await client.post(TRACK, data=b64_body([js_event("Moved", d)]), headers=browser("blog.site-a.test", other))
    await client.post("/mp/track", data=json_body(js_event("Server 2", d)), headers=SERVER)
    events = await upstream.wait(7, "us", "/track")
    server = next(e for e in events if e["event"] == "Server 2")["properties"]
    assert server["$device_id"] == canonical_of(other)


async def test_a_redeemed_token_moves_the_browsers_device_to_the_linked_identity(linked, upstream):
    """The same person on B before the link (device D, B's own id), then landing
    from A with A's token: D now belongs to A's id, for the server SDKs too."""
    client = linked
    visitor, token = await _attackers_link(client)  # this time the visitor's own id on A
    cookie_b, device = await _victim_on_b(client)
    assert canonical_of(cookie_b) != visitor
    landing = js_event("Landing", device, **{"$current_url": f"http://{B}/offer?fpb={token}",
                                             "$referrer": f"http://{A}/pricing"})
    resp = await client.post(TRACK, data=b64_body([landing]), headers=browser(B, cookie_b))
    assert canonical_of(cookie_from(resp)) == visitor
    await client.post("/mp/track", data=json_body(js_event("Server", device)), headers=SERVER)
    events = await upstream.wait(4, "us", "/track")
    server = next(e for e in events if e["event"] == "Server")["properties"]
    assert server["$device_id"] == visitor


async def test_ids_over_the_limit_are_refused_and_memory_stays_flat(proxy_client, upstream):
    client = await proxy_client(**IDENTITY)
    cache = client.services.store._cache  # noqa: SLF001
    await client.post(TRACK, data=b64_body([js_event("Warm", device_id())]), headers=browser(A))
    before = cache.bytes
    huge = "d" * 100_000
    for props in ({"$device_id": huge}, {"distinct_id": f"$device:{huge}"}, {"$anon_distinct_id": f"$device:{huge}"}):
        resp = await client.post(TRACK, data=b64_body([js_event("Huge", device_id(), **props)]), headers=browser(A))
        assert resp.status == 400
        body = await resp.json()
        assert body["status"] == 0 and str(MAX_ID_CHARS) in body["error"] and huge[:200] not in body["error"]
    call = {"type": "track", "event": "Huge", "anonymousId": "a" * (MAX_ID_CHARS + 1), "writeKey": SEG_KEY}
    resp = await client.post("/seg/v1/t", data=orjson.dumps(call), headers={**browser(A), "Content-Type": "text/plain"})
    assert resp.status == 400 and (await resp.json())["success"] is False
    # A server SDK's long id is its own business: forwarded, never looked up or kept.
    resp = await client.post("/mp/track", data=json_body(js_event("Server", huge)), headers=SERVER)
    assert resp.status == 200
    assert cache.bytes == before
    received = await upstream.wait(2, "us", "/track")
    assert [e["event"] for e in received] == ["Warm", "Server"]


# ------------------------------------------------------------ fixation by a link


async def _attackers_link(client: Any) -> tuple[str, str]:
    """An attacker's own identity on A and a /go link carrying it to B."""
    from urllib.parse import quote

    from tests.support import token_of

    cookie = cookie_from(await client.post(TRACK, data=b64_body([js_event("Attacker", device_id())]), headers=browser(A)))
    go = await client.get(f"/mp/go?to={quote(f'http://{B}/offer', safe='')}", headers=browser(A, cookie),
                          allow_redirects=False)
    return canonical_of(cookie), token_of(go.headers["Location"])


async def _victim_on_b(client: Any) -> tuple[str, str]:
    device = device_id()
    cookie = cookie_from(await client.post(TRACK, data=b64_body([js_event("Victim", device)]), headers=browser(B)))
    return cookie, device


async def test_a_link_token_without_a_linked_referrer_does_not_replace_an_identity(proxy_client, upstream, tmp_path):
    from tests.support import land, log_records

    client = await proxy_client(**IDENTITY)
    attacker, token = await _attackers_link(client)
    victim_cookie, device = await _victim_on_b(client)
    victim = canonical_of(victim_cookie)
    url = f"http://{B}/offer?fpb={token}"
    # land.js on the landing page: no referrer (a mail, a chat), or another site's.
    for ref in (None, "https://evil.test/page", "not a url"):
        answer = await land(client, B, token, victim_cookie, ref=None if ref is None else ref.replace(" ", "%20"))
        body = await answer.json()
        assert body["token"] == "refused" and body["id"] == victim, ref
        assert canonical_of(cookie_from(answer)) == victim
    # The SDK's first event on the landing page, with its own referrer (or none).
    for referrer in ({}, {"$referrer": "https://evil.test/"}):
        event = js_event("Landing", device, **{"$current_url": url, **referrer})
        resp = await client.post(TRACK, data=b64_body([event]), headers=browser(B, victim_cookie))
        assert canonical_of(cookie_from(resp)) == victim
    # Segment's analytics.js alike.
    call = {"type": "page", "anonymousId": device_id(), "writeKey": SEG_KEY, "context": {"page": {"url": url}}}
    resp = await client.post("/seg/v1/p", data=orjson.dumps(call),
                             headers={**browser(B, victim_cookie), "Content-Type": "text/plain"})
    assert canonical_of(cookie_from(resp)) == victim
    # A hub token outside hub.js's own round trip (no via=hub) neither.
    hub = client.services.settings.identity.keys.seal(attacker, purpose="hub", audience="site-b.test",
                                                       now=__import__("time").time(), ttl=60)
    event = js_event("Hub landing", device, **{"$current_url": f"http://{B}/?fpb={hub}", "$referrer": f"http://{A}/"})
    resp = await client.post(TRACK, data=b64_body([event]), headers=browser(B, victim_cookie))
    assert canonical_of(cookie_from(resp)) == victim
    events = await upstream.wait(4, "us", "/track")
    assert all(e["properties"]["$device_id"] != attacker for e in events if e["event"] != "Attacker")
    records = await log_records(client, tmp_path)
    refused = [r for r in records if r["outcome"] == "token_refused"]
    assert len(refused) == 7 and all(r["host"] == B for r in refused)
    assert {r["reason"] for r in refused} == {
        "no referrer: the landing navigation did not come from a linked domain",
        "the referrer is not on a linked domain",
        "a hub token outside hub.js's round trip",
    }
    assert not [r for r in records if r["outcome"] == "identity_replaced"]
    assert token not in str(records) and hub not in str(records)


async def test_a_link_from_a_linked_domain_still_replaces_it_and_says_so(proxy_client, upstream, tmp_path):
    from tests.support import land, log_records

    client = await proxy_client(**IDENTITY)
    visitor, token = await _attackers_link(client)  # the same browser's id on A, this time
    cookie_b, _ = await _victim_on_b(client)
    answer = await land(client, B, token, cookie_b)  # came from A's page
    assert (await answer.json())["token"] == "accepted" and canonical_of(cookie_from(answer)) == visitor
    records = await log_records(client, tmp_path)
    [replaced] = [r for r in records if r["outcome"] == "identity_replaced"]
    assert replaced["source"] == "bridge" and replaced["canonical_ids"] == [visitor]
    assert replaced["replaced"] == canonical_of(cookie_b) and replaced["host"] == B


async def test_go_mints_only_for_the_presenting_browsers_own_identity(proxy_client):
    import time
    from urllib.parse import quote

    from tests.support import token_of

    client = await proxy_client(**IDENTITY)
    victim = device_id()
    keys = client.services.settings.identity.keys
    target = quote(f"http://{B}/", safe="")
    for jar in (f"ajs_anonymous_id={victim}", f"fp_id={victim}.forgedforgedforgedforge", f"ajs_anonymous_id=%22{victim}%22"):
        go = await client.get(f"/mp/go?to={target}", headers={**browser(A), "Cookie": jar}, allow_redirects=False)
        claims = keys.open(token_of(go.headers["Location"]), purpose="bridge", audience="site-b.test", now=time.time())
        assert claims.canonical_id != victim and valid_id(claims.canonical_id)
        bridge = await client.post("/mp/bridge", json={"to": f"http://{B}/"},
                                   headers={**browser(A), "Cookie": jar, "Content-Type": "application/json"})
        claims = keys.open((await bridge.json())["token"], purpose="bridge", audience="site-b.test", now=time.time())
        assert claims.canonical_id != victim


async def test_links_to_http_targets_need_cookie_secure_off(proxy_client):
    linked = {"identity": {"linked_domains": [".site-a.test", ".site-b.test"]}}
    client = await proxy_client(**linked)  # cookie.secure on, the default
    go = await client.get(f"/mp/go?to=http%3A%2F%2F{B}%2F", headers=browser(A), allow_redirects=False)
    assert go.status == 400 and "https" in await go.text()
    go = await client.get(f"/mp/go?to=https%3A%2F%2F{B}%2F", headers=browser(A), allow_redirects=False)
    assert go.status == 302 and go.headers["Location"].startswith(f"https://{B}/?fpb=")


async def test_a_refusal_token_opts_out_only_the_first_browser(proxy_client, upstream):
    import time

    from tests.support import land

    client = await proxy_client(**IDENTITY)
    token = client.services.settings.identity.keys.seal(
        str(uuid.uuid4()), purpose="bridge", audience="site-b.test", now=time.time(), ttl=60, consent="denied")
    first = await land(client, B, token)
    assert (await first.json())["reason"] == "token"
    assert any(h.startswith("fp_optout=") for h in first.headers.getall("Set-Cookie", []))
    # The same token in a second browser's landing URL refuses nothing for it.
    event = js_event("Second browser", device_id(), **{"$current_url": f"http://{B}/?fpb={token}"})
    resp = await client.post(TRACK, data=b64_body([event]), headers=browser(B))
    assert resp.status == 200 and cookie_from(resp) is not None
    [sent] = await upstream.wait(1, "us", "/track")
    assert sent["event"] == "Second browser" and "fpb=" not in sent["properties"]["$current_url"]


# ---------------------------------------------------------------- quiet, escaped logs


async def test_a_flood_of_client_triggered_warnings_writes_one_line(proxy_client, caplog):
    import logging

    limits = {**IDENTITY["identity"], "max_devices_per_id": 1}
    client = await proxy_client(**{**IDENTITY, "identity": limits})
    cookie = cookie_from(await client.post(TRACK, data=b64_body([js_event("First", device_id())]), headers=browser(A)))
    caplog.set_level(logging.INFO, logger="proxy")
    for i in range(300):  # 300 device ids for one canonical id, each on its own subdomain
        event = js_event("Probe", f"forged-{i:04d}-CRITICAL")
        resp = await client.post(TRACK, data=b64_body([event]), headers=browser(f"s{i}.site-a.test", cookie))
        assert resp.status == 200
    lines = [r for r in caplog.records if r.name.startswith("proxy.services.resolver")]
    assert len(lines) == 1 and "max_devices_per_id" in lines[0].getMessage()


def test_the_process_log_escapes_what_a_client_sent():
    import logging

    from proxy.lograte import EscapingFormatter

    formatter = EscapingFormatter("%(levelname)s %(message)s")
    forged = "evil.test\n2026-12-07 10:00:00 CRITICAL proxy: admin logged in\x1b[2J\u202egnp.exe"
    record = logging.LogRecord("proxy", logging.INFO, __file__, 1, "token refused on %s", (forged,), None)
    text = formatter.format(record)
    assert "\n" not in text and "\x1b" not in text and "\u202e" not in text
    assert "\\x0a2026-12-07" in text and "\\x1b[2J" in text and "\\u202e" in text


def test_firstparty_logs_escapes_event_names_and_ids(tmp_path, capsys):
    from proxy.cli import main

    record = {"time": 1.0, "outcome": "forwarded", "route": "track", "region": "us", "status": 200, "count": 1,
              "events": ["Buy\x1b]0;pwned\x07\nFAKE forwarded", "ok"], "canonical_ids": ["c\u202e1"],
              "rewrites": [{"field": "$device_id", "from": "a\rb", "to": "c"}], "reason": "r\x9bx"}
    path = tmp_path / "forwarded.jsonl"
    path.write_bytes(orjson.dumps(record) + b"\n")
    assert main(["logs", "--file", str(path)]) == 0
    out = capsys.readouterr().out
    assert not any(ch in out for ch in "\x1b\x07\r\u202e\x9b")
    assert "\\x1b]0;pwned\\x07\\x0aFAKE" in out
    assert [line for line in out.splitlines() if not line.startswith("    ")] == [out.splitlines()[0]]  # one record, one head line


# ---------------------------------------------------------------- the ops listener


@pytest.mark.parametrize("path", ["/metrics", "/live", "/live/events", "/readyz"])
async def test_the_ops_listener_refuses_a_foreign_host_or_site(proxy_client, path):
    client = await proxy_client(ops={"hosts": ["ops.internal"]})
    base = f"http://127.0.0.1:{client.ops.port}"

    async def status(**headers: str) -> int:
        async with client.session.get(base + path, headers=headers, timeout=5) as resp:
            if resp.status == 200 and path == "/live/events":
                return 200  # a stream: its head is enough
            await resp.read()
            return resp.status

    # A DNS-rebinding page names its own domain, which resolves to 127.0.0.1.
    assert await status(Host="rebind.attacker.test") == 403
    assert await status(Host="rebind.attacker.test:8001") == 403
    # Another site's page reaching it by IP: its browser says so.
    assert await status(Host="127.0.0.1", **{"Sec-Fetch-Site": "cross-site"}) == 403
    assert await status(Host="127.0.0.1", Origin="http://rebind.attacker.test") == 403
    # Operators: by address, localhost or a configured name; the page's own script.
    for host in ("127.0.0.1", f"127.0.0.1:{client.ops.port}", "localhost", "[::1]", "ops.internal"):
        assert await status(Host=host) == 200, host
    assert await status(Host="localhost", Origin=f"http://localhost:{client.ops.port}",
                        **{"Sec-Fetch-Site": "same-origin"}) == 200


# ---------------------------------------------------------------- bounded input


async def test_a_body_of_millions_of_values_is_refused_before_it_is_parsed(proxy_client, upstream, monkeypatch):
    """Uncompressed, within ``max_body_bytes``: counted (in C) before any parse,
    so it never holds the event loop for the parse of millions of values."""
    import types
    from urllib.parse import quote

    import orjson as real

    from proxy.core import codec

    parsed = []

    def loads(raw):  # the real parser, for what the count lets through
        assert raw.count(b"," if isinstance(raw, bytes) else ",") <= codec.MAX_SEPARATORS, "parsed a flood"
        parsed.append(len(raw))
        assert len(parsed) <= codec.MAX_EVENTS, "parsed a flood of lines"
        return real.loads(raw)

    monkeypatch.setattr(codec, "orjson", types.SimpleNamespace(loads=loads, JSONDecodeError=real.JSONDecodeError,
                                                               dumps=real.dumps))
    client = await proxy_client(**IDENTITY)
    flood = b"[" + b"{}," * 2_500_000 + b"{}]"  # 7.5 MB
    form = b"data=" + quote(flood.decode(), safe="[]{},").encode()
    lines = b"{}\n" * 2_500_000
    for path, body, ctype in (("/mp/track/?verbose=1", form, "application/x-www-form-urlencoded"),
                              ("/mp/import?verbose=1", flood, "application/json"),
                              ("/mp/import?verbose=1", lines, "application/x-ndjson")):
        resp = await client.post(path, data=body, headers={**SERVER, "Content-Type": ctype})
        assert resp.status == 400, await resp.text()
        assert "too many" in (await resp.json())["error"] and parsed == []
    # A large batch of real events is still parsed and forwarded.
    events = [js_event("Big", device_id(), blob="x" * 200) for _ in range(1500)]
    resp = await client.post("/mp/import?verbose=1", data=orjson.dumps(events), headers={**SERVER, "Content-Type": "application/json"})
    assert resp.status == 200, await resp.text()


async def test_a_gzip_bomb_is_refused_before_it_is_parsed(proxy_client, upstream):
    import base64
    import gzip

    from proxy.core import codec
    from proxy.errors import PayloadTooLarge

    client = await proxy_client(**IDENTITY)
    bomb = gzip.compress(b"[" + b"{}," * 3_000_000 + b"{}]")  # ~9 KB that inflate to 9 MB
    assert len(bomb) < 20_000
    # The inflater stops at 100 times the compressed size: no 9 MB string, no parse.
    with pytest.raises(PayloadTooLarge):
        codec.decompress(bomb, "gzip", 10 << 20)
    headers = {**SERVER, "Content-Encoding": "gzip", "Content-Type": "application/json"}
    seg = {**headers, "Authorization": "Basic " + base64.b64encode(f"{SEG_KEY}:".encode()).decode()}
    for _ in range(5):
        resp = await client.post("/mp/import?verbose=1", data=bomb, headers=headers)
        assert resp.status == 413 and "larger than" in (await resp.json())["error"]
        resp = await client.post("/seg/v1/batch", data=bomb, headers=seg)
        assert resp.status == 413 and (await resp.json())["success"] is False
    # A gzip of real events still goes through.
    events = [js_event("Zipped", device_id()) for _ in range(50)]
    resp = await client.post("/mp/track", data=gzip.compress(orjson.dumps(events)),
                             headers={**SERVER, "Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert resp.status == 200
    assert len(await upstream.wait(50, "us", "/track")) == 50


async def test_a_deep_segment_body_is_a_400(proxy_client):
    client = await proxy_client()
    deep: Any = "x"
    for _ in range(300):
        deep = {"n": deep}
    call = {"type": "track", "event": "Deep", "anonymousId": device_id(), "writeKey": SEG_KEY, "properties": deep}
    resp = await client.post("/seg/v1/t", data=__import__("json").dumps(call), headers={**browser(A), "Content-Type": "text/plain"})
    assert resp.status == 400 and "nested deeper" in (await resp.json())["message"]


# ---------------------------------------------------------------- private files


async def test_the_data_directory_and_its_files_are_private(proxy_client, upstream, tmp_path):
    import os
    import stat

    from proxy import doctor
    from proxy.files import write_private

    client = await proxy_client(delivery={"mode": "spool"})
    await client.post(TRACK, data=b64_body([js_event("Private", device_id())]), headers=browser(A))
    await upstream.wait(1, "us", "/track")
    await client.close()  # the forwarded log written
    data = tmp_path / "data"
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in data.iterdir() if p.is_file()}
    assert {"identity_keys", "spool.sqlite3", "forwarded.jsonl"} <= set(files)
    assert set(files.values()) == {0o600}, files
    # A temporary left lying (or planted as a link) is never reused.
    target = tmp_path / "elsewhere"
    target.write_text("not yours")
    os.symlink(target, data / "api_keys.tmp")
    write_private(data / "api_keys", "k v\n")
    assert target.read_text() == "not yours" and stat.S_IMODE((data / "api_keys").stat().st_mode) == 0o600
    # firstparty check names a loose mode.
    os.chmod(data, 0o755)
    found = doctor.findings(doctor.Context(client.services.settings))
    assert any(f.where == "server.data_dir" and "chmod 700" in f.fix for f in found)


def test_a_forwarded_log_record_is_bounded(tmp_path):
    from proxy.services.forwardlog import MAX_FIELD_CHARS, MAX_RECORD_BYTES, ForwardedLog

    log = ForwardedLog(tmp_path / "f.jsonl", max_bytes=1 << 20, backups=1)
    log.open()
    log.record({"outcome": "forwarded", "events": ["e" * 1_000_000] * 50, "project": "p" * 100_000})
    log.record({"outcome": "forwarded", "events": ["Small"], "project": "token"})
    log.flush()
    big, small = (tmp_path / "f.jsonl").read_bytes().splitlines()
    assert len(big) < MAX_RECORD_BYTES and orjson.loads(big)["project"] == "p" * MAX_FIELD_CHARS + "\u2026"
    assert orjson.loads(small) == {"outcome": "forwarded", "events": ["Small"], "project": "token"}


# ---------------------------------------------------------------- odd targets


@pytest.mark.parametrize("to", ["http://checkout.site-b.test/\u202egnp.exe", "http://checkout.site-b.test/%7F",
                                "http://checkout.site-b.test/\x7f", "http://checkout.site-b.test:99999/",
                                "http://[::1/", "http://checkout.site-b.test/\ud800"])
async def test_odd_link_targets_answer_4xx_never_5xx(proxy_client, to):
    from urllib.parse import quote

    client = await proxy_client(**IDENTITY)
    resp = await client.get("/mp/go?to=" + quote(to, safe="", errors="surrogatepass"), headers=browser(A),
                            allow_redirects=False)
    assert resp.status in (302, 400), (to, resp.status, await resp.text())
    if resp.status == 302:
        location = resp.headers["Location"]
        assert location.isascii() and all(ord(c) > 32 and ord(c) != 127 for c in location), location


async def test_the_flags_path_goes_upstream_as_one_segment(proxy_client, upstream):
    client = await proxy_client(**IDENTITY)
    query = "?context=%7B%7D&token=test-token-us"
    for raw in ("abc%3Fdistinct_id%3Devil", "a%20b"):
        resp = await client.get(f"/mp/flags/{raw}/first-time-events{query}", headers=browser(A))
        assert resp.status == 200, raw
    got = [r for r in upstream.requests if "first-time-events" in r.path]
    assert [r.path for r in got] == ["/flags/abc?distinct_id=evil/first-time-events", "/flags/a b/first-time-events"]
    assert all(dict(r.query) == {"context": "{}", "token": "test-token-us"} for r in got)  # nothing injected
    for walk in ("%2e%2e", "..", "x%2Fy"):
        resp = await client.get(f"/mp/flags/{walk}/first-time-events{query}", headers=browser(A))
        assert resp.status in (400, 404)
    assert len([r for r in upstream.requests if "first-time-events" in r.path]) == 2


async def test_the_server_header_names_no_versions(proxy_client):
    client = await proxy_client()
    for resp in (await client.get("/healthz"), await client.get("/nowhere"), await client.ops_get("/metrics"),
                 await client.post(TRACK, data="data=%%%", headers=browser(A))):
        assert resp.headers["Server"] == "firstparty", resp.headers.get("Server")


async def test_aiohttps_own_error_answers_name_no_versions(proxy_client):
    """A request aiohttp cannot parse never reaches the app (no signal runs): its
    400 must not say ``Python/3.x aiohttp/3.y`` either."""
    import asyncio

    client = await proxy_client()
    for raw in (b"GET /\x01bad HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"):
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        writer.write(raw)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        head = answer.split(b"\r\n\r\n", 1)[0].lower()
        assert head.startswith((b"http/1.0 400", b"http/1.1 400")), answer[:200]
        assert b"\r\nserver: firstparty" in head and b"aiohttp" not in head and b"python" not in head, head


async def test_no_token_in_any_field_upstream(proxy_client, upstream):
    from tests.support import go_to_b, token_of

    client = await proxy_client(**IDENTITY)
    cookie = cookie_from(await client.post(TRACK, data=b64_body([js_event("A", device_id())]), headers=browser(A)))
    token = token_of(await go_to_b(client, cookie))
    url = f"http://{B}/offer?fpb={token}&x=1"
    nested = {"page": {"copies": [url, {"deep": f"fpb={token}"}]}, "search": f"?fpb={token}"}
    event = js_event("Landing", device_id(), **{"$current_url": url, "$referrer": f"http://{A}/", "site": nested})
    await client.post(TRACK, data=b64_body([event]), headers=browser(B))
    profile = {"$token": "test-token-us", "$distinct_id": device_id(), "$set": {"landing": url, "list": [url]}}
    await client.post("/mp/engage/?verbose=1", data=b64_body([profile]), headers=browser(B))
    call = {"type": "page", "anonymousId": device_id(), "writeKey": SEG_KEY, "properties": {"referrer": url, "x": [url]},
            "context": {"page": {"url": url, "referrer": url, "search": f"?fpb={token}"}, "campaign": {"content": url}}}
    await client.post("/seg/v1/p", data=orjson.dumps(call), headers={**browser(B), "Content-Type": "text/plain"})
    await upstream.wait(2, "us", "/track")
    await upstream.wait(1, "us", "/engage")
    from tests.support import eventually

    await eventually(lambda: upstream.by("seg-us"), 10, "the Segment call")
    for request in upstream.requests:
        assert token not in request.body.decode("latin-1") and "fpb=" not in str(request.events()), request.path
    [seg] = [c for r in upstream.by("seg-us") for c in r.events()]
    assert seg["context"]["page"]["referrer"] == f"http://{B}/offer?x=1" and seg["properties"]["x"] == [f"http://{B}/offer?x=1"]


async def test_only_listed_projects_and_write_keys_are_relayed(proxy_client, upstream):
    import base64

    listed = {"upstream": {"projects": {"test-token-us": "us"}, "only_listed": True},
              "segment": {"write_keys": {SEG_KEY: "us"}, "only_listed": True}}
    client = await proxy_client(**listed)
    ok = js_event("Ours", device_id())
    foreign = js_event("Relay", device_id(), token="someone-elses-token")
    assert (await client.post(TRACK, data=b64_body([ok]), headers=browser(A))).status == 200
    for batch in ([foreign], [ok, foreign]):
        resp = await client.post(TRACK, data=b64_body(batch), headers=browser(A))
        assert resp.status == 400 and "only_listed" in (await resp.json())["error"]
    call = {"type": "track", "event": "Relay", "anonymousId": device_id(), "writeKey": "foreign-key"}
    resp = await client.post("/seg/v1/t", data=orjson.dumps(call), headers={**browser(A), "Content-Type": "text/plain"})
    assert resp.status == 400 and (await resp.json())["success"] is False
    auth = {"Authorization": "Basic " + base64.b64encode(b"someone-elses-token:").decode()}
    resp = await client.get("/mp/flags/?context=%7B%7D", headers={**browser(A), **auth})
    assert resp.status == 400
    resp = await client.get("/mp/flags/?context=%7B%7D&token=test-token-us", headers=browser(A))
    assert resp.status == 200
    [sent] = await upstream.wait(1, "us", "/track")
    assert sent["event"] == "Ours" and not upstream.by("seg-us")


def test_only_listed_needs_a_list(tmp_path):
    from proxy.errors import ConfigError
    from proxy.settings import build_settings

    for section, key in (("upstream", "upstream.only_listed"), ("segment", "segment.only_listed")):
        with pytest.raises(ConfigError) as err:
            build_settings({"server": {"data_dir": str(tmp_path)}, section: {"only_listed": True}}, {})
        assert err.value.key == key


def test_the_old_entry_bound_names_its_replacement(tmp_path):
    from proxy.errors import ConfigError
    from proxy.settings import build_settings

    with pytest.raises(ConfigError) as err:
        build_settings({"server": {"data_dir": str(tmp_path)}, "store": {"max_entries": 1000}}, {})
    assert err.value.key == "store.max_entries" and "store.max_memory_mb" in str(err.value)
    assert build_settings({"server": {"data_dir": str(tmp_path)}, "store": {"max_memory_mb": 4}}, {}).store.max_bytes == 4 << 20


async def test_a_cookie_tossed_with_a_longer_path_does_not_win(proxy_client, upstream):
    """A sibling subdomain sets fp_id (its owner's own valid value) for the parent
    domain with Path=/mp: browsers send it before ours. Ours (Path=/) still wins."""
    client = await proxy_client(**IDENTITY)
    victim_cookie = cookie_from(await client.post(TRACK, data=b64_body([js_event("V", device_id())]), headers=browser(A)))
    attacker_cookie = cookie_from(await client.post(TRACK, data=b64_body([js_event("X", device_id())]), headers=browser(A)))
    device = device_id()
    headers = {**browser("shop.site-a.test"), "Cookie": f"fp_id={attacker_cookie}; fp_id={victim_cookie}"}
    resp = await client.post(TRACK, data=b64_body([js_event("Shop", device)]), headers=headers)
    assert canonical_of(cookie_from(resp)) == canonical_of(victim_cookie)
    events = await upstream.wait(3, "us", "/track")
    assert next(e for e in events if e["event"] == "Shop")["properties"]["$device_id"] == canonical_of(victim_cookie)


async def test_a_client_cannot_pick_its_ip_with_a_forwarded_for_line_of_its_own(proxy_client, upstream, delivery_mode):
    """X-Forwarded-For in two lines (RFC 9110 5.3: the same as one, joined in
    order): a trusted proxy that adds its own line beside the client's
    (HAProxy's ``option forwardfor``) is read as one that appends to it."""
    client = await proxy_client(server={"trusted_proxies": ["127.0.0.1/32"]})  # the proxy in front is 127.0.0.1
    headers = CIMultiDict({**BROWSER, "Content-Type": "application/x-www-form-urlencoded"})
    headers.add("X-Forwarded-For", "6.6.6.6")  # the visitor's own line, passed on
    headers.add("X-Forwarded-For", "198.51.100.7")  # the trusted proxy's: the real peer
    await client.post("/mp/track/?verbose=1&ip=1", data=b64_body([js_event("x", device_id())]), headers=headers)
    await upstream.wait(1)
    rec = upstream.requests[-1]
    ip = rec.headers["x-real-ip"] if delivery_mode == "sync" else rec.events()[-1]["properties"]["ip"]
    assert ip == "198.51.100.7", f"the vendor was told the spoofed {ip}"


def navigation_from(site: str, host: str, cookie: str | None) -> dict[str, str]:
    """What a browser sends on a top-level navigation that a page of ``site`` started."""
    headers = {"Host": host, "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/120", "Sec-Fetch-Site": "cross-site",
               "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document", "Referer": f"https://{site}/"}
    if cookie:
        headers["Cookie"] = f"fp_id={cookie}"
    return headers


async def test_a_hostile_page_cannot_fix_a_visitors_identity_by_navigating_to_an_endpoint(proxy_client, upstream):
    """evil.test sends the victim's browser to B's event endpoint with the
    attacker's own link token and an event whose ``$referrer`` names A: a
    top-level GET carries the victim's Lax cookie and takes the answer's."""
    client = await proxy_client(**IDENTITY)
    attacker_cookie = await visit_a(client)
    attacker = canonical_of(attacker_cookie)
    token = token_of(await go_to_b(client, attacker_cookie))
    victim_cookie = cookie_from(await client.post(TRACK, data=b64_body([js_event("Victim", device_id())]), headers=browser(B)))
    victim = canonical_of(victim_cookie)
    assert victim != attacker
    forged = b64_body([js_event("x", device_id(), **{"$referrer": f"http://{A}/"})])
    sent_before = len(upstream.requests)
    resp = await client.get(f"/mp/track?fpb={token}&verbose=1&{forged}", headers=navigation_from("evil.test", B, victim_cookie))
    # An SDK never navigates: refused, nothing used, no cookie.
    assert resp.status == 400 and cookie_from(resp) is None
    assert "navigation" in (await resp.json())["error"]
    # An engine without Fetch Metadata: the same GET says only where it came from.
    old = {k: v for k, v in navigation_from("evil.test", B, victim_cookie).items() if not k.startswith("Sec-Fetch")}
    resp = await client.get(f"/mp/track?fpb={token}&verbose=1&{forged}", headers=old)
    assert resp.status == 200
    new_cookie = cookie_from(resp)
    # Neither the token nor a device id it shows changes the visitor's identity.
    assert new_cookie is None or canonical_of(new_cookie) == victim
    await upstream.wait(sent_before + 1)
    sent = upstream.requests[-1].events()[-1]["properties"]
    assert attacker not in str(sent)
    # The same token from B's own page (its script, after the link from A) still links.
    own = {**browser(B, victim_cookie), "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}
    resp = await client.post(f"{TRACK}&fpb={token}", data=forged, headers=own)
    assert canonical_of(cookie_from(resp)) == attacker


@pytest.mark.parametrize(("headers", "expected"), [
    ({"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}, True),
    ({"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "no-cors"}, True),  # a beacon from a sibling subdomain
    ({"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors", "Origin": f"http://{A}"}, False),  # Fetch Metadata decides
    ({"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "navigate"}, False),  # an SDK never navigates
    ({"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate"}, False),  # a typed or bookmarked URL
    ({"Origin": f"http://{B}"}, True),  # no Fetch Metadata (an older engine): the Origin, the host itself
    ({"Origin": f"https://{A}"}, True),  # or on one of the site's own domains
    ({"Origin": "https://evil.test"}, False),
    ({"Origin": "null"}, False),
    ({"Referer": f"http://{B}/checkout"}, True),  # a GET without Origin: the Referer
    ({"Referer": "https://evil.test/"}, False),
    ({}, False),  # nothing says where it came from
])
def test_a_request_is_from_an_own_page_only_when_the_browser_says_so(headers, expected):
    from proxy.core.bridge import from_own_page

    assert from_own_page({k.lower(): v for k, v in headers.items()}, (".site-a.test",), B) is expected


SERVER = {"User-Agent": "python-requests/2.31", "Content-Type": "application/x-www-form-urlencoded"}


async def test_a_browser_cannot_make_a_users_server_events_follow_its_identity(proxy_client, upstream):
    """Any browser can make any string one of its anonymous ids
    (``$anon_distinct_id: "$device:<it>"``), and so an alias of its own
    identity. A server's events for user ``100000042`` must not follow it:
    an identified ``distinct_id`` is never rewritten."""
    client = await proxy_client()
    victim_user = "100000042"  # the victim's id in the site's database
    probe = js_event("Probe", device_id(), **{"$anon_distinct_id": f"$device:{victim_user}"})
    attacker = canonical_of(cookie_from(await client.post(TRACK, data=b64_body([probe]), headers=browser(A))))
    purchase = {"event": "Purchase", "properties": {"token": TOKEN, "distinct_id": victim_user, "amount": 99}}
    profile = [{"$token": TOKEN, "$distinct_id": victim_user, "$set": {"plan": "pro"}}]
    assert (await client.post("/mp/track", data=json_body(purchase), headers=SERVER)).status == 200
    assert (await client.post("/mp/engage", data=json_body(profile), headers=SERVER)).status == 200
    events = await upstream.wait(2, "us", "/track")
    sent = next(e for e in events if e["event"] == "Purchase")["properties"]
    assert sent["distinct_id"] == victim_user, f"rewritten to the browser's {attacker}"
    [update] = await upstream.wait(1, "us", "/engage")
    assert update["$distinct_id"] == victim_user


@pytest.mark.parametrize(("value", "expected"), [
    (str(uuid.uuid4()), True),  # crypto.randomUUID, analytics.js
    ("18c5d3a0e1b2c4-0f1e2d3c4b5a69-26001d51-1fa400-18c5d3a0e1b2c4", True),  # mixpanel-js's older ids
    ("100000042", False),  # a database id
    ("user-42-account", False),
    ("deadbeef" * 3, False),  # 24 digits: too few for a generated id
    ("-" * 40, False),
])
def test_only_an_id_shaped_as_an_sdks_device_id_counts_as_one(value, expected):
    from proxy.core.ids import generated

    assert generated(value) is expected


def test_a_merge_never_rewrites_a_persons_id_in_its_list():
    from proxy.protocols.mixpanel import rewrite

    device = str(uuid.uuid4())
    merge = {"event": "$merge", "properties": {"$distinct_ids": ["100000042", f"$device:{device}", device]}}
    rewrite("import", merge, {"100000042": "attacker-canonical", device: "canonical-1"})
    assert merge["properties"]["$distinct_ids"] == ["100000042", "$device:canonical-1", "canonical-1"]


def flood_batch(n: int) -> list[dict[str, Any]]:
    """A reset() in the batch, then one device naming ``n`` fresh anonymous ids."""
    first = {"event": "a", "properties": {"token": "test-token-us", "$device_id": device_id()}}
    d2 = device_id()
    rest = [{"event": "b", "properties": {"token": "test-token-us", "$device_id": d2, "distinct_id": f"$device:{uuid.uuid4()}"}}
            for _ in range(n)]
    return [first, *rest]


async def test_a_flood_of_fresh_ids_neither_evicts_a_tokens_claim_nor_joins_past_the_cap(proxy_client, upstream):
    """The memory store evicts its oldest entries when full: a token's claim
    among them would make a spent token redeemable again by whoever saw it."""
    from tests.support import land

    sections = copy.deepcopy(IDENTITY)
    sections["store"] = {"max_memory_mb": 1}
    client = await proxy_client(**sections)
    visitor_cookie = await visit_a(client)
    visitor = canonical_of(visitor_cookie)
    token = token_of(await go_to_b(client, visitor_cookie))
    assert (await (await land(client, B, token)).json())["token"] == "accepted"
    assert (await (await land(client, B, token)).json())["token"] == "refused"
    store = client.services.store
    for _ in range(4):  # about 2 MB of fresh ids, twice the store's bound
        assert (await client.post(TRACK, data=b64_body(flood_batch(1999)), headers=browser(A))).status == 200
    body = await (await land(client, B, token)).json()
    assert body["token"] == "refused" and body["id"] != visitor
    # The second identity of each batch joined no more ids than the cap allows.
    cap = client.services.settings.identity.max_devices_per_id
    assert store._memory.bytes < 4 * (cap + 2) * 400  # noqa: SLF001


async def test_past_the_most_live_claims_kept_a_token_is_refused_not_forgotten(monkeypatch):
    from proxy.services import store as store_module

    monkeypatch.setattr(store_module, "MAX_CLAIMS", 2)
    store = AliasStore(BoundedMemoryCache(1 << 20, timeout=None))
    assert await store.claim_token("token-0001", "owner-a", 60) is None
    assert await store.claim_token("token-0002", "owner-b", 60) is None
    assert await store.claim_token("token-0003", "owner-c", 60) == "?"  # refused: counts as another's
    assert await store.claim_token("token-0001", "owner-z", 60) == "owner-a"  # still spent
    assert await store.claim_token("token-0001", "owner-a", -120) == "owner-a"
    store._claims["claim/token-0002"] = "owner-b|1"  # noqa: SLF001 - expired long ago: its room is taken back
    assert await store.claim_token("token-0005", "owner-e", 60) == "?"  # one walk over them a second, at most
    store._claims_pruned_at = 0  # noqa: SLF001 - and a second has passed since the last walk over them
    assert await store.claim_token("token-0004", "owner-d", 60) is None
