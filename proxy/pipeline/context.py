"""What every stage may use: the services opened at start-up and the rules
read once from settings. Built by the web layer when the app starts
(``web.app``'s last clean-up context) and handed to ``pipeline.run``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core import carry
from ..core.bots import BotList
from ..core.clientip import TrustedProxies, client_ip, truncate
from ..core.consent import Signals
from ..core.scrub import QueryRule
from ..protocols import mixpanel
from ..protocols.mixpanel import MIXPANEL
from ..protocols.segment import SEGMENT
from ..services.delivery import Sender
from ..services.forwardlog import ForwardedLog
from ..services.live import LiveFeed
from ..services.metrics import Metrics
from ..services.resolver import Resolver
from ..services.queue.base import Queue
from ..services.store import AliasStore
from ..services.tokens import Tokens
from ..services.upstream import Endpoint, SegmentUpstreams, UpstreamClient, Upstreams
from ..settings import ConsentSettings, Settings
from .exchange import Exchange


_BOT_LIST: list[BotList] = []


def shared_bot_list() -> BotList:
    """The crawler list, indexed once per process (50 ms), whatever the apps."""
    if not _BOT_LIST:
        _BOT_LIST.append(BotList())
    return _BOT_LIST[0]


def consent_signals(settings: ConsentSettings) -> Signals:
    """The refusals ``[consent]`` honours (``core.consent``), the SDKs' own
    opt-out cookies among them, as their protocols read them."""
    sdk = (("mixpanel_opt_out", mixpanel.OPT_OUT_COOKIE_PREFIX, mixpanel.opted_out),)
    return Signals(
        settings.opt_out_cookie, sdk if settings.honor_mixpanel_opt_out else (), settings.honor_gpc, settings.honor_dnt
    )


@dataclass(slots=True)
class Services:
    """The resources the stages use, opened at start-up."""

    settings: Settings
    store: AliasStore
    upstreams: Upstreams
    client: UpstreamClient
    forwarded: ForwardedLog
    metrics: Metrics = field(default_factory=Metrics)
    # Spool mode: where fire-and-forget events go (None in sync mode).
    spool: Queue | None = None
    sender: Sender | None = None
    live: LiveFeed = field(default_factory=LiveFeed)


def header_lines(headers: Mapping[str, str], name: str) -> list[str]:
    """Every line of header ``name``, in order (a multidict's, as aiohttp's are; a plain mapping's one)."""
    getall = getattr(headers, "getall", None)
    if getall is not None:
        return list(getall(name, ()))
    value = headers.get(name)
    return [] if value is None else [value]


class Context:
    """The services and the rules the stages share (one per app)."""

    def __init__(self, services: Services, segment: SegmentUpstreams) -> None:
        s = self.s = services
        settings = s.settings
        self.settings = settings
        self.resolver = Resolver(s.store, s.metrics, settings.identity)
        self.tokens = Tokens(settings.identity, s.store, s.metrics, s.forwarded)
        self.token_param = settings.identity.token_param
        upstreams = s.upstreams
        # Per protocol: the spool region (sender) of a project token / write key, and its endpoints.
        self.region_for: dict[str, Callable[[str | None], str]] = {
            MIXPANEL.name: upstreams.region_for,
            SEGMENT.name: segment.region_for,
        }
        self.endpoints: dict[str, Endpoint] = {**upstreams.regions, **segment.regions}
        # ``only_listed``: the project tokens / write keys relayed, per protocol (None: any).
        self.served: dict[str, frozenset[str] | None] = {
            MIXPANEL.name: frozenset(settings.upstream.projects) if settings.upstream.only_listed else None,
            SEGMENT.name: frozenset(settings.segment.write_keys) if settings.segment.only_listed else None,
        }
        self.max_age_seconds = settings.delivery.max_age_seconds  # past it, an event is expired on arrival
        self.trusted = TrustedProxies(settings.server.trusted_proxies)
        privacy = settings.privacy
        whole = privacy.ip_prefix_v4 == 32 and privacy.ip_prefix_v6 == 128
        self.ip_prefixes = None if whole else (privacy.ip_prefix_v4, privacy.ip_prefix_v6)
        self.forward_ip = privacy.forward_ip
        rule = QueryRule(privacy.scrub_query_params, privacy.keep_query_params)
        self.query_rule = rule if rule.active else None
        self.bot_action = privacy.bots
        self.bots = None if privacy.bots == "keep" else shared_bot_list()
        self.carry = carry.matcher(settings.identity.carry_properties)
        self.signals = consent_signals(settings.consent)
        # First-touch repair: the site's own domains, and the first touches already known.
        own = dict.fromkeys([*settings.cookie.domains, *settings.identity.linked_domains])
        self.own_domains = tuple(own) if settings.identity.repair_first_touch else ()
        self.touches: dict[str, dict[str, Any]] = {}  # canonical id -> its kept first touch

    def client(self, x: Exchange) -> tuple[str | None, list[str]]:
        """The visitor's IP and the forwarding chain, trusting only configured
        proxies, cut to ``privacy``'s prefixes: what the vendors may see."""
        # A list header may come as several lines, the same as one joined by
        # commas in order (RFC 9110 5.3): a proxy that adds a line of its own
        # beside the client's is read as one that appends to it.
        forwarded, real = header_lines(x.headers, "x-forwarded-for"), header_lines(x.headers, "x-real-ip")
        ip, chain = client_ip(x.remote, ", ".join(forwarded) or None, real[-1] if real else None, self.trusted)
        if self.ip_prefixes is not None and ip:
            v4, v6 = self.ip_prefixes
            return truncate(ip, v4, v6), [truncate(hop, v4, v6) for hop in chain]
        return ip, chain
