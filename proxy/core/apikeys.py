"""Server keys: what an app's backend shows to ask for a bridge token for *its* device id.

Pure: parsing the keys file and checking a presented key; no I/O.

A server key lets its holder mint an identity token for any device id it
names, so it is a server credential: it lives in ``identity.api_keys_file``
and in the app backend's secrets, never in a page, an app binary or a log.
The browser endpoints never accept a device id from a browser: a browser can
only hand on the canonical id its own cookie proves.

File format, one key per line::

    # comments and blank lines are ignored
    <name> <key>

``name`` (1-32 of A-Z a-z 0-9 _ . -) is what logs and metrics show; ``key``
is at least 32 characters of base64url (``firstparty apikey`` writes
``fpk_`` and 43 random characters). Only SHA-256 digests of the keys are kept
in memory, and a presented key is compared with every one in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from .tokens import key_file_pairs

KEY_PREFIX = "fpk_"
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_KEY = re.compile(r"[A-Za-z0-9_-]{32,256}")


class ApiKeys:
    """The server keys of a deployment, by name."""

    __slots__ = ("_digests",)

    def __init__(self, digests: dict[str, bytes]) -> None:
        self._digests = digests

    @classmethod
    def from_file(cls, text: str) -> ApiKeys:
        """Parse a keys file. Errors name the line and never quote a key."""
        digests: dict[str, bytes] = {}
        seen: set[bytes] = set()
        for number, name, key in key_file_pairs(text, "line", "<name> <key>"):
            if not _NAME.fullmatch(name):
                raise ValueError(f"line {number}: bad name (1-32 characters of A-Z a-z 0-9 _ . -)")
            if name in digests:
                raise ValueError(f"line {number}: duplicate name {name!r}")
            if not _KEY.fullmatch(key):
                raise ValueError(
                    f"line {number}: the key of {name!r} must be 32-256 characters of A-Z a-z 0-9 - _ "
                    "(`firstparty apikey` writes one)"
                )
            digest = _digest(key)
            if digest in seen:
                raise ValueError(f"line {number}: the key of {name!r} is also another name's key")
            seen.add(digest)
            digests[name] = digest
        return cls(digests)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._digests)

    def verify(self, presented: str) -> str | None:
        """The name of the key ``presented`` is, or None. Every key is compared,
        each in constant time, so the answer's timing tells nothing."""
        if not presented or len(presented) > 256:
            return None
        digest = _digest(presented)
        found = None
        for name, known in self._digests.items():
            if hmac.compare_digest(digest, known):
                found = name
        return found


def bearer(authorization: str | None) -> str | None:
    """The credential of an ``Authorization: Bearer <key>`` header, or None."""
    if not authorization:
        return None
    scheme, _, credential = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credential.strip() or None


def generate_key_line(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError("name must be 1-32 characters of A-Z a-z 0-9 _ . -")
    return f"{name} {KEY_PREFIX}{secrets.token_urlsafe(32)}"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
