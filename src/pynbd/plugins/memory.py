"""memory: a RAM disk.

    pynbd serve memory 1G
    pynbd serve memory size=$((2**63-1))
    pynbd serve memory 10G allocator=zstd

Parameters
    size=SIZE          the size of the disk (the magic parameter), up to 2^63-1
    allocator=sparse   pages of 32 KiB allocated on first write and freed again
                       when trimmed or zeroed (the default)
    allocator=malloc   one flat anonymous mapping of the whole size; pages the
                       kernel never touched cost nothing, zero/trim give them back
    allocator=zstd     like sparse, but every page is kept compressed with
                       zstandard: slower, much smaller for compressible data

The disk starts as zeroes and lives as long as the server; every client sees
the same data (so multi-conn is safe). Extents report pages that were never
written, or were trimmed, as holes. Requests on different pages never wait
for each other: page lookups take no lock.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Iterator

from ..backend import (
    ZERO_BUFFER,
    ConfigError,
    Connection,
    Extent,
    Param,
    Plugin,
    RamDisk,
    block_runs,
    extents_of_runs,
)
from ..backend.params import MAX_SIZE

PAGE_SHIFT = 15
PAGE_SIZE = 1 << PAGE_SHIFT  # 32 KiB
DIR_SHIFT = 9  # pages per directory: 512 (16 MiB of disk)
DIR_PAGES = 1 << DIR_SHIFT
ZERO_PAGE = bytes(PAGE_SIZE)
ZERO_VIEW = memoryview(ZERO_BUFFER)  # pread_buffers: the server sends these as holes


class SparsePages:
    """A sparse array of 32 KiB pages in a two-level directory.

    ``dirs`` maps a directory number to a dict of page number → bytearray.
    Creation uses ``dict.setdefault`` (atomic under the GIL), so concurrent
    writers to different pages never lock; writers racing for the same new
    page agree on one.
    """

    def __init__(self) -> None:
        self.dirs: dict[int, dict[int, bytearray]] = {}

    def get(self, page: int) -> bytearray | None:
        d = self.dirs.get(page >> DIR_SHIFT)
        return None if d is None else d.get(page & (DIR_PAGES - 1))

    def get_or_create(self, page: int) -> bytearray:
        d = self.dirs.get(page >> DIR_SHIFT)
        if d is None:
            d = self.dirs.setdefault(page >> DIR_SHIFT, {})
        p = d.get(page & (DIR_PAGES - 1))
        if p is None:
            p = d.setdefault(page & (DIR_PAGES - 1), bytearray(PAGE_SIZE))
        return p

    def free(self, page: int) -> None:
        d = self.dirs.get(page >> DIR_SHIFT)
        if d is not None:
            d.pop(page & (DIR_PAGES - 1), None)

    def allocated_pages(self, first: int, last: int) -> Iterator[int]:
        """Numbers of allocated pages in [first, last], in order."""
        first_dir, last_dir = first >> DIR_SHIFT, last >> DIR_SHIFT
        if last_dir - first_dir + 1 > len(self.dirs):
            dir_numbers = sorted(n for n in list(self.dirs) if first_dir <= n <= last_dir)
        else:
            dir_numbers = [n for n in range(first_dir, last_dir + 1) if n in self.dirs]
        for n in dir_numbers:
            d = self.dirs.get(n)
            if not d:
                continue
            base = n << DIR_SHIFT
            lo, hi = max(first - base, 0), min(last - base, DIR_PAGES - 1)
            if hi - lo + 1 <= len(d):
                slots = [slot for slot in range(lo, hi + 1) if slot in d]
            else:
                slots = sorted(slot for slot in list(d) if lo <= slot <= hi)
            for slot in slots:
                yield base + slot

    def bytes_allocated(self) -> int:
        return sum(len(d) for d in list(self.dirs.values())) * PAGE_SIZE


class SparseConnection(RamDisk):
    """Shared by every client: the plugin hands out the same object. Zero and
    trim are fast (they free or clear pages)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.pages = SparsePages()

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        get = self.pages.get
        for page, inner, take, pos in block_runs(offset, len(buf), PAGE_SIZE):
            data = get(page)
            buf[pos:pos + take] = ZERO_PAGE[:take] if data is None else data[inner:inner + take]

    def pread_buffers(self, count: int, offset: int, flags: int) -> list[memoryview]:
        """Views of the pages themselves: the server sends them without a copy."""
        get = self.pages.get
        out = []
        for page, inner, take, _ in block_runs(offset, count, PAGE_SIZE):
            data = get(page)
            out.append(ZERO_VIEW[:take] if data is None else memoryview(data)[inner:inner + take])
        return out

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        get_or_create = self.pages.get_or_create
        page, inner = divmod(offset, PAGE_SIZE)
        if inner + len(buf) <= PAGE_SIZE:  # the common case: one page
            get_or_create(page)[inner:inner + len(buf)] = buf
            return
        for page, inner, take, pos in block_runs(offset, len(buf), PAGE_SIZE):
            get_or_create(page)[inner:inner + take] = buf[pos:pos + take]

    def zero(self, count: int, offset: int, flags: int) -> None:
        self._clear(count, offset)

    def trim(self, count: int, offset: int, flags: int) -> None:
        self._clear(count, offset)

    def _clear(self, count: int, offset: int) -> None:
        end = offset + count
        first, last = offset >> PAGE_SHIFT, (end - 1) >> PAGE_SHIFT
        for page in list(self.pages.allocated_pages(first, last)):
            start = max(offset, page << PAGE_SHIFT) - (page << PAGE_SHIFT)
            stop = min(end, (page + 1) << PAGE_SHIFT) - (page << PAGE_SHIFT)
            if start == 0 and stop == PAGE_SIZE:
                self.pages.free(page)
                continue
            data = self.pages.get(page)
            if data is None:
                continue
            data[start:stop] = ZERO_PAGE[:stop - start]
            if data == ZERO_PAGE:
                self.pages.free(page)

    def extents(self, count: int, offset: int, flags: int) -> Iterator[Extent]:
        """Runs of allocated pages as data, the gaps between them as holes."""
        end = offset + count
        pages = self.pages.allocated_pages(offset >> PAGE_SHIFT, (end - 1) >> PAGE_SHIFT)
        return extents_of_runs(offset, end, ((max(page << PAGE_SHIFT, offset),
                                              min((page + 1) << PAGE_SHIFT, end)) for page in pages))


class ZstdConnection(SparseConnection):
    """Pages stored compressed; a per-page lock guards read-modify-write."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        import zstandard

        self._compress = zstandard.ZstdCompressor(level=1).compress
        self._decompress = zstandard.ZstdDecompressor().decompress
        self.compressed: dict[int, bytes] = {}
        self._locks: dict[int, threading.Lock] = {}
        self.pages = _CompressedIndex(self.compressed)

    def _lock(self, page: int) -> threading.Lock:
        lock = self._locks.get(page)
        return lock if lock is not None else self._locks.setdefault(page, threading.Lock())

    def _load(self, page: int) -> bytearray | None:
        blob = self.compressed.get(page)
        return None if blob is None else bytearray(self._decompress(blob, max_output_size=PAGE_SIZE))

    def pread_buffers(self, count: int, offset: int, flags: int) -> None:
        return None  # pages are compressed: pread decompresses into the buffer

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        for page, inner, take, pos in block_runs(offset, len(buf), PAGE_SIZE):
            data = self._load(page)
            buf[pos:pos + take] = ZERO_PAGE[:take] if data is None else data[inner:inner + take]

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        for page, inner, take, pos in block_runs(offset, len(buf), PAGE_SIZE):
            with self._lock(page):
                data = self._load(page) or bytearray(PAGE_SIZE)
                data[inner:inner + take] = buf[pos:pos + take]
                self.compressed[page] = self._compress(data)

    def _clear(self, count: int, offset: int) -> None:
        end = offset + count
        for page in list(self.pages.allocated_pages(offset >> PAGE_SHIFT, (end - 1) >> PAGE_SHIFT)):
            base = page << PAGE_SHIFT
            start, stop = max(offset, base) - base, min(end, base + PAGE_SIZE) - base
            with self._lock(page):
                data = self._load(page)
                if data is None:
                    continue
                data[start:stop] = ZERO_PAGE[:stop - start]
                if data == ZERO_PAGE:
                    self.compressed.pop(page, None)
                else:
                    self.compressed[page] = self._compress(data)


class _CompressedIndex(SparsePages):
    """Allocation queries over the compressed page dict (sorted on demand)."""

    def __init__(self, compressed: dict[int, bytes]) -> None:
        self.compressed = compressed

    def allocated_pages(self, first: int, last: int) -> Iterator[int]:
        return iter(sorted(p for p in list(self.compressed) if first <= p <= last))

    def bytes_allocated(self) -> int:
        return sum(len(v) for v in list(self.compressed.values()))


class FlatConnection(SparseConnection):
    """allocator=malloc: one anonymous mapping; extents report all data."""

    def __init__(self, size: int) -> None:
        RamDisk.__init__(self, size)  # no page table: the mapping holds the data
        self.map = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self.map)

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        buf[:] = self.view[offset:offset + len(buf)]

    def pread_buffers(self, count: int, offset: int, flags: int) -> list[memoryview]:
        return [self.view[offset:offset + count]]

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self.view[offset:offset + len(buf)] = buf

    def _clear(self, count: int, offset: int) -> None:
        first = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
        last = (offset + count) // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            self.view[offset:first] = bytes(first - offset)
            self.map.madvise(mmap.MADV_DONTNEED, first, last - first)
            self.view[last:offset + count] = bytes(offset + count - last)
        else:
            self.view[offset:offset + count] = bytes(count)

    def extents(self, count: int, offset: int, flags: int) -> Iterator[Extent]:
        yield Extent(offset, count)


class MemoryPlugin(Plugin):
    name = "memory"
    short_requests = True
    magic_param = "size"
    params = (
        Param("size", "size", "size of the disk", required=True),
        Param("allocator", "str", "how pages are stored", default="sparse",
              choices=("sparse", "malloc", "zstd")),
    )

    def config_complete(self) -> None:
        if self.size > MAX_SIZE:
            raise ConfigError("memory: size is larger than 2^63-1")
        if self.allocator == "malloc" and self.size > (1 << 47):
            raise ConfigError("memory: allocator=malloc cannot map more than 128 TiB")
        if self.allocator == "zstd":
            try:
                import zstandard  # noqa: F401
            except ImportError:
                raise ConfigError("memory: allocator=zstd needs the zstandard package") from None
        kind = {"sparse": SparseConnection, "malloc": FlatConnection, "zstd": ZstdConnection}
        self.disk = kind[self.allocator](self.size)

    def open(self, ctx) -> Connection:
        return self.disk
