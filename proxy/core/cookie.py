"""The first-party identity cookie: an authenticated canonical id.

Pure functions and a small precomputed jar; no I/O.

Value format: ``<canonical id>.<tag>`` where tag is the first 128 bits of
HMAC-SHA256(secret, "fp1:" + id), base64url without padding. A value whose
tag does not verify is treated as absent (and so replaced): nobody can pick
the canonical id another browser gets rewritten to.

Attributes: ``Path=/; Max-Age=<=400 days; HttpOnly; SameSite=Lax``, ``Secure``
unless configured off for local http, and ``Domain`` the first configured
domain the request host belongs to (else host-only).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterator

from .ids import valid_id

_TAG_CONTEXT = b"fp1:"
_TAG_LEN = 22  # base64url characters of 16 bytes
def host_matches(host: str, domain: str) -> bool:
    """RFC 6265 domain-match: ``host`` equals ``domain`` or is a subdomain of it."""
    bare = domain.lstrip(".")
    return host == bare or host.endswith("." + bare)


def cookie_pairs(header: str | None) -> Iterator[tuple[str, str]]:
    """(name, value) of every cookie in a ``Cookie`` header, in order, quotes removed."""
    if not header:
        return
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep:
            yield key, value.strip().strip('"')


def cookie_values(header: str | None, name: str) -> list[str]:
    """Every value of cookie ``name`` in a ``Cookie`` header, in order."""
    return [value for key, value in cookie_pairs(header) if key == name]


def own_cookie_values(header: str | None, name: str) -> list[str]:
    """The values of one of our ``Path=/`` cookies, most likely ours first.

    Browsers send same-name cookies longer ``Path`` first: a sibling subdomain
    that tosses ``fp_id`` with ``Domain=.example.com; Path=/mp`` would come
    before ours. Read from the end, ours (the shortest path) wins."""
    return cookie_values(header, name)[::-1]


class CookieJar:
    """Signs, verifies and formats the identity cookie for one configuration."""

    __slots__ = (
        "name", "_secret", "_domains", "_suffix_by_domain", "_host_only_suffix", "_sealed", "_max_age", "_readable",
    )

    def __init__(
        self, *, secret: bytes, name: str = "fp_id", domains: tuple[str, ...] = (), secure: bool = True,
        max_age_days: int = 400,
    ) -> None:
        """The ``[cookie]`` settings' fields (``CookieJar(**asdict(settings.cookie))``)."""
        self.name = name
        self._secret = secret
        self._domains = domains
        self._max_age = f"; Max-Age={max_age_days * 86400}"
        common = f"; Path=/{self._max_age}; HttpOnly; SameSite=Lax"
        readable = f"; Path=/{self._max_age}; SameSite=Lax"
        if secure:
            common += "; Secure"
            readable += "; Secure"
        # Cookies an SDK reads itself (analytics.js's ajs_anonymous_id): the
        # same Domain, Path and lifetime, without HttpOnly.
        self._readable: dict[str | None, str] = {d: f"; Domain={d}{readable}" for d in domains}
        self._readable[None] = readable
        self._host_only_suffix = common
        self._suffix_by_domain = {d: f"; Domain={d}{common}" for d in domains}
        # Recently sealed values: a visitor's next hits reuse the HMAC.
        self._sealed: dict[str, str] = {}

    def _tag(self, canonical: str) -> str:
        mac = hmac.new(self._secret, _TAG_CONTEXT + canonical.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac[:16]).decode()[:_TAG_LEN]

    def seal(self, canonical: str) -> str:
        sealed = self._sealed.get(canonical)
        if sealed is None:
            if len(self._sealed) >= 10_000:
                self._sealed.clear()
            sealed = self._sealed[canonical] = f"{canonical}.{self._tag(canonical)}"
        return sealed

    def open(self, value: str | None) -> str | None:
        """The canonical id in a cookie value, or None if absent, malformed or forged."""
        if not value:
            return None
        canonical, sep, tag = value.rpartition(".")
        if not sep or len(tag) != _TAG_LEN or not valid_id(canonical):
            return None
        if not hmac.compare_digest(tag, self._tag(canonical)):
            return None
        return canonical

    def domain_for(self, host: str) -> str | None:
        host = host.lower()
        for domain in self._domains:
            if host_matches(host, domain):
                return domain
        return None

    def expire_header(self, host: str) -> str:
        """A ``Set-Cookie`` that deletes the identity cookie (same Domain and Path)."""
        domain = self.domain_for(host)
        suffix = self._suffix_by_domain[domain] if domain else self._host_only_suffix
        return f"{self.name}={suffix.replace(self._max_age, '; Max-Age=0')}"

    def readable_cookie_header(self, name: str, value: str, host: str) -> str:
        """A ``Set-Cookie`` for a cookie the page's script reads (not HttpOnly),
        with the identity cookie's domain choice. ``value`` must be cookie-safe
        (a ``valid_id``)."""
        return f"{name}={value}{self._readable[self.domain_for(host)]}"

    def partitioned_cookie_header(self, canonical: str, host: str) -> str:
        """The identity cookie for a widget in a cross-site iframe: partitioned
        by the top-level site (CHIPS), so a browser that blocks third-party
        cookies still keeps it for this embedding, and only for it. Partitioned
        requires ``Secure`` and ``SameSite=None``, whatever ``cookie.secure`` says."""
        domain = self.domain_for(host)
        scope = f"; Domain={domain}" if domain else ""
        return f"{self.name}={self.seal(canonical)}{scope}; Path=/{self._max_age}; HttpOnly; Secure; SameSite=None; Partitioned"

    def set_cookie_header(self, canonical: str, host: str, sealed: str | None = None) -> str:
        """The full ``Set-Cookie`` value for a response to ``host``."""
        domain = self.domain_for(host)
        suffix = self._suffix_by_domain[domain] if domain else self._host_only_suffix
        return f"{self.name}={sealed or self.seal(canonical)}{suffix}"
