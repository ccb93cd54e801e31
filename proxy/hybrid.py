"""For a site's backend: the visitor's verified canonical id, from the
identity cookie its request carries.

Mixpanel's server-side guidance for Simplified ID Merge: a backend tracking
the same visitor as the browser must send the browser's device id as
``$device_id``. The proxy's canonical id *is* that id (the browser's events
reach Mixpanel under it), and the ``fp_id`` cookie (on the site's own
domain, so the backend receives it) holds it, signed. ``canonical_id``
checks the signature with the shared ``cookie.secret`` and returns the id,
or None for a missing, malformed or forged cookie::

    from mixpanel import Mixpanel
    from proxy.hybrid import canonical_id

    device = canonical_id(request.cookies.get("fp_id"), secret)
    if device:
        mp.track(user_id or f"$device:{device}", "Order Completed",
                 {"$device_id": device, **({"$user_id": user_id} if user_id else {})})

Events sent this way directly to Mixpanel join the browser's identity; sent
through the proxy (``Consumer(events_url=".../mp/track")``) they are left as
they are, canonical ids already. Pure: no I/O, nothing else imported from
the service.
"""

from __future__ import annotations

from .core.cookie import CookieJar

__all__ = ["canonical_id"]

_jars: dict[bytes, CookieJar] = {}


def canonical_id(cookie_value: str | None, secret: bytes | str) -> str | None:
    """The canonical id in an ``fp_id`` cookie value, verified with
    ``secret`` (the proxy's ``cookie.secret``), else None."""
    if not cookie_value:
        return None
    key = secret.encode() if isinstance(secret, str) else secret
    jar = _jars.get(key)
    if jar is None:
        if len(_jars) >= 16:
            _jars.clear()
        jar = _jars[key] = CookieJar(secret=key)
    return jar.open(cookie_value.strip().strip('"'))
