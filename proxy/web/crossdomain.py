"""Cross-domain identity: bridge tokens, link decoration, ``/mp/id`` and the hub.

HTTP handlers around the pure ``bridge`` and ``tokens`` modules, plus
``redeem``, which the event handlers call when a request carries a token.

Invariants:
- a redirect goes only to a linked domain (``redirect_target``): never an
  open redirect;
- a token is accepted once per browser: its id is claimed in the shared
  store by the first device id that presents it; the same browser may show
  it again (every event of the landing page carries it in ``$current_url``),
  any other presenter is refused as a replay;
- expired, tampered, wrong-audience or unknown-key tokens are ignored
  (counted and logged); the request goes on with the per-domain id;
- tokens never reach the vendor: the event handlers strip them from every
  URL-valued property.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from ..core import consent
from ..core.bridge import PURPOSE_BRIDGE, PURPOSE_HUB, decorate, linked_domain, redirect_target
from ..core.cookie import CookieJar, cookie_values, valid_id
from ..errors import BadRequest
from ..lograte import Throttled
from .http import json_response, query_get, read_body, request_host
from ..core.tokens import TokenClaims, TokenExpired, TokenInvalid

if TYPE_CHECKING:
    from .handlers import Proxy, Visit

log = logging.getLogger(__name__)

LINK_JS = """/* firstparty link.js: links to linked domains leave through {go}, which adds a fresh identity token */
(function () {{
  var LINKED = {linked}, GO = {go};
  function linked(host) {{
    host = host.toLowerCase();
    for (var i = 0; i < LINKED.length; i++) {{
      var d = LINKED[i];
      if (host === d || host.slice(-d.length - 1) === "." + d) return true;
    }}
    return false;
  }}
  function decorate(ev) {{
    var a = ev.target && ev.target.closest ? ev.target.closest("a[href]") : null;
    if (!a || a.getAttribute("data-fp-go")) return;
    var url;
    try {{ url = new URL(a.href, location.href); }} catch (e) {{ return; }}
    if (!/^https?:$/.test(url.protocol) || url.host === location.host || !linked(url.hostname)) return;
    a.setAttribute("data-fp-go", "1");
    a.href = location.origin + GO + "?to=" + encodeURIComponent(url.href);
  }}
  document.addEventListener("click", decorate, true);
  document.addEventListener("auxclick", decorate, true);
  document.addEventListener("contextmenu", decorate, true);
}})();
"""

HUB_JS = """/* firstparty hub.js: once per browser and domain, ask the identity hub who this is.
   Call mixpanel.init inside firstpartyHub.ready(...): it runs at once when no trip to
   the hub is needed, after the hub check otherwise, and never on a page that is
   leaving for the hub (so no event goes out under an id about to be replaced). */
(function () {{
  var HUB = {hub}, PARAM = {param}, DONE = "fp_hub_done", REF = "fp_hub_referrer", waiting = [], settled = false;
  function settle() {{
    if (settled) return;
    settled = true;
    var callbacks = waiting;
    waiting = [];
    for (var i = 0; i < callbacks.length; i++) {{
      try {{ callbacks[i](); }} catch (e) {{ setTimeout(function () {{ throw e; }}); }}
    }}
  }}
  window.firstpartyHub = {{ ready: function (cb) {{ if (settled) cb(); else waiting.push(cb); }} }};
  /* The round trip to the hub replaces the visitor's referrer (the hub answers with
     Referrer-Policy: no-referrer): keep it for the tab across the trip and show it to
     the SDK again on the way back, so $initial_referrer and search attribution survive. */
  function restoreReferrer() {{
    var saved = sessionStorage.getItem(REF);
    sessionStorage.removeItem(REF);
    if (saved && !document.referrer) {{
      try {{ Object.defineProperty(document, "referrer", {{ configurable: true, get: function () {{ return saved; }} }}); }}
      catch (e) {{}}
    }}
  }}
  try {{
    if (location.search.indexOf(PARAM + "=") >= 0 && sessionStorage.getItem(REF) !== null) restoreReferrer();
    if (localStorage.getItem(DONE)) {{ sessionStorage.removeItem(REF); return settle(); }}
    if (location.search.indexOf(PARAM + "=") >= 0) {{ localStorage.setItem(DONE, "1"); return settle(); }}
  }} catch (e) {{ return settle(); }}  /* no storage: never redirect, never loop */
  var ctl = window.AbortController ? new AbortController() : null;
  var timer = setTimeout(function () {{ if (ctl) ctl.abort(); settle(); }}, 1500);
  fetch(HUB + "/hub/ping", {{ mode: "cors", credentials: "omit", signal: ctl && ctl.signal }})
    .then(function (r) {{
      clearTimeout(timer);
      if (!r.ok || settled) return settle();
      localStorage.setItem(DONE, "1");
      try {{ sessionStorage.setItem(REF, document.referrer); }} catch (e) {{}}
      location.replace(HUB + "/hub/resolve?return=" + encodeURIComponent(location.href));
    }})
    .catch(function () {{ clearTimeout(timer); settle(); }});  /* hub unreachable: keep the per-domain id */
}})();
"""


class CrossDomain:
    def __init__(self, proxy: Proxy) -> None:
        self.p = proxy
        self._warn = Throttled(log)  # a flood of replayed or misplaced tokens writes a line a minute

    # ------------------------------------------------------------ helpers

    @property
    def _cfg(self) -> Any:
        return self.p.s.settings.identity

    def _seal(self, canonical: str, purpose: str, audience: str, consent_state: str) -> str:
        cfg = self._cfg
        return cfg.keys.seal(
            canonical, purpose=purpose, audience=audience, now=time.time(), ttl=cfg.token_ttl_seconds,
            consent=consent_state,
        )

    def _consent(self, request: web.Request) -> str:
        return consent.state(request.headers, self.p.s.settings.consent)

    def _open(self, token: str, audience: str) -> tuple[TokenClaims | None, str]:
        """(claims, purpose) of a valid bridge or hub token for ``audience``,
        else (None, why it was refused)."""
        result = "invalid"
        for purpose in (PURPOSE_BRIDGE, PURPOSE_HUB):
            try:
                return self._cfg.keys.open(token, purpose=purpose, audience=audience, now=time.time()), purpose
            except TokenExpired:
                return None, "expired"
            except TokenInvalid as exc:
                result = f"invalid ({exc})"
        return None, result

    def token_consent(self, token: str, host: str) -> str | None:
        """The consent a valid token for this host carries, without redeeming it."""
        audience = linked_domain(host, self._cfg.linked_domains)
        claims = self._open(token, audience)[0] if audience is not None else None
        return claims.consent if claims is not None else None

    def _count(self, result: str) -> None:
        self.p.s.metrics.tokens.labels(result).inc()

    async def redeem(
        self, token: str, host: str, incoming: list[str], cookie_id: str | None = None, hint: str | None = None
    ) -> tuple[str, str] | None:
        """(canonical id, source) carried by a valid token for this host, else None.

        The first browser to present a token claims it, known by analytics.js's
        cookie id (``hint``) where there is one, else by its first device id.
        Another id presenting it from a browser whose identity cookie already
        holds the token's canonical id is the same browser (a second SDK on the
        landing page, analytics.js beside mixpanel-js): not a replay."""
        cfg = self._cfg
        audience = linked_domain(host, cfg.linked_domains)
        if audience is None:
            self._count("unlinked_host")
            self._warn.warning("unlinked", "identity token presented on %s, which is not in identity.linked_domains; ignored", host)
            return None
        claims, outcome = self._open(token, audience)
        if claims is None:
            self._count(outcome.split(" ")[0])
            log.info("identity token refused on %s: %s", host, outcome)
            return None
        owner = hint or (incoming[0] if incoming else "-")
        first = await self.p.s.store.claim_once("token:" + claims.token_id, owner, cfg.token_ttl_seconds + 60)
        if first is not None and first != owner:
            if cookie_id == claims.canonical_id:
                return claims.canonical_id, outcome
            self._count("replayed")
            self._warn.warning("replayed", "identity token replayed on %s by another browser; ignored", host)
            return None
        source = outcome  # the token's purpose: bridge or hub
        if first is None:
            self._count(f"redeemed_{source}")
        return claims.canonical_id, source

    def _canonical_for(self, visit: Visit) -> tuple[str, str]:
        """This browser's canonical id, minting one when it has none yet."""
        if visit.cookie_id:
            return visit.cookie_id, "cookie"
        if visit.hint:  # analytics.js's id: its next call adopts it anyway
            return visit.hint, "new"
        return str(uuid.uuid4()), "new"

    # ----------------------------------------------------------- handlers

    async def go(self, request: web.Request) -> web.Response:
        """``GET /mp/go?to=<url>``: 302 to ``to`` with a fresh token, linked domains only."""
        from ..core.identity import Resolution

        visit = self.p._visit(request)
        try:
            to, audience = redirect_target(query_get(request, "to"), self._cfg.linked_domains)
        except BadRequest as exc:
            self._count("bad_redirect")
            return self.p._finish(web.Response(status=400, text=f"{exc}\n"), visit, None, "go")
        state = self._consent(request)
        # An opted-out visitor's token carries the refusal, not their id.
        canonical, source = self._canonical_for(visit) if state != consent.DENIED else (str(uuid.uuid4()), "new")
        location = decorate(to, self._cfg.token_param, self._seal(canonical, PURPOSE_BRIDGE, audience, state))
        self._count("issued_bridge")
        response = web.Response(
            status=302,
            headers={
                "Location": location,
                "Cache-Control": "no-store",
                # B learns A's origin (its referring domain, for cross-domain funnels),
                # never A's path or query.
                "Referrer-Policy": "strict-origin-when-cross-origin",
            },
        )
        resolution = Resolution(canonical, source) if state != consent.DENIED else None
        return self.p._finish(response, visit, resolution, "go")

    async def bridge(self, request: web.Request) -> web.Response:
        """``POST /mp/bridge`` (``to`` in the query, form or JSON body) -> ``{token, expires_in, param, url}``."""
        from ..core.identity import Resolution

        visit = self.p._visit(request)
        to = query_get(request, "to")
        try:
            raw = await read_body(request, self.p.s.settings.server) if to is None else b""
        except BadRequest as exc:
            body = orjson.dumps({"status": 0, "error": str(exc)})
            return self.p._finish(web.Response(status=exc.status, body=body, content_type="application/json"), visit, None, "bridge")
        if raw:
            if raw[:1] == b"{":
                try:
                    to = orjson.loads(raw).get("to")
                except (orjson.JSONDecodeError, AttributeError):
                    to = None
            else:
                to = dict(p.split("=", 1) for p in raw.decode(errors="replace").split("&") if "=" in p).get("to")
                if to:
                    from urllib.parse import unquote_plus

                    to = unquote_plus(to)
        try:
            to, audience = redirect_target(to, self._cfg.linked_domains)
        except BadRequest as exc:
            self._count("bad_redirect")
            body = orjson.dumps({"status": 0, "error": str(exc)})
            return self.p._finish(web.Response(status=400, body=body, content_type="application/json"), visit, None, "bridge")
        state = self._consent(request)
        canonical, source = self._canonical_for(visit) if state != consent.DENIED else (str(uuid.uuid4()), "new")
        token = self._seal(canonical, PURPOSE_BRIDGE, audience, state)
        self._count("issued_bridge")
        body = orjson.dumps(
            {
                "token": token,
                "expires_in": self._cfg.token_ttl_seconds,
                "param": self._cfg.token_param,
                "url": decorate(to, self._cfg.token_param, token),
            }
        )
        response = web.Response(body=body, content_type="application/json", headers={"Cache-Control": "no-store"})
        resolution = Resolution(canonical, source) if state != consent.DENIED else None
        return self.p._finish(response, visit, resolution, "bridge")

    async def identity(self, request: web.Request) -> web.Response:
        """``GET /mp/id``: the canonical id, CORS only for linked origins."""
        from ..core.identity import Resolution

        visit = self.p._visit(request)
        origin = request.headers.get("origin")
        refused = consent.refusal(request.headers, self.p.s.settings.consent)
        if refused:
            # No id for a browser that refused tracking, and no cookie minted for it.
            response = json_response({"id": None, "source": "refused", "reason": refused},
                                     headers={"Cache-Control": "no-store"})
            response = self.p._finish(response, visit, None, "id")
        else:
            canonical, source = self._canonical_for(visit)
            response = json_response({"id": canonical, "source": source}, headers={"Cache-Control": "no-store"})
            response = self.p._finish(response, visit, Resolution(canonical, source), "id")
        # Stricter than the SDK endpoints: only linked origins may read an id.
        response.headers.popall("Access-Control-Allow-Origin", None)
        response.headers.popall("Access-Control-Allow-Credentials", None)
        if origin and self._origin_linked(origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Credentials"] = "true"
            response.headers["Vary"] = "Origin"
        return response

    def _origin_linked(self, origin: str) -> bool:
        scheme, sep, hostport = origin.partition("://")
        if not sep or scheme not in ("http", "https"):
            return False
        host = hostport.rsplit(":", 1)[0] if hostport.count(":") == 1 else hostport
        return linked_domain(host, self._cfg.linked_domains) is not None

    async def link_js(self, request: web.Request) -> web.Response:
        """Links to linked domains leave through ``go`` under the mount this
        script was loaded from (``/mp/link.js`` -> ``/mp/go``, ``/seg/link.js``
        -> ``/seg/go``)."""
        linked = [d.lstrip(".") for d in self._cfg.linked_domains]
        go = request.path.removesuffix("link.js") + "go"
        body = LINK_JS.format(linked=orjson.dumps(linked).decode(), go=orjson.dumps(go).decode())
        return web.Response(
            text=body, content_type="application/javascript", headers={"Cache-Control": "public, max-age=300"}
        )

    async def hub_js(self, request: web.Request) -> web.Response:
        hub = self._cfg.hub_url
        if not hub:
            return web.Response(status=404, text="no identity hub configured (identity.hub_url)\n")
        body = HUB_JS.format(hub=orjson.dumps(hub).decode(), param=orjson.dumps(self._cfg.token_param).decode())
        return web.Response(
            text=body, content_type="application/javascript", headers={"Cache-Control": "public, max-age=300"}
        )

    # ---------------------------------------------------------------- hub

    def _hub_jar(self) -> CookieJar:
        jar = getattr(self, "_jar", None)
        if jar is None:
            from dataclasses import replace

            settings = self.p.s.settings.cookie
            jar = self._jar = CookieJar(replace(settings, name=self._cfg.hub_cookie_name, domains=()))
        return jar

    async def hub_ping(self, request: web.Request) -> web.Response:
        return json_response({"ok": True}, headers={"Access-Control-Allow-Origin": "*", "Cache-Control": "no-store"})

    async def hub_resolve(self, request: web.Request) -> web.Response:
        """``GET /hub/resolve?return=<url>`` on the neutral hub host: its own
        cookie recognises the browser; back to ``return`` with a hub token."""
        jar = self._hub_jar()
        try:
            to, audience = redirect_target(query_get(request, "return"), self._cfg.linked_domains, "return")
        except BadRequest as exc:
            self._count("bad_redirect")
            return web.Response(status=400, text=f"{exc}\n")

        headers = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
        state = self._consent(request)
        if state == consent.DENIED:
            # The refusal goes back in the token; the hub keeps no id for this browser.
            canonical = str(uuid.uuid4())
        else:
            canonical = None
            for raw in cookie_values(request.headers.get("cookie"), jar.name):
                canonical = jar.open(raw)
                if canonical:
                    break
            if not canonical or not valid_id(canonical):
                canonical = str(uuid.uuid4())  # first come: this browser's id from now on
            headers["Set-Cookie"] = jar.set_cookie_header(canonical, request_host(request.headers.get("host")))
        headers["Location"] = decorate(to, self._cfg.token_param, self._seal(canonical, PURPOSE_HUB, audience, state))
        self._count("issued_hub")
        return web.Response(status=302, headers=headers)
