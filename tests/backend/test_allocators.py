"""backend.allocators: the sparse, malloc and zstd allocators behind one interface.

The race tests force one interleaving of a zero/trim and a write from another
connection deterministically: a hook in the zero/trim (or in the write) runs
the other side in a thread and waits, with events, until that side has either
finished or is blocked on the allocator's lock.
"""

import threading

import pytest

from pynbd.backend import ZERO_BUFFER, ConfigError, Extent
from pynbd.backend.allocators import (
    ALLOCATORS,
    PAGE_SIZE,
    PagePool,
    SparseAllocator,
    ZstdAllocator,
    create_allocator,
)
from pynbd.backend.allocators.zstd import LOCK_STRIPES

MiB = 1 << 20
DEADLINE = 30  # seconds: only ever reached when a test fails


def data(n, seed=1):
    return memoryview(bytes((i * 7 + seed) % 251 + 1 for i in range(n)))


def read(alloc, count, offset):
    buf = memoryview(bytearray(b"\xee" * count))
    alloc.read(buf, offset)
    return bytes(buf)


def joined(buffers):
    return b"".join(bytes(b) for b in buffers)


# ---------------------------------------------------------------- the interface

@pytest.mark.parametrize("name", list(ALLOCATORS))
def test_round_trip_across_pages(name):
    alloc = create_allocator(name, 8 * MiB)
    assert alloc.name == name and alloc.size == 8 * MiB
    assert read(alloc, 5000, 98000) == bytes(5000)
    payload = data(3 * PAGE_SIZE + 1234)
    alloc.write(payload, PAGE_SIZE - 100)
    alloc.write(data(10, seed=9), 8 * MiB - 10)
    assert read(alloc, len(payload), PAGE_SIZE - 100) == bytes(payload)
    assert read(alloc, 202, PAGE_SIZE - 201) == bytes(101) + bytes(payload[:101])
    assert read(alloc, 10, 8 * MiB - 10) == bytes(data(10, seed=9))
    buffers = alloc.read_buffers(len(payload) + 200, PAGE_SIZE - 200)
    if buffers is not None:
        assert joined(buffers) == bytes(100) + bytes(payload) + bytes(100)


@pytest.mark.parametrize("name", list(ALLOCATORS))
@pytest.mark.parametrize("method", ["zero", "trim"])
def test_zero_and_trim_read_back_as_zeroes(name, method):
    alloc = create_allocator(name, 8 * MiB)
    alloc.write(data(4 * PAGE_SIZE), 0)
    getattr(alloc, method)(PAGE_SIZE, 1000)  # part of two pages
    assert read(alloc, 4 * PAGE_SIZE, 0) == (bytes(data(1000)) + bytes(PAGE_SIZE)
                                             + bytes(data(4 * PAGE_SIZE)[PAGE_SIZE + 1000:]))
    getattr(alloc, method)(8 * MiB, 0)
    assert read(alloc, 4 * PAGE_SIZE, 0) == bytes(4 * PAGE_SIZE)


@pytest.mark.parametrize("name", ["sparse", "zstd"])
def test_pages_are_freed_when_they_become_zero(name):
    alloc = create_allocator(name, 64 * MiB)
    alloc.write(data(100), 5)  # page 0
    alloc.write(data(100), 20 * MiB)  # another directory
    alloc.write(bytes(4096), 40 * MiB)  # zeroes written are still allocated
    assert alloc.page_count == 3 and alloc.dir_count == 3 and alloc.bytes_allocated > 0
    alloc.zero(50, 0)  # page 0 still holds data[50:]
    assert alloc.page_count == 3
    alloc.zero(100, 50)  # now page 0 is all zero: freed
    alloc.trim(1, 20 * MiB + 99)  # one byte of data left
    assert alloc.page_count == 2
    alloc.trim(PAGE_SIZE, 20 * MiB)
    alloc.zero(1, 40 * MiB)  # a page of zeroes is freed by any zero that touches it
    assert alloc.page_count == 0 and alloc.dir_count == 0 and alloc.bytes_allocated == 0


@pytest.mark.parametrize("name", ["sparse", "zstd"])
def test_extents_are_runs_of_pages(name):
    alloc = create_allocator(name, 8 * MiB)
    alloc.write(data(10), PAGE_SIZE + 5)
    alloc.write(data(PAGE_SIZE + 1), 2 * PAGE_SIZE)  # pages 2 and 3
    alloc.write(data(1), 6 * PAGE_SIZE)
    hole = dict(hole=True, zero=True)
    assert list(alloc.extents(8 * MiB, 0)) == [
        Extent(0, PAGE_SIZE, **hole), Extent(PAGE_SIZE, 3 * PAGE_SIZE),
        Extent(4 * PAGE_SIZE, 2 * PAGE_SIZE, **hole), Extent(6 * PAGE_SIZE, PAGE_SIZE),
        Extent(7 * PAGE_SIZE, 8 * MiB - 7 * PAGE_SIZE, **hole)]
    assert list(alloc.extents(100, 3 * PAGE_SIZE + 7)) == [Extent(3 * PAGE_SIZE + 7, 100)]


def test_malloc_extents_are_all_data_and_its_buffers_are_the_mapping():
    alloc = create_allocator("malloc", MiB)
    assert list(alloc.extents(MiB, 0)) == [Extent(0, MiB)]
    alloc.write(data(8), 100)
    (view,) = alloc.read_buffers(16, 96)
    assert bytes(view) == bytes(4) + bytes(data(8)) + bytes(4)


def test_sparse_holes_are_views_of_the_zero_buffer():
    alloc = create_allocator("sparse", MiB)
    alloc.write(data(10), PAGE_SIZE)
    hole, page = alloc.read_buffers(2 * PAGE_SIZE, 0)
    assert hole.obj is ZERO_BUFFER and len(hole) == PAGE_SIZE
    assert page.obj is not ZERO_BUFFER and bytes(page[:10]) == bytes(data(10))


def test_zstd_has_no_buffers_and_keeps_pages_compressed():
    alloc = create_allocator("zstd", 8 * MiB)
    assert alloc.read_buffers(4096, 0) is None
    alloc.write(memoryview(b"a" * (4 * PAGE_SIZE)), 0)
    assert alloc.page_count == 4 and alloc.bytes_allocated < PAGE_SIZE // 10


def test_largest_sparse_disk():
    size = 2**63 - 1
    alloc = create_allocator("sparse", size)
    alloc.write(data(4096), size - 4096)
    assert read(alloc, 4096, size - 4096) == bytes(data(4096))
    assert [e.hole for e in alloc.extents(2 * PAGE_SIZE, size - 2 * PAGE_SIZE)] == [True, False]


def test_bad_allocators_are_config_errors():
    with pytest.raises(ConfigError, match="unknown allocator"):
        create_allocator("slab", MiB)
    with pytest.raises(ConfigError, match="128 TiB"):
        create_allocator("malloc", 1 << 48)


# ---------------------------------------------------------------- the page pool

def test_pool_pages_start_zero_and_come_back_zero():
    pool = PagePool(PAGE_SIZE, arena_pages=2)
    page = pool.take()
    assert len(page) == PAGE_SIZE and bytes(page) == bytes(PAGE_SIZE)
    page[100:200] = data(100)
    assert pool.pages_in_use == 1
    del page  # the last view: the slot is zeroed and given back
    assert pool.pages_in_use == 0
    again = pool.take()
    assert bytes(again) == bytes(PAGE_SIZE) and len(pool.arenas) == 1


def test_freed_page_is_not_reused_while_a_read_view_of_it_lives():
    alloc = create_allocator("sparse", MiB)
    alloc.write(memoryview(b"x" * 4096), 0)
    (view,) = alloc.read_buffers(4096, 0)  # a reply on its way to a socket
    alloc.trim(PAGE_SIZE, 0)
    assert alloc.page_count == 0 and alloc.pool.pages_in_use == 1
    alloc.write(memoryview(b"y" * 4096), PAGE_SIZE)  # gets another slot
    assert bytes(view) == b"x" * 4096
    del view
    assert alloc.pool.pages_in_use == 1  # page 1 only
    assert read(alloc, 8192, 0) == bytes(4096) + bytes(4096)
    assert read(alloc, 4096, PAGE_SIZE) == b"y" * 4096


# ---------------------------------------------------------------- races, forced

class SignallingLock:
    """A lock that sets ``contended`` when an acquire has to wait."""

    def __init__(self, contended):
        self._lock = threading.Lock()
        self.contended = contended

    def __enter__(self):
        if not self._lock.acquire(blocking=False):
            self.contended.set()
            self._lock.acquire()
        return self

    def __exit__(self, *exc):
        self._lock.release()


class Writer(threading.Thread):
    """Another connection's write; sets ``progressed`` when it returns."""

    def __init__(self, alloc, buf, offset, progressed):
        super().__init__(daemon=True)
        self.alloc, self.buf, self.offset, self.progressed = alloc, buf, offset, progressed
        self.error = None

    def run(self):
        try:
            self.alloc.write(self.buf, self.offset)
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            self.progressed.set()


def test_write_between_the_zero_check_and_the_free_survives():
    """Zero [0, 4K) of a page whose only data is there; after the zero check
    says "all zero" and before the page is freed, another connection writes
    [8K, 12K) of the same page. The write must survive."""
    progressed = threading.Event()
    payload = data(4096, seed=3)
    writers = []

    class Hooked(SparseAllocator):
        def _is_zero_page(self, page):
            zero = super()._is_zero_page(page)
            if zero and not writers:
                writer = Writer(self, payload, 8192, progressed)
                writers.append(writer)
                writer.start()
                # The writer either finished (its write landed in this page) or
                # waits for the lock this zero holds.
                assert progressed.wait(DEADLINE)
            return zero

    alloc = Hooked(MiB)
    alloc.lock = SignallingLock(progressed)
    alloc.write(data(4096), 0)
    alloc.zero(4096, 0)
    writers[0].join(DEADLINE)
    assert not writers[0].is_alive() and writers[0].error is None
    assert read(alloc, 4096, 8192) == bytes(payload)
    assert read(alloc, 8192, 0) == bytes(8192)
    assert alloc.page_count == 1


def test_write_into_a_page_freed_under_it_survives():
    """A write looks its page up; before it copies, a trim of another part of
    the page finds the page all zero and frees it. The write must survive."""
    armed, trimmed = [], []

    class Hooked(SparseAllocator):
        def _page(self, page):
            p = super()._page(page)
            if page == 1 and armed and not trimmed:
                trimmed.append(True)
                trim = threading.Thread(target=self.trim, args=(4096, PAGE_SIZE))
                trim.start()
                trim.join(DEADLINE)
                assert not trim.is_alive() and self.get_page(1) is None  # freed under us
            return p

    alloc = Hooked(MiB)
    alloc.write(data(4096), PAGE_SIZE)  # page 1's only data, which the trim removes
    armed.append(True)
    payload = data(8192, seed=5)
    alloc.write(payload, 2 * PAGE_SIZE - 4096)  # spans pages 1 and 2
    assert trimmed
    assert read(alloc, 8192, 2 * PAGE_SIZE - 4096) == bytes(payload)
    assert read(alloc, 4096, PAGE_SIZE) == bytes(4096)


def test_concurrent_writers_race_for_one_new_page_and_agree():
    """Two writers create the same page at once: one page wins, both writes land."""
    first = data(100, seed=1)
    second = data(100, seed=2)
    done = []

    class Hooked(SparseAllocator):
        def _page(self, page):
            if not done:
                done.append(True)
                other = threading.Thread(target=self.write, args=(second, 1000))
                other.start()
                other.join(DEADLINE)
            return super()._page(page)

    alloc = Hooked(MiB)
    alloc.write(first, 0)
    assert read(alloc, 1100, 0) == bytes(first) + bytes(900) + bytes(second)
    assert alloc.page_count == 1 and alloc.pool.pages_in_use == 1


# ---------------------------------------------------------------- zstd locks

def test_zstd_locks_do_not_grow_with_pages_touched():
    alloc = ZstdAllocator(1 << 40)
    page = memoryview(b"z" * 512)
    for n in range(3000):
        alloc.write(page, n * 7 * PAGE_SIZE + 100)
    assert alloc.page_count == 3000 and alloc.lock_count == LOCK_STRIPES
    for n in range(0, 3000, 2):
        alloc.trim(PAGE_SIZE, n * 7 * PAGE_SIZE)
    for n in range(1, 3000, 2):
        alloc.zero(512, n * 7 * PAGE_SIZE + 100)
    assert alloc.page_count == 0 and alloc.dir_count == 0
    assert alloc.lock_count == LOCK_STRIPES <= 256


def test_zstd_threads_each_have_their_own_codec():
    alloc = ZstdAllocator(MiB)
    mine = alloc._codec()
    theirs = []
    t = threading.Thread(target=lambda: theirs.append(alloc._codec()))
    t.start()
    t.join(DEADLINE)
    assert mine is alloc._codec() and theirs and theirs[0][0].__self__ is not mine[0].__self__
