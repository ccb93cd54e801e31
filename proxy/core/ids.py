"""Client-supplied ids: the one rule every id passes before the proxy acts on it.

An id the proxy may adopt as a canonical id, look up or write in the store,
put in a cookie or name in a log line is 8 to 128 characters of
``A-Z a-z 0-9 _ - : .`` (mixpanel-js's device ids are UUIDs or hex and dashes
of about 64 characters; analytics.js's are UUIDs). Nothing else: no spaces,
quotes, ``;`` ``,`` ``/`` or control characters, so a valid id is safe as a
cookie value, a log word and a part of a store key.

What the edge does with an id that fails (``web.handlers`` through ``accept``):
an anonymous id a browser's events carry and the proxy would rewrite is
refused with a 400 in the vendor's shape when it is longer than the limit (no
SDK sends one; an attacker filling memory does), and otherwise left out of
identity: the event travels as it came, the id is never looked up, stored or
logged. Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..errors import BadRequest

MIN_ID_CHARS = 8
MAX_ID_CHARS = 128
ID_CHARS = "A-Z a-z 0-9 _ - : ."
_ID = re.compile(r"[A-Za-z0-9_\-:.]{8,128}")


_GENERATED = re.compile(r"[0-9A-Fa-f-]{32,128}")


def generated(value: str) -> bool:
    """Whether an id has the shape an SDK gives a device: hex digits and
    dashes, at least 32 digits (a UUID; mixpanel-js's older time-and-random
    hex ids). A person's id in a site's database (a number, a name, an
    account code) has not: a bare id of that shape in a server's event may be
    a device's, any other is a user's."""
    return _GENERATED.fullmatch(value) is not None and len(value) - value.count("-") >= 32


def valid_id(value: object) -> bool:
    """Whether ``value`` is an id the proxy may act on (see the module's rule)."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def accept(ids: Iterable[str], *, refuse_long: bool) -> list[str]:
    """The valid ids of ``ids``, in order. With ``refuse_long`` (a browser's
    anonymous ids) an id over ``MAX_ID_CHARS`` is a ``BadRequest`` that names
    the limit, never the id."""
    out = []
    for value in ids:
        if valid_id(value):
            out.append(value)
        elif refuse_long and len(value) > MAX_ID_CHARS:
            raise BadRequest(f"an anonymous id is {len(value)} characters long; the limit is {MAX_ID_CHARS}")
    return out
