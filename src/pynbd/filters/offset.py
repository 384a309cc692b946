"""offset: serve a slice of the underlying disk.

    pynbd serve --filter=offset file disk.img offset=1M range=512M

Parameters
    offset=SIZE   where the slice starts in the disk below (default 0)
    range=SIZE    how long it is (default: to the end of the disk below)

Every request is shifted by ``offset``; extents come back shifted the other
way. A slice that does not fit inside the disk below is refused when the
client connects.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator, Sequence
from typing import TypeVar

from ..backend import (
    DATA_METHODS,
    Buffer,
    Connection,
    Extent,
    Filter,
    FilterConnection,
    OpenContext,
    Param,
    io_error,
)

FilterT = TypeVar("FilterT", bound=Filter)


class SliceConnection(FilterConnection[FilterT]):
    """A window of the layer below, ``size`` bytes from ``start``, served from 0.

    The offset filter takes the window from its parameters, the partition
    filter from the partition table.
    """

    def __init__(self, next: Connection, filter: FilterT, ctx: OpenContext,
                 start: int, size: int | None) -> None:
        super().__init__(next, filter, ctx)
        below = next.get_size()
        if size is None:
            size = below - start
        if start > below or start + size > below:
            raise io_error(errno.EINVAL, f"{filter.name}: offset+range ({start}+{size}) is "
                                         f"beyond the end of the underlying disk ({below})")
        self.offset = start
        self.size = size

    def passes_through(self) -> frozenset[str]:
        # With nothing to shift, requests go straight to the layer below (the
        # boundary keeps them inside ``size``; the server clips extents to it).
        return DATA_METHODS if self.offset == 0 else super().passes_through()

    def get_size(self) -> int:
        return self.size

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self.next.pread(buf, offset + self.offset, flags)

    def pread_buffers(self, count: int, offset: int, flags: int) -> Sequence[Buffer] | None:
        return self.next.pread_buffers(count, offset + self.offset, flags)

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self.next.pwrite(buf, offset + self.offset, flags)

    def zero(self, count: int, offset: int, flags: int) -> None:
        self.next.zero(count, offset + self.offset, flags)

    def trim(self, count: int, offset: int, flags: int) -> None:
        self.next.trim(count, offset + self.offset, flags)

    def cache(self, count: int, offset: int, flags: int) -> None:
        self.next.cache(count, offset + self.offset, flags)

    def extents(self, count: int, offset: int, flags: int) -> Iterator[Extent]:
        shift = self.offset
        for ext in self.next.extents(count, offset + shift, flags):
            yield Extent(ext.offset - shift, ext.length, ext.hole, ext.zero)


class OffsetConnection(SliceConnection["OffsetFilter"]):
    def __init__(self, next: Connection, filter: OffsetFilter, ctx: OpenContext) -> None:
        super().__init__(next, filter, ctx, filter.offset, filter.range)


class OffsetFilter(Filter):
    name = "offset"
    short_requests = True
    params = (
        Param("offset", "size", "start of the slice", default=0),
        Param("range", "size", "length of the slice (default: to the end)"),
    )
    offset: int
    range: int | None
    connection = OffsetConnection
