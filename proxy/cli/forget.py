"""``firstparty forget ID``: remove what the proxy keeps about one visitor.

With ``store.url = "redis://..."`` the records are in Redis: the command
removes them itself. With the in-memory store they live inside the serving
process: the command asks it, through its ops listener's ``POST /forget``,
with a server key (``--key``, from ``firstparty apikey``).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import orjson

from ..errors import ConfigError, ProxyError
from ..settings import Settings, load_settings


def add_parser(sub: Any) -> None:
    forget = sub.add_parser(
        "forget", help="remove everything the proxy keeps about a visitor (any of their ids); lists what went"
    )
    forget.add_argument("id", help="the visitor's canonical id, or any original id joined to it")
    forget.add_argument("--config", "-c", help="settings file (store.url, the ops listener)")
    forget.add_argument("--key", help="a server key (identity.api_keys_file), to ask a running proxy (memory store)")


def cmd_forget(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    if settings.store.url.startswith("redis://"):
        removed = asyncio.run(_forget_in_store(settings, args.id))
    else:
        if not args.key:
            raise ConfigError(
                "--key", "the memory store lives in the serving process: pass a server key (firstparty apikey) "
                "to ask it through its ops listener"
            )
        removed = asyncio.run(_ask_the_proxy(settings, args.id, args.key))
    for kind, keys in removed.items():
        for key in keys:
            print(f"removed {kind:<8} {key}")
    total = sum(map(len, removed.values()))
    print(f"{total} record{'s' if total != 1 else ''} removed; the vendors' copies are theirs to delete (README, Privacy)")
    return 0


async def _forget_in_store(settings: Settings, given: str) -> dict[str, list[str]]:
    from ..services.store import AliasStore

    store = AliasStore.from_settings(settings.store)
    try:
        return await store.forget(given)
    except ValueError as exc:
        raise ConfigError("id", str(exc)) from exc
    finally:
        await store.close()


async def _ask_the_proxy(settings: Settings, given: str, key: str) -> dict[str, list[str]]:
    import aiohttp

    ops = settings.ops
    if not ops.port:
        raise ConfigError("ops.port", "0: the proxy has no ops listener to ask")
    url = f"http://{ops.host}:{ops.port}/forget"
    try:
        async with aiohttp.ClientSession() as session, session.post(
            url, data=orjson.dumps({"id": given}), headers={"Authorization": f"Bearer {key}"}
        ) as resp:
            body = await resp.read()
    except aiohttp.ClientError as exc:
        raise ProxyError(f"cannot reach the proxy's ops listener at {url}: {exc}") from exc
    answer = orjson.loads(body) if body[:1] == b"{" else {}
    if resp.status != 200:
        raise ProxyError(f"{url} answered {resp.status}: {answer.get('error', body[:200].decode(errors='replace'))}")
    return answer["removed"]
