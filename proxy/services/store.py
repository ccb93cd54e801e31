"""The identity store: what the proxy remembers about visitors, on aiocache.

One record kind per method pair (aliases original -> canonical, device
records per host, the device count per canonical id, carried properties,
first touches, token claims); ``AliasStore._key`` alone builds keys.
``memory://`` (default) is an in-process cache bounded in bytes;
``redis://...`` shares the records between workers and instances.

Invariants:
- a client's id never names a record of another kind or another visitor:
  keys are ``<kind>/<part>...`` and no part may hold ``/`` (ids pass
  ``core.ids`` at the edge, and ``_key`` refuses any part that is not safe);
- an alias is written once (first write wins, ``SET NX``); only a request
  that proved its canonical id repoints one (``add_aliases(repoint=True)``);
- a store failure never fails a request: lookups degrade to "unknown" and
  writes are skipped, each counted in ``errors`` and logged once a minute at most;
- a pair already written by this process is not written again (a bounded
  local set), so a returning visitor costs no store write per request.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson

from aiocache import Cache, SimpleMemoryCache
from aiocache.base import BaseCache
from aiocache.serializers import StringSerializer

from ..core.bridge import PURPOSES as LANDING_PURPOSES
from ..core.ids import valid_id
from ..lograte import Throttled
from ..settings import StoreSettings

log = logging.getLogger(__name__)

# Redis: every key is "fp::<kind>/<part>[/<part>...]" (aiocache joins the namespace
# and ``AliasStore._key``'s key with a ":").
NAMESPACE = "fp:"
# Redis records live as long as the longest cookie could (400 days).
ALIAS_TTL_SECONDS = 400 * 86400

# The kinds of record; each key starts with its kind and a "/", which no part may hold.
ALIAS = "alias"  # original id -> canonical id
DEVICES = "devices"  # canonical id -> how many device ids it joins
HOST = "host"  # canonical id, host, project -> the device id last shown there, and when
CARRY = "carry"  # canonical id -> carried properties (JSON)
TOUCH = "touch"  # canonical id -> first external touch (JSON)
CLAIM = "claim"  # token id -> the first presenter
MAX_CLAIMS = 200_000  # live token claims kept in memory (about 40 MB); past it tokens are refused
LANDED = "landed"  # canonical id, host -> the token a landing script redeemed there (its purpose), for a while
# A key part: an id (``core.ids``), a host name or a project token; never "/".
_PART = re.compile(r"[A-Za-z0-9_\-:.\[\]]{1,253}")
# A JSON record read back or written (carried properties, a first touch).
MAX_RECORD_CHARS = 64 * 1024


class BoundedMemoryCache(SimpleMemoryCache):
    """aiocache's memory backend with a ceiling in bytes: the oldest-written
    key goes first.

    The stock backend grows without bound; a proxy that sees every visitor's
    device id must not, and counting entries would let a few large values
    fill memory. Each entry costs its key's and value's characters plus
    ``ENTRY_OVERHEAD`` (the dict slot and the two string objects)."""

    ENTRY_OVERHEAD = 160

    def __init__(self, max_bytes: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self._max_bytes = max_bytes
        self.bytes = 0

    def _cost(self, key: str, value: object) -> int:
        return len(key) + (len(value) if isinstance(value, str) else 16) + self.ENTRY_OVERHEAD

    def _drop(self, key: str) -> None:
        if key in self._cache:
            self.bytes -= self._cost(key, self._cache.pop(key))

    def _store(self, key: str, value: object) -> None:
        self._drop(key)  # re-setting moves the key to the young end
        self._cache[key] = value
        self.bytes += self._cost(key, value)
        self._evict()

    async def _set(self, key, value, ttl=None, _cas_token=None, _conn=None):
        # No timers: memory entries live until the byte bound evicts them
        # (claims keep their own expiry in the value, ``AliasStore.claim_token``).
        self._store(key, value)
        return True

    def _evict(self) -> None:
        while self.bytes > self._max_bytes and self._cache:
            self._drop(next(iter(self._cache)))

    # Synchronous twins for the request path. aiocache's public calls wrap
    # each operation in four decorators (timeout, plugins, an os.getenv check,
    # key building): ~10 % of a request's CPU for what is a dict lookup here.
    def get_now(self, keys: list[str]) -> list[str | None]:
        return [self._cache.get(k) for k in keys]

    def put_now(self, pairs: list[tuple[str, str]], *, only_new: bool = False) -> set[str]:
        """Store ``pairs`` (``only_new``: only keys not held yet); the keys stored."""
        stored = set()
        for key, value in pairs:
            if only_new and key in self._cache:
                continue
            self._store(key, value)
            stored.add(key)
        return stored

    def incr_now(self, key: str) -> int:
        value = int(self._cache.get(key) or 0) + 1
        self._store(key, str(value))
        return value

    def scan_now(self, prefix: str) -> list[tuple[str, str]]:
        """Every (key, value) whose key starts with ``prefix`` (an operator's
        ``forget``: a walk over the whole cache, never on the request path)."""
        return [(k, v) for k, v in list(self._cache.items()) if k.startswith(prefix)]

    def delete_now(self, keys: list[str]) -> None:
        for key in keys:
            self._drop(key)


def open_cache(settings: StoreSettings, namespace: str) -> BaseCache:
    if settings.url.startswith("redis://"):
        cache = Cache.from_url(settings.url)
        cache.serializer = StringSerializer()
        cache.namespace = namespace
        cache.timeout = 1.0  # a slow Redis must not hold events for long
        return cache
    # In-process: no timeout (no wait_for task per call) and no namespace
    # (nothing else shares this dict), so keys are used as they are.
    return BoundedMemoryCache(settings.max_bytes, timeout=None)


class _Recent:
    """A bounded set of recently seen keys."""

    __slots__ = ("_items", "_max")

    def __init__(self, max_items: int) -> None:
        self._items: OrderedDict[str, None] = OrderedDict()
        self._max = max_items

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def add(self, key: str) -> None:
        self._items[key] = None
        if len(self._items) > self._max:
            self._items.popitem(last=False)

    def discard_if(self, gone: Any) -> None:
        for key in [k for k in self._items if gone(k)]:
            del self._items[key]


class AliasStore:
    """The proxy's records about visitors, one method pair per kind.

    Nothing outside this class builds a key: ``_key`` joins a fixed kind and
    parts that each passed ``_PART`` (no ``/``), so a client's id can never
    name another kind's record or another visitor's. Values are checked as
    they are read back (an alias must be a valid id, a JSON record a bounded
    object); anything else reads as absent."""

    def __init__(self, cache: BaseCache, *, ttl: int | None = None) -> None:
        self._cache = cache
        # Memory entries are bounded by bytes instead: a TTL there would cost
        # one timer handle per key.
        self._ttl = ttl
        self._memory = cache if isinstance(cache, BoundedMemoryCache) else None
        self._written = _Recent(100_000)  # pairs this process stored
        self._refused = _Recent(100_000)  # pairs it was asked to store where another alias stood
        self.errors = 0
        self.refused_keys = 0
        self._warn = Throttled(log)
        self._forgetting = asyncio.Lock()  # one forget at a time (each walks the store)
        # Memory: token claims, kept apart from the cache whose oldest entries a
        # flood of new visitors evicts (a claim evicted is a token spent again).
        self._claims: dict[str, str] = {}
        self._claims_pruned_at = 0  # when the expired ones were last taken out (unix seconds)

    @classmethod
    def from_settings(cls, settings: StoreSettings) -> "AliasStore":
        ttl = ALIAS_TTL_SECONDS if settings.url.startswith("redis://") else None
        return cls(open_cache(settings, NAMESPACE), ttl=ttl)

    def _failed(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        self._warn.warning("store", "alias store %s failed (%s); continuing without it", what, type(exc).__name__)

    def _key(self, kind: str, *parts: str) -> str | None:
        """The key of one record, or None (counted) when a part is not safe."""
        for part in parts:
            if not isinstance(part, str) or _PART.fullmatch(part) is None:
                self.refused_keys += 1
                return None
        return kind + "/" + "/".join(parts)

    # ---------------------------------------------------------- raw access

    async def _get_many(self, keys: list[str]) -> list[str | None]:
        if self._memory is not None:
            return self._memory.get_now(keys)
        try:
            return list(await self._cache.multi_get(keys))
        except Exception as exc:  # noqa: BLE001 - any backend failure degrades
            self._failed("lookup", exc)
            return [None] * len(keys)

    async def _get(self, key: str) -> str | None:
        return (await self._get_many([key]))[0]

    async def _set(self, key: str, value: str, ttl: int | None = None) -> None:
        if self._memory is not None:
            self._memory.put_now([(key, value)])
            return
        try:
            await self._cache.set(key, value, ttl=ttl or self._ttl)
        except Exception as exc:  # noqa: BLE001
            self._failed("write", exc)

    async def _get_json(self, key: str | None) -> dict[str, Any]:
        raw = await self._get(key) if key else None
        if not raw or len(raw) > MAX_RECORD_CHARS:
            return {}
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return {}
        return value if isinstance(value, dict) else {}

    async def _set_json(self, key: str | None, value: Mapping[str, Any]) -> bool:
        text = orjson.dumps(value).decode()
        if key is None or len(text) > MAX_RECORD_CHARS:
            return False
        await self._set(key, text)
        return True

    # ------------------------------------------------------------- aliases

    async def aliases(self, ids: list[str]) -> dict[str, str]:
        """original id -> canonical id, for the ids the store knows."""
        keyed = [(i, k) for i in ids if (k := self._key(ALIAS, i)) is not None]
        if not keyed:
            return {}
        values = await self._get_many([k for _, k in keyed])
        return {i: v for (i, _), v in zip(keyed, values) if v and valid_id(v)}

    async def add_aliases(self, pairs: Mapping[str, str], *, repoint: bool = False) -> None:
        """Remember original -> canonical. An existing alias keeps its canonical
        id (first write wins) unless ``repoint``: only a request that proved its
        canonical id (its own cookie, a redeemed token) may move one."""
        fresh = []
        for original, canonical in pairs.items():
            key = self._key(ALIAS, original)
            pair = f"{original}\0{canonical}"
            if key is None or not valid_id(canonical) or pair in self._written or (not repoint and pair in self._refused):
                continue
            fresh.append((original, key, canonical))
        if not fresh:
            return
        if self._memory is not None:
            stored = self._memory.put_now([(k, c) for _, k, c in fresh], only_new=not repoint)
        else:
            stored = set()
            try:
                if repoint:
                    await self._cache.multi_set([(k, c) for _, k, c in fresh], ttl=self._ttl)
                    stored = {k for _, k, _ in fresh}
                else:
                    for _, key, canonical in fresh:
                        try:
                            await self._cache.add(key, canonical, ttl=self._ttl)  # SET NX
                            stored.add(key)
                        except ValueError:  # aiocache: the key exists
                            pass
            except Exception as exc:  # noqa: BLE001 - any backend failure degrades
                self._failed("write", exc)
                return
        # A pair refused here (first write wins) is not asked for again by
        # requests that merely name it, but one that proves it still writes it.
        for original, key, canonical in fresh:
            (self._written if key in stored else self._refused).add(f"{original}\0{canonical}")

    def recently_written(self, original: str, canonical: str) -> bool:
        """Whether this process already stored this pair, or was refused it (no store call)."""
        pair = f"{original}\0{canonical}"
        return pair in self._written or pair in self._refused

    async def count_device(self, canonical: str) -> int:
        """Count one more device id joined to ``canonical``; returns the total."""
        key = self._key(DEVICES, canonical)
        if key is None:
            return 0
        if self._memory is not None:
            return self._memory.incr_now(key)
        try:
            count = int(await self._cache.increment(key, 1))
            if count == 1 and self._ttl:
                await self._cache.expire(key, self._ttl)
            return count
        except Exception as exc:  # noqa: BLE001
            self._failed("count", exc)
            return 0

    # ----------------------------------------------------- device records

    async def device_record(self, canonical: str, host: str, project: str | None) -> str | None:
        """The device id ``host`` last showed for ``canonical`` and when:
        ``"<device>|<unix seconds>"`` (``identity.device_change``)."""
        key = self._key(HOST, canonical, host, project or "-")
        raw = await self._get(key) if key else None
        if raw is None:
            return None
        device, sep, seen = raw.rpartition("|")
        return raw if sep and valid_id(device) and seen.isdigit() else None

    async def set_device_record(self, canonical: str, host: str, project: str | None, device: str, seen: int) -> None:
        key = self._key(HOST, canonical, host, project or "-")
        if key is not None and valid_id(device):
            await self._set(key, f"{device}|{seen}")

    # ------------------------------------------- carried properties, first touch

    async def carried(self, canonical: str) -> dict[str, Any]:
        """The properties kept for ``canonical`` (``core.carry``), {} if none."""
        return await self._get_json(self._key(CARRY, canonical))

    async def set_carried(self, canonical: str, values: Mapping[str, Any]) -> None:
        await self._set_json(self._key(CARRY, canonical), values)

    async def first_touch(self, canonical: str) -> dict[str, Any]:
        """The first external touch kept for ``canonical`` (``protocols.firsttouch``), {} if none."""
        return await self._get_json(self._key(TOUCH, canonical))

    async def set_first_touch(self, canonical: str, touch: Mapping[str, Any]) -> bool:
        return await self._set_json(self._key(TOUCH, canonical), touch)

    # ------------------------------------------------------------- landings

    async def landed(self, canonical: str, host: str) -> str | None:
        """How a landing script's token brought ``canonical`` to ``host`` (the
        token's purpose: ``bridge``, ``hub``, ``frame``, ``app``), while it is
        recent; None otherwise."""
        key = self._key(LANDED, canonical, host)
        raw = await self._get(key) if key else None
        if not raw:
            return None
        purpose, _, until = raw.partition("|")
        if not until.isdigit() or int(until) < time.time() or purpose not in LANDING_PURPOSES:
            return None
        return purpose

    async def set_landed(self, canonical: str, host: str, purpose: str, ttl: int) -> None:
        key = self._key(LANDED, canonical, host)
        if key is not None and purpose in LANDING_PURPOSES:
            await self._set(key, f"{purpose}|{int(time.time()) + ttl}", ttl=ttl)

    # --------------------------------------------------------------- claims

    async def claim_token(self, token_id: str, owner: str, ttl: int) -> str | None:
        """Atomically record ``owner`` as the first presenter of a token (for
        ``ttl`` seconds). Returns None when this call claimed it, else the first
        owner. A store failure or an unusable id counts as claimed by someone
        else: single use is a security property, so without the store a token
        is refused."""
        key = self._key(CLAIM, token_id)
        if key is None:
            return "?"
        if self._memory is not None:
            # No timers in memory: the claim keeps its expiry beside the owner.
            now = int(time.time())
            current = self._claims.get(key)
            if current:
                first, _, until = current.rpartition("|")
                if until.isdigit() and int(until) >= now:
                    return first
            if len(self._claims) >= MAX_CLAIMS and now > self._claims_pruned_at:
                # A walk over them all: at most once a second, however many tokens a flood presents.
                self._claims_pruned_at = now
                self._claims = {k: v for k, v in self._claims.items() if int(v.rpartition("|")[2]) >= now}
            if len(self._claims) >= MAX_CLAIMS:  # a flood of live tokens: refused, never forgotten
                self._warn.warning("claims", "%d token claims are live (the most kept in memory); refusing more", MAX_CLAIMS)
                return "?"
            self._claims[key] = f"{owner}|{now + ttl}"
            return None
        try:
            try:
                await self._cache.add(key, owner, ttl=ttl)  # SET NX EX
                return None
            except ValueError:  # aiocache: the key exists
                existing = await self._cache.get(key)
                return existing if existing is not None else ""
        except Exception as exc:  # noqa: BLE001
            self._failed("claim", exc)
            return "?"

    # -------------------------------------------------------------- forget

    async def forget(self, given: str) -> dict[str, list[str]]:
        """Remove everything kept about the visitor ``given`` names (its canonical
        id, or any original id joined to it): the aliases of every original id
        to its canonical id, and, for each of those ids, its device count, device
        records per host, carried properties, first touch and landings. The
        token claims its ids made keep only their expiry (a spent token stays
        spent). Returns the keys, by kind. Two walks over the store (Redis:
        ``SCAN`` in batches), one forget at a time: for an operator, never on
        the request path."""
        if self._key(ALIAS, given) is None:
            raise ValueError("not an id the store keeps (8-128 of A-Z a-z 0-9 _ - : .)")
        async with self._forgetting:
            canonical = (await self.aliases([given])).get(given, given)
            own = f"{ALIAS}/{given}"
            aliases = [k async for batch in self._scan(ALIAS + "/") for k, v in batch if v == canonical or k == own]
            ids = {given, canonical, *(k.partition("/")[2] for k in aliases)}
            removed: dict[str, list[str]] = {ALIAS: aliases}
            for kind in (DEVICES, CARRY, TOUCH):
                keys = [k for k in (self._key(kind, i) for i in sorted(ids)) if k is not None]
                removed[kind] = [k for k, v in zip(keys, await self._get_many(keys)) if v is not None] if keys else []
            removed[HOST], removed[LANDED], removed[CLAIM] = [], [], []
            async for batch in self._scan(""):  # one walk for the kinds keyed by id, and the claims
                for key, value in batch:
                    kind, _, rest = key.partition("/")
                    if kind in (HOST, LANDED) and rest.partition("/")[0] in ids:
                        removed[kind].append(key)
                    elif kind == CLAIM and (value in ids or value.rpartition("|")[0] in ids):
                        removed[CLAIM].append(key)
            await self._delete([k for kind, keys in removed.items() if kind != CLAIM for k in keys])
            await self._forget_claims(removed[CLAIM])
        for memo in (self._written, self._refused):
            memo.discard_if(lambda pair: pair.partition("\0")[0] in ids or pair.partition("\0")[2] in ids)
        return removed

    async def _scan(self, prefix: str) -> AsyncIterator[list[tuple[str, str]]]:
        """Every (key, value) whose key starts with ``prefix``, in batches."""
        if self._memory is not None:
            yield self._memory.scan_now(prefix) + [(k, v) for k, v in self._claims.items() if k.startswith(prefix)]
            return
        client = self._cache.client  # redis.asyncio, under aiocache
        built = self._cache.build_key(prefix)  # the namespace as aiocache spells it
        skip = len(built) - len(prefix)
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", built) + "*"
        keys: list[str] = []
        async for key in client.scan_iter(match=pattern, count=1000):
            keys.append(key.decode() if isinstance(key, bytes) else key)
            if len(keys) >= 1000:
                yield await self._values(client, keys, skip)
                keys = []
        if keys:
            yield await self._values(client, keys, skip)

    @staticmethod
    async def _values(client: Any, keys: list[str], skip: int) -> list[tuple[str, str]]:
        return [
            (key[skip:], value.decode() if isinstance(value, bytes) else value)
            for key, value in zip(keys, await client.mget(keys))
            if value is not None
        ]

    async def _forget_claims(self, keys: list[str]) -> None:
        """The claims' owners replaced, their expiry kept: the tokens stay spent."""
        if self._memory is not None:
            for key in keys:
                if key in self._claims:
                    self._claims[key] = f"forgotten|{self._claims[key].rpartition('|')[2]}"
            return
        client = self._cache.client
        for key in keys:
            await client.set(self._cache.build_key(key), "forgotten", keepttl=True)

    async def _delete(self, keys: list[str]) -> None:
        if not keys:
            return
        if self._memory is not None:
            self._memory.delete_now(keys)
            return
        client = self._cache.client
        for i in range(0, len(keys), 500):
            await client.delete(*[self._cache.build_key(k) for k in keys[i : i + 500]])

    # ------------------------------------------------------------ health

    async def ping(self) -> bool:
        try:
            await self._cache.exists("__ping__")
        except Exception:  # noqa: BLE001
            return False
        return True

    async def close(self) -> None:
        await self._cache.close()
