"""cache: keep disk blocks in a local temporary file in front of a slow plugin.

    pynbd serve --filter=cache curl https://example.com/disk.img
    pynbd serve --filter=cache nbd socket=/tmp/remote cache=writethrough
    pynbd serve --filter=readahead --filter=cache ssh host=h /disk cache-on-read=true
    pynbd serve --filter=cache file disk.img cache=unsafe cache-max-size=1G

Parameters
    cache=writeback       writes stay in the cache until the client flushes
                          (then dirty blocks go down in order) — the default
    cache=writethrough    writes go down at once and update cached blocks
    cache=unsafe          like writeback, but flush does nothing: dirty
                          blocks reach the plugin only when evicted. Data is
                          lost when the server exits; for scratch disks only.
    cache-min-block-size=SIZE  the cache's block size: a power of 2, at least
                          4k (default 64k, or the temp file system's block
                          size if larger)
    cache-max-size=SIZE   keep the cache about this big (default: unlimited)
    cache-high-threshold=PCT, cache-low-threshold=PCT
                          once the cache passes PCT-high of the maximum,
                          least recently used blocks are dropped (dirty ones
                          written down first) until it is under PCT-low
                          (defaults 95 and 80)
    cache-on-read=BOOL    also keep blocks the client reads (default false)
    cache-on-read=/PATH   keep them only while /PATH exists

The cache is a sparse temporary file in ``$TMPDIR`` (or the system temp
directory), unlinked as soon as it is created, with each block at its own
offset; zeroed blocks are punched out of it. All clients share one cache.
NBD_CMD_CACHE fills it. Writes that are not flushed in writeback mode live
only in the cache and are lost when the server stops — as with nbdkit, a
client that cares must flush. Extents come from the plugin, except that
ranges with unflushed blocks are reported as data.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager

from ..backend import (
    CACHE_NATIVE,
    FUA_EMULATE,
    ConfigError,
    Connection,
    Extent,
    Filter,
    FilterConnection,
    OpenContext,
    Param,
    is_zero,
    linux,
    parse_bool,
)
from ..backend.overlay import pread_all, pwrite_all
from .blocksize import RangeLock

MODES = ("writeback", "writethrough", "unsafe")
DEFAULT_BLOCK = 64 * 1024
WRITE_BACK_BYTES = 4 * 1024 * 1024
_EXTENT_CHECK_BLOCKS = 4096  # larger ranges with dirty blocks are reported as data


def runs(numbers: Iterator[int] | list[int], longest: int = 0) -> Iterator[tuple[int, int]]:
    """(first, last) of each run of consecutive integers in a sorted sequence,
    cut into runs of at most ``longest`` numbers when that is given."""
    for _, group in itertools.groupby(enumerate(numbers), lambda pair: pair[1] - pair[0]):
        members = [n for _, n in group]
        step = longest or len(members)
        for i in range(0, len(members), step):
            yield members[i], members[min(i + step, len(members)) - 1]


class BlockCache:
    """The cache of one server: a sparse file, its block map and LRU order."""

    def __init__(self, size: int, block: int, mode: str, max_size: int | None,
                 high: int, low: int, on_read: Callable[[], bool]) -> None:
        self.size = size
        self.block = block
        self.mode = mode
        self.on_read = on_read
        self.high = None if not max_size else max_size * high // 100
        self.low = None if not max_size else max_size * low // 100
        self.file = tempfile.TemporaryFile(prefix="pynbd-cache-")
        self.fd = self.file.fileno()
        os.ftruncate(self.fd, size)
        self.blocks: OrderedDict[int, bool] = OrderedDict()  # block -> dirty, LRU first
        self.meta = threading.Lock()
        self.locks = RangeLock()
        self.batch = max(1, WRITE_BACK_BYTES // block)  # blocks written down in one request

    def close(self) -> None:
        self.file.close()

    # -------------------------------------------------------------- bookkeeping
    def span(self, count: int, offset: int) -> tuple[int, int]:
        """First and last block touched by a request."""
        return offset // self.block, (offset + count - 1) // self.block

    def hold(self, first: int, last: int) -> AbstractContextManager[None]:
        return self.locks.hold(first, last + 1)

    def bounds(self, b: int) -> tuple[int, int]:
        return b * self.block, min((b + 1) * self.block, self.size)

    def lookup(self, first: int, last: int) -> list[bool]:
        """Which blocks are cached (and mark them recently used)."""
        with self.meta:
            present = [b in self.blocks for b in range(first, last + 1)]
            for b, hit in zip(range(first, last + 1), present, strict=True):
                if hit:
                    self.blocks.move_to_end(b)
        return present

    def mark(self, first: int, last: int, dirty: bool) -> None:
        with self.meta:
            for b in range(first, last + 1):
                self.blocks[b] = dirty
                self.blocks.move_to_end(b)

    def dirty_blocks(self) -> list[int]:
        with self.meta:
            return sorted(b for b, dirty in self.blocks.items() if dirty)

    # -------------------------------------------------------------- reads
    def read(self, below: Connection, buf: memoryview, offset: int) -> None:
        first, last = self.span(len(buf), offset)
        end = offset + len(buf)
        with self.hold(first, last):
            present = self.lookup(first, last)
            b = first
            for hit, group in itertools.groupby(present):
                n = len(list(group))
                lo, hi = max(offset, b * self.block), min(end, (b + n) * self.block)
                view = buf[lo - offset:hi - offset]
                if hit:
                    pread_all(self.fd, view, lo)
                elif self.on_read():
                    self._load(below, b, b + n - 1)
                    pread_all(self.fd, view, lo)
                else:
                    below.pread(view, lo, 0)
                b += n
        self.reclaim(below)

    def _load(self, below: Connection, first: int, last: int) -> None:
        """Copy blocks from the plugin into the cache as clean (lock held)."""
        start, end = first * self.block, self.bounds(last)[1]
        bounce = memoryview(bytearray(end - start))
        below.pread(bounce, start, 0)
        pwrite_all(self.fd, bounce, start)
        self.mark(first, last, dirty=False)

    def prefetch(self, below: Connection, count: int, offset: int) -> None:
        first, last = self.span(count, offset)
        with self.hold(first, last):
            present = self.lookup(first, last)
            missing = [b for b, hit in zip(range(first, last + 1), present, strict=True) if not hit]
            for lo, hi in runs(missing):
                self._load(below, lo, hi)
        self.reclaim(below)

    # -------------------------------------------------------------- writes
    def write(self, below: Connection, data: memoryview | None, count: int, offset: int,
              flags: int) -> None:
        """Write ``data`` (zeroes when None) through the cache."""
        first, last = self.span(count, offset)
        with self.hold(first, last):
            if self.mode == "writethrough":
                if data is None:
                    below.zero(count, offset, flags)
                else:
                    below.pwrite(data, offset, flags)
                self._patch_cached(data, count, offset, first, last)
            else:
                for b in range(first, last + 1):
                    self._store(below, b, data, count, offset)
                self.mark(first, last, dirty=True)
        self.reclaim(below)

    def _piece(self, b: int, count: int, offset: int) -> tuple[int, int, bool]:
        """The part of block b a request covers: (lo, hi, whole block?)."""
        start, end = self.bounds(b)
        lo, hi = max(start, offset), min(end, offset + count)
        return lo, hi, (lo, hi) == (start, end)

    def _put(self, data: memoryview | None, lo: int, hi: int, offset: int) -> None:
        if data is None:
            # Zeroes: a hole, or zero bytes where the temp file system has no
            # holes (any other error is the request's).
            if not linux.try_punch_hole(self.fd, lo, hi - lo):
                linux.write_zeroes(self.fd, lo, hi - lo)
        else:
            pwrite_all(self.fd, data[lo - offset:hi - offset], lo)

    def _store(self, below: Connection, b: int, data: memoryview | None, count: int,
               offset: int) -> None:
        lo, hi, whole = self._piece(b, count, offset)
        if not whole and not self.lookup(b, b)[0]:
            self._load(below, b, b)
        if data is None and not whole:
            linux.write_zeroes(self.fd, lo, hi - lo)
        else:
            self._put(data, lo, hi, offset)

    def _patch_cached(self, data: memoryview | None, count: int, offset: int,
                      first: int, last: int) -> None:
        for b, hit in zip(range(first, last + 1), self.lookup(first, last), strict=True):
            if hit:
                lo, hi, _ = self._piece(b, count, offset)
                if data is None:
                    linux.write_zeroes(self.fd, lo, hi - lo)
                else:
                    self._put(data, lo, hi, offset)

    def trim(self, below: Connection, count: int, offset: int, flags: int) -> None:
        """Forget whole blocks of the range (their content is now undefined), then trim below."""
        first, last = self.span(count, offset)
        with self.hold(first, last):
            whole = [b for b in range(first, last + 1) if self._piece(b, count, offset)[2]]
            self._forget(whole)
            below.trim(count, offset, flags)

    def _forget(self, blocks: list[int]) -> None:
        with self.meta:
            for b in blocks:
                self.blocks.pop(b, None)
        # Only to give the space back: forgotten blocks are never read again
        # (a block is written whole before it is next marked cached), so a
        # file system without holes keeps the old bytes.
        for lo, hi in runs(blocks):
            linux.try_punch_hole(self.fd, lo * self.block, self.bounds(hi)[1] - lo * self.block)

    # -------------------------------------------------------------- flushing and eviction
    def flush(self, below: Connection) -> None:
        """Write every dirty block down, in disk order, then flush below."""
        for first, last in runs(self.dirty_blocks(), self.batch):
            with self.hold(first, last):
                self._write_back(below, first, last)
        if below.can_flush():
            below.flush(0)

    def _write_back(self, below: Connection, first: int, last: int) -> None:
        """Write the still-dirty blocks of [first, last] down (lock held)."""
        with self.meta:
            still = [b for b in range(first, last + 1) if self.blocks.get(b)]
        for lo, hi in runs(still, self.batch):
            start, end = lo * self.block, self.bounds(hi)[1]
            bounce = memoryview(bytearray(end - start))
            pread_all(self.fd, bounce, start)
            if below.can_zero() and is_zero(bounce):
                below.zero(end - start, start, 0)
            else:
                below.pwrite(bounce, start, 0)
            self.mark(lo, hi, dirty=False)

    def reclaim(self, below: Connection) -> None:
        """Drop least recently used blocks while the cache is over its limit."""
        high, low = self.high, self.low
        if high is None or low is None:
            return
        with self.meta:
            if len(self.blocks) * self.block <= high:
                return
        while True:
            with self.meta:
                if len(self.blocks) * self.block <= low or not self.blocks:
                    return
                victim = next(iter(self.blocks))
            with self.hold(victim, victim):
                self._write_back(below, victim, victim)
                self._forget([victim])

    def has_dirty(self, first: int, last: int) -> bool | None:
        """Whether blocks in the range are dirty; None if the range is too big to check."""
        with self.meta:
            if not any(self.blocks.values()):
                return False
            if last - first > _EXTENT_CHECK_BLOCKS:
                return None
            return any(self.blocks.get(b) for b in range(first, last + 1))


class CacheConnection(FilterConnection["CacheFilter"]):
    def __init__(self, next: Connection, filter: CacheFilter, ctx: OpenContext) -> None:
        super().__init__(next, filter, ctx)
        self.store = filter.cache_for(next.get_size())
        self.mode = filter.cache

    def can_flush(self) -> bool:
        return True if self.mode != "writethrough" else self.next.can_flush()

    def can_fua(self) -> int:
        return self.next.can_fua() if self.mode == "writethrough" else FUA_EMULATE

    def can_zero(self) -> bool:
        return True if self.mode != "writethrough" else self.next.can_zero()

    def can_fast_zero(self) -> bool:
        return True if self.mode != "writethrough" else self.next.can_fast_zero()

    def can_cache(self) -> int:
        return CACHE_NATIVE

    def can_multi_conn(self) -> bool:
        # One cache serves every client, so they all see the same data.
        return self.mode != "writethrough" or self.next.can_multi_conn()

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self.store.read(self.next, buf, offset)

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self.store.write(self.next, buf, len(buf), offset, flags)

    def zero(self, count: int, offset: int, flags: int) -> None:
        # (fast zero reaches here only where it is offered: in writethrough
        # mode the layer below's answer, which its boundary enforces)
        self.store.write(self.next, None, count, offset, flags)

    def trim(self, count: int, offset: int, flags: int) -> None:
        self.store.trim(self.next, count, offset, flags)

    def cache(self, count: int, offset: int, flags: int) -> None:
        self.store.prefetch(self.next, count, offset)

    def flush(self, flags: int) -> None:
        if self.mode == "writeback":
            self.store.flush(self.next)
        elif self.mode == "writethrough":
            self.next.flush(flags)

    def extents(self, count: int, offset: int, flags: int) -> Iterable[Extent]:
        dirty = self.store.has_dirty(*self.store.span(count, offset))
        if dirty is False:
            return self.next.extents(count, offset, flags)
        if dirty is None:
            return (Extent(offset, count),)
        return self._extents_with_dirty(count, offset, flags)

    def _extents_with_dirty(self, count: int, offset: int, flags: int) -> Iterator[Extent]:
        """Extents below, with every dirty block shown as data."""
        store = self.store
        for ext in self.next.extents(count, offset, flags):
            if not (ext.hole or ext.zero):
                yield ext
                continue
            pos, end = ext.offset, ext.offset + ext.length
            first, last = store.span(ext.length, ext.offset)
            with store.meta:
                dirty = [b for b in range(first, last + 1) if store.blocks.get(b)]
            for lo, hi in runs(dirty):
                start, stop = max(lo * store.block, pos), min(store.bounds(hi)[1], end)
                if start > pos:
                    yield Extent(pos, start - pos, ext.hole, ext.zero)
                yield Extent(start, stop - start)
                pos = stop
            if pos < end:
                yield Extent(pos, end - pos, ext.hole, ext.zero)


class CacheFilter(Filter):
    short_requests = True
    name = "cache"
    params = (
        Param("cache", "str", "writeback, writethrough or unsafe", default="writeback",
              choices=MODES),
        Param("cache-min-block-size", "size", "block size of the cache (power of 2, >= 4k)"),
        Param("cache-max-size", "size", "keep the cache about this big"),
        Param("cache-high-threshold", "int", "start reclaiming at this % of the maximum", default=95),
        Param("cache-low-threshold", "int", "reclaim down to this % of the maximum", default=80),
        Param("cache-on-read", "str", "true, false or /PATH: cache blocks that are read",
              default="false"),
    )
    cache: str
    cache_min_block_size: int | None
    cache_max_size: int | None
    cache_high_threshold: int
    cache_low_threshold: int
    cache_on_read: str
    connection = CacheConnection

    def config_complete(self) -> None:
        block = self.cache_min_block_size
        if block is None:
            block = max(DEFAULT_BLOCK, os.statvfs(tempfile.gettempdir()).f_bsize)
        if block < 4096 or block & (block - 1):
            raise ConfigError(f"cache: cache-min-block-size={block}: must be a power of 2, >= 4096")
        self.block = block
        if not 0 < self.cache_low_threshold < self.cache_high_threshold <= 100:
            raise ConfigError("cache: thresholds must satisfy 0 < cache-low-threshold < "
                              "cache-high-threshold <= 100")
        self.on_read = self._on_read_rule(self.cache_on_read)
        self._store: BlockCache | None = None
        self._lock = threading.Lock()

    @staticmethod
    def _on_read_rule(text: str) -> Callable[[], bool]:
        if text.startswith("/"):
            return lambda: os.path.exists(text)
        try:
            value = parse_bool(text)
        except ValueError:
            raise ConfigError(f"cache: cache-on-read={text}: expected true, false or /PATH") from None
        return lambda: value

    def cache_for(self, size: int) -> BlockCache:
        """The server's one cache, created when the first client connects."""
        with self._lock:
            if self._store is None:
                self._store = BlockCache(size, self.block, self.cache, self.cache_max_size,
                                         self.cache_high_threshold, self.cache_low_threshold,
                                         self.on_read)
            return self._store

    def unload(self) -> None:
        if self._store is not None:
            self._store.close()
