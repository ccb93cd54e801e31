"""The ops listener: ``/metrics``, ``/readyz``, ``/healthz``, ``POST /forget`` and the live view
(``/live``, ``web/live``) on a port of their own (``[ops]``), never on the public one (which keeps ``/healthz`` for
load balancers).

``create_ops_app(main)`` builds a small ``web.Application`` whose handlers are
the main app's (``Proxy``): it opens nothing itself and is served once the
main app's resources are open (``cli.serve_app``, the tests' ``ProxyClient``).
Only peers in ``ops.allowed_networks`` are answered; anyone else gets 403.
Only a ``Host`` that names this listener is answered (an IP address,
``localhost`` or one of ``ops.hosts``): a DNS-rebinding page in an operator's
browser names its own domain and is refused. A browser request from another
site (``Sec-Fetch-Site``, ``Origin``) is refused too.
With several workers each binds the ops port too (``SO_REUSEPORT``), and
whichever answers a scrape reports the totals of all (``services.metrics``).
"""

from __future__ import annotations

import ipaddress

from aiohttp import web

from ..core.clientip import TrustedProxies
from .app import GET, LIVE, PROBES, SETTINGS, Handler, only, server_header
from .live import add_live_routes
from .http import request_host, text_response


def _ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _host_of(origin: str) -> str:
    return request_host(origin.partition("://")[2])


def create_ops_app(main: web.Application) -> web.Application:
    settings = main[SETTINGS]
    probes = main[PROBES]
    allowed = TrustedProxies(settings.ops.allowed_networks)

    names = {"localhost", *(h.lower() for h in settings.ops.hosts)}

    @web.middleware
    async def only_allowed(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.remote not in allowed:
            return text_response("not allowed from this address; see ops.allowed_networks\n", status=403)
        host = request_host(request.headers.get("host"))
        if not (_ip_literal(host) or host in names):
            return text_response("not allowed for this Host; add the name to ops.hosts\n", status=403)
        site = request.headers.get("sec-fetch-site")
        origin = request.headers.get("origin")
        if (site and site not in ("same-origin", "none")) or (origin and _host_of(origin) != host):
            return text_response("not allowed from another site\n", status=403)
        return await handler(request)

    app = web.Application(middlewares=[only_allowed])
    app.on_response_prepare.append(server_header)
    app[SETTINGS] = settings
    app[PROBES] = probes
    add = app.router.add_route
    add("*", "/metrics", only(GET, probes.metrics))
    add("*", "/readyz", only(GET, probes.readyz))
    add("*", "/healthz", only(GET, probes.healthz))
    add("*", "/forget", only(frozenset({"POST"}), probes.forget))
    if settings.ops.live:
        add_live_routes(app, main[LIVE])
    return app
