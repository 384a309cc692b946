"""The allocator interface, and the page directory the paged allocators share.

An allocator holds the bytes of a disk of ``size`` bytes that reads as zeroes
until written. Its methods take the arguments of the Connection methods they
serve (``flags`` is accepted and ignored), so a plugin can bind them as its
own and a request costs no Python frame of the plugin's::

    read(buf, offset)            fill ``buf`` in place
    read_buffers(count, offset)  views of the data itself (ranges that read as
                                 zeroes are views of ``ZERO_BUFFER``), or None
                                 when the data must be decoded into a buffer
    write(buf, offset)
    zero(count, offset)          zero and trim are one operation: the memory
    trim(count, offset)          of whole pages that end up zero is freed
    extents(count, offset)       allocated runs as data, the rest as holes

Every allocator is safe for any number of threads at once and does its own
locking; see each allocator for how.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import ClassVar, Generic, TypeVar

from ..blocks import extents_of_runs
from ..connection import Extent

PAGE_SHIFT = 15
PAGE_SIZE = 1 << PAGE_SHIFT  # 32 KiB, as nbdkit's sparse and zstd allocators
PAGE_MASK = PAGE_SIZE - 1
DIR_SHIFT = 9  # pages per directory: 512 (16 MiB of disk)
DIR_PAGES = 1 << DIR_SHIFT
DIR_MASK = DIR_PAGES - 1


class Allocator(ABC):
    """Storage for a disk of ``size`` bytes that starts as zeroes."""

    name: ClassVar[str] = ""  # what allocator= selects

    def __init__(self, size: int) -> None:
        self.size = size

    @abstractmethod
    def read(self, buf: memoryview, offset: int, flags: int = 0) -> None:
        """Copy [offset, offset + len(buf)) into ``buf``."""

    def read_buffers(self, count: int, offset: int, flags: int = 0) -> list[memoryview] | None:
        """Views of [offset, offset + count) without a copy, or None (use ``read``)."""
        return None

    @abstractmethod
    def write(self, buf: memoryview, offset: int, flags: int = 0) -> None:
        """Store ``buf`` at ``offset`` (may raise OSError ENOMEM)."""

    @abstractmethod
    def zero(self, count: int, offset: int, flags: int = 0) -> None:
        """Make [offset, offset + count) read as zeroes, freeing what it can."""

    def trim(self, count: int, offset: int, flags: int = 0) -> None:
        """The same as ``zero``: freed memory reads as zeroes."""
        self.zero(count, offset, flags)

    @abstractmethod
    def extents(self, count: int, offset: int, flags: int = 0) -> Iterator[Extent]:
        """Allocation state of [offset, offset + count), gap-free from ``offset``."""

    @property
    @abstractmethod
    def bytes_allocated(self) -> int:
        """Memory the data takes now (an estimate for the mapping allocator)."""


P = TypeVar("P")


class PagedAllocator(Allocator, Generic[P]):
    """Pages of ``PAGE_SIZE`` bytes in a sparse two-level directory.

    ``_dirs`` maps a directory number (page >> DIR_SHIFT) to a dict of slot
    (page & DIR_MASK) → page. A page that is not there reads as zeroes.
    Lookups take no lock: a dict ``get`` is atomic under the GIL. The
    subclass says how pages are created and freed, and under which lock.
    """

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self._dirs: dict[int, dict[int, P]] = {}

    def get_page(self, page: int) -> P | None:
        d = self._dirs.get(page >> DIR_SHIFT)
        return None if d is None else d.get(page & DIR_MASK)

    @property
    def page_count(self) -> int:
        """Pages allocated now."""
        return sum(len(d) for d in list(self._dirs.values()))

    @property
    def dir_count(self) -> int:
        """Directories allocated now (empty ones are freed)."""
        return len(self._dirs)

    def allocated_pages(self, first: int, last: int) -> Iterator[int]:
        """Numbers of the allocated pages in [first, last], in order.

        Each level is scanned either by probing every number in the range or
        by sorting what is allocated, whichever is fewer, so a huge sparse
        disk and a small full one are both quick.
        """
        dirs = self._dirs
        first_dir, last_dir = first >> DIR_SHIFT, last >> DIR_SHIFT
        if last_dir - first_dir + 1 > len(dirs):
            dir_numbers = sorted(n for n in list(dirs) if first_dir <= n <= last_dir)
        else:
            dir_numbers = [n for n in range(first_dir, last_dir + 1) if n in dirs]
        for n in dir_numbers:
            d = dirs.get(n)
            if not d:
                continue
            base = n << DIR_SHIFT
            lo, hi = max(first - base, 0), min(last - base, DIR_MASK)
            if hi - lo + 1 <= len(d):
                slots = [slot for slot in range(lo, hi + 1) if slot in d]
            else:
                slots = sorted(slot for slot in list(d) if lo <= slot <= hi)
            for slot in slots:
                yield base + slot

    def extents(self, count: int, offset: int, flags: int = 0) -> Iterator[Extent]:
        """Runs of allocated pages as data, the gaps between them as holes."""
        end = offset + count
        pages = self.allocated_pages(offset >> PAGE_SHIFT, (end - 1) >> PAGE_SHIFT)
        return extents_of_runs(offset, end, ((max(page << PAGE_SHIFT, offset),
                                              min((page + 1) << PAGE_SHIFT, end)) for page in pages))
