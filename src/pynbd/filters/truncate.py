"""truncate: change the size of the disk below — smaller, larger or rounded.

    pynbd serve --filter=truncate file disk.img truncate=1G
    pynbd serve --filter=truncate file disk.img round-up=512
    pynbd serve --filter=blocksize --filter=truncate file disk.img minblock=4k round-up=4k

Parameters (all optional; sizes take K/M/G/T suffixes)
    truncate=SIZE    the size to serve, smaller or larger than the disk below
    round-up=N       round the size up to a multiple of N (a power of 2)
    round-down=N     round the size down to a multiple of N (a power of 2)

``truncate`` is applied first, then the rounding. Bytes past the end of the
disk below read as zeroes; writing zeroes there (or zeroing or trimming it)
succeeds and does nothing, writing anything else fails with ENOSPC, as in
nbdkit. Extents report the added tail as a hole that reads as zeroes.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

from ..backend import (
    ConfigError,
    Connection,
    Extent,
    Filter,
    FilterConnection,
    OpenContext,
    Param,
    fill_zero,
    io_error,
    is_zero,
)
from ..backend.params import MAX_SIZE


class TruncateConnection(FilterConnection["TruncateFilter"]):
    def __init__(self, next: Connection, filter: TruncateFilter, ctx: OpenContext) -> None:
        super().__init__(next, filter, ctx)
        self.real_size = next.get_size()
        self.size = filter.size_for(self.real_size)

    def get_size(self) -> int:
        return self.size

    def _inside(self, count: int, offset: int) -> int:
        """How many of the ``count`` bytes at ``offset`` exist below."""
        return max(0, min(count, self.real_size - offset))

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        n = self._inside(len(buf), offset)
        if n:
            self.next.pread(buf[:n], offset, flags)
        if n < len(buf):
            fill_zero(buf[n:])

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        n = self._inside(len(buf), offset)
        if n < len(buf) and not is_zero(buf[n:]):
            raise io_error(errno.ENOSPC, "truncate: write beyond end of underlying device")
        if n:
            self.next.pwrite(buf[:n], offset, flags)

    def zero(self, count: int, offset: int, flags: int) -> None:
        n = self._inside(count, offset)
        if n:
            self.next.zero(n, offset, flags)

    def trim(self, count: int, offset: int, flags: int) -> None:
        n = self._inside(count, offset)
        if n:
            self.next.trim(n, offset, flags)

    def cache(self, count: int, offset: int, flags: int) -> None:
        n = self._inside(count, offset)
        if n:
            self.next.cache(n, offset, flags)

    def can_extents(self) -> bool:
        return True  # the added tail is a hole even over a layer that cannot say

    def extents(self, count: int, offset: int, flags: int) -> Iterator[Extent]:
        n = self._inside(count, offset)
        if n:  # (one data extent if the layer below cannot say: its boundary answers)
            yield from self.next.extents(n, offset, flags)
        if n < count:
            start = max(offset, self.real_size)
            yield Extent(start, offset + count - start, hole=True, zero=True)


class TruncateFilter(Filter):
    short_requests = True
    name = "truncate"
    params = (
        Param("truncate", "size", "the size to serve"),
        Param("round-up", "size", "round the size up to a multiple of N"),
        Param("round-down", "size", "round the size down to a multiple of N"),
    )
    truncate: int | None
    round_up: int | None
    round_down: int | None
    connection = TruncateConnection

    def config_complete(self) -> None:
        for key, value in (("round-up", self.round_up), ("round-down", self.round_down)):
            if value is not None and (value < 1 or value & (value - 1)):
                raise ConfigError(f"truncate: {key}={value}: must be a power of 2")

    def size_for(self, real_size: int) -> int:
        """The size served over a disk of ``real_size`` bytes."""
        size = real_size if self.truncate is None else self.truncate
        if self.round_up:
            size = -(-size // self.round_up) * self.round_up
            if size > MAX_SIZE:
                raise io_error(errno.EINVAL, "truncate: rounded-up size is larger than 2^63-1")
        if self.round_down:
            size = size // self.round_down * self.round_down
        return size
