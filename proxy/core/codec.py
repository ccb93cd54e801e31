"""Decode what Mixpanel clients send, and encode it again for the upstream.

Pure functions over bytes and plain data; no I/O.

Every body form real clients send is accepted:
- mixpanel-js: ``data=<urlencoded base64(JSON)>`` (default) or
  ``data=<urlencoded JSON>`` (``api_payload_format: 'json'``), as a form POST,
  as sendBeacon's ``text/plain`` body, or in the query string of a GET;
- mixpanel-python: ``data=<urlencoded JSON>&verbose=1&ip=0`` in the body;
- the HTTP API: a raw JSON object/array body, or ``application/x-ndjson``;
- any of these with ``Content-Encoding: gzip``.

Invariants: a ``Decoded`` always holds 1..MAX_EVENTS dict events within the
depth limit, or decoding raised ``BadRequest``/``PayloadTooLarge`` with a
message fit to show the client; decompression never produces more than the
configured limit.
"""

from __future__ import annotations

import base64
import binascii
import zlib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote_from_bytes

import orjson
import pybase64

from ..errors import BadRequest, PayloadTooLarge
from .forms import parse_pairs

MAX_EVENTS = 2000
# A JSON text longer than this is counted before it is parsed: its commas
# (in C) bound how many values a parse would build. A real batch of
# MAX_EVENTS events has far fewer than MAX_SEPARATORS (26 properties an
# event, a few lists); ``[{},{},...]`` filling a 10 MB body has millions.
LARGE_TEXT = 256 * 1024
MAX_SEPARATORS = MAX_EVENTS * 512
# A compressed body inflates to at most this many times its size (``decompress``).
INFLATE_RATIO = 100
INFLATE_FLOOR = 1024 * 1024
# Segment's calls nest deeper than Mixpanel accepts (context, traits, nested
# properties), but never this deep: the bound every walk over a call relies on.
MAX_CALL_DEPTH = 32
# Containers from the top of the payload: array -> event -> properties ->
# three levels of nested objects Mixpanel accepts -> a list inside those.
MAX_DEPTH = 7

FORMAT_BASE64 = "base64"  # form field data=<base64 JSON> (mixpanel-js default)
FORMAT_JSON = "json"  # form field data=<JSON> (mixpanel-python, api_payload_format json)
FORMAT_RAW = "raw"  # the body is the JSON itself (HTTP API, /import)
FORMAT_NDJSON = "ndjson"  # one JSON object per line (/import)


@dataclass(slots=True)
class Decoded:
    """A decoded request payload and how it arrived, so it can be sent on alike."""

    events: list[dict[str, Any]]
    is_array: bool
    fmt: str
    # Form fields other than ``data`` (verbose, ip, api_key, strict...), in order.
    params: list[tuple[str, str]] = field(default_factory=list)
    from_query: bool = False
    # The JSON text the events came from (``protocols.base.Payload.mentions`` tests it).
    text: bytes | str = b""


def gunzip(body: bytes, limit: int) -> bytes:
    """Inflate a gzip (or zlib) body, refusing to produce more than ``limit`` bytes."""
    inflater = zlib.decompressobj(wbits=47)  # 32 + 15: accept gzip and zlib headers
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest("body is not valid gzip") from exc
    if len(out) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(f"decompressed body is larger than {limit} bytes")
    if not inflater.eof:
        raise BadRequest("gzip body is truncated")
    return out


def decompress(body: bytes, content_encoding: str, limit: int) -> bytes:
    """The body as sent before its ``Content-Encoding`` (gzip, deflate or none).

    A compressed body inflates to at most ``INFLATE_RATIO`` times its size
    (never less than ``INFLATE_FLOOR``, never more than ``limit``): analytics
    JSON compresses 5 to 30 times; a 10 KB gzip that inflates to 10 MB of
    ``[{},{},...]`` is a bomb, refused before it costs a full parse."""
    encoding = content_encoding.strip().lower()
    if encoding in ("gzip", "x-gzip", "deflate"):
        return gunzip(body, min(limit, max(INFLATE_FLOOR, INFLATE_RATIO * len(body))))
    if encoding not in ("", "identity"):
        raise BadRequest(f"unsupported Content-Encoding {content_encoding!r}; send gzip or none")
    return body


def parse_form(body: bytes) -> list[tuple[str, str]]:
    """``application/x-www-form-urlencoded`` fields, in order, ``+`` read as space."""
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        # Non-ASCII bytes are not valid form encoding, but some clients send raw
        # UTF-8; read it as such rather than dropping the event.
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRequest("body is neither form-encoded nor UTF-8") from exc
    return parse_pairs(text)


def decode_data_value(value: str) -> tuple[Any, str, str | bytes]:
    """The ``data`` field: JSON as it is, or base64 of JSON.

    Returns (obj, format, the JSON text)."""
    head = value[:1]
    if head and head not in "{[ \t\r\n":
        # The common case, mixpanel-js's padded standard base64: one strict C
        # pass. Anything it refuses takes the repairing path below.
        try:
            raw = binascii.a2b_base64(value, strict_mode=True)
        except ValueError:  # binascii.Error, or a non-ASCII str from a broken %-escape
            pass
        else:
            return _loads(raw), FORMAT_BASE64, raw
    stripped = value.lstrip()
    if stripped[:1] in ("{", "["):
        return _loads(stripped), FORMAT_JSON, stripped
    raw = _b64decode(stripped.strip())
    return _loads(raw), FORMAT_BASE64, raw


def _brackets(raw: str | bytes) -> int:
    # Nesting depth can never exceed the number of opening brackets; counting
    # them (in C) lets the common flat event skip the walk in _depth. Counted
    # as what ``replace`` removes: it finds each bracket with memchr and
    # copies the runs between, where ``count`` tests byte by byte
    # (``bench/inprocess.py --instructions --events 10``: 114k instructions
    # fewer per 10-event request, BENCHMARKS.md).
    if isinstance(raw, str):
        return 2 * len(raw) - len(raw.replace("{", "")) - len(raw.replace("[", ""))
    return 2 * len(raw) - len(raw.replace(b"{", b"")) - len(raw.replace(b"[", b""))


def _b64decode(text: str) -> bytes:
    if not text:
        raise BadRequest("data is empty")
    # A client that forgot to urlencode sends raw '+', which form decoding turned
    # into ' '; mixpanel-js and old SDKs also strip padding. Repair both.
    text = text.replace(" ", "+")
    text += "=" * (-len(text) % 4)
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(text)
        # strict_mode: what b64decode(validate=True) checks, without its regex pass.
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest("data is neither JSON nor valid base64") from exc


def _loads(raw: str | bytes) -> Any:
    if len(raw) > LARGE_TEXT:
        comma = "," if isinstance(raw, str) else b","
        separators = len(raw) - len(raw.replace(comma, comma[:0]))  # type: ignore[arg-type]
        if separators > MAX_SEPARATORS:
            raise BadRequest(
                f"too many values: {separators} separators in one payload, far more than {MAX_EVENTS} events hold"
            )
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"data is not valid JSON: {exc.args[0] if exc.args else exc}") from exc


def _depth(value: Any, limit: int) -> None:
    # Iterative so a hostile payload cannot exhaust the Python stack.
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise BadRequest(f"payload is nested deeper than {limit} levels")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, (dict, list)))


def check_depth(obj: Any, raw: str | bytes, limit: int) -> None:
    """``BadRequest`` when ``obj`` (parsed from ``raw``) nests deeper than ``limit``:
    the bracket count decides for nearly every payload, the walk only past it."""
    if _brackets(raw) > limit:
        _depth(obj, limit)


def check_events(obj: Any, brackets: int | None = None) -> tuple[list[dict[str, Any]], bool]:
    """Shape rules: one object or a non-empty array of objects, bounded in count and depth.

    ``brackets``, when known, is the number of opening brackets in the JSON text."""
    if isinstance(obj, dict):
        events, is_array = [obj], False
    elif isinstance(obj, list):
        events, is_array = obj, True
    else:
        raise BadRequest("data must be a JSON object or an array of objects")
    if not events:
        raise BadRequest("data contains no events")
    if len(events) > MAX_EVENTS:
        raise BadRequest(f"too many events: {len(events)} in one request, the limit is {MAX_EVENTS}")
    for i, event in enumerate(events):
        if not isinstance(event, dict):
            raise BadRequest(f"event {i} is not a JSON object")
    # The top-level array counts as one level whether or not the client used one.
    if brackets is None or (brackets + (0 if is_array else 1) > MAX_DEPTH and brackets > _flat_brackets(events, is_array)):
        _depth(obj if is_array else [obj], MAX_DEPTH)
    return events, is_array


def _flat_brackets(events: list[dict[str, Any]], is_array: bool) -> int:
    """The opening brackets a payload has when no container sits deeper than an
    event's own values (``properties``, ``$set``): the array, each event, and
    each container value of an event. A text with no more brackets than this
    (strings holding brackets only add to the count) is 3 levels deep at most,
    so a batch of flat events needs no walk over every property."""
    n = len(events) + (1 if is_array else 0)
    for event in events:
        for value in event.values():
            if type(value) is dict or type(value) is list:
                n += 1
    return n


def decode(
    *,
    body: bytes,
    query: list[tuple[str, str]],
    content_type: str,
    content_encoding: str,
    limit: int,
) -> Decoded:
    """Decode a request into events. ``query`` is the decoded query string."""
    body = decompress(body, content_encoding, limit)

    ctype = content_type.split(";", 1)[0].strip().lower()
    head = body.lstrip()[:1]
    if body and (ctype == "application/x-ndjson" or (ctype == "application/json" and head not in (b"[", b"{"))):
        return _decode_ndjson(body)
    if body and (head in (b"[", b"{") or ctype == "application/json"):
        events, is_array = check_events(_loads(body), _brackets(body))
        return Decoded(events, is_array, FORMAT_RAW, text=body)

    if body[:5] == b"data=" and b"&" not in body:
        only = _data_only(body[5:])
        if only is not None:
            return only
    return decode_form(body, query)


def _data_only(value: bytes) -> Decoded | None:
    """mixpanel-js's own body, ``data=`` and its padded base64 with only
    ``+``, ``/`` and ``=`` %-escaped, decoded without the form parser (no
    text decode, no split, bytes straight into base64); None when it is
    anything else, which ``decode_form`` then reads (the same result either
    way: ``test_codec`` checks both paths against each other)."""
    if b"+" in value:  # a space in form encoding: the repairing path's case
        return None
    unescaped = _unescape_base64(value)
    if not unescaped or unescaped[:1] in b"{[ \t\r\n":
        return None
    try:
        # pybase64's validate accepts nothing binascii's strict mode refuses
        # (test_codec holds it to that); what it refuses (``AAAA=``) the form
        # parser's path reads. A twentieth of the cost, on every request.
        raw = pybase64.b64decode(unescaped, validate=True)
    except (binascii.Error, ValueError):
        return None
    events, is_array = check_events(_loads(raw), _brackets(raw))
    return Decoded(events, is_array, FORMAT_BASE64, [], False, raw)


_BASE64_ESCAPES = {b"2B": b"+", b"2F": b"/", b"3D": b"="}
_FEW_ESCAPES = 16


def _unescape_base64(value: bytes) -> bytes | None:
    """``value`` with its ``%2B``/``%2F``/``%3D`` undone, or None when any
    other ``%`` is in it. Base64 of ASCII JSON has few ``+`` and ``/`` (a
    12 kB batch: four), so the escapes are found one by one (``find`` of one
    byte is a memchr) rather than with three full ``replace`` passes, which
    cost 10 µs per 12 kB each even when they find nothing; a value with many
    escapes gets the passes for the rest."""
    at = value.find(b"%")
    if at < 0:
        return value
    parts: list[bytes] = []
    start = 0
    while at >= 0:
        char = _BASE64_ESCAPES.get(value[at + 1 : at + 3])
        if char is None:
            return None
        parts += (value[start:at], char)
        start = at + 3
        if len(parts) >= 2 * _FEW_ESCAPES:
            rest = value[start:].replace(b"%2B", b"+").replace(b"%2F", b"/").replace(b"%3D", b"=")
            if b"%" in rest:
                return None
            parts.append(rest)
            return b"".join(parts)
        at = value.find(b"%", start)
    parts.append(value[start:])
    return b"".join(parts)


def decode_form(body: bytes, query: list[tuple[str, str]]) -> Decoded:
    """A form body (or a GET's query) with the payload in its ``data`` field."""
    fields = parse_form(body) if body else []
    data = next((v for k, v in fields if k == "data"), None)
    from_query = False
    if data is None:
        data = next((v for k, v in query if k == "data"), None)
        from_query = data is not None
    if data is None:
        raise BadRequest("no data: send the payload in a 'data' form field or as a JSON body")
    obj, fmt, text = decode_data_value(data)
    events, is_array = check_events(obj, _brackets(text))
    params = [(k, v) for k, v in fields if k != "data"]
    return Decoded(events, is_array, fmt, params, from_query, text)


def _decode_ndjson(body: bytes) -> Decoded:
    lines = [line for line in body.splitlines() if line.strip()]
    if len(lines) > MAX_EVENTS:  # counted before any line is parsed
        raise BadRequest(f"too many events: {len(lines)} in one request, the limit is {MAX_EVENTS}")
    events = [_loads(line) for line in lines]
    events, _ = check_events(events)
    return Decoded(events, True, FORMAT_NDJSON, text=body)


def param(decoded: Decoded, query: list[tuple[str, str]], name: str, default: str = "") -> str:
    """A client option (``verbose``, ``ip``...), from the body first, then the query."""
    for k, v in decoded.params:
        if k == name:
            return v
    for k, v in query:
        if k == name:
            return v
    return default


# ------------------------------------------------------------------ encoding

# base64 output only ever needs these three escaped; replacing them directly
# avoids urllib's per-byte quoting path (PERFORMANCE.md: 19 % of a naive proxy).
def b64_form_value(raw: bytes) -> bytes:
    return pybase64.b64encode(raw).replace(b"+", b"%2B").replace(b"/", b"%2F").replace(b"=", b"%3D")


def form_quote(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return quote_from_bytes(raw, safe="").encode("ascii")


def encode_data_value(decoded: Decoded) -> tuple[bytes, bytes]:
    """The (re-encoded) payload as a form field value, and the JSON it holds."""
    raw = orjson.dumps(decoded.events if decoded.is_array else decoded.events[0])
    if decoded.fmt == FORMAT_BASE64:
        return b64_form_value(raw), raw
    return form_quote(raw), raw


def encode_body(decoded: Decoded) -> tuple[bytes, str]:
    """Body and Content-Type to send upstream, in the format the client used."""
    if decoded.fmt == FORMAT_RAW:
        return orjson.dumps(decoded.events if decoded.is_array else decoded.events[0]), "application/json"
    if decoded.fmt == FORMAT_NDJSON:
        return b"\n".join(orjson.dumps(e) for e in decoded.events) + b"\n", "application/x-ndjson"
    value, _ = encode_data_value(decoded)
    parts = [b"data=" + value]
    parts.extend(form_quote(k) + b"=" + form_quote(v) for k, v in decoded.params)
    return b"&".join(parts), "application/x-www-form-urlencoded"
