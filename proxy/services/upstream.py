"""The vendors' side: where a request goes, with which headers, and the one
``aiohttp.ClientSession`` that carries every call.

Header hygiene is an allow-list: only headers named here ever leave for the
vendor, so the browser's ``Cookie``, hop-by-hop headers and anything else a
browser or an intermediary added stay behind. ``Host`` is the upstream's own
(set by aiohttp from the URL). The visitor's IP travels as ``X-Real-IP`` and
as the left-most ``X-Forwarded-For`` entry, as Mixpanel's own proxies send it.

Invariants:
- one session per process (``UpstreamClient.open``), never one per request:
  its connector pools keep-alive connections per host, caches DNS answers
  and tries addresses Happy-Eyeballs style;
- TLS is verified against the system store, plus ``upstream.ca_file`` when
  set; there is no switch to turn verification off;
- ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` are honoured, for deployments
  behind a mandatory egress proxy: read once at start-up (``settings``) and
  decided once per endpoint (the endpoints are fixed), not per request as
  aiohttp's ``trust_env`` does (which also reads ``~/.netrc`` in a thread
  each time: half the CPU of a forwarded request);
- the session keeps no cookies: what one visitor's answer set must never
  travel with another visitor's request;
- compressed answers are decoded before they are returned, so a body is
  never relayed under a ``Content-Encoding`` it no longer has;
- POSTs are never resent by the client on a broken keep-alive connection
  (aiohttp retries only idempotent methods): a retry is the sender's
  decision, with ``$insert_id`` to de-duplicate;
- every failure is an ``UpstreamError`` (timeout, unreachable, TLS).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from ..errors import ConfigError, UpstreamTimeout, UpstreamTLSError, UpstreamUnreachable
from ..settings import REGIONS, SEGMENT_REGIONS, SegmentSettings, UpstreamSettings

# Headers passed through from the client on every route.
_PASS_HEADERS = ("user-agent", "accept", "accept-language", "traceparent", "tracestate")
# Routes whose upstream needs the client's credentials (/import: service
# account or API secret; /record, /flags, /settings: Basic base64(token:)).
AUTH_ROUTES = frozenset({"import", "record", "flags", "settings", "decide", "flags-first-time"})
# Upstream response headers worth returning to the client.
RESPONSE_HEADERS = ("content-type", "retry-after", "cache-control", "etag", "last-modified")
_RESPONSE_HEADER_SET = frozenset(RESPONSE_HEADERS)
_DEFAULT_PORTS = {"http": 80, "https": 443}
# DNS answers are kept this long: the vendors' hosts move rarely, and a lookup
# per new connection is latency every batch would pay.
DNS_CACHE_SECONDS = 60
# Idle pooled connections close after this; the vendors' load balancers keep
# them longer, so we close first and never send on one they closed.
KEEPALIVE_SECONDS = 30.0
# An upstream answer larger than this is refused (a vendor answers bytes, the
# library script is ~100 kB).
MAX_ANSWER_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An upstream base URL, parsed and checked once at start-up."""

    scheme: str
    host: str
    port: int
    base_path: str
    host_header: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """Parse ``http://host[:port][/base]`` or ``https://...``.

        Raises ValueError for anything else, including credentials, query
        strings and fragments (they have no meaning for a base URL)."""
        if not isinstance(url, str) or not url:
            raise ValueError(f"upstream URL must be a non-empty string, got {url!r}")
        if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
            raise ValueError(f"upstream URL {url!r} contains whitespace or control characters")
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise ValueError(f"upstream URL {url!r} must be an absolute http:// or https:// URL")
        if not parts.netloc:
            raise ValueError(f"upstream URL {url!r} has no host")
        if parts.username is not None or parts.password is not None:
            raise ValueError(f"upstream URL {url!r} must not contain credentials")
        if parts.query or parts.fragment or url.endswith(("?", "#")):
            raise ValueError(f"upstream URL {url!r} must not contain a query or fragment")
        host = parts.hostname  # lower-cased, IPv6 brackets stripped
        if not host:
            raise ValueError(f"upstream URL {url!r} has no host")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"upstream URL {url!r} has an invalid port") from None
        if port == 0:
            raise ValueError(f"upstream URL {url!r} has an invalid port")
        if not host.isascii():
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError:
                raise ValueError(f"upstream URL {url!r} has an invalid host name") from None
        default_port = _DEFAULT_PORTS[scheme]
        if port is None:
            port = default_port
        header_host = f"[{host}]" if ":" in host else host
        host_header = header_host if port == default_port else f"{header_host}:{port}"
        return cls(scheme, host, port, parts.path.rstrip("/"), host_header)

    @property
    def origin(self) -> str:
        """``scheme://host[:port][/base]``, as configured (normalised)."""
        return f"{self.scheme}://{self.host_header}{self.base_path}"

    def url(self, target: str) -> URL:
        """The absolute URL of ``target`` (an already-encoded path and query)."""
        return URL(f"{self.scheme}://{self.host_header}{self.base_path}{target}", encoded=True)


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    """A complete upstream answer, its body decoded (no Content-Encoding left)."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name, default)


def tls_context(ca_file: str = "") -> ssl.SSLContext:
    """The system's trust store, plus a private CA when ``upstream.ca_file`` names one."""
    context = ssl.create_default_context()
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("upstream.ca_file", f"cannot load {ca_file!r}: {exc}") from exc
    return context


class UpstreamClient:
    """The process's one HTTP client, for every upstream (Mixpanel regions,
    decide, the CDN). Open it in the app's ``cleanup_ctx``; close it last."""

    def __init__(
        self,
        *,
        max_connections_per_host: int,
        timeout: float,
        ca_file: str = "",
        proxies: Mapping[str, str] | None = None,
        no_proxy: str = "",
    ) -> None:
        self._proxies = {k: v for k, v in (proxies or {}).items() if v}
        self._no_proxy = no_proxy
        self._proxy_for: dict[Endpoint, URL | None] = {}
        self._limit = max_connections_per_host
        self._timeout = timeout
        self._ssl = tls_context(ca_file)
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0,  # the per-host limit below is the one that matters
            limit_per_host=self._limit,
            ttl_dns_cache=DNS_CACHE_SECONDS,
            keepalive_timeout=KEEPALIVE_SECONDS,
            ssl=self._ssl,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            trust_env=False,  # the environment's proxy is applied per endpoint (proxy_for)
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=True,
            timeout=self._timeout_for(self._timeout),
            # No "Python/3.x aiohttp/..." User-Agent of our own: the SDK's passes through.
            skip_auto_headers=("User-Agent",),
            raise_for_status=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def proxy_for(self, endpoint: Endpoint) -> URL | None:
        """The egress proxy for ``endpoint`` (``NO_PROXY`` honoured), decided once."""
        try:
            return self._proxy_for[endpoint]
        except KeyError:
            pass
        proxy = self._proxies.get(endpoint.scheme)
        if proxy and self._no_proxy:
            # urllib's reading of NO_PROXY: host suffixes, "*", ports.
            from urllib.request import proxy_bypass_environment  # type: ignore[attr-defined]  # (not in typeshed)

            if proxy_bypass_environment(endpoint.host_header, {"no": self._no_proxy}):
                proxy = None
        url = self._proxy_for[endpoint] = URL(proxy) if proxy else None
        return url

    def _timeout_for(self, seconds: float) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get(seconds)
        if timeout is None:
            timeout = self._timeouts[seconds] = aiohttp.ClientTimeout(total=seconds)
        return timeout

    async def request(
        self,
        endpoint: Endpoint,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        body: bytes | AsyncIterable[bytes] | aiohttp.StreamReader | None = b"",
        *,
        timeout: float | None = None,
        follow_redirects: bool = False,
    ) -> UpstreamResponse:
        """One call; every failure becomes an ``UpstreamError``."""
        session = self._session
        if session is None:
            raise UpstreamUnreachable("the upstream client is closed")
        where = endpoint.host_header
        try:
            async with session.request(
                method,
                endpoint.url(target),
                headers=headers,
                data=body if body else None,
                timeout=self._timeout_for(timeout or self._timeout),
                allow_redirects=follow_redirects,
                proxy=self.proxy_for(endpoint),
            ) as response:
                if (response.content_length or 0) > MAX_ANSWER_BYTES:
                    raise UpstreamUnreachable(f"upstream {where} answered more than {MAX_ANSWER_BYTES} bytes")
                data = await response.read()
                return UpstreamResponse(response.status, response.headers, data)
        except TimeoutError as exc:
            raise UpstreamTimeout(f"upstream {where} timed out") from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            raise UpstreamTLSError(f"upstream {where}: certificate not trusted ({exc.certificate_error})") from exc
        except aiohttp.ClientSSLError as exc:
            raise UpstreamTLSError(f"upstream {where}: TLS failed ({exc})") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnreachable(f"upstream {where} unreachable: {type(exc).__name__}: {exc}") from exc


def _endpoint(key: str, url: str) -> Endpoint:
    """A configured URL parsed, or a start-up error naming its key."""
    try:
        return Endpoint.parse(url)
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from exc


@dataclass(frozen=True, slots=True)
class Upstreams:
    """Which endpoint serves which region, project and purpose."""

    regions: Mapping[str, Endpoint]
    decide: Endpoint
    cdn: Endpoint
    default_region: str
    projects: Mapping[str, str]
    timeout: float

    @classmethod
    def from_settings(cls, settings: UpstreamSettings) -> Upstreams:
        return cls(
            regions={r: _endpoint(f"upstream.{r}", settings.regions[r]) for r in REGIONS},
            decide=_endpoint("upstream.decide", settings.decide),
            cdn=_endpoint("upstream.cdn", settings.cdn),
            default_region=settings.default_region,
            projects=dict(settings.projects),
            timeout=settings.timeout_seconds,
        )

    def region_for(self, token: str | None) -> str:
        if token:
            return self.projects.get(token, self.default_region)
        return self.default_region


SEGMENT_PREFIX = "segment-"  # Segment's regions in the spool and the sender: "segment-us", "segment-eu"


@dataclass(frozen=True, slots=True)
class SegmentUpstreams:
    """Segment's endpoints by region, and which write key goes where."""

    regions: Mapping[str, Endpoint]  # "segment-us" -> Endpoint
    cdn: Endpoint
    default_region: str
    write_keys: Mapping[str, str]

    @classmethod
    def from_settings(cls, settings: SegmentSettings) -> SegmentUpstreams:
        return cls(
            regions={SEGMENT_PREFIX + r: _endpoint(f"segment.{r}", getattr(settings, r)) for r in SEGMENT_REGIONS},
            cdn=_endpoint("segment.cdn", settings.cdn),
            default_region=SEGMENT_PREFIX + settings.default_region,
            write_keys={k: SEGMENT_PREFIX + r for k, r in settings.write_keys.items()},
        )

    def region_for(self, write_key: str | None) -> str:
        if write_key:
            return self.write_keys.get(write_key, self.default_region)
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


def response_headers(response: UpstreamResponse) -> dict[str, str]:
    """The upstream's headers worth relaying to the SDK (never Content-Encoding:
    the body was decoded, nor Set-Cookie: the vendor's cookies are not ours)."""
    return {name: value for name, value in response.headers.items() if name.lower() in _RESPONSE_HEADER_SET}
