"""full: a disk that reads as zeroes and has no space left for writes.

    pynbd serve full 1G

Parameters
    [size=]SIZE   the size of the disk (required)

Reads return zeroes and extents report a hole; every write, zero and trim
fails with ENOSPC (no space left on device), as on a thin-provisioned disk
whose host ran out of space. Use it to check how a client handles ENOSPC.
"""

from __future__ import annotations

import errno

from ..backend import Connection, OpenContext, Param, Plugin
from ..backend.errors import io_error
from .zero import ZeroDisk


class FullDisk(ZeroDisk):
    """The zero disk, writable in name: every write, zero and trim fails with ENOSPC
    (at once, so fast zero is offered too)."""

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        raise io_error(errno.ENOSPC, "write")

    def zero(self, count: int, offset: int, flags: int) -> None:
        raise io_error(errno.ENOSPC, "zero")

    def trim(self, count: int, offset: int, flags: int) -> None:
        raise io_error(errno.ENOSPC, "trim")


class FullPlugin(Plugin):
    short_requests = True
    name = "full"
    magic_param = "size"
    params = (Param("size", "size", "size of the disk", required=True),)
    size: int

    def open(self, ctx: OpenContext) -> Connection:
        return FullDisk(self.size)
