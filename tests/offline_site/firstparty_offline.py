"""Never online: the suite may only talk to loopback.

``install()`` wraps the socket module so that connecting to (or sending a
datagram to) any address outside 127.0.0.0/8 and ::1, and resolving any host
name other than ``localhost``, raises ``OfflineViolation`` at once, with the
address in the message. Installed for the whole test session by
``tests/conftest.py``, and in every Python process a test starts (the
servers ``python -m proxy`` runs): conftest puts this directory first on
their ``PYTHONPATH``, and its ``sitecustomize.py`` installs the guard. So no test can reach api.mixpanel.com, a CDN or a DNS
server, even on a machine with network.

The wrappers are on the Python socket layer: asyncio's default loop,
``socket.create_connection``, urllib, redis-py and the Mixpanel SDK all pass
through it. uvloop connects in C; the servers the tests start under uvloop
are covered by their DNS lookups (every host name but localhost refused)
and by their settings, which always name 127.0.0.1 upstreams.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Any

ENV = "FIRSTPARTY_TEST_OFFLINE"  # set in children: "1" installs the guard at start-up
_ALLOWED_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


class OfflineViolation(OSError):
    """A test tried to leave the machine."""


def _loopback(host: Any) -> bool:
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if not isinstance(host, str):
        return False
    host = host.split("%", 1)[0]  # scoped IPv6
    if host in _ALLOWED_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check(address: Any, family: int) -> None:
    if family == getattr(socket, "AF_UNIX", None):
        return  # a socket file on this machine
    if isinstance(address, tuple) and address:
        if _loopback(address[0]):
            return
        raise OfflineViolation(f"tests are offline: connection to {address[0]}:{address[1] if len(address) > 1 else '?'} refused")
    raise OfflineViolation(f"tests are offline: connection to {address!r} refused")


_real_getaddrinfo = socket.getaddrinfo
_real_gethostbyname = socket.gethostbyname
_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_sendto = socket.socket.sendto
_installed = False


def _numeric(host: Any) -> bool:
    try:
        ipaddress.ip_address(host.decode() if isinstance(host, bytes) else host)
    except ValueError:
        return False
    return True


def _getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
    # A numeric address needs no DNS; connecting to it is checked by connect().
    if host is not None and not _loopback(host) and not _numeric(host):
        raise OfflineViolation(f"tests are offline: DNS lookup of {host!r} refused")
    return _real_getaddrinfo(host, *args, **kwargs)


def _gethostbyname(host: str) -> str:
    if not _loopback(host):
        raise OfflineViolation(f"tests are offline: DNS lookup of {host!r} refused")
    return _real_gethostbyname(host)


def _connect(self: socket.socket, address: Any) -> None:
    _check(address, self.family)
    return _real_connect(self, address)


def _connect_ex(self: socket.socket, address: Any) -> int:
    _check(address, self.family)
    return _real_connect_ex(self, address)


def _sendto(self: socket.socket, data: Any, *args: Any) -> int:
    _check(args[-1], self.family)
    return _real_sendto(self, data, *args)


def install() -> None:
    """Idempotent; also marks the environment so child processes install it."""
    global _installed
    os.environ[ENV] = "1"
    if _installed:
        return
    _installed = True
    socket.socket.connect = _connect  # type: ignore[method-assign]
    socket.socket.connect_ex = _connect_ex  # type: ignore[method-assign]
    socket.socket.sendto = _sendto  # type: ignore[method-assign]
    socket.getaddrinfo = _getaddrinfo  # type: ignore[assignment]
    socket.gethostbyname = _gethostbyname  # type: ignore[assignment]
