"""delay: make requests slow, to test clients under latency.

    pynbd serve --filter=delay memory 1G rdelay=100ms wdelay=1

Parameters (seconds, fractions allowed, or with an ``ms`` suffix)
    rdelay / delay-read          before each read
    wdelay / delay-write         before each write
    zerodelay / delay-zero       before each write-zeroes
    trimdelay / delay-trim       before each trim
    extentsdelay / delay-extents before each block-status request
    cachedelay / delay-cache     before each cache request
    fastzero=false               make fast zero requests fail with ENOTSUP
                                 instead of being delayed
    delay-open                   before the client's connection is opened
    delay-close                  before it is closed

Each request sleeps on its own worker thread, so requests issued together
are delayed together: two reads with rdelay=1 take about one second, not two.
A request's delay ends early, the request failing with ESHUTDOWN, when the
client disconnects or the server shuts down (as nbdkit_nanosleep).
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Iterable

from ..backend import (
    FLAG_FAST_ZERO,
    Connection,
    Extent,
    Filter,
    FilterConnection,
    OpenContext,
    Param,
    io_error,
)
from ..backend.shutdown import sleep

# (short name, nbdkit's long name) of each per-request delay.
_PAIRS = (("rdelay", "delay-read"), ("wdelay", "delay-write"), ("zerodelay", "delay-zero"),
          ("trimdelay", "delay-trim"), ("extentsdelay", "delay-extents"),
          ("cachedelay", "delay-cache"))


class DelayConnection(FilterConnection["DelayFilter"]):
    def __init__(self, next: Connection, filter: DelayFilter, ctx: OpenContext) -> None:
        super().__init__(next, filter, ctx)
        self.read_delay = filter.read_delay
        self.write_delay = filter.write_delay
        self.zero_delay = filter.zero_delay
        self.trim_delay = filter.trim_delay
        self.extents_delay = filter.extents_delay
        self.cache_delay = filter.cache_delay
        self.fastzero = filter.fastzero

    def passes_through(self) -> frozenset[str]:
        # A method without a delay is the next layer's own: even sleep(0)
        # costs a timer-slack wait (about 50 µs) per request.
        delays = {"pread": self.read_delay, "pwrite": self.write_delay, "zero": self.zero_delay,
                  "trim": self.trim_delay, "extents": self.extents_delay,
                  "cache": self.cache_delay}
        return super().passes_through() | {method for method, delay in delays.items() if not delay}

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        sleep(self.ctx, self.read_delay)
        self.next.pread(buf, offset, flags)

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        sleep(self.ctx, self.write_delay)
        self.next.pwrite(buf, offset, flags)

    def zero(self, count: int, offset: int, flags: int) -> None:
        if flags & FLAG_FAST_ZERO and not self.fastzero and self.zero_delay:
            raise io_error(errno.ENOTSUP, "delay: fast zero refused")
        sleep(self.ctx, self.zero_delay)
        self.next.zero(count, offset, flags)

    def trim(self, count: int, offset: int, flags: int) -> None:
        sleep(self.ctx, self.trim_delay)
        self.next.trim(count, offset, flags)

    def extents(self, count: int, offset: int, flags: int) -> Iterable[Extent]:
        sleep(self.ctx, self.extents_delay)
        return self.next.extents(count, offset, flags)

    def cache(self, count: int, offset: int, flags: int) -> None:
        sleep(self.ctx, self.cache_delay)
        self.next.cache(count, offset, flags)

    def close(self) -> None:
        if self.filter.delay_close:
            time.sleep(self.filter.delay_close)
        super().close()


class DelayFilter(Filter):
    name = "delay"
    params = tuple(Param(name, "duration", f"delay before each {alias[6:]}", default=0.0)
                   for pair in _PAIRS for name, alias in (pair, (pair[1], pair[1]))) + (
        Param("delay-open", "duration", "delay before opening a connection", default=0.0),
        Param("delay-close", "duration", "delay before closing a connection", default=0.0),
        Param("fastzero", "bool", "delay fast zero requests (false: fail them)", default=True),
    )
    rdelay: float
    delay_read: float
    wdelay: float
    delay_write: float
    zerodelay: float
    delay_zero: float
    trimdelay: float
    delay_trim: float
    extentsdelay: float
    delay_extents: float
    cachedelay: float
    delay_cache: float
    delay_open: float
    delay_close: float
    fastzero: bool
    connection = DelayConnection

    def config_complete(self) -> None:
        # Each delay has nbdkit's two names; the short one wins when both are given.
        self.read_delay = self.rdelay or self.delay_read
        self.write_delay = self.wdelay or self.delay_write
        self.zero_delay = self.zerodelay or self.delay_zero
        self.trim_delay = self.trimdelay or self.delay_trim
        self.extents_delay = self.extentsdelay or self.delay_extents
        self.cache_delay = self.cachedelay or self.delay_cache

    def requests_are_short(self) -> bool:
        return not (self.read_delay or self.write_delay or self.zero_delay or self.trim_delay
                    or self.extents_delay or self.cache_delay or self.delay_open
                    or self.delay_close)

    def open(self, next_open: Callable[[OpenContext], Connection], ctx: OpenContext) -> Connection:
        if self.delay_open:
            time.sleep(self.delay_open)
        return super().open(next_open, ctx)
