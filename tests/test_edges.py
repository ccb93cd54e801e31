"""The small pure pieces at the edges: cookie, client IP, CORS."""

from __future__ import annotations

import ipaddress

import pytest

from proxy.core.clientip import client_ip
from proxy.core.cookie import CookieJar, host_matches
from proxy.core.cors import OriginPolicy
from proxy.settings import CookieSettings

JAR = CookieJar(CookieSettings(domains=(".example.com", ".brand-b.test"), secret=b"k" * 32))


def test_cookie_seal_and_open():
    value = JAR.seal("abc-12345678")
    assert JAR.open(value) == "abc-12345678"
    ident, _, tag = value.rpartition(".")
    assert JAR.open(f"other-1234567.{tag}") is None  # id swapped, tag kept
    assert JAR.open(f"{ident}.{'A' * len(tag)}") is None  # tag forged
    assert JAR.open(ident) is None and JAR.open("") is None and JAR.open(None) is None
    other = CookieJar(CookieSettings(secret=b"z" * 32))
    assert other.open(value) is None  # another secret


@pytest.mark.parametrize(
    "host,domain",
    [
        ("www.example.com", ".example.com"),
        ("example.com", ".example.com"),
        ("checkout.brand-b.test", ".brand-b.test"),
        ("evil-example.com", None),
        ("example.com.evil.test", None),
        ("localhost", None),
    ],
)
def test_cookie_domain_by_host(host, domain):
    header = JAR.set_cookie_header("abc-12345678", host)
    attrs = [a.strip() for a in header.split(";")]
    assert attrs[0].startswith("fp_id=abc-12345678.")
    assert "HttpOnly" in attrs and "SameSite=Lax" in attrs and "Secure" in attrs and "Path=/" in attrs
    assert f"Max-Age={400 * 86400}" in attrs
    domains = [a for a in attrs if a.startswith("Domain=")]
    assert domains == ([f"Domain={domain}"] if domain else [])


def test_cookie_secure_off_for_local_http():
    jar = CookieJar(CookieSettings(secure=False, max_age_days=30, secret=b"k" * 32))
    header = jar.set_cookie_header("abc-12345678", "localhost")
    assert "Secure" not in header and "Max-Age=2592000" in header


def test_host_matches():
    assert host_matches("a.b.example.com", ".example.com")
    assert not host_matches("notexample.com", ".example.com")


TRUSTED = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"))


@pytest.mark.parametrize(
    "peer,xff,real,expected",
    [
        ("203.0.113.9", "1.1.1.1", "2.2.2.2", ("203.0.113.9", ["203.0.113.9"])),  # untrusted peer: headers ignored
        ("127.0.0.1", "198.51.100.7", "198.51.100.7", ("198.51.100.7", ["198.51.100.7", "127.0.0.1"])),
        # spoofed left-most entry: the right-most untrusted hop wins
        ("127.0.0.1", "6.6.6.6, 198.51.100.7, 10.1.1.1", None, ("198.51.100.7", ["198.51.100.7", "10.1.1.1", "127.0.0.1"])),
        ("127.0.0.1", None, "198.51.100.7", ("198.51.100.7", ["198.51.100.7", "127.0.0.1"])),
        ("127.0.0.1", None, None, ("127.0.0.1", ["127.0.0.1"])),
        ("127.0.0.1", "garbage, 198.51.100.7", None, ("198.51.100.7", ["198.51.100.7", "127.0.0.1"])),
        ("::ffff:127.0.0.1", "2001:db8::1", None, ("2001:db8::1", ["2001:db8::1", "::ffff:127.0.0.1"])),
    ],
)
def test_client_ip(peer, xff, real, expected):
    assert client_ip(peer, xff, real, TRUSTED) == expected


def test_cors_policy():
    policy = OriginPolicy(["https://www.example.com", "*.brand-b.test", "http://*.site.test"])
    assert policy.allows("https://www.example.com")
    assert not policy.allows("http://www.example.com")
    assert policy.allows("https://checkout.brand-b.test")
    assert not policy.allows("https://brand-b.test.evil.com")
    assert not policy.allows("https://evilbrand-b.test")  # a suffix match is on a label boundary
    assert not policy.allows("https://brand-b.test")  # *.brand-b.test: subdomains only
    assert not policy.allows("https://.brand-b.test")
    assert not policy.allows("http://checkout.brand-b.test")  # pattern without scheme: https only
    assert policy.allows("http://www.site.test:8080")
    assert policy.allows("http://WWW.Site.Test:8080")  # origins compare case-insensitively
    assert not policy.allows("http://www.site.test:8080:1")
    assert not policy.allows("http://www.site.test.evil:80")
    assert not policy.allows("checkout.brand-b.test")  # no scheme: not an origin
    assert not policy.allows("https://www.example.com.evil.test")
    assert not policy.allows("null") and not policy.allows(None) and not policy.allows("")
    assert not OriginPolicy(["https://www.example.com"]).allows("https://shop.example.com")
    assert policy.headers(None) == {} and policy.headers("") == {}


def test_cors_answers_echo_the_origin_and_vary_on_it():
    policy = OriginPolicy(["https://www.example.com", "*.brand-b.test"])
    # Vary: Origin on every answer, allowed or not, so a shared cache never hands
    # one origin's CORS headers to another.
    assert policy.headers("https://www.example.com") == {
        "Access-Control-Allow-Origin": "https://www.example.com",
        "Access-Control-Allow-Credentials": "true",
        "Vary": "Origin",
    }
    assert policy.headers("https://evil.test") == {"Vary": "Origin"}
    assert policy.headers("https://evil.test") == {"Vary": "Origin"}  # memoised, same answer
    for i in range(1100):  # the memo is bounded and stays right after it is cleared
        policy.headers(f"https://s{i}.brand-b.test")
    assert len(policy._answers) <= 1024
    assert policy.headers("https://s5.brand-b.test")["Access-Control-Allow-Origin"] == "https://s5.brand-b.test"
    assert policy.preflight_headers("https://checkout.brand-b.test") == {
        "Access-Control-Allow-Origin": "https://checkout.brand-b.test",
        "Access-Control-Allow-Credentials": "true",
        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Allow-Headers": "Authorization, traceparent, tracestate, Content-Type",
        "Access-Control-Max-Age": "86400",
        "Vary": "Origin",
    }
    assert policy.preflight_headers("https://evil.test") is None
    assert policy.preflight_headers(None) is None
