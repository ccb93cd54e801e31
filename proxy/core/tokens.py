"""Short-lived cross-domain identity tokens (bridge and hub), sealed with AES-256-GCM.

Pure: no I/O, no clock, no globals; the caller passes ``now`` and keeps the
replay cache.

Token format (then base64url without padding, so it needs no percent-encoding
in a query string)::

    version 1 | key id length 1 | key id 1-8 | nonce 12 | AES-GCM(payload) + tag 16

    payload = id length 1 (0 = UUID packed in 16 bytes) | canonical id
            | expires_at 4 (uint32 big-endian, unix seconds)
            | consent length 1 | consent (0-16 ASCII)

A UUID canonical id with a 2-character key id and consent "granted" gives 61
bytes, 82 characters (87 with a 6-character generated key id); the worst case
(8-character key id, 16-character consent) is 102 characters. Tokens go first in a landing URL's query string
and mixpanel-js cuts ``$current_url`` to 255 characters, hence the packing.

Invariants:

- Everything is authenticated: the payload by the GCM tag; the version and key
  id as additional data (AAD); the nonce as GCM's own input. Flipping any bit
  of a token makes ``open`` raise ``TokenInvalid``; never a different success.
- The AAD also binds the purpose ("bridge", "hub") and the audience (the
  target registrable domain, lower-cased), neither of which travels in the
  token: a bridge token for a.example cannot be redeemed on b.example or as a
  hub token, even though the same keys seal both.
- Expiry is checked only after authentication, so ``TokenExpired`` always
  means a genuine token that came too late.
- One string per token: non-canonical base64 spellings are rejected.
- Single use is the caller's job: this module has no state. ``token_id`` is
  derived from the random nonce; the caller records it in the store until
  ``expires_at + skew`` and refuses a token whose id is already there.

Threat model: tokens travel in URLs, so they end up in browser history,
Referer headers and logs of other parties. Someone who reads one can replay it
within its TTL (60 s by default) unless the replay cache has seen it; they
cannot read the canonical id or consent inside, forge one, extend its expiry,
or point it at another purpose or domain without a key. Whoever holds a key
can mint identities: keys live in the keys file, never in messages or logs.
With random 96-bit nonces a key must seal fewer than 2**32 tokens (NIST
SP 800-38D); that is decades at any real rate, but rotate keys anyway.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
import secrets
import struct
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = 1
KEY_LEN = 32  # AES-256
NONCE_LEN = 12  # 96 bits, the GCM standard nonce size
TAG_LEN = 16
TTL_MAX = 86_400  # tokens live seconds to minutes; one expiring later than this is not ours
MAX_TOKEN_CHARS = 512  # above the worst case (420 for a 255-byte id); junk is rejected before decoding

_AAD_CONTEXT = b"firstparty-token"  # separates these AADs from any other use of the keys
_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,8}")
_PURPOSE = re.compile(r"[a-z0-9_-]{1,32}")
_CONSENT = re.compile(r"[\x21-\x7e]{0,16}")  # printable ASCII, no spaces
_AUDIENCE = re.compile(r"[\x21-\x7e]{1,253}")
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_UUID_MARK = 0  # id length 0 means: a UUID packed into 16 bytes follows
_MAX_ID_BYTES = 255
_MIN_PAYLOAD = 1 + 1 + 4 + 1  # a 1-byte id, expiry, empty consent


class TokenError(Exception):
    """A token could not be redeemed; ``str(exc)`` is a short, fixed reason for logs and metrics."""


class TokenExpired(TokenError):
    """An authentic token whose expiry (plus the allowed skew) has passed."""


class TokenInvalid(TokenError):
    """Malformed, tampered, sealed for another purpose or audience, or under an unknown key."""


@dataclass(frozen=True, slots=True)
class TokenClaims:
    canonical_id: str
    expires_at: int  # unix seconds
    consent: str  # opaque to this module, e.g. "granted" | "denied" | "unknown"
    token_id: str  # base64url of the nonce; what the replay cache stores


class KeyRing:
    """Many keys accepted, one current (signs).

    Rotation: add the new key first in the keys file (it becomes current),
    keep the old one until every token sealed with it has expired (a minute),
    then remove it.
    """

    __slots__ = ("current", "_aeads")

    def __init__(self, keys: Mapping[str, bytes], current: str) -> None:
        if not keys:
            raise ValueError("key ring is empty: at least one key is needed")
        aeads: dict[str, AESGCM] = {}
        for key_id, key in keys.items():
            if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
                raise ValueError("key id must be 1-8 characters of A-Z a-z 0-9 _ -")
            if not isinstance(key, bytes | bytearray) or len(key) != KEY_LEN:
                raise ValueError(f"key {key_id!r} must be {KEY_LEN} bytes (AES-256)")
            aeads[key_id] = AESGCM(bytes(key))
        if current not in aeads:
            raise ValueError(f"current key id {current!r} is not in the key ring")
        self.current = current
        self._aeads = aeads

    @classmethod
    def from_file(cls, text: str) -> KeyRing:
        """Parse a keys file: ``<key id> <base64url 32-byte key>`` per line.

        ``#`` starts a comment (to the end of the line); blank lines are
        ignored; the first key is the current (signing) key. Errors name the
        line number and never quote the key material.
        """
        keys: dict[str, bytes] = {}
        for number, key_id, encoded in key_file_pairs(text, "keys file line", "<key id> <base64url key>"):
            if not _KEY_ID.fullmatch(key_id):
                # Not quoted: a line with its fields swapped would put the key in the message.
                raise ValueError(f"keys file line {number}: bad key id (must be 1-8 characters of A-Z a-z 0-9 _ -)")
            if key_id in keys:
                raise ValueError(f"keys file line {number}: duplicate key id {key_id!r}")
            key = _b64decode(encoded.rstrip("="), canonical=False)
            if key is None:
                raise ValueError(f"keys file line {number}: key is not valid base64url (A-Z a-z 0-9 - _)")
            if len(key) != KEY_LEN:
                raise ValueError(f"keys file line {number}: key must decode to {KEY_LEN} bytes, got {len(key)}")
            keys[key_id] = key
        if not keys:
            raise ValueError("keys file has no keys: add a line '<key id> <base64url key>' (`firstparty keygen` prints one)")
        return cls(keys, current=next(iter(keys)))

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._aeads)

    def seal(
        self,
        canonical_id: str,
        *,
        purpose: str,
        audience: str,
        now: float,
        ttl: int,
        consent: str = "unknown",
    ) -> str:
        """A token carrying ``canonical_id`` and ``consent`` for ``purpose`` on ``audience``,
        valid for ``ttl`` seconds from ``now``. Bad arguments are bugs: ValueError."""
        _check_purpose(purpose)
        aud = _normalise_audience(audience)
        if aud is None:
            raise ValueError("audience must be 1-253 printable ASCII characters (a registrable domain)")
        if not isinstance(consent, str) or not _CONSENT.fullmatch(consent):
            raise ValueError("consent must be at most 16 printable ASCII characters")
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= TTL_MAX:
            raise ValueError(f"ttl must be a whole number of seconds from 1 to {TTL_MAX}")
        _check_now(now)
        expires_at = math.floor(now) + ttl
        if not 0 < expires_at < 2**32:
            raise ValueError("now is outside the range a token can express")

        key_id = self.current.encode("ascii")
        header = bytes((VERSION, len(key_id))) + key_id
        nonce = os.urandom(NONCE_LEN)
        payload = (
            _pack_id(canonical_id)
            + struct.pack(">I", expires_at)
            + bytes((len(consent),))
            + consent.encode("ascii")
        )
        sealed = self._aeads[self.current].encrypt(nonce, payload, _aad(header, purpose, aud))
        return _b64encode(header + nonce + sealed)

    def open(self, token: str, *, purpose: str, audience: str, now: float, skew: int = 5) -> TokenClaims:
        """The claims of an authentic, unexpired token, or TokenInvalid / TokenExpired.

        Does not check for replay: record ``token_id`` and refuse it a second time.
        """
        _check_purpose(purpose)
        _check_now(now)
        if isinstance(skew, bool) or not isinstance(skew, int) or not 0 <= skew <= 300:
            raise ValueError("skew must be a whole number of seconds from 0 to 300")

        if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
            raise TokenInvalid("malformed")
        data = _b64decode(token)
        if not data:
            raise TokenInvalid("malformed")
        if data[0] != VERSION:
            raise TokenInvalid("unsupported version")
        kid_len = data[1] if len(data) > 1 else 0
        header_len = 2 + kid_len
        if not 1 <= kid_len <= 8 or len(data) < header_len + NONCE_LEN + _MIN_PAYLOAD + TAG_LEN:
            raise TokenInvalid("malformed")
        try:
            key_id = data[2:header_len].decode("ascii")
        except UnicodeDecodeError:
            raise TokenInvalid("unknown key id") from None
        aead = self._aeads.get(key_id)
        if aead is None:
            raise TokenInvalid("unknown key id")
        aud = _normalise_audience(audience)
        if aud is None:  # no token can have been sealed for it
            raise TokenInvalid("authentication failed")

        header = data[:header_len]
        nonce = data[header_len : header_len + NONCE_LEN]
        try:
            payload = aead.decrypt(nonce, data[header_len + NONCE_LEN :], _aad(header, purpose, aud))
        except InvalidTag:
            # Tampered, or sealed for another purpose or audience: GCM cannot tell which.
            raise TokenInvalid("authentication failed") from None

        canonical_id, expires_at, consent = _unpack_payload(payload)
        if now > expires_at + skew:
            raise TokenExpired("expired")
        if expires_at > now + TTL_MAX + skew:
            raise TokenInvalid("expiry too far in the future")
        return TokenClaims(canonical_id, expires_at, consent, _b64encode(nonce))


def key_file_pairs(text: str, where: str, shape: str) -> Iterator[tuple[int, str, str]]:
    """(line number, first field, second field) of each line of a two-field keys
    file: a BOM dropped, ``#`` comments and blank lines skipped, any other count
    of fields a ValueError ("<where> N: expected '<shape>', ...") that never
    quotes the line (it may hold a key)."""
    for number, raw in enumerate(text.removeprefix("\ufeff").splitlines(), start=1):
        line = raw.partition("#")[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"{where} {number}: expected '{shape}', got {len(fields)} fields")
        yield number, fields[0], fields[1]


def generate_key_line(key_id: str | None = None) -> str:
    """A new line for the keys file: a key id (random if not given) and a random 32-byte key."""
    if key_id is None:
        key_id = secrets.token_hex(3)
    elif not _KEY_ID.fullmatch(key_id):
        raise ValueError("key id must be 1-8 characters of A-Z a-z 0-9 _ -")
    return f"{key_id} {_b64encode(os.urandom(KEY_LEN))}"


def _aad(header: bytes, purpose: str, audience: str) -> bytes:
    # Length-prefixed so no two (purpose, audience) pairs produce the same bytes.
    p, a = purpose.encode("ascii"), audience.encode("ascii")
    return _AAD_CONTEXT + header + bytes((len(p),)) + p + bytes((len(a),)) + a


def _check_purpose(purpose: str) -> None:
    if not isinstance(purpose, str) or not _PURPOSE.fullmatch(purpose):
        raise ValueError("purpose must be 1-32 characters of a-z 0-9 _ - (such as 'bridge' or 'hub')")


def _check_now(now: float) -> None:
    # A NaN would make every expiry comparison false, i.e. accept any token.
    if isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
        raise ValueError("now must be a finite unix time in seconds")


def _normalise_audience(audience: str) -> str | None:
    if not isinstance(audience, str):
        return None
    aud = audience.lower().rstrip(".")  # "Example.COM." and "example.com" are one site
    return aud if _AUDIENCE.fullmatch(aud) else None


def _pack_id(canonical_id: str) -> bytes:
    if not isinstance(canonical_id, str) or not canonical_id:
        raise ValueError("canonical id must be a non-empty string")
    try:
        packed = uuid.UUID(canonical_id)
    except ValueError:
        pass
    else:
        # Only the exact canonical spelling is packed, so it unpacks to the same string.
        if str(packed) == canonical_id:
            return bytes((_UUID_MARK,)) + packed.bytes
    raw = canonical_id.encode("utf-8")
    if len(raw) > _MAX_ID_BYTES:
        raise ValueError(f"canonical id must be at most {_MAX_ID_BYTES} bytes of UTF-8")
    return bytes((len(raw),)) + raw


def _unpack_payload(payload: bytes) -> tuple[str, int, str]:
    # Authentic payloads are always well formed; this guards against our own bugs
    # and turns any surprise into TokenInvalid rather than an IndexError.
    try:
        id_len = payload[0]
        if id_len == _UUID_MARK:
            canonical_id, pos = str(uuid.UUID(bytes=payload[1:17])), 17
        else:
            canonical_id, pos = payload[1 : 1 + id_len].decode("utf-8"), 1 + id_len
            if len(canonical_id.encode("utf-8")) != id_len:
                raise ValueError("short id")
        (expires_at,) = struct.unpack_from(">I", payload, pos)
        consent_len = payload[pos + 4]
        consent = payload[pos + 5 :].decode("ascii")
        if len(consent) != consent_len or not _CONSENT.fullmatch(consent):
            raise ValueError("bad consent")
    except (IndexError, ValueError, struct.error) as exc:
        raise TokenInvalid("malformed payload") from exc
    return canonical_id, expires_at, consent


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str, *, canonical: bool = True) -> bytes | None:
    """Unpadded base64url, or None for foreign characters or an impossible length.
    ``canonical`` also refuses a second spelling of the same bytes (stray low bits
    in the last character), so each token has exactly one string."""
    if len(text) % 4 == 1 or not _B64URL.fullmatch(text):
        return None
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    return data if not canonical or _b64encode(data) == text else None
