"""Second-order contracts: promises no high-stakes test would notice breaking
(the events still arrive), each asserted once here. A review broke 28 lines
outside ``core/`` and found these caught nowhere."""

from __future__ import annotations

import copy
import sqlite3
from typing import Any
from urllib.parse import quote

import orjson

from proxy.services.store import AliasStore

from proxy.web.app import create_app
from tests.conftest import BROWSER, SEG_KEY, TOKEN, b64_body, cookie_from, device_id, js_event, make_settings
from tests.support import eventually

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
LINKED = {
    "cookie": {"domains": [".example.com", ".site-b.test"]},
    "identity": {"linked_domains": [".example.com", ".site-b.test"], "hub_url": "https://hub.id-hub.test"},
}


async def test_every_answer_that_sets_the_identity_cookie_is_private(proxy_client: Any) -> None:
    """A shared cache must never hand one visitor's cookie to another: every
    answer carrying ``Set-Cookie: fp_id`` says ``Cache-Control: private, no-store``."""
    client = await proxy_client(**copy.deepcopy(LINKED))
    device = device_id()
    seg = {"type": "track", "event": "S", "anonymousId": device_id(), "writeKey": SEG_KEY}
    answers = [
        await client.post("/mp/track/?ip=1", data=b64_body([js_event("A", device)]), headers={**BROWSER, **FORM}),
        await client.post("/mp/engage/", data=b64_body([{"$token": TOKEN, "$distinct_id": f"$device:{device}",
                                                          "$device_id": device, "$set": {"a": 1}}]),
                          headers={**BROWSER, **FORM}),
        await client.post("/seg/v1/t", data=orjson.dumps(seg), headers={**BROWSER, "Content-Type": "text/plain"}),
        await client.get("/mp/id", headers=BROWSER),
        await client.get(f"/mp/go?to={quote('https://www.site-b.test/', safe='')}", headers=BROWSER,
                         allow_redirects=False),
        await client.post("/mp/bridge", json={"to": "https://www.site-b.test/"}, headers=BROWSER),
        await client.get(f"/mp/decide/?distinct_id=$device:{device}&token={TOKEN}", headers=BROWSER),
    ]
    with_cookie = [a for a in answers if cookie_from(a)]
    assert len(with_cookie) == len(answers), [a.url.path for a in answers if not cookie_from(a)]
    for a in with_cookie:
        directives = {d.strip() for d in a.headers.get("Cache-Control", "").split(",")}
        assert {"private", "no-store"} <= directives, (a.url.path, a.headers.get("Cache-Control"))


async def test_production_cookies_are_secure_and_http_only(proxy_client: Any) -> None:
    """Under the default ``cookie.secure``: the identity cookie and the hub's
    own cookie are ``Secure`` and ``HttpOnly`` (every hub test runs on http)."""
    client = await proxy_client(**copy.deepcopy(LINKED))
    track = await client.post("/mp/track/", data=b64_body([js_event("A", device_id())]), headers={**BROWSER, **FORM})
    hub = await client.get(f"/hub/resolve?return={quote('https://www.example.com/a', safe='')}",
                           headers={**BROWSER, "Host": "hub.id-hub.test"}, allow_redirects=False)
    assert hub.status == 302
    for answer, name in ((track, "fp_id"), (hub, "fp_hub")):
        (header,) = [h for h in answer.headers.getall("Set-Cookie") if h.split("=", 1)[0] == name] or [""]
        attributes = {part.strip().split("=")[0].lower() for part in header.split(";")[1:]}
        assert {"secure", "httponly"} <= attributes, header


async def test_the_first_alias_written_wins_unless_repointed(store: AliasStore) -> None:
    device, first, second = device_id(), device_id(), device_id()
    await store.add_aliases({device: first})
    await store.add_aliases({device: second})
    assert (await store.aliases([device])) == {device: first}
    await store.add_aliases({device: second}, repoint=True)  # a proven request moves it
    assert (await store.aliases([device])) == {device: second}


async def test_shutdown_drains_what_is_queued_when_the_upstream_is_up(serve_proxy: Any, tmp_path: Any, upstream: Any) -> None:
    """Events still waiting for their batch window go out at shutdown, and
    leave the spool: the next start has nothing to send twice."""
    settings = make_settings(tmp_path, upstream, delivery={"mode": "spool", "batch_window_ms": 60_000, "drain_seconds": 5})
    client = await serve_proxy(create_app(settings))
    sent = []
    for _ in range(3):
        events = [js_event("Late", device_id()) for _ in range(4)]
        resp = await client.post("/mp/track/", data=b64_body(events), headers={**BROWSER, **FORM})
        assert resp.status == 200
        sent += [e["properties"]["$insert_id"] for e in events]
    assert upstream.received("us", "/track") == []  # the window holds them
    await client.close()
    assert sorted(e["properties"]["$insert_id"] for e in upstream.received("us", "/track")) == sorted(sent)
    with sqlite3.connect(tmp_path / "data" / "spool.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM queue").fetchone() == (0,)


async def test_a_dead_letter_is_in_the_forwarded_log_with_its_reason_and_detail(
    serve_proxy: Any, tmp_path: Any, upstream: Any
) -> None:
    settings = make_settings(tmp_path, upstream, delivery={"mode": "spool"})
    client = await serve_proxy(create_app(settings))
    event = js_event("Refused", device_id())
    body = {"code": 400, "status": "Bad Request", "num_records_imported": 0,
            "failed_records": [{"index": 0, "$insert_id": event["properties"]["$insert_id"], "field": "properties.time",
                                "message": "'properties.time' is invalid"}]}
    upstream.script.append((400, orjson.dumps(body), {"Content-Type": "application/json"}))
    resp = await client.post("/mp/track/", data=b64_body([event]), headers={**BROWSER, **FORM})
    assert resp.status == 200
    path = tmp_path / "data" / "forwarded.jsonl"

    def letters() -> list[dict[str, Any]]:
        lines = path.read_bytes().splitlines() if path.exists() else []
        return [r for r in map(orjson.loads, lines) if r["outcome"] == "dead_letter"]

    await eventually(lambda: letters(), 10, "the dead letter's record")
    (record,) = letters()
    assert (record["reason"], record["events"], record["insert_ids"]) == (
        "rejected", ["Refused"], [event["properties"]["$insert_id"]])
    assert "'properties.time' is invalid" in record["detail"] and record["status"] == 400
    await client.close()


async def test_every_route_of_the_main_listener_is_known_to_the_edge(proxy_client: Any) -> None:
    """A route added without its ``Spec`` would answer without CORS, without
    shedding and with aiohttp's own 500 for a refused body: only the hub's
    navigations and the load balancer's probe pass the edge untouched."""
    from proxy.web.app import EDGE

    client = await proxy_client(**copy.deepcopy(LINKED))
    edge = client.app[EDGE]
    bare = {r.resource.canonical for r in client.app.router.routes() if r not in edge.specs}
    assert bare == {"/hub/resolve", "/hub/ping", "/healthz"}
    sheds = {r.resource.canonical for r, spec in edge.specs.items() if spec.sheds}
    assert {"/mp/track/", "/mp/engage", "/seg/v1/t", "/seg/v1/batch"} <= sheds
    assert not any(p.startswith(("/mp/go", "/mp/id", "/mp/decide", "/mp/record")) for p in sheds)


async def test_a_refused_body_is_answered_in_the_routes_shape_with_cors(proxy_client: Any) -> None:
    """The edge answers a body a handler refused: Mixpanel's verbose shape on
    Mixpanel's routes (so the page can read why), Segment's on Segment's, ours
    on the bridge, each with the CORS headers of an allowed origin."""
    client = await proxy_client(server={"max_body_bytes": 2048})
    big = b"data=" + b"A" * 4096
    mp = await client.post("/mp/track/?verbose=1", data=big, headers={**BROWSER, **FORM})
    assert mp.status == 413
    assert (await mp.json())["status"] == 0 and "larger than 2048" in (await mp.json())["error"]
    assert mp.headers["Access-Control-Allow-Origin"] == BROWSER["Origin"]
    seg = await client.post("/seg/v1/t", data=b"{" + b" " * 4096 + b"}", headers={**BROWSER, "Content-Type": "text/plain"})
    assert seg.status == 413 and seg.headers["Access-Control-Allow-Origin"] == BROWSER["Origin"]
    assert "larger than 2048" in (await seg.text())
    bridge = await client.post("/mp/bridge", data=b"{" + b" " * 4096 + b"}", headers={**BROWSER, "Content-Type": "application/json"})
    assert bridge.status == 413 and bridge.headers["Access-Control-Allow-Origin"] == BROWSER["Origin"]
    assert orjson.loads(await bridge.read()) == {"status": 0, "error": "body is larger than 2048 bytes"}
    flag = await client.get(f"/mp/flags/{'f' * 300}/first-time-events?verbose=1", headers=BROWSER)
    assert flag.status == 400 and (await flag.json()) == {"status": 0, "error": "not a valid flag id"}


async def test_a_path_with_repeated_slashes_keeps_its_query(proxy_client: Any) -> None:
    """``/mp//track/?verbose=1`` (an api_host ending in "/") is ``/mp/track/``
    with its query: answered verbose, and counted under its route."""
    client = await proxy_client()
    resp = await client.post("/mp//track/?verbose=1&ip=1", data=b64_body([js_event("A", device_id())]),
                             headers={**BROWSER, **FORM})
    assert resp.status == 200 and orjson.loads(await resp.read()) == {"status": 1, "error": None}
    assert resp.headers["Access-Control-Allow-Origin"] == BROWSER["Origin"]
    missing = await client.post("/mp//nowhere/?verbose=1", data=b"", headers={**BROWSER, **FORM})
    assert missing.status == 404 and "unknown endpoint" in (await missing.json())["error"]


async def test_page_scripts_answer_no_cors_and_sdk_routes_do(proxy_client: Any) -> None:
    """Scripts load through ``<script src>``: no CORS headers on them, as before
    the edge; an SDK route answers an allowed origin's request with them."""
    client = await proxy_client(**copy.deepcopy(LINKED))
    script = await client.get("/mp/link.js", headers=BROWSER)
    assert script.status == 200 and "Access-Control-Allow-Origin" not in script.headers
    track = await client.post("/mp/track/", data=b64_body([js_event("A", device_id())]), headers={**BROWSER, **FORM})
    assert track.headers["Access-Control-Allow-Origin"] == BROWSER["Origin"]
