"""Log hygiene: lines a flood or a client can trigger.

``Throttled``: warnings that an outage repeats (upstream down, store down, a
token replayed...), written at most once per condition per interval, each
line saying how many like it were held back since the last one: a vendor
outage at full traffic writes a handful of lines a minute, not one per retry.

``escape_control`` and ``EscapingFormatter``: client text never makes a line
of its own nor moves a terminal's cursor: control characters (newlines
included), DEL, C1 controls and bidirectional overrides are written as
``\\xNN`` / ``\\uNNNN`` escapes, in the process log and in ``firstparty logs``."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from typing import Any

EVERY_SECONDS = 60.0

_CONTROLS = [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), 0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F),
             *range(0x2066, 0x206A)]
_ESCAPES = {c: (f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}") for c in _CONTROLS}


def escape_control(text: str) -> str:
    """``text`` with every control or bidi-override character escaped."""
    return text.translate(_ESCAPES)


class EscapingFormatter(logging.Formatter):
    """The process log's formatter: the message (with the client text its
    arguments bring) escaped; a traceback, which is ours, left as it is."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return escape_control(super().formatMessage(record))


class Throttled:
    def __init__(
        self, logger: logging.Logger, every: float = EVERY_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._logger = logger
        self._every = every
        self._clock = clock
        self._seen: dict[Hashable, list[float]] = {}  # condition -> [last line's time, held back since]

    def log(self, level: int, condition: Hashable, msg: str, *args: Any) -> bool:
        """Log ``msg`` unless ``condition`` was logged less than ``every``
        seconds ago (then count it). True when a line was written."""
        now = self._clock()
        seen = self._seen.get(condition)
        if seen is not None and now - seen[0] < self._every:
            seen[1] += 1
            return False
        if seen is not None and seen[1]:
            msg += f" ({int(seen[1])} more like it in the last {now - seen[0]:.0f} s)"
        if len(self._seen) >= 1024:  # conditions are few (regions, kinds); never let them grow
            self._seen.clear()
        self._seen[condition] = [now, 0]
        self._logger.log(level, msg, *args)
        return True

    def warning(self, condition: Hashable, msg: str, *args: Any) -> bool:
        return self.log(logging.WARNING, condition, msg, *args)

    def info(self, condition: Hashable, msg: str, *args: Any) -> bool:
        return self.log(logging.INFO, condition, msg, *args)
