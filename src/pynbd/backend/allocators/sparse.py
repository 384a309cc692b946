"""allocator=sparse: 32 KiB pages allocated on first write, freed when zeroed.

Pages come from a ``PagePool``: slots of large anonymous mappings, so a new
page costs no memory until it is written and a 4 KiB write into it faults in
4 KiB, not 32 (a ``bytearray(32768)`` is filled with zeroes when made, which
touches all of it: tens of microseconds per new page).

Locking. Reads and writes take no lock; zero and trim take ``lock`` for each
page they free or clear, and a write that overlapped one of them is done
again under ``lock``. In detail:

- ``_gen`` is even when no zero/trim holds ``lock`` and odd while one does;
  a zero/trim adds 1 when it takes the lock and 1 before it lets go, so
  ``_gen`` only grows.
- A write reads ``_gen`` before it looks its pages up (creating missing ones
  with ``dict.setdefault``, atomic under the GIL) and after it has copied its
  data. If both reads are the same even number, no zero/trim ran at any
  moment of the write, so nothing it wrote into can have been freed, and
  anything a later zero/trim checks sees the data. Otherwise the write is
  done again under ``lock``, where no zero/trim runs and nothing frees pages.
- A zero/trim checks that a page is all zeroes and frees it under ``lock``:
  a write cannot land between the check and the free unnoticed, since that
  write's ``_gen`` window overlaps the lock.
- A page leaves the table only when it is all zeroes (or wholly zeroed), so
  a read racing with a zero of *another* part of the page never sees a
  missing page. A page that left the table is not reused while any view of
  it (a read buffer on its way to a socket, a writer mid-copy) is alive.

The fast path of a write to an existing page is two dict lookups, one copy
and two reads of ``_gen``.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import threading
import weakref
from typing import Any

from ..blocks import block_runs
from ..connection import ZERO_BUFFER
from .allocator import DIR_MASK, DIR_SHIFT, PAGE_MASK, PAGE_SHIFT, PAGE_SIZE, PagedAllocator

ZERO_VIEW = memoryview(ZERO_BUFFER)  # read_buffers: the server sends these as holes
_ZERO_PAGE = bytearray(PAGE_SIZE)  # never written; a bytearray on the left compares with memcmp
ARENA_PAGES = 256  # pages per mapping: 8 MiB
_DONTNEED = mmap.MADV_DONTNEED


class PagePool:
    """Zero-filled writable pages of ``page_size`` bytes, carved from anonymous mappings.

    ``take()`` returns a page as a memoryview. Each page is a ctypes array
    over its slot of a mapping (holding the mapping alive), so it is the
    exporter of every view made of it; a weak reference to it fires when the
    last view is gone (the page left its table and nobody still reads or
    writes it). Only then is the
    slot given back: MADV_DONTNEED returns its memory to the kernel (it
    reads as zeroes again) and the slot goes on the free list. Mappings are
    kept; their slots are reused.
    """

    def __init__(self, page_size: int, arena_pages: int = ARENA_PAGES) -> None:
        self.page_size = page_size
        self.arena_size = page_size * arena_pages
        self._page_type = ctypes.c_char * page_size
        self._free: list[tuple[mmap.mmap, int, int]] = []  # (arena, offset, address) to hand out
        self._held: dict[int, tuple[weakref.ref[Any], mmap.mmap, int, int]] = {}  # id(ref) → slot
        self._refill_lock = threading.Lock()
        self.arenas: list[mmap.mmap] = []

    def take(self) -> memoryview:
        try:
            arena, offset, address = self._free.pop()
        except IndexError:
            arena, offset, address = self._refill()
        cpage = self._page_type.from_address(address)
        setattr(cpage, "arena", arena)  # noqa: B010 (the mapping outlives every view of the page)
        ref = weakref.ref(cpage, self._give_back)
        self._held[id(ref)] = (ref, arena, offset, address)
        return memoryview(cpage).cast("B")

    def _give_back(self, ref: weakref.ref[Any]) -> None:
        slot = self._held.pop(id(ref), None)
        if slot is None:
            return
        _, arena, offset, address = slot
        arena.madvise(_DONTNEED, offset, self.page_size)
        self._free.append((arena, offset, address))

    def _refill(self) -> tuple[mmap.mmap, int, int]:
        with self._refill_lock:
            with contextlib.suppress(IndexError):  # unless another thread refilled meanwhile
                return self._free.pop()
            arena = mmap.mmap(-1, self.arena_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self.arenas.append(arena)
            base = ctypes.addressof(ctypes.c_char.from_buffer(arena))
            # Handed out in address order (pop takes from the end).
            self._free.extend((arena, off, base + off)
                              for off in range(self.arena_size - self.page_size, 0, -self.page_size))
            return arena, 0, base

    @property
    def pages_in_use(self) -> int:
        return len(self._held)


class SparseAllocator(PagedAllocator[memoryview]):
    """A sparse array of 32 KiB pages of memory, up to 2^63-1 bytes."""

    name = "sparse"

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.pool = PagePool(PAGE_SIZE)
        self.lock = threading.Lock()  # held by zero/trim per page, and by a write that raced one
        self._gen = 0  # odd while a zero/trim holds the lock

    # ---- reads: no lock
    def read(self, buf: memoryview, offset: int, flags: int = 0) -> None:
        n = len(buf)
        inner = offset & PAGE_MASK
        if inner + n <= PAGE_SIZE:  # the common case: one page
            page = offset >> PAGE_SHIFT
            d = self._dirs.get(page >> DIR_SHIFT)
            p = None if d is None else d.get(page & DIR_MASK)
            buf[:] = ZERO_VIEW[:n] if p is None else p[inner:inner + n]
            return
        lookup = self.get_page
        for page, inner, take, pos in block_runs(offset, n, PAGE_SIZE):
            p = lookup(page)
            buf[pos:pos + take] = ZERO_VIEW[:take] if p is None else p[inner:inner + take]

    def read_buffers(self, count: int, offset: int, flags: int = 0) -> list[memoryview]:
        """Views of the pages themselves: the server sends them without a copy."""
        inner = offset & PAGE_MASK
        if inner + count <= PAGE_SIZE:
            page = offset >> PAGE_SHIFT
            d = self._dirs.get(page >> DIR_SHIFT)
            p = None if d is None else d.get(page & DIR_MASK)
            return [ZERO_VIEW[:count] if p is None else p[inner:inner + count]]
        # The server's read path: the page walk is written out (block_runs'
        # generator costs a third more on a 256 KiB read).
        dirs = self._dirs
        out = []
        pos = 0
        while pos < count:
            page = (offset + pos) >> PAGE_SHIFT
            inner = (offset + pos) & PAGE_MASK
            take = min(PAGE_SIZE - inner, count - pos)
            d = dirs.get(page >> DIR_SHIFT)
            p = None if d is None else d.get(page & DIR_MASK)
            out.append(ZERO_VIEW[:take] if p is None else p[inner:inner + take])
            pos += take
        return out

    # ---- writes: no lock unless a zero/trim ran meanwhile
    def write(self, buf: memoryview, offset: int, flags: int = 0) -> None:
        gen = self._gen
        inner = offset & PAGE_MASK
        end = inner + len(buf)
        if end <= PAGE_SIZE:  # the common case: one page, already allocated
            page = offset >> PAGE_SHIFT
            d = self._dirs.get(page >> DIR_SHIFT)
            if d is not None:
                p = d.get(page & DIR_MASK)
                if p is not None:
                    p[inner:end] = buf
                    if self._gen == gen and not gen & 1:
                        return
        self._write_again(buf, offset)

    def _write_again(self, buf: memoryview, offset: int) -> None:
        """A write that allocates, spans pages, or raced a zero/trim."""
        gen = self._gen
        if not gen & 1:
            self._write_pages(buf, offset)
            if self._gen == gen:
                return
        with self.lock:
            self._write_pages(buf, offset)

    def _write_pages(self, buf: memoryview, offset: int) -> None:
        for page, inner, take, pos in block_runs(offset, len(buf), PAGE_SIZE):
            self._page(page)[inner:inner + take] = buf[pos:pos + take]

    def _page(self, page: int) -> memoryview:
        """The page, allocated if it is not. Writers racing for a new page agree on one."""
        d = self._dirs.get(page >> DIR_SHIFT)
        if d is None:
            d = self._dirs.setdefault(page >> DIR_SHIFT, {})
        p = d.get(page & DIR_MASK)
        if p is None:
            p = d.setdefault(page & DIR_MASK, self.pool.take())  # a loser's page goes back
        return p

    # ---- zero and trim: under the lock, one page at a time
    def zero(self, count: int, offset: int, flags: int = 0) -> None:
        if count <= 0:
            return
        end = offset + count
        for page in list(self.allocated_pages(offset >> PAGE_SHIFT, (end - 1) >> PAGE_SHIFT)):
            base = page << PAGE_SHIFT
            start, stop = max(offset - base, 0), min(end - base, PAGE_SIZE)
            with self.lock:
                self._gen += 1
                try:
                    self._clear(page, start, stop)
                finally:
                    self._gen += 1

    trim = zero

    def _clear(self, page: int, start: int, stop: int) -> None:
        """Zero [start, stop) of a page; free it if it is then all zeroes. Holds ``lock``."""
        number = page >> DIR_SHIFT
        d = self._dirs.get(number)
        if d is None:
            return
        p = d.get(page & DIR_MASK)
        if p is None:
            return
        if stop - start < PAGE_SIZE:
            p[start:stop] = ZERO_VIEW[:stop - start]
            if not self._is_zero_page(p):
                return
        del d[page & DIR_MASK]
        if not d and self._dirs.get(number) is d:
            del self._dirs[number]

    def _is_zero_page(self, page: memoryview) -> bool:
        return _ZERO_PAGE == page

    @property
    def bytes_allocated(self) -> int:
        return self.page_count * PAGE_SIZE

