"""Identity resolution: which canonical id a request's anonymous ids become.

Pure functions over plain data; the store lookups happen in the handler,
which passes what it found in ``known``.

Rules (PRODUCT.md, identity model):
- an id is *anonymous* when it is a ``$device_id``, a ``distinct_id`` of the
  form ``$device:<id>`` or equal to the event's ``$device_id``, or such an
  ``$anon_distinct_id``; user ids (``$user_id``, an identified
  ``distinct_id``) are never anonymous and never rewritten;
- a browser request has one canonical id, from (in order) a valid bridge or
  hub token in the request, the first-party cookie, the alias store entry of its first anonymous id, else that id
  itself is adopted (first come), else a fresh UUID when the id cannot be
  adopted safely;
- a server request (no browser signals, e.g. mixpanel-python) never reads or
  sets the cookie: its events belong to many people, so each anonymous id
  is rewritten only through the alias store.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .cookie import valid_id

DEVICE_PREFIX = "$device:"

SOURCE_COOKIE = "cookie"
SOURCE_ALIAS = "alias"
SOURCE_NEW = "new"
SOURCE_NONE = "none"
SOURCE_RESET = "reset"


@dataclass(slots=True)
class Resolution:
    canonical: str | None
    source: str
    # original anonymous id -> canonical id, what rewrite applies.
    mapping: dict[str, str] = field(default_factory=dict)
    # original -> canonical pairs to remember in the alias store.
    new_aliases: dict[str, str] = field(default_factory=dict)


def strip_device(value: Any) -> str | None:
    if isinstance(value, str) and value.startswith(DEVICE_PREFIX):
        return value[len(DEVICE_PREFIX) :]
    return None


def _anon(value: Any, device_id: Any) -> str | None:
    """The bare anonymous id in ``value``, or None when it is not anonymous."""
    bare = strip_device(value)
    if bare is not None:
        return bare or None
    if isinstance(value, str) and value and value == device_id:
        return value
    return None


def _event_anon_ids(route: str, event: Mapping[str, Any]) -> list[str]:
    if route == "engage":
        source: Any = event
        others = ("$distinct_id",)
    else:
        source = event.get("properties")
        others = ("distinct_id", "$anon_distinct_id")
    if not isinstance(source, dict):
        return []
    out = []
    device = source.get("$device_id")
    if isinstance(device, str) and device:
        out.append(strip_device(device) or device)
    for key in others:
        bare = _anon(source.get(key), device)
        if bare:
            out.append(bare)
    return out


def anonymous_ids(route: str, events: Iterable[Mapping[str, Any]]) -> list[str]:
    """Anonymous ids in a batch, first seen first, without duplicates."""
    if route == "groups":
        return []
    seen: dict[str, None] = {}
    for event in events:
        for value in _event_anon_ids(route, event):
            seen.setdefault(value)
    return list(seen)


def server_lookup_ids(route: str, events: Iterable[Mapping[str, Any]]) -> list[str]:
    """Ids of a server request that may be an original device id in the alias store.

    A server-side event may carry a bare original device id as its
    ``distinct_id``; looking up a user id too is harmless (it is never a key)."""
    if route == "groups":
        return []
    seen: dict[str, None] = {}
    for event in events:
        source = event if route == "engage" else event.get("properties")
        if not isinstance(source, dict):
            continue
        keys = ("$device_id", "$distinct_id") if route == "engage" else ("$device_id", "distinct_id", "$anon_distinct_id")
        for key in keys:
            value = source.get(key)
            if isinstance(value, str) and value:
                seen.setdefault(strip_device(value) or value)
    return list(seen)


def query_anon_ids(distinct_id: str | None, device_id: str | None) -> list[str]:
    """Anonymous ids of a request whose identity is in its query (record, flags, decide)."""
    out = []
    if device_id:
        out.append(strip_device(device_id) or device_id)
    bare = _anon(distinct_id, device_id)
    if bare and bare not in out:
        out.append(bare)
    return out


def resolve_browser(
    cookie_id: str | None,
    incoming: list[str],
    known: Mapping[str, str],
    new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    carried: tuple[str, str] | None = None,
) -> Resolution:
    """One canonical id for a browser request.

    ``carried`` is (canonical id, "bridge" or "hub") from a valid token in this
    request: it comes first, before the cookie."""
    if carried and valid_id(carried[0]):
        canonical, source = carried
    elif cookie_id:
        canonical, source = cookie_id, SOURCE_COOKIE
    elif incoming and known.get(incoming[0]):
        canonical, source = known[incoming[0]], SOURCE_ALIAS
    elif incoming:
        # First come: adopt the SDK's own id, so a single-domain site sees no
        # change; an id we could not safely put in a cookie gets a fresh one.
        canonical = incoming[0] if valid_id(incoming[0]) else new_id()
        source = SOURCE_NEW
    else:
        return Resolution(None, SOURCE_NONE)
    mapping = {original: canonical for original in incoming if original != canonical}
    return Resolution(canonical, source, mapping, dict(mapping))


def resolve_server(known: Mapping[str, str]) -> Resolution:
    """A server request: rewrite only what the alias store knows."""
    mapping = {k: v for k, v in known.items() if v and v != k}
    return Resolution(None, SOURCE_ALIAS if mapping else SOURCE_NONE, mapping)


# What a new device id on a host means (``device_change``).
DEVICE_SAME = "same"  # the device id this host last showed
DEVICE_FIRST = "first"  # nothing known for this host yet
DEVICE_RESET = "reset"  # changed soon after the last sighting: reset() or storage cleared by hand
DEVICE_RENEWED = "renewed"  # changed after a long gap: the browser expired script storage (Safari)


def device_change(record: str | None, device: str, now: float, window: float, anonymous: bool) -> str:
    """Classify ``device`` against the host's last record ``"<device>|<unix time>"``.

    mixpanel-js mints a new device id after ``reset()`` (a logout: maybe
    another person) and after Safari deletes script-set storage (7 days
    without a visit: the same person). Both look alike; only the gap between
    sightings tells them apart. An identified batch is never a reset."""
    if not record:
        return DEVICE_FIRST
    last_device, _, seen = record.rpartition("|")
    if last_device == device:
        return DEVICE_SAME
    try:
        gap = now - float(seen)
    except ValueError:
        return DEVICE_FIRST
    return DEVICE_RESET if anonymous and gap < window else DEVICE_RENEWED


def is_anonymous(route: str, events: Iterable[Mapping[str, Any]]) -> bool:
    """No event of the batch names a user."""
    for event in events:
        source = event if route == "engage" else event.get("properties")
        if isinstance(source, dict) and source.get("$user_id"):
            return False
    return True
