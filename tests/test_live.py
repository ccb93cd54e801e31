"""The live view's feed and stream: records only while watched, bounded,
no IPs or tokens, delivery outcomes follow the request's events."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from proxy.services.live import LiveFeed
from tests.conftest import BROWSER, b64_body, canonical_of, cookie_from, device_id, js_event
from tests.support import eventually

FORM = {**BROWSER, "Content-Type": "application/x-www-form-urlencoded", "Host": "www.example.com"}


class Stream:
    """An open /live/events stream and the records it has delivered so far."""

    def __init__(self, resp: Any) -> None:
        self.resp = resp
        self.records: list[dict[str, Any]] = []
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for line in self.resp.content:
            if line.startswith(b"data: "):
                self.records.append(orjson.loads(line[6:]))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["kind"] == kind]

    async def close(self) -> None:
        self.task.cancel()
        self.resp.close()


async def open_stream(client: Any) -> Stream:
    resp = await client.ops_get("/live/events")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    await eventually(lambda: client.services.live.watchers == 1, 5, "the stream to be watching")
    return Stream(resp)


async def test_nothing_is_recorded_while_nobody_watches(client, upstream):
    feed = client.services.live
    assert feed.watching is False
    await client.post("/mp/track/?ip=1", data=b64_body([js_event("Unwatched", device_id())]), headers=FORM)
    await upstream.wait(1, "us", "/track")
    recent, queue = feed.watch()
    assert recent == []  # the event went by unrecorded
    feed.unwatch(queue)


async def test_a_watcher_sees_identity_form_and_outcomes_complete(proxy_client, upstream, delivery_mode):
    client = await proxy_client()
    stream = await open_stream(client)
    device = device_id()
    first = await client.post("/mp/track/?ip=1", data=b64_body([js_event("Page A", device)]), headers=FORM)
    canonical = canonical_of(cookie_from(first))
    # analytics.js on the same page, with its own id: rewritten, merged via the cookie.
    from tests.support import PLAIN, ajs_call

    other = device_id()
    await client.post("/seg/v1/p", data=orjson.dumps(ajs_call("page", other, name="Page B")),
                      headers={**BROWSER, **PLAIN, "Host": "www.example.com", "Cookie": f"fp_id={cookie_from(first)}"})
    # A refusing browser: shown as dropped, without any id.
    await client.post("/mp/track/", data=b64_body([js_event("Refused", device_id())]), headers={**FORM, "Sec-GPC": "1"})
    await eventually(lambda: len(stream.of("request")) == 3, 10, "three request records")
    a, b, refused = stream.of("request")
    assert (a["canonical"], a["source"], a["host"], a["protocol"], a["route"]) == (canonical, "new", "www.example.com", "mixpanel", "track")
    assert [e["name"] for e in a["events"]] == ["Page A"]
    assert b["canonical"] == canonical and b["source"] == "cookie" and b["links"] == [[other, "cookie"]]
    assert b["protocol"] == "segment" and [e["name"] for e in b["events"]] == ["$page"]
    assert refused["canonical"] is None and refused["outcome"] == "dropped" and refused["reason"] == "consent: gpc"
    assert refused["events"] == [{"name": "Refused", "id": None}]
    if delivery_mode == "spool":
        assert a["outcome"] == "spooled"
        # The sender's outcome names the same event ids: the page updates them in place.
        await eventually(lambda: len(stream.of("delivery")) >= 1 and
                         {i for d in stream.of("delivery") for i in d["ids"]} >= {a["events"][0]["id"], b["events"][0]["id"]},
                         10, "the delivery records")
        assert {d["outcome"] for d in stream.of("delivery")} == {"forwarded"}
    else:
        assert a["outcome"] == "forwarded" and a["status"] == 200
    text = orjson.dumps(stream.records)
    assert b"127.0.0.1" not in text and b"fp_id" not in text and cookie_from(first).encode() not in text
    await stream.close()
    await eventually(lambda: client.services.live.watchers == 0, 10, "the stream to stop watching")
    assert client.services.live.watching is False


async def test_a_segment_call_and_its_message_id(client, upstream):
    from tests.support import PLAIN, ajs_call

    stream = await open_stream(client)
    call = ajs_call("track", device_id(), event="Signed Up")
    await client.post("/seg/v1/t", data=orjson.dumps(call), headers={**BROWSER, **PLAIN})
    await eventually(lambda: stream.of("request"), 10, "the Segment record")
    [record] = stream.of("request")
    assert record["protocol"] == "segment" and record["events"] == [{"name": "Signed Up", "id": call["messageId"]}]
    await stream.close()


async def test_the_page_is_self_contained_under_a_strict_policy(client):
    page = await client.ops_get("/live")
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    html = await page.text()
    assert "https://" not in html and "<script src=\"/live/live.js\"" in html
    for asset in ("/live/live.js", "/live/live.css"):
        resp = await client.ops_get(asset)
        assert resp.status == 200 and "https://" not in await resp.text()
    assert (await client.get("/live")).status == 404  # never on the public port


async def test_the_live_view_can_be_off(proxy_client):
    client = await proxy_client(ops={"live": False})
    assert (await client.ops_get("/live")).status == 404
    assert (await client.ops_get("/metrics")).status == 200


def test_a_watcher_that_stops_reading_costs_a_bounded_queue():
    feed = LiveFeed(ring=10, backlog=3)
    recent, queue = feed.watch()
    for i in range(25):
        feed.delivery([f"id-{i}"], "forwarded", 200, None)
    assert queue.qsize() == 3
    kept = [queue.get_nowait() for _ in range(3)]
    assert [r["ids"] for r in kept] == [["id-22"], ["id-23"], ["id-24"]]  # the newest, the reader told it lagged
    assert all(r.get("lagging") for r in kept)
    again, queue2 = feed.watch()
    assert len(again) == 10 and again[-1]["ids"] == ["id-24"]  # the ring keeps the last 10


async def test_copies_to_other_workers_are_bounded_and_only_while_they_watch():
    """The relay between workers (``liverelay``), as worker 0 beside a worker 1 whose
    end the test holds: nothing is copied while worker 1 has no watcher; once it has,
    each record is copied once; a worker 1 that stops reading costs its socket
    buffer, never this worker's memory (copies past it are dropped and counted)."""
    from proxy.services.liverelay import LiveRelay

    relay = LiveRelay(2)
    relay.index = 0  # worker 0, keeping worker 1's receiving end for the test to read
    other_end = relay._pairs[1][1]
    other_end.setblocking(False)
    relay._pairs[1][0].setblocking(False)
    feed = LiveFeed()
    relay.start(feed)
    try:
        feed.delivery(["id-0"], "forwarded", 200, None)
        try:
            other_end.recv(65536)
            raise AssertionError("a copy was sent while nobody watched")
        except BlockingIOError:
            pass
        assert not feed.watching
        relay._watched[1] = 1  # worker 1 has a watcher now: worker 0 records, at once
        assert feed.watching
        feed.delivery(["id-1"], "forwarded", 200, None)
        copy = orjson.loads(other_end.recv(65536))
        assert copy["ids"] == ["id-1"] and copy["kind"] == "delivery"
        for i in range(20_000):  # worker 1 stopped reading
            feed.delivery([f"id-{i}"], "forwarded", 200, None)
        assert relay.dropped > 0
        buffered = 0
        while True:
            try:
                other_end.recv(65536)
            except BlockingIOError:
                break
            buffered += 1
        assert 0 < buffered < 20_000
        # A record from worker 1 is shown here and not copied back.
        relay._pairs[0][0].send(orjson.dumps({"kind": "delivery", "ids": ["from-1"], "seq": 7}))
        recent, queue = feed.watch()
        await eventually(lambda: queue.qsize() == 1, 5, "worker 1's record")
        assert queue.get_nowait()["ids"] == ["from-1"]
        try:
            other_end.recv(65536)
            raise AssertionError("a relayed record was copied back")
        except BlockingIOError:
            pass
        assert relay._watched[0] == 1  # this worker's own watcher, for the others to see
        feed.unwatch(queue)
        assert relay._watched[0] == 0
    finally:
        await relay.stop()
        relay.close()


async def test_copies_a_worker_could_not_take_are_a_metric(client: Any) -> None:
    """The relay drops a copy rather than queue it: the operator sees how many
    (``firstparty_live_relay_dropped``), not a silent gap in the live view."""
    from proxy.services.liverelay import LiveRelay
    from proxy.web.app import LIVE
    from tests.support import metric

    relay = LiveRelay(2)
    relay.index = 0  # worker 0; worker 1's end is held and never read
    relay._pairs[1][0].setblocking(False)
    feed = client.app[LIVE]
    relay.start(feed)
    try:
        relay._watched[1] = 1  # worker 1 has a watcher
        for i in range(20_000):
            feed.delivery([f"id-{i}"], "forwarded", 200, None)
            if relay.dropped:
                break
        assert relay.dropped > 0
        text = await (await client.ops_get("/metrics")).text()
        assert metric(text, "firstparty_live_relay_dropped") == relay.dropped
    finally:
        await relay.stop()
        relay.close()
