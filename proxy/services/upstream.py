"""Where a request goes upstream, with which headers, and the call itself.

Header hygiene is an allow-list: only headers named here ever leave for the
vendor, so the browser's ``Cookie``, hop-by-hop headers and anything else a
browser or an intermediary added stay behind. ``Host`` is the upstream's own
(set by the HTTP client). The visitor's IP travels as ``X-Real-IP`` and as the
left-most ``X-Forwarded-For`` entry, as Mixpanel's own proxies send it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import ConfigError, UpstreamError
from ..httpclient import Endpoint, HTTPClient, HTTPClientError, RequestTimeout, Response
from ..settings import REGIONS, UpstreamSettings

# Headers passed through from the client on every route.
_PASS_HEADERS = ("user-agent", "accept", "accept-language", "traceparent", "tracestate")
# Routes whose upstream needs the client's credentials (/import: service
# account or API secret; /record, /flags, /settings: Basic base64(token:)).
AUTH_ROUTES = frozenset({"import", "record", "flags", "settings", "decide", "flags-first-time"})
# Upstream response headers worth returning to the client.
RESPONSE_HEADERS = ("content-type", "retry-after", "cache-control", "etag", "last-modified")


@dataclass(frozen=True, slots=True)
class Upstreams:
    regions: Mapping[str, Endpoint]
    decide: Endpoint
    cdn: Endpoint
    default_region: str
    projects: Mapping[str, str]
    timeout: float

    @classmethod
    def from_settings(cls, settings: UpstreamSettings) -> "Upstreams":
        def parse(key: str, url: str) -> Endpoint:
            try:
                return Endpoint.parse(url)
            except ValueError as exc:
                raise ConfigError(key, str(exc)) from exc

        return cls(
            regions={r: parse(f"upstream.{r}", settings.regions[r]) for r in REGIONS},
            decide=parse("upstream.decide", settings.decide),
            cdn=parse("upstream.cdn", settings.cdn),
            default_region=settings.default_region,
            projects=dict(settings.projects),
            timeout=settings.timeout_seconds,
        )

    def region_for(self, token: str | None) -> str:
        if token:
            return self.projects.get(token, self.default_region)
        return self.default_region


def request_headers(
    incoming: Mapping[str, str],
    route: str,
    client_ip: str | None,
    chain: Sequence[str],
    content_type: str | None,
    content_encoding: str | None = None,
) -> list[tuple[str, str]]:
    """The headers to send upstream for one client request."""
    out = []
    for name in _PASS_HEADERS:
        value = incoming.get(name)
        if value:
            out.append((name, value))
    if route in AUTH_ROUTES:
        auth = incoming.get("authorization")
        if auth:
            out.append(("authorization", auth))
    if content_type:
        out.append(("content-type", content_type))
    if content_encoding:
        out.append(("content-encoding", content_encoding))
    if client_ip:
        out.append(("x-real-ip", client_ip))
        out.append(("x-forwarded-for", ", ".join(chain) if chain else client_ip))
    return out


_RESPONSE_HEADER_SET = frozenset(RESPONSE_HEADERS)


def response_headers(response: Response) -> dict[str, str]:
    # One pass over the upstream's headers (names arrive lower-cased).
    return {name: value for name, value in response.headers if name in _RESPONSE_HEADER_SET}


async def send(
    client: HTTPClient,
    endpoint: Endpoint,
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    timeout: float,
) -> Response:
    """One upstream call; network failures become ``UpstreamError``."""
    try:
        return await client.request(endpoint, method, target, headers, body, timeout=timeout)
    except RequestTimeout as exc:
        raise UpstreamError(f"upstream {endpoint.host_header} timed out") from exc
    except HTTPClientError as exc:
        raise UpstreamError(f"upstream {endpoint.host_header} unreachable: {exc}") from exc
