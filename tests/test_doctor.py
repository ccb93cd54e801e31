"""``firstparty check``, the config doctor: a table of broken configurations,
each caught with its fix; the shipped ``deploy/config.toml`` and
``nginx.example.conf`` pass; ``--online`` against local TLS fakes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy import doctor
from proxy.settings import build_settings
from tests.fakeupstream import FakeUpstream
from tests.support import port_of, reserve_port, self_signed, serve_tls

ROOT = Path(__file__).resolve().parent.parent

# What a sound site block sends to the proxy (the README's nginx.example.conf).
PROXIED = """
    location ~ ^/(mp(-decide)?|seg)/ {
        proxy_pass http://firstparty;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-Host $http_host;
        proxy_set_header X-Real-IP $remote_addr;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
    }
"""
GOOD_NGINX = (
    "\nupstream firstparty { server 127.0.0.1:8000; keepalive 64; }\nserver {\n    listen 443 ssl;\n"
    "    client_max_body_size 10m;" + PROXIED + "}\n"
)


def run(tmp_path: Path, raw: dict[str, Any], env: dict[str, str] | None = None, instances: int = 1) -> list[doctor.Finding]:
    raw = {**raw, "server": {"data_dir": str(tmp_path / "data"), **raw.get("server", {})}}
    env = env or {}
    settings = build_settings(raw, env)
    return doctor.findings(doctor.Context(settings, raw, env, instances))


def nginx(tmp_path: Path, text: str, raw: dict[str, Any] | None = None) -> list[doctor.Finding]:
    conf = tmp_path / "site.conf"
    conf.write_text(text)
    settings = build_settings({"server": {"data_dir": str(tmp_path / "data")}, **(raw or {})}, {})
    return doctor.nginx_findings(doctor.Context(settings), conf)


def one(found: list[doctor.Finding], where: str) -> doctor.Finding:
    matching = [f for f in found if f.where.startswith(where)]
    assert len(matching) == 1, [f.line() for f in found]
    return matching[0]


# (settings, instances, where, level, in the problem, in the fix)
BROKEN = [
    ({"cookie": {"domains": ["example.com"]}}, 1, "cookie.domains", "warning", "no leading dot", '".example.com"'),
    ({"cookie": {"domains": [".co.uk"]}}, 1, "cookie.domains", "error", "public suffix", "registrable domain"),
    ({"cookie": {"domains": [".github.io"]}}, 1, "cookie.domains", "error", "public suffix", "registrable domain"),
    ({"cookie": {"domains": [".example.com"]}, "identity": {"linked_domains": [".brand-b.com"]}},
     1, "identity.linked_domains", "error", "host-only", 'add ".brand-b.com" to cookie.domains'),
    ({"cookie": {"domains": [".example.com", ".brand-b.com"]}, "identity": {"linked_domains": [".brand-b.com"]},
      "cors": {"allowed_origins": ["https://www.example.com"]}},
     1, "cors.allowed_origins", "warning", "brand-b.com", "https://*.brand-b.com"),
    ({"cookie": {"secure": False}, "cors": {"allowed_origins": ["https://www.example.com"]}},
     1, "cookie.secure", "warning", "https", "cookie.secure = true"),
    ({"server": {"trusted_proxies": ["0.0.0.0/0"]}}, 1, "server.trusted_proxies", "error", "everyone", "127.0.0.1/32"),
    ({"server": {"trusted_proxies": ["10.0.0.0/4"]}}, 1, "server.trusted_proxies", "error", "large part", "load balancer"),
    ({"server": {"workers": 2}}, 1, "store.url", "error", "2 workers", "redis://"),
    ({"store": {"url": "redis://127.0.0.1:6379/15"}}, 3, "cookie.secret", "error", "3 instances", "secret_file"),
    ({"store": {"url": "redis://127.0.0.1:6379/15"}}, 3, "identity.keys_file", "error", "another", "keygen"),
    ({"delivery": {"fsync": False}}, 1, "delivery.fsync", "warning", "power cut", "fsync = true"),
    ({"store": {"url": "redis://127.0.0.1:6379/15"}}, 3, "delivery.queue", "warning", "3 instances", "jetstream"),
    ({"ops": {"host": "0.0.0.0", "allowed_networks": ["0.0.0.0/0"]}}, 1, "ops.allowed_networks", "warning", "anyone", "monitoring"),
]


@pytest.mark.parametrize("raw, instances, where, level, problem, fix", BROKEN, ids=[b[2] + ":" + b[4] for b in BROKEN])
def test_each_broken_config_is_caught_with_its_fix(tmp_path, raw, instances, where, level, problem, fix):
    finding = one(run(tmp_path, raw, instances=instances), where)
    assert finding.level == level
    assert problem in finding.problem and fix in finding.fix, finding.line()


def test_a_readable_secret_is_an_error(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("a-secret-of-enough-length\n")
    secret.chmod(0o644)
    finding = one(run(tmp_path, {"cookie": {"secret_file": str(secret)}}), "cookie.secret_file")
    assert finding.level == "error" and finding.fix == f"chmod 600 {secret}"
    secret.chmod(0o600)
    assert run(tmp_path, {"cookie": {"secret_file": str(secret)}}) == []


def test_a_readable_server_keys_file_is_an_error(tmp_path):
    from proxy.core.apikeys import generate_key_line

    keys = tmp_path / "api_keys"
    keys.write_text(generate_key_line("ios-app") + "\n")
    keys.chmod(0o640)
    finding = one(run(tmp_path, {"identity": {"api_keys_file": str(keys)}}), "identity.api_keys_file")
    assert finding.level == "error" and finding.fix == f"chmod 600 {keys}"
    keys.chmod(0o600)
    assert run(tmp_path, {"identity": {"api_keys_file": str(keys)}}) == []


def test_a_spool_on_tmpfs_is_named(tmp_path):
    if doctor.filesystem_of(Path("/dev/shm")) != "tmpfs":
        pytest.fail("this machine has no tmpfs at /dev/shm to try")
    spool = Path("/dev/shm") / f"firstparty-doctor-{os.getpid()}" / "spool.sqlite3"
    finding = one(run(tmp_path, {"delivery": {"spool_path": str(spool)}}), "delivery.spool_path")
    assert "tmpfs" in finding.problem and not spool.parent.exists()  # the check created nothing


def test_the_defaults_and_a_sound_config_pass(tmp_path):
    assert run(tmp_path, {}) == []
    sound = {
        "cookie": {"domains": [".example.com", ".brand-b.com"]},
        "identity": {"linked_domains": [".example.com", ".brand-b.com"]},
        "cors": {"allowed_origins": ["https://*.example.com", "https://*.brand-b.com"]},
        "server": {"workers": 4},
        "store": {"url": "redis://127.0.0.1:6379/15"},
    }
    assert run(tmp_path, sound) == []


# (nginx site, where the finding is, level, in the problem, in the fix)
BROKEN_NGINX = [
    (GOOD_NGINX.replace("|seg)", ")"), "site.conf", "error", "/seg/", "location /seg/"),
    (GOOD_NGINX.replace("proxy_set_header Host $host;", ""), "site.conf:", "error", "Host", "proxy_set_header Host $host;"),
    (GOOD_NGINX.replace("proxy_set_header X-Real-IP $remote_addr;", "").replace(
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;", ""), "site.conf:", "error", "nginx's IP", "X-Real-IP"),
    (GOOD_NGINX.replace("proxy_set_header X-Forwarded-Proto $scheme;", ""), "site.conf:", "warning", "X-Forwarded-Proto", "$scheme"),
    (GOOD_NGINX.replace("proxy_set_header X-Forwarded-Host $http_host;", ""), "site.conf:", "warning", "non-default port",
     "X-Forwarded-Host $http_host"),
    (GOOD_NGINX.replace("client_max_body_size 10m;", ""), "site.conf:", "warning", "1m (the default)", "client_max_body_size 10m;"),
    (GOOD_NGINX.replace("proxy_http_version 1.1;", ""), "site.conf:", "warning", "keep-alive", "proxy_http_version 1.1"),
    (GOOD_NGINX.replace(" keepalive 64;", ""), "site.conf:2", "warning", "idle connections", "keepalive 32;"),
    (GOOD_NGINX.replace("proxy_pass http://firstparty;", "proxy_pass http://proxy.internal:8000;"),
     "site.conf:", "warning", "resolves it once", "upstream firstparty"),
    (GOOD_NGINX.replace("location ~ ^/(mp(-decide)?|seg)/ {", "location /mp/ {").replace(
        "proxy_pass http://firstparty;", "proxy_pass http://firstparty/;"), "site.conf:", "error", "replaces /mp/ with /", "no path"),
    ("server { location / { } ", "site.conf:", "error", "nginx config", "nginx -t"),
]


@pytest.mark.parametrize("text, where, level, problem, fix", BROKEN_NGINX, ids=[b[3] for b in BROKEN_NGINX])
def test_each_broken_nginx_config_is_caught_with_its_fix(tmp_path, text, where, level, problem, fix):
    found = nginx(tmp_path, text)
    matching = [f for f in found if f.where.startswith(str(tmp_path / where)) and problem in f.problem]
    assert len(matching) >= 1, [f.line() for f in found]
    assert matching[0].level == level and fix in matching[0].fix, matching[0].line()


# Two registrable domains, one server block each (what a newcomer writes from the README).
def site_block(names: str) -> str:
    return f"\nserver {{\n    listen 443 ssl;\n    server_name {names};\n    client_max_body_size 10m;" + PROXIED + "}\n"


TWO_SITES = ("upstream firstparty { server 127.0.0.1:8000; keepalive 64; }\n"
             + site_block("www.site-a.test") + site_block("checkout.site-b.test shop.site-b.test"))
TWO_DOMAINS = {"cookie": {"domains": [".site-a.test", ".site-b.test"]},
               "identity": {"linked_domains": [".site-a.test", ".site-b.test"]}}
B_AT = TWO_SITES.index("server_name checkout")


def in_b(old: str, new: str) -> str:
    """TWO_SITES with ``old`` replaced in site B's server block only."""
    return TWO_SITES[:B_AT] + TWO_SITES[B_AT:].replace(old, new, 1)


# (nginx site, proxy settings, where the finding is, level, in the problem, in the fix): issue 23's mistakes
BROKEN_TWO_SITES = [
    (in_b("location ~ ^/(mp(-decide)?|seg)/ {", "location /shop/ {"), {}, "site.conf:", "error",
     "checkout.site-b.test shop.site-b.test: no location sends /mp/", "to this server block"),
    (in_b("proxy_set_header X-Forwarded-Proto $scheme;", ""), {}, "site.conf:", "warning", "X-Forwarded-Proto", "$scheme"),
    (TWO_SITES.replace("server 127.0.0.1:8000;", "server 127.0.0.1:8002;"), {}, "site.conf:1", "error",
     "listens on port 8000", "127.0.0.1:8000"),
    (TWO_SITES, {"server": {"trusted_proxies": ["10.0.0.0/8"]}}, "server.trusted_proxies", "error",
     "connects to the proxy from 127.0.0.1", '"127.0.0.1/32"'),
    (in_b("checkout.site-b.test shop.site-b.test", "checkout.site-b.tset"), {}, "site.conf:", "error",
     "checkout.site-b.tset sends the mounts to the proxy but is under none", "correct the name"),
]


@pytest.mark.parametrize("text, raw, where, level, problem, fix", BROKEN_TWO_SITES, ids=[b[4][:40] for b in BROKEN_TWO_SITES])
def test_each_mistake_of_a_two_domain_site_is_caught_with_its_fix(tmp_path, text, raw, where, level, problem, fix):
    found = nginx(tmp_path, text, {**TWO_DOMAINS, **raw})
    place = where if where.startswith("server.") else str(tmp_path / where)
    matching = [f for f in found if f.where.startswith(place) and problem in f.problem]
    assert len(matching) == 1, [f.line() for f in found]
    assert matching[0].level == level and fix in matching[0].fix, matching[0].line()
    assert nginx(tmp_path, TWO_SITES, TWO_DOMAINS) == []  # and the sound two-domain site passes


def test_a_domain_typo_repeated_everywhere_is_caught(tmp_path):
    raw = {"cookie": {"domains": [".site-a.test", ".shop-b.tset"]}, "identity": {"linked_domains": [".site-a.test", ".shop-b.tset"]}}
    found = run(tmp_path, raw)
    assert {(f.where, f.level) for f in found} == {("cookie.domains", "warning"), ("identity.linked_domains", "warning")}
    assert all(".tset" in f.problem and "typo" in f.problem for f in found)
    fine = {"cookie": {"domains": [".example.co.uk", ".shop.internal", ".site.test"]}}
    assert run(tmp_path, fine) == []


def test_a_missing_nginx_file_is_one_clear_error(tmp_path):
    settings = build_settings({"server": {"data_dir": str(tmp_path / "data")}}, {})
    [finding] = doctor.nginx_findings(doctor.Context(settings), tmp_path / "nowhere.conf")
    assert finding.level == "error" and finding.problem == "no such file" and "--nginx" in finding.fix


def test_a_regex_python_cannot_read_is_not_a_crash(tmp_path):
    odd = GOOD_NGINX.replace("location ~ ^/(mp(-decide)?|seg)/ {", "location ~ ^/(?<mount>mp|seg)/ {\n    }\n    location /mp/ {")
    found = nginx(tmp_path, odd)
    assert all("no location sends /mp/" not in f.problem for f in found)


def test_a_sound_nginx_config_passes(tmp_path):
    assert nginx(tmp_path, GOOD_NGINX) == []


@pytest.mark.parametrize("config, site", [
    ("deploy/config.toml", "nginx.example.conf"),
    ("deploy/config.toml", "deploy/nginx.conf"),
    ("deploy/example/config.toml", "deploy/example/nginx.conf"),  # both server blocks
])
def test_the_shipped_configs_pass(tmp_path, config, site):
    secret = tmp_path / "secret"
    secret.write_text("a-production-secret-of-some-length\n")
    secret.chmod(0o600)
    env = {
        "FIRSTPARTY_COOKIE_SECRET_FILE": str(secret),
        "FIRSTPARTY_SERVER_DATA_DIR": str(tmp_path / "data"),
        "PATH": os.environ["PATH"],
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
    }
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "--config", str(ROOT / config),
         "--nginx", str(ROOT / site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("0 errors, 0 warnings (config, nginx checked)"), result.stdout


def test_the_cli_exits_1_on_errors_and_names_each(tmp_path):
    conf = tmp_path / "bad.toml"
    conf.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\ntrusted_proxies = ["0.0.0.0/0"]\n[delivery]\nfsync = false\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIRSTPARTY_")}
    result = subprocess.run([sys.executable, "-m", "proxy", "check", "-c", str(conf)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "error   server.trusted_proxies: 0.0.0.0/0" in result.stdout
    assert "warning delivery.fsync" in result.stdout
    assert "1 error, 1 warning (config checked)" in result.stdout
    # A config that does not load is one error, the loader's own words.
    conf.write_text("[cookie]\nmax_age_days = 9000\n")
    result = subprocess.run([sys.executable, "-m", "proxy", "check", "-c", str(conf)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "error   cookie.max_age_days: 9000 is out of range" in result.stdout


async def test_online_checks_name_unreachable_and_untrusted_upstreams_and_misrouted_workspaces(tmp_path):
    trusted_cert, trusted_key = self_signed(tmp_path / "ca", "127.0.0.1")
    other_cert, other_key = self_signed(tmp_path / "other", "127.0.0.1")
    fake = FakeUpstream()
    runners = []
    ports = {}
    for name, (cert, key) in {"us": (trusted_cert, trusted_key), "cdn": (trusted_cert, trusted_key),
                              "seg-cdn": (trusted_cert, trusted_key), "eu": (other_cert, other_key)}.items():
        runner, ports[name] = await serve_tls(fake.app(name), cert, key)
        runners.append(runner)
    down = reserve_port()
    url = lambda name: f"https://127.0.0.1:{ports[name]}"  # noqa: E731
    dead = f"https://127.0.0.1:{port_of(down)}"
    raw = {
        "server": {"data_dir": str(tmp_path / "data")},
        "upstream": {"us": url("us"), "eu": url("eu"), "in": dead, "decide": url("us"), "cdn": url("cdn"),
                     "ca_file": str(trusted_cert), "timeout_seconds": 3,
                     "projects": {"eu-project": "eu", "in-project": "in"}},
        "segment": {"us": url("us"), "eu": url("us"), "cdn": url("seg-cdn"), "write_keys": {"seg-write-key-eu": "eu"}},
    }
    try:
        settings = build_settings(raw, {})
        # seg-eu-unrouted: an EU workspace (the fake CDN's settings say so) left on the US default.
        found = await doctor.online_findings(doctor.Context(settings, raw), ["seg-eu-unrouted"])
        # A site that uses the US regions only: the EU and India hosts (here untrusted and
        # down) are none of its concern, and Segment's EU host is not asked.
        us_only = {**raw, "upstream": {k: v for k, v in raw["upstream"].items() if k != "projects"},
                   "segment": {**raw["segment"], "eu": dead, "write_keys": {}}}
        us_found = await doctor.online_findings(doctor.Context(build_settings(us_only, {}), us_only), [])
    finally:
        for runner in runners:
            await runner.cleanup()
        down.close()
    assert us_found == [], [f.line() for f in us_found]
    by_where = {f.where: f for f in found}
    assert set(by_where) == {"upstream.eu", "upstream.in", "segment.write_keys.seg-eu…"}, [f.line() for f in found]
    assert "certificate not trusted" in by_where["upstream.eu"].problem and "ca_file" in by_where["upstream.eu"].fix
    assert "unreachable" in by_where["upstream.in"].problem and "egress" in by_where["upstream.in"].fix
    # Every key a fix names is one `check` accepts (HTTPS_PROXY is the environment's, not a key).
    assert "upstream.https_proxy" not in by_where["upstream.in"].fix and "HTTPS_PROXY" in by_where["upstream.in"].fix
    misrouted = by_where["segment.write_keys.seg-eu…"]
    assert "EU region" in misrouted.problem and misrouted.fix == 'segment.write_keys = { "seg-eu-unrouted" = "eu" }'
    # The CDN was asked for mixpanel-js and for both workspaces' settings.
    assert {r.path for r in fake.by("cdn")} == {"/libs/mixpanel-2-latest.min.js"}
    assert {r.path for r in fake.by("seg-cdn")} == {"/v1/projects/seg-write-key-eu/settings", "/v1/projects/seg-eu-unrouted/settings"}


def test_every_setting_a_fix_names_exists():
    """A fix that names a setting the loader rejects sends the operator in a circle:
    every `section.key` in the doctor's texts is one `check` accepts."""
    import re

    from proxy.settings import _SCHEMA

    import ast

    tree = ast.parse((ROOT / "proxy" / "doctor.py").read_text())
    texts = " ".join(n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str))
    named = set(re.findall(r"\b(" + "|".join(_SCHEMA) + r")\.([a-z_]+)\b", texts))
    assert named, "the pattern finds the settings the doctor names"
    unknown = sorted(f"{section}.{key}" for section, key in named if key not in _SCHEMA[section])
    assert unknown == [], unknown
