"""Segment's CDN, first-party: analytics.js, its bundles and its settings.

The standard snippet loads ``<cdn>/analytics.js/v1/<writeKey>/analytics.min.js``;
that script takes ``<cdn>`` from its own ``src`` (``https://`` only) or from
``analytics._cdn`` / ``AnalyticsBrowser.load({cdnURL})``, then loads its
code-split bundles from ``<cdn>/analytics-next/bundles/``, destinations from
``<cdn>/next-integrations/`` and its settings from
``<cdn>/v1/projects/<writeKey>/settings``. Served under ``/seg/cdn/``, every
one of them is first-party, and the settings' ``integrations["Segment.io"]
.apiHost`` (and ``metrics.host``) are rewritten to this proxy's ``/seg/v1``,
so the snippet needs no other change to send its calls here.

``lib/<writeKey>/a.js`` is the same script under a neutral name: ad blockers
block any URL holding ``/analytics.js/v1/``. Loaded from there, analytics.js
cannot find its CDN in its own ``src``: the snippet sets
``analytics._cdn = "https://<site>/seg/cdn"`` before loading it.

Pure: which CDN paths are served (an allow-list, so ``/seg/cdn/`` is not a
general fetcher), and the settings rewrite. No I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
import orjson

SCRIPT_TTL_SECONDS = 3600
# Settings change when the workspace does (a destination added, a key's
# region): short enough that an edit arrives within minutes.
SETTINGS_TTL_SECONDS = 300
# Segment's own API host as settings name it, per region (what tells a
# workspace's region: "events.eu1.segmentapis.com/v1" is an EU workspace).
SEGMENT_CDN = "https://cdn.segment.com"
REGION_OF_API_HOST = {"api.segment.io/v1": "us", "events.eu1.segmentapis.com/v1": "eu"}

_KEY = r"[A-Za-z0-9_\-]{1,100}"
_SETTINGS = re.compile(rf"^v1/projects/({_KEY})/settings$")
_SCRIPT = re.compile(rf"^analytics\.js/v1/({_KEY})/(?:platform/)?analytics(?:\.min|\.classic)?\.js$")
# The same script under a name no filter list knows: any path holding
# "/analytics.js/v1/" is blocked on every domain (EasyPrivacy), whatever the mount.
_NEUTRAL_SCRIPT = re.compile(rf"^lib/({_KEY})/a\.js$")
_BUNDLE = re.compile(r"^analytics-next/bundles/[A-Za-z0-9_.\-]{1,200}\.js$")
# Destinations: next-integrations/integrations/<name>/<version>/<name>.dynamic.js.gz,
# next-integrations/actions/<name>/<hash>.js; never "..".
_INTEGRATION = re.compile(r"^next-integrations/(?:[A-Za-z0-9_.@\-]{1,100}/){1,5}[A-Za-z0-9_.@\-]{1,200}\.js(?:\.gz)?$")


@dataclass(frozen=True, slots=True)
class Asset:
    """One servable CDN path."""

    path: str  # on the CDN, with its leading "/"
    settings: bool  # a project's settings (rewritten, JSON) or a script
    write_key: str | None
    ttl: int

    @property
    def content_type(self) -> str:
        return "application/json" if self.settings else "application/javascript"


def asset(tail: str) -> Asset | None:
    """The CDN asset at ``/seg/cdn/<tail>``, or None: not one we serve."""
    if ".." in tail:
        return None
    if m := _SETTINGS.match(tail):
        return Asset("/" + tail, True, m.group(1), SETTINGS_TTL_SECONDS)
    if m := _SCRIPT.match(tail):
        return Asset("/" + tail, False, m.group(1), SCRIPT_TTL_SECONDS)
    if m := _NEUTRAL_SCRIPT.match(tail):
        return Asset(f"/analytics.js/v1/{m.group(1)}/analytics.min.js", False, m.group(1), SCRIPT_TTL_SECONDS)
    if _BUNDLE.match(tail) or _INTEGRATION.match(tail):
        return Asset("/" + tail, False, None, SCRIPT_TTL_SECONDS)
    return None


@dataclass(frozen=True, slots=True)
class RewrittenSettings:
    body: bytes
    # The region the workspace's own settings name ("us", "eu"), or None.
    workspace_region: str | None


def rewrite_settings(
    body: bytes, api_host: str, protocol: str, cdn_url: str, cdn_origins: tuple[str, ...] = (SEGMENT_CDN,)
) -> RewrittenSettings:
    """A project's settings with its calls sent to ``protocol://api_host``
    (``www.example.com/seg/v1``) and URLs on the CDN (any of ``cdn_origins``)
    moved to ``cdn_url`` (``https://www.example.com/seg/cdn``).

    Raises ``ValueError`` for a body that is not a JSON object (a CDN error
    page): it must not be served as settings."""
    obj = orjson.loads(body)
    if not isinstance(obj, dict):
        raise ValueError("the settings are not a JSON object")
    integrations = obj.get("integrations")
    if not isinstance(integrations, dict):
        integrations = obj["integrations"] = {}
    segment_io = integrations.get("Segment.io")
    if not isinstance(segment_io, dict):
        segment_io = integrations["Segment.io"] = {}
    original = segment_io.get("apiHost")
    region = REGION_OF_API_HOST.get(original) if isinstance(original, str) else None
    segment_io["apiHost"] = api_host
    segment_io["protocol"] = protocol
    metrics = obj.get("metrics")
    if isinstance(metrics, dict) and "host" in metrics:
        metrics["host"] = api_host
    prefixes = tuple(origin.rstrip("/") + "/" for origin in cdn_origins)
    plugins = obj.get("remotePlugins")
    if isinstance(plugins, list):
        for plugin in plugins:
            url = plugin.get("url") if isinstance(plugin, dict) else None
            for prefix in prefixes:
                if isinstance(url, str) and url.startswith(prefix):
                    plugin["url"] = cdn_url.rstrip("/") + "/" + url[len(prefix):]
                    break
    return RewrittenSettings(orjson.dumps(obj), region)

