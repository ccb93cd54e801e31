"""``firstparty fake-upstream``: the recording fake of both vendors on one port."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..lograte import escape_control


def add_parser(sub: Any) -> None:
    fake = sub.add_parser(
        "fake-upstream",
        help="a fake Mixpanel and Segment on one port (staging, demos): answers like them, prints each request, sends nothing on",
    )
    fake.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    fake.add_argument("--port", type=int, default=9100, help="listen port (default 9100; 0: any free port)")
    fake.add_argument("--mixpanel-js", metavar="FILE", help="mixpanel-js's snippet build to serve as the CDN's "
                      "(npm mixpanel-browser: dist/mixpanel.min.js); default: a one-line stand-in")
    fake.add_argument("--analytics-js", metavar="DIR", help="analytics.js's builds to serve as Segment's CDN's "
                      "(npm @segment/analytics-next: dist/umd); default: a one-line stand-in")


def cmd_fake_upstream(args: argparse.Namespace) -> int:
    """Both vendors on one port until SIGTERM/SIGINT, a line per request."""
    from ..fake import serve_fake

    mixpanel_js = Path(args.mixpanel_js) if args.mixpanel_js else None
    analytics_js = Path(args.analytics_js) if args.analytics_js else None
    if mixpanel_js is not None and not mixpanel_js.is_file():
        raise ConfigError("--mixpanel-js", f"{mixpanel_js} is not a file")
    if analytics_js is not None and not (analytics_js / "standalone.js").is_file():
        raise ConfigError("--analytics-js", f"{analytics_js} holds no standalone.js (npm @segment/analytics-next: dist/umd)")

    def say(line: str) -> None:
        print(escape_control(line), flush=True)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        runner, port = await serve_fake(args.host, args.port, mixpanel_js=mixpanel_js, analytics_js=analytics_js, printer=say)
        url = f"http://{args.host}:{port}"
        say(f"fake Mixpanel and Segment on {url}: nothing is sent on. Point every upstream at it, e.g. "
            f"FIRSTPARTY_UPSTREAM_US={url} FIRSTPARTY_UPSTREAM_DECIDE={url} FIRSTPARTY_UPSTREAM_CDN={url} "
            f"FIRSTPARTY_SEGMENT_US={url} FIRSTPARTY_SEGMENT_CDN={url}")
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(run())
    return 0
