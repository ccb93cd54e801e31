"""Which IP the visitor has, for the vendor's geolocation.

Pure. ``X-Forwarded-For`` and ``X-Real-IP`` are believed only when the TCP
peer is a configured trusted proxy; then the client is the right-most
forwarded address that is not itself a trusted proxy (the left-most entries
are whatever the browser chose to send and prove nothing).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from functools import lru_cache

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=4096)
def _parse(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    value = value.strip()
    if value.startswith("[") and "]" in value:  # "[::1]:443"
        value = value[1 : value.index("]")]
    elif value.count(":") == 1:  # "1.2.3.4:5678"
        value = value.split(":", 1)[0]
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return addr.ipv4_mapped
    return addr


class TrustedProxies:
    """The configured trusted networks, with a bounded memo of verdicts per
    address: a proxy sees the same few peers (nginx) on every request."""

    __slots__ = ("networks", "_seen")

    def __init__(self, networks: Sequence[IPNetwork]) -> None:
        self.networks = tuple(networks)
        self._seen: dict[str, bool] = {}

    def __contains__(self, addr: str | None) -> bool:
        if not addr:
            return False
        verdict = self._seen.get(addr)
        if verdict is None:
            ip = _parse(addr)
            verdict = ip is not None and any(ip in net for net in self.networks)
            if len(self._seen) >= 4096:
                self._seen.clear()
            self._seen[addr] = verdict
        return verdict


def client_ip(
    peer: str | None,
    forwarded_for: str | None,
    real_ip: str | None,
    trusted: TrustedProxies | Sequence[IPNetwork],
) -> tuple[str | None, list[str]]:
    """(client IP, the believed forwarding chain from the client to us, peer last)."""
    if not peer:
        return None, []
    if not isinstance(trusted, TrustedProxies):
        trusted = TrustedProxies(trusted)
    if peer not in trusted:
        return peer, [peer]
    hops = [h.strip() for h in forwarded_for.split(",")] if forwarded_for else []
    hops = [str(ip) for ip in map(_parse, hops) if ip is not None]
    chain = hops + [peer]
    # Walk from our side back towards the client past trusted proxies.
    for i in range(len(chain) - 1, -1, -1):
        if chain[i] not in trusted:
            return chain[i], chain[i:]
    # Every hop is a trusted proxy: X-Real-IP, set by the proxy in front, decides.
    if real_ip and _parse(real_ip) is not None:
        real = str(_parse(real_ip))
        return real, [real, *chain]
    return chain[0], chain


@lru_cache(maxsize=4096)
def truncate(ip: str, v4_prefix: int, v6_prefix: int) -> str:
    """``ip`` cut to its network of ``v4_prefix``/``v6_prefix`` leading bits
    (``203.0.113.77``, 24 -> ``203.0.113.0``); not an IP: unchanged."""
    addr = _parse(ip)
    if addr is None:
        return ip
    prefix = v4_prefix if addr.version == 4 else v6_prefix
    if prefix >= addr.max_prefixlen:
        return str(addr)
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False).network_address)
