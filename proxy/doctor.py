"""``firstparty check``: the config doctor.

Each check is one function in ``CHECKS`` (the table grows with the product):
it reads the settings as loaded (``Settings``) and the file as written (the
raw TOML: a value the loader normalises, such as a cookie domain's leading
dot, is only visible there) and yields ``Finding``s, each with the fix.
``--online`` adds ``ONLINE_CHECKS`` (DNS, TLS and the vendors' CDNs, through
the proxy's own ``UpstreamClient``: its CA file, proxies and verification),
``--nginx FILE`` the checks of ``nginx_findings`` on the site's nginx config,
parsed with ``crossplane``.

Errors break the product (events lost, identity split, a secret exposed):
exit code 1. Warnings are risks or costs: exit code 0.
"""

from __future__ import annotations

import ipaddress
import re
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .settings import Settings

ERROR = "error"
WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Finding:
    level: str  # ERROR or WARNING
    where: str  # the setting (``cookie.domains``) or ``file:line``
    problem: str
    fix: str

    def line(self) -> str:
        return f"{self.level:<7} {self.where}: {self.problem}\n        fix: {self.fix}"


@dataclass
class Context:
    settings: Settings
    raw: dict[str, Any] = field(default_factory=dict)  # the TOML as written ({} without a file)
    env: Mapping[str, str] = field(default_factory=dict)  # the environment the settings were read with
    # How many instances will share this configuration (--instances): more than one
    # needs what every instance must agree on (store, secret, keys).
    instances: int = 1


Check = Callable[[Context], Iterator[Finding]]


def _raw(ctx: Context, section: str, key: str) -> Any:
    """A setting as written: its ``FIRSTPARTY_<SECTION>_<KEY>`` override, else the file's."""
    env = ctx.env.get(f"FIRSTPARTY_{section}_{key}".upper())
    if env:
        return env.strip().strip('"')
    value = ctx.raw.get(section, {})
    return value.get(key) if isinstance(value, dict) else None


_psl: Any = None


def public_suffixes() -> Any:
    """The Public Suffix List (the ``publicsuffixlist`` package: offline, updated
    with each release), loaded once."""
    global _psl
    if _psl is None:
        from publicsuffixlist import PublicSuffixList

        _psl = PublicSuffixList()
    return _psl


# --------------------------------------------------------------------- checks


def cookie_domains(ctx: Context) -> Iterator[Finding]:
    section = ctx.raw.get("cookie")
    written = section.get("domains", []) if isinstance(section, dict) else []
    for item in written if isinstance(written, list) else []:
        if isinstance(item, str) and not item.startswith("."):
            yield Finding(
                WARNING, "cookie.domains",
                f"{item!r} has no leading dot; it is used as \".{item}\" (the domain and every subdomain)",
                f"write \".{item}\" so the file says what the cookie covers",
            )
    psl = public_suffixes()
    for domain in ctx.settings.cookie.domains:
        bare = domain.lstrip(".")
        if psl.is_public(bare):
            yield Finding(
                ERROR, "cookie.domains",
                f"{domain!r} is a public suffix: browsers refuse a cookie for it, so no visitor keeps an id",
                f"use your own registrable domain under it, such as \".example.{bare}\"",
            )


def linked_domains(ctx: Context) -> Iterator[Finding]:
    s = ctx.settings
    for linked in s.identity.linked_domains:
        bare = linked.lstrip(".")
        if not any(bare == d.lstrip(".") or bare.endswith(d) for d in s.cookie.domains):
            yield Finding(
                ERROR, "identity.linked_domains",
                f"{linked!r} is not under any of cookie.domains: on it the identity cookie is host-only, "
                "so each of its subdomains keeps an id of its own",
                f"add \"{'.' + bare}\" to cookie.domains",
            )
        if s.cors.allowed_origins and not any(bare in o for o in s.cors.allowed_origins):
            yield Finding(
                WARNING, "cors.allowed_origins",
                f"no allowed origin names {linked!r}: pages there with a cross-origin api_host are refused",
                f"add \"https://*.{bare}\" (or its exact origins) to cors.allowed_origins",
            )


# Names that are no top-level domain yet are fine to use: reserved for tests,
# documentation and private networks (RFC 2606, RFC 6761, ICANN's .internal) or
# common on intranets.
RESERVED_TLDS = frozenset({"test", "example", "invalid", "localhost", "local", "internal", "arpa", "lan", "home", "corp"})


def domain_spelling(ctx: Context) -> Iterator[Finding]:
    """A domain whose last label is no top-level domain (``.shop-b.tset``) is a
    typo, however consistently it is repeated in nginx and the config."""
    psl = public_suffixes()
    s = ctx.settings
    for where, domains in (("cookie.domains", s.cookie.domains), ("identity.linked_domains", s.identity.linked_domains)):
        for domain in domains:
            bare = domain.strip(".").lower()
            tld = bare.rpartition(".")[2]
            if not bare or tld in RESERVED_TLDS or psl.publicsuffix(bare, accept_unknown=False) is not None:
                continue
            yield Finding(
                WARNING, where,
                f"{domain!r} ends in .{tld}, which is no top-level domain (public suffix list) nor a reserved one: a typo?",
                "correct it here and in nginx's server_name (the two agreeing on a typo serve no visitor)",
            )


def secure_cookie(ctx: Context) -> Iterator[Finding]:
    s = ctx.settings
    https = [o for o in s.cors.allowed_origins if o.startswith("https://")]
    if not s.cookie.secure and https:
        yield Finding(
            WARNING, "cookie.secure",
            f"false, yet the site is served over https ({https[0]}): the identity cookie would also travel over plain http",
            "set cookie.secure = true (false is for local http only)",
        )


def trusted_proxies(ctx: Context) -> Iterator[Finding]:
    for net in ctx.settings.server.trusted_proxies:
        if net.prefixlen < (8 if net.version == 4 else 16):
            yield Finding(
                ERROR, "server.trusted_proxies",
                f"{net} trusts X-Forwarded-For from {'everyone' if net.prefixlen == 0 else 'a large part of the internet'}: "
                "any visitor can pick the IP sent to the vendor",
                "list only the addresses nginx or your load balancer connects from (\"127.0.0.1/32\", \"10.0.3.0/24\")",
            )


def shared_state(ctx: Context) -> Iterator[Finding]:
    s = ctx.settings
    many_workers = s.server.workers > 1
    if s.store.url.startswith("memory://") and (many_workers or ctx.instances > 1):
        who = f"{s.server.workers} workers" if many_workers else f"{ctx.instances} instances"
        yield Finding(
            ERROR, "store.url",
            f"an in-process alias store with {who}: each keeps its own aliases, so a server SDK's event "
            "is rewritten only when it reaches the process that saw the browser, and its own token claims, "
            "so a link token can be redeemed once in each",
            "use a shared store: store.url = \"redis://host:6379/0\"",
        )
    if ctx.instances > 1 and s.delivery.mode == "spool" and s.delivery.queue == "sqlite":
        yield Finding(
            WARNING, "delivery.queue",
            f"\"sqlite\" with {ctx.instances} instances: each keeps its unsent events in its own file, and an "
            "instance replaced during a vendor outage (a container, an autoscaling group) takes them with it",
            "on disks that outlive the instance this is fine; otherwise share one queue: "
            "delivery.queue = \"jetstream\" (README, Fleets)",
        )
    if ctx.instances > 1:
        if not _raw(ctx, "cookie", "secret") and not _raw(ctx, "cookie", "secret_file"):
            yield Finding(
                ERROR, "cookie.secret",
                f"generated per instance ({s.data_dir / 'cookie_secret'}): with {ctx.instances} instances a cookie "
                "set by one is forged to the others, and the visitor gets a new id",
                "give every instance the same secret: cookie.secret_file = \"/run/secrets/firstparty_cookie_secret\"",
            )
        if not _raw(ctx, "identity", "keys_file"):
            yield Finding(
                ERROR, "identity.keys_file",
                "generated per instance: a bridge token minted by one instance cannot be opened by another",
                "share one keys file (firstparty keygen --file ...) and set identity.keys_file on every instance",
            )


def file_modes(ctx: Context) -> Iterator[Finding]:
    s = ctx.settings
    forge = (ERROR, "whoever reads it can forge identity cookies or tokens")
    ids = (WARNING, "it holds visitors' ids and IPs")
    files = {
        "cookie.secret_file": (Path(_raw(ctx, "cookie", "secret_file") or s.data_dir / "cookie_secret"), forge),
        "identity.keys_file": (Path(s.identity.keys_file) if s.identity.keys_file else s.data_dir / "identity_keys", forge),
        "server.data_dir": (s.data_dir, ids),
        "delivery.spool_path": (s.spool_path, ids),
        "log.forwarded": (s.forwarded_log_path, ids),
    }
    if s.identity.api_keys_file:
        files["identity.api_keys_file"] = (Path(s.identity.api_keys_file), forge)
    for key, (path, (level, why)) in files.items():
        try:
            mode = path.stat().st_mode
        except OSError:
            continue
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            fix = "700" if stat.S_ISDIR(mode) else "600"
            yield Finding(
                level, key, f"{path} is readable by other users (mode {stat.filemode(mode)}): {why}", f"chmod {fix} {path}"
            )


def delivery(ctx: Context) -> Iterator[Finding]:
    d = ctx.settings.delivery
    if d.mode == "spool" and not d.fsync:
        yield Finding(
            WARNING, "delivery.fsync",
            "false: events acknowledged in the last moments before a power cut or a kernel crash are lost",
            "keep delivery.fsync = true unless the disk's fsync is too slow for your traffic (bench/)",
        )
    if d.mode == "spool":
        fs = filesystem_of(ctx.settings.spool_path)
        if fs in ("tmpfs", "ramfs"):
            yield Finding(
                WARNING, "delivery.spool_path",
                f"{ctx.settings.spool_path} is on {fs}: the spool is lost at every reboot, with what it holds",
                "put the spool on a disk (server.data_dir or delivery.spool_path)",
            )


def ops_listener(ctx: Context) -> Iterator[Finding]:
    ops = ctx.settings.ops
    if not ops.port:
        return
    wide = [n for n in ops.allowed_networks if n.prefixlen == 0]
    if ops.host in ("0.0.0.0", "::", "") and wide:
        yield Finding(
            WARNING, "ops.allowed_networks",
            f"{wide[0]} on a listener bound to {ops.host or 'every address'}: anyone who reaches the port reads "
            "the metrics",
            "allow only your monitoring network, such as [\"10.0.0.0/8\"]",
        )



CHECKS: list[Check] = [
    cookie_domains,
    linked_domains,
    domain_spelling,
    secure_cookie,
    trusted_proxies,
    shared_state,
    file_modes,
    delivery,
    ops_listener,
]


def filesystem_of(path: Path) -> str | None:
    """The file system type the path (or its nearest existing parent) is on, from /proc/mounts."""
    try:
        target = path.resolve()
        while not target.exists() and target != target.parent:
            target = target.parent
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    best, fstype = "", None
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3:
            point = parts[1].replace("\\040", " ")
            if (str(target) == point or str(target).startswith(point.rstrip("/") + "/")) and len(point) > len(best):
                best, fstype = point, parts[2]
    return fstype


def privacy_in_force(s: Settings) -> list[str]:
    """What leaves for the vendors under these settings, one line per rule
    (``firstparty check`` prints it before the findings)."""
    p, consent = s.privacy, s.consent
    if not p.forward_ip:
        ip = "none (ip=0, no ip/$ip, Segment context.ip 0.0.0.0, no forwarding headers)"
    elif p.ip_prefix_v4 == 32 and p.ip_prefix_v6 == 128:
        ip = "whole (privacy.ip_prefix_v4 = 32, ip_prefix_v6 = 128)"
    else:
        ip = f"truncated to /{p.ip_prefix_v4} (IPv4) and /{p.ip_prefix_v6} (IPv6)"
    scrubbed = ", ".join(p.scrub_query_params) if p.scrub_query_params else "none"
    urls = f"query parameters removed: {scrubbed}"
    if p.keep_query_params:
        urls += f"; only these kept: {', '.join(p.keep_query_params)}"
    bots = {"drop": "dropped", "flag": "flagged ($bot / context.bot, no identity, no cookie)", "keep": "not checked"}[p.bots]
    signals = [name for name, on in (
        (f"the opt-out cookie {consent.opt_out_cookie}", bool(consent.opt_out_cookie)),
        ("mixpanel-js's opt-out", consent.honor_mixpanel_opt_out), ("GPC", consent.honor_gpc),
        ("DNT", consent.honor_dnt), ("Segment's context.consent", consent.honor_segment_consent),
    ) if on]
    refusals = f"{', '.join(signals) or 'none honoured'}: {consent.mode}"
    return [
        f"privacy: visitor IP to the vendors: {ip}",
        f"privacy: URLs: {urls} (and the bridge token, {s.identity.token_param}, from every string)",
        f"privacy: crawlers, monitors, headless browsers (privacy.bots = {p.bots!r}): {bots}",
        f"privacy: consent refusals ({refusals})",
    ]


def findings(ctx: Context) -> list[Finding]:
    return [f for check in CHECKS for f in check(ctx)]


# --------------------------------------------------------------------- online


async def online_findings(ctx: Context, write_keys: list[str]) -> list[Finding]:
    """Resolve and TLS-handshake every upstream, fetch the SDKs from the CDNs,
    and read each named Segment workspace's region from its settings."""
    from .errors import UpstreamError, UpstreamTLSError
    from .services.upstream import SegmentUpstreams, UpstreamClient, Upstreams

    s = ctx.settings
    mixpanel = Upstreams.from_settings(s.upstream)
    seg = SegmentUpstreams.from_settings(s.segment)
    client = UpstreamClient(
        max_connections_per_host=4,
        timeout=min(s.upstream.timeout_seconds, 10),
        ca_file=s.upstream.ca_file,
        proxies={"https": s.upstream.https_proxy, "http": s.upstream.http_proxy},
        no_proxy=s.upstream.no_proxy,
    )
    out: list[Finding] = []
    await client.open()
    try:
        for where, endpoint, path in _online_targets(s, mixpanel, seg, write_keys):
            try:
                answer = await client.request(endpoint, "GET", path, [("accept", "*/*")], None, follow_redirects=True)
            except UpstreamTLSError as exc:
                out.append(Finding(ERROR, where, f"{endpoint.origin}: {exc}",
                                   "trust the CA that signs it with upstream.ca_file (a TLS-inspecting proxy's, a private CA)"))
                continue
            except UpstreamError as exc:
                out.append(Finding(ERROR, where, f"{endpoint.origin}: {exc}",
                                   "check DNS and egress from this host (if it must go through a proxy: HTTPS_PROXY "
                                   "in the proxy's environment)"))
                continue
            out += _answer_findings(where, endpoint, path, answer.status, answer.body, seg)
    finally:
        await client.close()
    return out


def _online_targets(s: Any, mixpanel: Any, seg: Any, write_keys: list[str]) -> list[tuple[str, Any, str]]:
    """(where, endpoint, path) of every upstream the config sends to: the default
    region and those projects and write keys are routed to (an unused region's
    host is not this site's concern), the CDNs, each named workspace's settings."""
    from .web.cdn import LIB_PATHS

    used = {s.upstream.default_region, *s.upstream.projects.values()}
    seg_used = {seg.region_for(k) for k in [*s.segment.write_keys, *write_keys]} | {seg.region_for(None)}
    targets = [(f"upstream.{name}", ep, "/") for name, ep in mixpanel.regions.items() if name in used]
    targets += [("upstream.decide", mixpanel.decide, "/")]
    targets += [("upstream.cdn", mixpanel.cdn, LIB_PATHS["lib.min.js"])]
    targets += [(f"segment.{name.removeprefix('segment-')}", ep, "/") for name, ep in seg.regions.items() if name in seg_used]
    for key in dict.fromkeys(list(s.segment.write_keys) + write_keys):
        targets.append((f"segment.cdn ({key[:6]}…)", seg.cdn, f"/v1/projects/{key}/settings"))
    return targets


def _answer_findings(where: str, endpoint: Any, path: str, status: int, body: bytes, seg: Any) -> list[Finding]:
    """What an upstream's answer says: the CDN serves the SDK; a workspace's
    settings name the region its calls must go to."""
    import orjson

    from .protocols import segment_cdn

    if path == "/" or path.startswith("/libs/"):
        if path != "/" and status != 200:
            return [Finding(ERROR, where, f"{endpoint.origin}{path} answered {status}",
                            "check upstream.cdn: /mp/lib.min.js is served from there")]
        return []
    key = path.split("/")[3]
    if status != 200:
        return [Finding(ERROR, where, f"the settings of write key {key[:6]}… answered {status}",
                        "check the write key (Segment: Sources > your source > Settings > API Keys)")]
    try:
        api_host = orjson.loads(body)["integrations"]["Segment.io"]["apiHost"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return []
    region = segment_cdn.REGION_OF_API_HOST.get(api_host)
    routed = seg.region_for(key).removeprefix("segment-")
    if region and region != routed:
        return [Finding(ERROR, f"segment.write_keys.{key[:6]}…",
                        f"the workspace is in the {region.upper()} region but its calls go to {routed.upper()}: "
                        "Segment drops them there",
                        f"segment.write_keys = {{ \"{key}\" = \"{region}\" }}")]
    return []


# ---------------------------------------------------------------------- nginx


def nginx_findings(ctx: Context, path: Path) -> list[Finding]:
    """The site's nginx config against the proxy's settings, for every server
    block of the site (those whose names fall under ``cookie.domains`` or
    ``identity.linked_domains``; without such domains, every block that sends
    a mount to the proxy): each mount proxied there, with the headers identity
    and geolocation need, a body limit no lower than the proxy's, keep-alive
    upstream, no path rewriting; the upstream is the address the proxy listens
    on, and nginx's own address is one the proxy trusts. A block that sends the
    mounts to the proxy under a name outside those domains is named (a typo)."""
    import crossplane

    if not path.is_file():
        return [Finding(ERROR, str(path), "no such file", "name the nginx file that holds the site's server block (--nginx)")]
    # A site file sits inside http {} (upstream, server at its top): no context check.
    parsed = crossplane.parse(str(path), catch_errors=True, comments=False, check_ctx=False)
    out: list[Finding] = []
    for error in parsed.get("errors", []):
        line = f":{error['line']}" if error.get("line") else ""
        out.append(Finding(ERROR, f"{path}{line}", f"nginx config: {error.get('error')}", "fix the syntax (nginx -t)"))
    directives = [d for cfg in parsed.get("config", []) for d in cfg.get("parsed", [])]
    servers = [d for d in _walk(directives) if d["directive"] == "server" and "block" in d]
    upstreams = {d["args"][0]: d for d in _walk(directives) if d["directive"] == "upstream" and d.get("args")}
    s = ctx.settings
    mounts = [*s.server.mounts, *s.server.decide_mounts, *s.segment.mounts]
    domains = list(dict.fromkeys("." + d.strip(".").lower() for d in (*s.cookie.domains, *s.identity.linked_domains)))
    site = _site_servers(path, servers, mounts, domains, out)
    if not site:
        return out + [
            Finding(ERROR, str(path), f"no location sends {mount} to the proxy: those requests reach your site instead",
                    f"add `location {mount} {{ proxy_pass http://firstparty; ... }}` (nginx.example.conf)")
            for mount in mounts
        ]
    targets: list[tuple[str, dict[str, Any]]] = []
    for server, label in site:
        for mount in mounts:
            loc = _location_for(server, mount)
            if loc is None:
                out.append(Finding(ERROR, f"{path}:{server.get('line')}",
                                   f"{label}: no location sends {mount} to the proxy: the SDKs there get your site's answer (404)",
                                   f"add `location {mount} {{ proxy_pass http://firstparty; ... }}` to this server block "
                                   "(nginx.example.conf)"))
                continue
            out += _location_findings(path, mount, server, loc, s, upstreams)
            passes = _values(loc.get("block", []), "proxy_pass")
            if passes and passes[0]:
                targets.append((passes[0][0], loc))
    out += _address_findings(path, targets, s, upstreams)
    return list(dict.fromkeys(out))  # one location serving several mounts: each finding once


def _site_servers(
    path: Path, servers: list[dict[str, Any]], mounts: list[str], domains: list[str], out: list[Finding]
) -> list[tuple[dict[str, Any], str]]:
    """(server block, its names) of the site's blocks; a block sending the mounts
    to the proxy under a name outside ``domains`` is a finding (a typo?)."""
    site: list[tuple[dict[str, Any], str]] = []
    for server in servers:
        names = [n.lower() for args in _values(server["block"], "server_name") for n in args if n not in ("_", "")]
        proxies = any(_location_for(server, m) is not None for m in mounts)
        label = " ".join(names) or "(no server_name)"
        if domains and names:
            if any(_under(n, domains) for n in names):
                site.append((server, label))
            elif proxies:
                out.append(Finding(ERROR, f"{path}:{server.get('line')}",
                                   f"server_name {label} sends the mounts to the proxy but is under none of "
                                   f"cookie.domains / identity.linked_domains ({', '.join(domains)}): a typo?",
                                   "correct the name, or add its domain to cookie.domains and identity.linked_domains"))
        elif proxies:
            site.append((server, label))
    return site


def _under(name: str, domains: list[str]) -> bool:
    name = name.lstrip("*").lstrip(".")
    return any(name == d[1:] or name.endswith(d) for d in domains)


def _address_findings(
    path: Path, targets: list[tuple[str, dict[str, Any]]], s: Settings, upstreams: dict[str, Any]
) -> list[Finding]:
    """Where nginx sends the mounts against where the proxy listens
    (``server.port``), and the address nginx then connects from against
    ``server.trusted_proxies``."""
    out: list[Finding] = []
    for target, loc in targets:
        scheme, _, rest = target.partition("://")
        name = rest.partition("/")[0]
        if name.startswith("unix:") or "$" in name:
            continue
        default = 443 if scheme == "https" else 80
        if name in upstreams:
            lines = [(args[0], f"{path}:{d.get('line')}") for d in upstreams[name].get("block", [])
                     if d["directive"] == "server" and (args := d.get("args"))]
        else:
            lines = [(name, f"{path}:{loc.get('line')}")]
        for address, where in lines:
            if address.startswith("unix:"):
                continue
            host, port = _host_port(address, default)
            if port is not None and port != s.server.port:
                out.append(Finding(ERROR, where,
                                   f"nginx sends the mounts to {address}, but the proxy listens on port {s.server.port} "
                                   "(server.port): every request is a 502",
                                   f"point nginx at {host}:{s.server.port}, or set server.port = {port}"))
            bind = _values(loc.get("block", []), "proxy_bind")
            source = bind[0][0] if bind and bind[0] else (("::1" if ":" in host else "127.0.0.1") if _loopback(host) else None)
            if source is None or "$" in source:
                continue  # another machine: its address is not in this file
            try:
                ip = ipaddress.ip_address(source)
            except ValueError:
                continue
            if not any(ip in net for net in s.server.trusted_proxies if net.version == ip.version):
                out.append(Finding(ERROR, "server.trusted_proxies",
                                   f"nginx connects to the proxy from {ip} ({'proxy_bind' if bind else 'its upstream ' + address + ' is on this machine'}), "
                                   "which server.trusted_proxies does not list: X-Forwarded-For is ignored and every visitor "
                                   "gets the server's IP and location",
                                   f"add \"{ip}/{ip.max_prefixlen}\" to server.trusted_proxies"))
    return out


def _host_port(address: str, default: int) -> tuple[str, int | None]:
    """``127.0.0.1:8000`` -> (``127.0.0.1``, 8000); ``[::1]:8000``; no port: the scheme's."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest.lstrip(":")
    else:
        host, _, port = address.partition(":")
    if not port:
        return host, default
    return host, int(port) if port.isdigit() else None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _walk(directives: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for d in directives:
        yield d
        yield from _walk(d.get("block", []) or [])


def _location_for(server: dict[str, Any], mount: str) -> dict[str, Any] | None:
    probe = mount + "track"
    best: tuple[int, dict[str, Any]] | None = None
    for d in server.get("block", []):
        if d["directive"] != "location" or not d.get("args"):
            continue
        args = d["args"]
        if args[0] in ("~", "~*") and len(args) > 1:
            try:
                matched = re.search(args[1], probe, re.I if args[0] == "~*" else 0)
            except re.error:  # PCRE that Python's re does not read: not ours to judge
                continue
            if matched:
                return d  # nginx: the first matching regex wins over prefixes
        else:
            prefix = args[-1]
            if probe.startswith(prefix) and prefix.startswith("/") and (best is None or len(prefix) > best[0]):
                best = (len(prefix), d)
    return best[1] if best else None


def _values(block: list[dict[str, Any]], name: str) -> list[list[str]]:
    return [d.get("args", []) for d in block if d["directive"] == name]


def _effective(levels: list[list[dict[str, Any]]], name: str) -> list[list[str]]:
    """nginx inheritance: a directive set at an inner level replaces the outer ones."""
    for block in levels:
        found = _values(block, name)
        if found:
            return found
    return []


def _size(value: str) -> int:
    m = re.fullmatch(r"(\d+)([kKmMgG]?)", value.strip())
    if not m:
        return 0
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2).lower()]


def _location_findings(
    path: Path, mount: str, server: dict[str, Any], loc: dict[str, Any], s: Settings, upstreams: dict[str, Any]
) -> list[Finding]:
    out: list[Finding] = []
    where = f"{path}:{loc.get('line')}"
    levels = [loc.get("block", []), server.get("block", [])]
    passes = _values(loc.get("block", []), "proxy_pass")
    if not passes:
        return [Finding(ERROR, where, f"the location for {mount} has no proxy_pass", "proxy_pass http://firstparty;")]
    target = passes[0][0] if passes[0] else ""
    rest = target.split("://", 1)[-1]
    host, slash, uri = rest.partition("/")
    prefix = loc["args"][-1] if loc["args"][0] not in ("~", "~*") else None
    if slash and prefix is not None and "/" + uri != prefix:
        out.append(Finding(ERROR, where,
                           f"proxy_pass {target} replaces {prefix} with /{uri}: {mount}track reaches the proxy as /{uri}track",
                           "proxy_pass http://firstparty; (no path: the request's path is passed as it is)"))
    headers = {args[0].lower(): args[1] if len(args) > 1 else "" for args in _effective(levels, "proxy_set_header")}
    if "host" not in headers:
        out.append(Finding(ERROR, where, f"{mount}: no `proxy_set_header Host $host`: the proxy sees the upstream's name, "
                           "so the cookie domain and analytics.js's settings name the wrong host",
                           "proxy_set_header Host $host;"))
    if "x-forwarded-for" not in headers and "x-real-ip" not in headers:
        out.append(Finding(ERROR, where, f"{mount}: neither X-Forwarded-For nor X-Real-IP is set: every visitor has nginx's IP",
                           "proxy_set_header X-Real-IP $remote_addr; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;"))
    host_header = headers.get("host", "")
    if mount in s.segment.mounts and "$http_host" not in host_header and "x-forwarded-host" not in headers:
        out.append(Finding(WARNING, where, f"{mount}: `Host {host_header or '$host'}` drops a non-default port and no "
                           "X-Forwarded-Host names it: on a site served on :8080, analytics.js's settings send its calls "
                           "to port 80/443 and every one fails",
                           "proxy_set_header X-Forwarded-Host $http_host;"))
    if mount in s.segment.mounts and "x-forwarded-proto" not in headers:
        out.append(Finding(WARNING, where, f"{mount}: no X-Forwarded-Proto: analytics.js's settings say http to a site served over https",
                           "proxy_set_header X-Forwarded-Proto $scheme;"))
    version = _effective(levels, "proxy_http_version")
    if not version or version[0][:1] != ["1.1"] or headers.get("connection", None) != "":
        out.append(Finding(WARNING, where, f"{mount}: no keep-alive to the proxy (a new connection per request)",
                           "proxy_http_version 1.1; proxy_set_header Connection \"\"; and `keepalive 32;` in the upstream block"))
    body = _effective(levels, "client_max_body_size")
    limit = _size(body[0][0]) if body and body[0] else 1024**2
    if limit and limit < s.server.max_body_bytes:
        out.append(Finding(WARNING, where,
                           f"{mount}: client_max_body_size {body[0][0] if body else '1m (the default)'} is below the proxy's "
                           f"{s.server.max_body_bytes} bytes: nginx answers 413 to large batches and replays",
                           f"client_max_body_size {max(1, s.server.max_body_bytes // 1024**2)}m;"))
    name = host.split(":")[0]
    if name and name not in upstreams:
        try:
            ipaddress.ip_address(name)
        except ValueError:
            out.append(Finding(WARNING, where,
                               f"proxy_pass names the host {name!r} directly: nginx resolves it once at start and keeps that IP",
                               "define `upstream firstparty { server ...; keepalive 32; }` and proxy_pass http://firstparty;"))
    elif name in upstreams and not _values(upstreams[name].get("block", []), "keepalive"):
        out.append(Finding(WARNING, f"{path}:{upstreams[name].get('line')}", f"upstream {name} keeps no idle connections",
                           "keepalive 32;"))
    return out
