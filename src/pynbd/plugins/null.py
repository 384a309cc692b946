"""null: a disk that reads as zeroes and throws writes away.

    pynbd serve null 1G
    pynbd serve null size=10T

Parameters
    size=SIZE   the virtual size (the magic parameter; default 0)

Every read returns zeroes, writes, trims and zeroes succeed and are discarded,
and extents report the whole disk as a hole. Useful for measuring the server
and clients without any storage in the way.
"""

from __future__ import annotations

from ..backend import FUA_NATIVE, Connection, OpenContext, Param, Plugin
from .zero import ZeroDisk


class NullConnection(ZeroDisk):
    """The zero disk, writable: every write, zero and trim is accepted and forgotten."""

    def can_fua(self) -> int:
        return FUA_NATIVE

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        return None

    def zero(self, count: int, offset: int, flags: int) -> None:
        return None

    def trim(self, count: int, offset: int, flags: int) -> None:
        return None

    def flush(self, flags: int) -> None:
        return None


class NullPlugin(Plugin):
    name = "null"
    short_requests = True
    params = (Param("size", "size", "virtual size in bytes", default=0),)
    magic_param = "size"
    size: int

    def open(self, ctx: OpenContext) -> Connection:
        return NullConnection(self.size)
