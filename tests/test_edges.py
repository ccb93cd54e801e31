"""The small pure pieces at the edges: cookie, client IP, CORS."""

from __future__ import annotations

import ipaddress

import pytest

from proxy.core.clientip import client_ip
from proxy.core.cookie import CookieJar, host_matches
from proxy.core.cors import OriginPolicy

JAR = CookieJar(domains=(".example.com", ".brand-b.test"), secret=b"k" * 32)


def test_cookie_seal_and_open():
    value = JAR.seal("abc-12345678")
    assert JAR.open(value) == "abc-12345678"
    ident, _, tag = value.rpartition(".")
    assert JAR.open(f"other-1234567.{tag}") is None  # id swapped, tag kept
    assert JAR.open(f"{ident}.{'A' * len(tag)}") is None  # tag forged
    assert JAR.open(ident) is None and JAR.open("") is None and JAR.open(None) is None
    other = CookieJar(secret=b"z" * 32)
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
    jar = CookieJar(secure=False, max_age_days=30, secret=b"k" * 32)
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


def test_form_pairs_decode_like_parse_qsl():
    from urllib.parse import parse_qsl

    from proxy.core.forms import parse_pairs

    cases = [
        "a=1&&b=2",  # an empty part is skipped, not the end
        "a=b=c",  # only the first '=' splits
        "x+y=1+2",  # '+' is a space in names and values
        "n%20m=%2B%2F%3D",  # base64's escapes
        "v=a+b%2B",  # a raw '+' beside an escape
        "v=%2b%2f%3d",  # lowercase escapes
        "v=%E2%82%AC",  # UTF-8
        "k=&=v&flag",  # blank values and names kept
        "data=eyJh%2BYiI%3D&verbose=1",
    ]
    for text in cases:
        assert parse_pairs(text) == parse_qsl(text, keep_blank_values=True), text


# ------------------------------------------ core edges the mutants showed


def test_identity_cookie_headers_are_exact():
    jar = CookieJar(domains=(".example.com",), secret=b"s" * 32, max_age_days=400)
    sealed = jar.seal("abc-123")
    assert jar.set_cookie_header("abc-123", "shop.example.com") == (
        f"fp_id={sealed}; Domain=.example.com; Path=/; Max-Age=34560000; HttpOnly; SameSite=Lax; Secure"
    )
    assert jar.set_cookie_header("abc-123", "other.test") == (
        f"fp_id={sealed}; Path=/; Max-Age=34560000; HttpOnly; SameSite=Lax; Secure"
    )  # a host outside the configured domains gets a host-only cookie
    assert jar.expire_header("shop.example.com") == "fp_id=; Domain=.example.com; Path=/; Max-Age=0; HttpOnly; SameSite=Lax; Secure"
    assert jar.expire_header("other.test") == "fp_id=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax; Secure"
    plain = CookieJar(secret=b"s" * 32, secure=False)
    assert plain.set_cookie_header("abc-123", "localhost").endswith("; SameSite=Lax")
    assert jar.domain_for("EXAMPLE.com") == ".example.com" and jar.domain_for("notexample.com") is None


def test_identity_cookie_values_open_only_when_authentic():
    from proxy.core.cookie import cookie_values

    jar = CookieJar(secret=b"s" * 32)
    sealed = jar.seal("abc-1234")
    assert jar.seal("abc-1234") == sealed  # memoised, the same value
    assert jar.open(sealed) == "abc-1234"
    assert jar.open('"' + sealed + '"') is None  # quotes are the header parser's job
    assert cookie_values(f'a=1; fp_id="{sealed}"; b=x=y', "fp_id") == [sealed]
    assert cookie_values("b=x=y", "b") == ["x=y"]  # only the first '=' splits
    tag = sealed.rpartition(".")[2]
    assert jar.open("abc-1234." + tag[:-1]) is None and jar.open("abc-1234" + tag) is None
    assert jar.open("bad id!." + tag) is None and jar.open(None) is None and jar.open("") is None
    other = CookieJar(secret=b"t" * 32)
    assert other.open(sealed) is None  # another secret


def test_client_ip_walks_back_past_trusted_proxies_only():
    from proxy.core.clientip import TrustedProxies

    trusted = TrustedProxies([ipaddress.ip_network("10.0.0.0/8")])
    # The left-most hop is the client only when every hop after it is trusted.
    assert client_ip("10.0.0.1", "203.0.113.7, 10.0.0.2", None, trusted) == ("203.0.113.7", ["203.0.113.7", "10.0.0.2", "10.0.0.1"])
    assert client_ip("10.0.0.1", "6.6.6.6, 198.51.100.9", None, trusted) == ("198.51.100.9", ["198.51.100.9", "10.0.0.1"])
    # All trusted: X-Real-IP decides, else the first hop.
    assert client_ip("10.0.0.1", "10.0.0.3", "192.0.2.4", trusted) == ("192.0.2.4", ["192.0.2.4", "10.0.0.3", "10.0.0.1"])
    assert client_ip("10.0.0.1", "10.0.0.3", None, trusted) == ("10.0.0.3", ["10.0.0.3", "10.0.0.1"])
    assert client_ip("10.0.0.1", None, None, trusted) == ("10.0.0.1", ["10.0.0.1"])
    assert client_ip("192.0.2.1", "6.6.6.6", "6.6.6.6", trusted) == ("192.0.2.1", ["192.0.2.1"])  # untrusted peer
    assert "10.9.9.9" in trusted and "10.9.9.9" in trusted and "11.0.0.1" not in trusted and "11.0.0.1" not in trusted
    assert "" not in trusted and "junk" not in trusted
    for i in range(5000):  # the memo is bounded, and answers stay right after it is cleared
        assert (f"10.1.{i // 256}.{i % 256}" in trusted) is True
    assert len(trusted._seen) <= 4096 and "11.0.0.1" not in trusted


def test_refusal_signals_and_the_opt_out_cookie():
    from proxy.core import consent

    both = consent.Signals(dnt=True)
    assert consent.refusal({}, both) is None  # no signal at all: tracked
    assert consent.refusal({"dnt": " 1 "}, both) == "dnt"
    assert consent.refusal({"dnt": "0"}, both) is None
    assert consent.refusal({"dnt": "1"}, consent.Signals()) is None  # DNT ignored by default
    assert consent.refusal({"sec-gpc": "1 "}, consent.Signals()) == "gpc"
    assert consent.refusal({"sec-gpc": "1"}, consent.Signals(gpc=False)) is None
    assert consent.refusal({"cookie": "a=1; fp_optout=yes"}, consent.Signals()) == "opt_out_cookie"
    assert consent.refusal({"cookie": "fp_optout=yes"}, consent.Signals(opt_out_cookie="")) is None
    assert consent.opt_out_cookie_header("fp_optout", ".example.com", True) == (
        "fp_optout=1; Path=/; Max-Age=34560000; SameSite=Lax; Domain=.example.com; Secure"
    )
    assert consent.opt_out_cookie_header("fp_optout", None, False) == "fp_optout=1; Path=/; Max-Age=34560000; SameSite=Lax"


def test_an_sdks_opt_out_cookie_is_read_by_its_own_test_only_when_its_marker_is_there():
    """core knows no SDK's cookies: a protocol hands over its reason, a marker
    and its test, and the test runs only on a Cookie header holding the marker."""
    from proxy.core import consent

    seen: list[str] = []

    def opted_out(header: str) -> bool:
        seen.append(header)
        return "__sdk_out=0" in header

    signals = consent.Signals(sdk_opt_outs=(("sdk_opt_out", "__sdk_", opted_out),), gpc=True)
    assert consent.refusal({"cookie": "a=1; __sdk_out=0"}, signals) == "sdk_opt_out"
    assert consent.refusal({"cookie": "a=1; __sdk_out=1", "sec-gpc": "1"}, signals) == "gpc"
    assert consent.refusal({"cookie": "a=1"}, signals) is None
    assert seen == ["a=1; __sdk_out=0", "a=1; __sdk_out=1"]  # never called without the marker


def test_rewrites_are_recorded_field_by_field():
    from proxy.core.rewrite import Rewrite, rewrite_fields, rewrite_query

    out: list[Rewrite] = []
    query = [("distinct_id", "$device:d1"), ("other", "$device:d1"), ("$device_id", "d1")]
    new = rewrite_query(query, ("distinct_id", "$device_id"), {"d1": "c1"}, out)
    assert new == [("distinct_id", "$device:c1"), ("other", "$device:d1"), ("$device_id", "c1")]
    assert out == [Rewrite("distinct_id", "$device:d1", "$device:c1"), Rewrite("$device_id", "d1", "c1")]
    assert rewrite_query(query, ("distinct_id",), {}, out) is query
    props = {"distinct_id": "$device:d1", "$device_id": "d1", "x": "d1"}
    rewritten: list[Rewrite] = []
    rewrite_fields(props, ("distinct_id", "$device_id"), {"d1": "c1"}, rewritten)
    assert props == {"distinct_id": "$device:c1", "$device_id": "c1", "x": "d1"}
    assert rewritten == [Rewrite("distinct_id", "$device:d1", "$device:c1"), Rewrite("$device_id", "d1", "c1")]


def test_carried_ids_and_server_resolutions():
    from proxy.core.identity import SOURCE_ALIAS, SOURCE_NONE, resolve_browser, resolve_server

    r = resolve_browser("cookie-id", ["d1"], {}, carried=("carried-id", "bridge"))
    assert (r.canonical, r.source, r.mapping) == ("carried-id", "bridge", {"d1": "carried-id"})
    r = resolve_browser("cookie-id", ["d1"], {}, carried=("not valid!", "bridge"))  # never trusted blindly
    assert (r.canonical, r.source) == ("cookie-id", "cookie")
    assert resolve_server({"d1": "c1", "d2": "d2", "d3": ""}).mapping == {"d1": "c1"}
    assert resolve_server({"d1": "c1"}).source == SOURCE_ALIAS and resolve_server({}).source == SOURCE_NONE


# ------------------------------------------------ bridge URL helpers, exactly


def test_linked_domain_and_redirect_targets():
    from proxy.core.bridge import linked_domain, redirect_target
    from proxy.errors import BadRequest

    linked = (".site-a.test", ".site-b.test")
    assert linked_domain("WWW.Site-A.test.", linked) == "site-a.test"
    assert linked_domain("site-b.test", linked) == "site-b.test"
    assert linked_domain("evilsite-b.test", linked) is None
    assert redirect_target("https://checkout.site-b.test:8443/cart?x=1", linked) == (
        "https://checkout.site-b.test:8443/cart?x=1", "site-b.test")
    refused = {
        None: "missing 'to': the URL to send the visitor to",
        "": "missing 'to': the URL to send the visitor to",
        "https://site-b.test/a\\b": "'to' contains characters a URL may not",
        "https://site-b.test/\x01": "'to' contains characters a URL may not",
        "https://site-b.test:99999/": "'to' is not a valid URL",
        "//site-b.test/": "'to' must be an absolute http(s) URL without credentials",
        "javascript:alert(1)": "'to' must be an absolute http(s) URL without credentials",
        "https://site-b.test@evil.test/": "'to' must be an absolute http(s) URL without credentials",
        "https://user@site-b.test/": "'to' must be an absolute http(s) URL without credentials",
        "https://:pw@site-b.test/": "'to' must be an absolute http(s) URL without credentials",
        "https://evil.test/": "'to' is not on a linked domain; add it to identity.linked_domains",
    }
    for url, message in refused.items():
        with pytest.raises(BadRequest) as caught:
            redirect_target(url, linked)
        assert str(caught.value) == message, url
    with pytest.raises(BadRequest, match="^missing 'next'"):
        redirect_target(None, linked, "next")


def test_ascii_url_encodes_what_a_location_header_cannot_carry():
    from proxy.core.bridge import ascii_url
    from proxy.errors import BadRequest

    plain = "https://www.site-b.test/a b?q=1#f"
    assert ascii_url(plain) is plain  # ASCII already: untouched
    assert ascii_url("https://bücher.test:8443/€/ä?q=ü&x=%20y#ß") == (
        "https://xn--bcher-kva.test:8443/%E2%82%AC/%C3%A4?q=%C3%BC&x=%20y#%C3%9F"
    )
    assert ascii_url("http://bücher.test/p") == "http://xn--bcher-kva.test/p"  # no port: none added
    kept = "/:@!$&'()*+,;=%~-._"
    assert ascii_url(f"https://h.test/{kept}é?{kept}?é#{kept}?#é") == (
        f"https://h.test/{kept}%C3%A9?{kept}?%C3%A9#{kept}?#%C3%A9"
    )
    with pytest.raises(BadRequest) as caught:
        ascii_url("https://" + "ü" * 70 + ".test/")
    assert str(caught.value) == "the URL's host is not a valid domain name"


def test_decorate_puts_the_token_first_once():
    from proxy.core.bridge import decorate

    assert decorate("https://b.test/cart?utm=1&fpb=old&&x=2#top", "fpb", "T") == "https://b.test/cart?fpb=T&utm=1&x=2#top"
    assert decorate("https://b.test/", "fpb", "T") == "https://b.test/?fpb=T"
    assert decorate("https://b.test/?fpbx=1", "fpb", "T") == "https://b.test/?fpb=T&fpbx=1"
    assert decorate("https://bü.test/é", "fpb", "T") == "https://xn--b-eha.test/%C3%A9?fpb=T"


def test_strip_param_and_token_in_url():
    from proxy.core.bridge import strip_param, token_in_url

    assert strip_param("https://b.test/p?fpb=T&a=1#h", "fpb") == "https://b.test/p?a=1#h"
    assert strip_param("https://b.test/p?a=1&fpb=T", "fpb") == "https://b.test/p?a=1"
    assert strip_param("https://b.test/p?fpb=T", "fpb") == "https://b.test/p"
    assert strip_param("https://b.test/p?fpb=T#fpb=x", "fpb") == "https://b.test/p#fpb=x"
    assert strip_param("https://b.test/p#fpb=T", "fpb") is None  # only the query counts
    assert strip_param("https://b.test/p?xfpb=T", "fpb") is None
    assert strip_param("https://b.test/p?a=1", "fpb") is None
    assert token_in_url("https://b.test/?a=1&fpb=T#x", "fpb") == "T"
    assert token_in_url("https://b.test/?fpb=", "fpb") is None
    assert token_in_url("https://b.test/#fpb=T", "fpb") is None
    assert token_in_url("https://b.test/?xfpb=T", "fpb") is None
    assert token_in_url(None, "fpb") is None and token_in_url(42, "fpb") is None


def test_every_sealed_cookie_survives_the_cookie_header_whatever_its_last_character():
    from proxy.core.cookie import cookie_values

    jar = CookieJar(secret=b"s" * 32)
    for i in range(100):  # the tag's last character is one of A, Q, g, w (16 bytes in base64url)
        sealed = jar.seal(f"canonical-{i:04d}")
        [value] = cookie_values(f'x=1; fp_id="{sealed}"', "fp_id")
        assert jar.open(value) == f"canonical-{i:04d}"


def test_a_second_question_mark_is_part_of_the_query():
    from proxy.core.bridge import token_in_url

    assert token_in_url("https://b.test/?x=a?fpb=T", "fpb") is None
    assert token_in_url("https://b.test/?fpb=T?x", "fpb") == "T?x"
