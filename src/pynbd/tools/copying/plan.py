"""The work list of a copy: what to read and what to zero, in disk order.

The disk is taken a slice (128 MiB) at a time; the source's extents for the
slice are asked for once and turned into operations:

    (offset, length, False)   data: read it (at most one request's worth)
    (offset, length, True)    a range that reads as zero on the source

Every worker (there are ``--requests`` per connection) takes the next
operation, so the slices are shared out among the connections as they go.
Only one worker at a time fetches extents; the others keep copying what is
already queued. A source of unknown length (a stream) yields data operations
until a worker reports its end with ``stop``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator

from .endpoint import CopyError, Endpoint, Extent

SLICE = 128 * 1024 * 1024

Op = tuple[int, int, bool]


class Plan:
    """Hands out operations covering ``[0, end)`` (``end`` None: until ``stop``)."""

    def __init__(self, source: Endpoint, end: int | None, request_size: int,
                 zero_piece: int, use_extents: bool) -> None:
        self.source, self.end = source, end
        self.request_size, self.zero_piece = request_size, zero_piece
        self.use_extents = use_extents
        self.position = 0  # where the next slice starts
        self._ops: deque[Op] = deque()
        self._lock = asyncio.Lock()
        self.extents_failed: str | None = None

    def _more(self) -> bool:
        return self.end is None or self.position < self.end

    def stop(self, at: int) -> None:
        """The source ended at ``at``: nothing more to hand out."""
        self.end = at
        self._ops.clear()

    async def next(self, conn: int) -> Op | None:
        """The next operation, or None when the copy is fully handed out."""
        while not self._ops:
            if not self._more():
                return None
            async with self._lock:
                if not self._ops and self._more():
                    await self._fill(conn)
        return self._ops.popleft()

    async def _fill(self, conn: int) -> None:
        start = self.position
        if self.end is None:
            self._ops.append((start, self.request_size, False))
            self.position += self.request_size
            return
        stop = min(self.end, start + SLICE)
        for extent in await self._extents(conn, start, stop):
            self._ops.extend(self._split(*extent))
        self.position = stop

    async def _extents(self, conn: int, start: int, stop: int) -> list[Extent]:
        found: list[Extent] = []
        offset = start
        while self.use_extents and offset < stop:
            try:
                got = await self.source.extents(conn, stop - offset, offset)
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

    def _split(self, offset: int, length: int, zero: bool) -> Iterator[Op]:
        piece = self.zero_piece if zero else self.request_size
        end = offset + length
        while offset < end:
            n = min(piece, end - offset)
            yield (offset, n, zero)
            offset += n
