"""overlap: a disk that counts how many of its reads run at the same time.

A test plugin loaded by path (``pynbd serve tests/server/overlap_plugin.py
together=N``). A read of offset 0 answers with the highest number of reads
seen running at once (one byte) and resets it; any other read waits, up to a
second, until ``together`` reads are running at once, so that reads the
server runs in parallel are certain to meet and reads it runs one at a time
never do. The plugin declares that its requests may wait, so the server runs
them on its pool of ``-t`` threads.
"""

from __future__ import annotations

import threading

from pynbd.backend import Connection, OpenContext, Param, Plugin

MEET_TIMEOUT = 1.0


class Meeting:
    """Reads in progress, and the most there were at once."""

    def __init__(self, together: int) -> None:
        self.together = together
        self.active = 0
        self.peak = 0
        self.changed = threading.Condition()

    def attend(self) -> None:
        with self.changed:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.changed.notify_all()
            self.changed.wait_for(lambda: self.active >= self.together, MEET_TIMEOUT)
            self.active -= 1

    def take_peak(self) -> int:
        with self.changed:
            peak, self.peak = self.peak, 0
            return peak


class OverlapConnection(Connection):
    def __init__(self, meeting: Meeting) -> None:
        self.meeting = meeting

    def get_size(self) -> int:
        return 1 << 20

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        if offset == 0:
            buf[:] = bytes([self.meeting.take_peak()]).ljust(len(buf), b"\0")
            return
        self.meeting.attend()
        buf[:] = bytes(len(buf))


class OverlapPlugin(Plugin):
    name = "overlap"
    params = (Param("together", "int", "reads that wait for each other", default=4),)
    together: int

    def get_ready(self) -> None:
        self.meeting = Meeting(self.together)

    def open(self, ctx: OpenContext) -> Connection:
        return OverlapConnection(self.meeting)
