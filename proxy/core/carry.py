"""Carried properties: values a visitor's events set on one domain, added to
their events on every other (``identity.carry_properties``).

Mixpanel keeps super properties (``register()``) in per-domain storage, so
they stop at each domain boundary. The proxy keeps, per canonical id, the last
value seen of each property whose name matches one of the configured glob
patterns, and adds it to that visitor's later events that lack it. Pure: the
store round trip is the handler's.

Invariants: a value the event carries always wins; ``$``-prefixed and
``mp_`` properties (identity, the SDK's own) are never carried; per id at most
``MAX_CARRIED`` properties of at most ``MAX_VALUE_BYTES`` each.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from typing import Any

import orjson

MAX_CARRIED = 50
MAX_VALUE_BYTES = 1024


def matcher(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    """One regular expression for the configured names and globs (``ab_*``)."""
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


def carriable(name: str, match: re.Pattern[str]) -> bool:
    return not name.startswith(("$", "mp_")) and match.match(name) is not None


def collect(props: Mapping[str, Any], match: re.Pattern[str]) -> dict[str, Any]:
    """The carried properties an event sets (small enough to keep)."""
    out = {}
    for name, value in props.items():
        if isinstance(name, str) and carriable(name, match) and len(orjson.dumps(value)) <= MAX_VALUE_BYTES:
            out[name] = value
    return out


def add_missing(props: dict[str, Any], carried: Mapping[str, Any]) -> list[str]:
    """Add to ``props`` the carried values it lacks; the names added."""
    added = []
    for name, value in carried.items():
        if name not in props:
            props[name] = value
            added.append(name)
    return added


def merge(kept: Mapping[str, Any], seen: Mapping[str, Any]) -> dict[str, Any]:
    """The values to keep: the newest of each, bounded (the newest names win)."""
    merged = {**kept, **seen}
    if len(merged) > MAX_CARRIED:
        newest_first = list(seen) + [k for k in kept if k not in seen]
        merged = {k: merged[k] for k in newest_first[:MAX_CARRIED]}
    return merged
