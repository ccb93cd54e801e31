"""The proxy's own exception tree.

    ProxyError
    ├── ConfigError        bad settings; the CLI prints it as one line, exit 2
    ├── Refused            answered to the client with its ``status`` (the vendor's error shape)
    │   ├── BadRequest       the client sent something we refuse (HTTP 400)
    │   │   ├── PayloadTooLarge  body or decompressed body over the limit (HTTP 413)
    │   │   └── RequestTimeout   the body arrived too slowly (HTTP 408)
    │   └── Unavailable      not now: the client keeps its events and comes back (HTTP 503, Retry-After)
    │       ├── Overloaded       too many bodies arriving at once
    │       └── SpoolFull        the queue is full or cannot write (services/queue/base)
    └── UpstreamError      the vendor could not be reached or answered nonsense (HTTP 502 to a client)
        ├── UpstreamTimeout      no complete answer within the route's timeout
        ├── UpstreamUnreachable  DNS, refused or reset connections, a proxy that failed
        │   └── UpstreamTLSError     the upstream's certificate did not verify
        └── CdnRefused           the vendor's CDN answered, but not with the asset

Every error a client may be answered with carries its HTTP ``status``; the web
layer's edge (``web.edge``) answers whatever a handler raises in the route's shape.

Low-level errors (binascii, zlib, orjson, aiohttp's client) are wrapped into these
with ``raise X(...) from exc`` at the module that meets them, so handlers only
ever catch this tree.
"""

from __future__ import annotations


class ProxyError(Exception):
    """Base of every error the proxy raises on purpose."""


class ConfigError(ProxyError):
    """A setting is missing, unknown or invalid; the message names the key and the fix."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config error: {key}: {message}")
        self.key = key
        self.message = message


class Refused(ProxyError):
    """A request the proxy answers with an error: ``status`` is the HTTP status,
    ``str(exc)`` the text of the vendor-shaped answer."""

    status = 400


class BadRequest(Refused):
    """Client input we refuse; ``str(exc)`` is the Mixpanel-style verbose error text."""

    status = 400


class PayloadTooLarge(BadRequest):
    status = 413


class RequestTimeout(BadRequest):
    status = 408


class Unavailable(Refused):
    """The proxy cannot take the request now; the client keeps its events and
    resends after ``RETRY_AFTER`` seconds (answered 503 with Retry-After)."""

    status = 503
    RETRY_AFTER = "5"


class Overloaded(Unavailable):
    """Too many bodies arriving at once (``server.max_inflight_body_bytes``)."""


class UpstreamError(ProxyError):
    """The upstream could not be reached in time or its answer could not be read."""

    status = 502


class UpstreamTimeout(UpstreamError):
    """No complete answer within the timeout: retried (spool) or answered 504/502 (sync)."""


class UpstreamUnreachable(UpstreamError):
    """The connection could not be made or broke before an answer arrived."""


class UpstreamTLSError(UpstreamUnreachable):
    """The upstream's certificate did not verify against the system store or
    ``upstream.ca_file``: never sent to, retried like any unreachable upstream."""


class CdnRefused(UpstreamError):
    """The CDN answered, but not with the asset (its status is in the message)."""
