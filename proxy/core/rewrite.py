"""Rewrite payloads and queries to canonical ids.

Pure functions: they apply a ``mapping`` (original anonymous id -> canonical)
computed by ``identity`` and report every change as a ``Rewrite`` so the
forwarded log can show it.

Invariants: only values that are keys of the mapping change (bare, or behind
the ``$device:`` prefix, which is kept); ``$user_id`` is never read or
written; an event without a mapped id is left exactly as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from .identity import DEVICE_PREFIX

# Identity-bearing fields per route, where they live.
_TRACK_FIELDS = ("distinct_id", "$device_id", "$anon_distinct_id")
_ENGAGE_FIELDS = ("$distinct_id", "$device_id")


@dataclass(frozen=True, slots=True)
class Rewrite:
    field: str
    original: str
    canonical: str


def map_id(value: Any, mapping: Mapping[str, str]) -> str | None:
    """The rewritten form of one id value, or None when it stays as it is."""
    if not isinstance(value, str):
        return None
    if value.startswith(DEVICE_PREFIX):
        canonical = mapping.get(value[len(DEVICE_PREFIX) :])
        return DEVICE_PREFIX + canonical if canonical else None
    return mapping.get(value)


def _rewrite_fields(target: dict[str, Any], fields: tuple[str, ...], mapping: Mapping[str, str], out: list[Rewrite]) -> None:
    for name in fields:
        value = target.get(name)
        new = map_id(value, mapping)
        if new is not None:
            target[name] = new
            out.append(Rewrite(name, value, new))


def rewrite_event(route: str, event: dict[str, Any], mapping: Mapping[str, str]) -> list[Rewrite]:
    """Rewrite one event in place; returns what changed (empty: nothing did)."""
    out: list[Rewrite] = []
    if not mapping or route == "groups":
        return out
    if route == "engage":
        _rewrite_fields(event, _ENGAGE_FIELDS, mapping, out)
        return out
    props = event.get("properties")
    if not isinstance(props, dict):
        return out
    _rewrite_fields(props, _TRACK_FIELDS, mapping, out)
    # $merge names the ids to merge in a list.
    ids = props.get("$distinct_ids")
    if isinstance(ids, list):
        for i, value in enumerate(ids):
            new = map_id(value, mapping)
            if new is not None:
                ids[i] = new
                out.append(Rewrite("$distinct_ids", value, new))
    return out


def rewrite_events(route: str, events: list[dict[str, Any]], mapping: Mapping[str, str]) -> list[Rewrite]:
    """Rewrite events in place; returns what changed, all events together."""
    if not mapping or route == "groups":
        return []
    return [r for event in events for r in rewrite_event(route, event, mapping)]


def rewrite_query(
    query: list[tuple[str, str]], fields: tuple[str, ...], mapping: Mapping[str, str], out: list[Rewrite]
) -> list[tuple[str, str]]:
    """Query parameters with identity fields rewritten (record, decide)."""
    if not mapping:
        return query
    result = []
    for name, value in query:
        new = map_id(value, mapping) if name in fields else None
        if new is not None:
            out.append(Rewrite(name, value, new))
            value = new
        result.append((name, value))
    return result


def rewrite_flags_context(context: str, mapping: Mapping[str, str], out: list[Rewrite]) -> str:
    """The ``/flags`` ``context`` JSON with its ``distinct_id``/``device_id`` rewritten."""
    if not mapping:
        return context
    try:
        obj = orjson.loads(context)
    except orjson.JSONDecodeError:
        return context
    if not isinstance(obj, dict):
        return context
    before = len(out)
    _rewrite_fields(obj, ("distinct_id", "device_id"), mapping, out)
    return orjson.dumps(obj).decode() if len(out) > before else context
