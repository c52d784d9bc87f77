"""Progress of long work: a live line on a terminal, periodic log lines otherwise (journald)."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

log = logging.getLogger(__name__)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def human_size(n: float) -> str:
    """Bytes as a short human-readable size (binary units)."""
    return _human(n)


class Progress:
    """Reports the progress of one disk: bytes done of a total, rate and ETA.

    ``done`` counts the disk's bytes accounted for (read, reused or holes); ``moved`` the bytes
    actually read over the network (``moved_as`` names them: "read", or "sent" for a restore).
    On a TTY the line is redrawn at most 4 times a second; when not a TTY (journald, CI) a log
    line is written every ``interval`` seconds.
    """

    def __init__(self, label: str, total: int, *, stream: TextIO | None = None, interval: float = 30.0,
                 moved_as: str = "read"):
        self.label = label
        self.moved_as = moved_as
        self.total = total
        self.done = 0
        self.moved = 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.interval = 0.25 if self.tty else interval
        self.started = time.monotonic()
        self._last = self.started

    def update(self, done: int, moved: int) -> None:
        self.done += done
        self.moved += moved
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._show(now)

    def _line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-6)
        # The rate shown is of the bytes moved; holes and reused blocks cost no time and would
        # inflate it, but they count towards the ETA.
        done_rate = self.done / elapsed
        eta = (self.total - self.done) / done_rate if done_rate > 0 else 0
        percent = 100.0 * self.done / self.total if self.total else 100.0
        return (f"{self.label}: {percent:5.1f}% of {_human(self.total)}, {self.moved_as} {_human(self.moved)} "
                f"at {_human(self.moved / elapsed)}/s, ETA {int(eta // 60)}m{int(eta % 60):02d}s")

    def _show(self, now: float) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K" + self._line(now))
            self.stream.flush()
        else:
            log.info("%s", self._line(now))

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
