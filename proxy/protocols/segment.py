"""Segment's tracking API, as analytics.js and Segment's server SDKs speak it.

- routes: analytics.js posts one call per request to ``/v1/t`` ``/p`` ``/i``
  ``/g`` ``/a`` ``/s`` (track, page, identify, group, alias, screen) and, with
  its batching strategy, ``/v1/b``; the HTTP API and server SDKs use the
  names (``/v1/track`` ... ``/v1/screen``) and ``/v1/batch``
  (``segment-analytics-python``: ``{"batch": [...], "sentAt", "writeKey"}``,
  HTTP Basic ``writeKey:``, often gzip'd);
- bodies: JSON whatever the Content-Type (analytics.js sends ``text/plain``
  to avoid a CORS preflight), the write key in the body or in Basic auth;
  Segment's limits, 32 KB per call and 500 KB per request, answered 400;
- identity fields: ``anonymousId`` (the canonical id of the Mixpanel side *is*
  Segment's anonymous id), ``previousId`` of an ``alias`` when it is an
  anonymous id we know; ``userId`` is never touched;
- batches for the upstream: ``POST /v1/batch`` with
  ``{"batch": [...], "writeKey": ..., "sentAt": ...}``, at most 100 calls;
  answers sorted into ``base`` classes (a 400 is bisected down to the call).

Pure: no I/O. Invariants: every call made ready for a batch carries a
``messageId`` (Segment de-duplicates a resend by it) and the write key it
was sent with; ``context.ip`` is set from the visitor only when the call has
none (a server SDK's own value wins).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

import orjson

from ..core import codec
from ..core.bridge import strip_everywhere, token_in_url
from ..core.rewrite import Rewrite, rewrite_fields
from ..core.scrub import clean_fields
from ..errors import BadRequest
from .base import Answer, EventFacts, Outbound, Payload, Run, Touches, basic_user, classify_status

NAME = "segment"
# analytics.js's own anonymous-id cookie: read as a hint, and (``segment.set_ajs_cookie``)
# set by the server to the canonical id, past Safari's cap on script-set cookies.
COOKIE = "ajs_anonymous_id"
# analytics.js's short paths and the HTTP API's names, to the call type.
CALL_ROUTES = {
    "t": "track", "p": "page", "i": "identify", "g": "group", "a": "alias", "s": "screen",
    "track": "track", "page": "page", "identify": "identify", "group": "group", "alias": "alias", "screen": "screen",
}
BATCH_ROUTES = frozenset({"b", "batch", "import"})
EVENT_ROUTES = frozenset(CALL_ROUTES) | BATCH_ROUTES
SPOOLED_ROUTES = EVENT_ROUTES
# Every call travels to the upstream in one kind of request.
UPSTREAM_ROUTE = "batch"
MAX_CALL_BYTES = 32 * 1024
MAX_REQUEST_BYTES = 500 * 1024
MAX_BATCH_CALLS = 100
# The calls' bytes in one /v1/batch, leaving room for the envelope under 500 KB.
MAX_BATCH_BYTES = MAX_REQUEST_BYTES - 1024

_ACCEPTED = Answer(200, b'{"success":true}', "application/json")
_CALL_FIELDS = ("anonymousId",)
_ALIAS_FIELDS = ("anonymousId", "previousId")
# URL-valued fields a bridge or hub token can ride in.
_URL_FIELDS = (("context", "page", "url"), ("context", "page", "search"), ("properties", "url"), ("properties", "search"))


def accepted(verbose: bool = True) -> Answer:
    return _ACCEPTED


def error(status: int, message: str, verbose: bool = True) -> Answer:
    """Segment's error shape: ``{"success": false, "message": ..., "code": ...}``."""
    code = "invalid_request" if status < 500 else "server_error"
    return Answer(status, orjson.dumps({"success": False, "message": message, "code": code}), "application/json")


def verbose(query: list[tuple[str, str]]) -> bool:
    """Segment's answers are always JSON."""
    return True


def decode(
    route: str,
    body: bytes,
    query: list[tuple[str, str]],
    content_type: str,
    content_encoding: str,
    limit: int,
    authorization: str = "",
) -> Payload:
    body = codec.decompress(body, content_encoding, min(limit, MAX_REQUEST_BYTES * 4))
    if len(body) > MAX_REQUEST_BYTES:
        raise BadRequest(f"request is larger than Segment's limit of {MAX_REQUEST_BYTES // 1024} KB")
    if not body.strip():
        raise BadRequest("empty body: send the call as JSON")
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc.args[0] if exc.args else exc}") from exc
    if not isinstance(obj, dict):
        raise BadRequest("body must be a JSON object")
    codec.check_depth(obj, body, codec.MAX_CALL_DEPTH)
    key = obj.get("writeKey") if isinstance(obj.get("writeKey"), str) else None
    key = key or basic_user(authorization)
    if route in BATCH_ROUTES:
        calls = obj.get("batch")
        if not isinstance(calls, list) or not calls:
            raise BadRequest("'batch' must be a non-empty array of calls")
    else:
        calls = [obj]
    if len(calls) > codec.MAX_EVENTS:
        raise BadRequest(f"too many calls: {len(calls)} in one request, the limit is {codec.MAX_EVENTS}")
    for i, call in enumerate(calls):
        if not isinstance(call, dict):
            raise BadRequest(f"call {i} is not a JSON object")
        kind = CALL_ROUTES.get(route) or call.get("type")
        if kind not in ("track", "page", "identify", "group", "alias", "screen"):
            raise BadRequest(f"call {i} has no valid 'type' (track, page, identify, group, alias or screen)")
        call["type"] = kind
        if kind == "track" and not isinstance(call.get("event"), str):
            raise BadRequest(f"call {i}: a track call needs an 'event' name")
        if not call.get("userId") and not call.get("anonymousId"):
            raise BadRequest(f"call {i} needs a userId or an anonymousId")
        own = call.get("writeKey") if isinstance(call.get("writeKey"), str) else None
        if not (own or key):
            raise BadRequest("no write key: send 'writeKey' in the body or as the Basic auth user")
        call["writeKey"] = own or key
        if len(orjson.dumps(call)) > MAX_CALL_BYTES:
            raise BadRequest(f"call {i} is larger than Segment's limit of {MAX_CALL_BYTES // 1024} KB")
    # A single call is spooled and logged under its type; a batch under "batch".
    return Payload(CALL_ROUTES.get(route, UPSTREAM_ROUTE), calls, True, True, form=None, text=body)


def _anon(call: Mapping[str, Any]) -> str | None:
    value = call.get("anonymousId")
    return value if isinstance(value, str) and value else None


def runs(route: str, events: list[dict[str, Any]], split: bool = True) -> list[Run]:
    """The batch's runs of one ``anonymousId`` each (analytics.js's ``reset()``
    mints a new one; its batching strategy can send both in one request), in
    one pass: each run's anonymous id(s) and whether a call names a user
    (``userId``). Without ``split``, one run."""
    out: list[Run] = []
    seen: dict[str, None] = {}
    named = False
    start = 0
    last = None
    for i, call in enumerate(events):
        anon = _anon(call)
        if anon:
            if split and last is not None and anon != last:
                out.append(Run(start, i, list(seen), not named))
                start, seen, named = i, {}, False
            last = anon
            seen.setdefault(anon)
        if not named and call.get("userId"):
            named = True
    out.append(Run(start, len(events), list(seen), not named))
    return out


def anonymous_ids(route: str, events: list[dict[str, Any]]) -> list[str]:
    return runs(route, events, split=False)[0].ids


def lookup_ids(route: str, events: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for call in events:
        for value in (_anon(call), call.get("previousId") if call.get("type") == "alias" else None):
            if isinstance(value, str) and value:
                seen.setdefault(value)
    return list(seen)


def project(route: str, events: list[dict[str, Any]]) -> str | None:
    key = events[0].get("writeKey") if events else None
    return key if isinstance(key, str) else None


def _name(call: Mapping[str, Any]) -> str:
    if call.get("type") == "track":
        return str(call.get("event", ""))
    return f"${call.get('type', '')}"


def names(route: str, events: list[dict[str, Any]]) -> list[str]:
    return [_name(c) for c in events]


def _url_values(call: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    out = []
    for *path, leaf in _URL_FIELDS:
        node: Any = call
        for step in path:
            node = node.get(step) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), str):
            out.append((node, leaf))
    return out


def referrer(route: str, events: list[dict[str, Any]]) -> str | None:
    """Where the page's visitor came from: analytics.js's ``context.page.referrer``
    (``document.referrer``), else ``properties.referrer`` of a page call."""
    for call in events:
        for path in (("context", "page", "referrer"), ("properties", "referrer")):
            node: Any = call
            for step in path:
                node = node.get(step) if isinstance(node, dict) else None
            if isinstance(node, str) and node:
                return node
    return None


def find_token(query: list[tuple[str, str]], events: list[dict[str, Any]], param: str) -> str | None:
    for call in events:
        for node, leaf in _url_values(call):
            value = node[leaf]
            token = token_in_url(value if "?" in value else "?" + value.lstrip("?"), param)
            if token:
                return token
    return None


def strip_tokens(route: str, event: dict[str, Any], param: str) -> int:
    """Remove ``param`` from every string of a call: ``context.page`` (url,
    search, referrer), properties at any depth, traits."""
    return strip_everywhere(event, param)


def refuses(event: dict[str, Any], required: tuple[str, ...]) -> bool:
    """The call's own consent (``context.consent.categoryPreferences``, stamped
    by Segment's consent tools from the site's CMP) refuses tracking: every
    category is false, or one of ``required`` is. A category the call does not
    name is no signal (consent tools prune unmapped ones)."""
    context = event.get("context")
    consent = context.get("consent") if isinstance(context, dict) else None
    prefs = consent.get("categoryPreferences") if isinstance(consent, dict) else None
    if not isinstance(prefs, dict) or not prefs:
        return False
    if all(value is False for value in prefs.values()):
        return True
    return any(prefs.get(category) is False for category in required)


def anonymise(route: str, event: dict[str, Any], throwaway: str) -> bool:
    """A track, page or screen call counted without identity: the throwaway id
    as ``anonymousId``, no ``userId``, no traits, and ``context.ip`` set to
    0.0.0.0 (without one Segment would geolocate the proxy's own address).
    identify, alias and group calls are nothing but identity: dropped."""
    if event.get("type") not in ("track", "page", "screen"):
        return False
    event["anonymousId"] = throwaway
    event.pop("userId", None)
    event.pop("previousId", None)
    context = event.get("context")
    if not isinstance(context, dict):
        context = event["context"] = {}
    context.pop("traits", None)
    context["ip"] = "0.0.0.0"
    return True


# URL-valued fields: analytics.js's page context, and a page call's own properties.
URL_FIELDS = ("url", "referrer", "search")


def scrub_urls(route: str, event: dict[str, Any], clean: Callable[[str], str | None]) -> int:
    """``clean`` applied to ``context.page.url/referrer/search`` and
    ``properties.url/referrer/search``, in place; how many changed."""
    context = event.get("context")
    page = context.get("page") if type(context) is dict else None
    return clean_fields((page, event.get("properties")), URL_FIELDS, clean, bare=("search",))


def forbid_ip(route: str, event: dict[str, Any]) -> bool:
    """No IP travels with the call (``privacy.forward_ip = false``):
    ``context.ip`` is 0.0.0.0, or Segment would geolocate the proxy's address."""
    context = event.get("context")
    if type(context) is not dict:
        context = event["context"] = {}
    context["ip"] = "0.0.0.0"
    return True


def mark_bot(route: str, event: dict[str, Any], kind: str) -> bool:
    """A crawler's track, page or screen call flagged ``context.bot``; False
    for identify, alias and group calls, which are nothing but identity (dropped)."""
    if event.get("type") not in ("track", "page", "screen"):
        return False
    context = event.get("context")
    if type(context) is not dict:
        context = event["context"] = {}
    context["bot"] = kind
    return True


def properties(route: str, event: dict[str, Any]) -> dict[str, Any] | None:
    if event.get("type") not in ("track", "page", "screen"):
        return None
    props = event.get("properties")
    if props is None:
        props = event["properties"] = {}
    return props if isinstance(props, dict) else None


def rewrite(route: str, event: dict[str, Any], mapping: Mapping[str, str]) -> list[Rewrite]:
    out: list[Rewrite] = []
    rewrite_fields(event, _ALIAS_FIELDS if event.get("type") == "alias" else _CALL_FIELDS, mapping, out)
    # Traits a call carries in its context (a page or track call after identify)
    # may name the anonymous id too.
    context = event.get("context")
    traits = context.get("traits") if isinstance(context, dict) else None
    if isinstance(traits, dict) and "anonymousId" in traits:
        inner: list[Rewrite] = []
        rewrite_fields(traits, _CALL_FIELDS, mapping, inner)
        out += [Rewrite("context.traits." + r.field, r.original, r.canonical) for r in inner]
    return out


def prepare(route: str, event: dict[str, Any], ip: str | None) -> EventFacts:
    message_id = event.get("messageId")
    if not isinstance(message_id, str) or not message_id:
        message_id = event["messageId"] = f"fp-{uuid.uuid4()}"
    if ip:
        context = event.get("context")
        if not isinstance(context, dict):
            context = event["context"] = {}
        context.setdefault("ip", ip)
    key = event.get("writeKey")
    return EventFacts(_name(event), message_id, key if isinstance(key, str) else None, None)


def batch(route: str, ip: bool, bodies: list[bytes], project: str | None = None) -> Outbound:
    """``POST /v1/batch`` with the calls of one write key."""
    sent_at = datetime.fromtimestamp(time.time(), timezone.utc).isoformat(timespec="milliseconds")
    body = (
        b'{"batch":[' + b",".join(bodies) + b'],"writeKey":' + orjson.dumps(project or "")
        + b',"sentAt":' + orjson.dumps(sent_at.replace("+00:00", "Z")) + b"}"
    )
    return Outbound("/v1/batch", body, "application/json")


class Segment:
    """The protocol as one object (``base.WireProtocol``)."""

    name = NAME
    spooled_routes = SPOOLED_ROUTES
    max_batch_calls: int | None = MAX_BATCH_CALLS
    max_batch_bytes: int | None = MAX_BATCH_BYTES
    event_consent = True
    expiring_routes: frozenset[str] = frozenset()  # Segment takes a call's own timestamp of any age
    passthrough = False  # forwarded as a batch of its calls, in sync mode too
    cookie: str | None = COOKIE
    first_touch: Touches | None = None
    verbose = staticmethod(verbose)
    reencode = None  # its calls travel as batches the proxy builds (``batch``), in sync mode too
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
    # Segment's answers say nothing per call: the status decides (a 400 is bisected).
    classify = staticmethod(classify_status)
    accepted = staticmethod(accepted)
    error = staticmethod(error)


SEGMENT = Segment()
