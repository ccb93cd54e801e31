"""The durable queue on NATS JetStream (``delivery.queue = "jetstream"``), against
a real nats-server this test starts on a free port with its own store directory.

- events are acknowledged after JetStream's, reach the upstream, and a client's
  resend with the same ``$insert_id`` is stored once (``Nats-Msg-Id``);
- a stream that disagrees with the config stops the start with one line;
- the NATS server stopped mid-load: requests answered 503 (never 200), readyz
  failing; started again: accepting again, nothing acknowledged lost;
- two proxy processes share one stream; one is SIGKILLed with batches in
  flight: every acknowledged event reaches the upstream through the other.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy.errors import ConfigError
from proxy.web.app import SPOOL, create_app
from tests.conftest import BROWSER, b64_body, device_id, js_event, make_settings
from tests.fakeupstream import FakeUpstream, Recorded
from tests.support import OwnServer, eventually, eventually_async, wait_listening

ROOT = Path(__file__).resolve().parent.parent
FORM = {**BROWSER, "Content-Type": "application/x-www-form-urlencoded"}
TRACK = "/mp/track/?verbose=1&ip=1"


class OwnNats(OwnServer):
    """A nats-server with JetStream of this test's own: its own store directory,
    stopped (SIGTERM) and started again on the same port and store; ``extra``
    are cluster flags."""

    binary, fallback = "nats-server", "/usr/sbin/nats-server"

    def __init__(self, directory: Path, extra: list[str] | None = None, port: int = 0) -> None:
        super().__init__(directory, port)
        self.extra = extra or []

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def argv(self, binary: str) -> list[str]:
        return [binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.directory), *self.extra]


@pytest.fixture
async def nats_server(tmp_path: Path) -> Any:
    server = OwnNats(tmp_path / "nats")
    await server.start()
    yield server
    server.stop()


def jetstream(server: OwnNats, **extra: Any) -> dict[str, Any]:
    return {"mode": "spool", "queue": "jetstream", "nats_url": server.url, "ack_wait_seconds": 5, **extra}


def insert_ids(upstream: FakeUpstream) -> list[str]:
    return [e["properties"]["$insert_id"] for e in upstream.received("us", "/track")]


async def test_events_go_through_the_stream_and_a_resend_is_stored_once(serve_proxy, tmp_path, upstream, nats_server):
    client = await serve_proxy(create_app(make_settings(tmp_path, upstream, delivery=jetstream(nats_server))))
    events = [js_event("Through NATS", device_id()) for _ in range(20)]
    for i in range(0, 20, 5):
        resp = await client.post(TRACK, data=b64_body(events[i:i + 5]), headers=FORM)
        assert resp.status == 200 and (await resp.json())["status"] == 1
    # The SDK resends a batch it got no answer for: the same $insert_ids.
    resp = await client.post(TRACK, data=b64_body(events[:5]), headers=FORM)
    assert resp.status == 200
    want = sorted(e["properties"]["$insert_id"] for e in events)
    await eventually(lambda: sorted(insert_ids(upstream)) == want, 10, "every event delivered once")
    await asyncio.sleep(0.3)  # nothing more trickles in
    assert sorted(insert_ids(upstream)) == want
    stats = await client.app[SPOOL].stats()
    assert stats["depth"] == 0 and stats["depth_by_region"]["us"] == 0 and stats["dead_letters"] == 0
    # The forwarded log records the same outcome as with the SQLite spool: each event forwarded once.
    await client.close()
    records = [orjson.loads(line) for line in (tmp_path / "data" / "forwarded.jsonl").read_bytes().splitlines()]
    logged = sorted(i for r in records if r["outcome"] == "forwarded" for i in r["insert_ids"])
    assert logged == want


async def test_a_stream_that_disagrees_with_the_config_stops_the_start(tmp_path, upstream, nats_server):
    from proxy.services.queue.jetstream import JetStreamQueue

    first = JetStreamQueue(make_settings(tmp_path, upstream, delivery=jetstream(nats_server)).delivery, ["us"])
    await first.open()
    await first.close()
    other = make_settings(tmp_path, upstream, delivery=jetstream(nats_server, stream_max_bytes=2 << 30)).delivery
    queue = JetStreamQueue(other, ["us"])
    with pytest.raises(ConfigError) as info:
        await queue.open()
    assert "delivery.stream_max_bytes" in str(info.value) and "FIRSTPARTY" in str(info.value)
    await queue.close()


async def test_more_replicas_than_servers_stops_the_start_naming_the_setting(tmp_path, upstream, nats_server):
    """stream_replicas = 3 on a single server cannot be placed: the start stops with
    a message naming delivery.stream_replicas, not a NATS API traceback."""
    from proxy.errors import ProxyError
    from proxy.services.queue.jetstream import JetStreamQueue

    queue = JetStreamQueue(make_settings(tmp_path, upstream, delivery=jetstream(nats_server, stream_replicas=3)).delivery, ["us"])
    with pytest.raises(ProxyError) as info:
        await queue.open()
    assert "delivery.stream_replicas" in str(info.value) and "3 replica" in str(info.value)
    await queue.close()


async def test_nats_down_answers_503_and_nothing_acknowledged_is_lost(serve_proxy, tmp_path, upstream, nats_server):
    hold = asyncio.Event()

    async def slow(rec: Recorded) -> web.Response | None:
        await hold.wait()  # the vendor is slow: events wait in the stream
        return None

    upstream.behave = slow
    client = await serve_proxy(create_app(make_settings(tmp_path, upstream, delivery=jetstream(nats_server))))
    acked: list[str] = []

    async def send(n: int) -> list[int]:
        statuses = []
        for _ in range(n):
            events = [js_event("Gap", device_id()) for _ in range(3)]
            resp = await client.post(TRACK, data=b64_body(events), headers=FORM)
            statuses.append(resp.status)
            if resp.status == 200:
                acked.extend(e["properties"]["$insert_id"] for e in events)
            else:
                assert resp.headers["Retry-After"] == "5"
        return statuses

    assert set(await send(10)) == {200}
    nats_server.stop()
    await eventually(lambda: not client.app[SPOOL].accepting, 10, "the proxy to notice NATS is gone")
    during = await send(10)
    assert set(during) == {503}, during  # never a 200 it could not keep
    ready = await client.ops_get("/readyz")
    assert ready.status == 503
    await nats_server.start()
    await eventually(lambda: client.app[SPOOL].accepting, 20, "the proxy to reconnect")
    assert set(await send(5)) == {200}
    hold.set()
    await eventually(lambda: set(insert_ids(upstream)) >= set(acked), 30, "every acknowledged event delivered")


def start_proxy(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", "0", "--ops-port", "0"],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("FIRSTPARTY_")},
        stdout=subprocess.DEVNULL,
        stderr=open(log, "ab"),  # noqa: SIM115 - the child owns it
    )


async def test_an_instance_killed_mid_load_strands_nothing(tmp_path, nats_server):
    """Two proxy processes, one stream; the vendor is slow so batches are in flight;
    one instance is SIGKILLed mid-load: what it had acknowledged, and what it held
    unacknowledged, reaches the vendor through the other (after ack_wait)."""
    upstream = FakeUpstream()

    async def slow(rec: Recorded) -> web.Response | None:
        await asyncio.sleep(0.05)
        return None

    upstream.behave = slow
    runner, up_port = await upstream.serve("us")
    procs = []
    try:
        ports = []
        for name in ("a", "b"):
            config = tmp_path / f"{name}.toml"
            config.write_text(
                f'[server]\ndata_dir = "{tmp_path / name}"\n'
                f'[upstream]\nus = "http://127.0.0.1:{up_port}"\ntimeout_seconds = 5\n'
                f'[cookie]\nsecure = false\nsecret = "jetstream-test-secret-jetstream"\n'
                f'[delivery]\nqueue = "jetstream"\nnats_url = "{nats_server.url}"\nack_wait_seconds = 3\n'
                f"batch_window_ms = 20\nmax_in_flight = 2\nbackoff_initial_seconds = 0.2\nbackoff_max_seconds = 1\n"
            )
            log = tmp_path / f"{name}.log"
            procs.append(start_proxy(config, log))
            ports.append(await wait_listening(log, procs[-1]))
        acked: list[str] = []
        killed = False
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:

            async def worker(i: int) -> None:
                nonlocal killed
                for n in range(60):
                    port = ports[(i + n) % 2]
                    if killed and port == ports[0]:
                        port = ports[1]
                    events = [js_event("Fleet", device_id()) for _ in range(5)]
                    try:
                        async with session.post(f"http://127.0.0.1:{port}{TRACK}", data=b64_body(events),
                                                headers=FORM) as r:
                            if r.status == 200:
                                acked.extend(e["properties"]["$insert_id"] for e in events)
                    except (aiohttp.ClientError, asyncio.TimeoutError):
                        continue  # the killed one: never acknowledged
                    if len(acked) >= 600 and not killed:
                        killed = True
                        os.kill(procs[0].pid, signal.SIGKILL)

            await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(8))), 60)
        assert killed
        procs[0].wait(timeout=10)
        deadline = time.monotonic() + 30
        while not set(acked) <= set(insert_ids(upstream)):
            assert time.monotonic() < deadline, (
                f"{len(set(acked) - set(insert_ids(upstream)))} acknowledged events never arrived"
            )
            await asyncio.sleep(0.1)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=20)
        await runner.cleanup()
    received = insert_ids(upstream)
    print(f"\nfleet: {len(acked)} acknowledged, {len(set(received))} delivered, "
          f"{len(received) - len(set(received))} duplicates")
    assert set(acked) <= set(received)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


async def test_a_three_node_cluster_loses_a_node_under_load(serve_proxy, tmp_path, upstream):
    """replicas = 3 on a JetStream cluster of three on loopback; one node is killed in
    the middle of the load: every event the proxy acknowledged reaches the upstream
    (requests while the cluster fails over may be answered 503, never 200 and lost)."""
    import nats

    ports = free_ports(6)
    client_ports, route_ports = ports[:3], ports[3:]
    routes = ",".join(f"nats://127.0.0.1:{p}" for p in route_ports)
    nodes = [
        OwnNats(tmp_path / f"n{i}", ["--server_name", f"n{i}", "--cluster_name", "fp",
                                      "--cluster", f"nats://127.0.0.1:{route_ports[i]}", "--routes", routes],
                port=client_ports[i])
        for i in range(3)
    ]
    for node in nodes:
        await node.start()
    try:
        url = ",".join(n.url for n in nodes)
        # The cluster is ready for the proxy once it can place a stream on all three
        # nodes: an answered account info only says a meta leader is elected, and a
        # replicas = 3 stream made before every peer has joined is refused ("no
        # suitable peers for placement").
        async def jetstream_ready() -> bool:
            nc = await nats.connect(url.split(","))
            try:
                js = nc.jetstream()
                await js.add_stream(name="FP_PROBE", subjects=["fp-probe.>"], num_replicas=3)
                await js.delete_stream("FP_PROBE")
                return True
            except Exception:  # noqa: BLE001 - not yet
                return False
            finally:
                await nc.close()

        deadline = time.monotonic() + 30
        while not await jetstream_ready():
            assert time.monotonic() < deadline, "the JetStream cluster did not form"
            await asyncio.sleep(0.2)
        settings = make_settings(tmp_path, upstream, delivery={
            "mode": "spool", "queue": "jetstream", "nats_url": url, "stream_replicas": 3, "ack_wait_seconds": 5})
        client = await serve_proxy(create_app(settings))
        acked: list[str] = []
        statuses: list[int] = []
        killed = False

        async def worker() -> None:
            nonlocal killed
            for _ in range(40):
                events = [js_event("Cluster", device_id()) for _ in range(3)]
                resp = await client.post(TRACK, data=b64_body(events), headers=FORM)
                statuses.append(resp.status)
                if resp.status == 200:
                    acked.extend(e["properties"]["$insert_id"] for e in events)
                if len(acked) >= 300 and not killed:
                    killed = True
                    nodes[0].proc.kill()  # SIGKILL: no goodbye to the cluster

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(6))), 90)
        assert killed and set(statuses) <= {200, 503}, set(statuses)
        await eventually(lambda: set(insert_ids(upstream)) >= set(acked), 30, "every acknowledged event delivered")
        print(f"\ncluster: {len(acked)} acknowledged, {statuses.count(503)} answered 503 during the fail-over")
    finally:
        for node in nodes:
            node.stop()


async def test_events_too_old_go_to_the_dead_stream_with_the_request(serve_proxy, tmp_path, upstream, nats_server):
    """Expiry at the door with JetStream: the old events are in <stream>_DEAD when
    the SDK has its 200 and never in the work stream; the fresh one is delivered."""
    import time

    client = await serve_proxy(create_app(make_settings(tmp_path, upstream, delivery=jetstream(nats_server))))
    queue = client.services.spool
    d = device_id()
    events = [js_event("Old", d, time=time.time() - 6 * 86400), js_event("Fresh", d), js_event("Old", d, time=1)]
    resp = await client.post(TRACK, data=b64_body(events), headers=FORM)
    assert resp.status == 200
    stats = await queue.stats()
    assert stats["dead_letters"] == 2
    info = await queue._js.stream_info(queue.stream)
    assert info.state.messages <= 1 and info.state.last_seq == 1  # only the fresh event was ever published
    await upstream.wait(1, "us", "/track")
    assert [e["event"] for e in upstream.received("us", "/track")] == ["Fresh"]


async def test_dead_letters_go_to_their_stream_and_replay_sends_them_again(
    serve_proxy, tmp_path, upstream, nats_server, monkeypatch, capsys
):
    """A 401 (a bad project token) dead-letters the batch into <stream>_DEAD;
    `firstparty spool stats` counts it by reason; once fixed, `firstparty replay`
    puts it back and the events are delivered, as with the SQLite spool."""
    from proxy.cli import main

    for name in [n for n in os.environ if n.startswith("FIRSTPARTY_")]:
        monkeypatch.delenv(name)
    refusals = []
    fixed = False  # the token stays bad until the operator fixes it, however the sender batches

    async def bad_token_until_fixed(rec: Recorded) -> web.Response | None:
        if not fixed:
            refusals.append(rec)
            return web.Response(status=401, body=b'{"error": "invalid project token", "status": 0}')
        return None

    upstream.behave = bad_token_until_fixed
    settings = make_settings(tmp_path, upstream, delivery=jetstream(nats_server))
    client = await serve_proxy(create_app(settings))
    events = [js_event("Bad token", device_id()) for _ in range(5)]
    resp = await client.post(TRACK, data=b64_body(events), headers=FORM)
    assert resp.status == 200
    config = tmp_path / "cli.toml"
    config.write_text(
        f'[server]\ndata_dir = "{tmp_path / "cli"}"\n'
        f'[delivery]\nqueue = "jetstream"\nnats_url = "{nats_server.url}"\nack_wait_seconds = 5\n'
    )

    async def cli(*argv: str) -> str:  # the CLI runs its own event loop: in a thread
        assert await asyncio.to_thread(main, [*argv, "--config", str(config)]) == 0
        return capsys.readouterr().out

    async def stats() -> dict[str, Any]:
        return orjson.loads((await cli("spool", "stats", "--json")).strip().splitlines()[-1])

    seen: list[dict[str, Any]] = []

    async def buried() -> bool:
        seen.append(await stats())
        return seen[-1]["dead_letters"] == 5

    try:
        await eventually_async(buried, 20, "the batch dead-lettered", interval=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; refused attempts {len(refusals)}, vendor got {insert_ids(upstream)}, "
                             f"last stats {seen[-1:]}") from None
    now = await stats()
    assert now["dead_by_reason"] == {"http_401": 5} and now["depth"] == 0
    want = sorted(e["properties"]["$insert_id"] for e in events)
    # the 401 is not retried: one refused attempt per batch, never more attempts than events
    refused_ids = sorted(e["properties"]["$insert_id"] for rec in refusals for e in rec.events())
    assert refused_ids == want and insert_ids(upstream) == []
    fixed = True
    assert "moved 5 dead letters with reason 'http_401'" in await cli("replay", "--reason", "http_401")
    await eventually(lambda: sorted(insert_ids(upstream)) == want, 10, "the replayed events delivered")
    assert (await stats())["dead_letters"] == 0


async def test_a_full_stream_answers_503_and_takes_events_again_once_drained(
    serve_proxy, tmp_path, upstream, nats_server, caplog
):
    """stream_max_bytes reached while the vendor is slow: new events are answered 503
    with Retry-After (JetStream refused them: nothing half-stored is acknowledged);
    once the vendor takes the backlog, events are accepted again; nothing acknowledged
    is lost. The NATS connection itself is fine throughout: one log line at most."""
    hold = asyncio.Event()

    async def slow(rec: Recorded) -> web.Response | None:
        await hold.wait()
        return None

    upstream.behave = slow
    settings = make_settings(tmp_path, upstream, delivery=jetstream(nats_server, stream_max_bytes=1 << 20))
    client = await serve_proxy(create_app(settings))
    acked: list[str] = []
    statuses: list[int] = []
    for _ in range(40):  # 40 x 50 kB: twice what the stream may hold
        event = js_event("Big", device_id(), pad="x" * 50_000)
        resp = await client.post(TRACK, data=b64_body([event]), headers=FORM)
        statuses.append(resp.status)
        if resp.status == 200:
            acked.append(event["properties"]["$insert_id"])
        else:
            assert resp.headers["Retry-After"] == "5"
            assert "is full" in (await resp.json())["error"]
    assert statuses[0] == 200 and 503 in statuses, statuses
    assert 10 <= len(acked) <= 21, len(acked)
    hold.set()
    await eventually(lambda: set(insert_ids(upstream)) >= set(acked), 20, "the backlog delivered")

    async def accepted_again() -> bool:
        event = js_event("After", device_id())
        resp = await client.post(TRACK, data=b64_body([event]), headers=FORM)
        if resp.status == 200:
            acked.append(event["properties"]["$insert_id"])
        return resp.status == 200

    await eventually_async(accepted_again, 10, "events accepted again")
    await eventually(lambda: set(insert_ids(upstream)) >= set(acked), 10, "every acknowledged event delivered")


async def test_a_batch_on_a_slow_upstream_is_not_handed_out_twice(serve_proxy, tmp_path, upstream, nats_server):
    """The vendor takes longer than ack_wait to answer: the instance holding the
    batch reports it in progress, so JetStream does not redeliver it meanwhile,
    and the vendor gets each event once."""

    async def slow(rec: Recorded) -> web.Response | None:
        await asyncio.sleep(2.5)  # ack_wait is 1.5 s
        return None

    upstream.behave = slow
    settings = make_settings(tmp_path, upstream, delivery=jetstream(nats_server, ack_wait_seconds=1.5))
    client = await serve_proxy(create_app(settings))
    events = [js_event("Slow vendor", device_id()) for _ in range(5)]
    assert (await client.post(TRACK, data=b64_body(events), headers=FORM)).status == 200
    want = sorted(e["properties"]["$insert_id"] for e in events)
    await eventually(lambda: sorted(insert_ids(upstream)) == want, 15, "the batch delivered")
    await asyncio.sleep(3)  # a redelivery would have arrived by now
    assert sorted(insert_ids(upstream)) == want, "a batch was sent twice"


async def test_an_oversized_event_is_refused_up_front_and_the_queue_keeps_taking_events(
    serve_proxy, tmp_path, upstream, nats_server
):
    """One event bigger than the server's max_payload (1 MB by default), here by a
    huge project token that would ride in a header, is answered 413 before it
    reaches NATS; and were the connection closed anyway, the client is made
    again: the queue never stays refusing for good."""
    settings = make_settings(tmp_path, upstream, delivery=jetstream(nats_server), server={"max_body_bytes": 4 << 20})
    client = await serve_proxy(create_app(settings))
    huge = js_event("Huge", device_id(), token="t" * 1_200_000)
    resp = await client.post(TRACK, data=b64_body([huge]), headers=FORM)
    assert resp.status == 413 and "max_payload" in (await resp.json())["error"]
    ok = js_event("After", device_id())
    assert (await client.post(TRACK, data=b64_body([ok]), headers=FORM)).status == 200
    # The connection closed for good (what the server's -ERR did): it comes back.
    queue = client.app[SPOOL]
    await queue._nc.close()  # noqa: SLF001
    await eventually_async(lambda: _status(client), 20, "the queue to accept events again")
    await eventually(lambda: len(upstream.received("us", "/track")) >= 2, 20, "both events upstream")
    assert "Huge" not in [e["event"] for e in upstream.received("us", "/track")]


async def _status(client: Any) -> bool:
    resp = await client.post(TRACK, data=b64_body([js_event("Again", device_id())]), headers=FORM)
    return resp.status == 200
