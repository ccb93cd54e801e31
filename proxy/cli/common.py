"""What the commands share: the process log, and settings read with the command line's overrides."""

from __future__ import annotations

import argparse
import logging
import os

from ..settings import Settings, load_settings

log = logging.getLogger("firstparty")


def settings_for(args: argparse.Namespace) -> Settings:
    env = dict(os.environ)
    if getattr(args, "host", None):
        env["FIRSTPARTY_SERVER_HOST"] = f'"{args.host}"'
    if getattr(args, "port", None) is not None:
        env["FIRSTPARTY_SERVER_PORT"] = str(args.port)
    if getattr(args, "workers", None) is not None:
        env["FIRSTPARTY_SERVER_WORKERS"] = str(args.workers)
    if getattr(args, "ops_port", None) is not None:
        env["FIRSTPARTY_OPS_PORT"] = str(args.ops_port)
    return load_settings(args.config, env)
