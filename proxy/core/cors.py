"""CORS for credentialed XHRs: exact origins echoed, never ``*``.

mixpanel-js sends its requests ``withCredentials``, so an allowed origin
must be echoed exactly with ``Access-Control-Allow-Credentials: true``;
an origin not configured gets no CORS headers at all.

Patterns: ``https://www.example.com`` (exact), ``*.example.com`` (any
https subdomain), ``http://*.example.test`` (scheme given explicitly).
"""

from __future__ import annotations

from collections.abc import Iterable

ALLOW_HEADERS = "Authorization, traceparent, tracestate, Content-Type"
ALLOW_METHODS = "GET, POST, OPTIONS"
PREFLIGHT_MAX_AGE = "86400"


class OriginPolicy:
    __slots__ = ("_exact", "_suffixes", "_answers")

    def __init__(self, allowed: Iterable[str]) -> None:
        # origin -> the headers of an actual response (a site sees a handful of origins)
        self._answers: dict[str, dict[str, str]] = {}
        self._exact: set[str] = set()
        self._suffixes: list[tuple[str, str]] = []  # (scheme, ".example.com")
        for origin in allowed:
            scheme, sep, rest = origin.partition("://")
            if not sep:
                scheme, rest = "https", origin
            if rest.startswith("*."):
                self._suffixes.append((scheme, rest[1:]))
            else:
                self._exact.add(f"{scheme}://{rest}")

    def allows(self, origin: str | None) -> bool:
        if not origin:
            return False
        origin = origin.lower()
        if origin in self._exact:
            return True
        if not self._suffixes:
            return False
        scheme, sep, hostport = origin.partition("://")
        if not sep:
            return False
        host = hostport.rsplit(":", 1)[0] if hostport.count(":") == 1 else hostport
        return any(scheme == s and host.endswith(suffix) and len(host) > len(suffix) for s, suffix in self._suffixes)

    def headers(self, origin: str | None) -> dict[str, str]:
        """Headers for an actual (non-preflight) response (do not mutate: shared)."""
        if not origin:
            return {}
        known = self._answers.get(origin)
        if known is not None:
            return known
        if len(self._answers) >= 1024:
            self._answers.clear()
        known = self._answers[origin] = self._headers(origin)
        return known

    def _headers(self, origin: str) -> dict[str, str]:
        if self.allows(origin):
            return {
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Credentials": "true",
                "Vary": "Origin",
            }
        return {"Vary": "Origin"}

    def preflight_headers(self, origin: str | None) -> dict[str, str] | None:
        """Headers answering an ``OPTIONS`` preflight, or None when the origin is not allowed."""
        if not self.allows(origin):
            return None
        return {
            "Access-Control-Allow-Origin": origin or "",
            "Access-Control-Allow-Credentials": "true",
            "Access-Control-Allow-Methods": ALLOW_METHODS,
            "Access-Control-Allow-Headers": ALLOW_HEADERS,
            "Access-Control-Max-Age": PREFLIGHT_MAX_AGE,
            "Vary": "Origin",
        }
