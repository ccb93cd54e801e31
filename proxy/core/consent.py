"""Consent: whether a browser's events may be tracked at all. Pure.

A browser request is refused tracking when it shows any signal the
configuration honours, checked in this order:

- ``opt_out_cookie``: the site's own opt-out cookie (what its consent banner
  sets), with a value meaning "no" (``1``, ``true``, ``yes``, ``denied``...);
- an SDK's own opt-out cookie, as its protocol reads it (``Signals.sdk_opt_outs``:
  ``mixpanel_opt_out``, mixpanel-js's ``opt_out_tracking()`` with cookie
  persistence, ``protocols.mixpanel.opted_out``);
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

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .cookie import cookie_values

DENIED = "denied"
UNKNOWN = "unknown"  # not known to the party that minted a token (an app's backend)
GRANTED = "granted"  # no refusal signal: the site's own consent flow decides the rest
_NO = frozenset({"1", "true", "yes", "y", "on", "denied", "deny", "out", "opt-out", "optout"})


@dataclass(frozen=True, slots=True)
class Signals:
    """The refusals honoured here (``[consent]``, built by ``pipeline.context.consent_signals``)."""

    opt_out_cookie: str = "fp_optout"  # the site's own opt-out cookie; "" to ignore
    # An SDK's own opt-out cookies (the protocols know them): the reason, a
    # text every such Cookie header holds (a quick test first), the full test.
    sdk_opt_outs: tuple[tuple[str, str, Callable[[str], bool]], ...] = ()
    gpc: bool = True
    dnt: bool = False


def refusal(headers: Mapping[str, str], signals: Signals) -> str | None:
    """Why this browser request must not be tracked, or None."""
    cookie = headers.get("cookie")
    if cookie:
        name = signals.opt_out_cookie
        if name and name in cookie and any(v.lower() in _NO for v in cookie_values(cookie, name)):
            return "opt_out_cookie"
        for reason, marker, opted_out in signals.sdk_opt_outs:
            if marker in cookie and opted_out(cookie):
                return reason
    if signals.gpc and headers.get("sec-gpc", "").strip() == "1":
        return "gpc"
    if signals.dnt and headers.get("dnt", "").strip() == "1":
        return "dnt"
    return None


def state(headers: Mapping[str, str], signals: Signals) -> str:
    """The consent a token carries to the next domain."""
    return DENIED if refusal(headers, signals) else GRANTED


def opt_out_cookie_header(name: str, domain: str | None, secure: bool) -> str:
    """The site's opt-out cookie ``name``, set on a domain the visitor reached
    with a token saying "denied", so the refusal holds there for later visits
    too. Not HttpOnly: the site's consent banner reads it."""
    header = f"{name}=1; Path=/; Max-Age={400 * 86400}; SameSite=Lax"
    if domain:
        header += f"; Domain={domain}"
    if secure:
        header += "; Secure"
    return header
