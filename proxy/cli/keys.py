"""``firstparty keygen`` and ``apikey``: identity keys and app backends' server keys."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..files import write_private
from ..settings import load_settings


def add_parser(sub: Any) -> None:
    keygen = sub.add_parser(
        "keygen", help="add a new identity key (it signs from now on; older keys still verify until removed)"
    )
    keygen.add_argument("--config", "-c", help="settings file, to find identity.keys_file")
    keygen.add_argument("--file", help="the keys file to write (default: identity.keys_file)")
    keygen.add_argument("--id", help="key id (1-8 letters, digits, '-' or '_'; default random)")
    keygen.add_argument("--print", action="store_true", help="only print a new key line, write nothing")

    apikey = sub.add_parser(
        "apikey", help="add a server key for an app backend (POST /mp/bridge with a device id); prints the key once"
    )
    apikey.add_argument("--name", required=True, help="what logs and metrics call this key (e.g. ios-app)")
    apikey.add_argument("--config", "-c", help="settings file, to find identity.api_keys_file")
    apikey.add_argument("--file", help="the server keys file to write (default: identity.api_keys_file)")
    apikey.add_argument("--print", action="store_true", help="only print a new key line, write nothing")


def cmd_keygen(args: argparse.Namespace) -> int:
    from ..core.tokens import KeyRing, generate_key_line

    try:
        line = generate_key_line(args.id)
    except ValueError as exc:
        raise ConfigError("--id", str(exc)) from exc
    if args.print:
        print(line)
        return 0
    if args.file:
        path = Path(args.file)
    else:
        path = Path(load_settings(args.config).identity.keys_file)
    old = path.read_text() if path.exists() else ""
    header = [ln for ln in old.splitlines() if ln.strip().startswith("#")]
    keys = [ln for ln in old.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    text = "\n".join([*header, line, *keys]) + "\n"  # the first key signs
    try:
        KeyRing.from_file(text)
    except ValueError as exc:
        raise ConfigError(str(path), str(exc)) from exc
    write_private(path, text)
    key_id = line.split()[0]
    print(f"added key {key_id} to {path}; it signs after the proxy restarts, {len(keys)} older key(s) still verify")
    return 0


def cmd_apikey(args: argparse.Namespace) -> int:
    from ..core.apikeys import ApiKeys, generate_key_line

    try:
        line = generate_key_line(args.name)
    except ValueError as exc:
        raise ConfigError("--name", str(exc)) from exc
    if args.print:
        print(line)
        return 0
    target = args.file or load_settings(args.config).identity.api_keys_file
    if not target:
        raise ConfigError("identity.api_keys_file", "not set; set it (or pass --file) to say where server keys live")
    path = Path(target)
    old = path.read_text() if path.exists() else "# firstparty server keys: <name> <key>; `firstparty apikey` adds one\n"
    text = old + ("" if old.endswith("\n") else "\n") + line + "\n"
    try:
        ApiKeys.from_file(text)
    except ValueError as exc:
        raise ConfigError(str(path), str(exc)) from exc
    write_private(path, text)
    print(f"added server key {args.name!r} to {path} (read at the next start); give it to that backend only:")
    print(line.split()[1])
    return 0
