"""Stage 1, decode: the request's body and query as its protocol's events.

Refuses (``BadRequest``, the vendor's 400) a body the protocol cannot read
and, with ``only_listed``, a project token or write key this proxy does not
serve. Notes the bridge token a browser's request carries, and the project.
"""

from __future__ import annotations

from ..errors import BadRequest
from .context import Context
from .exchange import Exchange


def decode(x: Exchange, c: Context) -> None:
    protocol = x.protocol
    headers = x.headers
    payload = x.payload = protocol.decode(
        x.route,
        x.body,
        x.query,
        headers.get("content-type", ""),
        headers.get("content-encoding", ""),
        c.settings.server.max_body_bytes,
        headers.get("authorization", ""),
    )
    route = x.route = payload.route
    x.verbose = payload.verbose
    events = payload.events
    x.decoded = len(events)
    served = c.served[protocol.name]
    if served is not None and any(protocol.project(route, [e]) not in served for e in events):
        raise BadRequest("a project token or write key this proxy does not serve (only_listed)")
    # Tokens can only be in events whose text mentions the parameter.
    x.mentioned = payload.mentions(c.token_param + "=")
    if x.visit.browser and route != "import":
        x.token = protocol.find_token(x.query, events if x.mentioned else [], c.token_param)
    x.project = protocol.project(route, events)
