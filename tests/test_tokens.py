"""Cross-domain identity tokens: sealing, opening, tampering, rotation, the keys file."""

from __future__ import annotations

import base64
import re
import urllib.parse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.tokens import (
    MAX_TOKEN_CHARS,
    KeyRing,
    TokenClaims,
    TokenError,
    TokenExpired,
    TokenInvalid,
    generate_key_line,
)

ID = "0b6f5c2e-9d1a-4a3c-8f7e-1a2b3c4d5e6f"
NOW = 1_700_000_000.25
OLD_KEY = bytes(range(32))
NEW_KEY = bytes(range(100, 132))
STANDARD_B64 = base64.b64encode(b"\xff" * 32).decode()  # '+' and '/': base64, not base64url
ARGS = {"purpose": "bridge", "audience": "shop.example"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing({"k1": OLD_KEY}, current="k1")


def test_round_trip(ring: KeyRing) -> None:
    token = ring.seal(ID, **ARGS, now=NOW, ttl=60, consent="granted")
    claims = ring.open(token, **ARGS, now=NOW + 1)
    assert claims == TokenClaims(ID, 1_700_000_060, "granted", claims.token_id)
    assert claims.token_id == b64(unb64(token)[4:16])  # the nonce, after version, length and "k1"


@pytest.mark.parametrize(
    "canonical",
    [ID, ID.upper(), "$device:18f3a2b4c5-0d1e2f", "x", "é" * 127, "a" * 255],
    ids=["uuid", "uppercase-uuid", "device", "short", "non-ascii", "max"],
)
def test_round_trip_of_any_id(ring: KeyRing, canonical: str) -> None:
    token = ring.seal(canonical, **ARGS, now=NOW, ttl=60, consent="")
    claims = ring.open(token, **ARGS, now=NOW)
    assert (claims.canonical_id, claims.consent) == (canonical, "")


def test_default_consent_is_unknown(ring: KeyRing) -> None:
    assert ring.open(ring.seal(ID, **ARGS, now=NOW, ttl=60), **ARGS, now=NOW).consent == "unknown"


def test_expiry_tolerates_skew_and_no_more(ring: KeyRing) -> None:
    token = ring.seal(ID, **ARGS, now=NOW, ttl=60)
    expires_at = 1_700_000_060
    assert ring.open(token, **ARGS, now=expires_at).expires_at == expires_at
    assert ring.open(token, **ARGS, now=expires_at + 5, skew=5).canonical_id == ID
    with pytest.raises(TokenExpired, match="^expired$"):
        ring.open(token, **ARGS, now=expires_at + 5.001, skew=5)
    with pytest.raises(TokenExpired):
        ring.open(token, **ARGS, now=expires_at + 1, skew=0)
    assert issubclass(TokenExpired, TokenError)


def test_expiry_absurdly_far_in_the_future_is_invalid(ring: KeyRing) -> None:
    # Sealed "in the future" (a clock far ahead on the sealing side) with the longest ttl.
    token = ring.seal(ID, **ARGS, now=NOW + 3600, ttl=86_400)
    with pytest.raises(TokenInvalid, match="too far"):
        ring.open(token, **ARGS, now=NOW)
    assert ring.open(token, **ARGS, now=NOW + 3600).canonical_id == ID


def test_every_bit_of_every_byte_is_authenticated(ring: KeyRing) -> None:
    data = unb64(ring.seal(ID, **ARGS, now=NOW, ttl=60, consent="granted"))
    for position in range(len(data)):
        for bit in range(8):
            tampered = bytearray(data)
            tampered[position] ^= 1 << bit
            with pytest.raises(TokenInvalid):
                ring.open(b64(bytes(tampered)), **ARGS, now=NOW)


def test_truncated_and_extended_tokens_are_invalid(ring: KeyRing) -> None:
    data = unb64(ring.seal(ID, **ARGS, now=NOW, ttl=60))
    for cut in range(len(data)):
        with pytest.raises(TokenInvalid):
            ring.open(b64(data[:cut]), **ARGS, now=NOW)
    with pytest.raises(TokenInvalid):
        ring.open(b64(data + b"\x00"), **ARGS, now=NOW)


def test_non_canonical_spelling_is_invalid(ring: KeyRing) -> None:
    token = ring.seal(ID, **ARGS, now=NOW, ttl=60)
    assert len(unb64(token)) % 3  # the last character carries unused low bits
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(token[-1])
    sibling = token[:-1] + alphabet[last ^ 1]  # same bytes, different string
    assert unb64(sibling) == unb64(token)
    with pytest.raises(TokenInvalid, match="malformed"):
        ring.open(sibling, **ARGS, now=NOW)


def test_wrong_purpose(ring: KeyRing) -> None:
    token = ring.seal(ID, purpose="bridge", audience="shop.example", now=NOW, ttl=60)
    with pytest.raises(TokenInvalid, match="authentication failed"):
        ring.open(token, purpose="hub", audience="shop.example", now=NOW)


def test_wrong_audience(ring: KeyRing) -> None:
    token = ring.seal(ID, purpose="bridge", audience="shop.example", now=NOW, ttl=60)
    for other in ["blog.example", "shop.example.evil", "hop.example", "", "é.example"]:
        with pytest.raises(TokenInvalid):
            ring.open(token, purpose="bridge", audience=other, now=NOW)


def test_audience_is_case_and_trailing_dot_insensitive(ring: KeyRing) -> None:
    token = ring.seal(ID, purpose="bridge", audience="Shop.Example", now=NOW, ttl=60)
    assert ring.open(token, purpose="bridge", audience="shop.example.", now=NOW).canonical_id == ID


def test_unknown_key_id(ring: KeyRing) -> None:
    other = KeyRing({"k2": OLD_KEY}, current="k2")  # same key bytes, different id
    token = other.seal(ID, **ARGS, now=NOW, ttl=60)
    with pytest.raises(TokenInvalid, match="^unknown key id$"):
        ring.open(token, **ARGS, now=NOW)


def test_rotation() -> None:
    old = KeyRing({"old": OLD_KEY}, current="old")
    token = old.seal(ID, **ARGS, now=NOW, ttl=60)
    rotated = KeyRing({"new": NEW_KEY, "old": OLD_KEY}, current="new")
    assert rotated.open(token, **ARGS, now=NOW).canonical_id == ID
    fresh = rotated.seal(ID, **ARGS, now=NOW, ttl=60)
    assert unb64(fresh)[2:5] == b"new"
    with pytest.raises(TokenInvalid, match="unknown key id"):
        old.open(fresh, **ARGS, now=NOW)
    retired = KeyRing({"new": NEW_KEY}, current="new")
    assert retired.open(fresh, **ARGS, now=NOW).canonical_id == ID
    with pytest.raises(TokenInvalid, match="unknown key id"):
        retired.open(token, **ARGS, now=NOW)


def test_same_input_gives_different_tokens(ring: KeyRing) -> None:
    tokens = {ring.seal(ID, **ARGS, now=NOW, ttl=60) for _ in range(200)}
    assert len(tokens) == 200
    token_ids = {ring.open(t, **ARGS, now=NOW).token_id for t in tokens}
    assert len(token_ids) == 200


def test_token_is_compact_and_url_safe() -> None:
    # Longest allowed key id and consent: the worst case for a UUID canonical id.
    ring = KeyRing({"abcdefgh": OLD_KEY}, current="abcdefgh")
    worst = ring.seal(ID, **ARGS, now=NOW, ttl=60, consent="x" * 16)
    assert len(worst) == 102
    typical = KeyRing({"k1": OLD_KEY}, current="k1").seal(ID, **ARGS, now=NOW, ttl=60, consent="granted")
    assert len(typical) == 82
    generated = KeyRing.from_file(generate_key_line()).seal(ID, **ARGS, now=NOW, ttl=60, consent="granted")
    assert len(generated) == 87  # a 6-character generated key id
    for token in (worst, typical, generated):
        assert len(token) <= 110
        assert urllib.parse.quote(token, safe="") == token


def test_claims_are_frozen(ring: KeyRing) -> None:
    claims = ring.open(ring.seal(ID, **ARGS, now=NOW, ttl=60), **ARGS, now=NOW)
    with pytest.raises(AttributeError):
        claims.canonical_id = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    "token",
    ["", "A", "AAAA", "not a token", "a%20b", "====", "AQ", "é" * 90, "A" * 513, "A" * 100, b64(b"\x01\x09" + bytes(80))],
)
def test_garbage_is_invalid(ring: KeyRing, token: str) -> None:
    with pytest.raises(TokenInvalid):
        ring.open(token, **ARGS, now=NOW)


def test_other_version_is_invalid(ring: KeyRing) -> None:
    data = bytearray(unb64(ring.seal(ID, **ARGS, now=NOW, ttl=60)))
    data[0] = 2
    with pytest.raises(TokenInvalid, match="unsupported version"):
        ring.open(b64(bytes(data)), **ARGS, now=NOW)


@given(st.text(max_size=600))
def test_any_text_is_invalid_and_nothing_else(token: str) -> None:
    ring = KeyRing({"k1": OLD_KEY}, current="k1")
    with pytest.raises(TokenInvalid):
        ring.open(token, **ARGS, now=NOW)


@given(st.binary(max_size=400), st.sampled_from([b"", b"\x01", b"\x01\x02k1", b"\x01\x08k1k1k1k1"]))
def test_any_bytes_are_invalid_and_nothing_else(body: bytes, prefix: bytes) -> None:
    ring = KeyRing({"k1": OLD_KEY}, current="k1")
    with pytest.raises(TokenInvalid):
        ring.open(b64(prefix + body), **ARGS, now=NOW)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"canonical_id": ""}, "^canonical id must be a non-empty string$"),
        ({"canonical_id": "a" * 256}, "canonical id"),
        ({"purpose": "Bridge"}, "^purpose must be 1-32 characters of a-z 0-9 _ - \\(such as 'bridge' or 'hub'\\)$"),
        ({"audience": ""}, "^audience must be 1-253 printable ASCII characters \\(a registrable domain\\)$"),
        ({"audience": "shop example"}, "audience"),
        ({"consent": "x" * 17}, "^consent must be at most 16 printable ASCII characters$"),
        ({"consent": "not granted"}, "consent"),
        ({"ttl": 0}, "ttl"),
        ({"ttl": 86_401}, "ttl"),
        ({"ttl": 1.5}, "ttl"),
        ({"now": float("nan")}, "now"),
        ({"now": 2.0**32}, "now"),
    ],
)
def test_seal_rejects_bad_arguments(ring: KeyRing, kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"canonical_id": ID, **ARGS, "now": NOW, "ttl": 60, "consent": "granted"} | kwargs
    with pytest.raises(ValueError, match=message):
        ring.seal(**args)  # type: ignore[arg-type]


def test_open_refuses_a_nan_clock(ring: KeyRing) -> None:
    # NaN compares false with everything: it would otherwise accept any expired token.
    token = ring.seal(ID, **ARGS, now=NOW, ttl=60)
    with pytest.raises(ValueError, match="now"):
        ring.open(token, **ARGS, now=float("nan"))


@pytest.mark.parametrize(
    ("keys", "current", "message"),
    [
        ({}, "k1", "empty"),
        ({"k1": OLD_KEY}, "k2", "current key id 'k2'"),
        ({"k1": OLD_KEY[:16]}, "k1", "32 bytes"),
        ({"toolongid": OLD_KEY}, "toolongid", "key id"),
        ({"k 1": OLD_KEY}, "k 1", "key id"),
    ],
)
def test_key_ring_validation(keys: dict[str, bytes], current: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KeyRing(keys, current=current)


def test_keys_file_first_key_signs() -> None:
    text = f"""\ufeff# identity token keys; the first one signs
new {b64(NEW_KEY)}   # added 2025-01

old {b64(OLD_KEY)}==
"""
    ring = KeyRing.from_file(text)
    assert ring.current == "new"
    assert ring.key_ids == ("new", "old")
    token = KeyRing({"old": OLD_KEY}, current="old").seal(ID, **ARGS, now=NOW, ttl=60)
    assert ring.open(token, **ARGS, now=NOW).canonical_id == ID


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no keys"),
        ("# only a comment\n\n", "no keys"),
        (f"k1 {b64(OLD_KEY)}\nk2\n", "line 2: expected"),
        (f"k1 {b64(OLD_KEY)} extra\n", "line 1: expected"),
        (f"\n\nk1 {b64(OLD_KEY)[:-1]}!\n", "line 3: key is not valid base64url"),
        (f"k1 {STANDARD_B64}\n", "line 1: key is not valid base64url"),
        (f"k1 {b64(OLD_KEY)[:-1]}\n", "line 1: key must decode to 32 bytes, got 31"),
        (f"k1 {b64(OLD_KEY)[:-2]}\n", "line 1: key is not valid base64url"),  # 41 characters: no such length
        (f"k1 {b64(OLD_KEY[:16])}\n", "line 1: key must decode to 32 bytes, got 16"),
        (f"k1 {b64(OLD_KEY)}\nk1 {b64(NEW_KEY)}\n", "line 2: duplicate key id 'k1'"),
        (f"k1 {b64(OLD_KEY)}\ntoolongid {b64(NEW_KEY)}\n", "line 2: bad key id"),
        (f"# swapped\n{b64(OLD_KEY)} k1\n", "line 2: bad key id"),
    ],
)
def test_keys_file_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        KeyRing.from_file(text)
    for key in (OLD_KEY, NEW_KEY):
        assert b64(key)[:20] not in str(info.value)  # never the key material


def test_generate_key_line_parses() -> None:
    line = generate_key_line()
    ring = KeyRing.from_file(line + "\n")
    assert ring.current == line.split()[0]
    assert len(line.split()[1]) == 43
    assert generate_key_line() != line
    assert KeyRing.from_file(generate_key_line("k9")).current == "k9"
    with pytest.raises(ValueError, match="key id"):
        generate_key_line("not valid")


def test_errors_never_carry_the_payload(ring: KeyRing) -> None:
    token = ring.seal(ID, **ARGS, now=NOW, ttl=60, consent="granted")
    for call in (
        lambda: ring.open(token, purpose="hub", audience="shop.example", now=NOW),
        lambda: ring.open(token, **ARGS, now=NOW + 3600),
    ):
        with pytest.raises(TokenError) as info:
            call()
        assert ID not in str(info.value) and "granted" not in str(info.value)
        assert len(str(info.value)) < 40


# ---------------------------------------------- boundaries the mutants showed


def exact(message: str) -> str:
    """A ``pytest.raises(match=...)`` pattern for exactly this message."""
    return "^" + re.escape(message) + "$"


def test_argument_bounds_are_exact(ring: KeyRing) -> None:
    args: dict[str, object] = {"canonical_id": ID, **ARGS, "now": NOW, "consent": "granted"}
    for ttl in (1, 86_400):  # both ends accepted
        assert ring.open(ring.seal(**args, ttl=ttl), **ARGS, now=NOW).expires_at == int(NOW) + ttl  # type: ignore[arg-type]
    assert ring.seal(**{**args, "consent": "x" * 16}, ttl=60)  # type: ignore[arg-type]
    assert ring.seal(**{**args, "consent": ""}, ttl=60)  # type: ignore[arg-type]
    assert ring.seal(**{**args, "canonical_id": "é" * 127}, ttl=60)  # type: ignore[arg-type]  # 254 bytes
    token = ring.seal(**args, ttl=60)  # type: ignore[arg-type]
    for skew in (0, 300):
        assert ring.open(token, **ARGS, now=NOW, skew=skew).canonical_id == ID
    for skew in (-1, 301, True, 1.0):
        with pytest.raises(ValueError, match=exact("skew must be a whole number of seconds from 0 to 300")):
            ring.open(token, **ARGS, now=NOW, skew=skew)  # type: ignore[arg-type]
    for now in (True, "1700000000", float("inf")):
        with pytest.raises(ValueError, match=exact("now must be a finite unix time in seconds")):
            ring.open(token, **ARGS, now=now)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=exact("now is outside the range a token can express")):
        ring.seal(**{**args, "now": -100.0}, ttl=60)  # type: ignore[arg-type]


def test_expiry_edges_to_the_second(ring: KeyRing) -> None:
    token = ring.seal(ID, **ARGS, now=NOW, ttl=60)
    expires = int(NOW) + 60
    assert ring.open(token, **ARGS, now=expires + 5, skew=5).expires_at == expires  # the last second still counts
    with pytest.raises(TokenExpired):
        ring.open(token, **ARGS, now=expires + 5.001, skew=5)
    # An expiry exactly TTL_MAX + skew ahead is still ours; a second more is not.
    far = ring.seal(ID, **ARGS, now=NOW, ttl=86_400)
    assert ring.open(far, **ARGS, now=int(NOW) - 5, skew=5)
    with pytest.raises(TokenInvalid, match=exact("expiry too far in the future")):
        ring.open(far, **ARGS, now=int(NOW) - 5.5, skew=5)


def test_key_id_lengths_one_to_eight() -> None:
    for kid in ("a", "abcdefgh"):
        ring = KeyRing({kid: OLD_KEY}, current=kid)
        assert ring.open(ring.seal(ID, **ARGS, now=NOW, ttl=60), **ARGS, now=NOW).canonical_id == ID
    for kid in ("", "abcdefghi", "a.b"):
        with pytest.raises(ValueError, match=exact("key id must be 1-8 characters of A-Z a-z 0-9 _ -")):
            KeyRing({kid: OLD_KEY}, current=kid)
        with pytest.raises(ValueError, match=exact("key id must be 1-8 characters of A-Z a-z 0-9 _ -")):
            generate_key_line(kid)
    with pytest.raises(ValueError, match=exact("key ring is empty: at least one key is needed")):
        KeyRing({}, current="k1")


def test_token_size_limit_is_exact(ring: KeyRing) -> None:
    long_id = "é" * 127  # the longest id a token carries packs to 254 bytes
    token = ring.seal(long_id, **ARGS, now=NOW, ttl=60)
    assert len(token) <= MAX_TOKEN_CHARS and ring.open(token, **ARGS, now=NOW).canonical_id == long_id
    for junk in ("A" * (MAX_TOKEN_CHARS + 1), 12345, None):
        with pytest.raises(TokenInvalid, match=exact("malformed")):
            ring.open(junk, **ARGS, now=NOW)  # type: ignore[arg-type]


def test_each_refusal_names_its_reason(ring: KeyRing) -> None:
    token = ring.seal(ID, **ARGS, now=NOW, ttl=60)
    data = unb64(token)
    cases = {
        "unsupported version": b64(bytes([2]) + data[1:]),
        "unknown key id": b64(data[:2] + b"zz" + data[4:]),
        "malformed": b64(data[:2]),
    }
    for reason, bad in cases.items():
        with pytest.raises(TokenInvalid) as caught:
            ring.open(bad, **ARGS, now=NOW)
        assert str(caught.value) == reason
    with pytest.raises(TokenInvalid) as caught:
        ring.open(token, purpose="bridge", audience="", now=NOW)
    assert str(caught.value) == "authentication failed"
    with pytest.raises(TokenInvalid) as caught:
        ring.open(token, purpose="hub", audience="shop.example", now=NOW)
    assert str(caught.value) == "authentication failed"
    with pytest.raises(TokenExpired) as expired:
        ring.open(token, **ARGS, now=NOW + 3600)
    assert str(expired.value) == "expired"


def test_keys_file_without_keys_says_how_to_make_one() -> None:
    with pytest.raises(ValueError) as caught:
        KeyRing.from_file("# only a comment\n\n")
    assert str(caught.value) == "keys file has no keys: add a line '<key id> <base64url key>' (`firstparty keygen` prints one)"
    padded = KeyRing.from_file(f"k1 {base64.urlsafe_b64encode(OLD_KEY).decode()}\n")  # '=' padding is accepted
    assert padded.key_ids == ("k1",)


def test_every_token_round_trips_whatever_its_last_character() -> None:
    # base64url output ends in any of 64 characters; none may be lost on the way.
    ring = KeyRing({"k1": OLD_KEY}, current="k1")
    ids = {ring.open(ring.seal(f"id-{i:04d}", **ARGS, now=NOW, ttl=60), **ARGS, now=NOW).token_id[-1] for i in range(400)}
    assert len(ids) > 40  # many last characters were seen, each token opened


def test_expiry_range_edges() -> None:
    ring = KeyRing({"k1": OLD_KEY}, current="k1")
    late = 3_000_000_000.0  # 2065: past 2**31, the unsigned field still holds it
    assert ring.open(ring.seal(ID, **ARGS, now=late, ttl=60), **ARGS, now=late).expires_at == 3_000_000_060
    assert ring.seal(ID, **ARGS, now=0, ttl=1)  # expires at 1: the first second a token can name
    for now, ttl in ((-60.0, 60), (2.0**32 - 60, 60)):  # expires at 0, or at 2**32: not expressible
        with pytest.raises(ValueError, match=exact("now is outside the range a token can express")):
            ring.seal(ID, **ARGS, now=now, ttl=ttl)


def test_malformed_headers_are_malformed_not_unknown_keys(ring: KeyRing) -> None:
    data = unb64(ring.seal(ID, **ARGS, now=NOW, ttl=60))
    nine = bytes([1, 9]) + b"abcdefghi" + data[4:]  # a 9-byte key id: no key ring has one
    short = data[:2 + 2 + 12 + 7 + 16 - 1]  # one byte under header + nonce + smallest payload + tag
    for bad in (nine, short):
        with pytest.raises(TokenInvalid, match=exact("malformed")):
            ring.open(b64(bad), **ARGS, now=NOW)



def test_a_key_id_that_is_not_ascii_is_unknown(ring: KeyRing) -> None:
    data = unb64(ring.seal(ID, **ARGS, now=NOW, ttl=60))
    with pytest.raises(TokenInvalid, match=exact("unknown key id")):
        ring.open(b64(data[:2] + b"\xff\xfe" + data[4:]), **ARGS, now=NOW)
