"""checkwrite: turn writes into checks that the data is already there.

    pynbd serve -U - --filter=checkwrite data "@32768 1" --run 'nbdcopy "$uri" "$uri"'
    pynbd serve -U - --filter=checkwrite file disk.img --run 'qemu-img convert -n "$uri" "$uri"'

The layer below is opened read-only and never written. A write succeeds
(doing nothing) if its data matches what the disk below holds, and fails
with EIO (``checkwrite: data written does not match expected``) if not;
zero and trim succeed where the disk below reads as zeroes. Differences in
sparseness are ignored. Copying a disk onto itself through this filter
tests a copying tool: a buggy one sees EIO.

It takes no parameters. The export offers writes, flush, FUA, trim, zero,
fast zero (which fails with ENOTSUP where data would have to be read) and
multi-conn.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Callable

from ..backend import (
    FLAG_FAST_ZERO,
    FUA_NATIVE,
    Connection,
    Filter,
    FilterConnection,
    OpenContext,
    io_error,
    is_zero,
)

CHUNK = 1 << 20


def _mismatch() -> OSError:
    return io_error(errno.EIO, "checkwrite: data written does not match expected")


class CheckwriteConnection(FilterConnection["CheckwriteFilter"]):
    def can_write(self) -> bool:
        return True

    def can_flush(self) -> bool:
        return True

    def can_fua(self) -> int:
        return FUA_NATIVE

    def can_trim(self) -> bool:
        return True

    def can_zero(self) -> bool:
        return True

    def can_fast_zero(self) -> bool:
        return True

    def can_multi_conn(self) -> bool:
        return True

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        expected = memoryview(bytearray(len(buf)))
        self.next.pread(expected, offset, 0)
        if expected != buf:
            raise _mismatch()

    def flush(self, flags: int) -> None:
        """Nothing was written: nothing to flush."""

    def zero(self, count: int, offset: int, flags: int) -> None:
        end = offset + count
        for ext in self.next.extents(count, offset, 0) if self.next.can_extents() else ():
            if ext.offset > offset:
                break
            stop = min(end, ext.offset + ext.length)
            if not ext.zero:
                self._read_zeroes(offset, stop, flags)
            offset = stop
            if offset >= end:
                return
        self._read_zeroes(offset, end, flags)

    trim = zero

    def _read_zeroes(self, offset: int, end: int, flags: int) -> None:
        if offset >= end:
            return
        if flags & FLAG_FAST_ZERO:
            raise io_error(errno.ENOTSUP, "checkwrite: checking for zeroes means reading")
        buf = memoryview(bytearray(min(CHUNK, end - offset)))
        while offset < end:
            piece = buf[:min(len(buf), end - offset)]
            self.next.pread(piece, offset, 0)
            if not is_zero(piece):
                raise _mismatch()
            offset += len(piece)


class CheckwriteFilter(Filter):
    short_requests = True
    name = "checkwrite"
    connection = CheckwriteConnection

    def open(self, next_open: Callable[[OpenContext], Connection], ctx: OpenContext) -> Connection:
        below = next_open(dataclasses.replace(ctx, readonly=True))
        try:
            return self.wrap(below, ctx)
        except BaseException:
            below.close()
            raise
