"""Decoding every body form real clients send, and refusing bad ones."""

from __future__ import annotations

import base64
import gzip
import json
import zlib
import string
from urllib.parse import quote, urlencode

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from proxy.core import codec
from proxy.errors import BadRequest, PayloadTooLarge
from tests.conftest import b64_body, device_id, js_event, json_body

LIMIT = 1024 * 1024


def decode(body: bytes | str = b"", *, query=(), ctype="application/x-www-form-urlencoded", enc="", limit=LIMIT):
    if isinstance(body, str):
        body = body.encode()
    return codec.decode(body=body, query=list(query), content_type=ctype, content_encoding=enc, limit=limit)


EVENT = js_event("Page View", device_id())
BATCH = [js_event(f"e{i}", device_id()) for i in range(3)]


@pytest.mark.parametrize(
    "body,ctype,fmt,is_array",
    [
        (b64_body(EVENT), "application/x-www-form-urlencoded", codec.FORMAT_BASE64, False),
        (b64_body(BATCH), "application/x-www-form-urlencoded", codec.FORMAT_BASE64, True),
        (json_body(BATCH), "application/x-www-form-urlencoded", codec.FORMAT_JSON, True),
        # sendBeacon: same body, text/plain
        (b64_body(BATCH), "text/plain;charset=UTF-8", codec.FORMAT_BASE64, True),
        # HTTP API: raw JSON
        (json.dumps(BATCH), "application/json", codec.FORMAT_RAW, True),
        (json.dumps(EVENT), "", codec.FORMAT_RAW, False),
    ],
)
def test_body_forms(body, ctype, fmt, is_array):
    d = decode(body, ctype=ctype)
    assert d.fmt == fmt
    assert d.is_array is is_array
    expected = BATCH if is_array else [EVENT]
    assert d.events == expected


def test_mixpanel_python_form_keeps_params_in_order():
    body = urlencode({"data": json.dumps(EVENT), "verbose": 1, "ip": 0})
    d = decode(body)
    assert d.fmt == codec.FORMAT_JSON
    assert d.params == [("verbose", "1"), ("ip", "0")]
    assert codec.param(d, [], "verbose") == "1"
    assert codec.param(d, [("ip", "1")], "ip") == "0"  # the body wins


def test_get_data_in_query():
    raw = base64.b64encode(json.dumps(EVENT).encode()).decode()
    d = decode(b"", query=[("data", raw), ("ip", "1")], ctype="")
    assert d.from_query and d.events == [EVENT]


def test_gzip_body():
    d = decode(gzip.compress(b64_body(BATCH).encode()), enc="gzip")
    assert d.events == BATCH


def test_ndjson_body():
    body = "\n".join(json.dumps(e) for e in BATCH) + "\n"
    d = decode(body, ctype="application/x-ndjson")
    assert d.fmt == codec.FORMAT_NDJSON and d.events == BATCH


def test_unescaped_plus_in_base64_is_repaired():
    # Some clients forget to urlencode: '+' arrives raw and form decoding makes it ' '.
    event = {"event": "x", "properties": {"v": "~~~>>>???"}}  # base64 of this contains '+' and '/'
    raw = base64.b64encode(json.dumps(event).encode()).decode()
    assert "+" in raw or "/" in raw
    d = decode("data=" + raw)
    assert d.events == [event]


def test_unpadded_and_urlsafe_base64():
    raw = base64.urlsafe_b64encode(json.dumps(EVENT).encode()).decode().rstrip("=")
    assert decode("data=" + raw).events == [EVENT]


@pytest.mark.parametrize(
    "body,message",
    [
        ("data=%%%", "neither JSON nor valid base64"),
        ("data=" + quote(base64.b64encode(b"{not json").decode()), "not valid JSON"),
        ("data=" + quote("[1, 2]"), "event 0 is not a JSON object"),
        ("data=" + quote(base64.b64encode(b'"a string"').decode()), "must be a JSON object or an array"),
        ("data=" + quote("[]"), "no events"),
        ("verbose=1", "no data"),
        ("data=", "data is empty"),
    ],
)
def test_malformed_payloads(body, message):
    with pytest.raises(BadRequest, match=message):
        decode(body)


def test_too_many_events():
    events = [{"event": "e", "properties": {}}] * (codec.MAX_EVENTS + 1)
    with pytest.raises(BadRequest, match="too many events: 2001"):
        decode(json.dumps(events), ctype="application/json")
    assert len(decode(json.dumps(events[:-1]), ctype="application/json").events) == codec.MAX_EVENTS


def test_depth_limit():
    nested: dict = {"leaf": 1}
    for _ in range(3):
        nested = {"n": nested}
    ok = {"event": "e", "properties": {"obj": nested}}  # 3 levels of nesting inside a property
    assert decode(json.dumps([ok]), ctype="application/json").events == [ok]
    deep = {"event": "e", "properties": {"obj": {"n": nested}}}
    with pytest.raises(BadRequest, match="nested deeper"):
        decode(json.dumps([deep]), ctype="application/json")


def test_invalid_gzip_and_bomb():
    with pytest.raises(BadRequest, match="not valid gzip"):
        decode(b"not gzip at all", enc="gzip")
    bomb = gzip.compress(b"data=" + b"A" * 200_000)
    with pytest.raises(PayloadTooLarge):
        decode(bomb, enc="gzip", limit=50_000)
    with pytest.raises(BadRequest, match="truncated"):
        decode(gzip.compress(b64_body(EVENT).encode())[:-12], enc="gzip")


def test_unknown_content_encoding():
    with pytest.raises(BadRequest, match="unsupported Content-Encoding"):
        decode(b64_body(EVENT), enc="br")


@pytest.mark.parametrize("fmt_body", [b64_body, json_body])
def test_encode_round_trip(fmt_body):
    d = decode(fmt_body(BATCH) + "&verbose=1")
    body, ctype = codec.encode_body(d)
    again = decode(body, ctype=ctype)
    assert again.events == BATCH and again.fmt == d.fmt and again.params == [("verbose", "1")]


def test_base64_form_value_escapes_only_what_base64_needs():
    raw = bytes(range(256)) * 3
    value = codec.b64_form_value(raw)
    assert set(value.decode()) <= set(string.ascii_letters + string.digits + "%") | set("0123456789ABCDEF")
    assert value.decode() == quote(base64.b64encode(raw).decode(), safe="")


# ------------------------------------------------------------- fuzzing

REAL_BODIES = [b64_body(EVENT).encode(), b64_body(BATCH).encode(), json_body(BATCH).encode(), json.dumps(BATCH).encode()]


def _assert_decodes_or_refuses(body: bytes, ctype: str, enc: str = "") -> None:
    try:
        d = decode(body, ctype=ctype, enc=enc, limit=64 * 1024)
    except BadRequest as exc:
        assert str(exc)  # a message for the client, never empty
        return
    # Whatever decodes satisfies the shape invariants and re-encodes.
    assert 1 <= len(d.events) <= codec.MAX_EVENTS
    assert all(isinstance(e, dict) for e in d.events)
    out, out_type = codec.encode_body(d)
    assert decode(out, ctype=out_type).events == d.events


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048), st.sampled_from(["application/x-www-form-urlencoded", "text/plain", "application/json", ""]))
def test_fuzz_random_bytes(body, ctype):
    _assert_decodes_or_refuses(body, ctype)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(REAL_BODIES),
    st.lists(st.tuples(st.integers(min_value=0, max_value=4000), st.integers(min_value=0, max_value=255)), max_size=6),
    st.integers(min_value=0, max_value=4000),
)
def test_fuzz_mutated_real_payloads(body, flips, cut):
    data = bytearray(body)
    for pos, byte in flips:
        if data:
            data[pos % len(data)] = byte
    _assert_decodes_or_refuses(bytes(data[: max(cut, 1)] if cut < len(data) else data), "application/x-www-form-urlencoded")


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_gzip_garbage(body):
    _assert_decodes_or_refuses(body, "text/plain", enc="gzip")


@settings(max_examples=100, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=30,
    )
)
def test_fuzz_any_json_value(value):
    raw = orjson.dumps(value)
    _assert_decodes_or_refuses(b"data=" + quote(base64.b64encode(raw).decode(), safe="").encode(), "text/plain")


@pytest.mark.parametrize("nested_at", [None, 0, 9])
def test_a_batch_of_flat_events_skips_the_depth_walk_but_a_deep_one_is_still_refused(nested_at):
    """The bracket count proves a batch of flat events shallow; one deep
    property anywhere in the batch still gets the walk and the 400."""
    import base64
    import json

    events = [{"event": f"e{i}", "properties": {"token": "t", "n": i, "s": "a{b[c"}} for i in range(10)]
    if nested_at is not None:
        deep: object = 1
        for _ in range(6):
            deep = {"x": deep}
        events[nested_at]["properties"]["deep"] = deep
    data = base64.b64encode(json.dumps(events).encode()).decode()
    body = ("data=" + data.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")).encode()
    kwargs = dict(body=body, query=[], content_type="application/x-www-form-urlencoded", content_encoding="", limit=10**6)
    if nested_at is None:
        assert len(codec.decode(**kwargs).events) == 10
    else:
        with pytest.raises(BadRequest, match="nested deeper"):
            codec.decode(**kwargs)


@given(st.binary(max_size=300) | st.text(max_size=300))
def test_the_bracket_count_is_the_number_of_opening_brackets(raw):
    """The depth shortcut's bound: every ``{`` and ``[`` counted, nothing else
    in bytes and in text alike."""
    expected = sum(1 for c in (raw.decode("latin-1") if isinstance(raw, bytes) else raw) if c in "{[")
    assert codec._brackets(raw) == expected


# ----------------------------------------------- edges the mutants showed


def chain(levels: int) -> object:
    """``levels`` nested objects, no stray brackets: {"x": {"x": ... 1}}."""
    value: object = 1
    for _ in range(levels):
        value = {"x": value}
    return value


@pytest.mark.parametrize("as_array", [True, False])
@pytest.mark.parametrize("form", ["raw", "base64", "json"])
def test_depth_limit_is_exact_in_every_body_form(as_array, form):
    """MAX_DEPTH containers from the top (the array counts, given or not):
    one level more is refused, in a single event and in a batch whose other
    events are flat (so a miscounted bracket shortcut would let it through)."""
    def body_of(payload: object) -> tuple[bytes, str]:
        raw = json.dumps(payload, separators=(",", ":"))
        if form == "raw":
            return raw.encode(), "application/json"
        if form == "base64":
            return ("data=" + quote(base64.b64encode(raw.encode()).decode(), safe="")).encode(), "text/plain"
        return ("data=" + quote(raw, safe="")).encode(), "application/x-www-form-urlencoded"

    # array(1) > event(2) > properties(3) > chain: depth 3 + levels
    fits = codec.MAX_DEPTH - 3
    for levels, ok in ((fits, True), (fits + 1, False)):
        flat = [{"event": f"f{i}", "properties": {"n": i}} for i in range(10)] if as_array else []
        event = {"event": "deep", "properties": {"c": chain(levels)}}
        payload = [*flat, event] if as_array else event
        body, ctype = body_of(payload)
        if ok:
            assert decode(body, ctype=ctype).events[-1] == event
        else:
            with pytest.raises(BadRequest, match=f"nested deeper than {codec.MAX_DEPTH} levels"):
                decode(body, ctype=ctype)


@pytest.mark.parametrize("form", ["raw", "base64", "json"])
def test_deep_lists_count_as_levels_too(form):
    fits = codec.MAX_DEPTH - 3
    nested: object = 1
    for _ in range(fits + 1):
        nested = [nested]

    def body(payload: object) -> tuple[str, str]:
        raw = json.dumps(payload)
        if form == "raw":
            return raw, "application/json"
        if form == "base64":
            return b64_body(payload), "application/x-www-form-urlencoded"
        return json_body(payload), "application/x-www-form-urlencoded"

    deep, ctype = body([{"event": "e", "properties": {"l": nested}}])
    with pytest.raises(BadRequest, match="nested deeper"):
        decode(deep, ctype=ctype)
    fits_body, ctype = body([{"event": "e", "properties": {"l": nested[0]}}])
    assert decode(fits_body, ctype=ctype).events[0]["properties"]["l"] == nested[0]


def test_content_type_parameters_do_not_hide_the_type():
    d = decode(json.dumps(BATCH), ctype="application/json; charset=utf-8; profile=x")
    assert d.fmt == codec.FORMAT_RAW and d.events == BATCH


def test_param_falls_back_to_the_query():
    d = decode(b64_body(EVENT))  # no other form fields
    assert codec.param(d, [("a", "x"), ("ip", "1")], "ip") == "1"
    assert codec.param(d, [("a", "x")], "ip", "0") == "0"


def test_a_gzip_bomb_is_refused_without_inflating_it():
    import tracemalloc

    bomb = gzip.compress(b"\0" * 50_000_000)  # 50 MB of zeros in about 50 kB
    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooLarge):
            codec.gunzip(bomb, 1_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10_000_000  # never more than about the limit in memory


@pytest.mark.parametrize(
    "body,ctype,message",
    [
        ("data=", "application/x-www-form-urlencoded", "data is empty"),
        ("data=%%%", "application/x-www-form-urlencoded", "data is neither JSON nor valid base64"),
        ("verbose=1", "application/x-www-form-urlencoded", "no data: send the payload in a 'data' form field or as a JSON body"),
        ("[]", "application/json", "data contains no events"),
        ("data=" + quote(base64.b64encode(b'"x"').decode()), "text/plain", "data must be a JSON object or an array of objects"),
        ("[1]", "application/json", "event 0 is not a JSON object"),
        ("{nope", "application/json", "data is not valid JSON: unexpected character"),
    ],
)
def test_error_messages_tell_the_client_what_is_wrong(body, ctype, message):
    with pytest.raises(BadRequest) as caught:
        decode(body, ctype=ctype)
    assert str(caught.value).startswith(message)


def test_a_broken_percent_escape_in_base64_is_a_400_not_a_crash():
    # Found by the fuzz test: "%d7" decodes to a non-ASCII character, which
    # binascii refuses with ValueError rather than binascii.Error.
    with pytest.raises(BadRequest, match="neither JSON nor valid base64"):
        decode(b"data=eyJldmVudCI6%d7IlBh")


def test_a_body_neither_form_nor_utf8_is_refused_but_raw_utf8_is_read():
    event = {"event": "café", "properties": {"token": "t"}}
    body = b"data=" + json.dumps(event, ensure_ascii=False).encode()
    assert decode(body).events == [event]
    with pytest.raises(BadRequest) as caught:
        decode(b"data=\xff\xfe")
    assert str(caught.value) == "body is neither form-encoded nor UTF-8"


@pytest.mark.parametrize("enc", ["gzip", "x-gzip", "GZIP", " deflate "])
def test_compressed_bodies_by_every_name(enc):
    raw = b64_body(BATCH).encode()
    data = zlib.compress(raw) if "deflate" in enc else gzip.compress(raw)
    assert decode(data, enc=enc).events == BATCH


@pytest.mark.parametrize("enc", ["", "identity", "Identity"])
def test_uncompressed_by_every_name(enc):
    assert decode(b64_body(BATCH), enc=enc).events == BATCH


def test_gunzip_limit_is_exact():
    raw = b"x" * 1000
    assert codec.gunzip(gzip.compress(raw), 1000) == raw
    with pytest.raises(PayloadTooLarge) as caught:
        codec.gunzip(gzip.compress(raw), 999)
    assert str(caught.value) == "decompressed body is larger than 999 bytes"
    with pytest.raises(BadRequest) as caught:
        codec.gunzip(gzip.compress(raw)[:-12], 5000)
    assert str(caught.value) == "gzip body is truncated"
    with pytest.raises(BadRequest) as caught:
        codec.gunzip(b"plain", 5000)
    assert str(caught.value) == "body is not valid gzip"


@pytest.mark.parametrize(
    "ctype", ["application/json", "Application/JSON; charset=utf-8", "application/json;charset=UTF-8"]
)
def test_json_content_types_are_read_whatever_their_spelling(ctype):
    d = decode(json.dumps(BATCH), ctype=ctype)
    assert d.fmt == codec.FORMAT_RAW and d.is_array and d.events == BATCH and d.text == json.dumps(BATCH).encode()
    single = decode(json.dumps(EVENT), ctype=ctype)
    assert not single.is_array and single.events == [EVENT]


def test_ndjson_flags():
    body = ("\n".join(json.dumps(e) for e in BATCH) + "\n").encode()
    d = decode(body, ctype="application/x-ndjson; charset=utf-8")
    assert d.fmt == codec.FORMAT_NDJSON and d.is_array is True and d.events == BATCH and d.text == body
    # Leading blank space does not hide a JSON array from the raw-body path.
    assert decode(b"  \n" + json.dumps(BATCH).encode(), ctype="text/plain").fmt == codec.FORMAT_RAW


def test_data_in_the_body_is_not_from_the_query():
    d = decode(b64_body(EVENT), query=[("data", "ignored")])
    assert d.from_query is False and d.events == [EVENT]
    assert decode(b"", query=[("data", json.dumps(EVENT))], ctype="").from_query is True


def test_json_data_value_with_leading_space_and_urlsafe_alphabets():
    d = decode("data=" + quote("  " + json.dumps(EVENT)))
    assert d.fmt == codec.FORMAT_JSON and d.events == [EVENT]
    for event in ({"event": "x", "properties": {"v": "\xfb\xff"}}, {"event": "x", "properties": {"v": "~~~>>>"}}):
        raw = base64.urlsafe_b64encode(json.dumps(event).encode()).decode()
        assert decode("data=" + raw).events == [event]
        assert decode("data=" + raw).fmt == codec.FORMAT_BASE64


@pytest.mark.parametrize("is_array", [True, False])
def test_encode_body_in_each_format(is_array):
    events = BATCH if is_array else [EVENT]
    payload = events if is_array else events[0]
    raw = codec.Decoded(list(events), is_array, codec.FORMAT_RAW)
    assert codec.encode_body(raw) == (orjson.dumps(payload), "application/json")
    nd = codec.Decoded(list(events), True, codec.FORMAT_NDJSON)
    assert codec.encode_body(nd) == (b"".join(orjson.dumps(e) + b"\n" for e in events), "application/x-ndjson")
    form = codec.Decoded(list(events), is_array, codec.FORMAT_JSON, params=[("verbose", "1"), ("a b", "c&d")])
    body, ctype = codec.encode_body(form)
    assert ctype == "application/x-www-form-urlencoded"
    assert body == b"data=" + quote(orjson.dumps(payload).decode(), safe="").encode() + b"&verbose=1&a%20b=c%26d"
    b64 = codec.Decoded(list(events), is_array, codec.FORMAT_BASE64)
    value, raw_json = codec.encode_data_value(b64)
    assert raw_json == orjson.dumps(payload) and value == codec.b64_form_value(raw_json)


def _outcome(fn):
    try:
        d = fn()
    except BadRequest as exc:
        return ("refused", str(exc))
    return (d.events, d.is_array, d.fmt, d.params, d.from_query, d.text)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from([b64_body(EVENT).encode(), b64_body(BATCH).encode(), json_body(BATCH).encode(), b"data=", b"data=%7B%7D"]),
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=4000), st.sampled_from(b"+/=% &{[\n\tAa0%2BFD\xc3")), max_size=4
    ),
)
def test_the_data_only_fast_path_reads_every_body_as_the_form_parser_does(body, flips):
    """``data=<base64>`` bodies skip the form parser; whatever the bytes, the
    result (or the refusal) is the one the general form path gives."""
    data = bytearray(body)
    for pos, byte in flips:
        data[5 + pos % max(len(data) - 5, 1) if len(data) > 5 else len(data) - 1] = byte
    raw = bytes(data)
    assert _outcome(lambda: decode(raw)) == _outcome(lambda: codec.decode_form(raw, []))


def test_mixpanel_js_bodies_take_the_fast_path():
    body = b64_body(BATCH).encode()
    assert codec._data_only(body[5:]) is not None  # and it agrees (above)
    assert codec._data_only(b"eyJ+YSI6MX0=") is None  # a raw '+' is a space: the form parser's
    assert codec._data_only(b"%7B%7D") is None  # %-escaped JSON


@pytest.mark.parametrize("text", ["ÿþ" * 2000, "?>~" * 2000, "plain"], ids=["latin", "ascii", "plain"])
def test_base64_with_many_escapes_reads_as_with_few(text):
    """Non-ASCII JSON base64-encodes to many ``+`` and ``/``: past the first
    escapes the rest are undone in bulk, with the same result."""
    raw = orjson.dumps({"event": "x", "properties": {"distinct_id": "d", "s": text}})
    body = b"data=" + quote(base64.b64encode(raw).decode(), safe="").encode()
    assert (body.count(b"%") > codec._FEW_ESCAPES) == (text != "plain")
    assert _outcome(lambda: decode(body)) == _outcome(lambda: codec.decode_form(body, []))
    assert decode(body).events[0]["properties"]["s"] == text
    broken = body[:-20] + b"%41" + body[-17:]  # an escape base64 never needs: the form parser's
    assert codec._data_only(broken[5:]) is None


@settings(max_examples=500, deadline=None)
@given(st.one_of(
    st.binary(max_size=64).map(lambda b: base64.b64encode(b)),
    st.text(alphabet=string.ascii_letters + string.digits + "+/=\n -_.", max_size=40).map(str.encode),
    st.tuples(st.binary(max_size=48), st.integers(0, 60), st.sampled_from(b"=+/\n A\x00")).map(
        lambda t: (lambda e: e[: t[1]] + bytes([t[2]]) + e[t[1]:])(base64.b64encode(t[0]))
    ),
))
def test_pybase64_validates_as_binascii_strict_mode(value):
    """The fast path decodes with pybase64 (validate=True), the form parser's
    path with binascii's strict mode. What pybase64 accepts, binascii accepts
    too, with the same bytes; what it refuses (``AAAA=``, which binascii
    takes) goes on to the form parser's path, so nothing is refused for it."""
    import binascii

    import pybase64

    def run(fn):
        try:
            return fn(value)
        except (binascii.Error, ValueError):
            return "refused"

    fast = run(lambda v: pybase64.b64decode(v, validate=True))
    if fast != "refused":
        assert fast == run(lambda v: binascii.a2b_base64(v, strict_mode=True))
    else:
        assert codec._data_only(value) is None  # left to the form parser
    # whatever the fast path does, the result is the form parser's
    body = b"data=" + value
    assert _outcome(lambda: decode(body)) == _outcome(lambda: codec.decode_form(body, []))
