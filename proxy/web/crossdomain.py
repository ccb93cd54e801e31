"""Cross-domain identity: bridge tokens, link decoration, ``/mp/id`` and the hub.

HTTP handlers around the pure ``core.bridge`` and the token service
(``services.tokens``: sealed, opened, claimed once, redeemed), which the
pipeline's identity stage uses too.

Invariants:
- a redirect goes only to a linked domain (``redirect_target``): never an
  open redirect;
- a token is minted only for the presenting browser's own identity (its
  cookie, or a fresh id), or with a server key for an app's device id;
- a token is accepted once per browser (``services.tokens``);
- tokens never reach the vendor: the pipeline strips them from every
  string of an event.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict
from urllib.parse import urlsplit
from typing import Any

import orjson
from aiohttp import web

from ..core import consent
from ..core.bridge import (
    PURPOSE_APP,
    PURPOSE_BRIDGE,
    PURPOSE_FRAME,
    PURPOSE_HUB,
    PURPOSE_SEED,
    VIA_FRAME,
    VIA_HUB,
    VIA_PAGE,
    decorate,
    linked_domain,
    redirect_target,
    seed_refusal,
)
from ..core.apikeys import bearer
from ..core.cookie import CookieJar, own_cookie_values
from ..core.identity import Resolution
from ..core.ids import ID_CHARS, MAX_ID_CHARS, MIN_ID_CHARS, valid_id
from ..errors import BadRequest
from ..lograte import Throttled
from ..pipeline import Visit
from ..services.tokens import Tokens
from .http import json_error, json_response, query_get, read_body, request_host
from .visit import Front, answer
from ..core.tokens import TokenExpired, TokenInvalid


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

# The ready() queue both landing scripts share: callbacks wait until settle().
SETTLE_JS = """  function settle() {
    if (settled) return;
    settled = true;
    var callbacks = waiting;
    waiting = [];
    for (var i = 0; i < callbacks.length; i++) {
      try { callbacks[i](); } catch (e) { setTimeout(function () { throw e; }); }
    }
  }
"""

# hub.js and land.js: one script. land.js (HUB null) only redeems a landing
# token and takes it out of the address bar; hub.js also asks the hub once.
LANDING_JS = """/* firstparty {name}: a landing page's identity token is redeemed here (POST {id}) and then
   removed from the address bar, so no other tag on the page records it and no copied
   link carries it on.{hub_doc}
   Call the SDKs' init inside firstpartyLanding.ready(...) (firstpartyHub.ready is the same):
   it runs once the token is redeemed, at once when there is none, and never on a page
   that is leaving for the hub. */
(function () {{
  var HUB = {hub}, PARAM = {param}, ID = {id}, SEED = {seed}, DONE = "fp_hub_done", REF = "fp_hub_referrer", TRIP = "fp_hub_trip";
  var waiting = [], settled = false, trip = false;
{settle}  window.firstpartyLanding = window.firstpartyHub = {{ ready: function (cb) {{ if (settled) cb(); else waiting.push(cb); }} }};
  function tokenInUrl() {{
    var parts = location.search.slice(1).split("&");
    for (var i = 0; i < parts.length; i++) if (parts[i].indexOf(PARAM + "=") === 0) return parts[i].slice(PARAM.length + 1);
    return null;
  }}
  function clean() {{  /* the rest of the URL as it was: only the token goes */
    var kept = location.search.slice(1).split("&").filter(function (p) {{ return p && p.indexOf(PARAM + "=") !== 0; }});
    try {{ history.replaceState(history.state, "", location.pathname + (kept.length ? "?" + kept.join("&") : "") + location.hash); }}
    catch (e) {{}}
  }}
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
  /* The seed: this domain's own id (none on a first visit), for a hub whose cookie a
     browser's bounce-tracking protection purged to keep instead of minting a new one. */
  function seed(signal) {{
    return fetch(SEED, {{ method: "POST", credentials: "same-origin", signal: signal,
                         headers: {{ "Content-Type": "application/json" }}, body: '{{"seed":"1"}}' }})
      .then(function (r) {{ return r.ok ? r.json() : null; }})
      .then(function (a) {{ return a && typeof a.token === "string" ? a.token : null; }}, function () {{ return null; }});
  }}
  function toHub() {{
    var ctl = window.AbortController ? new AbortController() : null;
    var timer = setTimeout(function () {{ if (ctl) ctl.abort(); settle(); }}, 1500);
    fetch(HUB + "/hub/ping", {{ mode: "cors", credentials: "omit", signal: ctl && ctl.signal }})
      .then(function (r) {{ return r.ok ? seed(ctl && ctl.signal) : Promise.reject(r); }})  /* a seed only for a trip */
      .then(function (token) {{
        clearTimeout(timer);
        if (settled) return;
        localStorage.setItem(DONE, "1");  /* before leaving: never a second trip, whatever comes back */
        try {{ sessionStorage.setItem(REF, document.referrer); sessionStorage.setItem(TRIP, "1"); }} catch (e) {{}}
        location.replace(HUB + "/hub/resolve?return=" + encodeURIComponent(location.href) +
                         (token ? "&seed=" + encodeURIComponent(token) : ""));
      }})
      .catch(function () {{ clearTimeout(timer); settle(); }});  /* hub unreachable: keep the per-domain id */
  }}
  /* A token this domain accepted resolves it; one it refused (another domain's, copied
     along with the query string; expired; replayed) does not: the hub is asked as if
     there had been none. */
  function then(accepted) {{
    try {{
      if (accepted && HUB) localStorage.setItem(DONE, "1");
      if (accepted || !HUB || localStorage.getItem(DONE)) {{ sessionStorage.removeItem(REF); return settle(); }}
    }} catch (e) {{ return settle(); }}  /* no storage: never redirect, never loop */
    toHub();
  }}
  var token = tokenInUrl();
  /* A hub token counts only as the answer to the trip this tab started (a link someone
     else made, opened in any tab, is not); a link token only with where the landing came
     from (document.referrer: the proxy honours it from a linked domain only). */
  try {{ trip = sessionStorage.getItem(TRIP) === "1"; sessionStorage.removeItem(TRIP); }} catch (e) {{}}
  var referrer = document.referrer;
  try {{ if (token !== null && sessionStorage.getItem(REF) !== null) restoreReferrer(); }} catch (e) {{}}
  if (token === null) return then(false);
  fetch(ID, {{ method: "POST", credentials: "same-origin", headers: {{ "Content-Type": "application/x-www-form-urlencoded" }},
              body: PARAM + "=" + encodeURIComponent(token) + "&ref=" + encodeURIComponent(referrer) + (trip ? "&via=hub" : "") }})
    .then(function (r) {{ return r.ok ? r.json() : null; }})
    .then(function (answer) {{ clean(); then(!!answer && answer.token === "accepted"); }},
          function () {{ settle(); }});  /* proxy unreachable: the token stays for the SDK's requests */
}})();
"""

# frame.js: the same script on the parent page and inside the widget's iframe.
FRAME_JS = """/* firstparty frame.js: one identity for a widget in an iframe on a linked domain.
   On the parent page it answers each linked iframe's hello with a fresh bridge token,
   posted to that frame's exact origin. Inside the iframe it asks the parent, redeems
   the token here (POST {id}; the id is kept in a partitioned cookie, CHIPS) and then runs
   firstpartyFrame.ready(...) callbacks: call the SDKs' init inside it. */
(function () {{
  var LINKED = {linked}, PARAM = {param}, ID = {id}, BRIDGE = {bridge};
  var HELLO = "firstparty:hello", TOKEN = "firstparty:token", waiting = [], settled = false;
  function linked(origin) {{
    var url;
    try {{ url = new URL(origin); }} catch (e) {{ return false; }}
    if (!/^https?:$/.test(url.protocol)) return false;
    var host = url.hostname.toLowerCase();
    for (var i = 0; i < LINKED.length; i++) {{
      var d = LINKED[i];
      if (host === d || host.slice(-d.length - 1) === "." + d) return true;
    }}
    return false;
  }}
  function ourFrame(source) {{
    for (var i = 0; i < window.frames.length; i++) if (window.frames[i] === source) return true;
    return false;
  }}
  /* Parent: a token only for a frame of this page, only to its exact origin, only a linked
     one; one per page load of the frame (its hello, repeated until answered, names it). */
  var answered = {{}};
  window.addEventListener("message", function (ev) {{
    var d = ev.data, frame = ev.source;
    if (!d || d.type !== HELLO || typeof d.id !== "string" || answered[d.id] || !frame || !ourFrame(frame) || !linked(ev.origin)) return;
    answered[d.id] = true;
    fetch(BRIDGE, {{ method: "POST", credentials: "same-origin", headers: {{ "Content-Type": "application/json" }},
                    body: JSON.stringify({{ to: ev.origin + "/", frame: "1" }}) }})
      .then(function (r) {{ return r.ok ? r.json() : null; }})
      .then(function (a) {{ if (a && a.token) frame.postMessage({{ type: TOKEN, token: a.token }}, ev.origin); }})
      .catch(function () {{}});
  }});
{settle}  window.firstpartyFrame = {{ ready: function (cb) {{ if (settled) cb(); else waiting.push(cb); }} }};
  if (window.parent === window) return settle();
  /* Frame: a token only from the page that embeds it, only from a linked origin. */
  var timer = setTimeout(settle, 1500), asked = 0, redeeming = false, me = String(Math.random()).slice(2);
  window.addEventListener("message", function (ev) {{
    var d = ev.data;
    if (settled || redeeming || ev.source !== window.parent || !d || d.type !== TOKEN || typeof d.token !== "string" || !linked(ev.origin)) return;
    redeeming = true;
    fetch(ID, {{ method: "POST", credentials: "same-origin", headers: {{ "Content-Type": "application/x-www-form-urlencoded" }},
                body: PARAM + "=" + encodeURIComponent(d.token) + "&frame=1" }})
      .then(function () {{ clearTimeout(timer); settle(); }}, function () {{ clearTimeout(timer); settle(); }});
  }});
  /* The hello carries nothing secret; it is repeated in case the parent's listener is not there yet. */
  (function hello() {{
    if (settled || redeeming || asked++ > 3) return;
    window.parent.postMessage({{ type: HELLO, id: me }}, "*");
    setTimeout(hello, 250);
  }})();
}})();
"""


# How long after a landing script redeemed a token the SDKs' first events on that
# host are named after it (they start right after, inside ``firstpartyLanding.ready``).
LANDED_SECONDS = 600


class CrossDomain:
    def __init__(self, front: Front) -> None:
        self.front = front
        self._warn = Throttled(log)  # a flood of leaked server keys writes a line a minute

    # ------------------------------------------------------------ helpers

    @property
    def _cfg(self) -> Any:
        return self.front.settings.identity

    @property
    def tokens(self) -> Tokens:
        return self.front.c.tokens

    def _seal(self, canonical: str, purpose: str, audience: str, consent_state: str) -> str:
        return self.tokens.seal(canonical, purpose, audience, consent_state)

    def _count(self, result: str) -> None:
        self.tokens.count(result)

    def _consent(self, request: web.Request) -> str:
        return consent.state(request.headers, self.front.c.signals)

    def _target(self, to: str | None, what: str = "to") -> tuple[str, str]:
        """A link or return target: a linked domain, https unless the cookie
        may travel over http (``cookie.secure = false``, a local set-up)."""
        allow_http = not self.front.settings.cookie.secure
        return redirect_target(to, self._cfg.linked_domains, what, allow_http=allow_http)

    def _canonical_for(self, visit: Visit) -> tuple[str, str]:
        """This browser's own canonical id (its cookie), or a fresh one; never
        an id the client names (analytics.js's cookie included)."""
        if visit.cookie_id:
            return visit.cookie_id, "cookie"
        return str(uuid.uuid4()), "new"

    # ----------------------------------------------------------- handlers

    async def go(self, request: web.Request) -> web.Response:
        """``GET /mp/go?to=<url>``: 302 to ``to`` with a fresh token, linked domains only."""
        visit = self.front.visit(request)
        try:
            to, audience = self._target(query_get(request, "to"))
        except BadRequest as exc:
            self._count("bad_redirect")
            return self.front.finish(web.Response(status=400, text=f"{exc}\n"), visit, None, "go")
        if self.front.bot(request):
            # A crawler follows the link to where it leads, with no token and no id.
            self._count("bot")
            headers = {"Location": to, "Cache-Control": "no-store", "Referrer-Policy": "strict-origin-when-cross-origin"}
            return self.front.finish(web.Response(status=302, headers=headers), visit, None, "go")
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
        return self.front.finish(response, visit, resolution, "go")

    async def bridge(self, request: web.Request) -> web.Response:
        """``POST /mp/bridge`` (``to`` in the query, form or JSON body) -> ``{token, expires_in, param, url}``."""
        visit = self.front.visit(request)
        fields = await self._fields(request, "to")  # a refused body: the edge answers it
        if fields.get("seed") == "1":
            return self.front.finish(self._seed_answer(request, visit), visit, None, "bridge")
        app = bearer(request.headers.get("authorization"))
        if app is not None or "device_id" in fields:
            return self.front.finish(self._app_bridge(request, app, fields), visit, None, "bridge")
        try:
            to, audience = self._target(fields.get("to"))
        except BadRequest as exc:
            self._count("bad_redirect")
            return self.front.finish(_json_error(400, str(exc)), visit, None, "bridge")
        if self.front.bot(request):
            self._count("bot")  # no token for a crawler: the plain link, no id carried, no cookie
            return self.front.finish(json_response({"token": None, "url": to}), visit, None, "bridge")
        state = self._consent(request)
        canonical, source = self._canonical_for(visit) if state != consent.DENIED else (str(uuid.uuid4()), "new")
        # frame.js asks for its iframe (``frame=1``): a token that opens only on frame.js's way in.
        purpose = PURPOSE_FRAME if fields.get("frame") == "1" else PURPOSE_BRIDGE
        self._count(f"issued_{purpose}")
        response = self._bridge_answer(canonical, to, audience, state, purpose)
        resolution = Resolution(canonical, source) if state != consent.DENIED else None
        return self.front.finish(response, visit, resolution, "bridge")

    def _seed_answer(self, request: web.Request, visit: Visit) -> web.Response:
        """hub.js, before its trip: ``{"token": <seed>}`` naming the id this
        domain's cookie holds, for the hub to adopt if it has lost its own
        cookie; ``{"token": null}`` with no cookie (nothing to keep) or a refusal
        of tracking. Never an id the client names, never a fresh one."""
        hub = self._hub_host()
        if hub is None:
            return _json_error(404, "no identity hub configured (identity.hub_url)")
        token = None
        state = self._consent(request)
        if visit.cookie_id and state != consent.DENIED:
            token = self._seal(visit.cookie_id, PURPOSE_SEED, hub, state)
            self._count("issued_seed")
        body = orjson.dumps({"token": token, "expires_in": self._cfg.token_ttl_seconds})
        return web.Response(body=body, content_type="application/json", headers={"Cache-Control": "no-store"})

    def _hub_host(self) -> str | None:
        return urlsplit(self._cfg.hub_url).hostname if self._cfg.hub_url else None

    def _bridge_answer(self, canonical: str, to: str, audience: str, state: str, purpose: str) -> web.Response:
        token = self._seal(canonical, purpose, audience, state)
        body = orjson.dumps(
            {
                "token": token,
                "expires_in": self._cfg.token_ttl_seconds,
                "param": self._cfg.token_param,
                "url": decorate(to, self._cfg.token_param, token),
            }
        )
        return web.Response(body=body, content_type="application/json", headers={"Cache-Control": "no-store"})

    def _app_bridge(self, request: web.Request, presented: str | None, fields: dict[str, str]) -> web.Response:
        """An app's backend asks for a token carrying *its* device id
        (``Authorization: Bearer <server key>``, ``{"to", "device_id"}``). Only
        a server key from ``identity.api_keys_file`` may name an id; a browser,
        which could only name someone else's, never can."""
        keys = self._cfg.api_keys
        name = keys.verify(presented) if keys is not None and presented else None
        if name is None:
            self._count("unauthorized")
            why = (
                "a device_id needs a server key (Authorization: Bearer <key>)" if presented is None
                else "server key not accepted" if keys is not None
                else "no server keys are configured (identity.api_keys_file)"
            )
            self._warn.warning("unauthorized", "POST bridge with a device id refused: %s", why)
            response = _json_error(401, why)
            response.headers["WWW-Authenticate"] = 'Bearer realm="firstparty"'
            return response
        if "sec-fetch-site" in request.headers or "origin" in request.headers:
            # A server key inside a page is a leaked key: refuse it, loudly.
            self._count("unauthorized")
            self._warn.warning("browser-key", "server key %r was used from a browser; refused (rotate it)", name)
            return _json_error(403, "server keys are for servers: this request came from a browser")
        device = fields.get("device_id")
        if not device or not valid_id(device):
            return _json_error(400, f"'device_id' must be {MIN_ID_CHARS}-{MAX_ID_CHARS} characters of {ID_CHARS}")
        try:
            to, audience = self._target(fields.get("to"))
        except BadRequest as exc:
            self._count("bad_redirect")
            return _json_error(400, str(exc))
        self._count("issued_app")
        log.info("bridge token issued to server key %r for %s", name, audience)
        return self._bridge_answer(device, to, audience, consent.UNKNOWN, PURPOSE_APP)

    async def _fields(self, request: web.Request, name: str) -> dict[str, str]:
        """``name`` from the query, else every field of the form or JSON body."""
        value = query_get(request, name)
        if value is not None:
            return {name: value}
        raw = await read_body(request, self.front.settings.server)
        if not raw:
            return {}
        if raw[:1] == b"{":
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise BadRequest("the body is not valid JSON") from None
            if not isinstance(obj, dict):
                raise BadRequest("the body must be a JSON object")
            return {k: v for k, v in obj.items() if isinstance(v, str)}
        from urllib.parse import parse_qsl

        return dict(parse_qsl(raw.decode(errors="replace")))

    async def identity(self, request: web.Request) -> web.Response:
        """``GET /mp/id``: the canonical id, CORS only for linked origins.
        ``POST /mp/id`` with ``fpb=<token>``: a landing script (land.js, hub.js,
        frame.js) redeems the page's token before any SDK runs; ``frame=1``
        keeps the id in a partitioned cookie (a widget in a cross-site iframe)."""
        visit = self.front.visit(request)
        origin = request.headers.get("origin")
        fields: dict[str, str] = {}
        if request.method == "POST":
            if origin and not self._origin_linked(origin):
                # Only this deployment's own pages may make a browser take a token's id.
                self._count("foreign_origin")
                return self.front.finish(_json_error(403, "origin is not on a linked domain"), visit, None, "id")
            fields = await self._fields(request, self._cfg.token_param)
        token = fields.get(self._cfg.token_param) or None
        if self.front.bot(request):
            self._count("bot")
            body: dict[str, Any] = {"id": None, "source": "bot", **({"token": "refused"} if token else {})}
            return self.front.finish(json_response(body, headers={"Cache-Control": "no-store"}), visit, None, "id")
        refused = consent.refusal(request.headers, self.front.c.signals)
        owner = visit.hint or visit.cookie_id or f"landing:{uuid.uuid4().hex}"
        if not refused and token and await self.tokens.refusal_follows(token, visit.host, owner):
            refused = "token"  # refused on another domain; the refusal follows the visitor
        if refused:
            response = self._refused_identity(request, visit, token, refused)
        else:
            response = await self._identity_of(visit, token, fields)
        # Stricter than the SDK endpoints (its route has no CORS of the edge's):
        # only linked origins may read an id.
        if origin and self._origin_linked(origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Credentials"] = "true"
            response.headers["Vary"] = "Origin"
        return response

    def _refused_identity(self, request: web.Request, visit: Visit, token: str | None, refused: str) -> web.Response:
        """No id for a browser that refused tracking, and no cookie minted for it."""
        body = {"id": None, "source": "refused", "reason": refused}
        if token:
            body["token"] = "refused"
        response = self.front.finish(json_response(body, headers={"Cache-Control": "no-store"}), visit, None, "id")
        return self.front.forget(response, visit, refused) if request.method == "POST" else response

    async def _identity_of(self, visit: Visit, token: str | None, fields: dict[str, str]) -> web.Response:
        """The browser's id: its token's (redeemed with its proof), its cookie's, or a new one."""
        frame = fields.get("frame") == "1"
        carried = None
        if token:
            # land.js sends its page's document.referrer (where the landing came
            # from); hub.js says when the token is the answer to its own round trip.
            via = VIA_FRAME if frame else VIA_HUB if fields.get("via") == "hub" else VIA_PAGE
            carried = await self.tokens.redeem(token, visit.host, [], visit.cookie_id, visit.hint, via=via,
                                               referrer=fields.get("ref"))
        canonical, source = carried or self._canonical_for(visit)
        if carried and visit.browser:
            # The SDKs' first events come with the cookie this answer sets: they
            # are named after the token that brought them (``Resolver``).
            await self.front.s.store.set_landed(canonical, visit.host, source, LANDED_SECONDS)
        body = {"id": canonical, "source": source}
        if token:
            body["token"] = "accepted" if carried else "refused"
        response = json_response(body, headers={"Cache-Control": "no-store"})
        response = self.front.finish(response, visit, Resolution(canonical, source), "id")
        if frame and visit.browser:
            response.headers["Set-Cookie"] = self.front.jar.partitioned_cookie_header(canonical, visit.host)
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
        return _script(self._link_decorator(request.path.removesuffix("link.js")))

    def _link_decorator(self, base: str) -> str:
        linked = [d.lstrip(".") for d in self._cfg.linked_domains]
        return LINK_JS.format(linked=orjson.dumps(linked).decode(), go=orjson.dumps(base + "go").decode())

    async def hub_js(self, request: web.Request) -> web.Response:
        """hub.js: the landing script with the hub's round trip, and link.js's
        decoration of links to linked domains. Browsers that purge a bounce
        tracker's cookies (Firefox's and Safari's protections classify a hub
        the visitor only passes through) forget the hub's id: a click from one
        linked domain to another still carries the visitor's id through ``go``,
        with no hop through a third site."""
        hub = self._cfg.hub_url
        if not hub:
            return web.Response(status=404, text="no identity hub configured (identity.hub_url)\n")
        doc = "\n   Once per browser and domain it also asks the identity hub who this is."
        landing = self._landing_js(request, "hub.js", hub, doc)
        decorator = self._link_decorator(request.path.removesuffix("hub.js"))
        return _script(f"{landing.text}\n{decorator}")

    async def land_js(self, request: web.Request) -> web.Response:
        """For ``/mp/go`` landings without a hub: redeem, then clean the URL."""
        return self._landing_js(request, "land.js", None, "")

    def _landing_js(self, request: web.Request, name: str, hub: str | None, doc: str) -> web.Response:
        base = request.path.removesuffix(name)
        body = LANDING_JS.format(
            name=name, hub_doc=doc, hub=orjson.dumps(hub).decode(), settle=SETTLE_JS,
            param=orjson.dumps(self._cfg.token_param).decode(), id=orjson.dumps(base + "id").decode(),
            seed=orjson.dumps(base + "bridge").decode(),
        )
        return _script(body)

    async def frame_js(self, request: web.Request) -> web.Response:
        base = request.path.removesuffix("frame.js")
        body = FRAME_JS.format(
            settle=SETTLE_JS,
            linked=orjson.dumps([d.lstrip(".") for d in self._cfg.linked_domains]).decode(),
            param=orjson.dumps(self._cfg.token_param).decode(),
            id=orjson.dumps(base + "id").decode(),
            bridge=orjson.dumps(base + "bridge").decode(),
        )
        return _script(body)

    # ---------------------------------------------------------------- hub

    def _hub_jar(self) -> CookieJar:
        jar = getattr(self, "_jar", None)
        if jar is None:
            settings = {**asdict(self.front.settings.cookie), "name": self._cfg.hub_cookie_name, "domains": ()}
            jar = self._jar = CookieJar(**settings)
        return jar

    async def hub_ping(self, request: web.Request) -> web.Response:
        return json_response({"ok": True}, headers={"Access-Control-Allow-Origin": "*", "Cache-Control": "no-store"})

    async def hub_resolve(self, request: web.Request) -> web.Response:
        """``GET /hub/resolve?return=<url>`` on the neutral hub host: its own
        cookie recognises the browser; back to ``return`` with a hub token."""
        jar = self._hub_jar()
        try:
            to, audience = self._target(query_get(request, "return"), "return")
        except BadRequest as exc:
            self._count("bad_redirect")
            return web.Response(status=400, text=f"{exc}\n")

        headers = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
        if self.front.bot(request):
            self._count("bot")  # back where it came from: no hub cookie, no token
            return web.Response(status=302, headers={**headers, "Location": to})
        state = self._consent(request)
        if state == consent.DENIED:
            # The refusal goes back in the token; the hub keeps no id for this browser.
            canonical = str(uuid.uuid4())
        else:
            found = None
            for raw in own_cookie_values(request.headers.get("cookie"), jar.name):
                found = jar.open(raw)
                if found:
                    break
            # No cookie of its own (first come, or purged as a bounce tracker's):
            # the id the returning domain already has, else a new one.
            canonical = found if found and valid_id(found) else (await self._adopt(request, to) or str(uuid.uuid4()))
            headers["Set-Cookie"] = jar.set_cookie_header(canonical, request_host(request.headers.get("host")))
        headers["Location"] = decorate(to, self._cfg.token_param, self._seal(canonical, PURPOSE_HUB, audience, state))
        self._count("issued_hub")
        return web.Response(status=302, headers=headers)


    async def _adopt(self, request: web.Request, to: str) -> str | None:
        """The id in hub.js's seed (``&seed=``) when the hub may adopt it: an
        authentic, unexpired seed for this hub, shown once, on the navigation
        from the domain the trip returns to (``bridge.seed_refusal``)."""
        seed = query_get(request, "seed")
        hub = self._hub_host()
        if not seed or hub is None:
            return None
        return_host = urlsplit(to).hostname or ""
        try:
            claims = self._cfg.keys.open(seed, purpose=PURPOSE_SEED, audience=hub, now=time.time())
        except TokenExpired:
            self._count("expired")
            return None
        except TokenInvalid:
            self._count("invalid")
            return None
        if not valid_id(claims.canonical_id):
            self._count("invalid")
            return None
        why = seed_refusal(request.headers.get("referer"), return_host)
        if why is not None:
            self._count("unproven")
            self.tokens.record("token_refused", return_host, why, purpose=PURPOSE_SEED)
            return None
        owner = f"hub:{uuid.uuid4().hex}"
        first = await self.tokens.claim(claims, owner)
        if first is not None and first != owner:
            self._count("replayed")
            self.tokens.record("token_refused", return_host, "replayed", purpose=PURPOSE_SEED)
            return None
        self._count("adopted_seed")
        self.tokens.record("hub_adopted", return_host, "the hub had no cookie: it kept the id the returning domain has",
                     canonical_ids=[claims.canonical_id])
        return claims.canonical_id


def _script(body: str) -> web.Response:
    return web.Response(text=body, content_type="application/javascript", headers={"Cache-Control": "public, max-age=300"})


def _json_error(status: int, message: str) -> web.Response:
    return answer(json_error(status, message))
