"""Rewrite payloads and queries to canonical ids.

Pure functions: they apply a ``mapping`` (original anonymous id -> canonical)
computed by ``identity`` to the fields a protocol module names, and report
every change as a ``Rewrite`` so the forwarded log can show it.

Invariants: only values that are keys of the mapping change (bare, or behind
the ``$device:`` prefix, which is kept); ``$user_id`` is never read or
written; an event without a mapped id is left exactly as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, cast

from .identity import DEVICE_PREFIX


class Rewrite(NamedTuple):
    """One id replaced in an event (a NamedTuple: several per event)."""

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


def rewrite_fields(target: dict[str, Any], fields: tuple[str, ...], mapping: Mapping[str, str], out: list[Rewrite]) -> None:
    for name in fields:
        value = target.get(name)
        new = map_id(value, mapping)
        if new is not None:  # only for a str value
            target[name] = new
            out.append(Rewrite(name, cast(str, value), new))


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
            out.append(Rewrite(name, cast(str, value), new))
            value = new
        result.append((name, value))
    return result
