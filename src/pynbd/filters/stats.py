"""stats: count requests, bytes and time per operation; write them at exit.

    pynbd serve --filter=stats memory 25G statsfile=stats.txt
    pynbd serve -U - --filter=stats memory 1G statsfile=/dev/stderr --run 'nbdcopy ...'

Parameters
    statsfile=FILE        where the statistics go (required; opened at start-up,
                          written when the server exits)
    statsappend=BOOL      append to FILE instead of replacing it (default false)
    statsthreshold=PCT    how much of the request-size histogram to show: the
                          most common sizes are listed until they cover PCT
                          percent of the requests, the rest are summed as
                          "other sizes" (default 95; 0 hides the histogram)

The file looks like nbdkit's::

    total: 191 ops, 21.917545 s, 25.13 GiB, 1.15 GiB/s
    read: 136 ops, 0.000230 s, 3.16 MiB, 13.43 GiB/s op, 147.83 KiB/s total
      Request size and alignment breakdown:
        12 bits: 68.4% (93 reqs, 372.00 KiB total)
             12 bit aligned: 100.0% (93)
             13 bit aligned:  72.0% (67)
        other sizes: 31.6% (43 reqs, 2.80 MiB total)

``total`` counts requests as nbdkit does (all but cache) and the bytes of
read, write, trim and zero; its time is the wall time the server ran. Each
operation line gives its own time (summed over requests, which may
overlap), bytes, the rate while the operation ran
("op") and over the whole run ("total"). A request of N bytes falls in the
"floor(log2 N) bits" group; "K bit aligned" is the share of that group whose
offset is a multiple of 2^K. Statistics cover every connection together.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import IO

from ..backend import ConfigError, Connection, Extent, Filter, FilterConnection, OpenContext, Param

OPERATIONS = ("read", "write", "trim", "zero", "extents", "cache", "flush")
_DATA_OPS = ("read", "write", "trim", "zero")
_COUNTED_OPS = (*_DATA_OPS, "flush", "extents")  # what nbdkit's "total: N ops" counts
_UNITS = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def human_size(n: float) -> str:
    """``512 bytes``, ``4.00 KiB``, ``25.13 GiB`` as nbdkit prints them."""
    unit = 0
    while n >= 1024 and unit < len(_UNITS) - 1:
        n /= 1024
        unit += 1
    return f"{int(n)} bytes" if unit == 0 else f"{n:.2f} {_UNITS[unit]}"


def human_rate(n: int, seconds: float) -> str:
    return f"{human_size(n / seconds)}/s" if seconds > 0 else "(n/a)/s"


def alignment_bits(offset: int) -> int:
    """Trailing zero bits of ``offset`` (0 counts as aligned to 2^63)."""
    return (offset & -offset).bit_length() - 1 if offset else 63


class OpStats:
    """Counters of one operation; a lock keeps concurrent updates exact."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ops = 0
        self.bytes = 0
        self.seconds = 0.0
        self.histogram: Counter[tuple[int, int]] = Counter()  # (size bits, align bits)
        self.size_bytes: Counter[int] = Counter()
        self._lock = threading.Lock()

    def record(self, count: int, offset: int, seconds: float) -> None:
        size_bits = max(count.bit_length() - 1, 0)
        with self._lock:
            self.ops += 1
            self.bytes += count
            self.seconds += seconds
            if self.name != "flush":
                self.histogram[size_bits, alignment_bits(offset)] += 1
                self.size_bytes[size_bits] += count

    def report(self, elapsed: float, threshold: int) -> list[str]:
        lines = [f"{self.name}: {self.ops} ops, {self.seconds:.6f} s, {human_size(self.bytes)}, "
                 f"{human_rate(self.bytes, self.seconds)} op, {human_rate(self.bytes, elapsed)} total"]
        if threshold > 0 and self.histogram:
            lines.append("  Request size and alignment breakdown:")
            lines += self._histogram(threshold)
            lines.append("")
        return lines

    def _histogram(self, threshold: int) -> list[str]:
        groups: Counter[int] = Counter()
        for (size_bits, _), n in self.histogram.items():
            groups[size_bits] += n
        total = sum(groups.values())
        lines: list[str] = []
        shown = shown_bytes = 0
        for size_bits, n in groups.most_common():
            if shown * 100 >= threshold * total:
                break
            shown += n
            shown_bytes += self.size_bytes[size_bits]
            lines.append(f"    {size_bits} bits: {100 * n / total:5.1f}% ({n} reqs, "
                         f"{human_size(self.size_bytes[size_bits])} total)")
            lines += self._alignment(size_bits, n, threshold)
        if total > shown:
            lines.append(f"    other sizes: {100 * (total - shown) / total:5.1f}% ({total - shown} reqs, "
                         f"{human_size(self.bytes - shown_bytes)} total)")
        return lines

    def _alignment(self, size_bits: int, group_total: int, threshold: int) -> list[str]:
        """Cumulative 'at least K bits aligned' shares, one line per change."""
        by_align = Counter({a: n for (s, a), n in self.histogram.items() if s == size_bits})
        lines = []
        remaining = group_total
        for align in sorted(by_align):
            if remaining * 100 < (100 - threshold) * group_total:
                break
            lines.append(f"         {align} bit aligned: {100 * remaining / group_total:5.1f}% "
                         f"({remaining})")
            remaining -= by_align[align]
        return lines


class StatsTable:
    """The statistics of the whole server."""

    def __init__(self) -> None:
        self.ops = {name: OpStats(name) for name in OPERATIONS}
        self.started = time.monotonic()

    def report(self, threshold: int) -> str:
        elapsed = time.monotonic() - self.started
        total_ops = sum(self.ops[name].ops for name in _COUNTED_OPS)
        total_bytes = sum(self.ops[name].bytes for name in _DATA_OPS)
        lines = [f"total: {total_ops} ops, {elapsed:.6f} s, {human_size(total_bytes)}, "
                 f"{human_rate(total_bytes, elapsed)}"]
        for name in OPERATIONS:
            if self.ops[name].ops:
                lines += self.ops[name].report(elapsed, threshold)
        return "\n".join(lines).rstrip("\n") + "\n"


class StatsConnection(FilterConnection["StatsFilter"]):
    """Times each request into the server's table (one OpStats per operation)."""

    def __init__(self, next: Connection, filter: StatsFilter, ctx: OpenContext) -> None:
        super().__init__(next, filter, ctx)
        ops = filter.table.ops
        self.reads = ops["read"]
        self.writes = ops["write"]
        self.trims = ops["trim"]
        self.zeroes = ops["zero"]
        self.caches = ops["cache"]
        self.flushes = ops["flush"]
        self.extent_calls = ops["extents"]

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        start = time.perf_counter()
        try:
            self.next.pread(buf, offset, flags)
        finally:
            self.reads.record(len(buf), offset, time.perf_counter() - start)

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        start = time.perf_counter()
        try:
            self.next.pwrite(buf, offset, flags)
        finally:
            self.writes.record(len(buf), offset, time.perf_counter() - start)

    def trim(self, count: int, offset: int, flags: int) -> None:
        start = time.perf_counter()
        try:
            self.next.trim(count, offset, flags)
        finally:
            self.trims.record(count, offset, time.perf_counter() - start)

    def zero(self, count: int, offset: int, flags: int) -> None:
        start = time.perf_counter()
        try:
            self.next.zero(count, offset, flags)
        finally:
            self.zeroes.record(count, offset, time.perf_counter() - start)

    def cache(self, count: int, offset: int, flags: int) -> None:
        start = time.perf_counter()
        try:
            self.next.cache(count, offset, flags)
        finally:
            self.caches.record(count, offset, time.perf_counter() - start)

    def flush(self, flags: int) -> None:
        start = time.perf_counter()
        try:
            self.next.flush(flags)
        finally:
            self.flushes.record(0, 0, time.perf_counter() - start)

    def extents(self, count: int, offset: int, flags: int) -> list[Extent]:
        start = time.perf_counter()
        try:
            return list(self.next.extents(count, offset, flags))
        finally:
            self.extent_calls.record(count, offset, time.perf_counter() - start)


class StatsFilter(Filter):
    short_requests = True
    name = "stats"
    params = (
        Param("statsfile", "path", "file the statistics are written to at exit", required=True),
        Param("statsappend", "bool", "append to the file instead of replacing it", default=False),
        Param("statsthreshold", "int", "percent of requests the histogram covers", default=95),
    )
    statsfile: str
    statsappend: bool
    statsthreshold: int
    connection = StatsConnection

    def config_complete(self) -> None:
        if not 0 <= self.statsthreshold <= 100:
            raise ConfigError(f"stats: statsthreshold={self.statsthreshold}: must be 0..100")
        self.table = StatsTable()
        self._out: IO[str] | None = None

    def get_ready(self) -> None:
        try:
            self._out = open(self.statsfile, "a" if self.statsappend else "w", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"stats: cannot open statsfile {self.statsfile}: {exc.strerror}") from None
        self.table.started = time.monotonic()

    def unload(self) -> None:
        out = self._out
        if out is None:
            return
        self._out = None
        with out:
            out.write(self.table.report(self.statsthreshold))
