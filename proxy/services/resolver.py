"""The identity resolver: the store-backed side of ``identity``.

``identity`` decides from plain data; this adapter fetches that data from the
alias store, applies the decisions that need memory across requests (the
device record per host that tells ``reset()`` from Safari's expired storage,
the cap on devices per canonical id) and writes what was learnt back.

Invariants: a store failure degrades (unknown alias, no reset detection),
never fails a request; the cookie is consulted only for browser requests.
"""

from __future__ import annotations

import logging
import time

from ..core.identity import (
    PROVEN_SOURCES,
    DEVICE_RESET,
    DEVICE_SAME,
    SOURCE_COOKIE,
    SOURCE_RESET,
    Resolution,
    device_change,
    resolve_browser,
    resolve_server,
)
from .metrics import Metrics
from ..settings import IdentitySettings
from .store import AliasStore
from ..lograte import Throttled

log = logging.getLogger(__name__)

# A host's device record is refreshed at most this often: no store write per request.
SIGHTING_REFRESH_SECONDS = 3600


class Resolver:
    def __init__(self, store: AliasStore, metrics: Metrics, settings: IdentitySettings) -> None:
        self.store = store
        self.metrics = metrics
        self.settings = settings
        # Lines a client's requests trigger: at most one a minute each, however many come.
        self._quiet = Throttled(log)

    async def resolve(
        self,
        *,
        browser: bool,
        cookie_id: str | None,
        host: str,
        route: str,
        incoming: list[str],
        server_ids: list[str],
        carried: tuple[str, str] | None = None,
        anonymous: bool = False,
        project: str | None = None,
        hint: str | None = None,
        from_page: bool = True,
    ) -> Resolution:
        """The canonical id of a request and the rewrites it implies.

        ``carried`` is what a valid bridge/hub token in the request names;
        ``hint`` another SDK's id from a cookie (``identity.resolve_browser``).
        ``from_page`` False (not sent by a page of a linked domain): the device
        ids it shows are not watched, so it cannot start a new identity on
        the browser (``reset()``) nor move the host's device record."""
        if not browser:
            resolution = resolve_server(await self.store.aliases(server_ids))
        else:
            # Which device id a host shows matters only for events (flags and
            # replays follow whatever the events decided).
            watch = from_page and bool(incoming) and route in ("track", "engage")
            reset = False
            if cookie_id and not carried and watch:
                reset = await self._device_seen(cookie_id, host, project, incoming[0], anonymous)
                if reset:
                    cookie_id = None  # a new person on this browser: a new canonical id
            lookup = [] if carried or cookie_id or reset or not incoming else incoming[:1]
            if lookup and hint and hint != lookup[0]:
                lookup.append(hint)
            known = await self.store.aliases(lookup)
            resolution = resolve_browser(cookie_id, incoming, known, carried=carried, hint=hint)
            if reset:
                resolution.source = SOURCE_RESET
            if watch and resolution.canonical and resolution.source != SOURCE_COOKIE:
                await self._remember_device(resolution.canonical, host, project, incoming[0])
            if resolution.new_aliases:
                await self._cap_devices(resolution)
                if resolution.source == SOURCE_COOKIE and self._first_join(resolution):
                    # A cookie a landing script's token set moments ago: the ids it
                    # joins now joined through that bridge (or hub), and say so.
                    landed = await self.store.landed(resolution.canonical, host)  # type: ignore[arg-type]
                    if landed is not None:
                        resolution.source = landed
        if resolution.new_aliases:
            # Only a request that proved its canonical id (its own cookie, a
            # redeemed token) moves an alias another request wrote; ids a request
            # merely names are remembered only where nothing was (first write wins).
            await self.store.add_aliases(resolution.new_aliases, repoint=resolution.source in PROVEN_SOURCES)
        self.metrics.source(resolution.source)
        return resolution

    async def restart(self, host: str, route: str, incoming: list[str], project: str | None) -> Resolution:
        """A new person on this browser inside one request (``reset()`` between two
        events of a batch): their own device id is their canonical id from here on,
        remembered as this host's device; nothing of the previous identity is used."""
        resolution = resolve_browser(None, incoming, {})
        if resolution.canonical is None:
            return resolution
        resolution.source = SOURCE_RESET
        self.metrics.identity_resets.inc()
        if incoming and route in ("track", "engage"):
            await self._remember_device(resolution.canonical, host, project, incoming[0])
        if resolution.new_aliases:
            await self._cap_devices(resolution)  # as for any identity: a flood of ids is not joined
            await self.store.add_aliases(resolution.new_aliases)
        self.metrics.source(resolution.source)
        return resolution

    def _first_join(self, resolution: Resolution) -> bool:
        """Whether the request joins an id this process has not joined to its
        canonical id before (no store call: the first event of a device, not
        every event of every cookie)."""
        return any(not self.store.recently_written(o, c) for o, c in resolution.new_aliases.items())

    # Device records are per project: two Mixpanel projects on one page have two device ids.
    async def _remember_device(self, canonical: str, host: str, project: str | None, device: str) -> None:
        await self.store.set_device_record(canonical, host, project, device, int(time.time()))

    async def _device_seen(self, canonical: str, host: str, project: str | None, device: str, anonymous: bool) -> bool:
        """Note the device id ``host`` shows for ``canonical``; True when the
        change means a new person (``reset()``), see ``identity.device_change``."""
        record = await self.store.device_record(canonical, host, project)
        now = time.time()
        window = self.settings.reset_window_days * 86400
        change = device_change(record, device, now, window, anonymous)
        if change == DEVICE_SAME:
            if now - float(record.rpartition("|")[2]) > SIGHTING_REFRESH_SECONDS:  # type: ignore[union-attr]
                await self.store.set_device_record(canonical, host, project, device, int(now))
            return False
        if change != DEVICE_RESET:
            await self.store.set_device_record(canonical, host, project, device, int(now))
            return False
        self.metrics.identity_resets.inc()
        self._quiet.info("reset", "device id changed on %r soon after the last one (reset()): new canonical id", host)
        return True

    async def _cap_devices(self, resolution: Resolution) -> None:
        """Refuse to join more than ``identity.max_devices_per_id`` device ids to
        one canonical id: past that it is a rewrite bug or a shared device."""
        cap = self.settings.max_devices_per_id
        canonical = resolution.canonical
        assert canonical is not None
        over = False  # the count only grows: once past the cap, the rest need no store call each
        for original in list(resolution.new_aliases):
            if self.store.recently_written(original, canonical):
                continue
            if over or await self.store.count_device(canonical) > cap:
                over = True
                del resolution.new_aliases[original]
                del resolution.mapping[original]
                self.metrics.device_cap.inc()
                self._quiet.warning(
                    "device-cap",
                    "canonical id %r already joins %d device ids (identity.max_devices_per_id); %r kept apart",
                    canonical,
                    cap,
                    original,
                )
