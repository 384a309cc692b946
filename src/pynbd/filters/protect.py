"""protect: make ranges of the disk unchangeable while the rest stays writable.

    pynbd serve --filter=protect file disk.img protect=0-0x1bd
    pynbd serve --filter=protect file disk.img protect=~1048576-6441402367
    pynbd serve --filter=protect memory 1M protect=0-511 protect=0x80000-

Parameters
    protect=START-END    protect bytes START to END, both included. Numbers are
                         decimal, octal (``0755``) or hex (``0x1bd``); START
                         defaults to 0 and END to the largest offset, so
                         ``protect=4096-`` protects everything from 4096 on.
    protect=~START-END   protect everything except START..END.

``protect`` may be given many times; overlapping and adjacent ranges merge.
Reads are never affected. A write, zero or trim touching a protected range
succeeds only if it leaves the protected bytes as they are (a write of the
same data, a zero of bytes already zero); otherwise it fails with EPERM and
nothing is written: ``protect filter prevented write to protected range
0-511``. To make the whole disk read-only use ``-r``; to serve only part of
it use the offset or partition filter.
"""

from __future__ import annotations

import bisect
import errno
from collections.abc import Iterator

from ..backend import (
    ConfigError,
    Connection,
    Filter,
    FilterConnection,
    OpenContext,
    Param,
    io_error,
    is_zero,
)
from ..backend.params import MAX_SIZE

_CHECK_CHUNK = 4 * 1024 * 1024


def parse_offset(text: str) -> int:
    """A number as C's strtoull with base 0 reads it (decimal, 0octal, 0xhex)."""
    t = text.strip().lower()
    if t.startswith("0x"):
        value = int(t[2:], 16)
    elif len(t) > 1 and t.startswith("0"):
        value = int(t[1:], 8)
    else:
        value = int(t, 10)
    if value < 0 or value > MAX_SIZE:
        raise ValueError(f"{text!r} is out of range")
    return value


def parse_range(text: str) -> list[tuple[int, int]]:
    """``START-END`` or ``~START-END`` as a list of inclusive (start, end)."""
    complement = text.startswith("~")
    body = text[1:] if complement else text
    start_text, dash, end_text = body.partition("-")
    try:
        if not dash:
            raise ValueError("expected START-END")
        start = parse_offset(start_text) if start_text.strip() else 0
        end = parse_offset(end_text) if end_text.strip() else MAX_SIZE
    except ValueError as exc:
        raise ConfigError(f"protect: protect={text}: {exc}") from None
    if end < start:
        raise ConfigError(f"protect: protect={text}: the end is before the start")
    if not complement:
        return [(start, end)]
    return [r for r in ((0, start - 1), (end + 1, MAX_SIZE)) if r[0] <= r[1]]


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, with overlapping and adjacent ranges combined."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


class ProtectConnection(FilterConnection["ProtectFilter"]):
    def __init__(self, next: Connection, filter: ProtectFilter, ctx: OpenContext) -> None:
        super().__init__(next, filter, ctx)
        self.ranges = filter.ranges
        self.starts = [start for start, _ in self.ranges]

    def _protected(self, count: int, offset: int) -> Iterator[tuple[int, int, tuple[int, int]]]:
        """(offset, length, range) of each protected piece of the request."""
        end = offset + count
        index = max(bisect.bisect_right(self.starts, offset) - 1, 0)
        for start, last in self.ranges[index:]:
            if start >= end:
                return
            lo, hi = max(start, offset), min(last + 1, end)
            if lo < hi:
                yield lo, hi - lo, (start, last)

    def _check(self, count: int, offset: int, buf: memoryview | None) -> None:
        """EPERM unless the protected bytes would stay the same."""
        for lo, length, (start, last) in self._protected(count, offset):
            for pos in range(lo, lo + length, _CHECK_CHUNK):
                n = min(_CHECK_CHUNK, lo + length - pos)
                current = bytearray(n)
                self.next.pread(memoryview(current), pos, 0)
                # bytearray == memoryview compares with memcmp
                same = (current == buf[pos - offset:pos - offset + n]) if buf is not None \
                    else is_zero(memoryview(current))
                if not same:
                    raise io_error(errno.EPERM, f"protect filter prevented write to protected "
                                                f"range {start}-{last}")

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self._check(len(buf), offset, buf)
        self.next.pwrite(buf, offset, flags)

    def zero(self, count: int, offset: int, flags: int) -> None:
        self._check(count, offset, None)
        self.next.zero(count, offset, flags)

    def trim(self, count: int, offset: int, flags: int) -> None:
        self._check(count, offset, None)
        self.next.trim(count, offset, flags)


class ProtectFilter(Filter):
    short_requests = True
    name = "protect"
    params = (Param("protect", "str", "START-END or ~START-END: bytes that cannot change",
                    repeat=True),)
    protect: list[str]
    connection = ProtectConnection

    def config_complete(self) -> None:
        self.ranges = merge_ranges([r for text in self.protect for r in parse_range(text)])

    def wrap(self, below: Connection, ctx: OpenContext) -> Connection:
        return self.connection(below, self, ctx) if self.ranges else below
