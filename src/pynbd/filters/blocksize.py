"""blocksize: meet the block-size limits of the layer below for any client.

    pynbd serve --filter=blocksize file disk.img minblock=512
    pynbd serve --filter=blocksize nbd socket=/tmp/sock maxdata=32M
    pynbd serve --filter=blocksize --filter=truncate file disk.img minblock=4k round-up=4k

Parameters (sizes take k/M/G suffixes)
    minblock=SIZE   the alignment and smallest request the layer below sees:
                    a power of two up to 64k (default: what the layer below
                    reports as its minimum, or 1)
    maxdata=SIZE    the largest read or write passed down (default 64M, or
                    less if the layer below says so); a multiple of minblock
    maxlen=SIZE     the largest zero, trim, cache or block-status request
                    passed down (default 4G-1 rounded down to minblock); a
                    multiple of minblock

Clients may then send requests of any size and alignment. Reads are widened
to whole blocks; writes and zeroes with an unaligned head or tail are done by
read-modify-write of those blocks; the unaligned head and tail of a trim are
ignored (trim is advisory); big requests are cut into pieces. The served
size is rounded down to minblock (add ``--filter=truncate round-up=...``
above to reach the last bytes).

The preferred block size advertised is the largest of the layer below's,
4096 and minblock; block status is aligned to minblock, a block that is only
partly a hole or zero below reported as data (nbdkit's rules).

Parallel writes stay correct: a write or zero with a read-modify-write holds
an exclusive lock on the blocks it touches while it runs, so it never
overwrites data another request wrote into the same block in the meantime;
aligned writes, zeroes and trims hold a shared lock, so they run in parallel
with each other and wait only for a read-modify-write of the same blocks.
A fast zero that would need read-modify-write fails with ENOTSUP.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from ..backend import (
    FLAG_FAST_ZERO,
    FLAG_FUA,
    Connection,
    Extent,
    Filter,
    FilterConnection,
    OpenContext,
    Param,
    align_extents,
    io_error,
)
from ..backend.errors import ConfigError

MAX_MINBLOCK = 64 * 1024
DEFAULT_MAXDATA = 64 * 1024 * 1024
PROTOCOL_MAXLEN = 0xFFFFFFFF


class RangeLock:
    """Shared and exclusive locks on half-open integer ranges: an exclusive hold
    waits for every overlapping hold, a shared one only for exclusive ones."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: list[tuple[int, int, bool]] = []

    @contextmanager
    def hold(self, start: int, end: int, exclusive: bool = True) -> Iterator[None]:
        token = (start, end, exclusive)
        with self._cond:
            while any(s < end and start < e and (exclusive or x) for s, e, x in self._held):
                self._cond.wait()
            self._held.append(token)
        try:
            yield
        finally:
            with self._cond:
                self._held.remove(token)
                self._cond.notify_all()


def pieces(offset: int, count: int, limit: int) -> Iterator[tuple[int, int]]:
    """(offset, length) pieces of at most ``limit`` bytes covering the range."""
    end = offset + count
    while offset < end:
        n = min(limit, end - offset)
        yield offset, n
        offset += n


class BlocksizeConnection(FilterConnection["BlocksizeFilter"]):
    def __init__(self, next: Connection, filter: BlocksizeFilter, ctx: OpenContext) -> None:
        super().__init__(next, filter, ctx)
        below_min, self.below_preferred, below_max = next.block_size()
        self.minblock = filter.minblock or below_min or 1
        if self.minblock & (self.minblock - 1) or self.minblock > MAX_MINBLOCK:
            raise io_error(errno.EINVAL, f"blocksize: the layer below needs blocks of {self.minblock}")
        self.maxdata = filter.maxdata or min(DEFAULT_MAXDATA, below_max or DEFAULT_MAXDATA)
        self.maxdata -= self.maxdata % self.minblock
        self.maxlen = filter.maxlen or PROTOCOL_MAXLEN - PROTOCOL_MAXLEN % self.minblock
        self.size = next.get_size() // self.minblock * self.minblock
        self.locks = filter.locks

    def get_size(self) -> int:
        return self.size

    def block_size(self) -> tuple[int, int, int]:
        return (1, max(self.below_preferred, self.minblock, 4096), PROTOCOL_MAXLEN)

    def _split(self, count: int, offset: int) -> tuple[int, int, int, int]:
        """(head, middle start, middle length, tail): the aligned middle and the ragged ends."""
        mb = self.minblock
        start = -(-offset // mb) * mb
        stop = (offset + count) // mb * mb
        if stop <= start:  # inside one block (or straddling one boundary)
            return count, offset + count, 0, 0
        return start - offset, start, stop - start, offset + count - stop

    def _blocks(self, count: int, offset: int) -> tuple[int, int]:
        mb = self.minblock
        return offset // mb * mb, -(-(offset + count) // mb) * mb

    # -------------------------------------------------------------- reads
    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        head, mid, mid_len, tail = self._split(len(buf), offset)
        if head:
            self._read_ragged(buf[:head], offset, flags)
        for pos, n in pieces(mid, mid_len, self.maxdata):
            self.next.pread(buf[pos - offset:pos - offset + n], pos, flags)
        if tail:
            self._read_ragged(buf[len(buf) - tail:], mid + mid_len, flags)

    def _read_ragged(self, out: memoryview, offset: int, flags: int) -> None:
        """Read whole blocks around an unaligned piece through a bounce buffer."""
        start, end = self._blocks(len(out), offset)
        bounce = memoryview(bytearray(end - start))
        for pos, n in pieces(start, end - start, self.maxdata):
            self.next.pread(bounce[pos - start:pos - start + n], pos, flags)
        out[:] = bounce[offset - start:offset - start + len(out)]

    # -------------------------------------------------------------- writes
    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self._write(len(buf), offset, flags, buf)

    def zero(self, count: int, offset: int, flags: int) -> None:
        head, _, _, tail = self._split(count, offset)
        if (head or tail) and flags & FLAG_FAST_ZERO:
            raise io_error(errno.ENOTSUP, "blocksize: an unaligned fast zero would be slow")
        self._write(count, offset, flags, None)

    def _write(self, count: int, offset: int, flags: int, buf: memoryview | None) -> None:
        """Write ``buf`` (or zeroes when None) with read-modify-write at the ragged ends."""
        head, mid, mid_len, tail = self._split(count, offset)
        with self.locks.hold(*self._blocks(count, offset), exclusive=bool(head or tail)):
            if head:
                self._modify(offset, None if buf is None else buf[:head], head, flags)
            if buf is None:
                for pos, n in pieces(mid, mid_len, self.maxlen):
                    self.next.zero(n, pos, flags)
            else:
                for pos, n in pieces(mid, mid_len, self.maxdata):
                    self.next.pwrite(buf[pos - offset:pos - offset + n], pos, flags)
            if tail:
                self._modify(mid + mid_len, None if buf is None else buf[count - tail:], tail, flags)

    def _modify(self, offset: int, data: memoryview | None, count: int, flags: int) -> None:
        """Read the blocks around [offset, offset+count), patch them, write them back."""
        start, end = self._blocks(count, offset)
        block = memoryview(bytearray(end - start))
        for pos, n in pieces(start, end - start, self.maxdata):
            self.next.pread(block[pos - start:pos - start + n], pos, 0)
        inner = block[offset - start:offset - start + count]
        if data is None:
            inner[:] = bytes(count)
        else:
            inner[:] = data
        for pos, n in pieces(start, end - start, self.maxdata):
            self.next.pwrite(block[pos - start:pos - start + n], pos, flags & FLAG_FUA)

    # -------------------------------------------------------------- no data
    def trim(self, count: int, offset: int, flags: int) -> None:
        _, mid, mid_len, _ = self._split(count, offset)
        if mid_len:
            with self.locks.hold(mid, mid + mid_len, exclusive=False):
                self._each(self.next.trim, mid, mid_len, flags)

    def cache(self, count: int, offset: int, flags: int) -> None:
        start, end = self._blocks(count, offset)
        self._each(self.next.cache, start, end - start, flags)

    def _each(self, op: Callable[[int, int, int], None], offset: int, count: int, flags: int) -> None:
        for pos, n in pieces(offset, count, self.maxlen):
            op(n, pos, flags)

    def extents(self, count: int, offset: int, flags: int) -> Iterable[Extent]:
        start, end = self._blocks(count, offset)
        count = min(end - start, self.maxlen)
        below = self.next.extents(count, start, flags)
        return below if self.minblock == 1 else align_extents(below, start, count, self.minblock)


class BlocksizeFilter(Filter):
    short_requests = True
    name = "blocksize"
    params = (
        Param("minblock", "size", "alignment and smallest request passed down (power of 2, <= 64k)"),
        Param("maxdata", "size", "largest read or write passed down"),
        Param("maxlen", "size", "largest zero, trim, cache or extents request passed down"),
    )
    minblock: int | None
    maxdata: int | None
    maxlen: int | None
    connection = BlocksizeConnection

    def config_complete(self) -> None:
        mb = self.minblock
        if mb is not None and (mb < 1 or mb & (mb - 1) or mb > MAX_MINBLOCK):
            raise ConfigError(f"blocksize: minblock={mb}: must be a power of 2 no larger than 64k")
        for key, value in (("maxdata", self.maxdata), ("maxlen", self.maxlen)):
            if value is not None and (value < (mb or 1) or value % (mb or 1)):
                raise ConfigError(f"blocksize: {key}={value}: must be a multiple of minblock "
                                  f"({mb or 1})")
        if self.maxlen is not None and self.maxlen > PROTOCOL_MAXLEN:
            raise ConfigError(f"blocksize: maxlen={self.maxlen}: larger than 4G-1")
        self.locks = RangeLock()
