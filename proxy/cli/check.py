"""``firstparty check``: the config doctor (``proxy.doctor``) from the command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import tomllib
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..settings import load_settings


def add_parser(sub: Any) -> None:
    check = sub.add_parser("check", help="the config doctor: each problem with its fix (exit 1 on errors)")
    check.add_argument("--config", "-c", help="TOML settings file (default: $FIRSTPARTY_CONFIG, else built-in defaults)")
    check.add_argument("--online", action="store_true", help="also resolve and TLS-handshake every upstream and fetch the SDKs")
    check.add_argument("--nginx", metavar="FILE", help="also check the site's nginx config against the mounts")
    check.add_argument("--instances", type=int, default=1, help="how many instances share this config (default 1)")
    check.add_argument("--write-key", action="append", default=[], help="with --online: a Segment write key whose region to check")


def cmd_check(args: argparse.Namespace) -> int:
    """Print every finding with its fix; 1 when any is an error, else 0. A
    config the loader refuses is one error (its own message)."""
    from .. import doctor

    env = dict(os.environ)
    path = args.config or env.get("FIRSTPARTY_CONFIG")
    try:
        settings = load_settings(path, env)
    except ConfigError as exc:
        print(f"error   {exc.key}: {exc.message}")
        print("1 error, 0 warnings (the config does not load)")
        return 1
    raw: dict[str, Any] = {}
    if path:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    ctx = doctor.Context(settings, raw, env, max(1, args.instances))
    found = doctor.findings(ctx)
    if args.nginx:
        found += doctor.nginx_findings(ctx, Path(args.nginx))
    if args.online:
        found += asyncio.run(doctor.online_findings(ctx, args.write_key))
    for line in doctor.privacy_in_force(settings):
        print(line)
    for finding in found:
        print(finding.line())
    errors = sum(f.level == doctor.ERROR for f in found)
    warnings = len(found) - errors
    checked = "config" + (", nginx" if args.nginx else "") + (", upstreams" if args.online else "")
    print(f"{errors} error{'s' if errors != 1 else ''}, {warnings} warning{'s' if warnings != 1 else ''} ({checked} checked)")
    return 1 if errors else 0
