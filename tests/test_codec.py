"""Decoding every body form real clients send, and refusing bad ones."""

from __future__ import annotations

import base64
import gzip
import json
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
