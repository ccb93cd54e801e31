"""The pipeline's stages, one table each: given an Exchange, expect what the
stage makes of it (``proxy/pipeline``), on the real services of a running app.
And the one-outcome rule: every event a request brings ends with exactly one
outcome, on every path through the real app, in both delivery modes."""

from __future__ import annotations

import json
import logging
import time
from urllib.parse import quote
from typing import Any

import orjson
import pytest
from multidict import CIMultiDict

from proxy import pipeline
from proxy.core.bridge import from_own_page
from proxy.core.identity import Resolution
from proxy.errors import BadRequest
from proxy.pipeline import EVENTS, Exchange, Visit, run
from proxy.pipeline.consent import consent
from proxy.pipeline.decode import decode
from proxy.pipeline.exchange import DROPPED, EXPIRED, FAILED, FORWARDED, SPOOLED
from proxy.pipeline.identity import identify
from proxy.pipeline import outcome
from proxy.pipeline.outcome import report
from proxy.lograte import Throttled
from proxy.pipeline.rewrite import rewrite
from proxy.protocols.mixpanel import MIXPANEL
from proxy.protocols.segment import SEGMENT
from proxy.web.app import FRONT
from tests.conftest import BROWSER, SEG_KEY, TOKEN, b64_body, device_id, js_event
from tests.support import reserve_port, step

HOST = "www.example.com"


def exchange(
    c: Any, body: str | bytes, *, route: str = "track", protocol: Any = MIXPANEL, browser: bool = True,
    cookie_id: str | None = None, query: list[tuple[str, str]] | None = None, **headers: str,
) -> Exchange:
    """An Exchange as the web layer would hand it over."""
    h = CIMultiDict({"Content-Type": "application/x-www-form-urlencoded", **(dict(BROWSER) if browser else {})})
    for name, value in headers.items():
        h[name.replace("_", "-")] = value
    visit = Visit(browser, h.get("Origin"), HOST, cookie_id, None, None, browser and from_own_page(h, (), HOST))
    x = Exchange(protocol, route, f"/{route}/", visit, h, "127.0.0.1", "POST", query or [], "", time.perf_counter())
    x.body = body.encode() if isinstance(body, str) else body
    return x



@pytest.fixture
async def context(proxy_client: Any) -> Any:
    client = await proxy_client()
    return client.app[FRONT].c


def forwarded_records(c: Any) -> list[dict[str, Any]]:
    """What the outcome stage wrote (still in the forwarded log's buffer or on disk)."""
    log = c.s.forwarded
    lines = [line for chunk in log._buffer for line in chunk.splitlines()]  # noqa: SLF001
    if log.path.exists():
        lines = log.path.read_bytes().splitlines() + lines
    return [orjson.loads(line) for line in lines if line]


# ------------------------------------------------------------------ decode


async def test_decode_reads_events_token_and_project(context: Any) -> None:
    device = device_id()
    event = js_event("Viewed", device, **{"$current_url": "https://www.example.com/?fpb=abc.def"})
    x = exchange(context, b64_body([event, js_event("Clicked", device)]))
    decode(x, context)
    assert [e["event"] for e in x.events] == ["Viewed", "Clicked"]
    assert (x.decoded, x.project, x.token, x.mentioned) == (2, TOKEN, "abc.def", True)


async def test_decode_finds_no_token_for_a_server_or_in_an_import(context: Any) -> None:
    event = js_event("Viewed", device_id(), **{"$current_url": "https://www.example.com/?fpb=abc.def"})
    server = exchange(context, b64_body([event]), browser=False)
    decode(server, context)
    imported = exchange(context, b64_body([event]), route="import")
    decode(imported, context)
    assert (server.token, imported.token) == (None, None)


async def test_decode_refuses_an_unserved_project_under_only_listed(proxy_client: Any) -> None:
    client = await proxy_client(upstream={"only_listed": True})
    c = client.app[FRONT].c
    x = exchange(c, b64_body([js_event("Viewed", device_id(), token="someone-elses")]))
    with pytest.raises(BadRequest, match="only_listed"):
        decode(x, c)


# ----------------------------------------------------------------- consent


@pytest.mark.parametrize(
    ("headers", "why"),
    [({"Sec-GPC": "1"}, "gpc"), ({"DNT": "1"}, None), ({"Cookie": "fp_optout=1"}, "opt_out_cookie"), ({}, None)],
)
async def test_consent_drops_a_refusing_browsers_events(context: Any, headers: dict[str, str], why: str | None) -> None:
    """GPC and the opt-out cookie refuse; DNT does not by default (``consent.honor_dnt``)."""
    x = exchange(context, b64_body([js_event("Viewed", device_id()), js_event("Clicked", device_id())]), **headers)
    decode(x, context)
    await step(consent, x, context)
    assert x.refused == why
    if why is None:
        assert (x.outcomes, x.answer) == ([], None)
    else:
        assert [(o.kind, o.names, o.reason) for o in x.outcomes] == [(DROPPED, ["Viewed", "Clicked"], f"consent: {why}")]
        assert x.answer == MIXPANEL.accepted(False)


async def test_consent_leaves_server_requests_alone(context: Any) -> None:
    x = exchange(context, b64_body([js_event("Viewed", device_id())]), browser=False, Sec_GPC="1")
    decode(x, context)
    await step(consent, x, context)
    assert (x.refused, x.outcomes) == (None, [])


async def test_anonymise_keeps_events_under_a_throwaway_id_and_drops_profiles(proxy_client: Any) -> None:
    client = await proxy_client(consent={"mode": "anonymise"})
    c = client.app[FRONT].c
    device = device_id()
    x = exchange(c, b64_body([js_event("Viewed", device, **{"$user_id": "user-1"})]), Sec_GPC="1")
    decode(x, c)
    await step(consent, x, c)
    assert x.anonymous and x.refused == "gpc" and x.outcomes == []
    props = x.events[0]["properties"]
    assert props["distinct_id"].startswith("anon-")
    assert device not in orjson.dumps(props).decode() and "user-1" not in orjson.dumps(props).decode()
    assert x.parts == [(0, 1, Resolution(None, "anonymous"))]

    profile = {"$token": TOKEN, "$distinct_id": "user-1", "$set": {"plan": "pro"}}
    y = exchange(c, b64_body([profile]), route="engage", Sec_GPC="1")
    decode(y, c)
    await step(consent, y, c)
    assert not y.anonymous and [(o.kind, o.reason) for o in y.outcomes] == [(DROPPED, "consent: gpc")]
    assert y.answer == MIXPANEL.accepted(False)


async def test_segment_calls_refusing_by_their_own_consent_are_dropped_one_by_one(context: Any) -> None:
    def call(name: str, prefs: dict[str, bool] | None) -> dict[str, Any]:
        body: dict[str, Any] = {"type": "track", "event": name, "anonymousId": device_id(), "writeKey": SEG_KEY}
        if prefs is not None:
            body["context"] = {"consent": {"categoryPreferences": prefs}}
        return body

    batch = {"batch": [call("Kept", {"analytics": True}), call("Refused", {"analytics": False}), call("Silent", None)]}
    x = exchange(context, json.dumps(batch), route="b", protocol=SEGMENT, Content_Type="application/json")
    decode(x, context)
    await step(consent, x, context)
    assert x.refused is None and x.changed
    assert [(o.kind, o.names, o.reason) for o in x.outcomes] == [(DROPPED, ["Refused"], "consent: segment_consent")]
    assert [e["event"] for e in x.events] == ["Kept", "Silent"]


# ---------------------------------------------------------------- identity


async def test_a_reset_inside_a_batch_starts_a_second_identity(context: Any) -> None:
    first, second = device_id(), device_id()
    events = [js_event("A", first), js_event("B", first), js_event("C", second)]
    x = exchange(context, b64_body(events))
    decode(x, context)
    await identify(x, context)
    assert [(a, b) for a, b, _ in x.parts] == [(0, 2), (2, 3)]
    assert x.parts[0][2].canonical != x.parts[1][2].canonical


async def test_a_server_request_is_one_run_and_never_adopts_a_cookie(context: Any) -> None:
    first, second = device_id(), device_id()
    x = exchange(context, b64_body([js_event("A", first), js_event("B", second)]), browser=False, cookie_id="c" * 36)
    decode(x, context)
    await identify(x, context)
    assert [(a, b) for a, b, _ in x.parts] == [(0, 2)]
    assert x.resolution is not None and x.resolution.canonical is None  # aliases only: none known yet


async def test_an_id_over_the_limit_from_a_browser_is_refused(context: Any) -> None:
    x = exchange(context, b64_body([js_event("A", "d" * 200)]))
    decode(x, context)
    with pytest.raises(BadRequest):
        await identify(x, context)


# ----------------------------------------------------------------- rewrite


async def test_rewrite_strips_tokens_and_makes_device_ids_canonical(context: Any) -> None:
    device = device_id()
    event = js_event("Viewed", device, **{"$current_url": "https://www.example.com/p?fpb=abc.def&q=1"})
    x = exchange(context, b64_body([event]))
    decode(x, context)
    await identify(x, context)
    x.parts = [(0, 1, Resolution("canonical-0001", "cookie", {device: "canonical-0001"}))]
    rewrite(x, context)
    props = x.events[0]["properties"]
    assert props["$current_url"] == "https://www.example.com/p?q=1" and x.stripped == 1
    assert (props["$device_id"], props["distinct_id"]) == ("canonical-0001", "$device:canonical-0001")
    assert {(r.field, r.original) for r in x.rewrites()} == {("$device_id", device), ("distinct_id", f"$device:{device}")}


async def test_a_user_id_equal_to_a_mapped_device_id_is_left_alone(context: Any) -> None:
    """``$user_id`` is never rewritten, even when it spells a device id the mapping names."""
    device = device_id()
    x = exchange(context, b64_body([js_event("Signed in", device, user=device)]))
    decode(x, context)
    x.parts = [(0, 1, Resolution("canonical-0002", "cookie", {device: "canonical-0002"}))]
    rewrite(x, context)
    props = x.events[0]["properties"]
    assert props["$user_id"] == device
    assert props["$device_id"] == "canonical-0002"


# ----------------------------------------------------------------- outcome


async def test_a_drop_is_recorded_in_the_senders_shape_without_ids(context: Any) -> None:
    x = exchange(context, b64_body([js_event("Viewed", device_id())]), Sec_GPC="1")
    decode(x, context)
    await step(consent, x, context)
    report(x, context)
    (record,) = [r for r in forwarded_records(context) if r["outcome"] == "dropped"]
    assert (record["reason"], record["events"], record["count"], record["project"]) == ("consent: gpc", ["Viewed"], 1, TOKEN)
    assert record["canonical_ids"] == [] and record["original_ids"] == []


async def test_a_path_that_forgets_its_outcome_is_recorded_as_failed(context: Any, caplog: Any, monkeypatch: Any) -> None:
    """A stage list without ``deliver`` settles nothing: the outcome stage says so."""
    monkeypatch.setattr(outcome, "_quiet", Throttled(outcome.log))  # a line a minute: this test's own minute
    x = exchange(context, b64_body([js_event("Viewed", device_id()), js_event("Clicked", device_id())]))
    with caplog.at_level(logging.ERROR, "proxy.pipeline.outcome"):
        await run(EVENTS[:-1], x, context)
    assert any("2 events" in r.getMessage() for r in caplog.records)
    (record,) = [r for r in forwarded_records(context) if r.get("detail") == "no outcome recorded"]
    assert (record["outcome"], record["count"]) == ("failed", 2)


# ----------------------------------------------------- one outcome per event


@pytest.fixture
def settled(monkeypatch: Any) -> list[tuple[Exchange, int]]:
    """Every Exchange the app runs, with how many of its events were unsettled
    when the outcome stage was reached (before it records the gap itself)."""
    seen: list[tuple[Exchange, int]] = []
    original = pipeline.report

    def watching(x: Exchange, c: Any) -> None:
        seen.append((x, x.unsettled()))
        original(x, c)

    monkeypatch.setattr(pipeline, "report", watching)
    return seen


def kinds(x: Exchange) -> list[tuple[str, int]]:
    return [(o.kind, len(o.names)) for o in x.outcomes]


async def test_every_event_ends_with_exactly_one_outcome(proxy_client: Any, delivery_mode: str, settled: Any) -> None:
    client = await proxy_client()
    delivered = SPOOLED if delivery_mode == "spool" else FORWARDED
    old = time.time() - 30 * 86400

    async def post(path: str, body: str, **headers: str) -> None:
        response = await client.post(path, data=body, headers={**BROWSER, "Content-Type": "application/x-www-form-urlencoded", **headers})
        assert response.status < 500, await response.text()

    await post("/mp/track/", b64_body([js_event("A", device_id()), js_event("B", device_id())]))
    await post("/mp/track/", b64_body([js_event("A", device_id())]), **{"Sec-GPC": "1"})
    await post("/mp/track/", b64_body([js_event("Old", device_id(), time=old), js_event("New", device_id())]))
    await post("/mp/track/", "data=not-base64-at-all{")
    seg = {"batch": [{"type": "track", "event": "Kept", "anonymousId": device_id(), "writeKey": SEG_KEY},
                     {"type": "track", "event": "Refused", "anonymousId": device_id(), "writeKey": SEG_KEY,
                      "context": {"consent": {"categoryPreferences": {"analytics": False}}}}]}
    await post("/seg/v1/b", json.dumps(seg), **{"Content-Type": "application/json"})
    await post(f"/mp/record/?distinct_id=$device:{device_id()}&token={TOKEN}", "x")

    assert [gap for _, gap in settled] == [0] * 6
    plain, refused, aged, bad, segment, replay = [x for x, _ in settled]
    assert kinds(plain) == [(delivered, 2)]
    assert kinds(refused) == [(DROPPED, 1)]
    if delivery_mode == "spool":
        assert sorted(kinds(aged)) == [(EXPIRED, 1), (SPOOLED, 1)]
    else:
        assert kinds(aged) == [(FORWARDED, 2)]  # the vendor judges age in sync mode
    assert bad.error is not None and kinds(bad) == []
    assert kinds(segment) == [(DROPPED, 1), (delivered, 1)]
    assert kinds(replay) == [(FORWARDED, 0)]


async def test_an_unreachable_upstream_fails_the_events_once(proxy_client: Any, settled: Any) -> None:
    closed = reserve_port()
    port = closed.getsockname()[1]
    closed.close()
    client = await proxy_client(delivery={"mode": "sync"}, upstream={"us": f"http://127.0.0.1:{port}"})
    response = await client.post("/mp/track/", data=b64_body([js_event("A", device_id())]),
                                 headers={**BROWSER, "Content-Type": "application/x-www-form-urlencoded"})
    assert response.status == 502
    ((x, gap),) = settled
    assert gap == 0 and kinds(x) == [(FAILED, 1)] and x.outcomes[0].status == 502


async def test_an_unreachable_segment_upstream_fails_its_calls_once_in_segments_shape(
    proxy_client: Any, settled: Any, tmp_path: Any
) -> None:
    """Sync mode, Segment: the batch of the request's calls could not leave; the
    SDK gets Segment's 502 (it retries), each call one failed outcome with its
    messageId, and the forwarded log says so once."""
    closed = reserve_port()
    port = closed.getsockname()[1]
    closed.close()
    client = await proxy_client(delivery={"mode": "sync"}, segment={"us": f"http://127.0.0.1:{port}"})
    calls = {"batch": [{"type": "track", "event": f"E{i}", "anonymousId": device_id(), "messageId": f"m-{i}"}
                       for i in range(2)], "writeKey": SEG_KEY}
    response = await client.post("/seg/v1/batch", data=orjson.dumps(calls),
                                 headers={**BROWSER, "Content-Type": "application/json"})
    assert response.status == 502
    body = await response.json()
    assert body["success"] is False and body["code"] == "server_error" and body["message"]
    ((x, gap),) = settled
    assert gap == 0 and kinds(x) == [(FAILED, 2)]
    (failed,) = x.outcomes
    assert (failed.status, failed.names, failed.ids) == (502, ["E0", "E1"], ["m-0", "m-1"]) and failed.reason
    records = [r for r in forwarded_records(client.app[FRONT].c) if r["outcome"] == "failed"]
    assert [(r["route"], r["count"], r["status"]) for r in records] == [("batch", 2, 502)]


async def test_a_synchronous_forward_is_recorded_in_the_senders_shape(proxy_client: Any, tmp_path: Any) -> None:
    """Sync mode's record: the request's one attempt, its region, identity and latency."""
    client = await proxy_client(delivery={"mode": "sync"})
    device = device_id()
    response = await client.post("/mp/track/?ip=1", data=b64_body([js_event("Viewed", device), js_event("Clicked", device)]),
                                 headers={**BROWSER, "Content-Type": "application/x-www-form-urlencoded"})
    assert response.status == 200
    c = client.app[FRONT].c
    (record,) = [r for r in forwarded_records(c) if r["outcome"] == "forwarded"]
    assert (record["events"], record["count"], record["project"], record["region"], record["status"]) == (
        ["Viewed", "Clicked"], 2, TOKEN, "us", 200)
    assert record["attempts"] == 1 and 0 <= record["latency_ms"] < 60_000
    assert record["canonical_ids"] == [device] and record["sources"] == ["new"]


async def test_drops_are_counted_by_outcome_and_signal(proxy_client: Any) -> None:
    from tests.support import metric

    client = await proxy_client()
    for _ in range(2):
        response = await client.post("/mp/track/", data=b64_body([js_event("Viewed", device_id())]),
                                     headers={**BROWSER, "Content-Type": "application/x-www-form-urlencoded", "Sec-GPC": "1"})
        assert response.status == 200
    text = await (await client.ops_get("/metrics")).text()
    assert metric(text, 'firstparty_delivery_outcomes_total{outcome="dropped",route="track"}') == 2
    assert metric(text, 'firstparty_consent_dropped_total{reason="gpc"}') == 2


# ------------------------------------------------------------------- query


async def test_query_routes_refuse_an_unserved_project_named_in_basic_auth(proxy_client: Any, upstream: Any) -> None:
    """``only_listed`` on a query route: the project in ``token=`` or, for
    mixpanel-js's /record and /flags, in ``Authorization: Basic <token>:``."""
    import base64

    client = await proxy_client(upstream={"only_listed": True, "projects": {TOKEN: "us"}})

    def basic(token: str) -> dict[str, str]:
        return {**BROWSER, "Authorization": "Basic " + base64.b64encode(f"{token}:".encode()).decode()}

    served = await client.post("/mp/record/?format=gzip&replay_id=r1&seq=0", data=b"\x1f\x8b", headers=basic(TOKEN))
    assert served.status == 200, await served.text()
    refused = await client.post("/mp/record/?format=gzip&replay_id=r1&seq=1&verbose=1", data=b"\x1f\x8b",
                                headers=basic("someone-elses-token"))
    assert refused.status == 400
    assert await refused.json() == {"status": 0, "error": "a project token this proxy does not serve (upstream.only_listed)"}
    assert len(upstream.by("us", "/record")) == 1


async def test_a_token_inside_a_query_value_goes_and_the_rest_stays(client: Any, upstream: Any) -> None:
    """The bridge token copied into another parameter's value (a page URL in
    the query) is taken out of that value; the value's other parameters and
    every other parameter go on as they came."""
    d = device_id()
    url = quote("https://www.example.com/p?fpb=TOKENVALUE&a=1", safe="")
    resp = await client.get(f"/mp-decide/decide?verbose=1&token={TOKEN}&distinct_id=%24device%3A{d}&url={url}&b=2",
                            headers=BROWSER)
    assert resp.status == 200
    query = dict(upstream.by("decide", "/decide")[-1].query)
    assert query["url"] == "https://www.example.com/p?a=1" and query["b"] == "2"


@pytest.mark.parametrize("delivery_mode", ["sync"])
async def test_a_query_routes_failure_is_answered_in_the_shape_it_asked_for(proxy_client: Any) -> None:
    client = await proxy_client(upstream={"decide": "http://127.0.0.1:9", "timeout_seconds": 2})
    d = device_id()
    verbose = await client.get(f"/mp-decide/decide?verbose=1&token={TOKEN}&distinct_id={d}", headers=BROWSER)
    plain = await client.get(f"/mp-decide/decide?token={TOKEN}&distinct_id={d}", headers=BROWSER)
    assert verbose.status == plain.status == 502
    assert (await verbose.json())["status"] == 0 and await plain.text() == "0"
