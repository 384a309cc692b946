"""memory: a RAM disk.

    pynbd serve memory 1G
    pynbd serve memory size=$((2**63-1))
    pynbd serve memory 10G allocator=zstd

Parameters
    size=SIZE          the size of the disk (the magic parameter), up to 2^63-1
    allocator=sparse   pages of 32 KiB allocated on first write and freed again
                       when trimmed or zeroed (the default); a page costs
                       memory only where it was written
    allocator=malloc   one flat anonymous mapping of the whole size (at most
                       128 TiB); pages the kernel never touched cost nothing,
                       zero/trim give them back; extents report all data
    allocator=zstd     like sparse, but every page is kept compressed with
                       zstandard: slower, much smaller for compressible data

The disk starts as zeroes and lives as long as the server; every client sees
the same data (so multi-conn is safe). Extents report pages that were never
written, or were trimmed or zeroed, as holes. Reads never wait for a lock;
with sparse, writes wait only for a zero or trim of the same moment, with
zstd a write or zero waits for another one on a page of the same lock stripe.
The allocators are in ``pynbd.backend.allocators``.
"""

from __future__ import annotations

from ..backend import ConfigError, Connection, Extent, OpenContext, Param, Plugin, RamDisk
from ..backend.allocators import ALLOCATORS, Allocator, create_allocator
from ..backend.params import MAX_SIZE


class MemoryDisk(RamDisk):
    """The one disk every client shares: a RamDisk over an allocator.

    The allocator's methods take the Connection's arguments; they are bound
    over the methods below when the disk is made, so a request goes straight
    to the allocator. The methods below say what the disk can do.
    """

    def __init__(self, size: int, allocator: Allocator) -> None:
        super().__init__(size)
        self.allocator = allocator
        for method, bound in (("pread", allocator.read), ("pread_buffers", allocator.read_buffers),
                              ("pwrite", allocator.write), ("zero", allocator.zero),
                              ("trim", allocator.trim), ("extents", allocator.extents)):
            setattr(self, method, bound)

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self.allocator.read(buf, offset, flags)

    def pread_buffers(self, count: int, offset: int, flags: int) -> list[memoryview] | None:
        return self.allocator.read_buffers(count, offset, flags)

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self.allocator.write(buf, offset, flags)

    def zero(self, count: int, offset: int, flags: int) -> None:
        self.allocator.zero(count, offset, flags)

    def trim(self, count: int, offset: int, flags: int) -> None:
        self.allocator.trim(count, offset, flags)

    def extents(self, count: int, offset: int, flags: int) -> list[Extent]:
        return list(self.allocator.extents(count, offset, flags))


class MemoryPlugin(Plugin):
    name = "memory"
    short_requests = True
    magic_param = "size"
    params = (
        Param("size", "size", "size of the disk", required=True),
        Param("allocator", "str", "how pages are stored", default="sparse",
              choices=tuple(ALLOCATORS)),
    )
    size: int  # set from the parameters
    allocator: str
    disk: MemoryDisk

    def config_complete(self) -> None:
        if self.size > MAX_SIZE:
            raise ConfigError("memory: size is larger than 2^63-1")
        try:
            allocator = create_allocator(self.allocator, self.size)
        except ConfigError as e:
            raise ConfigError(f"memory: {e}") from None
        self.disk = MemoryDisk(self.size, allocator)

    def open(self, ctx: OpenContext) -> Connection:
        return self.disk
