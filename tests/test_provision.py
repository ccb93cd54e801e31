"""Settings only read; what a first start generates is made by what serves."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from proxy.errors import ConfigError
from proxy.provision import generate_missing
from proxy.settings import build_settings
from proxy.web.app import create_app


def test_loading_settings_writes_nothing(tmp_path: Path) -> None:
    """``firstparty check`` (or any command that only reads) on a fresh machine
    leaves the data directory as it was: no secret, no keys, no directory."""
    data = tmp_path / "data"
    settings = build_settings({"server": {"data_dir": str(data)}}, {})
    assert not data.exists()
    assert settings.cookie.secret == b"" and settings.identity.keys is None
    assert settings.identity.keys_file == str(data / "identity_keys")
    with pytest.raises(ConfigError, match="cookie.secret: not generated yet"):
        create_app(settings)


def test_the_first_start_generates_once_and_later_starts_read_the_same(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = generate_missing(build_settings({"server": {"data_dir": str(data)}}, {}))
    assert len(first.cookie.secret) >= 32 and first.identity.keys is not None
    for name in ("cookie_secret", "identity_keys"):
        assert stat.S_IMODE(os.stat(data / name).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
    reloaded = build_settings({"server": {"data_dir": str(data)}}, {})
    assert reloaded.cookie.secret == first.cookie.secret  # read back, not generated again
    again = generate_missing(reloaded)
    assert again is reloaded  # nothing missing: nothing made
    assert again.identity.keys.current == first.identity.keys.current


def test_configured_secrets_are_never_generated(tmp_path: Path) -> None:
    data = tmp_path / "data"
    keys = tmp_path / "keys"
    with pytest.raises(ConfigError, match="identity.keys_file: cannot read"):
        build_settings({"server": {"data_dir": str(data)}, "identity": {"keys_file": str(keys)}}, {})
    settings = build_settings({"server": {"data_dir": str(data)}, "cookie": {"secret": "x" * 32}}, {})
    assert settings.cookie.secret == b"x" * 32
    generate_missing(settings)
    assert not (data / "cookie_secret").exists() and (data / "identity_keys").exists()
