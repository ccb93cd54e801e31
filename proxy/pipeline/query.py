"""The query routes' stages (``/record``, ``/flags``, ``/settings``, ``/decide``):
identity in the query string, the body (a gzip'd session replay, a flags
request) forwarded byte for byte, or streamed when large.

They share the event routes' consent rule (``consent.replay_consent``),
identity stage and outcome stage; what differs is where the ids are read
and written (``read_query``, ``rewrite_query``) and the forward.
"""

from __future__ import annotations

from urllib.parse import urlencode

from ..core import ids
from ..core.bridge import strip_param
from ..core.rewrite import Rewrite
from ..errors import BadRequest
from ..protocols import mixpanel
from ..protocols.base import basic_user
from .context import Context
from .deliver import forward
from .exchange import Exchange


def read_query(x: Exchange, c: Context) -> None:
    """The project, the query without tokens, and the ids it names (each
    passing ``core.ids``); ``only_listed`` refuses an unserved project."""
    query, param = x.query, c.token_param
    x.verbose = x.protocol.verbose(query)
    x.project = next((v for k, v in query if k == "token"), None)
    served = c.served[x.protocol.name]
    if served is not None and (x.project or basic_user(x.headers.get("authorization", ""))) not in served:
        raise BadRequest("a project token this proxy does not serve (upstream.only_listed)")
    clean = [(k, v) for k, v in query if k != param]
    clean = [(k, strip_param(v, param) or v) if param + "=" in v else (k, v) for k, v in clean]
    rule = c.query_rule
    if rule is not None:  # the page URLs session replay names in its query (privacy.scrub_query_params)
        clean = [(k, (rule.clean(v) or v) if k in mixpanel.QUERY_URL_PARAMS else v) for k, v in clean]
    x.changed = clean != query
    x.query = clean
    incoming, server_ids, x.context = mixpanel.query_identity(x.route, clean)
    x.incoming = ids.accept(incoming, refuse_long=x.visit.browser)
    x.server_ids = ids.accept(server_ids, refuse_long=False)


def rewrite_query(x: Exchange, c: Context) -> None:
    resolution = x.resolution
    if resolution is None:  # no identity (a crawler's): the ids go as they came
        if x.changed:
            x.raw_query = urlencode(x.query)
        return
    rewrites: list[Rewrite] = []
    query = mixpanel.rewrite_query_ids(x.route, x.query, x.context, resolution.mapping, rewrites)
    if rewrites:
        x.per_event = [rewrites]
    if rewrites or x.changed:
        x.raw_query = urlencode(query)


async def forward_query(x: Exchange, c: Context) -> None:
    upstreams = c.s.upstreams
    region = x.region = upstreams.region_for(x.project)
    endpoint = upstreams.decide if x.route == "decide" else upstreams.regions[region]
    target = x.path + ("?" + x.raw_query if x.raw_query else "")
    body = x.body
    content_type = x.headers.get("content-type") if body else None
    content_encoding = x.headers.get("content-encoding") if body else None
    # A visitor's IP only for a browser (a server's IP is not its visitors'), never
    # without identity or with privacy.forward_ip = false.
    await forward(x, c, endpoint, x.method, target, body, content_type, content_encoding, [],
                  anonymous=not x.visit.browser or x.anonymous or not c.forward_ip)
