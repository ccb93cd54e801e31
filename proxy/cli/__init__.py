"""The ``firstparty`` command: serve, logs, keygen, apikey, spool, replay, check, forget, fake-upstream.

One module per command (its parser and its work); ``main()`` is the only
broad ``except``: known errors become one clear line and an exit code (2 for
configuration and usage, 1 for anything else).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import ConfigError, ProxyError
from ..lograte import EscapingFormatter
from ..settings import env_help
from . import check, fake, forget, keys, logs, serve, spool
from .serve import GC_YOUNG_THRESHOLD, tune_gc

__all__ = ["GC_YOUNG_THRESHOLD", "main", "tune_gc"]

COMMANDS = {
    "serve": serve.cmd_serve,
    "logs": logs.cmd_logs,
    "keygen": keys.cmd_keygen,
    "apikey": keys.cmd_apikey,
    "spool": lambda args: spool.cmd_spool_check(args) if args.spool_command == "check" else spool.cmd_spool_stats(args),
    "replay": spool.cmd_replay,
    "check": check.cmd_check,
    "forget": forget.cmd_forget,
    "fake-upstream": fake.cmd_fake_upstream,
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="firstparty",
        description="First-party tracking proxy for Mixpanel and Segment with cross-domain identity.",
        epilog=f"Environment overrides (FIRSTPARTY_<SECTION>_<KEY>, values in TOML syntax): "
        f"FIRSTPARTY_CONFIG, {env_help()}",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (serve, logs, keys, spool, check, forget, fake):
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    # Until a command has read its settings (serve applies log.level).
    level = os.environ.get("FIRSTPARTY_LOG_LEVEL", "info").strip('"').upper()
    handler = logging.StreamHandler()
    handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level, logging.INFO), handlers=[handler])
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"firstparty: {exc}", file=sys.stderr)
        return 2
    except ProxyError as exc:
        print(f"firstparty: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"firstparty: {exc.strerror or exc}: {getattr(exc, 'filename', '') or ''}".rstrip(": "), file=sys.stderr)
        return 1
