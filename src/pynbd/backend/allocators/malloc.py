"""allocator=malloc: one flat anonymous mapping of the whole disk.

Pages the kernel never touched cost nothing; zero and trim give whole
kernel pages back (MADV_DONTNEED, they read as zeroes again) and write
zeroes over the partial ones at the ends. Extents report everything as data,
as nbdkit's malloc allocator does.

Locking: none. Every request is one copy into or out of the mapping, and a
zero only gives back the kernel pages that lie wholly inside its range, so
requests on different bytes never touch the same memory.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Iterator

from ..connection import ZERO_BUFFER, Extent
from ..errors import ConfigError
from ..linux import mlock
from .allocator import Allocator

MAX_MAPPING = 1 << 47  # 128 TiB: the user half of an x86-64 address space
_ZERO = memoryview(ZERO_BUFFER)


class MallocAllocator(Allocator):
    """The whole disk in one mapping."""

    name = "malloc"

    def __init__(self, size: int) -> None:
        if size > MAX_MAPPING:
            raise ConfigError("allocator=malloc cannot map more than 128 TiB")
        super().__init__(size)
        try:
            self.map = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except OSError as e:
            raise ConfigError(f"allocator=malloc cannot map {size} bytes: {e.strerror}") from None
        self.view = memoryview(self.map)
        self.locked = False

    def lock(self) -> None:
        """Keep the whole mapping in RAM (memory's ``allocator=malloc,mlock=true``);
        zero and trim then write zeroes instead of giving pages back."""
        address = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        try:
            mlock(address, len(self.map))
        except OSError as e:
            raise ConfigError(f"allocator=malloc,mlock=true: {e.strerror}") from None
        self.locked = True

    def read(self, buf: memoryview, offset: int, flags: int = 0) -> None:
        buf[:] = self.view[offset:offset + len(buf)]

    def read_buffers(self, count: int, offset: int, flags: int = 0) -> list[memoryview]:
        return [self.view[offset:offset + count]]

    def write(self, buf: memoryview, offset: int, flags: int = 0) -> None:
        self.view[offset:offset + len(buf)] = buf

    def zero(self, count: int, offset: int, flags: int = 0) -> None:
        end = offset + count
        first = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE  # whole kernel pages: [first, last)
        last = end // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first and not self.locked:
            self.view[offset:first] = _ZERO[:first - offset]
            self.map.madvise(mmap.MADV_DONTNEED, first, last - first)
            self.view[last:end] = _ZERO[:end - last]
        else:
            pos = offset
            while pos < end:  # less than two kernel pages, or locked pages
                take = min(end - pos, len(_ZERO))
                self.view[pos:pos + take] = _ZERO[:take]
                pos += take

    trim = zero

    def extents(self, count: int, offset: int, flags: int = 0) -> Iterator[Extent]:
        yield Extent(offset, count)

    @property
    def bytes_allocated(self) -> int:
        """The mapping's size: what the kernel actually backs is not known here."""
        return self.size
