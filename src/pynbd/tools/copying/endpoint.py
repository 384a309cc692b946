"""What the copy engine needs from a source or a destination.

An endpoint is opened once and may then offer several connections (NBD
multi-conn), one per lane of the copy; every I/O call names the connection
(an index) to use. Data moves through caller-owned memoryviews, filled or
sent in place. Reads, writes and zeroes are started by the lane and finish
by calling ``done(bytes, error)`` exactly once, at once (files, TLS) or
later from the copy's event loop (NBD replies; ``pynbd backup``: from a
connection's receiver thread); if the call raises instead, ``done`` is not
called.

    size          bytes, or None for a stream of unknown length
    sequential    only in order, one request at a time (pipes, stdin/stdout)
    reads_as_zero the destination is known to read as zeroes already
    max_connections()       how many connections it could use
    connect_lane(i) / close_lane(i)   connection i > 0 (the copy opens them all first)
    read(conn, view, offset, done)    done(bytes filled, error): short only at a stream's end
    write(conn, view, offset, done)
    zero(conn, count, offset, allocate, done)   make a range read as zeroes
    extents(conn, count, offset)      [(offset, length, zero)] or None (blocking)
    changes(conn, count, offset)      [(offset, length, changed)] (``--dirty-bitmap``, blocking)
    finish(conn, length, flush)       after the last write (blocking)
    close()
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ...proto.errors import ProtocolError
from .zeroes import ZeroSource

UNLIMITED = sys.maxsize
NULL_SIZE = (1 << 63) - 1  # nbdcopy's null: is as large as a disk can be
ZEROES = ZeroSource(1024 * 1024)  # written where a destination cannot zero otherwise

Extent = tuple[int, int, bool]  # offset, length, reads as zero
Done = Callable[[int, "BaseException | None"], None]  # bytes done, the error if it failed


class CopyError(Exception):
    """A failure the user sees as one line: ``WHERE: WHAT``."""

    def __init__(self, where: str, what: object) -> None:
        super().__init__(f"{where}: {what}")
        self.where, self.what = where, what


def start(operation: Callable[..., None], done: Done, *args: object) -> None:
    """Call ``operation(*args, done)``; if it raises, hand the error to ``done``."""
    try:
        operation(*args, done)
    except (CopyError, OSError, ProtocolError) as exc:
        done(0, exc)


class Fanout:
    """Calls ``done(total, first error)`` once every part, and the starter, has finished.

    ``part()`` hands out one completion callback per piece of work; the
    starter calls ``close()`` (with the error that stopped it, if any) when
    it has started every piece, so that ``done`` cannot run too early.
    """

    def __init__(self, total: int, done: Done) -> None:
        self.total, self.done = total, done
        self.left = 1
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def part(self) -> Done:
        with self._lock:
            self.left += 1
        return self._finished

    def close(self, error: BaseException | None = None) -> None:
        self._finished(0, error)

    def _finished(self, n: int, error: BaseException | None) -> None:
        with self._lock:
            if error is not None and self.error is None:
                self.error = error
            self.left -= 1
            last = self.left == 0
        if last:
            self.done(self.total, self.error)


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

    def connect_lane(self, lane: int) -> None:
        """Open connection ``lane`` (> 0)."""

    def close_lane(self, lane: int) -> None:
        """Close what ``connect_lane`` opened."""

    def read(self, conn: int, view: memoryview, offset: int, done: Done) -> None:
        raise CopyError(self.label, "cannot be read")

    def write(self, conn: int, view: memoryview, offset: int, done: Done) -> None:
        raise CopyError(self.label, "cannot be written")

    def zero(self, conn: int, count: int, offset: int, allocate: bool, done: Done) -> None:
        raise CopyError(self.label, "cannot be written")

    def extents(self, conn: int, count: int, offset: int) -> list[Extent] | None:
        return None

    def changes(self, conn: int, count: int, offset: int) -> list[Extent]:
        """Ranges from ``offset`` flagged where they changed since the checkpoint."""
        raise CopyError(self.label, "has no changed-block map (--dirty-bitmap needs an NBD source)")

    def prepare(self, length: int | None, source: Endpoint, keep: bool = False) -> None:
        """Called on the destination before copying ``length`` bytes (None: unknown);
        ``keep``: the copy updates what the destination holds (``--dirty-bitmap``)."""

    def write_zeroes(self, conn: int, count: int, offset: int, done: Done) -> None:
        """Zero a range by writing zero bytes, in requests the endpoint accepts."""
        piece = min(self.max_request, len(ZEROES))
        fan = Fanout(count, done)
        while count > 0 and fan.error is None:
            n = min(piece, count)
            start(self.write, fan.part(), conn, ZEROES.view[:n], offset)
            offset += n
            count -= n
        fan.close()

    def finish(self, conn: int, length: int, flush: bool) -> None:
        """Called once after a successful copy of ``length`` bytes."""

    def close(self) -> None:
        """Release everything; safe to call after a failure."""


class NullEndpoint(Endpoint):
    """``null:``: a destination that throws everything away."""

    size = NULL_SIZE
    reads_as_zero = True

    def facts(self) -> Facts:
        return Facts("null", zero_method="discard")

    def write(self, conn: int, view: memoryview, offset: int, done: Done) -> None:
        done(len(view), None)

    def zero(self, conn: int, count: int, offset: int, allocate: bool, done: Done) -> None:
        done(count, None)
