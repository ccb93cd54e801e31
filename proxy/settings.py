"""Settings: one TOML file plus ``FIRSTPARTY_*`` environment overrides, loaded
once at start-up into a frozen, validated object.

Invariants:
- nothing else in the package reads ``os.environ`` or the config file;
- every unknown section or key and every bad value raises ``ConfigError``
  naming the dotted key and saying how to fix it;
- defaults run the proxy with no other server: in-memory store, files under
  ``server.data_dir``, the real Mixpanel upstreams;
- loading only reads: the cookie secret and token keys a first start
  generates are created by ``provision.generate_missing`` (``firstparty serve``),
  never here; until then ``cookie.secret`` is b"" and ``identity.keys`` None.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .core.clientip import IPNetwork
from .core.scrub import DEFAULT_SCRUBBED
from .errors import ConfigError

ENV_PREFIX = "FIRSTPARTY_"
REGIONS = ("us", "eu", "in")
_COOKIE_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_HOST_LABELS = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?)*$")


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: str = "firstparty-data"
    trusted_proxies: tuple[IPNetwork, ...] = (
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("::1/128"),
    )
    max_body_bytes: int = 10 * 1024 * 1024
    # Bodies still arriving, all connections together: past this, a new slow
    # upload is answered 503 (Retry-After) instead of buffered.
    max_inflight_body_bytes: int = 256 * 1024 * 1024
    # Event requests in progress per process; past it a new one is answered 503
    # with Retry-After at once (load shedding), not queued.
    max_inflight_requests: int = 512
    workers: int = 1
    # Longer than whatever pools connections in front (nginx keeps idle upstream
    # connections 60 s, AWS ALB 60 s by default), so it never reuses one we close.
    keepalive_timeout_seconds: float = 75.0
    # A request's body must arrive within this (slow clients get 408); nginx in
    # front cuts off slow heads (client_header_timeout).
    request_timeout_seconds: float = 60.0
    # Where the Mixpanel protocol is served (first: link.js's /go), and the legacy decide host's mount.
    # Filter lists block "/mp/" and "*/track" on any domain: a neutral mount and
    # route aliases (mixpanel-js's api_routes) get past them.
    mounts: tuple[str, ...] = ("/mp/",)
    decide_mounts: tuple[str, ...] = ("/mp-decide/",)
    # alias -> route, e.g. {"e" = "track", "p" = "engage", "g" = "groups"}
    route_aliases: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    # Base URLs by region; "in" is a Python keyword, hence a mapping.
    regions: Mapping[str, str] = field(
        default_factory=lambda: {
            "us": "https://api.mixpanel.com",
            "eu": "https://api-eu.mixpanel.com",
            "in": "https://api-in.mixpanel.com",
        }
    )
    decide: str = "https://decide.mixpanel.com"
    cdn: str = "https://cdn.mxpnl.com"
    default_region: str = "us"
    projects: Mapping[str, str] = field(default_factory=dict)
    # true: only the project tokens in ``projects`` are relayed (list US ones as
    # "us" too); any other is answered 400, so nobody uses the proxy as a relay.
    only_listed: bool = False
    timeout_seconds: float = 10.0
    max_connections: int = 100
    # A PEM bundle trusted beside the system store (a private CA, a TLS-inspecting egress proxy).
    ca_file: str = ""
    # The egress proxy from the environment (HTTPS_PROXY, HTTP_PROXY, NO_PROXY,
    # either case), read once here: aiohttp's trust_env would read the
    # environment and ~/.netrc again on every request.
    https_proxy: str = ""
    http_proxy: str = ""
    no_proxy: str = ""


@dataclass(frozen=True, slots=True)
class CookieSettings:
    name: str = "fp_id"
    domains: tuple[str, ...] = ()
    secure: bool = True
    max_age_days: int = 400
    secret: bytes = b""


@dataclass(frozen=True, slots=True)
class CorsSettings:
    allowed_origins: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StoreSettings:
    url: str = "memory://"
    # The in-memory store's bound, in MiB of keys and values (the oldest go first).
    max_memory_mb: int = 128

    @property
    def max_bytes(self) -> int:
        return self.max_memory_mb * 1024 * 1024


@dataclass(frozen=True, slots=True)
class PrivacySettings:
    """What leaves for the vendors about a visitor (README, "Privacy")."""

    # The visitor's IP (for geolocation): the network of this many leading
    # bits; 32 and 128 send it whole.
    ip_prefix_v4: int = 32  # 24: 203.0.113.77 -> 203.0.113.0
    ip_prefix_v6: int = 128  # 48: 2001:db8:1:2::7 -> 2001:db8:1::
    # false: no IP at all (the vendors geolocate nothing).
    forward_ip: bool = True
    # Query parameters taken out of every URL-valued field (globs, any case).
    scrub_query_params: tuple[str, ...] = DEFAULT_SCRUBBED
    # When set: every query parameter matching none of these globs goes too.
    keep_query_params: tuple[str, ...] = ()
    # Browser requests from crawlers, monitors and headless browsers (core.bots):
    # "drop" (never sent), "flag" ($bot / context.bot, no identity, no cookie), "keep".
    bots: str = "flag"


@dataclass(frozen=True, slots=True)
class OpsSettings:
    """The operators' listener: /metrics, /readyz, /healthz (and the live
    view), never on the public port."""

    host: str = "127.0.0.1"
    port: int = 8001  # 0: no ops listener (and no /metrics or /readyz anywhere)
    allowed_networks: tuple[IPNetwork, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    # /live: identities forming, event by event (records nothing while nobody watches).
    live: bool = True
    # Names operators reach the ops listener by, besides an IP address and
    # "localhost" (which are always accepted): any other Host is refused, so a
    # page in an operator's browser cannot read /live or /metrics by DNS rebinding.
    hosts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LogSettings:
    forwarded: str = ""
    max_bytes: int = 100 * 1024 * 1024
    backups: int = 5
    level: str = "info"
    # The forwarded log's lines (ids, event names) live at most this many days
    # (and the day they were written): with it, the file rotates daily too and
    # rotated files are removed once their last line is this old. 0: by size only.
    retention_days: int = 0


@dataclass(frozen=True, slots=True)
class IdentitySettings:
    keys_file: str = ""  # default <data_dir>/identity_keys (generated once)
    # Registrable domains this deployment serves and may hand identity to:
    # ".site-a.com" covers site-a.com and every subdomain.
    linked_domains: tuple[str, ...] = ()
    token_ttl_seconds: int = 60
    # Neutral name: not a click id any tool strips or rewrites (gclid, fbclid, _gl...).
    token_param: str = "fpb"
    # The identity hub's public base URL (for hub.js and the hub's redirects), if one is used.
    hub_url: str = ""
    hub_cookie_name: str = "fp_hub"
    max_devices_per_id: int = 50
    # A new device id on a host where the browser's canonical id had another
    # device id this recently is a logout (reset()) or a cleared storage by
    # hand, not Safari expiring script storage (which takes 7 days): the
    # visitor starts a new canonical id.
    reset_window_days: float = 7.0
    # Names and globs ("plan", "ab_*") of properties carried across domains per
    # canonical id (core/carry.py); empty: none.
    carry_properties: tuple[str, ...] = ()
    # Put back a visitor's first external referrer and campaign where a domain
    # hop replaced them with one of the site's own (protocols/firsttouch.py).
    repair_first_touch: bool = True
    # Server keys of app backends that may ask POST /mp/bridge for a token
    # carrying their own device id (core/apikeys.py); empty: app hand-off off.
    api_keys_file: str = ""
    keys: Any = None  # the loaded KeyRing; None until generated on the first start (``provision``)
    api_keys: Any = None  # the loaded ApiKeys, or None without api_keys_file


@dataclass(frozen=True, slots=True)
class ConsentSettings:
    # The site's own opt-out cookie (set by its consent banner); "" to ignore.
    opt_out_cookie: str = "fp_optout"
    # mixpanel-js's __mp_opt_in_out_<token>=0 (opt_out_tracking() with cookie persistence).
    honor_mixpanel_opt_out: bool = True
    # Sec-GPC: 1 (Global Privacy Control), a legal opt-out signal in several US states.
    honor_gpc: bool = True
    # DNT: 1 carries no legal weight and some browsers set it by default.
    honor_dnt: bool = False
    # "drop": a refusing browser's events are not sent; "anonymise": its track
    # events (and Segment track/page/screen calls) are sent without any id
    # (a throwaway one per request) and without IP; profile updates are dropped.
    mode: str = "drop"
    # Segment calls' own context.consent.categoryPreferences (Segment's consent
    # tools, a CMP): a browser call in which every category is false is dropped.
    honor_segment_consent: bool = True
    # Categories that must not be false for a browser's Segment call to be kept
    # (names as in your workspace: "Analytics", OneTrust's "C0002"...).
    segment_required_categories: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    mode: str = "spool"  # "spool": durable, batched; "sync": the client waits for the upstream
    spool_path: str = ""  # default <data_dir>/spool.sqlite3
    max_rows: int = 1_000_000
    # Dead letters kept (the oldest go first) and for how long: a flood of events
    # the vendor refuses (or that expired) cannot fill the disk.
    max_dead_letters: int = 100_000
    dead_letter_days: float = 30.0
    batch_size: int = 50
    batch_window_ms: int = 50
    # Upstream requests in flight per region: with Mixpanel ~100 ms away, 32 x 50
    # events / 0.1 s = 16,000 events/s per region before the spool grows.
    max_in_flight: int = 32
    backoff_initial_seconds: float = 2.0
    backoff_max_seconds: float = 60.0
    max_age_days: float = 5.0
    drain_seconds: float = 5.0
    # true: every commit is fsync'd (an acknowledged event survives a power cut);
    # false: survives a process crash (kill -9) but not the machine's.
    fsync: bool = True
    # Below this much free space under the spool, new events are answered 503
    # (Retry-After): the room left is for deletes and dead letters, so the
    # queue can still drain. 0: only SQLite's own "disk full" stops it.
    min_free_bytes: int = 64 * 1024 * 1024
    # The durable queue: "sqlite" (embedded, one file per process) or
    # "jetstream" (NATS JetStream, one stream shared by a fleet; services/queue/jetstream.py).
    queue: str = "sqlite"
    nats_url: str = "nats://127.0.0.1:4222"
    stream: str = "FIRSTPARTY"
    stream_replicas: int = 1
    stream_max_bytes: int = 1 << 30
    stream_max_age_days: float = 7.0  # above max_age_days: the sender records expiry, never the stream
    # A message a dead or stuck instance held comes back to another after this long.
    ack_wait_seconds: float = 30.0

    @property
    def batch_window_seconds(self) -> float:
        return self.batch_window_ms / 1000

    @property
    def max_age_seconds(self) -> float:
        return self.max_age_days * 86400


SEGMENT_REGIONS = ("us", "eu")


@dataclass(frozen=True, slots=True)
class SegmentSettings:
    """Segment beside Mixpanel (``protocols/segment.py``): where its calls go."""

    us: str = "https://api.segment.io"
    eu: str = "https://events.eu1.segmentapis.com"
    cdn: str = "https://cdn.segment.com"
    default_region: str = "us"
    # write key -> region; an EU workspace's events sent to the US host are lost.
    write_keys: Mapping[str, str] = field(default_factory=dict)
    # true: only the write keys in ``write_keys`` are relayed; any other is answered 400.
    only_listed: bool = False
    mounts: tuple[str, ...] = ("/seg/",)
    # Set analytics.js's own ajs_anonymous_id to the canonical id, server-set
    # (not HttpOnly: the SDK reads it), so the next page starts with it.
    set_ajs_cookie: bool = True


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    cookie: CookieSettings = field(default_factory=CookieSettings)
    cors: CorsSettings = field(default_factory=CorsSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    log: LogSettings = field(default_factory=LogSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    identity: IdentitySettings = field(default_factory=IdentitySettings)
    consent: ConsentSettings = field(default_factory=ConsentSettings)
    segment: SegmentSettings = field(default_factory=SegmentSettings)
    ops: OpsSettings = field(default_factory=OpsSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)

    @property
    def data_dir(self) -> Path:
        return Path(self.server.data_dir)

    @property
    def spool_path(self) -> Path:
        return Path(self.delivery.spool_path) if self.delivery.spool_path else self.data_dir / "spool.sqlite3"

    @property
    def forwarded_log_path(self) -> Path:
        return Path(self.log.forwarded) if self.log.forwarded else self.data_dir / "forwarded.jsonl"


# ---------------------------------------------------------------- validators


def _int(lo: int, hi: int) -> Callable[[str, Any], int]:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected a whole number, got {value!r}")
        if not lo <= value <= hi:
            raise ConfigError(key, f"{value} is out of range; use a value from {lo} to {hi}")
        return value

    return check


def _float(lo: float, hi: float) -> Callable[[str, Any], float]:
    def check(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        if not lo <= value <= hi:
            raise ConfigError(key, f"{value} is out of range; use a value from {lo} to {hi}")
        return float(value)

    return check


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {value!r}")
    return value


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {value!r}")
    return value


def _str_list(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, f'expected a list of strings such as ["a", "b"], got {value!r}')
    return tuple(value)


def _param_globs(key: str, value: Any) -> tuple[str, ...]:
    globs = _str_list(key, value)
    for glob in globs:
        if not re.fullmatch(r"[A-Za-z0-9_\-.\[\]*?]{1,64}", glob):
            raise ConfigError(
                key, f"{glob!r} is not a parameter name or glob; write names like \"email\" or \"*token*\" (letters, digits, _ - . [ ] * ?)"
            )
    return globs


def _url(key: str, value: Any) -> str:
    value = _str(key, value).rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, f"{value!r} is not an http(s) URL; write it like \"https://api.mixpanel.com\"")
    if parts.query or parts.fragment:
        raise ConfigError(key, f"{value!r} must not carry a query or fragment")
    return value


def _choice(*allowed: str) -> Callable[[str, Any], str]:
    def check(key: str, value: Any) -> str:
        value = _str(key, value)
        if value not in allowed:
            raise ConfigError(key, f"unknown value {value!r}; use one of {', '.join(allowed)}")
        return value

    return check


def _nats_url(key: str, value: Any) -> str:
    value = _str(key, value)
    urls = [u.strip() for u in value.split(",") if u.strip()]
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("nats", "tls") or not parts.hostname:
            raise ConfigError(key, f"{url!r} is not a NATS URL; write it like \"nats://127.0.0.1:4222\"")
    if not urls:
        raise ConfigError(key, "empty; write it like \"nats://127.0.0.1:4222\"")
    return ",".join(urls)


def _stream_name(key: str, value: Any) -> str:
    value = _str(key, value)
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", value):
        raise ConfigError(key, f"{value!r}: a stream name is 1-32 characters of A-Z a-z 0-9 _ -")
    return value


def _region(key: str, value: Any) -> str:
    value = _str(key, value).lower()
    if value not in REGIONS:
        raise ConfigError(key, f"unknown region {value!r}; use one of {', '.join(REGIONS)}")
    return value


def _networks(key: str, value: Any) -> tuple[IPNetwork, ...]:
    nets = []
    for item in _str_list(key, value):
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError as exc:
            raise ConfigError(key, f"{item!r} is not an IP address or CIDR network such as \"10.0.0.0/8\"") from exc
    return tuple(nets)


def _cookie_name(key: str, value: Any) -> str:
    value = _str(key, value)
    if not _COOKIE_NAME.match(value):
        raise ConfigError(key, f"{value!r} is not a valid cookie name; use letters, digits, '-' or '_'")
    return value


def _cookie_domains(key: str, value: Any) -> tuple[str, ...]:
    out = []
    for item in _str_list(key, value):
        name = item.strip().lower()
        bare = name.lstrip(".")
        if not _HOST_LABELS.match(bare) or "." not in bare:
            raise ConfigError(key, f"{item!r} is not a domain; write it like \".example.com\"")
        out.append("." + bare)
    return tuple(out)


def _origins(key: str, value: Any) -> tuple[str, ...]:
    out = []
    for item in _str_list(key, value):
        origin = item.strip().lower().rstrip("/")
        pattern = origin.split("://", 1)[-1]
        host = pattern[2:] if pattern.startswith("*.") else pattern
        host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        if "://" in origin and origin.split("://", 1)[0] not in ("http", "https"):
            raise ConfigError(key, f"{item!r}: an origin's scheme must be http or https")
        if not _HOST_LABELS.match(host) and host != "localhost":
            raise ConfigError(
                key, f"{item!r} is not an origin; write \"https://www.example.com\" or a pattern \"*.example.com\""
            )
        out.append(origin)
    return tuple(out)


def _store_url(key: str, value: Any) -> str:
    value = _str(key, value)
    scheme = value.split("://", 1)[0] if "://" in value else ""
    if scheme not in ("memory", "redis"):
        raise ConfigError(key, f"{value!r}: use \"memory://\" or \"redis://host:6379/0\"")
    return value


def _log_level(key: str, value: Any) -> str:
    value = _str(key, value).lower()
    if value not in ("debug", "info", "warning", "error"):
        raise ConfigError(key, f"unknown level {value!r}; use debug, info, warning or error")
    return value


# Parameters that ad and analytics tools own; a token under one of these names
# could be stripped, rewritten or logged by them.
_RESERVED_PARAMS = frozenset(
    {"gclid", "gbraid", "wbraid", "dclid", "fbclid", "msclkid", "ttclid", "twclid", "li_fat_id", "yclid",
     "_gl", "_ga", "mc_cid", "mc_eid", "igshid", "epik", "sccid", "irclickid", "ref", "utm_source",
     "utm_medium", "utm_campaign", "utm_term", "utm_content", "utm_id"}
)


def _token_param(key: str, value: Any) -> str:
    value = _str(key, value)
    if not re.match(r"^[A-Za-z0-9_\-]{1,32}$", value):
        raise ConfigError(key, f"{value!r}: use letters, digits, '-' or '_' (a short query parameter name)")
    if value.lower() in _RESERVED_PARAMS:
        raise ConfigError(key, f"{value!r} belongs to an ad or analytics tool; pick a neutral name such as \"fpb\"")
    return value


def _mode(key: str, value: Any) -> str:
    value = _str(key, value).lower()
    if value not in ("spool", "sync"):
        raise ConfigError(key, f"unknown mode {value!r}; use \"spool\" (durable, default) or \"sync\"")
    return value


def _carry_patterns(key: str, value: Any) -> tuple[str, ...]:
    out = _str_list(key, value)
    for item in out:
        if item.startswith(("$", "mp_")) or not item:
            raise ConfigError(key, f"{item!r}: $-prefixed and mp_ properties are identity or the SDK's own, never carried")
    return out


def _consent_mode(key: str, value: Any) -> str:
    value = _str(key, value).lower()
    if value not in ("drop", "anonymise", "anonymize"):
        raise ConfigError(key, f'unknown mode {value!r}; use "drop" or "anonymise"')
    return "anonymise" if value == "anonymize" else value


def _segment_region(key: str, value: Any) -> str:
    value = _str(key, value).lower()
    if value not in SEGMENT_REGIONS:
        raise ConfigError(key, f"unknown Segment region {value!r}; use one of {', '.join(SEGMENT_REGIONS)}")
    return value


def _write_keys(key: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ConfigError(key, f'expected a table such as {{ "<write key>" = "eu" }}, got {value!r}')
    return {str(k): _segment_region(f"{key}.{k}", region) for k, region in value.items()}


def _projects(key: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ConfigError(key, f'expected a table such as {{ "<project token>" = "eu" }}, got {value!r}')
    return {str(token): _region(f"{key}.{token}", region) for token, region in value.items()}


# Keys earlier versions read, and what to write instead.
_REPLACED = {
    "store.max_entries": "replaced by store.max_memory_mb: the in-memory store is bounded in MiB (default 128)",
}


def _mounts(key: str, value: Any) -> tuple[str, ...]:
    out = []
    for item in _str_list(key, value):
        if not re.match(r"^/([A-Za-z0-9_\-.~]+/)+$", item):
            raise ConfigError(key, f"{item!r}: a mount is a path that starts and ends with '/', such as \"/mp/\" or \"/a1/\"")
        out.append(item)
    if not out:
        raise ConfigError(key, "name at least one mount, such as [\"/mp/\"]")
    return tuple(out)


# The routes an alias may name (protocols.mixpanel's event and query routes).
_ALIASABLE = ("track", "engage", "groups", "import", "record", "flags", "settings", "decide")


# Paths under every mount that an alias would take over (``web.app.add_crossdomain``).
_CROSS_DOMAIN_PATHS = frozenset({"go", "bridge", "id"})


def _route_aliases(key: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ConfigError(key, f'expected a table such as {{ e = "track", p = "engage" }}, got {value!r}')
    out = {}
    for alias, route in value.items():
        if not re.match(r"^[A-Za-z0-9_\-]{1,32}$", str(alias)) or alias in _ALIASABLE:
            raise ConfigError(f"{key}.{alias}", "an alias is a short name (letters, digits, '-', '_') that is not a route itself")
        if alias in _CROSS_DOMAIN_PATHS:
            raise ConfigError(f"{key}.{alias}", f"{alias!r} is the cross-domain endpoint /mp/{alias}: pick another name")
        if route not in _ALIASABLE:
            raise ConfigError(f"{key}.{alias}", f"{route!r} is not a route; use one of {', '.join(_ALIASABLE)}")
        out[str(alias)] = route
    return out


def _optional_cookie_name(key: str, value: Any) -> str:
    return _cookie_name(key, value) if _str(key, value) else ""


# Section -> key -> validator. The schema is the single list of what exists.
_SCHEMA: dict[str, dict[str, Callable[[str, Any], Any]]] = {
    "privacy": {
        "ip_prefix_v4": _int(8, 32),
        "ip_prefix_v6": _int(16, 128),
        "forward_ip": _bool,
        "scrub_query_params": _param_globs,
        "keep_query_params": _param_globs,
        "bots": _choice("drop", "flag", "keep"),
    },
    "ops": {
        "host": _str,
        "port": _int(0, 65535),
        "allowed_networks": _networks,
        "live": _bool,
        "hosts": _str_list,
    },
    "server": {
        "host": _str,
        "port": _int(0, 65535),
        "data_dir": _str,
        "trusted_proxies": _networks,
        "max_inflight_body_bytes": _int(1024, 1 << 40),
        "max_inflight_requests": _int(1, 1_000_000),
        "max_body_bytes": _int(1024, 1024 * 1024 * 1024),
        "workers": _int(1, 256),
        "keepalive_timeout_seconds": _float(1, 3600),
        "request_timeout_seconds": _float(1, 3600),
        "mounts": _mounts,
        "decide_mounts": _mounts,
        "route_aliases": _route_aliases,
    },
    "upstream": {
        "us": _url,
        "eu": _url,
        "in": _url,
        "decide": _url,
        "cdn": _url,
        "default_region": _region,
        "projects": _projects,
        "only_listed": _bool,
        "timeout_seconds": _float(0.1, 600),
        "max_connections": _int(1, 10_000),
        "ca_file": _str,
    },
    "segment": {
        "us": _url,
        "eu": _url,
        "cdn": _url,
        "default_region": _segment_region,
        "write_keys": _write_keys,
        "only_listed": _bool,
        "mounts": _mounts,
        "set_ajs_cookie": _bool,
    },
    "cookie": {
        "name": _cookie_name,
        "domains": _cookie_domains,
        "secure": _bool,
        "max_age_days": _int(1, 400),
        "secret": _str,
        "secret_file": _str,
    },
    "cors": {"allowed_origins": _origins},
    "store": {"url": _store_url, "max_memory_mb": _int(1, 1_000_000)},
    "log": {
        "forwarded": _str,
        "max_bytes": _int(1024, 1 << 40),
        "backups": _int(0, 1000),
        "level": _log_level,
        "retention_days": _int(0, 3650),
    },
    "identity": {
        "keys_file": _str,
        "api_keys_file": _str,
        "linked_domains": _cookie_domains,
        "token_ttl_seconds": _int(5, 3600),
        "token_param": _token_param,
        "hub_url": _url,
        "hub_cookie_name": _cookie_name,
        "max_devices_per_id": _int(1, 100_000),
        "reset_window_days": _float(0, 400),
        "carry_properties": _carry_patterns,
        "repair_first_touch": _bool,
    },
    "consent": {
        "opt_out_cookie": _optional_cookie_name,
        "honor_mixpanel_opt_out": _bool,
        "honor_gpc": _bool,
        "honor_dnt": _bool,
        "honor_segment_consent": _bool,
        "mode": _consent_mode,
        "segment_required_categories": _str_list,
    },
    "delivery": {
        "mode": _mode,
        "spool_path": _str,
        "max_rows": _int(1, 1_000_000_000),
        "max_dead_letters": _int(1, 1_000_000_000),
        "dead_letter_days": _float(0.001, 3650),
        "batch_size": _int(1, 2000),
        "batch_window_ms": _int(0, 60_000),
        "max_in_flight": _int(1, 1000),
        "backoff_initial_seconds": _float(0.01, 3600),
        "backoff_max_seconds": _float(0.01, 86400),
        "max_age_days": _float(0.001, 3650),
        "drain_seconds": _float(0, 3600),
        "fsync": _bool,
        "min_free_bytes": _int(0, 1 << 50),
        "queue": _choice("sqlite", "jetstream"),
        "nats_url": _nats_url,
        "stream": _stream_name,
        "stream_replicas": _int(1, 5),
        "stream_max_bytes": _int(1 << 20, 1 << 50),
        "stream_max_age_days": _float(0.01, 3650),
        "ack_wait_seconds": _float(1, 3600),
    },
}


def env_help() -> str:
    """Every environment override, for ``--help``."""
    names = [f"{ENV_PREFIX}{s.upper()}_{k.upper()}" for s, keys in _SCHEMA.items() for k in keys]
    return ", ".join(names)


def _parse_env_value(raw: str) -> Any:
    # Environment values are TOML literals when they parse as one (numbers,
    # booleans, lists, inline tables), otherwise plain strings.
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("_")
        if section not in _SCHEMA or key not in _SCHEMA[section]:
            raise ConfigError(name, f"unknown setting; known variables: {env_help()}")
        out.setdefault(section, {})[key] = _parse_env_value(raw)
    return out


def _merge(raw: dict[str, Any], overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for section, values in overrides.items():
        merged.setdefault(section, {}).update(values)
    return merged


def _validate(raw: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    clean: dict[str, dict[str, Any]] = {}
    for section, values in raw.items():
        if section not in _SCHEMA:
            raise ConfigError(section, f"unknown section; known sections: {', '.join(_SCHEMA)}")
        if not isinstance(values, dict):
            raise ConfigError(section, f"expected a [{section}] table")
        for key, value in values.items():
            check = _SCHEMA[section].get(key)
            if check is None and f"{section}.{key}" in _REPLACED:
                raise ConfigError(f"{section}.{key}", _REPLACED[f"{section}.{key}"])
            if check is None:
                raise ConfigError(
                    f"{section}.{key}", f"unknown key; known keys in [{section}]: {', '.join(_SCHEMA[section])}"
                )
            clean.setdefault(section, {})[key] = check(f"{section}.{key}", value)
    return clean


# What ``provision.generate_missing`` creates in ``server.data_dir`` when not configured.
COOKIE_SECRET_FILE = "cookie_secret"
IDENTITY_KEYS_FILE = "identity_keys"


def read_secret(path: Path, key: str) -> bytes:
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {str(path)!r}: {exc.strerror}") from exc
    if len(secret) < 16:
        raise ConfigError(key, "the secret must be at least 16 bytes; generate one with `openssl rand -base64 32`")
    return secret


def _load_secret(cookie: dict[str, Any], data_dir: Path) -> bytes:
    """The cookie signing secret: configured, read from a file, or the one
    generated on the first start (``provision``); b"" when that is still to come."""
    if cookie.get("secret") and cookie.get("secret_file"):
        raise ConfigError("cookie.secret", "set either secret or secret_file, not both")
    if cookie.get("secret"):
        secret = cookie["secret"].encode()
        if len(secret) < 16:
            raise ConfigError("cookie.secret", "the secret must be at least 16 bytes; generate one with `openssl rand -base64 32`")
        return secret
    if cookie.get("secret_file"):
        return read_secret(Path(cookie["secret_file"]), "cookie.secret_file")
    path = data_dir / COOKIE_SECRET_FILE
    return read_secret(path, "cookie.secret") if path.exists() else b""


def build_settings(raw: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """Validate a parsed TOML mapping (plus environment overrides) into Settings."""
    merged = _merge(dict(raw), _env_overrides(environ if environ is not None else {}))
    clean = _validate(merged)
    server = ServerSettings(**clean.get("server", {}))
    up = dict(clean.get("upstream", {}))
    regions = dict(UpstreamSettings().regions)
    for region in REGIONS:
        if region in up:
            regions[region] = up.pop(region)
    env = environ if environ is not None else {}

    def env_value(name: str) -> str:
        return env.get(name.upper()) or env.get(name) or ""

    upstream = UpstreamSettings(
        regions=regions,
        https_proxy=env_value("https_proxy"),
        http_proxy=env_value("http_proxy"),
        no_proxy=env_value("no_proxy"),
        **up,
    )
    cookie_raw = clean.get("cookie", {})
    secret = _load_secret(cookie_raw, Path(server.data_dir))
    cookie = CookieSettings(
        secret=secret, **{k: v for k, v in cookie_raw.items() if k not in ("secret", "secret_file")}
    )
    if upstream.only_listed and not upstream.projects:
        raise ConfigError("upstream.only_listed", 'list the project tokens served: upstream.projects = { "<token>" = "us" }')
    ops = OpsSettings(**clean.get("ops", {}))
    if ops.port and ops.port == server.port and ops.host == server.host:
        raise ConfigError("ops.port", f"{ops.port} is server.port too: give the ops listener a port of its own (or 0: none)")
    return Settings(
        server=server,
        upstream=upstream,
        cookie=cookie,
        cors=CorsSettings(**clean.get("cors", {})),
        store=StoreSettings(**clean.get("store", {})),
        log=LogSettings(**clean.get("log", {})),
        ops=ops,
        privacy=PrivacySettings(**clean.get("privacy", {})),
        delivery=_delivery(clean.get("delivery", {})),
        identity=_identity(clean.get("identity", {}), Path(server.data_dir)),
        segment=_segment(clean.get("segment", {}), server),
        consent=ConsentSettings(**clean.get("consent", {})),
    )


def _segment(values: dict[str, Any], server: ServerSettings) -> SegmentSettings:
    segment = SegmentSettings(**values)
    if segment.only_listed and not segment.write_keys:
        raise ConfigError("segment.only_listed", 'list the write keys served: segment.write_keys = { "<key>" = "us" }')
    taken = [*server.mounts, *server.decide_mounts]
    for mount in segment.mounts:
        for other in taken:
            if mount.startswith(other) or other.startswith(mount):
                raise ConfigError(
                    "segment.mounts",
                    f"{mount!r} overlaps the Mixpanel mount {other!r} (server.mounts, server.decide_mounts): "
                    "give Segment a path of its own, such as \"/seg/\"",
                )
    return segment


def identity_keys(path: Path) -> Any:
    """The token key ring in ``path`` (``identity.keys_file``)."""
    from .core.tokens import KeyRing

    key = "identity.keys_file"
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {str(path)!r}: {exc.strerror}; create one with `firstparty keygen`") from exc
    try:
        return KeyRing.from_file(text)
    except ValueError as exc:
        raise ConfigError(key, f"{path}: {exc}") from exc


def _identity(values: dict[str, Any], data_dir: Path) -> IdentitySettings:
    """The identity settings; the key ring read from ``keys_file``, or from the
    one generated on the first start (``provision``): None when that is still to come."""
    configured = values.get("keys_file")
    path = Path(configured) if configured else data_dir / IDENTITY_KEYS_FILE
    ring = identity_keys(path) if configured or path.exists() else None
    return IdentitySettings(
        keys=ring, api_keys=_api_keys(values.get("api_keys_file", "")),
        **{k: v for k, v in values.items() if k != "keys_file"}, keys_file=str(path),
    )


def _api_keys(path: str) -> Any:
    """The app backends' server keys (``identity.api_keys_file``), or None."""
    from .core.apikeys import ApiKeys

    if not path:
        return None
    key = "identity.api_keys_file"
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path!r}: {exc.strerror}; create one with `firstparty apikey --name <app>`") from exc
    try:
        keys = ApiKeys.from_file(text)
    except ValueError as exc:
        raise ConfigError(key, f"{path}: {exc}") from exc
    if not keys.names:
        raise ConfigError(key, f"{path} holds no keys; add one with `firstparty apikey --name <app>`")
    return keys


def _delivery(values: dict[str, Any]) -> DeliverySettings:
    delivery = DeliverySettings(**values)
    if delivery.backoff_max_seconds < delivery.backoff_initial_seconds:
        raise ConfigError(
            "delivery.backoff_max_seconds",
            f"{delivery.backoff_max_seconds} is below backoff_initial_seconds ({delivery.backoff_initial_seconds})",
        )
    return delivery


def load_settings(path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file at ``path`` (or none: defaults) and apply the environment."""
    environ = os.environ if environ is None else environ
    path = path or environ.get(ENV_PREFIX + "CONFIG")
    raw: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError("--config", f"no such file {str(path)!r}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(path), f"not valid TOML: {exc}") from exc
    return build_settings(raw, environ)
