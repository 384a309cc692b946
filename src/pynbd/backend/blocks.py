"""Helpers for layers that produce or inspect the bytes themselves.

    from pynbd.backend import ResidentDisk, block_runs, fill_zero, is_zero

    class PatternDisk(ResidentDisk):          # size, multi-conn, a no-op cache
        def pread(self, buf, offset, flags):
            for block, inner, take, pos in block_runs(offset, len(buf), BLOCK):
                buf[pos:pos + take] = make_block(block)[inner:inner + take]

- ``fill_zero(view)`` zeroes a buffer in place and ``is_zero(view)`` tests
  one, a MiB at a time in C (no per-byte Python, no buffer-sized allocation).
- ``block_runs(offset, count, size)`` splits a byte range into the pieces
  that fall in each ``size``-byte block: (block number, offset in the block,
  length, offset in the range).
- ``extents_of_runs(offset, end, runs)`` turns ordered (start, stop) runs of
  data inside [offset, end) into extents: adjacent runs merged, the gaps
  between them reported as holes that read as zeroes.
- ``align_extents(extents, offset, count, align)`` aligns the extents of an
  aligned range to ``align`` (nbdkit's ``nbdkit_extents_aligned``): a block
  that straddles a boundary below is a hole or zero only if all of it is.
- ``ResidentDisk(size)`` is the base of disks whose bytes are at hand in
  this process, computed (zero, pattern, random) or held in RAM (memory,
  data): a fixed size, safe for many connections at once (every client sees
  the same bytes), and nothing to prefetch, so ``cache`` is a native no-op.
  ``RamDisk`` adds what a RAM disk has: writes are durable as soon as they
  are done (native FUA, a no-op flush) and the disk outlives each client.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from .connection import CACHE_NATIVE, FUA_NATIVE, Connection, Extent, clip_extents

_ZERO_BYTES = bytes(1 << 20)
_ZEROES = memoryview(_ZERO_BYTES)


def fill_zero(view: memoryview) -> None:
    """Zero ``view`` in place in 1 MiB strokes."""
    step = len(_ZEROES)
    for pos in range(0, len(view), step):
        piece = view[pos:pos + step]
        piece[:] = _ZEROES[:len(piece)]


def is_zero(view: memoryview) -> bool:
    """True if every byte of ``view`` is zero (compared a MiB at a time, in C)."""
    step = len(_ZERO_BYTES)
    # bytes == bytes is a memcmp; memoryview == memoryview compares item by item.
    return all(view[pos:pos + step].tobytes() == _ZERO_BYTES[:min(step, len(view) - pos)]
               for pos in range(0, len(view), step))


def block_runs(offset: int, count: int, size: int) -> Iterator[tuple[int, int, int, int]]:
    """(block, offset in block, length, offset in range) for each block the range touches."""
    pos = 0
    while pos < count:
        block, inner = divmod(offset + pos, size)
        take = min(size - inner, count - pos)
        yield block, inner, take, pos
        pos += take


def extents_of_runs(offset: int, end: int, runs: Iterable[tuple[int, int]]) -> Iterator[Extent]:
    """Data extents for ordered runs inside [offset, end), holes between them."""
    pos = offset  # everything before pos has been reported
    run_start = run_end = -1  # the data run being extended
    for start, stop in runs:
        if start != run_end:
            if run_end >= 0:
                if run_start > pos:
                    yield Extent(pos, run_start - pos, hole=True, zero=True)
                yield Extent(run_start, run_end - run_start)
                pos = run_end
            run_start = start
        run_end = stop
    if run_end >= 0:
        if run_start > pos:
            yield Extent(pos, run_start - pos, hole=True, zero=True)
        yield Extent(run_start, run_end - run_start)
        pos = run_end
    if pos < end:
        yield Extent(pos, end - pos, hole=True, zero=True)


def align_extents(extents: Iterable[Extent], offset: int, count: int, align: int) -> Iterator[Extent]:
    """Extents of the aligned range [offset, offset+count) whose boundaries all
    fall on multiples of ``align``: a block that straddles a boundary below is
    a hole or zero only if all of it is (as nbdkit's ``nbdkit_extents_aligned``)."""
    partial: tuple[int, bool, bool] | None = None  # a straddled block: start, hole, zero
    produced = False
    for ext in clip_extents(extents, offset, count):
        start, stop = ext.offset, ext.offset + ext.length
        hole, zero = ext.hole, ext.zero
        if partial is not None:
            block, hole_so_far, zero_so_far = partial
            hole_so_far, zero_so_far = hole_so_far and hole, zero_so_far and zero
            if stop < block + align:
                partial = (block, hole_so_far, zero_so_far)
                continue
            yield Extent(block, align, hole_so_far, zero_so_far)
            produced, partial, start = True, None, block + align
        aligned_stop = stop - stop % align
        if aligned_stop > start:
            yield Extent(start, aligned_stop - start, hole, zero)
            produced = True
        if stop > max(aligned_stop, start):
            partial = (aligned_stop, hole, zero)
    if partial is not None and not produced:  # the layer below said too little to align
        yield Extent(partial[0], align)  # data: the safe answer


class ResidentDisk(Connection):
    """A disk of ``size`` bytes that are computed or already in memory."""

    def __init__(self, size: int) -> None:
        self.size = size

    def get_size(self) -> int:
        return self.size

    def can_multi_conn(self) -> bool:
        return True

    def can_cache(self) -> int:
        return CACHE_NATIVE

    def cache(self, count: int, offset: int, flags: int) -> None:
        """Nothing to fetch: the bytes are at hand."""


class RamDisk(ResidentDisk):
    """A ResidentDisk whose writes land in memory shared by every client."""

    def can_fua(self) -> int:
        return FUA_NATIVE

    def flush(self, flags: int) -> None:
        """Nothing to make durable: the data lives in memory until the server exits."""

    def close(self) -> None:
        """Nothing to release: the disk outlives each client."""
