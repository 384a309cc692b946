"""allocator=zstd: like sparse, but every 32 KiB page is kept compressed.

Slower than sparse (a write decompresses, changes and recompresses its
page), much smaller for compressible data. Reads return no views: the data
has to be decompressed into the reply buffer.

Locking:

- Reads take no lock: a page is an immutable ``bytes`` object that a write
  replaces in one dict assignment, so a read decompresses either the old or
  the new page.
- Writes, zeroes and trims of a page hold one of ``LOCK_STRIPES`` striped
  locks, chosen by page number: read-modify-write and the zero check before
  a free cannot interleave with another change of the same page. The number
  of locks is fixed, however many pages the disk has or had.
- Adding a page to a directory and removing an emptied directory hold
  ``_dir_lock``, so a directory is never dropped while a page goes into it.
- zstandard's compressor and decompressor objects are not thread safe (they
  run without the GIL): each thread has its own pair.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..blocks import block_runs
from ..connection import ZERO_BUFFER
from ..errors import ConfigError
from .allocator import DIR_MASK, DIR_SHIFT, PAGE_SHIFT, PAGE_SIZE, PagedAllocator

LOCK_STRIPES = 64
_ZERO = memoryview(ZERO_BUFFER)
_ZERO_PAGE = bytes(PAGE_SIZE)

Codec = tuple[Callable[[bytes | bytearray | memoryview], bytes], Callable[[bytes], bytes]]


class ZstdAllocator(PagedAllocator[bytes]):
    """A sparse array of zstd-compressed 32 KiB pages."""

    name = "zstd"

    def __init__(self, size: int, level: int = 1) -> None:
        super().__init__(size)
        try:
            import zstandard
        except ImportError:
            raise ConfigError("allocator=zstd needs the zstandard package") from None
        self._zstd = zstandard
        self.level = level
        self._locks = tuple(threading.Lock() for _ in range(LOCK_STRIPES))
        self._dir_lock = threading.Lock()
        self._codecs = threading.local()

    @property
    def lock_count(self) -> int:
        """How many page locks exist: LOCK_STRIPES, whatever was written."""
        return len(self._locks)

    def _codec(self) -> Codec:
        """This thread's (compress, decompress)."""
        try:
            codec: Codec = self._codecs.pair
        except AttributeError:
            compressor = self._zstd.ZstdCompressor(level=self.level)
            decompressor = self._zstd.ZstdDecompressor()
            codec = self._codecs.pair = (compressor.compress, decompressor.decompress)
        return codec

    def read(self, buf: memoryview, offset: int, flags: int = 0) -> None:
        decompress = self._codec()[1]
        for page, inner, take, pos in block_runs(offset, len(buf), PAGE_SIZE):
            blob = self.get_page(page)
            if blob is None:
                buf[pos:pos + take] = _ZERO[:take]
            else:
                buf[pos:pos + take] = memoryview(decompress(blob))[inner:inner + take]

    def write(self, buf: memoryview, offset: int, flags: int = 0) -> None:
        compress, decompress = self._codec()
        for page, inner, take, pos in block_runs(offset, len(buf), PAGE_SIZE):
            with self._locks[page % LOCK_STRIPES]:
                d = self._dirs.get(page >> DIR_SHIFT)
                blob = None if d is None else d.get(page & DIR_MASK)
                if take == PAGE_SIZE:  # the whole page: nothing to merge
                    new = compress(buf[pos:pos + take])
                else:
                    data = bytearray(PAGE_SIZE) if blob is None else bytearray(decompress(blob))
                    data[inner:inner + take] = buf[pos:pos + take]
                    new = compress(data)
                if blob is not None and d is not None:
                    d[page & DIR_MASK] = new  # d holds this page: it cannot be dropped now
                else:
                    self._add(page, new)

    def _add(self, page: int, blob: bytes) -> None:
        """Put a new page in place. Holds the page's lock."""
        with self._dir_lock:
            self._dirs.setdefault(page >> DIR_SHIFT, {})[page & DIR_MASK] = blob

    def zero(self, count: int, offset: int, flags: int = 0) -> None:
        if count <= 0:
            return
        decompress = self._codec()[1]
        end = offset + count
        for page in list(self.allocated_pages(offset >> PAGE_SHIFT, (end - 1) >> PAGE_SHIFT)):
            base = page << PAGE_SHIFT
            start, stop = max(offset - base, 0), min(end - base, PAGE_SIZE)
            with self._locks[page % LOCK_STRIPES]:
                blob = self.get_page(page)
                if blob is None:
                    continue
                if stop - start < PAGE_SIZE:
                    data = bytearray(decompress(blob))
                    data[start:stop] = _ZERO[:stop - start]
                    if data != _ZERO_PAGE:
                        self._dirs[page >> DIR_SHIFT][page & DIR_MASK] = self._codec()[0](data)
                        continue
                self._free(page)

    trim = zero

    def _free(self, page: int) -> None:
        """Drop a page, and its directory if that empties it. Holds the page's lock."""
        number = page >> DIR_SHIFT
        d = self._dirs.get(number)
        if d is None:
            return
        d.pop(page & DIR_MASK, None)
        if not d:
            with self._dir_lock:
                if not d and self._dirs.get(number) is d:
                    del self._dirs[number]

    @property
    def bytes_allocated(self) -> int:
        """Compressed bytes held."""
        return sum(len(blob) for d in list(self._dirs.values()) for blob in list(d.values()))
