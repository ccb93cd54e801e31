"""Mixpanel's ingestion protocol, as mixpanel-js, mixpanel-python and the HTTP
API speak it (PRODUCT.md, wire facts).

- routes: ``track`` ``engage`` ``groups`` ``import`` carry events;
  ``record`` ``flags`` ``settings`` ``decide`` carry identity in the query
  and a body forwarded byte for byte;
- bodies: every form ``core.codec`` decodes (``data=`` base64 or JSON, raw
  JSON, NDJSON, gzip), answered ``1``/``0`` or, with ``verbose=1``,
  ``{"status":1,"error":null}``;
- identity fields: track ``properties.distinct_id`` (``$device:<id>`` while
  anonymous), ``$device_id``, ``$user_id``, ``$anon_distinct_id``,
  ``$distinct_ids`` of ``$merge``; engage ``$distinct_id``, ``$device_id``;
  groups carry no person id;
- batches for the upstream: ``data=<base64 JSON array>`` posted to
  ``/<route>?verbose=1&ip=<0|1>``; answers sorted into ``base`` classes, with
  ``failed_records`` naming the events a 400 refused.

Pure: no I/O. Invariants: ``$user_id`` is never read for rewriting nor
written; an event without a mapped id is left exactly as it was; an event
made ready for a batch always carries a ``$insert_id`` (the vendor
de-duplicates a resend by it) and, when the client asked for geolocation,
its visitor's IP.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlencode

import orjson

from ..core import codec
from ..core.bridge import strip_everywhere, token_in_url
from ..core.cookie import cookie_pairs
from ..core.identity import DEVICE_PREFIX, anon_id, strip_device
from ..core.ids import generated
from ..core.rewrite import Rewrite, map_id, rewrite_fields, rewrite_query
from ..core.scrub import clean_fields
from .firsttouch import FIRST_TOUCH
from .base import (
    ACCEPTED,
    REJECTED,
    Answer,
    EventFacts,
    Outbound,
    Payload,
    Run,
    Touches,
    Verdict,
    classify_status,
)

NAME = "mixpanel"
EVENT_ROUTES = frozenset({"track", "engage", "groups", "import"})
# Acknowledged once durably spooled (in spool mode); /import stays synchronous
# so its credentials are never written to disk.
SPOOLED_ROUTES = frozenset({"track", "engage", "groups"})
QUERY_ROUTES = frozenset({"record", "flags", "settings", "decide"})
# Query fields that carry identity, per query-identity route.
QUERY_ID_FIELDS = {"record": ("distinct_id", "$device_id"), "decide": ("distinct_id",)}

_TRACK_FIELDS = ("distinct_id", "$device_id", "$anon_distinct_id")
_TRACK_ANONYMOUS_FIELDS = ("$device_id", "$anon_distinct_id")  # beside a person's distinct_id
_ENGAGE_FIELDS = ("$distinct_id", "$device_id")
_PROFILE_KEYS = frozenset(
    {"$token", "$distinct_id", "$device_id", "$user_id", "$time", "$ip", "$ignore_time", "$group_key", "$group_id"}
)
_ACCEPTED_VERBOSE = Answer(200, b'{"status":1,"error":null}', "application/json")
_ACCEPTED_PLAIN = Answer(200, b"1", "text/plain")
# /record's own "accepted" (a session-replay chunk), as Mixpanel answers it.
RECORD_ACCEPTED = Answer(200, b'{"code":200,"status":"OK"}', "application/json")


# ------------------------------------------------------------------ answers


def wants_verbose(query: list[tuple[str, str]], params: list[tuple[str, str]] = ()) -> bool:  # type: ignore[assignment]
    for k, v in (*params, *query):
        if k == "verbose":
            return v == "1"
    return False


def accepted(verbose: bool) -> Answer:
    """Mixpanel's "accepted": ``{"status":1,"error":null}``, or ``1`` when not verbose."""
    return _ACCEPTED_VERBOSE if verbose else _ACCEPTED_PLAIN


def error(status: int, message: str, verbose: bool) -> Answer:
    if verbose:
        return Answer(status, orjson.dumps({"status": 0, "error": message}), "application/json")
    return Answer(status, b"0", "text/plain")


# ----------------------------------------------------------------- decoding


def decode(
    route: str,
    body: bytes,
    query: list[tuple[str, str]],
    content_type: str,
    content_encoding: str,
    limit: int,
    authorization: str = "",
) -> Payload:
    """A request's events (``core.codec``); raises ``BadRequest``. Mixpanel's
    credentials (``/import``) are forwarded, never read here."""
    decoded = codec.decode(
        body=body, query=query, content_type=content_type, content_encoding=content_encoding, limit=limit
    )
    return Payload(
        route=route,
        events=decoded.events,
        verbose=wants_verbose(query, decoded.params),
        wants_ip=codec.param(decoded, query, "ip", "0") == "1",
        form=decoded,
        text=decoded.text,
    )


def reencode(payload: Payload, query: list[tuple[str, str]]) -> tuple[bytes, str, str | None]:
    """(body, Content-Type, raw query) for forwarding rewritten events: a GET
    that carried ``data`` in its query gets a new query (the third item), any
    other request a new body."""
    if payload.form.from_query:
        value, _ = codec.encode_data_value(payload.form)
        parts = [f"data={value.decode()}" if k == "data" else urlencode([(k, v)]) for k, v in query]
        return b"", "", "&".join(parts)
    body, content_type = codec.encode_body(payload.form)
    return body, content_type, None


# ----------------------------------------------------------------- identity


def _person(route: str, event: Mapping[str, Any]) -> Any:
    """Where an event keeps its person's ids: engage at the top, the rest in properties."""
    return event if route == "engage" else event.get("properties")


def runs(route: str, events: list[dict[str, Any]], split: bool = True) -> list[Run]:
    """The batch's runs of one device each, in one pass over the events: the
    anonymous ids of each (``$device_id`` bare, ``distinct_id`` and
    ``$anon_distinct_id`` while anonymous; engage's ``$distinct_id``), first
    seen first, and whether any of its events names a user (``$user_id``).
    With ``split`` a new ``$device_id`` on track or engage starts a new run.
    Groups carry no person id. An event whose id fields equal its
    predecessor's adds no id and is passed over."""
    engage = route == "engage"
    split = split and route in ("track", "engage")
    ids_of = route != "groups"
    out: list[Run] = []
    seen: dict[str, None] = {}
    named = False
    start = 0
    last: tuple[Any, ...] | None = None
    last_device = None
    for i, event in enumerate(events):
        source = event if engage else event.get("properties")
        if not isinstance(source, dict):
            continue
        device = source.get("$device_id")
        if split and isinstance(device, str) and device:
            if last_device is not None and device != last_device:
                out.append(Run(start, i, list(seen), not named))
                start, seen, named, last = i, {}, False, None
            last_device = device
        if not named and source.get("$user_id"):
            named = True
        if not ids_of:
            continue
        if engage:
            fields: tuple[Any, ...] = (device, source.get("$distinct_id"))
        else:
            fields = (device, source.get("distinct_id"), source.get("$anon_distinct_id"))
        if fields == last:
            continue
        last = fields
        if isinstance(device, str) and device:
            seen.setdefault(strip_device(device) or device)
        for value in fields[1:]:
            bare = anon_id(value, device)
            if bare:
                seen.setdefault(bare)
    out.append(Run(start, len(events), list(seen), not named))
    return out


def anonymous_ids(route: str, events: list[dict[str, Any]]) -> list[str]:
    """Anonymous ids in a batch, first seen first, without duplicates."""
    return runs(route, events, split=False)[0].ids


def lookup_ids(route: str, events: list[dict[str, Any]]) -> list[str]:
    """Ids of a server request that may be an original device id in the alias store.

    A server-side event may carry a bare original device id as its
    ``distinct_id``; looking up a user id too is harmless (it is never a key)."""
    if route == "groups":
        return []
    keys = ("$device_id", "$distinct_id") if route == "engage" else ("$device_id", "distinct_id", "$anon_distinct_id")
    seen: dict[str, None] = {}
    for event in events:
        source = _person(route, event)
        if not isinstance(source, dict):
            continue
        for key in keys:
            value = source.get(key)
            if isinstance(value, str) and value:
                seen.setdefault(strip_device(value) or value)
        # A server's $merge (mixpanel-python's merge(), mixpanel-node's) names the
        # ids to merge in a list, an original device id among them.
        merged = source.get("$distinct_ids") if route != "engage" else None
        if isinstance(merged, list):
            for value in merged[:16]:
                if isinstance(value, str) and value:
                    seen.setdefault(strip_device(value) or value)
    return list(seen)


def project(route: str, events: list[dict[str, Any]]) -> str | None:
    """The project token of a batch (its first event's)."""
    first = events[0]
    if route in ("engage", "groups"):
        token = first.get("$token")
    else:
        props = first.get("properties")
        token = props.get("token") if isinstance(props, dict) else None
    return token if isinstance(token, str) else None


def _name(route: str, event: dict[str, Any]) -> str:
    if route in ("track", "import"):
        return str(event.get("event", ""))
    # engage/groups: the operation ($set, $union...) names the update.
    return next((k for k in event if k.startswith("$") and k not in _PROFILE_KEYS), "?")


def names(route: str, events: list[dict[str, Any]]) -> list[str]:
    return [_name(route, e) for e in events]


def query_ids(distinct_id: str | None, device_id: str | None) -> list[str]:
    """Anonymous ids of a request whose identity is in its query (record, flags, decide)."""
    out = []
    if device_id:
        out.append(strip_device(device_id) or device_id)
    bare = anon_id(distinct_id, device_id)
    if bare and bare not in out:
        out.append(bare)
    return out


def query_identity(route: str, query: list[tuple[str, str]]) -> tuple[list[str], list[str], str | None]:
    """(anonymous ids, ids to look up for a server request, the flags context) of a query route."""
    first = dict(reversed(query))  # first occurrence wins
    context = None
    if route == "flags":
        context = first.get("context")
        ctx: Any = None
        if context:
            try:
                ctx = orjson.loads(context)
            except orjson.JSONDecodeError:
                ctx = None
        if not isinstance(ctx, dict):
            return [], [], context
        distinct, device = ctx.get("distinct_id"), ctx.get("device_id")
    elif route in QUERY_ID_FIELDS:
        distinct, device = first.get("distinct_id"), first.get("$device_id")
    else:
        return [], [], None
    distinct = distinct if isinstance(distinct, str) else None
    device = device if isinstance(device, str) else None
    lookups = [strip_device(v) or v for v in (device, distinct) if v]
    return query_ids(distinct, device), lookups, context


# ----------------------------------------------------------------- rewriting


def _identified(distinct: Any, device: Any) -> bool:
    """Whether a ``distinct_id`` names a person, and so is never rewritten: not
    ``$device:<id>``, not the event's own device id, not shaped as an SDK's
    device id (``ids.generated``). A browser can make any string one of its
    anonymous ids, and so an alias of its own identity: without this a
    server's events for user ``100000042`` would follow an alias that a
    browser naming ``$device:100000042`` wrote."""
    return (
        isinstance(distinct, str) and not distinct.startswith(DEVICE_PREFIX) and distinct != device
        and not generated(distinct)
    )


def rewrite(route: str, event: dict[str, Any], mapping: Mapping[str, str]) -> list[Rewrite]:
    """Rewrite one event in place; returns what changed (empty: nothing did)."""
    out: list[Rewrite] = []
    if not mapping or route == "groups":
        return out
    if route == "engage":
        identified = _identified(event.get("$distinct_id"), event.get("$device_id"))
        rewrite_fields(event, ("$device_id",) if identified else _ENGAGE_FIELDS, mapping, out)
        return out
    props = event.get("properties")
    if not isinstance(props, dict):
        return out
    identified = _identified(props.get("distinct_id"), props.get("$device_id"))
    rewrite_fields(props, _TRACK_ANONYMOUS_FIELDS if identified else _TRACK_FIELDS, mapping, out)
    # $merge names the ids to merge in a list: its devices', never a person's.
    ids = props.get("$distinct_ids")
    if isinstance(ids, list):
        for i, value in enumerate(ids):
            new = None if _identified(value, None) else map_id(value, mapping)
            if new is not None:
                ids[i] = new
                out.append(Rewrite("$distinct_ids", value, new))
    return out


def rewrite_flags_context(context: str, mapping: Mapping[str, str], out: list[Rewrite]) -> str:
    """The ``/flags`` ``context`` JSON with its ``distinct_id``/``device_id`` rewritten."""
    if not mapping:
        return context
    try:
        obj = orjson.loads(context)
    except orjson.JSONDecodeError:
        return context
    if not isinstance(obj, dict):
        return context
    before = len(out)
    identified = _identified(obj.get("distinct_id"), obj.get("device_id"))
    rewrite_fields(obj, ("device_id",) if identified else ("distinct_id", "device_id"), mapping, out)
    return orjson.dumps(obj).decode() if len(out) > before else context


def rewrite_query_ids(
    route: str, query: list[tuple[str, str]], context: str | None, mapping: Mapping[str, str], out: list[Rewrite]
) -> list[tuple[str, str]]:
    """A query route's query with its ids rewritten: ``distinct_id`` and
    ``$device_id`` of /record and /decide, the ``context`` JSON of /flags."""
    if route in QUERY_ID_FIELDS:
        fields = QUERY_ID_FIELDS[route]
        values = dict(query)
        if _identified(values.get("distinct_id"), values.get("$device_id")):
            fields = tuple(f for f in fields if f != "distinct_id")
        return rewrite_query(query, fields, mapping, out)
    if route == "flags" and context is not None:
        new_context = rewrite_flags_context(context, mapping, out)
        return [(k, new_context if k == "context" else v) for k, v in query]
    return query


def find_token(query: list[tuple[str, str]], events: list[dict[str, Any]], param: str) -> str | None:
    """A token in the request's own query string, else in an event's ``$current_url``."""
    for key, value in query:
        if key == param and value:
            return value
    for event in events:
        props = event.get("properties")
        if isinstance(props, dict):
            token = token_in_url(props.get("$current_url"), param)
            if token:
                return token
    return None


def referrer(route: str, events: list[dict[str, Any]]) -> str | None:
    """Where the page's visitor came from: mixpanel-js's ``$referrer`` (the
    page's ``document.referrer``, sent with every event of the page) of the
    first event that has one."""
    for event in events:
        props = event.get("properties")
        value = props.get("$referrer") if isinstance(props, dict) else None
        if isinstance(value, str) and value:
            return value
    return None


def strip_tokens(route: str, event: dict[str, Any], param: str) -> int:
    """Remove ``param`` from every string of an event, nested ones included;
    returns how many. Not only ``$current_url``/``$referrer``/``$initial_referrer``:
    a site may copy the landing URL into properties of its own, at any depth."""
    return strip_everywhere(event, param)


# ------------------------------------------------------------------ delivery


_facts = tuple.__new__  # EventFacts built in C, not through its generated __new__
_now = time.time


def prepare(route: str, event: dict[str, Any], ip: str | None) -> EventFacts:
    """Make an event ready to travel in a shared batch: a ``$insert_id`` so a
    resend is de-duplicated, the visitor's IP for geolocation (batches mix
    visitors, so the request's own IP cannot stand for it)."""
    if route == "track":
        props = event.get("properties")
        if not isinstance(props, dict):
            props = event["properties"] = {}
        insert_id = props.get("$insert_id")
        if not isinstance(insert_id, str) or not insert_id:
            insert_id = props["$insert_id"] = secrets.token_hex(16)
        if ip and "ip" not in props:
            props["ip"] = ip
        token = props.get("token")
        name = event.get("event", "")
        when = props.get("time")
        # The event's time in seconds, for age limits: mixpanel-js sends ms, other SDKs s
        # (a bool or a string is no time).
        if type(when) is int or type(when) is float:
            when = when / 1000 if when > 1e11 else float(when)
        elif when is None:
            # mixpanel-node sends no time: the event happened when the proxy took it,
            # not when the sender gets it to Mixpanel (which would stamp its arrival).
            when = props["time"] = round(_now(), 3)
        else:
            when = None
        return _facts(
            EventFacts, (name if type(name) is str else str(name), insert_id, token if type(token) is str else None, when)
        )
    if route == "engage":
        if ip and "$ip" not in event:
            event["$ip"] = ip
        if "$time" not in event:  # profile updates are ordered by it (milliseconds)
            event["$time"] = int(_now() * 1000)
    token = event.get("$token")
    return EventFacts(_name(route, event), None, token if isinstance(token, str) else None, None)


def batch(route: str, ip: bool, bodies: list[bytes], project: str | None = None) -> Outbound:
    """``data=<base64 JSON array>``: the form mixpanel-js itself posts."""
    raw = b"[" + b",".join(bodies) + b"]"
    return Outbound(
        f"/{route}?verbose=1&ip={1 if ip else 0}", b"data=" + codec.b64_form_value(raw), "application/x-www-form-urlencoded"
    )


def _json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _failed_records(body: dict[str, Any]) -> dict[int, str] | None:
    records = body.get("failed_records")
    if not isinstance(records, list):
        return None
    out = {}
    for rec in records:
        if isinstance(rec, dict) and isinstance(rec.get("index"), int):
            out[rec["index"]] = str(rec.get("message") or rec.get("field") or "rejected")
    return out or None


def classify(status: int, body: bytes, retry_after: str | None) -> Verdict:
    """Sort an upstream answer into a class. Mixpanel answers a verbose request
    that it refused with a 2xx whose body says ``status: 0``."""
    verdict = classify_status(status, body, retry_after)
    if verdict.kind == ACCEPTED:
        parsed = _json(body)
        if isinstance(parsed, dict) and parsed.get("status") == 0:
            text = body[:2000].decode("utf-8", "replace")
            return Verdict(REJECTED, str(parsed.get("error") or text), failed=_failed_records(parsed))
    elif verdict.kind == REJECTED:
        parsed = _json(body)
        if isinstance(parsed, dict):
            return Verdict(REJECTED, verdict.detail, failed=_failed_records(parsed))
    return verdict


# mixpanel-js's opt_out_tracking() with cookie persistence: ``__mp_opt_in_out_<token>=0``.
OPT_OUT_COOKIE_PREFIX = "__mp_opt_in_out_"


def opted_out(cookie_header: str) -> bool:
    """Whether a Cookie header holds mixpanel-js's opt-out (``core.consent``'s SDK signal)."""
    return any(k.startswith(OPT_OUT_COOKIE_PREFIX) and v == "0" for k, v in cookie_pairs(cookie_header))


def refuses(event: dict[str, Any], required: tuple[str, ...]) -> bool:
    """Mixpanel events carry no consent of their own: mixpanel-js's opt-out is a
    cookie (``core.consent``), and an opted-out SDK sends nothing."""
    return False


# Properties that name a person or a device, or carry an IP.
_IDENTITY_PROPERTIES = (
    "distinct_id", "$device_id", "$user_id", "$anon_distinct_id", "$distinct_id_before_identity",
    "$had_persisted_distinct_id", "$identified_id", "ip", "$ip", "$insert_id_device",
)


def anonymise(route: str, event: dict[str, Any], throwaway: str) -> bool:
    """A track event counted without identity: every id removed, the
    throwaway one as its ``distinct_id``, no IP. Profiles and groups are
    nothing but identity: dropped."""
    if route != "track":
        return False
    props = event.get("properties")
    if not isinstance(props, dict):
        props = event["properties"] = {}
    for key in _IDENTITY_PROPERTIES:
        props.pop(key, None)
    props["distinct_id"] = throwaway
    return True


# mixpanel-js's URL-valued properties (and the profile's first-touch copies);
# ``current_url_search`` (track_pageview's) is a query string alone.
URL_FIELDS = ("$current_url", "$referrer", "$initial_referrer", "current_url_search")
# URL-valued parameters of the query routes (session replay's /record).
QUERY_URL_PARAMS = frozenset({"$current_url", "replay_start_url", "current_url_search"})


def scrub_urls(route: str, event: dict[str, Any], clean: Callable[[str], str | None]) -> int:
    """``clean`` applied to the event's URL-valued fields, in place; how many changed."""
    if route in ("track", "import"):
        bags: tuple[Any, ...] = (event.get("properties"),)
    elif route == "engage":
        bags = (event.get("$set"), event.get("$set_once"))
    else:
        return 0
    return clean_fields(bags, URL_FIELDS, clean, bare=("current_url_search",))


def forbid_ip(route: str, event: dict[str, Any]) -> bool:
    """No IP travels with the event (``privacy.forward_ip = false``): the
    request's ``ip=0`` does the rest, the vendor geolocates nothing. True when
    the event carried one."""
    if route == "engage":
        return event.pop("$ip", None) is not None
    props = event.get("properties")
    return type(props) is dict and props.pop("ip", None) is not None


def mark_bot(route: str, event: dict[str, Any], kind: str) -> bool:
    """A crawler's event flagged ``$bot``; False for a profile or group update,
    which is nothing but identity (dropped)."""
    if route not in ("track", "import"):
        return False
    props = event.get("properties")
    if type(props) is not dict:
        props = event["properties"] = {}
    props["$bot"] = kind
    return True


def properties(route: str, event: dict[str, Any]) -> dict[str, Any] | None:
    if route not in ("track", "import"):
        return None
    props = event.get("properties")
    return props if isinstance(props, dict) else None


class Mixpanel:
    """The protocol as one object (``base.WireProtocol``): what the pipeline
    and the sender call."""

    name = NAME
    spooled_routes = SPOOLED_ROUTES
    max_batch_calls: int | None = None
    max_batch_bytes: int | None = None
    event_consent = False
    expiring_routes: frozenset[str] = frozenset({"track"})  # /import takes old events; /track does not
    passthrough = True
    cookie: str | None = None  # mixpanel-js keeps its id in a cookie of its own naming, never set here
    first_touch: Touches | None = FIRST_TOUCH
    verbose = staticmethod(wants_verbose)
    reencode = staticmethod(reencode)
    decode = staticmethod(decode)
    anonymous_ids = staticmethod(anonymous_ids)
    lookup_ids = staticmethod(lookup_ids)
    runs = staticmethod(runs)
    project = staticmethod(project)
    names = staticmethod(names)
    find_token = staticmethod(find_token)
    referrer = staticmethod(referrer)
    strip_tokens = staticmethod(strip_tokens)
    refuses = staticmethod(refuses)
    anonymise = staticmethod(anonymise)
    properties = staticmethod(properties)
    scrub_urls = staticmethod(scrub_urls)
    forbid_ip = staticmethod(forbid_ip)
    mark_bot = staticmethod(mark_bot)
    rewrite = staticmethod(rewrite)
    prepare = staticmethod(prepare)
    batch = staticmethod(batch)
    classify = staticmethod(classify)
    accepted = staticmethod(accepted)
    error = staticmethod(error)


MIXPANEL = Mixpanel()
