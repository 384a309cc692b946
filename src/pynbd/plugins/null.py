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

from collections.abc import Iterable

from ..backend import FUA_NATIVE, Connection, Extent, Param, Plugin


class NullConnection(Connection):
    def __init__(self, size: int) -> None:
        self.size = size

    def get_size(self) -> int:
        return self.size

    def can_multi_conn(self) -> bool:
        return True

    def can_fua(self) -> int:
        return FUA_NATIVE

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        buf[:] = bytes(len(buf))

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        return None

    def zero(self, count: int, offset: int, flags: int) -> None:
        return None

    def trim(self, count: int, offset: int, flags: int) -> None:
        return None

    def flush(self, flags: int) -> None:
        return None

    def cache(self, count: int, offset: int, flags: int) -> None:
        return None

    def extents(self, count: int, offset: int, flags: int) -> Iterable[Extent]:
        return (Extent(offset, count, hole=True, zero=True),)


class NullPlugin(Plugin):
    name = "null"
    blocking = False
    params = (Param("size", "size", "virtual size in bytes", default=0),)
    magic_param = "size"

    def open(self, ctx) -> Connection:
        return NullConnection(self.size)
