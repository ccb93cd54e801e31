"""Identity resolution: which canonical id a request's anonymous ids become.

Pure functions over plain data, vendor-neutral: a protocol module
(``protocols.mixpanel``) names the ids of its events; the store lookups happen
in ``services.resolver``, which passes what it found in ``known``.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .ids import valid_id

DEVICE_PREFIX = "$device:"

SOURCE_COOKIE = "cookie"
SOURCE_ALIAS = "alias"
SOURCE_NEW = "new"
SOURCE_NONE = "none"
SOURCE_RESET = "reset"
SOURCE_BRIDGE = "bridge"
SOURCE_HUB = "hub"
SOURCE_APP = "app"
# Sources that prove the canonical id (a cookie we signed, a token we sealed):
# only their requests may repoint an alias another request wrote.
PROVEN_SOURCES = frozenset({SOURCE_COOKIE, SOURCE_BRIDGE, SOURCE_HUB, SOURCE_APP})


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


def anon_id(value: Any, device_id: Any) -> str | None:
    """The bare anonymous id in ``value``, or None when it is not anonymous."""
    bare = strip_device(value)
    if bare is not None:
        return bare or None
    if isinstance(value, str) and value and value == device_id:
        return value
    return None


def resolve_browser(
    cookie_id: str | None,
    incoming: list[str],
    known: Mapping[str, str],
    new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    carried: tuple[str, str] | None = None,
    hint: str | None = None,
) -> Resolution:
    """One canonical id for a browser request.

    ``carried`` is (canonical id, "bridge" or "hub") from a valid token in this
    request: it comes first, before the cookie. ``hint`` is the id another SDK
    of the same page keeps in a cookie this request carried (analytics.js's
    ``ajs_anonymous_id``): for a browser with no identity cookie yet, it is
    the id adopted, so both SDKs' first requests, in flight together, agree."""
    if carried and valid_id(carried[0]):
        canonical, source = carried
    elif cookie_id:
        canonical, source = cookie_id, SOURCE_COOKIE
    elif incoming and known.get(incoming[0]):
        canonical, source = known[incoming[0]], SOURCE_ALIAS
    elif incoming and hint and valid_id(hint):
        canonical = known.get(hint) or hint
        source = SOURCE_ALIAS if known.get(hint) else SOURCE_NEW
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
