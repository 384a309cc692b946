"""The work list of a copy: what to read and what to zero.

The disk is split into slices (128 MiB) handed out in order (``Slices``).
The copy's ``Plan`` asks the source for the extents of a slice once (on
connection 0) and turns them into operations, handed to whichever lane
has a free slot:

    (offset, length, DATA)    data: read it (at most one request's worth)
    (offset, length, ZERO)    a range that reads as zero on the source
    (offset, length, CLEAN)   unchanged since the checkpoint (``--dirty-bitmap``):
                              left as it is on the destination

With ``--dirty-bitmap`` the source's changed ranges are asked for too, and
only changed ranges are data or zero (``dirty.classify``).

Extents are fetched while the requests already started keep going (the
copy's loop goes on receiving replies meanwhile). A source of unknown
length (a stream) is cut into request-sized slices until a read reports
its end with ``stop``. When anything fails, ``abort`` makes the plan run
dry. ``pynbd backup`` plans its reads with the same classes.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator

from .dirty import CLEAN, classify, covered
from .endpoint import CopyError, Endpoint, Extent

SLICE = 128 * 1024 * 1024

Op = tuple[int, int, int]  # offset, length, DATA | ZERO | CLEAN


class Slices:
    """``[0, end)`` in slices, for any number of threads (``end`` None: until ``stop``)."""

    def __init__(self, end: int | None, size: int = SLICE) -> None:
        self.end, self.size = end, size
        self.position = 0  # where the next slice starts
        self.aborted = False
        self._lock = threading.Lock()

    def take(self) -> tuple[int, int] | None:
        with self._lock:
            if self.aborted or (self.end is not None and self.position >= self.end):
                return None
            start = self.position
            stop = start + self.size if self.end is None else min(self.end, start + self.size)
            self.position = stop
            return start, stop

    def stop(self, at: int) -> None:
        """The source ended at ``at``."""
        with self._lock:
            self.end = at

    def abort(self) -> None:
        self.aborted = True

    @property
    def length(self) -> int:
        """How much was handed out in all (the copy's length, once done)."""
        return self.end if self.end is not None else self.position


class Plan:
    """The copy's queue of operations, refilled a slice at a time (status asked on
    connection 0)."""

    def __init__(self, source: Endpoint, slices: Slices, request_size: int,
                 zero_piece: int, use_extents: bool, dirty: bool = False) -> None:
        self.source, self.slices = source, slices
        self.request_size, self.zero_piece = request_size, zero_piece
        self.use_extents = use_extents and slices.end is not None
        self.dirty = dirty
        self._ops: deque[Op] = deque()
        self.extents_failed: str | None = None

    def stop(self, at: int) -> None:
        """The source ended at ``at``: nothing more to hand out."""
        self.slices.stop(at)
        self._ops.clear()

    def next(self) -> Op | None:
        """The next operation, or None when there is nothing left (or the copy failed)."""
        while not self._ops:
            piece = self.slices.take()
            if piece is None:
                return None
            self._fill(*piece)
        if self.slices.aborted:
            return None
        return self._ops.popleft()

    def _fill(self, start: int, stop: int) -> None:
        extents = self._extents(start, stop)
        for offset, length, kind in (classify(extents, self._changes(start, stop))
                                     if self.dirty else extents):
            if kind == CLEAN:
                self._ops.append((offset, length, CLEAN))
            else:
                self._ops.extend(self._split(offset, length, kind))

    def _changes(self, start: int, stop: int) -> list[Extent]:
        """The source's changed ranges over ``[start, stop)``, all of it."""
        found: list[Extent] = []
        offset = start
        while offset < stop:
            got = self.source.changes(0, stop - offset, offset)
            if covered(got) <= offset:
                raise CopyError(self.source.label, f"no changed-block map at offset {offset}")
            found.extend(got)
            offset = covered(got)
        return found

    def _extents(self, start: int, stop: int) -> list[Extent]:
        found: list[Extent] = []
        offset = start
        while self.use_extents and offset < stop:
            try:
                got = self.source.extents(0, stop - offset, offset)
            except (CopyError, OSError) as exc:
                self.extents_failed = str(exc)  # reading everything is slower but still right
                self.use_extents = False
                break
            if not got:
                if got is None:
                    self.use_extents = False
                break
            found.extend(got)
            if got[-1][0] + got[-1][1] <= offset:
                break
            offset = got[-1][0] + got[-1][1]
        if offset < stop:
            found.append((offset, stop - offset, False))
        return found

    def _split(self, offset: int, length: int, kind: int) -> Iterator[Op]:
        piece = self.zero_piece if kind else self.request_size
        end = offset + length
        while offset < end:
            n = min(piece, end - offset)
            yield (offset, n, kind)
            offset += n
