"""What the copy engine needs from a source or a destination.

An endpoint is opened once and may then offer several connections (NBD
multi-conn), one per lane of the copy, each lane a thread with its own event
loop; every I/O call names the connection (an index) to use. Data moves
through caller-owned memoryviews, filled or sent in place.

    size          bytes, or None for a stream of unknown length
    sequential    only in order, one request at a time (pipes, stdin/stdout)
    reads_as_zero the destination is known to read as zeroes already
    max_connections()       how many connections it could use
    connect_lane(i) / close_lane(i)   connection i > 0, in lane i's event loop
    read(conn, view, offset) -> bytes filled (short only at a stream's end)
    write(conn, view, offset)
    zero(conn, count, offset, allocate)   make a range read as zeroes
    extents(conn, count, offset)          [(offset, length, zero)] or None
    finish(conn, length, flush)           after the last write
    close()
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from .zeroes import ZeroSource

UNLIMITED = sys.maxsize
NULL_SIZE = (1 << 63) - 1  # nbdcopy's null: is as large as a disk can be
ZEROES = ZeroSource(1024 * 1024)  # written where a destination cannot zero otherwise

Extent = tuple[int, int, bool]  # offset, length, reads as zero


class CopyError(Exception):
    """A failure the user sees as one line: ``WHERE: WHAT``."""

    def __init__(self, where: str, what: object) -> None:
        super().__init__(f"{where}: {what}")
        self.where, self.what = where, what


@dataclass
class Facts:
    """What ``-v`` prints about an endpoint."""

    kind: str
    zero_method: str = "write"


class Endpoint:
    """Defaults shared by every kind of endpoint."""

    size: int | None = None
    sequential: bool = False
    reads_as_zero: bool = False
    preferred_block: int = 4096
    max_request: int = 32 * 1024 * 1024
    zero_is_cheap = True  # one request zeroes a large range (no bytes sent)

    def __init__(self, label: str) -> None:
        self.label = label

    def facts(self) -> Facts:
        return Facts(type(self).__name__)

    def max_connections(self) -> int:
        return UNLIMITED

    async def connect_lane(self, lane: int) -> None:
        """Open connection ``lane`` (> 0) in the calling thread's event loop."""

    async def close_lane(self, lane: int) -> None:
        """Close what ``connect_lane`` opened, in the same event loop."""

    async def read(self, conn: int, view: memoryview, offset: int) -> int:
        raise CopyError(self.label, "cannot be read")

    async def write(self, conn: int, view: memoryview, offset: int) -> None:
        raise CopyError(self.label, "cannot be written")

    async def zero(self, conn: int, count: int, offset: int, allocate: bool) -> None:
        raise CopyError(self.label, "cannot be written")

    async def extents(self, conn: int, count: int, offset: int) -> list[Extent] | None:
        return None

    async def prepare(self, length: int | None, source: Endpoint) -> None:
        """Called on the destination before copying ``length`` bytes (None: unknown)."""

    async def write_zeroes(self, conn: int, count: int, offset: int) -> None:
        """Zero a range by writing zero bytes, in requests the endpoint accepts."""
        piece = min(self.max_request, len(ZEROES))
        while count > 0:
            n = min(piece, count)
            await self.write(conn, ZEROES.view[:n], offset)
            offset += n
            count -= n

    async def finish(self, conn: int, length: int, flush: bool) -> None:
        """Called once after a successful copy of ``length`` bytes."""

    async def close(self) -> None:
        """Release everything; safe to call after a failure."""


class NullEndpoint(Endpoint):
    """``null:``: a destination that throws everything away."""

    size = NULL_SIZE
    reads_as_zero = True

    def facts(self) -> Facts:
        return Facts("null", zero_method="discard")

    async def write(self, conn: int, view: memoryview, offset: int) -> None:
        return None

    async def zero(self, conn: int, count: int, offset: int, allocate: bool) -> None:
        return None
