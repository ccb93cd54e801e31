"""The proxy's own files, private to the user it runs as.

The data directory holds the cookie secret, the token keys, the spool and
the forwarded log: ids, IP addresses and what forges identities. It is made
``0700``; every file in it is created ``0600`` (``O_NOFOLLOW``: a symlink
planted where a file is expected is refused, never followed); a file is
replaced through a fresh temporary (``O_EXCL``), never one left lying there.
``firstparty check`` reports any of them that another user can read.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> None:
    """``path`` (made ``0700`` when this creates it) and any missing parents."""
    if path.is_dir():
        return
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    os.chmod(path, DIR_MODE)  # the umask may have narrowed it only; make it exact


def open_private(path: Path, flags: int) -> int:
    """A descriptor on ``path``, created ``0600`` if absent; a symlink is refused."""
    return os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)


def touch_private(path: Path) -> None:
    """Make sure ``path`` exists as this user's private file (before SQLite
    opens it: its ``-wal`` and ``-shm`` files take the database file's mode)."""
    private_dir(path.parent)
    os.close(open_private(path, os.O_RDONLY))


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically, readable by its owner only."""
    private_dir(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # a stale one (or a planted link) is removed, never reused
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
