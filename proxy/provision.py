"""What the proxy generates for itself on its first start, kept in the data directory.

A proxy run with no ``cookie.secret``/``cookie.secret_file`` signs its cookies
with a secret generated once into ``<data_dir>/cookie_secret``; one with no
``identity.keys_file`` seals its bridge tokens with a key generated once into
``<data_dir>/identity_keys``. Restarts read them back, so every visitor's
cookie and every token in flight stays valid.

``settings`` only reads them (``load_settings`` never writes: ``firstparty
check`` on a fresh machine changes nothing); ``generate_missing`` is called by
what serves (``firstparty serve``, the tests' and the benchmarks' apps) and
creates what is missing, ``0600`` in a ``0700`` directory, exactly once even
when several workers start at the same moment (``O_EXCL``).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from .errors import ConfigError
from .files import FILE_MODE, private_dir
from .settings import COOKIE_SECRET_FILE, Settings, identity_keys, read_secret

KEYS_HEADER = "# firstparty identity keys: the first line signs; `firstparty keygen` adds one\n"


def generate_missing(settings: Settings) -> Settings:
    """``settings`` with the generated cookie secret and identity keys, created
    in ``server.data_dir`` when absent (and not configured elsewhere)."""
    cookie, identity = settings.cookie, settings.identity
    data_dir = settings.data_dir
    if not cookie.secret:
        path = data_dir / COOKIE_SECRET_FILE
        _create_once(path, "server.data_dir", lambda: secrets.token_urlsafe(32))
        cookie = dataclasses.replace(cookie, secret=read_secret(path, "cookie.secret"))
    if identity.keys is None:
        from .core.tokens import generate_key_line

        path = Path(identity.keys_file)
        _create_once(path, "identity.keys_file", lambda: KEYS_HEADER + generate_key_line() + "\n")
        identity = dataclasses.replace(identity, keys=identity_keys(path))
    if cookie is settings.cookie and identity is settings.identity:
        return settings
    return dataclasses.replace(settings, cookie=cookie, identity=identity)


def _create_once(path: Path, key: str, content: Callable[[], str]) -> None:
    """``path`` written whole under a temporary name, then linked into place:
    another starter sees no file or the whole one (never an empty one), and
    the first link wins (``os.link`` fails on an existing name)."""
    if path.exists():
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        private_dir(path.parent)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
        with os.fdopen(fd, "w") as fh:
            fh.write(content())
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:  # another starter linked theirs first: read theirs
            pass
    except OSError as exc:
        raise ConfigError(key, f"cannot keep the generated {path.name} in {path.parent}: {exc.strerror}") from exc
    finally:
        tmp.unlink(missing_ok=True)

