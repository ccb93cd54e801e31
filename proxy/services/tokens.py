"""Bridge tokens as a service: sealed, opened, claimed once, redeemed, recorded.

``core.tokens`` seals and opens a token and ``core.bridge`` decides when one
may change an identity; this adapter adds what needs the store and the logs:
the single-use claim, the counters, and a forwarded-log record for every
replacement of an established identity. The identity stage of the pipeline
(``pipeline.identity``) and the cross-domain endpoints (``web.crossdomain``)
both redeem through it.

Invariants:
- a token is accepted once per browser: its id is claimed in the shared store
  by the first presenter; the same browser may show it again (every event of
  the landing page carries it), any other presenter is refused as a replay;
- expired, tampered, wrong-audience or unknown-key tokens, and tokens naming
  an id outside ``core.ids``, are ignored (counted, logged once a minute);
- no token and no id but the canonical ones it names reaches a log.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from ..core import consent
from ..core.bridge import PURPOSES, VIA_PAGE, linked_domain, refusal
from ..core.ids import valid_id
from ..core.tokens import TokenClaims, TokenExpired, TokenInvalid
from ..lograte import Throttled
from ..settings import IdentitySettings
from .forwardlog import ForwardedLog
from .metrics import Metrics
from .store import AliasStore

log = logging.getLogger(__name__)


NOT_FROM_PAGE = "not sent by a page of the site (another site's, or a navigation)"


class Tokens:
    def __init__(self, cfg: IdentitySettings, store: AliasStore, metrics: Metrics, forwarded: ForwardedLog) -> None:
        self.cfg = cfg
        self.store = store
        self.metrics = metrics
        self.forwarded = forwarded
        self.warn = Throttled(log)  # a flood of replayed or misplaced tokens writes a line a minute

    def seal(self, canonical: str, purpose: str, audience: str, consent_state: str) -> str:
        cfg = self.cfg
        return cfg.keys.seal(
            canonical, purpose=purpose, audience=audience, now=time.time(), ttl=cfg.token_ttl_seconds,
            consent=consent_state,
        )

    def open(self, token: str, audience: str) -> tuple[TokenClaims | None, str]:
        """(claims, purpose) of a valid token for ``audience``, else (None, why
        it was refused). A token naming an id outside ``core.ids`` is invalid."""
        result = "invalid"
        for purpose in PURPOSES:
            try:
                claims = self.cfg.keys.open(token, purpose=purpose, audience=audience, now=time.time())
            except TokenExpired:
                return None, "expired"
            except TokenInvalid as exc:
                result = f"invalid ({exc})"
                continue
            if not valid_id(claims.canonical_id):
                return None, "invalid (id)"
            return claims, purpose
        return None, result

    async def claim(self, claims: TokenClaims, owner: str) -> str | None:
        """Claim a token for ``owner``: None the first time, else its first owner."""
        return await self.store.claim_token(claims.token_id, owner, self.cfg.token_ttl_seconds + 60)

    def count(self, result: str) -> None:
        self.metrics.tokens.labels(result).inc()

    def record(self, outcome: str, host: str, reason: str, **facts: Any) -> None:
        """A token's effect on identity, in the forwarded log (no token, no id
        beyond the canonical ids it names)."""
        entry = {"time": time.time(), "outcome": outcome, "route": "identity", "host": host[:253], "reason": reason}
        entry.update(facts)
        self.forwarded.record(entry)

    async def refusal_follows(self, token: str, host: str, owner: str) -> bool:
        """Whether a token carries another domain's refusal of tracking that
        this browser (``owner``) may apply: single use like every token, so one
        token shown by many browsers opts out only the first."""
        audience = linked_domain(host, self.cfg.linked_domains)
        claims = self.open(token, audience)[0] if audience is not None else None
        if claims is None or claims.consent != consent.DENIED:
            return False
        first = await self.claim(claims, owner)
        if first is None or first == owner:
            return True
        self.count("replayed")
        return False

    async def redeem(
        self,
        token: str,
        host: str,
        incoming: list[str],
        cookie_id: str | None = None,
        hint: str | None = None,
        *,
        via: str = VIA_PAGE,
        referrer: str | None = None,
        from_page: bool = True,
    ) -> tuple[str, str] | None:
        """(canonical id, source) carried by a valid token for this host, else None.

        A token changes this browser's identity only when it proves it was
        meant for it (``bridge.refusal``: a bridge token's landing came from a
        linked domain; hub, frame and app tokens on their own way in). The
        first browser to present a token claims it, known by analytics.js's
        cookie id (``hint``) where there is one, else by its first device id.
        Another id presenting it from a browser whose identity cookie already
        holds the token's canonical id is the same browser (a second SDK on the
        landing page, analytics.js beside mixpanel-js): not a replay. Every
        replacement of an established identity is in the forwarded log. None
        either for a request not sent by the site's own page (``from_page``,
        ``bridge.from_own_page``; the landing scripts' endpoint checks Origin)."""
        audience = linked_domain(host, self.cfg.linked_domains)
        if audience is None:
            self.count("unlinked_host")
            self.warn.warning("unlinked", "identity token presented on %r, which is not in identity.linked_domains; ignored", host)
            return None
        claims, outcome = self.open(token, audience)
        if claims is None:
            self.count(outcome.split(" ")[0])
            self.warn.info("refused", "identity token refused on %r: %s", host, outcome)
            return None
        if cookie_id == claims.canonical_id:
            return claims.canonical_id, outcome  # this browser already holds it: nothing changes
        # A request another site sent proves nothing: its referrer is its own word.
        why = refusal(outcome, via, referrer, self.cfg.linked_domains) if from_page else NOT_FROM_PAGE
        if why is not None:
            self.count("unproven" if from_page else "cross_site")
            self.record("token_refused", host, why, purpose=outcome)
            return None
        # With no id at all (a landing script redeeming before any SDK ran) the
        # claim is this request's own: the same browser shows it again only
        # with the cookie this answer sets.
        owner = hint or (incoming[0] if incoming else f"landing:{uuid.uuid4().hex}")
        first = await self.claim(claims, owner)
        if first is not None and first != owner:
            self.count("replayed")
            self.warn.warning("replayed", "identity token replayed on %r by another browser; ignored", host)
            self.record("token_refused", host, "replayed by another browser", purpose=outcome)
            return None
        source = outcome  # the token's purpose: bridge, hub, app or frame
        if first is None:
            self.count(f"redeemed_{source}")
        if cookie_id:
            self.record("identity_replaced", host, f"a {source} token", source=source,
                        canonical_ids=[claims.canonical_id], replaced=cookie_id)
        return claims.canonical_id, source
