"""The floor under the proxy: a bare server that reads the body and answers
``1``. ``app``: an aiohttp Application with a router; ``server``: aiohttp's
low-level server; ``httptools``: an ``asyncio.Protocol`` on httptools, the
parser aiohttp's C parser also wraps. Used by bench/run.py (row E) and bench/instructions.sh."""

import asyncio
import sys

import uvloop
from aiohttp import web


async def handle(request: web.BaseRequest) -> web.Response:
    await request.read()
    return web.Response(text="1")


ONE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 1\r\n\r\n1"


class Bare(asyncio.Protocol):
    """Just enough HTTP/1.1 to answer keep-alive POSTs, one task per request
    as proxy/server.py runs them."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        import httptools  # only this floor needs it (pip install httptools)

        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)
        self.body: list[bytes] = []

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body, self.body = b"".join(self.body), []
        asyncio.get_running_loop().create_task(self.answer(body))

    async def answer(self, body: bytes) -> None:
        self.transport.write(ONE)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)


async def main(port: int, kind: str) -> None:
    if kind == "httptools":
        await asyncio.get_running_loop().create_server(Bare, "127.0.0.1", port)
        await asyncio.Event().wait()
    if kind == "app":
        app = web.Application()
        app.router.add_route("*", "/mp/track/", handle)
        app.router.add_get("/healthz", handle)
        runner: web.BaseRunner = web.AppRunner(app, access_log=None)
    else:
        runner = web.ServerRunner(web.Server(handle), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.install()
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
