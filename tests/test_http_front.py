"""The HTTP/1.1 front end (proxy/server.py) on raw sockets: keep-alive,
pipelining, bodies, limits, errors, timeouts and shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from proxy.server import MAX_HEADERS, HTTPServer, Request, Response, json_response

Handler = Callable[[Request], Awaitable[Response]]


async def echo(request: Request) -> Response:
    """Answers with what it was given, so tests can see the parsed request."""
    if request.path == "/boom":
        raise RuntimeError("handler bug")
    if request.path == "/slow":
        await asyncio.sleep(float(request.query_get("s", "0.3") or 0.3))
    if request.path.startswith("/bad-header/"):
        evil = {"crlf": "a\r\nSet-Cookie: stolen=1", "lf": "a\nSet-Cookie: stolen=1", "cr": "a\rb"}
        return Response(text="x", headers={"X-Evil": evil[request.path.rpartition("/")[2]]})
    return json_response(
        {
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "headers": request.headers,
            "body": request.body.decode("latin-1"),
            "remote": request.remote,
            "version": request.version,
        }
    )


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[tuple[HTTPServer, int]]]]:
    servers: list[HTTPServer] = []

    async def start(handler: Handler = echo, **kwargs: Any) -> tuple[HTTPServer, int]:
        kwargs.setdefault("max_body", 1000)
        server = HTTPServer(handler, **kwargs)
        servers.append(server)
        return server, await server.listen("127.0.0.1", 0)

    yield start
    for server in servers:
        await server.shutdown(1)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 5)
    return status, headers, body


async def exchange(port: int, raw: bytes, responses: int = 1) -> list[tuple[int, dict[str, str], bytes]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        return [await read_response(reader) for _ in range(responses)]
    finally:
        writer.close()


def get(path: str, *headers: str) -> bytes:
    extra = "".join(h + "\r\n" for h in headers)
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode()


async def test_request_is_parsed_and_answered(serve):
    _, port = await serve()
    raw = (
        b"POST /mp/%74rack/?verbose=1&data=a+b%2Bc HTTP/1.1\r\nHost: www.example.com\r\n"
        b"Content-Type: text/plain\r\nContent-Length: 5\r\nX-Dup: 1\r\nX-Dup: 2\r\n"
        b"Cookie: a=1\r\nCookie: b=2\r\n\r\nhello"
    )
    [(status, headers, body)] = await exchange(port, raw)
    import orjson

    seen = orjson.loads(body)
    assert status == 200 and headers["content-type"] == "application/json" and "date" in headers
    assert seen["method"] == "POST" and seen["path"] == "/mp/track/"  # percent-decoded for routing
    assert seen["query"] == [["verbose", "1"], ["data", "a b+c"]]
    assert seen["headers"]["host"] == "www.example.com"
    assert seen["headers"]["x-dup"] == "1, 2" and seen["headers"]["cookie"] == "a=1; b=2"
    assert seen["body"] == "hello" and seen["remote"] == "127.0.0.1" and seen["version"] == "1.1"


async def test_keep_alive_and_pipelined_requests_are_answered_in_order(serve):
    _, port = await serve()
    # The slow one first: its answer must still come first.
    raw = get("/slow?s=0.2") + get("/one") + get("/two")
    answers = await exchange(port, raw, responses=3)
    import orjson

    assert [orjson.loads(b)["path"] for _, _, b in answers] == ["/slow", "/one", "/two"]
    assert all("connection" not in h for _, h, _ in answers)


async def test_connection_close_and_http10_close_after_the_answer(serve):
    _, port = await serve()
    for raw in (get("/x", "Connection: close"), b"GET /x HTTP/1.0\r\n\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        status, headers, _ = await read_response(reader)
        assert status == 200 and headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
        writer.close()


async def test_chunked_body_is_assembled(serve):
    _, port = await serve()
    raw = b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    [(status, _, body)] = await exchange(port, raw)
    import orjson

    assert status == 200 and orjson.loads(body)["body"] == "abcde"


async def test_expect_100_continue_gets_an_interim_answer(serve):
    _, port = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"ok")
    status, _, _ = await read_response(reader)
    assert status == 200
    writer.close()


async def test_oversized_body_is_refused_before_it_is_read(serve):
    calls = []

    async def handler(request: Request) -> Response:
        calls.append(request)
        return Response(text="1")

    _, port = await serve(handler, max_body=100)
    [(status, headers, body)] = await exchange(port, b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 101\r\n\r\n")
    assert status == 413 and headers["connection"] == "close" and b"100 bytes" in body
    # Chunked: counted as it arrives.
    chunked = b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + b"40\r\n" + b"a" * 64 + b"\r\n"
    [(status, _, _)] = await exchange(port, chunked * 1 + b"40\r\n" + b"a" * 64 + b"\r\n0\r\n\r\n")
    assert status == 413 and calls == []


async def test_refusals_use_the_hook(serve):
    def refusal(status: int, message: str, target: bytes) -> Response:
        return json_response({"status": 0, "error": message, "target": target.decode()}, status=status)

    _, port = await serve(max_body=10, refusal=refusal)
    [(status, _, body)] = await exchange(port, b"POST /mp/track?verbose=1 HTTP/1.1\r\nContent-Length: 11\r\n\r\n")
    assert status == 413 and b'"target":"/mp/track?verbose=1"' in body


async def test_head_limits_and_malformed_requests(serve):
    _, port = await serve()
    [(status, _, _)] = await exchange(port, get("/" + "a" * 9000))
    assert status == 414
    many = [f"X-H{i}: v" for i in range(MAX_HEADERS + 1)]
    [(status, _, _)] = await exchange(port, get("/", *many))
    assert status == 431
    [(status, headers, _)] = await exchange(port, b"NOT HTTP AT ALL\r\n\r\n")
    assert status == 400 and headers["connection"] == "close"
    # An upgrade is not done: the request is answered as plain HTTP, then the connection closes.
    [(status, headers, _)] = await exchange(port, get("/", "Upgrade: websocket", "Connection: upgrade"))
    assert status == 200 and headers["connection"] == "close"
    # A bad request pipelined behind a good one: the good one is answered, then the connection closes.
    answers = await exchange(port, get("/slow?s=0.1") + b"BAD REQUEST\r\n\r\n")
    assert answers[0][0] == 200 and answers[0][1]["connection"] == "close"


async def test_a_failing_handler_answers_500_and_the_connection_lives_on(serve, caplog):
    _, port = await serve()
    answers = await exchange(port, get("/boom") + get("/after"), responses=2)
    assert [s for s, _, _ in answers] == [500, 200]
    assert "handler bug" in caplog.text


@pytest.mark.parametrize("kind", ["crlf", "lf", "cr"])
async def test_a_header_with_a_line_break_never_splits_the_response(serve, kind):
    _, port = await serve()
    [(status, headers, _)] = await exchange(port, get(f"/bad-header/{kind}"))
    assert status == 500 and "set-cookie" not in headers and "x-evil" not in headers


async def test_head_answers_have_no_body(serve):
    _, port = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"HEAD /h HTTP/1.1\r\nHost: t\r\n\r\n" + get("/next"))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: " in head
    status, _, body = await read_response(reader)  # the next answer follows at once: no body in between
    assert status == 200 and b'"/next"' in body
    writer.close()


async def test_idle_and_slow_clients_are_cut_off(serve, monkeypatch):
    monkeypatch.setattr("proxy.server.SWEEP_SECONDS", 0.05)
    _, port = await serve(keepalive_timeout=0.2, request_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(get("/x"))
    assert (await read_response(reader))[0] == 200
    assert await asyncio.wait_for(reader.read(), 5) == b""  # idle keep-alive closed
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")  # never finishes
    status, headers, _ = await read_response(reader)
    assert status == 408 and headers["connection"] == "close"
    writer.close()


async def test_shutdown_lets_running_requests_finish(serve):
    server, port = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(get("/slow?s=0.3"))
    await asyncio.sleep(0.05)
    await server.shutdown(5)
    status, headers, _ = await read_response(reader)
    assert status == 200 and headers["connection"] == "close"
    assert await asyncio.wait_for(idle_reader.read(), 5) == b""  # idle connection closed
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)  # no longer accepting
    writer.close()
    idle_writer.close()


@pytest.mark.parametrize(
    "raw",
    ["verbose=1&ip=1&_=1795374436452", "a=&b&=c&&d=1=2", "data=eyJ%2B%2F%3D&x=a+b%20c", "n%C3%A9=%E2%82%AC;x=1", "%zz=%"],
)
def test_query_pairs_agree_with_the_standard_library(raw):
    from urllib.parse import parse_qsl

    from proxy.core.forms import parse_pairs

    assert parse_pairs(raw) == parse_qsl(raw, keep_blank_values=True)


async def test_absolute_form_targets_are_routed_by_their_path(serve):
    _, port = await serve()
    raw = b"GET http://www.example.com/mp/decide?a=1 HTTP/1.1\r\nHost: www.example.com\r\n\r\n"
    [(status, _, body)] = await exchange(port, raw)
    import orjson

    seen = orjson.loads(body)
    assert status == 200 and seen["path"] == "/mp/decide" and seen["query"] == [["a", "1"]]


async def test_http10_keep_alive_is_confirmed(serve):
    _, port = await serve()
    one = b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    answers = await exchange(port, one + b"GET /b HTTP/1.0\r\n\r\n", responses=2)
    assert answers[0][1]["connection"] == "keep-alive" and answers[1][1]["connection"] == "close"


@pytest.mark.parametrize(
    "head",
    [
        # Both framings: a front end and this server could disagree on where the body ends.
        b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked, identity\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: t\r\nBad Header: v\r\n\r\n",
    ],
    ids=["cl-and-te", "two-lengths", "te-not-last-chunked", "negative-length", "space-in-name"],
)
async def test_ambiguous_framing_is_refused_not_guessed(serve, head):
    seen: list[Request] = []

    async def handler(request: Request) -> Response:
        seen.append(request)
        return Response(text="1")

    _, port = await serve(handler)
    [(status, headers, _)] = await exchange(port, head + b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n")
    assert status == 400 and headers["connection"] == "close"
    assert seen == []  # neither the request nor anything smuggled behind it reached a handler


async def test_a_handler_outliving_the_shutdown_deadline_ends_quietly(serve, caplog):
    server, port = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(get("/slow?s=0.5"))
    await asyncio.sleep(0.05)
    await server.shutdown(0.1)  # gives up on the running handler and aborts its connection
    assert await asyncio.wait_for(reader.read(), 5) == b""
    await asyncio.sleep(0.6)  # the handler finishes into a closed connection
    assert [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")] == []
    writer.close()


async def test_the_app_serves_with_the_timeouts_its_settings_name(serve_proxy, tmp_path, upstream, monkeypatch):
    from proxy.web.app import create_app
    from tests.conftest import make_settings

    monkeypatch.setattr("proxy.server.SWEEP_SECONDS", 0.05)
    settings = make_settings(
        tmp_path, upstream, server={"keepalive_timeout_seconds": 1, "request_timeout_seconds": 1.5}
    )
    client = await serve_proxy(create_app(settings))
    assert (client.server.keepalive_timeout, client.server.request_timeout) == (1.0, 1.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(get("/healthz"))
    assert (await read_response(reader))[0] == 200
    started = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed once idle for 1 s
    assert 0.8 < asyncio.get_running_loop().time() - started < 3
    writer.close()
