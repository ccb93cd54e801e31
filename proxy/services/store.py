"""The alias store: original device id -> canonical id, on aiocache.

``memory://`` (default) is a size-bounded in-process cache; ``redis://...``
shares aliases between workers and instances.

Invariants:
- a store failure never fails a request: lookups degrade to "unknown" and
  writes are skipped, each counted in ``errors`` and logged once a minute at most;
- a pair already written by this process is not written again (a bounded
  local set), so a returning visitor costs no store write per request.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping

from aiocache import Cache, SimpleMemoryCache
from aiocache.base import BaseCache
from aiocache.serializers import StringSerializer

from ..lograte import Throttled
from ..settings import StoreSettings

log = logging.getLogger(__name__)

ALIAS_NAMESPACE = "fp:alias"
# Redis aliases live as long as the longest cookie could (400 days).
ALIAS_TTL_SECONDS = 400 * 86400


class BoundedMemoryCache(SimpleMemoryCache):
    """aiocache's memory backend with a ceiling: the oldest-written key goes first.

    The stock backend grows without bound; a proxy that sees every visitor's
    device id must not."""

    def __init__(self, max_entries: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self._max_entries = max_entries

    async def _set(self, key, value, ttl=None, _cas_token=None, _conn=None):  # type: ignore[override]
        self._cache.pop(key, None)  # re-setting moves the key to the young end
        result = await super()._set(key, value, ttl=ttl, _cas_token=_cas_token, _conn=_conn)
        self._evict()
        return result

    def _evict(self) -> None:
        while len(self._cache) > self._max_entries:
            oldest = next(iter(self._cache))
            handle = self._handlers.pop(oldest, None)
            if handle:
                handle.cancel()
            del self._cache[oldest]

    # Synchronous twins of multi_get/multi_set for the request path. aiocache's
    # public calls wrap each operation in four decorators (timeout, plugins,
    # an os.getenv check, key building): ~10 % of a request's CPU for what is
    # a dict lookup here.
    def get_now(self, keys: list[str]) -> list[str | None]:
        if self.namespace is not None:
            keys = [self.build_key(k) for k in keys]
        return [self._cache.get(k) for k in keys]

    def put_now(self, pairs: list[tuple[str, str]]) -> None:
        for key, value in pairs:
            if self.namespace is not None:
                key = self.build_key(key)
            self._cache.pop(key, None)
            self._cache[key] = value
        self._evict()


def open_cache(settings: StoreSettings, namespace: str) -> BaseCache:
    if settings.url.startswith("redis://"):
        cache = Cache.from_url(settings.url)
        cache.serializer = StringSerializer()
        cache.namespace = namespace
        cache.timeout = 1.0  # a slow Redis must not hold events for long
        return cache
    # In-process: no timeout (no wait_for task per call) and no namespace
    # (nothing else shares this dict), so keys are used as they are.
    return BoundedMemoryCache(settings.max_entries, timeout=None)


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


class AliasStore:
    def __init__(self, cache: BaseCache, *, ttl: int | None = None) -> None:
        self._cache = cache
        # Memory entries are bounded by count instead: a TTL there would cost
        # one timer handle per key.
        self._ttl = ttl
        self._memory = cache if isinstance(cache, BoundedMemoryCache) else None
        self._written = _Recent(100_000)
        self.errors = 0
        self._warn = Throttled(log)

    @classmethod
    def from_settings(cls, settings: StoreSettings) -> "AliasStore":
        ttl = ALIAS_TTL_SECONDS if settings.url.startswith("redis://") else None
        return cls(open_cache(settings, ALIAS_NAMESPACE), ttl=ttl)

    def _failed(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        self._warn.warning("store", "alias store %s failed (%s: %s); continuing without it", what, type(exc).__name__, exc)

    async def get_many(self, keys: list[str]) -> dict[str, str]:
        if not keys:
            return {}
        if self._memory is not None:
            return {k: v for k, v in zip(keys, self._memory.get_now(keys)) if v}
        try:
            values = await self._cache.multi_get(keys)
        except Exception as exc:  # noqa: BLE001 - any backend failure degrades
            self._failed("lookup", exc)
            return {}
        return {k: v for k, v in zip(keys, values) if v}

    async def put_many(self, pairs: Mapping[str, str]) -> None:
        fresh = [(k, v) for k, v in pairs.items() if f"{k}\0{v}" not in self._written]
        if not fresh:
            return
        if self._memory is not None:
            self._memory.put_now(fresh)
            for k, v in fresh:
                self._written.add(f"{k}\0{v}")
            return
        try:
            await self._cache.multi_set(fresh, ttl=self._ttl)
        except Exception as exc:  # noqa: BLE001 - any backend failure degrades
            self._failed("write", exc)
            return
        for k, v in fresh:
            self._written.add(f"{k}\0{v}")

    def recently_written(self, original: str, canonical: str) -> bool:
        """Whether this process already stored this pair (no store call)."""
        return f"{original}\0{canonical}" in self._written

    async def claim_once(self, key: str, owner: str, ttl: int) -> str | None:
        """Atomically record ``owner`` for ``key`` if nobody has (for ``ttl``
        seconds). Returns None when this call claimed it, else the first owner.
        A store failure counts as claimed by someone else: single use is a
        security property, so without the store a token is refused."""
        key = "claim:" + key
        try:
            try:
                await self._cache.add(key, owner, ttl=ttl)
                return None
            except ValueError:  # aiocache: the key exists
                existing = await self._cache.get(key)
                return existing if existing is not None else ""
        except Exception as exc:  # noqa: BLE001
            self._failed("claim", exc)
            return "?"

    async def count_device(self, canonical: str) -> int:
        """Count one more device id joined to ``canonical``; returns the total."""
        try:
            return int(await self._cache.increment("devices:" + canonical, 1))
        except Exception as exc:  # noqa: BLE001
            self._failed("count", exc)
            return 0

    async def get_value(self, key: str) -> str | None:
        if self._memory is not None:
            return self._memory.get_now([key])[0]
        try:
            return await self._cache.get(key)
        except Exception as exc:  # noqa: BLE001
            self._failed("lookup", exc)
            return None

    async def set_value(self, key: str, value: str) -> None:
        if self._memory is not None:
            self._memory.put_now([(key, value)])
            return
        try:
            await self._cache.set(key, value, ttl=self._ttl)
        except Exception as exc:  # noqa: BLE001
            self._failed("write", exc)

    async def ping(self) -> bool:
        try:
            await self._cache.exists("__ping__")
        except Exception:  # noqa: BLE001
            return False
        return True

    async def close(self) -> None:
        await self._cache.close()
