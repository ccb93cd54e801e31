"""Fault tests for durable delivery, against a scriptable recording upstream.

Each test is bounded in time. In each, every event the proxy acknowledged
reaches the upstream (checked by ``$insert_id``), dead letters hold exactly
the rejected events with their reason, and retries keep to the backoff."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import defaultdict
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from aiohttp import web

from proxy.web.app import create_app
from proxy.protocols.mixpanel import classify as classify_answer
from proxy.protocols.base import parse_retry_after
from proxy.services import memory
from proxy.services.delivery import backoff_delay
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.services.upstream import UpstreamResponse
from tests.conftest import BROWSER, TOKEN, b64_body, device_id, js_event, make_settings
from tests.support import eventually as until
from tests.support import metric, port_of, reserve_port
from tests.fakeupstream import FakeUpstream, Recorded

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
TRACK = "/mp/track/?verbose=1&ip=1"
# An outage lasts until the sender has failed this many times in a row.
OUTAGE_ATTEMPTS = 3



async def start_proxy(serve_proxy: Any, tmp_path: Any, fake: FakeUpstream, **sections: Any) -> Any:
    sections.setdefault("delivery", {})
    sections["delivery"] = {"mode": "spool", **sections["delivery"]}
    return await serve_proxy(create_app(make_settings(tmp_path, fake, **sections)))


async def send_events(client: Any, n: int, per_request: int = 5, **props: Any) -> list[str]:
    """Send n events; returns the $insert_ids the proxy acknowledged."""
    acked = []
    for start in range(0, n, per_request):
        device = device_id()  # one browser's request: one device id (a change is a reset())
        batch = [js_event("Load", device, **props) for _ in range(min(per_request, n - start))]
        resp = await client.post(TRACK, data=b64_body(batch), headers={**BROWSER, **FORM})
        assert resp.status == 200, await resp.text()
        acked += [e["properties"]["$insert_id"] for e in batch]
    return acked


async def post_batch(client: Any, events: list[dict[str, Any]]) -> list[str]:
    resp = await client.post(TRACK, data=b64_body(events), headers={**BROWSER, **FORM})
    assert resp.status == 200, await resp.text()
    return [e["properties"]["$insert_id"] for e in events]


def queued(tmp_path: Any) -> int:
    with sqlite3.connect(tmp_path / "data" / "spool.sqlite3") as c:
        return int(c.execute("SELECT COALESCE(SUM(count), 0) FROM queue").fetchone()[0])


def insert_ids(upstream: FakeUpstream) -> list[str]:
    return [e["properties"]["$insert_id"] for e in upstream.received("us", "/track")]


def dead_letters(tmp_path: Any) -> list[tuple[str, str, str]]:
    """(insert id, reason, detail) of every dead letter in the spool."""
    with sqlite3.connect(tmp_path / "data" / "spool.sqlite3") as c:
        rows = c.execute("SELECT body, reason, detail FROM dead ORDER BY id").fetchall()
    return [(orjson.loads(b)["properties"]["$insert_id"], r, d) for b, r, d in rows]


def attempt_times(upstream: FakeUpstream) -> dict[str, list[float]]:
    """Arrival times of every attempt (accepted or refused) per $insert_id."""
    times: dict[str, list[float]] = defaultdict(list)
    for rec in sorted(upstream.requests + upstream.refused, key=lambda r: r.at):
        for e in rec.events():
            times[e["properties"]["$insert_id"]].append(rec.at)
    return times


def assert_backoff_respected(upstream: FakeUpstream, initial: float) -> None:
    for insert_id, times in attempt_times(upstream).items():
        for j, (a, b) in enumerate(zip(times, times[1:]), start=1):
            assert b - a >= initial * 2 ** (j - 1) * 0.98, f"{insert_id}: retry {j} after {b - a:.3f}s"


# ------------------------------------------------------------------ pure


def classify(response: UpstreamResponse):
    return classify_answer(response.status, response.body, response.header("retry-after"))


def test_classify_upstream_answers():
    def r(status: int, body: bytes = b"", headers: list[tuple[str, str]] | None = None) -> UpstreamResponse:
        return UpstreamResponse(status, CIMultiDictProxy(CIMultiDict(headers or [])), body)

    assert classify(r(200, b'{"status":1,"error":null}')).kind == "accepted"
    assert classify(r(200, b"1")).kind == "accepted"
    assert classify(r(200, b'{"status":0,"error":"bad token"}')).kind == "rejected"
    assert classify(r(503)).kind == "retry"
    v = classify(r(429, b"", [("retry-after", "2")]))
    assert v.kind == "rate_limited" and v.retry_after == 2.0
    assert classify(r(413)).kind == "too_large"
    v = classify(r(400, b'{"failed_records":[{"index":3,"message":"bad time"}],"num_records_imported":9}'))
    assert v.kind == "rejected" and v.failed == {3: "bad time"}
    assert classify(r(400, b"nope")).failed is None
    assert classify(r(401, b"invalid credentials")).kind == "refused"


def test_retry_after_and_backoff():
    assert parse_retry_after("7") == 7.0
    assert 0 <= parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: no wait
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    delays = [backoff_delay(n, 2.0, 60.0, rand=lambda: 1.0) for n in range(1, 8)]
    assert delays == [2.4, 4.8, 9.6, 19.2, 38.4, 72.0, 72.0]  # doubling, +20 % jitter at most, capped
    assert backoff_delay(3, 2.0, 60.0, rand=lambda: 0.0) == 8.0


# ---------------------------------------------------------------- faults


def attempts(tmp_path: Any) -> int:
    """The most delivery attempts any queued row has had."""
    with sqlite3.connect(tmp_path / "data" / "spool.sqlite3") as c:
        return c.execute("SELECT COALESCE(MAX(attempts), 0) FROM queue").fetchone()[0]


async def test_upstream_down_then_back(serve_proxy, tmp_path, upstream):
    down = reserve_port()  # bound, not listening: every attempt is refused until the fake takes it over
    client = await start_proxy(
        serve_proxy, tmp_path, upstream, upstream={"us": f"http://127.0.0.1:{port_of(down)}", "timeout_seconds": 2}
    )
    acked = await send_events(client, 300)
    await until(lambda: attempts(tmp_path) >= OUTAGE_ATTEMPTS, 15, f"{OUTAGE_ATTEMPTS} failed attempts")
    server, _ = await upstream.serve("us", sock=down)
    try:
        await until(lambda: set(insert_ids(upstream)) >= set(acked), 15, "delivery after the outage")
        assert sorted(insert_ids(upstream)) == sorted(acked)  # each exactly once
        assert dead_letters(tmp_path) == []
    finally:
        await client.close()
        await server.cleanup()


async def test_an_outage_keeps_new_events_on_disk_not_in_memory(serve_proxy, tmp_path, upstream, monkeypatch):
    """While the upstream fails, the sender holds only the batches it was already
    sending (to retry them); what arrives meanwhile waits in the spool, so an outage
    at full traffic does not fill the process's memory (issue 10's soak: +100 MB)."""
    from proxy.web.app import SENDER

    down = reserve_port()
    client = await start_proxy(
        serve_proxy, tmp_path, upstream,
        upstream={"us": f"http://127.0.0.1:{port_of(down)}", "timeout_seconds": 2},
        delivery={"backoff_initial_seconds": 0.5, "backoff_max_seconds": 1.0},
    )
    state = client.app[SENDER].regions["us"]
    first = await send_events(client, 100)
    await until(lambda: attempts(tmp_path) >= OUTAGE_ATTEMPTS, 15, f"{OUTAGE_ATTEMPTS} failed attempts")
    held_at_outage = state.held
    assert 0 < held_at_outage <= 100
    more = await send_events(client, 1000, per_request=20)
    await until(lambda: attempts(tmp_path) >= OUTAGE_ATTEMPTS + 2, 15, "more failed attempts")
    assert state.held <= held_at_outage, (state.held, held_at_outage)  # the 1,000 stayed on disk
    monkeypatch.setattr(memory, "_last", -memory.TRIM_EVERY_SECONDS)  # no other test's trim in the way
    server, _ = await upstream.serve("us", sock=down)
    try:
        await until(lambda: set(insert_ids(upstream)) >= set(first + more), 20, "delivery after the outage")
        assert sorted(insert_ids(upstream)) == sorted(first + more)
        await until(lambda: state.held == 0 and state.live, 5, "the sender caught up")
        # The backlog it read from disk (over TRIM_AFTER_ROWS) drained: memory handed back once.
        text = await (await client.ops_get("/metrics")).text()
        assert metric(text, "firstparty_memory_trims_total") == 1
    finally:
        await client.close()
        await server.cleanup()


def test_memory_trims_are_spaced():
    memory._last = -memory.TRIM_EVERY_SECONDS
    assert memory.due(1000.0) and not memory.due(1000.0 + memory.TRIM_EVERY_SECONDS - 1)
    assert memory.due(1000.0 + memory.TRIM_EVERY_SECONDS)
    assert memory._malloc_trim() is not None


async def test_500s_then_recovery_respects_backoff(serve_proxy, tmp_path, upstream):
    failures = {"left": 4}

    async def behave(rec: Recorded) -> web.Response | None:
        if failures["left"] > 0:
            failures["left"] -= 1
            return web.Response(status=500, text="internal error")
        return None

    upstream.behave = behave
    client = await start_proxy(
        serve_proxy, tmp_path, upstream, delivery={"backoff_initial_seconds": 0.3, "backoff_max_seconds": 5}
    )
    acked = await send_events(client, 40)
    await until(lambda: set(insert_ids(upstream)) >= set(acked), 20, "delivery after 500s")
    assert sorted(insert_ids(upstream)) == sorted(acked)
    assert len(upstream.refused) == 4
    assert_backoff_respected(upstream, 0.3)
    await client.close()
    records = [orjson.loads(line) for line in (tmp_path / "data" / "forwarded.jsonl").read_bytes().splitlines()]
    assert sum(r["count"] for r in records) == 40 and {r["outcome"] for r in records} == {"forwarded"}
    assert max(r["attempts"] for r in records) >= 2


async def test_429_honours_retry_after(serve_proxy, tmp_path, upstream):
    answered: list[float] = []

    async def behave(rec: Recorded) -> web.Response | None:
        answered.append(time.monotonic())
        if len(answered) == 1:
            return web.Response(status=429, text="slow down", headers={"Retry-After": "2"})
        return None

    upstream.behave = behave
    client = await start_proxy(serve_proxy, tmp_path, upstream)
    # One request, one commit, one batch: no second batch can be in flight
    # when the 429 comes back (with two, it could leave before and land after).
    acked = await send_events(client, 10, per_request=10)
    await until(lambda: set(insert_ids(upstream)) >= set(acked), 10, "delivery after 429")
    assert len(upstream.refused) == 1 and len(upstream.refused[0].events()) == 10
    assert answered[1] - answered[0] >= 2.0  # not one moment sooner than Retry-After
    assert sorted(insert_ids(upstream)) == sorted(acked)
    await client.close()


async def test_413_splits_batches_and_buries_a_lone_giant(serve_proxy, tmp_path, upstream):
    async def behave(rec: Recorded) -> web.Response | None:
        events = rec.events()
        if len(events) > 8 or any(e["properties"].get("giant") for e in events):
            return web.Response(status=413, text="Request Entity Too Large")
        return None

    upstream.behave = behave
    client = await start_proxy(serve_proxy, tmp_path, upstream, delivery={"batch_window_ms": 200})
    acked = await send_events(client, 50, per_request=50)
    giant = await send_events(client, 1, giant=True)
    await until(lambda: set(insert_ids(upstream)) >= set(acked), 10, "split delivery")
    await until(lambda: len(dead_letters(tmp_path)) == 1, 5, "the giant's dead letter")
    assert sorted(insert_ids(upstream)) == sorted(acked)
    assert all(len(r.events()) <= 8 for r in upstream.requests)
    assert [(i, reason) for i, reason, _ in dead_letters(tmp_path)] == [(giant[0], "too_large")]
    await client.close()


@pytest.mark.parametrize("names_failures", [True, False], ids=["failed_records", "bisect"])
async def test_400_dead_letters_exactly_the_bad_events(serve_proxy, tmp_path, upstream, names_failures):
    async def behave(rec: Recorded) -> web.Response | None:
        events = rec.events()
        bad = [i for i, e in enumerate(events) if e["properties"].get("bad")]
        if not bad:
            return None
        if names_failures:
            # Mixpanel's answer: the named records failed, the others were ingested.
            good = [e for i, e in enumerate(events) if i not in bad]
            accepted.extend(good)
            body = {
                "code": 400,
                "status": "Bad Request",
                "num_records_imported": len(good),
                "failed_records": [
                    {"index": i, "$insert_id": events[i]["properties"]["$insert_id"], "field": "properties.bad",
                     "message": "'bad' is not allowed"}
                    for i in bad
                ],
            }
            return web.json_response(body, status=400)
        return web.json_response({"status": 0, "error": "invalid event"}, status=400)

    accepted: list[dict[str, Any]] = []
    upstream.behave = behave
    client = await start_proxy(serve_proxy, tmp_path, upstream, delivery={"batch_window_ms": 100})
    good = await send_events(client, 20, per_request=10)
    bad = await send_events(client, 2, per_request=1, bad=True)
    more = await send_events(client, 20, per_request=10)
    # A request's events share a spool row: one bad among them is buried alone.
    d = device_id()
    mixed = await post_batch(client, [js_event(f"E{i}", d, **({"bad": True} if i == 4 else {})) for i in range(10)])
    good += mixed[:4] + mixed[5:]
    bad.append(mixed[4])

    def arrived() -> set[str]:
        return set(insert_ids(upstream)) | {e["properties"]["$insert_id"] for e in accepted}

    await until(lambda: arrived() >= set(good + more), 10, "good events")
    await until(lambda: len(dead_letters(tmp_path)) == 3, 10, "three dead letters")
    letters = dead_letters(tmp_path)
    assert sorted(i for i, _, _ in letters) == sorted(bad)
    with sqlite3.connect(tmp_path / "data" / "spool.sqlite3") as c:
        bodies = [orjson.loads(b) for (b,) in c.execute("SELECT body FROM dead")]
    assert all(isinstance(b, dict) for b in bodies)  # each one event, not the row it came in
    await until(lambda: not queued(tmp_path), 5, "the queue to empty")
    assert {reason for _, reason, _ in letters} == {"rejected"}
    assert all(("not allowed" if names_failures else "invalid event") in detail for _, _, detail in letters)
    assert not (arrived() & set(bad))
    await client.close()


async def test_a_batch_is_one_spool_row_and_one_upstream_request(serve_proxy, tmp_path, upstream):
    """mixpanel-js's 10-event request: one row holding 10 events (depth,
    stats and the forwarded log count events), sent as one upstream batch."""
    from proxy.web.app import SPOOL

    # A partial batch waits out the window: time to look at the spool first.
    client = await start_proxy(serve_proxy, tmp_path, upstream, delivery={"batch_window_ms": 3000})
    d = device_id()
    sent = await post_batch(client, [js_event(f"E{i}", d) for i in range(10)])
    with sqlite3.connect(tmp_path / "data" / "spool.sqlite3") as c:
        assert c.execute("SELECT COUNT(*), SUM(count) FROM queue").fetchone() == (1, 10)
    assert client.app[SPOOL].depth == 10
    assert (await client.app[SPOOL].stats())["depth"] == 10
    await until(lambda: set(insert_ids(upstream)) == set(sent), 10, "delivery")
    assert [len(r.events()) for r in upstream.requests] == [10]
    assert [e["event"] for e in upstream.requests[0].events()] == [f"E{i}" for i in range(10)]
    await until(lambda: client.app[SPOOL].depth == 0, 5, "the spool to empty")
    await client.close()
    records = [orjson.loads(line) for line in (tmp_path / "data" / "forwarded.jsonl").read_bytes().splitlines()]
    forwarded = [r for r in records if r["outcome"] == "forwarded"]
    assert [r["count"] for r in forwarded] == [10] and forwarded[0]["insert_ids"] == sent


async def test_hanging_upstream_times_out_and_retries(serve_proxy, tmp_path, upstream):
    calls = {"n": 0}
    release = asyncio.Event()

    async def behave(rec: Recorded) -> web.Response | None:
        calls["n"] += 1
        if calls["n"] == 1:
            await release.wait()  # hangs for the whole test: only the proxy's timeout ends the attempt
        return None

    upstream.behave = behave
    client = await start_proxy(serve_proxy, tmp_path, upstream, upstream={"timeout_seconds": 1})
    try:
        acked = await send_events(client, 10, per_request=10)  # one batch: the hung one
        # A hung request is recorded when it arrives: wait for the second attempt itself.
        await until(lambda: calls["n"] >= 2, 8, "a retry after the 1 s timeout")
        await until(lambda: len(upstream.requests) >= 2, 2, "the retry recorded")
        assert [e["properties"]["$insert_id"] for e in upstream.requests[1].events()] == acked
    finally:
        release.set()
        await client.close()
    # The hung attempt was recorded as arriving too; nothing is missing.
    assert set(insert_ids(upstream)) == set(acked)


async def test_events_without_insert_id_get_one_that_a_resend_keeps(serve_proxy, tmp_path, upstream):
    """The proxy adds ``$insert_id`` before spooling, so the resend after a
    failure (or a crash) carries the same one and Mixpanel de-duplicates it."""
    calls = {"n": 0}

    async def behave(rec: Recorded) -> web.Response | None:
        calls["n"] += 1
        return web.Response(status=503, text="busy") if calls["n"] == 1 else None

    upstream.behave = behave
    client = await start_proxy(serve_proxy, tmp_path, upstream)
    events = [js_event("No Insert Id", device_id()) for _ in range(3)]
    for e in events:
        del e["properties"]["$insert_id"]
    resp = await client.post(TRACK, data=b64_body(events), headers={**BROWSER, **FORM})
    assert resp.status == 200
    await until(lambda: len(upstream.received("us", "/track")) == 3, 10, "delivery after the 503")
    await client.close()
    first = [e["properties"]["$insert_id"] for e in upstream.refused[0].events()]
    resent = [e["properties"]["$insert_id"] for e in upstream.received("us", "/track")]
    assert first == resent
    assert len(set(first)) == 3 and all(isinstance(i, str) and len(i) == 32 for i in first)


async def test_full_spool_answers_503_and_loses_nothing(serve_proxy, tmp_path, upstream):
    down = reserve_port()
    client = await start_proxy(
        serve_proxy, tmp_path, upstream,
        upstream={"us": f"http://127.0.0.1:{port_of(down)}", "timeout_seconds": 1}, delivery={"max_rows": 10},
    )
    acked = await send_events(client, 10)
    resp = await client.post(TRACK, data=b64_body([js_event("Overflow", device_id())]), headers={**BROWSER, **FORM})
    assert resp.status == 503 and resp.headers["Retry-After"]
    assert "limit is 10" in (await resp.json())["error"]
    ready = await client.ops_get("/readyz")
    assert ready.status == 503 and (await ready.json())["spool"] is False  # the load balancer stops sending
    server, _ = await upstream.serve("us", sock=down)
    try:
        await until(lambda: set(insert_ids(upstream)) >= set(acked), 10, "delivery")
        # Ready again once the spool's acknowledging transaction has committed: a
        # state reached after the upstream answered, so waited for, not assumed.
        await until(lambda: client.services.spool.depth < 10, 10, "the delivered rows leave the spool")
        ready = await client.ops_get("/readyz")
        assert ready.status == 200 and await ready.json() == {"store": True, "spool": True}
        assert "Overflow" not in [e["event"] for e in upstream.received()]
    finally:
        await client.close()
        await server.cleanup()


async def test_expired_events_are_not_sent(serve_proxy, tmp_path, upstream):
    client = await start_proxy(serve_proxy, tmp_path, upstream)
    old = await send_events(client, 1, time=time.time() - 6 * 86400)
    fresh = await send_events(client, 1)
    await until(lambda: set(fresh) <= set(insert_ids(upstream)), 5, "fresh event")
    await until(lambda: len(dead_letters(tmp_path)) == 1, 5, "expired event recorded")
    assert [(i, r) for i, r, _ in dead_letters(tmp_path)] == [(old[0], "expired")]
    assert old[0] not in insert_ids(upstream)
    await client.close()
    records = [orjson.loads(line) for line in (tmp_path / "data" / "forwarded.jsonl").read_bytes().splitlines()]
    assert [r["insert_ids"] for r in records if r["outcome"] == "expired"] == [old]


async def test_an_old_event_in_a_fresh_batch_expires_alone(serve_proxy, tmp_path, upstream):
    """A row's time is its oldest event's: an expired event among fresh ones
    is buried on its own, the fresh ones of its request are sent."""
    client = await start_proxy(serve_proxy, tmp_path, upstream)
    d = device_id()
    events = [js_event(f"E{i}", d, **({"time": time.time() - 6 * 86400} if i == 2 else {})) for i in range(5)]
    sent = await post_batch(client, events)
    await until(lambda: set(insert_ids(upstream)) >= set(sent) - {sent[2]}, 5, "the fresh events")
    await until(lambda: len(dead_letters(tmp_path)) == 1, 5, "the expired event's dead letter")
    assert [(i, r) for i, r, _ in dead_letters(tmp_path)] == [(sent[2], "expired")]
    assert sent[2] not in insert_ids(upstream)
    await until(lambda: not queued(tmp_path), 5, "the queue to empty")
    await client.close()


async def test_events_too_old_are_decided_at_the_door(serve_proxy, tmp_path, upstream):
    """Issue 24: events older than delivery.max_age_days are dead letters from the
    start, written in the request's own transaction (there when the SDK has its 200:
    nothing to wait for) and never queued (the request makes one row, of its fresh
    events: no requeue, no row per event, no second transaction); one `expired`
    record and count for them, as the sender's."""
    client = await start_proxy(serve_proxy, tmp_path, upstream)
    d = device_id()
    old = time.time() - 6 * 86400
    events = [js_event(f"E{i}", d, **({"time": old} if i in (1, 3) else {})) for i in range(5)]
    sent = await post_batch(client, events)
    # At once, with the answer: the two letters, and the fresh three as one row.
    assert [(i, r) for i, r, _ in dead_letters(tmp_path)] == [(sent[1], "expired"), (sent[3], "expired")]
    assert all("older than 5 days" in detail for _, _, detail in dead_letters(tmp_path))
    with sqlite3.connect(tmp_path / "data" / "spool.sqlite3") as c:
        assert c.execute("SELECT seq FROM sqlite_sequence WHERE name = 'queue'").fetchone()[0] == 1
    await until(lambda: set(insert_ids(upstream)) == {sent[0], sent[2], sent[4]}, 5, "the fresh events")
    text = await (await client.ops_get("/metrics")).text()
    assert metric(text, 'firstparty_dead_lettered_total{reason="expired"}') == 2
    assert metric(text, 'firstparty_delivery_outcomes_total{outcome="expired",route="track"}') == 2
    await client.close()
    records = [orjson.loads(line) for line in (tmp_path / "data" / "forwarded.jsonl").read_bytes().splitlines()]
    [record] = [r for r in records if r["outcome"] == "expired"]
    assert record["insert_ids"] == [sent[1], sent[3]] and record["reason"] == "expired" and record["count"] == 2
    assert record["canonical_ids"] and record["status"] is None


async def test_an_all_expired_request_writes_its_letters_before_answering(serve_proxy, tmp_path, upstream):
    client = await start_proxy(serve_proxy, tmp_path, upstream)
    sent = await send_events(client, 3, per_request=3, time=1)
    assert sorted(i for i, _, _ in dead_letters(tmp_path)) == sorted(sent) and queued(tmp_path) == 0
    assert client.services.spool.depth == 0
    await client.close()
    assert upstream.received("us", "/track") == []


async def test_401_buries_the_batch_without_retrying(serve_proxy, tmp_path, upstream):
    async def behave(rec: Recorded) -> web.Response | None:
        return web.Response(status=401, text="Invalid credentials")

    upstream.behave = behave
    client = await start_proxy(serve_proxy, tmp_path, upstream)
    acked = await send_events(client, 5, per_request=5)
    await until(lambda: len(dead_letters(tmp_path)) == 5, 5, "dead letters")
    # Buried rows are out of the queue in the same transaction: nothing is left to resend.
    assert len(upstream.refused) == 1 and attempts(tmp_path) == 0
    assert {r for _, r, _ in dead_letters(tmp_path)} == {"http_401"}
    assert sorted(i for i, _, _ in dead_letters(tmp_path)) == sorted(acked)
    await client.close()


async def test_shutdown_keeps_unsent_events_for_the_next_start(serve_proxy, tmp_path, upstream):
    closed = reserve_port()
    down = {"us": f"http://127.0.0.1:{port_of(closed)}", "timeout_seconds": 1}
    client = await start_proxy(serve_proxy, tmp_path, upstream, upstream=down, delivery={"drain_seconds": 0.5})
    acked = await send_events(client, 25)
    started = time.monotonic()
    await client.close()
    closed.close()
    assert time.monotonic() - started < 5  # the drain deadline holds
    with sqlite3.connect(tmp_path / "data" / "spool.sqlite3") as c:
        assert c.execute("SELECT SUM(count) FROM queue").fetchone()[0] == 25
    # Next start, upstream reachable: everything goes out.
    client = await start_proxy(serve_proxy, tmp_path, upstream)
    await until(lambda: set(insert_ids(upstream)) >= set(acked), 10, "delivery after restart")
    await client.close()
    with sqlite3.connect(tmp_path / "data" / "spool.sqlite3") as c:
        assert c.execute("SELECT COUNT(*) FROM queue").fetchone()[0] == 0


async def test_batching_cuts_upstream_requests(serve_proxy, tmp_path, upstream):
    client = await start_proxy(serve_proxy, tmp_path, upstream, delivery={"batch_window_ms": 100})
    acked = await asyncio.gather(*(send_events(client, 1) for _ in range(200)))
    flat = [i for ids in acked for i in ids]
    await until(lambda: set(insert_ids(upstream)) >= set(flat), 10, "delivery")
    assert sorted(insert_ids(upstream)) == sorted(flat)
    assert len(upstream.requests) <= 200 * 25 / 1000 + 2  # <= 25 upstream requests per 1,000 events
    assert max(len(r.events()) for r in upstream.requests) <= 50
    await client.close()


async def test_spool_stats_and_replay_cli(serve_proxy, tmp_path, upstream):
    """Dead letters seen with `firstparty spool stats`, replayed with `firstparty
    replay` while the proxy runs, and delivered once the cause is fixed."""
    from tests.support import run_cli

    refusing = True

    async def behave(rec: Recorded) -> web.Response | None:
        return web.Response(status=401, text="Invalid credentials") if refusing else None

    upstream.behave = behave
    client = await start_proxy(serve_proxy, tmp_path, upstream)
    acked = await send_events(client, 3, per_request=3)
    await until(lambda: len(dead_letters(tmp_path)) == 3, 5, "dead letters")
    cfg = tmp_path / "proxy.toml"
    cfg.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n[cookie]\nsecret = "{"s" * 32}"\n')

    stats = await asyncio.to_thread(run_cli, "spool", "stats", "--json", "--config", str(cfg))
    assert stats.returncode == 0, stats.stderr
    parsed = orjson.loads(stats.stdout)
    assert parsed["dead_by_reason"] == {"http_401": 3} and parsed["depth"] == 0
    human = await asyncio.to_thread(run_cli, "spool", "stats", "--config", str(cfg))
    assert "http_401: 3" in human.stdout

    refusing = False  # the operator fixed the token
    none = await asyncio.to_thread(run_cli, "replay", "--reason", "rejected", "--config", str(cfg))
    assert "moved 0 dead letters" in none.stdout
    done = await asyncio.to_thread(run_cli, "replay", "--reason", "http_401", "--config", str(cfg))
    assert done.returncode == 0 and "moved 3 dead letters" in done.stdout
    await until(lambda: set(insert_ids(upstream)) >= set(acked), 10, "replayed delivery")
    assert dead_letters(tmp_path) == []
    await client.close()

    missing = await asyncio.to_thread(run_cli, "spool", "stats", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2


async def test_an_unexpected_error_while_sending_keeps_the_batch(serve_proxy, tmp_path, upstream, monkeypatch):
    """A bug in the send path (here: the answer classifier raising once) must not
    strand the batch: it is retried after the backoff and delivered."""
    from proxy.protocols.mixpanel import Mixpanel

    real = Mixpanel.classify
    calls = {"n": 0}

    def flaky(status, body, retry_after):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(status, body, retry_after)

    monkeypatch.setattr(Mixpanel, "classify", staticmethod(flaky))
    client = await start_proxy(serve_proxy, tmp_path, upstream)
    acked = await send_events(client, 5, per_request=5)
    await until(lambda: insert_ids(upstream).count(acked[0]) >= 2, 10, "the retried batch")
    assert set(acked) <= set(insert_ids(upstream))
    await client.close()


@given(st.sets(st.integers(min_value=1, max_value=200), max_size=60))
def test_id_runs_cover_exactly_the_acknowledged_ids(ids):
    from proxy.services.queue.sqlite import id_runs

    runs = id_runs(ids)
    covered = [i for a, b in runs for i in range(a, b + 1)]
    assert covered == sorted(ids)  # every id once, nothing in between
    assert all(b + 1 < a2 for (_, b), (a2, _) in zip(runs, runs[1:]))  # runs are maximal


async def test_old_spool_with_region_index_is_migrated(tmp_path):
    from proxy.services.queue.rows import NewRow
    from proxy.services.queue.sqlite import Spool

    path = tmp_path / "spool.sqlite3"
    with sqlite3.connect(path) as c:  # what 0.1.0 created
        c.execute("CREATE TABLE queue (id INTEGER PRIMARY KEY AUTOINCREMENT, route TEXT NOT NULL, region TEXT NOT NULL,"
                  " project TEXT, ip INTEGER NOT NULL, body BLOB NOT NULL, meta BLOB NOT NULL,"
                  " enqueued_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0)")
        c.execute("CREATE INDEX queue_region ON queue (region, id)")
    spool = Spool(path, max_rows=10)
    await spool.open()
    await spool.enqueue([NewRow("track", "eu", None, False, b"{}", b"{}"), NewRow("track", "us", None, False, b"{}", b"{}")])
    assert [r.region for r in await spool.read("us", 0, 10)] == ["us"]
    spool.ack([*await spool.read("us", 0, 10), *await spool.read("eu", 0, 10)])
    await spool.flush()
    await spool.close()
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall() == []
        assert c.execute("SELECT COUNT(*) FROM queue").fetchone()[0] == 0


async def test_a_large_group_commit_hands_the_sender_the_ids_on_disk(tmp_path):
    """Rows go in by multi-row statements (256 a statement): the ids the
    sender is handed must be the ones SQLite assigned, row for row."""
    from proxy.services.queue.rows import NewRow
    from proxy.services.queue.sqlite import Spool

    spool = Spool(tmp_path / "spool.sqlite3", max_rows=10_000)
    await spool.open()
    handed: list[tuple[int, bytes]] = []
    spool.on_commit = lambda rows: handed.extend((r.id, r.body) for r in rows)
    await spool.enqueue([NewRow("track", "us", None, False, b'{"n":%d}' % i, b"{}") for i in range(600)])
    await spool.enqueue([NewRow("track", "us", None, False, b'{"n":"last"}', b"{}")])
    on_disk = [(r.id, r.body) for r in await spool.read("us", 0, 10_000)]
    await spool.close()
    assert handed == on_disk and len(on_disk) == 601
    assert [b for _, b in on_disk[:3]] == [b'{"n":0}', b'{"n":1}', b'{"n":2}']


async def test_dead_letters_are_bounded_by_count_and_age(serve_proxy, tmp_path, upstream):
    """A flood of events that can only be dead letters (``time: 1``, long expired)
    keeps the newest ``max_dead_letters``; letters older than ``dead_letter_days``
    go as new ones are written."""
    client = await start_proxy(serve_proxy, tmp_path, upstream, delivery={"max_dead_letters": 5})
    first = await send_events(client, 30, per_request=10, time=1)
    await until(lambda: client.services.spool.depth == 0, 10, "the expired events dead-lettered")
    letters = dead_letters(tmp_path)
    assert len(letters) == 5 and {r for _, r, _ in letters} == {"expired"}
    assert [i for i, _, _ in letters] == first[-5:]  # the newest kept
    # Age: letters written "40 days ago" are pruned by the next letter's transaction.
    with sqlite3.connect(tmp_path / "data" / "spool.sqlite3") as c:
        c.execute("UPDATE dead SET failed_at = failed_at - 40 * 86400")
    last = await send_events(client, 1, time=1)
    await until(lambda: [i for i, _, _ in dead_letters(tmp_path)] == last, 10, "only the new letter left")


async def test_replayed_dead_letters_are_sent_while_visitors_keep_coming(serve_proxy, tmp_path, upstream):
    """``firstparty replay`` adds rows from another process. A visitor's
    request committed right after, handed to the sender in memory, must not
    move its read past them: they would wait for the next restart."""
    from proxy.services.queue.admin import replay
    from proxy.services.queue.sqlfile import connect

    client = await start_proxy(serve_proxy, tmp_path, upstream)
    first = await send_events(client, 1)
    await until(lambda: first[0] in insert_ids(upstream) and client.services.spool.depth == 0, 5, "caught up")
    event = js_event("Replayed", device_id())
    iid = event["properties"]["$insert_id"]
    operator = connect(tmp_path / "data" / "spool.sqlite3")
    try:
        operator.execute(
            "INSERT INTO dead (queue_id, route, region, project, ip, body, meta, enqueued_at, attempts, reason, detail,"
            " status, failed_at, protocol, event_time) VALUES (1, 'track', 'us', ?, 0, ?, ?, 0, 1, 'http_401', 'x', 401,"
            " 0, 'mixpanel', ?)",
            (event["properties"]["token"], orjson.dumps(event), orjson.dumps({"n": "Replayed", "i": iid}), time.time()),
        )
        assert replay(operator) == 1
    finally:
        operator.close()
    after = await send_events(client, 1)  # a visitor, right after
    await until(lambda: after[0] in insert_ids(upstream), 5, "the visitor's event")
    await until(lambda: iid in insert_ids(upstream), 5, "the replayed event")
    await until(lambda: client.services.spool.depth == 0, 5, "the spool to empty")


async def test_an_unexpected_error_retries_only_the_rows_without_an_outcome(serve_proxy, tmp_path, upstream, monkeypatch):
    """The catch-all retries what the failed send had not settled: an expired
    event the send buried first is not buried a second time."""
    from proxy.protocols.mixpanel import Mixpanel
    from proxy.services.queue.sqlfile import connect

    real, calls = Mixpanel.classify, {"n": 0}

    def flaky(status: int, body: bytes, retry_after: str | None) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(status, body, retry_after)

    monkeypatch.setattr(Mixpanel, "classify", staticmethod(flaky))
    # Queued before the start, so the sender takes both in one batch: one aged
    # past the vendor's limit while queued, one fresh.
    (tmp_path / "data").mkdir(exist_ok=True)
    spool = connect(tmp_path / "data" / "spool.sqlite3")
    ids = {}
    for name, when in (("Old", 1_000.0), ("Fresh", time.time())):
        event = js_event(name, device_id(), time=when)
        ids[name] = event["properties"]["$insert_id"]
        spool.execute(
            "INSERT INTO queue (route, region, project, ip, body, meta, enqueued_at, event_time) VALUES"
            " ('track', 'us', ?, 1, ?, ?, ?, ?)",
            (TOKEN, orjson.dumps(event), orjson.dumps({"n": name, "i": ids[name]}), time.time(), when),
        )
    spool.close()
    client = await start_proxy(serve_proxy, tmp_path, upstream)
    await until(lambda: insert_ids(upstream).count(ids["Fresh"]) >= 2, 10, "the retried batch")
    await until(lambda: client.services.spool.depth == 0, 5, "the spool to empty")
    await client.services.spool.flush()
    assert [(i, reason) for i, reason, _ in dead_letters(tmp_path)] == [(ids["Old"], "expired")]
    assert ids["Old"] not in insert_ids(upstream)
    await client.close()


async def test_rows_committed_during_a_failed_read_are_still_sent(serve_proxy, tmp_path, upstream):
    """A live region reads the file once a second anyway; rows committed while
    that read runs wait beside it. If the read fails, they are let go from
    memory: the region must read them from disk, not hand the next commit
    over in memory and move past them."""
    client = await start_proxy(serve_proxy, tmp_path, upstream)
    spool = client.services.spool
    first = await send_events(client, 1)
    await until(lambda: first[0] in insert_ids(upstream) and spool.depth == 0, 5, "caught up")
    real, started, go, failed = spool.read, asyncio.Event(), asyncio.Event(), []

    async def failing_once(region: str, *args: Any) -> Any:
        if failed or region != "us":
            return await real(region, *args)
        started.set()
        await go.wait()
        failed.append(1)
        raise sqlite3.OperationalError("disk I/O error")

    spool.read = failing_once
    await asyncio.wait_for(started.wait(), 5)  # the once-a-second read, now
    during = await send_events(client, 1)  # committed while it runs
    go.set()
    await until(lambda: failed, 5, "the read to fail")
    after = await send_events(client, 1)
    await until(lambda: after[0] in insert_ids(upstream), 5, "the next event")
    await until(lambda: during[0] in insert_ids(upstream), 5, "the event committed during the failed read")
    await client.close()


async def test_a_split_batch_that_meets_an_outage_goes_back_in_order(serve_proxy, tmp_path, upstream):
    """A 400 naming no record bisects the batch; when its first half meets a
    503 the region pauses, and the second half waits behind the first (not
    sent during the pause, and not retried ahead of it)."""
    from proxy.services.queue.sqlfile import connect

    answers = [web.Response(status=400, text="bad request"), web.Response(status=503, text="busy"),
               web.Response(status=503, text="busy")]

    async def behave(rec: Recorded) -> web.Response | None:
        return answers.pop(0) if answers else None

    upstream.behave = behave
    (tmp_path / "data").mkdir(exist_ok=True)
    spool = connect(tmp_path / "data" / "spool.sqlite3")
    ids = []
    for name in "abcd":  # queued before the start: one batch
        event = js_event(name, device_id())
        ids.append(event["properties"]["$insert_id"])
        spool.execute(
            "INSERT INTO queue (route, region, project, ip, body, meta, enqueued_at, event_time) VALUES"
            " ('track', 'us', ?, 1, ?, ?, ?, ?)",
            (TOKEN, orjson.dumps(event), orjson.dumps({"n": name, "i": ids[-1]}), time.time(), time.time()),
        )
    spool.close()
    client = await start_proxy(serve_proxy, tmp_path, upstream,
                               delivery={"backoff_initial_seconds": 0.05, "backoff_max_seconds": 0.1})
    await until(lambda: client.services.spool.depth == 0, 10, "the batch delivered")
    refused = [[e["properties"]["$insert_id"] for e in r.events()] for r in upstream.refused]
    [delivered] = [[e["properties"]["$insert_id"] for e in r.events()] for r in upstream.by("us", "/track")]
    assert refused[:2] == [ids, ids[:2]]  # the batch (400), then its first half (503)
    assert refused[2:] == [ids]  # then whole and in order: the second half not sent alone during the pause
    assert delivered == ids
    await client.close()
