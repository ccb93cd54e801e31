"""Serving an app: aiohttp's ``AppRunner`` and ``TCPSite`` with the limits
and the quiet error log a server facing browsers needs.

The limits are aiohttp's own knobs (``docs/web_reference``): the request line
(``max_line_size``), each header (``max_field_size``), the number of headers
(``max_headers``), the body (``client_max_size``, set on the app) and the idle
keep-alive time. Slow clients are nginx's to cut off (``client_header_timeout``,
``client_body_timeout``, ``send_timeout`` in ``nginx.example.conf``); the body
read is also bounded here by ``server.request_timeout_seconds``.

aiohttp logs a malformed request as an ERROR with a traceback; a flood of
them would flood the log. ``QuietServerLog`` turns a client's protocol error
into at most one WARNING line a minute, without a traceback, naming how many
were refused since the last line. Errors of our own (a handler bug) keep
their traceback.

The ``Server`` header names the product, never the versions under it: the app
sets it on its answers (``web.app.server_header``), and aiohttp's own answer to
a request it cannot parse (which never reaches an app or its signals) takes
its default from ``aiohttp.web_response.SERVER_SOFTWARE``, set here.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web, web_response
from aiohttp.http_exceptions import HttpProcessingError

from ..settings import ServerSettings

log = logging.getLogger("firstparty.http")

MAX_LINE = 8190  # the request line, as nginx's large_client_header_buffers
MAX_FIELD = 8190  # one header line
MAX_HEADERS = 128
BAD_REQUEST_LOG_SECONDS = 60.0
SERVER = "firstparty"

# aiohttp's default for every answer it prepares, its own error answers included.
web_response.SERVER_SOFTWARE = SERVER


class QuietServerLog:
    """The logger aiohttp's request handler writes to (``logger=``)."""

    def __init__(self, target: logging.Logger = log, every: float = BAD_REQUEST_LOG_SECONDS) -> None:
        self._log = target
        self._every = every
        self._last = -every
        self._since_last = 0

    def _client_error(self, exc: BaseException | None) -> bool:
        if isinstance(exc, HttpProcessingError):
            return True
        # A request aiohttp could not even read (a reset mid-head, a TLS hello on a plain port).
        return isinstance(exc, (ConnectionResetError, UnicodeDecodeError))

    def exception(self, msg: str, *args: Any, exc_info: Any = None, **kw: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else None
        if not self._client_error(exc):
            self._log.error(msg, *args, exc_info=exc_info, **kw)
            return
        self._since_last += 1
        now = time.monotonic()
        if now - self._last < self._every:
            return
        self._last = now
        peer = args[0] if args else "?"
        more = f" ({self._since_last - 1} more since the last such line)" if self._since_last > 1 else ""
        self._since_last = 0
        reason = getattr(exc, "message", None) or str(exc)
        self._log.warning("refused a malformed request from %s: %s%s", peer, reason.splitlines()[0][:200], more)

    def debug(self, msg: str, *args: Any, **kw: Any) -> None:
        kw.pop("exc_info", None)  # aiohttp logs refused non-HTTP bytes at debug, traceback included
        self._log.debug(msg, *args, **kw)

    def warning(self, msg: str, *args: Any, **kw: Any) -> None:
        self._log.warning(msg, *args, **kw)

    def info(self, msg: str, *args: Any, **kw: Any) -> None:
        self._log.info(msg, *args, **kw)

    def error(self, msg: str, *args: Any, **kw: Any) -> None:
        self._log.error(msg, *args, **kw)

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 - logging.Logger's name
        return self._log.isEnabledFor(level)


def runner_for(app: web.Application, server: ServerSettings, shutdown_timeout: float) -> web.AppRunner:
    """An ``AppRunner`` with our limits; ``await runner.setup()`` next."""
    return web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,  # the forwarded log is the record of what happened
        shutdown_timeout=shutdown_timeout,
        keepalive_timeout=server.keepalive_timeout_seconds,
        max_line_size=MAX_LINE,
        max_field_size=MAX_FIELD,
        max_headers=MAX_HEADERS,
        # Bodies arrive as sent: ``core.codec`` inflates them itself, bounded by
        # the body limit (a gzip bomb stops at server.max_body_bytes).
        auto_decompress=False,
        logger=QuietServerLog(),
    )


@dataclass
class Serving:
    """A started app: its runner and the port its site listens on."""

    runner: web.AppRunner
    port: int

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (``shutdown_timeout``),
        then run the app's clean-up (the sender drains, resources close)."""
        await self.runner.cleanup()


async def serve(
    app: web.Application,
    server: ServerSettings,
    *,
    host: str | None = None,
    port: int | None = None,
    reuse_port: bool = False,
    shutdown_timeout: float = 10.0,
    sock: socket.socket | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> Serving:
    """Serve ``app`` on ``host``:``port`` (the settings' by default), or on
    ``sock``, a socket already bound (handed over by whoever reserved it).
    In production nginx terminates TLS in front; ``ssl_context`` is for
    what needs https end to end without it (browser tests of CHIPS)."""
    runner = runner_for(app, server, shutdown_timeout)
    try:
        await runner.setup()
    except BaseException:
        await runner.cleanup()  # what did open (the upstream session...) closes again
        raise
    site: web.BaseSite
    if sock is not None:
        site = web.SockSite(runner, sock, backlog=1024, ssl_context=ssl_context)
    else:
        site = web.TCPSite(
            runner, host or server.host, server.port if port is None else port, reuse_port=reuse_port, backlog=1024,
            ssl_context=ssl_context,
        )
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    sockets = runner.addresses
    bound = sockets[0][1] if sockets else 0
    return Serving(runner, bound)
