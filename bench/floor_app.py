"""The floor under the proxy: a bare aiohttp server that reads the body and
answers ``1`` (``app``: an Application with a router, ``server``: aiohttp's
low-level server). Used by bench/instructions.sh for comparison."""

import asyncio
import sys

import uvloop
from aiohttp import web


async def handle(request: web.BaseRequest) -> web.Response:
    await request.read()
    return web.Response(text="1")


async def main(port: int, kind: str) -> None:
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
