"""Carrying identity across registrable domains in a URL, safely.

Pure helpers for the bridge and hub flows: which linked domain a host
belongs to, where a redirect may go (never an open redirect), putting a token
first in a URL's query string (mixpanel-js cuts ``$current_url`` at 255
characters) and taking it out of every URL-valued property again (tokens
never reach the vendor).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from .cookie import host_matches
from .scrub import without_params
from ..errors import BadRequest

# What a token was sealed for (bound in its AAD, so one purpose never opens as another).
PURPOSE_BRIDGE = "bridge"  # /go, /bridge from a page, link.js: a browser's own id, for a link
PURPOSE_HUB = "hub"  # the identity hub's answer to hub.js's round trip
PURPOSE_APP = "app"  # an app backend's hand-off, minted with a server key
PURPOSE_FRAME = "frame"  # frame.js: a parent page's id for its widget's iframe
PURPOSES = (PURPOSE_BRIDGE, PURPOSE_HUB, PURPOSE_APP, PURPOSE_FRAME)  # what a landing may redeem
# hub.js's own domain, for the hub only: the id this domain already has, which a
# hub that lost its cookie adopts instead of minting one (never a landing token).
PURPOSE_SEED = "seed"

# How a token reached the proxy on the landing side.
VIA_PAGE = "page"  # a landing URL: in an event's URL, a request's query, or land.js's POST
VIA_HUB = "hub"  # hub.js's POST after the round trip it started in this tab
VIA_FRAME = "frame"  # frame.js's POST of the token its parent posted (origin-checked)


def refusal(purpose: str, via: str, referrer: str | None, linked: tuple[str, ...]) -> str | None:
    """Why a valid token must not change this browser's identity, or None.

    Anyone can mint a link token for their own id and send it to a victim: a
    token that travelled in a URL proves nothing about who opened it. So a
    bridge token links only when the landing navigation came from a linked
    domain (its referrer: a visitor following a link on site A), never from
    no referrer (a link in a mail, a chat, a typed URL) or another site. The
    other purposes carry their own proof: an app token its server key, a hub
    token hub.js's round trip in this very tab, a frame token frame.js's
    origin-checked ``postMessage``; each is honoured only on its own way in."""
    if purpose == PURPOSE_APP:
        return None
    if purpose == PURPOSE_HUB:
        return None if via == VIA_HUB else "a hub token outside hub.js's round trip"
    if purpose == PURPOSE_FRAME:
        return None if via == VIA_FRAME else "a frame token outside frame.js"
    host = referrer_host(referrer)
    if host is None:
        return "no referrer: the landing navigation did not come from a linked domain"
    if linked_domain(host, linked) is None:
        return "the referrer is not on a linked domain"
    return None


def from_own_page(headers: Mapping[str, str], own: tuple[str, ...], host: str) -> bool:
    """Whether a browser's request was sent by a script of one of the site's
    own pages (``host`` itself, or a host of the ``own`` domains: the linked
    and cookie domains): not by another site, and not as a navigation.

    A token in an event's URL, and the referrer that proves it, are the
    request's own words. A hostile page can send a visitor's browser to
    ``/mp/track?fpb=<its own token>&data=<an event naming a linked referrer>``:
    a top-level navigation carries the visitor's ``SameSite=Lax`` cookie and
    takes the answer's, and would fix the visitor's identity to the
    attacker's. An SDK never navigates to an endpoint. So Fetch Metadata,
    where the browser sends it (every current engine), must say neither
    ``cross-site`` nor ``navigate``; else the ``Origin`` (any script's POST,
    any cross-site POST), or failing that the ``Referer``, must be one of the
    site's own."""
    site = headers.get("sec-fetch-site")
    if site is not None:
        return site != "cross-site" and headers.get("sec-fetch-mode") != "navigate"
    origin = headers.get("origin")
    source = referrer_host(origin if origin is not None else headers.get("referer"))
    return source is not None and (source.lower() == host.lower() or linked_domain(source, own) is not None)


def seed_refusal(referrer: str | None, return_host: str) -> str | None:
    """Why the hub must not adopt a seed, or None.

    A seed names the id its domain holds for the browser that asked for it; a
    hub that adopts it sets its own cookie to that id, which every other linked
    domain's trip then receives. So, like a bridge token, a seed proves nothing
    once it travels in a URL someone else made: it counts only on the
    navigation from the very domain it returns to (hub.js leaving the page),
    never from a mail, another site or another linked domain."""
    host = referrer_host(referrer)
    if host is None:
        return "no referrer: the trip did not come from the returning page"
    if host.lower() != return_host.lower():
        return "the referrer is not the domain the trip returns to"
    return None


def referrer_host(referrer: Any) -> str | None:
    """The host of a referrer URL (``https://www.a.test/p`` -> ``www.a.test``), or None."""
    if not isinstance(referrer, str) or not referrer or len(referrer) > 4096:
        return None
    try:
        parts = urlsplit(referrer.strip())
    except ValueError:
        return None
    if parts.scheme not in ("http", "https"):
        return None
    return parts.hostname or None


def linked_domain(host: str, linked: tuple[str, ...]) -> str | None:
    """The linked domain (audience) ``host`` belongs to, without the leading dot."""
    host = host.lower().rstrip(".")
    for domain in linked:
        if host_matches(host, domain):
            return domain.lstrip(".")
    return None


def redirect_target(
    to: str | None, linked: tuple[str, ...], what: str = "to", *, allow_http: bool = True
) -> tuple[str, str]:
    """Validate a redirect target: an absolute https URL (or http with
    ``allow_http``, a local set-up without TLS) on a linked domain.

    Returns (url, audience). Anything else is a ``BadRequest``: scheme-relative
    URLs, userinfo tricks (``https://good.com@evil.com``), backslashes,
    control characters, hosts outside the linked domains."""
    if not to:
        raise BadRequest(f"missing '{what}': the URL to send the visitor to")
    if any(c in to for c in "\\\r\n\t") or any(ord(c) < 32 or 127 <= ord(c) < 160 for c in to):
        raise BadRequest(f"'{what}' contains characters a URL may not")
    try:
        parts = urlsplit(to)
        port = parts.port  # raises on a malformed port
    except ValueError as exc:
        raise BadRequest(f"'{what}' is not a valid URL") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise BadRequest(f"'{what}' must be an absolute http(s) URL without credentials")
    if parts.scheme == "http" and not allow_http:
        raise BadRequest(f"'{what}' must be an https URL (http links need cookie.secure = false)")
    del port
    audience = linked_domain(parts.hostname, linked)
    if audience is None:
        raise BadRequest(f"'{what}' is not on a linked domain; add it to identity.linked_domains")
    return to, audience


def ascii_url(url: str) -> str:
    """``url`` as it may stand in a ``Location`` header: non-ASCII characters
    percent-encoded as UTF-8 (escapes already there kept), the host in IDNA."""
    if url.isascii():
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise BadRequest("the URL's host is not a valid domain name") from exc
    netloc = host + (f":{parts.port}" if parts.port else "")
    safe = "/:@!$&'()*+,;=%~-._"
    return urlunsplit(
        (parts.scheme, netloc, quote(parts.path, safe=safe), quote(parts.query, safe=safe + "?"),
         quote(parts.fragment, safe=safe + "?#"))
    )


def decorate(url: str, param: str, token: str) -> str:
    """``url`` with ``param=token`` first in its query string (and no other
    copy), in ASCII (``ascii_url``)."""
    parts = urlsplit(ascii_url(url))
    rest = [p for p in parts.query.split("&") if p and not p.startswith(param + "=")]
    query = "&".join([f"{param}={token}", *rest])
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def strip_param(url: str, param: str) -> str | None:
    """``url`` without any ``param=...`` in its query, or None when it had none
    (``core.scrub``'s rule, of one exact name)."""
    if param + "=" not in url or "?" not in url:
        return None
    return without_params(url, param.__eq__)


def strip_in_text(value: str, param: str) -> str | None:
    """``value`` without ``param=...``: a URL's query, or a bare query string
    (``a=1&fpb=T``, a ``search`` without its ``?``). None when it had none."""
    if param + "=" not in value:
        return None
    return without_params(value, param.__eq__)


def strip_everywhere(root: Any, param: str) -> int:
    """Take ``param=...`` out of every string inside ``root`` (an event, a
    call: nested properties, referrers, searches, a site's own copies of the
    landing URL), in place; returns how many strings changed. Iterative: the
    payload's depth was bounded at decoding, the walk needs no stack of its own."""
    marker = param + "="
    count = 0
    stack = [root]
    while stack:
        node = stack.pop()
        pairs = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in list(pairs):
            if isinstance(value, str):
                if marker in value:
                    clean = strip_in_text(value, param)
                    if clean is not None:
                        node[key] = clean
                        count += 1
            elif isinstance(value, (dict, list)):
                stack.append(value)
    return count


def token_in_url(url: Any, param: str) -> str | None:
    """The value of ``param`` in a URL's query string."""
    if not isinstance(url, str) or param + "=" not in url:
        return None
    query = url.partition("#")[0].partition("?")[2]
    for part in query.split("&"):
        if part.startswith(param + "="):
            return part[len(param) + 1 :] or None
    return None
