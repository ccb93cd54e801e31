"""Giving memory freed after a backlog back to the operating system.

CPython returns its own small-object arenas once they are empty, but the
bodies of events (bytes over 512) live in the C allocator's heap, and glibc
keeps freed heap pages mapped for reuse: after an outage's backlog has been
read from disk and sent, the process would keep its high-water RSS for good.
``malloc_trim(0)`` hands every whole free page back (``madvise``), costs a
few milliseconds, and is called from a worker thread (ctypes releases the
GIL) once a backlog has drained, at most every ``TRIM_EVERY_SECONDS``.
Elsewhere (musl, macOS) there is no such call and this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable

TRIM_EVERY_SECONDS = 30.0

_trim: Callable[[int], int] | None = None
_loaded = False
_last = -TRIM_EVERY_SECONDS


def _malloc_trim() -> Callable[[int], int] | None:
    global _trim, _loaded
    if not _loaded:
        _loaded = True
        try:
            _trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _trim = None
    return _trim


def due(now: float | None = None) -> bool:
    """True (and the clock restarted) when a trim may run now."""
    global _last
    now = time.monotonic() if now is None else now
    if now - _last < TRIM_EVERY_SECONDS or _malloc_trim() is None:
        return False
    _last = now
    return True


def release() -> bool:
    """Return free heap pages to the system; True if the allocator gave some back."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
