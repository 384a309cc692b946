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
"""

from __future__ import annotations

import errno
import time

from ..backend import FLAG_FAST_ZERO, Filter, FilterConnection, Param, io_error

_PAIRS = (("rdelay", "delay-read"), ("wdelay", "delay-write"), ("zerodelay", "delay-zero"),
          ("trimdelay", "delay-trim"), ("extentsdelay", "delay-extents"),
          ("cachedelay", "delay-cache"))


# Which delay slows which method.
_METHOD_DELAY = {"pread": "rdelay", "pwrite": "wdelay", "zero": "zerodelay", "trim": "trimdelay",
                 "extents": "extentsdelay", "cache": "cachedelay"}


class DelayConnection(FilterConnection):
    def __init__(self, next, filter, ctx) -> None:  # noqa: A002
        super().__init__(next, filter, ctx)
        self.delays = filter.delays
        self.fastzero = filter.fastzero

    def passes_through(self) -> frozenset[str]:
        # A method without a delay is the next layer's own: even sleep(0)
        # costs a timer-slack wait (about 50 µs) per request.
        undelayed = {method for method, delay in _METHOD_DELAY.items() if not self.delays[delay]}
        return super().passes_through() | undelayed

    def pread(self, buf, offset, flags):
        time.sleep(self.delays["rdelay"])
        self.next.pread(buf, offset, flags)

    def pwrite(self, buf, offset, flags):
        time.sleep(self.delays["wdelay"])
        self.next.pwrite(buf, offset, flags)

    def zero(self, count, offset, flags):
        if flags & FLAG_FAST_ZERO and not self.fastzero and self.delays["zerodelay"]:
            raise io_error(errno.ENOTSUP, "delay: fast zero refused")
        time.sleep(self.delays["zerodelay"])
        self.next.zero(count, offset, flags)

    def trim(self, count, offset, flags):
        time.sleep(self.delays["trimdelay"])
        self.next.trim(count, offset, flags)

    def extents(self, count, offset, flags):
        time.sleep(self.delays["extentsdelay"])
        return self.next.extents(count, offset, flags)

    def cache(self, count, offset, flags):
        time.sleep(self.delays["cachedelay"])
        self.next.cache(count, offset, flags)

    def close(self):
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

    def config_complete(self) -> None:
        self.delays = {short: getattr(self, short) or getattr(self, long.replace("-", "_"))
                       for short, long in _PAIRS}

    def requests_are_short(self) -> bool:
        return not (any(self.delays.values()) or self.delay_open or self.delay_close)

    def open(self, next_open, ctx):
        if self.delay_open:
            time.sleep(self.delay_open)
        return super().open(next_open, ctx)

    connection = DelayConnection
