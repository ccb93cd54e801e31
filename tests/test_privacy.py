"""Privacy at the edge (issue 25): bots, no IP, URL scrubbing, through the
real app and both protocols, in both delivery modes."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.core.bots import BotList
from proxy.core.scrub import QueryRule
from proxy.errors import ConfigError
from proxy.settings import build_settings
from proxy.web.app import STORE
from tests.conftest import TOKEN, b64_body, cookie_from, device_id, js_event
from tests.support import PLAIN, ajs_call, log_records, metric, run_cli

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
PAGE = {"Origin": "https://www.example.com", "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}

# Real user agents, as the crawlers and monitors send them when they run a page's JavaScript.
CRAWLERS = {
    "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; Googlebot/2.1; +http://www.google.com/bot.html) "
    "Chrome/120.0.6099.216 Safari/537.36": "search-engine",
    "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm) "
    "Chrome/116.0.1938.76 Safari/537.36": "search-engine",
    "Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)": "seo",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/120.0.6099.109 "
    "Safari/537.36": "browser-automation",
    "Mozilla/5.0 (Linux; Android 11; moto g power (2022)) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/114.0.0.0 Mobile Safari/537.36 Chrome-Lighthouse": "monitoring",
    "Mozilla/5.0+(compatible; UptimeRobot/2.0; http://www.uptimerobot.com/)": "monitoring",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/61.0.3163.100 "
    "Safari/537.36 PingdomPageSpeed/1.0 (pingbot/2.0; +http://www.pingdom.com/)": "monitoring",
}
BROWSERS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 "
    "Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    "Mozilla/5.0 (Linux; Android 14; SM-S921B) AppleWebKit/537.36 (KHTML, like Gecko) SamsungBrowser/26.0 "
    "Chrome/122.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148 "
    "Instagram 339.0.3.12.91 (iPhone14,5; iOS 17_5; en_US; en; scale=3.00; 1170x2532; 618023787)",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148 "
    "[FBAN/FBIOS;FBAV/470.0.0.38.109;FBBV/612348954;FBDV/iPhone14,5;FBMD/iPhone;FBSN/iOS;FBSV/17.5;FBSS/3;FBLC/en_US]",
]


def test_the_list_knows_the_crawlers_and_never_the_browsers() -> None:
    bots = BotList()
    assert {ua: bots.kind(ua) for ua in CRAWLERS} == CRAWLERS
    assert [bots.kind(ua) for ua in BROWSERS] == [None] * len(BROWSERS)


async def test_dropped_bots_reach_no_upstream_and_leave_no_identity(proxy_client: Any, upstream: Any, tmp_path: Any) -> None:
    client = await proxy_client(privacy={"bots": "drop"})
    for ua, _ in CRAWLERS.items():
        mp = await client.post("/mp/track/?ip=1", data=b64_body([js_event("Crawled", device_id())]),
                               headers={**PAGE, **FORM, "User-Agent": ua})
        seg = await client.post("/seg/v1/p", data=orjson.dumps(ajs_call("page", device_id())),
                                headers={**PAGE, **PLAIN, "User-Agent": ua})
        for resp in (mp, seg):
            assert resp.status == 200 and cookie_from(resp) is None, (ua, resp.status)
    human = await client.post("/mp/track/?ip=1", data=b64_body([js_event("Human", device_id())]),
                              headers={**PAGE, **FORM, "User-Agent": BROWSERS[0]})
    assert cookie_from(human)
    await upstream.wait(1, "us", "/track")
    text = await (await client.ops_get("/metrics")).text()
    assert metric(text, 'firstparty_bot_events_total{action="dropped",class="monitoring"}') == 6
    assert metric(text, 'firstparty_bot_events_total{action="dropped",class="search-engine"}') == 4
    records = await log_records(client, tmp_path)
    assert [e["event"] for e in upstream.received("us", "/track")] == ["Human"]
    assert upstream.by("seg-us") == []
    reasons = sorted(r["reason"] for r in records if r["outcome"] == "dropped")
    assert reasons == sorted(f"bot: {kind}" for kind in CRAWLERS.values() for _ in ("mp", "seg"))


async def test_flagged_bots_go_on_marked_without_identity(proxy_client: Any, upstream: Any) -> None:
    client = await proxy_client()  # privacy.bots = "flag" by default
    ua = next(iter(CRAWLERS))
    device, anon = device_id(), device_id()
    mp = await client.post("/mp/track/?ip=1", data=b64_body([js_event("Crawled", device)]),
                           headers={**PAGE, **FORM, "User-Agent": ua})
    profile = {"$token": TOKEN, "$distinct_id": f"$device:{device}", "$device_id": device, "$set": {"a": 1}}
    engage = await client.post("/mp/engage/", data=b64_body([profile]), headers={**PAGE, **FORM, "User-Agent": ua})
    seg = await client.post("/seg/v1/p", data=orjson.dumps(ajs_call("page", anon)), headers={**PAGE, **PLAIN, "User-Agent": ua})
    ident = await client.post("/seg/v1/i", data=orjson.dumps(ajs_call("identify", anon, user_id="u-1")),
                              headers={**PAGE, **PLAIN, "User-Agent": ua})
    for resp in (mp, engage, seg, ident):
        assert resp.status == 200 and cookie_from(resp) is None
    [event] = await upstream.wait(1, "us", "/track")
    props = event["properties"]
    assert props["$bot"] == "search-engine"
    assert (props["distinct_id"], props["$device_id"]) == (f"$device:{device}", device)  # its own, never resolved
    [call] = await upstream.wait(1, "seg-us", "/v1/batch")
    assert call["context"]["bot"] == "search-engine" and call["anonymousId"] == anon and call["type"] == "page"
    assert upstream.by("us", "/engage") == []  # a profile of a crawler: nothing but identity, dropped
    assert await client.app[STORE].aliases([device, anon]) == {}  # no identity was made for the crawler


async def test_server_sdks_are_never_screened(proxy_client: Any, upstream: Any) -> None:
    """A backend's request is not a visitor's: python-requests is on the list
    (an http library), and still goes through as it came."""
    client = await proxy_client(privacy={"bots": "drop"})
    device = device_id()
    resp = await client.post("/mp/track/", data=b64_body([js_event("Server", device)]),
                             headers={**FORM, "User-Agent": "python-requests/2.32.3"})
    assert resp.status == 200
    [event] = await upstream.wait(1, "us", "/track")
    assert event["event"] == "Server" and "$bot" not in event["properties"]


async def test_no_ip_leaves_in_any_outbound_place(proxy_client: Any, upstream: Any, delivery_mode: str) -> None:
    client = await proxy_client(privacy={"forward_ip": False}, server={"trusted_proxies": ["127.0.0.1/32"]})
    headers = {**PAGE, **FORM, "User-Agent": BROWSERS[0], "X-Forwarded-For": "203.0.113.77"}
    device = device_id()
    own_ip = js_event("With its own ip", device, ip="198.51.100.9")
    await client.post("/mp/track/?ip=1&verbose=1", data=b64_body([js_event("A", device), own_ip]), headers=headers)
    profile = {"$token": TOKEN, "$distinct_id": f"$device:{device}", "$device_id": device, "$set": {"a": 1},
               "$ip": "198.51.100.9"}
    await client.post("/mp/engage/?ip=1", data=b64_body([profile]), headers=headers)
    await client.post("/seg/v1/t", data=orjson.dumps(ajs_call("track", device_id(), event="S")),
                      headers={**PAGE, **PLAIN, "User-Agent": BROWSERS[0], "X-Forwarded-For": "203.0.113.77"})
    events = await upstream.wait(2, "us", "/track")
    [update] = await upstream.wait(1, "us", "/engage")
    [call] = await upstream.wait(1, "seg-us", "/v1/batch")
    assert all("ip" not in e["properties"] for e in events) and "$ip" not in update
    assert call["context"]["ip"] == "0.0.0.0"
    for rec in upstream.requests:
        assert dict(rec.query).get("ip", "0") == "0" and rec.form().get("ip", "0") == "0", rec
        assert not {"x-forwarded-for", "x-real-ip", "forwarded"} & {h.lower() for h in rec.headers}, rec.headers
        assert b"203.0.113" not in rec.body and b"198.51.100" not in rec.body


async def test_scrubbed_parameters_leave_every_url_field_and_nothing_else(proxy_client: Any, upstream: Any) -> None:
    client = await proxy_client()  # the default list
    url = "https://www.example.com/reset?email=a%40b.test&utm_source=news&reset_token=T0K3N#step-2"
    referrer = "https://mail.example.net/read?q=shoes&code=123456&Password=hunter2"
    device = device_id()
    event = js_event("Reset", device, **{"$current_url": url, "$referrer": referrer, "$initial_referrer": referrer,
                                         "email": "a@b.test", "landing": url})
    await client.post("/mp/track/", data=b64_body([event]), headers={**PAGE, **FORM, "User-Agent": BROWSERS[1]})
    call = ajs_call("page", device_id(), properties={"url": url, "referrer": referrer, "search": "?email=a%40b.test&q=1",
                                                      "title": "Reset"})
    call["context"]["page"] = {"url": url, "referrer": referrer, "search": "?email=a%40b.test&q=1", "path": "/reset"}
    await client.post("/seg/v1/p", data=orjson.dumps(call), headers={**PAGE, **PLAIN, "User-Agent": BROWSERS[1]})
    [got] = await upstream.wait(1, "us", "/track")
    [page] = await upstream.wait(1, "seg-us", "/v1/batch")
    clean_url = "https://www.example.com/reset?utm_source=news#step-2"
    clean_referrer = "https://mail.example.net/read?q=shoes"
    props = got["properties"]
    assert (props["$current_url"], props["$referrer"], props["$initial_referrer"]) == (clean_url, clean_referrer, clean_referrer)
    assert (props["email"], props["landing"]) == ("a@b.test", url)  # not URL fields of the SDK: kept as the site sent them
    for bag in (page["properties"], page["context"]["page"]):
        assert (bag["url"], bag["referrer"], bag["search"]) == (clean_url, clean_referrer, "?q=1")
    text = await (await client.ops_get("/metrics")).text()
    assert metric(text, "firstparty_urls_scrubbed_total") == 3 + 6


async def test_an_allow_list_keeps_only_the_parameters_it_names(proxy_client: Any, upstream: Any) -> None:
    client = await proxy_client(privacy={"keep_query_params": ["utm_*", "q"], "scrub_query_params": []})
    event = js_event("Landed", device_id(), **{"$current_url": "https://www.example.com/?utm_medium=cpc&gclid=abc&q=x&ref=1"})
    await client.post("/mp/track/", data=b64_body([event]), headers={**PAGE, **FORM, "User-Agent": BROWSERS[2]})
    [got] = await upstream.wait(1, "us", "/track")
    assert got["properties"]["$current_url"] == "https://www.example.com/?utm_medium=cpc&q=x"


@pytest.mark.parametrize(
    "rule,url,expected",
    [
        (QueryRule(), "https://a.test/p", None),  # no query: untouched, no scan
        (QueryRule(), "https://a.test/p?x=1&y=2", None),
        (QueryRule(), "https://a.test/p?EMAIL=x", "https://a.test/p"),  # any case
        (QueryRule(), "https://a.test/p?access_token=1&x=2#f", "https://a.test/p?x=2#f"),
        (QueryRule(), "https://a.test/p?x=2&&code=1&", "https://a.test/p?x=2"),
        (QueryRule(), "email=a&q=1", "q=1"),  # a bare query string (a search without its "?")
        (QueryRule(()), "https://a.test/p?email=1", None),  # an empty list removes nothing
        (QueryRule((), ("utm_*",)), "https://a.test/p?utm_source=a&email=1&x", "https://a.test/p?utm_source=a"),
        (QueryRule(), "https://a.test/p?" + "q=1&" * 5000 + "#f", "https://a.test/p"),  # too long to parse: no query
        (QueryRule(), "https://a.test/#/reset?token=T&x=1", "https://a.test/#/reset?x=1"),  # a hash router's query
        (QueryRule(), "https://a.test/?email=e#/p?code=1", "https://a.test/#/p"),
    ],
)
def test_the_query_rule(rule: QueryRule, url: str, expected: str | None) -> None:
    assert rule.clean(url) == expected


def test_a_bad_parameter_glob_names_its_key() -> None:
    with pytest.raises(ConfigError, match="privacy.scrub_query_params"):
        build_settings({"privacy": {"scrub_query_params": ["email", "a b"]}}, {})
    with pytest.raises(ConfigError, match="privacy.bots"):
        build_settings({"privacy": {"bots": "block"}}, {})


def test_check_prints_the_privacy_in_force_and_writes_nothing(tmp_path: Any) -> None:
    data = tmp_path / "data"
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'[server]\ndata_dir = "{data}"\n'
        '[privacy]\nforward_ip = false\nbots = "drop"\nscrub_query_params = ["email"]\nkeep_query_params = ["utm_*"]\n'
        '[consent]\nhonor_dnt = true\nmode = "anonymise"\n'
    )
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("privacy: ")]
    assert lines[0] == "privacy: visitor IP to the vendors: none (ip=0, no ip/$ip, Segment context.ip 0.0.0.0, no forwarding headers)"
    assert "query parameters removed: email; only these kept: utm_*" in lines[1]
    assert lines[2].endswith("(privacy.bots = 'drop'): dropped")
    assert "DNT" in lines[3] and lines[3].endswith(": anonymise)")
    assert not data.exists()  # check only reads: no secret, no keys made


async def test_crawlers_get_no_token_id_or_cookie_from_the_cross_domain_endpoints(proxy_client: Any) -> None:
    """A crawler that follows a ``/mp/go`` link reaches the target, without a
    token; ``/mp/id``, ``/mp/bridge`` and the hub give it no id and no cookie."""
    from urllib.parse import quote

    client = await proxy_client(
        cookie={"domains": [".example.com", ".site-b.test"]},
        identity={"linked_domains": [".example.com", ".site-b.test"], "hub_url": "https://hub.id-hub.test"},
    )
    bot = {**PAGE, "User-Agent": next(iter(CRAWLERS))}
    target = "https://www.site-b.test/landing?utm_source=x"
    go = await client.get(f"/mp/go?to={quote(target, safe='')}", headers=bot, allow_redirects=False)
    assert go.status == 302 and go.headers["Location"] == target and cookie_from(go) is None
    ident = await client.post("/mp/id", data="fpb=whatever", headers={**bot, **FORM})
    assert await ident.json() == {"id": None, "source": "bot", "token": "refused"} and cookie_from(ident) is None
    bridge = await client.post("/mp/bridge", json={"to": target}, headers=bot)
    assert (await bridge.json())["token"] is None and cookie_from(bridge) is None
    hub = await client.get(f"/hub/resolve?return={quote('https://www.example.com/a', safe='')}",
                           headers={**bot, "Host": "hub.id-hub.test"}, allow_redirects=False)
    assert hub.status == 302 and hub.headers["Location"] == "https://www.example.com/a" and "Set-Cookie" not in hub.headers
    human = await client.get(f"/mp/go?to={quote(target, safe='')}", headers={**PAGE, "User-Agent": BROWSERS[0]},
                             allow_redirects=False)
    assert "fpb=" in human.headers["Location"] and cookie_from(human)
    text = await (await client.ops_get("/metrics")).text()
    assert metric(text, 'firstparty_identity_tokens_total{result="bot"}') == 4


async def test_the_query_routes_keep_the_privacy_rules(proxy_client: Any, upstream: Any) -> None:
    """/decide, /flags and /record: no forwarding headers with forward_ip off,
    no identity or cookie for a crawler (its session replay dropped), and
    the page URLs session replay names in its query scrubbed."""
    client = await proxy_client(privacy={"forward_ip": False, "bots": "drop"}, server={"trusted_proxies": ["127.0.0.1/32"]})
    d = device_id()
    human = {**PAGE, "User-Agent": BROWSERS[0], "X-Forwarded-For": "203.0.113.77"}
    url = "https%3A%2F%2Fwww.example.com%2Freset%3Femail%3Da%2540b.test%26q%3D1"
    answers = [
        await client.get(f"/mp-decide/decide?verbose=1&token={TOKEN}&distinct_id=%24device%3A{d}", headers=human),
        await client.get(f"/mp/flags/?token={TOKEN}&context=%7B%22distinct_id%22%3A%22%24device%3A{d}%22%7D", headers=human),
        await client.post(f"/mp/record/?format=gzip&replay_id=r1&seq=0&token={TOKEN}&distinct_id=%24device%3A{d}"
                          f"&%24current_url={url}&replay_start_url={url}", data=b"\x1f\x8b", headers=human),
    ]
    assert [a.status for a in answers] == [200, 200, 200]
    for rec in upstream.requests:
        assert not {"x-forwarded-for", "x-real-ip", "forwarded"} & {h.lower() for h in rec.headers}, rec
    record = dict(upstream.by("us", "/record")[-1].query)
    assert record["$current_url"] == record["replay_start_url"] == "https://www.example.com/reset?q=1"

    crawler = {**PAGE, "User-Agent": next(iter(CRAWLERS))}
    before = len(upstream.by("us", "/record"))
    decide = await client.get(f"/mp-decide/decide?verbose=1&token={TOKEN}&distinct_id=%24device%3A{d}", headers=crawler)
    replay = await client.post(f"/mp/record/?format=gzip&replay_id=r2&seq=0&token={TOKEN}", data=b"\x1f\x8b", headers=crawler)
    assert decide.status == replay.status == 200
    assert cookie_from(decide) is None and cookie_from(replay) is None
    assert dict(upstream.by("decide", "/decide")[-1].query)["distinct_id"] == f"$device:{d}"  # as it came
    assert len(upstream.by("us", "/record")) == before  # a crawler's replay: dropped


async def test_a_page_views_search_is_scrubbed_as_a_url(proxy_client: Any, upstream: Any) -> None:
    """track_pageview's ``current_url_search`` is a query string on its own."""
    client = await proxy_client()
    event = js_event("$mp_web_page_view", device_id(), current_url_search="?email=a%40b.test&utm_source=x")
    await client.post("/mp/track/", data=b64_body([event]), headers={**PAGE, **FORM, "User-Agent": BROWSERS[0]})
    [got] = await upstream.wait(1, "us", "/track")
    assert got["properties"]["current_url_search"] == "?utm_source=x"


def test_the_query_rule_remembers_only_short_names() -> None:
    rule = QueryRule()
    long_name = "n" * 100
    assert rule.clean(f"https://a.test/?{long_name}=1&email=2") == f"https://a.test/?{long_name}=1"
    assert long_name not in rule._seen and "email" in rule._seen  # noqa: SLF001 - the memo's bound


def test_a_route_alias_cannot_take_a_cross_domain_endpoint() -> None:
    with pytest.raises(ConfigError, match="server.route_aliases.id"):
        build_settings({"server": {"route_aliases": {"id": "track"}}}, {})
