"""zero: a read-only disk of zeroes, empty unless given a size.

    pynbd serve zero
    pynbd serve zero 1G

Parameters
    [size=]SIZE   the size (default 0: a zero-length disk, like nbdkit's zero
                  plugin, which takes no parameters)

Reads return zeroes; the disk is read-only and extents report one hole.
Useful for corner cases in clients: a zero-length export, or a large empty
read-only one (see also "null", which accepts and discards writes).
"""

from __future__ import annotations

from collections.abc import Iterable

from ..backend import Connection, Extent, OpenContext, Param, Plugin, ResidentDisk, fill_zero


class ZeroDisk(ResidentDisk):
    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        fill_zero(buf)

    def extents(self, count: int, offset: int, flags: int) -> Iterable[Extent]:
        return (Extent(offset, count, hole=True, zero=True),)


class ZeroPlugin(Plugin):
    short_requests = True
    name = "zero"
    magic_param = "size"
    params = (Param("size", "size", "size of the disk", default=0),)
    size: int

    def open(self, ctx: OpenContext) -> Connection:
        return ZeroDisk(self.size)
