"""First-touch repair: a visitor's first external referrer and campaign,
kept per canonical id, put back where a domain hop replaced them.

mixpanel-js records first touch per domain: ``$initial_referrer`` and
``$initial_referring_domain`` as super properties set once (``register_once``)
and, on a profile, ``initial_utm_*`` set once from the landing URL. After a
hop from www.site-a.com to checkout.site-b.com, site B's storage is new: its
"first" referrer is site A, its first campaign whatever A's link carried.
The proxy keeps the first touch whose referring domain is not one of the
site's own (``cookie.domains``, ``identity.linked_domains``) and repairs
events and profile updates that name an own domain instead. Pure.

These are mixpanel-js's fields: the Mixpanel protocol offers them to the
pipeline's enrich stage as ``FIRST_TOUCH`` (``WireProtocol.first_touch``),
which asks its questions without naming a field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..core.cookie import host_matches
from ..core.rewrite import Rewrite

REFERRER_FIELDS = ("$initial_referrer", "$initial_referring_domain")
# mixpanel-js's CAMPAIGN_KEYWORDS (src/utils.js): the landing URL's parameters it records.
CAMPAIGN = (
    "utm_source", "utm_medium", "utm_campaign", "utm_content", "utm_term", "utm_id", "utm_source_platform",
    "utm_campaign_id", "utm_creative_format", "utm_marketing_tactic",
)


def own(domain: Any, own_domains: Sequence[str]) -> bool:
    """Whether a referring domain (mixpanel-js keeps the port of a URL that
    has one: ``www.site-a.com:8443``) is one of the site's own."""
    if not isinstance(domain, str):
        return False
    host = domain.lower().rsplit(":", 1)[0] if domain.count(":") == 1 else domain.lower()
    return any(host_matches(host, d) for d in own_domains)


def touch_of(props: Mapping[str, Any], own_domains: Sequence[str]) -> dict[str, Any] | None:
    """The first touch an event shows, when it is an external one (a search
    engine, an ad, ``$direct``): its referrer and the campaign it landed with."""
    domain = props.get("$initial_referring_domain")
    if not isinstance(domain, str) or own(domain, own_domains):
        return None
    touch = {f: props[f] for f in REFERRER_FIELDS if isinstance(props.get(f), str)}
    touch.update({k: props[k] for k in CAMPAIGN if isinstance(props.get(k), str)})
    return touch


def repair_event(props: dict[str, Any], kept: Mapping[str, Any], own_domains: Sequence[str]) -> list[Rewrite]:
    """An event whose first referrer is one of our own domains gets the kept one."""
    out: list[Rewrite] = []
    if not own(props.get("$initial_referring_domain"), own_domains):
        return out
    for field in REFERRER_FIELDS:
        if isinstance(kept.get(field), str) and props.get(field) != kept[field]:
            out.append(Rewrite(field, str(props.get(field)), kept[field]))
            props[field] = kept[field]
    return out


def repair_profile(set_once: dict[str, Any], kept: Mapping[str, Any]) -> list[Rewrite]:
    """A profile's ``initial_utm_*`` set on a domain reached by a hop: the kept
    first campaign's, or none (the hop's own link is no first touch)."""
    out: list[Rewrite] = []
    for key in CAMPAIGN:
        field = "initial_" + key
        if field not in set_once:
            continue
        first = kept.get(key)
        if first is None:
            out.append(Rewrite(field, str(set_once.pop(field)), ""))
        elif set_once[field] != first:
            out.append(Rewrite(field, str(set_once[field]), first))
            set_once[field] = first
    return out


class FirstTouch:
    """What the enrich stage asks of an event about its first touch."""

    @staticmethod
    def external(route: str, event: Mapping[str, Any], own_domains: Sequence[str]) -> dict[str, Any] | None:
        """A track event's first touch, when it is an external one (to keep)."""
        props = event.get("properties") if route == "track" else None
        return touch_of(props, own_domains) if isinstance(props, dict) else None

    @staticmethod
    def names_own(route: str, event: Mapping[str, Any], own_domains: Sequence[str]) -> bool:
        """A track event whose first referrer is one of the site's own domains (to repair)."""
        props = event.get("properties") if route == "track" else None
        return isinstance(props, dict) and own(props.get("$initial_referring_domain"), own_domains)

    @staticmethod
    def on_profile(route: str, event: Mapping[str, Any]) -> bool:
        """A profile update that sets first-touch properties once (``$set_once``)."""
        return route == "engage" and isinstance(event.get("$set_once"), dict)

    @staticmethod
    def repair(route: str, event: dict[str, Any], kept: Mapping[str, Any], own_domains: Sequence[str]) -> list[Rewrite]:
        """The event given the kept first touch where it names an own domain; what changed."""
        if route == "track":
            props = event.get("properties")
            return repair_event(props, kept, own_domains) if isinstance(props, dict) else []
        set_once = event.get("$set_once") if route == "engage" else None
        return repair_profile(set_once, kept) if kept and isinstance(set_once, dict) else []


FIRST_TOUCH = FirstTouch()
