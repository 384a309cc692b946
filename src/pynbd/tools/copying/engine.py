"""The copy itself: workers moving operations from the plan to the destination.

``--requests`` workers per connection (one in ``--synchronous`` mode or
when a stream is involved) each own one buffer of ``--request-size`` bytes,
allocated once. A worker takes the next operation from the plan:

- a range that reads as zero on the source is skipped when the destination
  already reads as zero (and ``--allocated`` is not given), else zeroed;
- data is read into the worker's buffer, split into runs of zero and
  non-zero ``--sparse`` blocks, and the runs are zeroed or written.

The first failure anywhere cancels every worker and is the copy's error; a
copy is reported as done only when every write (and ``--flush``) succeeded.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from ...proto.errors import ProtocolError
from .endpoint import CopyError, Endpoint
from .options import CopyOptions
from .plan import SLICE, Plan
from .progress import Progress
from .zeroes import ZeroScanner

_IO_ERRORS = (OSError, ProtocolError)


@dataclass
class Layout:
    """How the copy runs, decided from the options and both endpoints."""

    connections: int
    requests: int
    request_size: int
    sparse: int
    zero_piece: int
    length: int | None

    def describe(self) -> str:
        length = "unknown (stream)" if self.length is None else str(self.length)
        return (f"length {length}, {self.connections} connection(s), {self.requests} request(s) "
                f"in flight each, request size {self.request_size}, sparse block {self.sparse}")


@dataclass
class Counters:
    written: int = 0
    zeroed: int = 0
    skipped: int = 0


def plan_layout(opts: CopyOptions, src: Endpoint, dst: Endpoint, connections: int) -> Layout:
    """Request size, sparse block and parallelism for this pair of endpoints."""
    request_size = min(opts.request_size, src.max_request, dst.max_request)
    sparse = max(opts.sparse, dst.preferred_block) if opts.sparse else 0
    requests = 1 if is_sequential(opts, src, dst) else opts.requests_in_flight
    zero_piece = SLICE if dst.zero_is_cheap else request_size
    return Layout(connections, requests, request_size, sparse, zero_piece, src.size)


def is_sequential(opts: CopyOptions, src: Endpoint, dst: Endpoint) -> bool:
    return opts.synchronous or src.sequential or dst.sequential


def wrap(endpoint: Endpoint, exc: BaseException) -> CopyError:
    return exc if isinstance(exc, CopyError) else CopyError(endpoint.label, exc)


class Copier:
    """Runs one copy with a fixed layout."""

    def __init__(self, opts: CopyOptions, src: Endpoint, dst: Endpoint, layout: Layout,
                 progress: Progress) -> None:
        self.opts, self.src, self.dst, self.layout = opts, src, dst, layout
        self.progress = progress
        self.counters = Counters()
        self.plan = Plan(src, layout.length, layout.request_size, layout.zero_piece, opts.extents)
        self.scanner = ZeroScanner(layout.sparse, layout.request_size)
        self.skip_zeroes = dst.reads_as_zero and not opts.allocated
        self.elapsed = 0.0

    async def run(self) -> int:
        """Copy everything; return the number of bytes copied."""
        started = time.monotonic()
        self.progress.start()
        try:
            async with asyncio.TaskGroup() as group:
                for conn in range(self.layout.connections):
                    for _ in range(self.layout.requests):
                        group.create_task(self._worker(conn))
        except BaseExceptionGroup as failures:
            raise first_error(failures) from None
        length = self.plan.end if self.plan.end is not None else self.plan.position
        try:
            await self.dst.finish(0, length, self.opts.flush)
        except _IO_ERRORS as exc:
            raise wrap(self.dst, exc) from None
        self.progress.finish()
        self.elapsed = time.monotonic() - started
        return length

    async def _worker(self, conn: int) -> None:
        buf = bytearray(self.layout.request_size)
        view = memoryview(buf)
        while (op := await self.plan.next(conn)) is not None:
            offset, length, zero = op
            if zero:
                await self._zero(conn, offset, length)
            else:
                length = await self._copy(conn, buf, view, offset, length)
            self.progress.advance(length)

    async def _zero(self, conn: int, offset: int, length: int) -> None:
        if self.skip_zeroes:
            self.counters.skipped += length
            return
        try:
            await self.dst.zero(conn, length, offset, self.opts.allocated)
        except _IO_ERRORS as exc:
            raise wrap(self.dst, exc) from None
        self.counters.zeroed += length

    async def _copy(self, conn: int, buf: bytearray, view: memoryview, offset: int,
                    length: int) -> int:
        try:
            n = await self.src.read(conn, view[:length], offset)
        except _IO_ERRORS as exc:
            raise wrap(self.src, exc) from None
        if n < length:
            self.plan.stop(offset + n)
        if n and self.dst.size is not None and offset + n > self.dst.size:
            raise CopyError(self.dst.label, f"the source is larger than the destination "
                                            f"({self.dst.size} bytes)")
        for start, run, zero in self.scanner.runs(buf, n):
            if zero:
                await self._zero(conn, offset + start, run)
                continue
            try:
                await self.dst.write(conn, view[start:start + run], offset + start)
            except _IO_ERRORS as exc:
                raise wrap(self.dst, exc) from None
            self.counters.written += run
        return n


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The error to report from a failed group: a CopyError if there is one."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            pending[:0] = exc.exceptions
        else:
            leaves.append(exc)
    for exc in leaves:
        if isinstance(exc, CopyError):
            return exc
    return leaves[0]
