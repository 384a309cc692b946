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
    allocator=malloc,mlock=true
                       the same, locked in RAM (mlock: never swapped out;
                       needs RLIMIT_MEMLOCK or root for large disks)
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
from ..backend.allocators import ALLOCATORS, Allocator, MallocAllocator, create_allocator
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


def _malloc_options(kind: str, extra: str) -> bool:
    """Whether ``allocator=malloc,mlock=true`` asks for locked memory (nbdkit's syntax)."""
    if not extra:
        return False
    if kind != "malloc":
        raise ConfigError(f"allocator={kind} does not take extra parameters")
    key, _, value = extra.partition("=")
    if key != "mlock" or value.lower() not in ("true", "false", "yes", "no", "on", "off", "1", "0"):
        raise ConfigError(f"allocator=malloc: unknown parameter {extra!r} (expected mlock=true|false)")
    return value.lower() in ("true", "yes", "on", "1")


class MemoryPlugin(Plugin):
    name = "memory"
    short_requests = True
    magic_param = "size"
    params = (
        Param("size", "size", "size of the disk", required=True),
        Param("allocator", "str", "how pages are stored: sparse, malloc[,mlock=true], zstd",
              default="sparse"),
    )
    size: int  # set from the parameters
    allocator: str
    disk: MemoryDisk

    def config_complete(self) -> None:
        if self.size > MAX_SIZE:
            raise ConfigError("memory: size is larger than 2^63-1")
        kind, _, extra = self.allocator.partition(",")
        try:
            if extra and kind not in ("malloc", *ALLOCATORS):
                raise ConfigError(f"unknown allocator {self.allocator!r}")
            mlock = _malloc_options(kind, extra)
            allocator = create_allocator(kind, self.size)
            if mlock and isinstance(allocator, MallocAllocator):
                allocator.lock()
        except ConfigError as e:
            raise ConfigError(f"memory: {e}") from None
        self.disk = MemoryDisk(self.size, allocator)

    def dump_plugin(self) -> list[str]:
        return ["mlock=yes"]

    def open(self, ctx: OpenContext) -> Connection:
        return self.disk
