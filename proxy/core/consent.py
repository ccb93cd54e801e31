"""Consent: whether a browser's events may be tracked at all. Pure.

A browser request is refused tracking when it shows any signal the
configuration honours, checked in this order:

- ``opt_out_cookie``: the site's own opt-out cookie (what its consent banner
  sets), with a value meaning "no" (``1``, ``true``, ``yes``, ``denied``...);
- ``mixpanel_opt_out``: mixpanel-js's ``__mp_opt_in_out_<token>`` cookie with
  the value ``0`` (``opt_out_tracking()`` with cookie persistence);
- ``gpc``: ``Sec-GPC: 1``, Global Privacy Control, a legal opt-out signal in
  several US states;
- ``dnt``: ``DNT: 1``, off by default (no legal weight, often set by default);
- ``token``: a bridge or hub token whose consent says "denied": the refusal
  made on another domain follows the visitor (see ``tokens``).

Refused events are dropped before identity is resolved: no cookie is read
into an alias or set, nothing is spooled or forwarded, and the forwarded log
records the drop and its reason, never an id. Server SDK requests carry no
browser signals and are not checked.
"""

from __future__ import annotations

from collections.abc import Mapping

from .cookie import cookie_pairs, cookie_values
from ..settings import ConsentSettings

DENIED = "denied"
UNKNOWN = "unknown"  # not known to the party that minted a token (an app's backend)
GRANTED = "granted"  # no refusal signal: the site's own consent flow decides the rest
_NO = frozenset({"1", "true", "yes", "y", "on", "denied", "deny", "out", "opt-out", "optout"})
MIXPANEL_COOKIE_PREFIX = "__mp_opt_in_out_"


def refusal(headers: Mapping[str, str], settings: ConsentSettings) -> str | None:
    """Why this browser request must not be tracked, or None."""
    cookie = headers.get("cookie")
    if cookie:
        name = settings.opt_out_cookie
        if name and name in cookie and any(v.lower() in _NO for v in cookie_values(cookie, name)):
            return "opt_out_cookie"
        if settings.honor_mixpanel_opt_out and MIXPANEL_COOKIE_PREFIX in cookie and _mixpanel_opted_out(cookie):
            return "mixpanel_opt_out"
    if settings.honor_gpc and headers.get("sec-gpc", "").strip() == "1":
        return "gpc"
    if settings.honor_dnt and headers.get("dnt", "").strip() == "1":
        return "dnt"
    return None


def state(headers: Mapping[str, str], settings: ConsentSettings) -> str:
    """The consent a token carries to the next domain."""
    return DENIED if refusal(headers, settings) else GRANTED


def opt_out_cookie_header(settings: ConsentSettings, domain: str | None, secure: bool) -> str:
    """The site's opt-out cookie, set on a domain the visitor reached with a
    token saying "denied", so the refusal holds there for later visits too.
    Not HttpOnly: the site's consent banner reads it."""
    header = f"{settings.opt_out_cookie}=1; Path=/; Max-Age={400 * 86400}; SameSite=Lax"
    if domain:
        header += f"; Domain={domain}"
    if secure:
        header += "; Secure"
    return header


def _mixpanel_opted_out(header: str) -> bool:
    return any(key.startswith(MIXPANEL_COOKIE_PREFIX) and value == "0" for key, value in cookie_pairs(header))
