"""Consent: opt-out cookies, Global Privacy Control and DNT drop a browser's
events before anything about its identity is used; the refusal follows the
visitor across domains inside bridge tokens. Both delivery modes."""

from __future__ import annotations

import time
from urllib.parse import parse_qsl, quote, urlsplit

import orjson
import pytest

from proxy.core import consent
from proxy.pipeline.context import consent_signals
from proxy.settings import ConsentSettings
from tests.support import log_records, metric
from tests.conftest import BROWSER, TOKEN, b64_body, canonical_of, cookie_from, device_id, js_event

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
TRACK = "/mp/track/?verbose=1&ip=1"
A = "www.site-a.test"
B = "checkout.site-b.test"
LINKED = {
    "cookie": {"domains": [".site-a.test", ".site-b.test"], "secure": False},
    "identity": {"linked_domains": [".site-a.test", ".site-b.test"]},
}


@pytest.mark.parametrize(
    "headers, settings, expected",
    [
        ({}, {}, None),
        ({"cookie": "fp_optout=1"}, {}, "opt_out_cookie"),
        ({"cookie": "a=b; fp_optout=denied"}, {}, "opt_out_cookie"),
        ({"cookie": "fp_optout=0"}, {}, None),  # "0" is no refusal for the site's own cookie
        ({"cookie": "fp_optout=1"}, {"opt_out_cookie": ""}, None),
        ({"cookie": "fp_optout_other=1"}, {}, None),
        ({"cookie": f"__mp_opt_in_out_{TOKEN}=0"}, {}, "mixpanel_opt_out"),
        ({"cookie": f"__mp_opt_in_out_{TOKEN}=1"}, {}, None),
        ({"cookie": f"__mp_opt_in_out_{TOKEN}=0"}, {"honor_mixpanel_opt_out": False}, None),
        ({"sec-gpc": "1"}, {}, "gpc"),
        ({"sec-gpc": "1"}, {"honor_gpc": False}, None),
        ({"sec-gpc": "0"}, {}, None),
        ({"dnt": "1"}, {}, None),  # not honoured by default
        ({"dnt": "1"}, {"honor_dnt": True}, "dnt"),
    ],
)
def test_refusal_signals(headers, settings, expected):
    signals = consent_signals(ConsentSettings(**settings))
    assert consent.refusal(headers, signals) == expected
    assert consent.state(headers, signals) == (consent.DENIED if expected else consent.GRANTED)


def browser(host: str = "www.example.com", **extra: str) -> dict[str, str]:
    return {**BROWSER, **FORM, "Host": host, **extra}


@pytest.mark.parametrize(
    "signal, reason",
    [
        ({"Sec-GPC": "1"}, "gpc"),
        ({"Cookie": "fp_optout=1"}, "opt_out_cookie"),
        ({"Cookie": f"__mp_opt_in_out_{TOKEN}=0"}, "mixpanel_opt_out"),
    ],
)
async def test_refused_events_are_dropped_logged_and_counted(proxy_client, upstream, tmp_path, signal, reason):
    client = await proxy_client()
    # A visitor with an identity cookie from before the refusal.
    first = await client.post(TRACK, data=b64_body([js_event("Before", device_id())]), headers=browser())
    cookie = cookie_from(first)
    await upstream.wait(1)

    device = device_id()
    headers = browser(**signal)
    headers["Cookie"] = f"fp_id={cookie}" + (f"; {signal['Cookie']}" if "Cookie" in signal else "")
    resp = await client.post(TRACK, data=b64_body([js_event("Page View", device), js_event("Click", device)]),
                             headers=headers)
    # The SDK is told "accepted", so it does not retry; the identity cookie is deleted.
    assert resp.status == 200 and (await resp.json()) == {"status": 1, "error": None}
    set_cookies = resp.headers.getall("Set-Cookie")
    assert len(set_cookies) == 1 and set_cookies[0].startswith("fp_id=;") and "Max-Age=0" in set_cookies[0]
    engage = await client.post("/mp/engage/?verbose=1", headers=headers,
                               data=b64_body([{"$token": TOKEN, "$distinct_id": device, "$set": {"a": 1}}]))
    assert engage.status == 200

    text = await (await client.ops_get("/metrics")).text()
    assert metric(text, f'firstparty_consent_dropped_total{{reason="{reason}"}}') == 3
    # A visitor who did not refuse, after them: once that event is through, a
    # refused one that had been queued would be too.
    await client.post(TRACK, data=b64_body([js_event("Marker", device_id())]), headers=browser())
    await upstream.wait(2, "us", "/track")
    assert [e["event"] for e in upstream.received("us", "/track")] == ["Before", "Marker"]  # nothing refused
    assert upstream.received("us", "/engage") == []
    records = await log_records(client, tmp_path)
    dropped = [r for r in records if r["outcome"] == "dropped"]
    assert [(r["route"], r["count"], r["reason"]) for r in dropped] == [
        ("track", 2, f"consent: {reason}"),
        ("engage", 1, f"consent: {reason}"),
    ]
    assert dropped[0]["events"] == ["Page View", "Click"]
    raw = orjson.dumps(dropped)
    assert device.encode() not in raw and canonical_of(cookie).encode() not in raw  # no ids of who refused


async def test_server_sdks_and_unrefused_browsers_are_not_affected(proxy_client, upstream):
    client = await proxy_client(consent={"honor_gpc": False})
    resp = await client.post(TRACK, data=b64_body([js_event("GPC off", device_id())]), headers=browser(**{"Sec-GPC": "1"}))
    assert resp.status == 200 and "fp_id=" in resp.headers["Set-Cookie"]
    # mixpanel-python: no browser signals, never checked (even with an opt-out cookie header on the request).
    server = await client.post("/mp/track", data="data=" + quote(orjson.dumps(js_event("Server", device_id())).decode()),
                               headers={**FORM, "User-Agent": "mixpanel-python/5.4", "Cookie": "fp_optout=1"})
    assert server.status == 200
    events = await upstream.wait(2, "us", "/track")
    assert sorted(e["event"] for e in events) == ["GPC off", "Server"]


async def test_the_refusal_follows_the_visitor_to_another_domain(proxy_client, upstream, tmp_path):
    client = await proxy_client(**LINKED)
    # On A the visitor opted out (the site's banner set fp_optout); they follow /mp/go to B.
    target = f"http://{B}/cart"
    go = await client.get(f"/mp/go?to={quote(target, safe='')}", allow_redirects=False,
                          headers=browser(A, Cookie="fp_optout=1"))
    assert go.status == 302 and "Set-Cookie" not in go.headers  # no identity for someone who refused
    location = go.headers["Location"]
    token = dict(parse_qsl(urlsplit(location).query))["fpb"]
    claims = client.services.settings.identity.keys.open(token, purpose="bridge", audience="site-b.test", now=time.time())
    assert claims.consent == consent.DENIED

    # On B there is no opt-out cookie yet; the landing event carries the token in $current_url.
    landing = js_event("Page B", device_id(), **{"$current_url": location})
    resp = await client.post(TRACK, data=b64_body([landing]), headers=browser(B))
    assert resp.status == 200
    [opt_out] = resp.headers.getall("Set-Cookie")
    assert opt_out.startswith("fp_optout=1;") and "Domain=.site-b.test" in opt_out and "HttpOnly" not in opt_out
    # Later visits on B carry that cookie and stay refused.
    later = await client.post(TRACK, data=b64_body([js_event("Later", device_id())]),
                              headers=browser(B, Cookie="fp_optout=1"))
    assert later.status == 200
    await client.post(TRACK, data=b64_body([js_event("Marker", device_id())]), headers=browser(B))
    await upstream.wait(1, "us", "/track")  # the marker, sent after: the refused ones would be ahead of it
    assert [e["event"] for e in upstream.received("us", "/track")] == ["Marker"]
    records = await log_records(client, tmp_path)
    assert [r["reason"] for r in records if r["outcome"] == "dropped"] == ["consent: token", "consent: opt_out_cookie"]


async def test_a_granted_token_still_carries_identity(proxy_client, upstream):
    client = await proxy_client(**LINKED)
    first = await client.post(TRACK, data=b64_body([js_event("Page A", device_id())]), headers=browser(A))
    cookie = cookie_from(first)
    go = await client.get(f"/mp/go?to={quote(f'http://{B}/cart', safe='')}", allow_redirects=False,
                          headers=browser(A, Cookie=f"fp_id={cookie}"))
    token = dict(parse_qsl(urlsplit(go.headers["Location"]).query))["fpb"]
    claims = client.services.settings.identity.keys.open(token, purpose="bridge", audience="site-b.test", now=time.time())
    assert (claims.consent, claims.canonical_id) == (consent.GRANTED, canonical_of(cookie))


async def test_session_replays_of_a_refusing_browser_are_dropped(proxy_client, upstream, tmp_path):
    import gzip

    client = await proxy_client()
    device = device_id()
    path = f"/mp/record/?format=gzip&distinct_id=%24device%3A{device}&%24device_id={device}&replay_id=r1&seq=0&token={TOKEN}"
    body = gzip.compress(b'[{"type":2,"data":{}}]')
    headers = {**BROWSER, "Content-Type": "application/octet-stream", "Sec-GPC": "1"}
    resp = await client.post(path, data=body, headers=headers)
    assert resp.status == 200 and (await resp.json()) == {"code": 200, "status": "OK"}
    assert "Set-Cookie" not in resp.headers
    # Without the signal the same replay goes through: the drop was the signal's doing.
    ok = await client.post(path, data=body, headers={**BROWSER, "Content-Type": "application/octet-stream"})
    assert ok.status == 200
    assert [r.path for r in upstream.by("us")] == ["/record/"]
    records = await log_records(client, tmp_path)
    [dropped] = [r for r in records if r["outcome"] == "dropped"]
    assert (dropped["route"], dropped["reason"], dropped["project"]) == ("record", "consent: gpc", TOKEN)
    assert device not in orjson.dumps(dropped).decode()


async def test_id_endpoint_names_no_id_for_a_refusing_browser(proxy_client):
    client = await proxy_client(**LINKED)
    refused = await client.get("/mp/id", headers=browser(A, **{"Sec-GPC": "1"}))
    assert refused.status == 200 and (await refused.json()) == {"id": None, "source": "refused", "reason": "gpc"}
    assert "Set-Cookie" not in refused.headers
    granted = await client.get("/mp/id", headers=browser(A))
    body = await granted.json()
    assert body["source"] == "new" and canonical_of(cookie_from(granted)) == body["id"]


async def test_the_hub_keeps_no_id_for_a_refusing_browser(proxy_client):
    client = await proxy_client(**{**LINKED, "identity": {**LINKED["identity"], "hub_url": "http://hub.id-hub.test"}})
    back = quote(f"http://{A}/landing", safe="")
    refused = await client.get(f"/hub/resolve?return={back}", allow_redirects=False,
                               headers=browser("hub.id-hub.test", **{"Sec-GPC": "1"}))
    assert refused.status == 302 and "Set-Cookie" not in refused.headers
    token = dict(parse_qsl(urlsplit(refused.headers["Location"]).query))["fpb"]
    keys = client.services.settings.identity.keys
    assert keys.open(token, purpose="hub", audience="site-a.test", now=time.time()).consent == consent.DENIED
    granted = await client.get(f"/hub/resolve?return={back}", allow_redirects=False, headers=browser("hub.id-hub.test"))
    assert granted.headers["Set-Cookie"].startswith("fp_hub=")


async def test_anonymise_mode_counts_a_refusing_browser_without_identity(proxy_client, upstream, tmp_path, delivery_mode):
    """consent.mode = "anonymise": a GPC browser's events arrive with no id shared
    with any other event, no IP, and are counted; its profile updates and
    Segment identify calls are dropped; its identity cookie is deleted."""
    from tests.support import PLAIN, ajs_call

    client = await proxy_client(consent={"mode": "anonymise"})
    before = await client.post(TRACK, data=b64_body([js_event("Before", device_id())]), headers=browser())
    cookie = cookie_from(before)
    device = device_id()
    gpc = {**browser(**{"Sec-GPC": "1"}), "Cookie": f"fp_id={cookie}", "X-Forwarded-For": "203.0.113.77"}
    first = await client.post(TRACK, data=b64_body([js_event("Page", device, user="user-9"), js_event("Click", device)]), headers=gpc)
    assert first.status == 200 and (await first.json()) == {"status": 1, "error": None}
    set_cookies = first.headers.getall("Set-Cookie")
    assert len(set_cookies) == 1 and set_cookies[0].startswith("fp_id=;") and "Max-Age=0" in set_cookies[0]
    second = await client.post(TRACK, data=b64_body([js_event("Later", device)]), headers=gpc)
    assert second.status == 200
    engage = await client.post("/mp/engage/?verbose=1", headers=gpc,
                               data=b64_body([{"$token": TOKEN, "$distinct_id": device, "$set": {"email": "a@example.com"}}]))
    assert engage.status == 200
    seg_headers = {**BROWSER, **PLAIN, "Sec-GPC": "1", "X-Forwarded-For": "203.0.113.77"}
    anon = device_id()
    await client.post("/seg/v1/t", data=orjson.dumps(ajs_call("track", anon, user_id="user-9", event="Seg")), headers=seg_headers)
    await client.post("/seg/v1/i", data=orjson.dumps(ajs_call("identify", anon, user_id="user-9", traits={"email": "a@x"})),
                      headers=seg_headers)
    events = await upstream.wait(4, "us", "/track")
    from tests.support import eventually

    await eventually(lambda: upstream.by("seg-us"), 10, "the Segment call")
    by_name = {e["event"]: e["properties"] for e in events}
    assert set(by_name) == {"Before", "Page", "Click", "Later"}
    throwaway = {name: by_name[name]["distinct_id"] for name in ("Page", "Click", "Later")}
    assert throwaway["Page"] == throwaway["Click"] != throwaway["Later"]  # one per request, shared with nothing else
    assert all(t.startswith("anon-") for t in throwaway.values())
    for name in ("Page", "Click", "Later"):
        props = by_name[name]
        assert "$device_id" not in props and "$user_id" not in props and "ip" not in props
    text = orjson.dumps([r.body.decode("latin-1") for r in upstream.requests] + [r.headers for r in upstream.requests] + [r.query for r in upstream.requests])
    for secret in (device.encode(), canonical_of(cookie).encode(), b"user-9", b"203.0.113.77", anon.encode()):
        assert secret not in text
    track_requests = [r for r in upstream.by("us", "/track") if any(e["event"] == "Page" for e in r.events())]
    assert all(dict(r.query).get("ip") in (None, "0") for r in track_requests)
    [seg] = [c for r in upstream.by("seg-us") for c in r.events()]
    assert seg["event"] == "Seg" and seg["anonymousId"].startswith("anon-") and "userId" not in seg
    assert seg["context"]["ip"] == "0.0.0.0"
    assert upstream.received("us", "/engage") == []
    metrics = await (await client.ops_get("/metrics")).text()
    assert metric(metrics, 'firstparty_consent_anonymised_total{reason="gpc"}') == 4
    assert metric(metrics, 'firstparty_consent_dropped_total{reason="gpc"}') == 2  # the profile update and the identify
