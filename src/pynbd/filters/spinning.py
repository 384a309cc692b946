"""spinning: add seek delays, to make any export behave like a spinning disk.

    pynbd serve --filter=spinning memory 1G
    pynbd serve --filter=spinning memory 1G heads=4 separate-heads=true

The export is split into ``heads`` equal ranges, one per head. Each read,
write and zero moves its head to the request's offset; moving further than
a track (128 KiB) waits for the seek, a time that grows with the distance
along a curve through three points: a track-to-track seek, a seek across
half the head's range and one across all of it. The export says it is
rotational and does not offer multi-conn (each connection has its own heads).

Parameters (times in seconds, fractions allowed, or with an ``ms`` suffix)
    heads=N               the number of heads, 1 to 64 (default 1)
    separate-heads=BOOL   false (default): the heads sit on one arm and move
                          together, so every seek waits for the arm; true:
                          each head moves on its own and only requests for
                          the same head wait for each other
    min-seek-time=T       track-to-track seek (default 0.01)
    half-seek-time=T      seek across half the range (default 0.2)
    max-seek-time=T       seek across the whole range (default 0.5)
"""

from __future__ import annotations

import threading
import time

from ..backend import ConfigError, Connection, Filter, FilterConnection, OpenContext, Param

TRACK_SIZE = 128 * 1024


class Head:
    """One head: its range of the disk, where it is, and the lock held while it seeks."""

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.pos = start
        self.lock = threading.Lock()


class SpinningConnection(FilterConnection["SpinningFilter"]):
    def __init__(self, next: Connection, filter: SpinningFilter, ctx: OpenContext) -> None:
        super().__init__(next, filter, ctx)
        size = next.get_size()
        count = max(1, min(filter.heads, size))
        step = size // count
        self.step = step
        self.heads = [Head(i * step, size if i == count - 1 else (i + 1) * step)
                      for i in range(count)]

    def is_rotational(self) -> bool:
        return True

    def can_multi_conn(self) -> bool:
        return False

    def seek(self, offset: int) -> None:
        heads = self.heads
        head = heads[min(offset // self.step, len(heads) - 1)] if self.step else heads[0]
        separate = self.filter.separate_heads
        with (head if separate else heads[0]).lock:
            distance = abs(head.pos - offset)
            if separate:
                head.pos = offset
            else:
                relative = offset - head.start
                for h in heads:
                    h.pos = h.start + relative
            if distance > TRACK_SIZE:
                delay = self.filter.seek_time(distance / (head.end - head.start))
                if delay > 0:
                    time.sleep(delay)

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self.seek(offset)
        self.next.pread(buf, offset, flags)

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self.seek(offset)
        self.next.pwrite(buf, offset, flags)

    def zero(self, count: int, offset: int, flags: int) -> None:
        self.seek(offset)
        self.next.zero(count, offset, flags)


class SpinningFilter(Filter):
    name = "spinning"
    params = (
        Param("heads", "int", "the number of heads (1 to 64)", default=1),
        Param("separate-heads", "bool", "heads move independently", default=False),
        Param("min-seek-time", "duration", "track-to-track seek time", default=0.01),
        Param("half-seek-time", "duration", "seek time across half the disk", default=0.2),
        Param("max-seek-time", "duration", "seek time across the whole disk", default=0.5),
    )
    heads: int
    separate_heads: bool
    min_seek_time: float
    half_seek_time: float
    max_seek_time: float
    connection = SpinningConnection

    def config_complete(self) -> None:
        if not 1 <= self.heads <= 64:
            raise ConfigError(f"spinning: heads must be in the range [1..64] (was: {self.heads})")
        # The quadratic a.x² + b.x + c through (0, min), (0.5, half), (1, max).
        self.a = 2 * (self.max_seek_time - 2 * self.half_seek_time + self.min_seek_time)
        self.b = 2 * (self.half_seek_time - self.min_seek_time - self.a / 4)
        self.c = self.min_seek_time

    def seek_time(self, stroke: float) -> float:
        """Seconds to seek across ``stroke`` (0 to 1) of a head's range."""
        return (self.a * stroke + self.b) * stroke + self.c
