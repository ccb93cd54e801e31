"""Query parameters taken out of URLs before they leave: one rule for all.

A ``QueryRule`` says which parameter names go: any that matches one of its
globs (``email``, ``*token*``; case-insensitive, ``*`` and ``?`` as in a
shell), or, with an allow-list, every name that matches none of the kept
globs. ``without_params`` applies a rule to one URL (or a bare query string,
a ``search`` without its URL), keeping everything else byte for byte: the
path, the other parameters in their order and spelling, the fragment.

The bridge-token stripping (``core.bridge.strip_param``) is the same
function with a rule of one exact name.

Pure and fast: a URL with no ``?`` is returned untouched without a scan; a
rule's globs are one compiled regular expression; what a rule decided for a
name is remembered (bounded), since a site's URLs repeat the same few names.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from typing import Any

# Names a rule remembers its answer for: a site uses a few dozen, a flood of
# made-up names only costs the regular expression again.
MAX_NAMES = 4096
# URLs a rule remembers its answer for, and the longest kept (bounded: under 10 MB).
MAX_URLS = 4096
MAX_URL_CHARS = 1024
# Parameter names longer than this are judged again each time, never kept.
MAX_NAME_CHARS = 64
# A URL longer than this is not parsed: its whole query goes (no browser sends
# one; a crafted one must cost neither the event loop nor a leak).
MAX_PARSED_CHARS = 16 * 1024

# What a fresh install takes out of every URL-valued field: credentials and
# contact details sites put in links (sign-in, password reset, newsletters).
# Ad-click ids (gclid, fbclid...) stay: attribution is what they are for.
DEFAULT_SCRUBBED = (
    "email", "e-mail", "mail", "*token*", "password", "passwd", "pwd", "pass", "code", "*secret*",
    "auth", "authorization", "*session*", "sid", "api_key", "apikey", "signature", "sig", "otp", "phone", "ssn",
)


def _glob_regex(globs: Iterable[str]) -> re.Pattern[str] | None:
    parts = [fnmatch.translate(g.lower()) for g in globs if g]
    return re.compile("|".join(f"(?:{p})" for p in parts)) if parts else None


class QueryRule:
    """Which query parameter names a URL loses."""

    __slots__ = ("_drop", "_keep", "_seen", "_urls")

    def __init__(self, drop: Iterable[str] = DEFAULT_SCRUBBED, keep: Iterable[str] = ()) -> None:
        self._drop = _glob_regex(drop)
        keep = tuple(keep)
        self._keep = _glob_regex(keep) if keep else None
        self._seen: dict[str, bool] = {}
        self._urls: dict[str, str | None] = {}  # a site's URLs repeat: what each became

    @property
    def active(self) -> bool:
        return self._drop is not None or self._keep is not None

    def removes(self, name: str) -> bool:
        seen = self._seen.get(name)
        if seen is not None:
            return seen
        lowered = name.lower()
        gone = bool(self._drop is not None and self._drop.match(lowered)) or bool(
            self._keep is not None and not self._keep.match(lowered)
        )
        if len(name) <= MAX_NAME_CHARS:
            if len(self._seen) >= MAX_NAMES:
                self._seen.clear()
            self._seen[name] = gone
        return gone

    def clean(self, value: str) -> str | None:
        """``value`` (a URL, or a query string with or without its "?") without
        the parameters this rule removes; None when it removes none."""
        try:
            return self._urls[value]
        except KeyError:
            pass
        if len(value) > MAX_PARSED_CHARS:
            return without_query(value)
        cleaned = without_params(value, self.removes)
        if len(value) <= MAX_URL_CHARS:  # long ones (rare) are not kept
            if len(self._urls) >= MAX_URLS:
                self._urls.clear()
            self._urls[value] = cleaned
        return cleaned


def without_query(value: str) -> str:
    """``value`` with no query at all (the fragment too goes: it may hold one)."""
    if "?" in value:
        return value.partition("?")[0]
    return "" if "=" in value else value


def without_params(value: str, removes: Callable[[str], bool]) -> str | None:
    """``value`` without the query parameters whose (still encoded) name
    ``removes`` says go; None when none went. A value with no "?" and no "="
    has no query; one with "=" but no "?" is a bare query string. A hash
    router's own query (``#/reset?token=...``) counts as one too."""
    if "?" not in value:
        return _kept(value, removes) if "=" in value else None
    base, hash_sep, fragment = value.partition("#")
    changed = False
    if "?" in base:
        path, _, query = base.partition("?")
        kept = _kept(query, removes)
        if kept is not None:
            base, changed = path + ("?" + kept if kept else ""), True
    if "?" in fragment:
        route, _, query = fragment.partition("?")
        kept = _kept(query, removes)
        if kept is not None:
            fragment, changed = route + ("?" + kept if kept else ""), True
    if not changed:
        return None
    return base + (hash_sep + fragment if hash_sep else "")


def _kept(query: str, removes: Callable[[str], bool]) -> str | None:
    """The query's parameters that stay, joined; None when none went."""
    parts = query.split("&")
    kept = [p for p in parts if not (p and removes(p.partition("=")[0]))]
    if len(kept) == len(parts):
        return None
    return "&".join(p for p in kept if p)


def clean_fields(
    bags: Iterable[Any], keys: tuple[str, ...], clean: Callable[[str], str | None], bare: tuple[str, ...] = ()
) -> int:
    """``clean`` applied, in place, to the string values of ``keys`` in each
    bag that is a dict (a protocol names its URL-valued fields); a value is
    looked at only when it has a query: a "?", or an "=" for the ``bare``
    keys that hold a query string alone (Segment's ``search``). How many changed."""
    count = 0
    for bag in bags:
        if type(bag) is dict:
            for key in keys:
                value = bag.get(key)
                if type(value) is str and ("?" in value or (key in bare and "=" in value)):
                    cleaned = clean(value)
                    if cleaned is not None:
                        bag[key] = cleaned
                        count += 1
    return count
