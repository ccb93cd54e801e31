"""Identity hand-offs over real HTTP: a landing script redeeming its page's token
(POST /mp/id), a widget's partitioned cookie (frame=1), and an app's backend
asking for a token for its own device id with a server key (POST /mp/bridge).

Every refusal is a test: a token for another domain, a replay, a foreign
origin, a device id without a key, a wrong key, another deployment's key, a
server key used from a browser."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from proxy.core.apikeys import ApiKeys, bearer, generate_key_line
from proxy.errors import ConfigError
from proxy.settings import load_settings
from tests.conftest import b64_body, canonical_of, cookie_from, device_id, js_event
from tests.support import A, B, IDENTITY, TRACK, browser, go_to_b, keys_of, land, metric, token_of, visit_a

APP = {"Content-Type": "application/json", "User-Agent": "app-backend/1.0"}


def server_keys(tmp_path: Path, *names: str) -> tuple[Path, dict[str, str]]:
    lines = [generate_key_line(name) for name in names]
    path = tmp_path / "api_keys"
    path.write_text("# test keys\n" + "\n".join(lines) + "\n")
    return path, {line.split()[0]: line.split()[1] for line in lines}


@pytest.fixture
async def keyed(proxy_client: Any, tmp_path: Path) -> tuple[Any, dict[str, str]]:
    path, keys = server_keys(tmp_path, "ios-app", "android")
    identity = {**IDENTITY["identity"], "api_keys_file": str(path)}
    return await proxy_client(**{**IDENTITY, "identity": identity}), keys


# ------------------------------------------------------- landing scripts


async def test_a_landing_script_redeems_the_token_before_any_sdk_runs(xclient, upstream):
    cookie_a = await visit_a(xclient)
    token = token_of(await go_to_b(xclient, cookie_a))
    resp = await land(xclient, B, token)
    assert resp.status == 200
    answer = await resp.json()
    assert answer == {"id": canonical_of(cookie_a), "source": "bridge", "token": "accepted"}
    cookie_b = cookie_from(resp)
    assert canonical_of(cookie_b) == canonical_of(cookie_a) and "Domain=.site-b.test" in resp.headers["Set-Cookie"]

    # The SDK then starts on the cleaned URL: the cookie alone joins it.
    d_b = device_id()
    page = js_event("Page B", d_b, **{"$current_url": f"http://{B}/cart"})
    await xclient.post(TRACK, data=b64_body([page]), headers=browser(B, cookie_b))
    event = (await upstream.wait(2, "us", "/track"))[1]
    assert event["properties"]["$device_id"] == canonical_of(cookie_a)

    # The same token shown again by this browser (its cookie) is still accepted;
    # by another browser (no cookie) it is a replay.
    assert (await (await land(xclient, B, token, cookie_b)).json())["token"] == "accepted"
    stolen = await (await land(xclient, B, token)).json()
    assert stolen["token"] == "refused" and stolen["id"] != canonical_of(cookie_a)
    text = await (await xclient.ops_get("/metrics")).text()
    assert metric(text, 'firstparty_identity_tokens_total{result="replayed"}') == 1


async def test_another_domains_token_is_refused_so_the_script_asks_the_hub(xclient):
    """Site A's links copy A's query string, so B's URL may hold a token for A (a hub
    token A got back from the hub): B must say refused, not resolved."""
    keys = keys_of(xclient)
    for_a = keys.seal("4f1c2b3a-0000-4000-8000-00000000000a", purpose="hub", audience="site-a.test", now=time.time(), ttl=60)
    answer = await (await land(xclient, B, for_a)).json()
    assert answer["token"] == "refused" and answer["source"] == "new"
    assert answer["id"] != "4f1c2b3a-0000-4000-8000-00000000000a"


async def test_a_foreign_origin_cannot_make_a_browser_take_a_token(xclient):
    cookie_a = await visit_a(xclient)
    token = token_of(await go_to_b(xclient, cookie_a))
    headers = {**browser(B), "Origin": "https://evil.example"}
    resp = await xclient.post("/mp/id", data=f"fpb={token}", headers=headers)
    assert resp.status == 403 and cookie_from(resp) is None
    assert (await resp.json())["error"] == "origin is not on a linked domain"
    assert (await (await land(xclient, B, token)).json())["token"] == "accepted"  # still unused


async def test_a_refusal_carried_by_the_token_is_kept(xclient):
    keys = keys_of(xclient)
    token = keys.seal("4f1c2b3a-0000-4000-8000-00000000000b", purpose="bridge", audience="site-b.test",
                      now=time.time(), ttl=60, consent="denied")
    resp = await land(xclient, B, token)
    assert await resp.json() == {"id": None, "source": "refused", "reason": "token", "token": "refused"}
    assert cookie_from(resp) is None
    assert any(h.startswith("fp_optout=") for h in resp.headers.getall("Set-Cookie", []))


async def test_a_widget_keeps_its_id_in_a_partitioned_cookie(xclient):
    cookie_a = await visit_a(xclient)
    # frame.js on A's page asks for its iframe's token, and the frame redeems it.
    bridge = await xclient.post("/mp/bridge", json={"to": f"http://{B}/", "frame": "1"},
                                headers={**browser(A, cookie_a), "Content-Type": "application/json"})
    token = (await bridge.json())["token"]
    assert keys_of(xclient).open(token, purpose="frame", audience="site-b.test", now=time.time())
    # As a landing URL's token (land.js, an SDK's event) it links nothing, whatever the referrer.
    assert (await (await land(xclient, B, token)).json())["token"] == "refused"
    resp = await land(xclient, B, token, frame="1")
    (header,) = resp.headers.getall("Set-Cookie")
    attributes = [a.strip() for a in header.split(";")]
    assert attributes[0] == f"fp_id={cookie_from(resp)}" and canonical_of(cookie_from(resp)) == canonical_of(cookie_a)
    # CHIPS needs all three, even with cookie.secure off for local http.
    assert {"Secure", "SameSite=None", "Partitioned", "HttpOnly", "Domain=.site-b.test"} <= set(attributes)


@pytest.mark.parametrize("name", ["land.js", "hub.js", "frame.js"])
async def test_page_scripts_name_their_own_mount(xclient, name):
    for mount in ("/mp/", "/seg/"):
        resp = await xclient.get(f"{mount}{name}", headers={"Host": A})
        assert resp.status == 200 and resp.content_type == "application/javascript"
        js = await resp.text()
        assert f'ID = "{mount}id"' in js and 'PARAM = "fpb"' in js
    if name == "frame.js":
        assert 'LINKED = ["site-a.test","site-b.test"]' in js and 'BRIDGE = "/seg/bridge"' in js
    if name == "land.js":
        assert "HUB = null" in js
    if name == "hub.js":
        assert 'HUB = "http://hub.id-hub.test"' in js
        assert 'GO = "/seg/go"' in js  # link.js's decoration too: clicks need no hub


# ------------------------------------------------------------ app hand-off


async def app_bridge(client: Any, key: str | None, device: str, to: str = f"http://{B}/welcome", headers: Any = None) -> Any:
    h = dict(headers or APP)
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    return await client.post("/mp/bridge", json={"to": to, "device_id": device}, headers=h)


async def test_an_app_backend_hands_its_device_id_to_the_web(keyed, upstream):
    client, keys = keyed
    app_device = device_id()
    resp = await app_bridge(client, keys["ios-app"], app_device)
    assert resp.status == 200, await resp.text()
    answer = await resp.json()
    assert set(answer) == {"url", "token", "expires_in", "param"} and answer["expires_in"] == 60
    assert answer["url"] == f"http://{B}/welcome?fpb={answer['token']}"
    assert "Set-Cookie" not in resp.headers  # a server call: no browser state
    claims = keys_of(client).open(answer["token"], purpose="app", audience="site-b.test", now=time.time())
    assert claims.canonical_id == app_device

    # The browser opens the link: its SDK's own device id joins the app's.
    d_web = device_id()
    landing = js_event("Opened from app", d_web, **{"$current_url": answer["url"]})
    resp = await client.post(TRACK, data=b64_body([landing]), headers=browser(B))
    assert canonical_of(cookie_from(resp)) == app_device
    (event,) = await upstream.wait(1, "us", "/track")
    assert event["properties"]["$device_id"] == app_device and event["properties"]["distinct_id"] == f"$device:{app_device}"
    text = await (await client.ops_get("/metrics")).text()
    assert metric(text, 'firstparty_identity_tokens_total{result="issued_app"}') == 1
    assert metric(text, 'firstparty_identity_tokens_total{result="redeemed_app"}') == 1


async def test_no_key_no_device_id(keyed, tmp_path):
    client, keys = keyed
    (tmp_path / "other").mkdir()
    _, other_keys = server_keys(tmp_path / "other", "ios-app")
    victim = device_id()
    cases = {
        "no key": None,
        "a wrong key": keys["ios-app"][:-4] + "AAAA",
        "another deployment's key": other_keys["ios-app"],
        "not a bearer": None,
    }
    for why, key in cases.items():
        headers = {**APP, "Authorization": "Basic " + keys["ios-app"]} if why == "not a bearer" else APP
        resp = await app_bridge(client, key, victim, headers=headers)
        assert resp.status == 401, why
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="firstparty"'
        assert "token" not in await resp.json(), why
    # A browser naming a device id, with its own cookie: still no.
    cookie_a = await visit_a(client)
    resp = await client.post("/mp/bridge", json={"to": f"http://{B}/", "device_id": victim},
                             headers={**browser(A, cookie_a), "Content-Type": "application/json"})
    assert resp.status == 401
    # A real key used from a page (leaked into a browser): refused too.
    resp = await app_bridge(client, keys["android"], victim, headers={**browser(A), "Content-Type": "application/json"})
    assert resp.status == 403 and "browser" in (await resp.json())["error"]
    text = await (await client.ops_get("/metrics")).text()
    assert metric(text, 'firstparty_identity_tokens_total{result="unauthorized"}') == 6
    assert not metric(text, 'firstparty_identity_tokens_total{result="issued_app"}')


async def test_app_bridge_names_the_bad_field(keyed):
    client, keys = keyed
    resp = await app_bridge(client, keys["ios-app"], "x;y")
    assert resp.status == 400 and "'device_id'" in (await resp.json())["error"]
    resp = await app_bridge(client, keys["ios-app"], device_id(), to="https://evil.example/")
    assert resp.status == 400 and "linked domain" in (await resp.json())["error"]


async def test_without_server_keys_the_app_bridge_is_off(xclient):
    resp = await app_bridge(xclient, "fpk_" + "a" * 43, device_id())
    assert resp.status == 401 and "identity.api_keys_file" in (await resp.json())["error"]


def test_api_keys_file_errors_name_the_line_and_never_the_key(tmp_path):
    secret = "fpk_" + "s" * 43
    for text, message in [
        (f"ios-app {secret} extra\n", "line 1: expected '<name> <key>', got 3 fields"),
        (f"# c\nios app {secret}\n", "line 2: expected"),
        ("ios-app short\n", "line 1: the key of 'ios-app' must be 32-256 characters"),
        (f"a {secret}\na {secret}\n", "line 2: duplicate name 'a'"),
        (f"a {secret}\nb {secret}\n", "line 2: the key of 'b' is also another name's key"),
        ("# nothing\n", "holds no keys"),
    ]:
        path = tmp_path / "k"
        path.write_text(text)
        config = tmp_path / "c.toml"
        config.write_text(f'[server]\ndata_dir = "{tmp_path}"\n[identity]\napi_keys_file = "{path}"\n')
        with pytest.raises(ConfigError) as info:
            load_settings(str(config), {})
        assert message in str(info.value) and "identity.api_keys_file" in str(info.value)
        assert secret not in str(info.value)


def test_keys_verify_only_themselves():
    keys = ApiKeys.from_file("a fpk_" + "a" * 43 + "\nb fpk_" + "b" * 43 + "\n")
    assert keys.verify("fpk_" + "b" * 43) == "b" and keys.verify("fpk_" + "a" * 43) == "a"
    assert keys.verify("fpk_" + "c" * 43) is None and keys.verify("") is None and keys.verify("x" * 300) is None
    assert bearer("Bearer  k1 ") == "k1" and bearer("bearer k") == "k"
    assert bearer("Basic k") is None and bearer("Bearer") is None and bearer(None) is None


def test_cli_apikey_adds_a_key_the_proxy_reads(tmp_path, capsys, monkeypatch):
    from proxy.cli import main

    for name in [n for n in __import__("os").environ if n.startswith("FIRSTPARTY_")]:
        monkeypatch.delenv(name)
    path = tmp_path / "api_keys"
    config = tmp_path / "c.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path}"\n[identity]\napi_keys_file = "{path}"\n')
    assert main(["apikey", "--name", "ios-app", "--file", str(path)]) == 0
    first = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["apikey", "--name", "web-backend", "--config", str(config)]) == 0
    second = capsys.readouterr().out.strip().splitlines()[-1]
    assert path.stat().st_mode & 0o777 == 0o600
    keys = load_settings(str(config), {}).identity.api_keys
    assert keys.names == ("ios-app", "web-backend")
    assert keys.verify(first) == "ios-app" and keys.verify(second) == "web-backend"
    assert main(["apikey", "--name", "ios-app", "--file", str(path)]) == 2  # names are unique
    assert "duplicate name 'ios-app'" in capsys.readouterr().err
