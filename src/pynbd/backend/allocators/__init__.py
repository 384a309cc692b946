"""Allocators: where a RAM disk keeps its bytes (nbdkit's ``common/allocators``).

    from pynbd.backend.allocators import create_allocator

    alloc = create_allocator("sparse", size)      # or "malloc", "zstd"
    alloc.write(memoryview(b"hello"), 4096)
    alloc.read(buf, 4096)                         # fills buf
    alloc.read_buffers(4096, 0)                   # [view of ZERO_BUFFER]: a hole
    alloc.zero(4096, 4096)                        # frees the page again
    list(alloc.extents(1 << 20, 0))

The interface (``Allocator``, in ``allocator.py``) is read, read_buffers,
write, zero, trim, extents and ``bytes_allocated``; its methods take the
Connection methods' arguments, so a plugin binds them as its own. Every
allocator does its own locking and is safe for many connections at once:

- ``sparse`` (``SparseAllocator``): 32 KiB pages in a two-level directory,
  allocated on first write and freed when they become zero. Reads and
  writes take no lock; zero and trim lock per page, and a write that
  overlapped one is redone under that lock (see ``sparse.py``).
- ``malloc`` (``MallocAllocator``): one anonymous mapping of the whole disk;
  no locks, no extents.
- ``zstd`` (``ZstdAllocator``): like sparse with each page compressed;
  writes and zeroes hold one of a fixed set of striped locks.
"""

from __future__ import annotations

from ..errors import ConfigError
from .allocator import PAGE_SIZE, Allocator, PagedAllocator
from .malloc import MallocAllocator
from .sparse import PagePool, SparseAllocator
from .zstd import ZstdAllocator

ALLOCATORS: dict[str, type[Allocator]] = {
    cls.name: cls for cls in (SparseAllocator, MallocAllocator, ZstdAllocator)
}


def create_allocator(name: str, size: int) -> Allocator:
    """A new allocator of the type ``allocator=`` names, for a disk of ``size`` bytes.

    Raises ConfigError for an unknown name or one that cannot be made here
    (malloc larger than the address space, zstd without zstandard).
    """
    cls = ALLOCATORS.get(name)
    if cls is None:
        raise ConfigError(f"unknown allocator {name!r} (expected one of {', '.join(ALLOCATORS)})")
    return cls(size)


__all__ = [
    "ALLOCATORS", "PAGE_SIZE", "Allocator", "MallocAllocator", "PagePool", "PagedAllocator",
    "SparseAllocator", "ZstdAllocator", "create_allocator",
]
