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
from collections.abc import Iterator

from ..backend import DATA_METHODS, Extent, Filter, FilterConnection, Param, io_error


class OffsetConnection(FilterConnection):
    def __init__(self, next, filter, ctx) -> None:  # noqa: A002
        super().__init__(next, filter, ctx)
        self.offset = filter.offset
        below = next.get_size()
        size = below - self.offset if filter.range is None else filter.range
        if self.offset > below or self.offset + size > below:
            raise io_error(errno.EINVAL, f"offset: offset+range ({self.offset}+{size}) is "
                                         f"beyond the end of the underlying disk ({below})")
        self.size = size

    def passes_through(self) -> frozenset[str]:
        # With nothing to shift, requests go straight to the layer below (the
        # boundary keeps them inside ``size``; the server clips extents to it).
        return DATA_METHODS if self.offset == 0 else super().passes_through()

    def get_size(self) -> int:
        return self.size

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self.next.pread(buf, offset + self.offset, flags)

    def pread_buffers(self, count: int, offset: int, flags: int):
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


class OffsetFilter(Filter):
    name = "offset"
    short_requests = True
    params = (
        Param("offset", "size", "start of the slice", default=0),
        Param("range", "size", "length of the slice (default: to the end)"),
    )
    connection = OffsetConnection
