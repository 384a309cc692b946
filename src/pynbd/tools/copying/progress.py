"""Progress reports: a bar on stderr (``-p``) or ``N/100`` lines on a descriptor.

``--progress=FD`` writes ``N/100\\n`` to FD each time the whole percentage
changes, starting with ``0/100`` and ending with ``100/100`` (nbdcopy's
format, easy for another program to parse). ``-p`` redraws one line on
stderr at most ten times a second and ends it with a newline. Nothing is
printed when the copy fails. A source of unknown length (a stream) shows
the bytes copied instead of a percentage.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import TextIO

from .endpoint import CopyError

BAR_WIDTH = 40
REDRAW = 0.1  # seconds between redraws of the bar
SPINNER = "|/-\\"


class Progress:
    """Counts finished bytes and reports them as asked."""

    def __init__(self, total: int | None, bar: bool = False, fd: int | None = None,
                 stream: TextIO | None = None) -> None:
        self.total, self.bar, self.fd = total, bar, fd
        self.stream = stream or sys.stderr
        self.done = 0
        self._percent = -1
        self._drawn = 0.0
        self._spin = 0
        self.enabled = bar or fd is not None
        self._lock = threading.Lock()  # advance() is safe from any thread

    def start(self) -> None:
        if self.fd is not None:
            try:
                os.fstat(self.fd)
            except OSError as exc:
                raise CopyError(f"--progress={self.fd}", exc.strerror) from None
        self._report(force=True)

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n
            if self.enabled:
                self._report(force=False)

    def finish(self) -> None:
        if self.total is None:
            self.total = self.done
        self.done = self.total
        self._report(force=True)
        if self.bar:
            self.stream.write("\n")
            self.stream.flush()

    def percent(self) -> int:
        if not self.total:
            return 100 if self.total == 0 else 0
        return min(100, self.done * 100 // self.total)

    def _report(self, force: bool) -> None:
        percent = self.percent()
        if self.fd is not None and percent != self._percent:
            os.write(self.fd, f"{percent}/100\n".encode())
        self._percent = percent
        if self.bar:
            now = time.monotonic()
            if force or now - self._drawn >= REDRAW:
                self._drawn = now
                self._draw(percent)

    def _draw(self, percent: int) -> None:
        self._spin = (self._spin + 1) % len(SPINNER)
        spin = SPINNER[self._spin] if percent < 100 else " "
        if self.total is None:
            line = f"\r{spin} {self.done // (1024 * 1024)} MiB copied"
        else:
            filled = percent * BAR_WIDTH // 100
            line = f"\r{spin} {percent:3d}% [{'*' * filled}{'-' * (BAR_WIDTH - filled)}]"
        self.stream.write(line)
        self.stream.flush()
