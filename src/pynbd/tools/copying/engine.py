"""The copy itself: lanes of workers moving operations to the destination.

A lane is one connection to each end with its own event loop: lane 0 runs
in the main loop, every other lane in a thread of its own, so the system
calls of several connections (which release the GIL) overlap. There are as
many lanes as ``--connections``, at most ``--threads`` (by default the
number of processors, as nbdcopy does) and one if a server cannot multi-conn. Lanes share
the disk through ``Slices``. In each lane, ``--requests`` workers (one in
``--synchronous`` mode or when a stream is involved) each own one buffer of
``--request-size`` bytes, allocated once, and take the lane's next operation:

- a range that reads as zero on the source is skipped when the destination
  already reads as zero (and ``--allocated`` is not given), else zeroed;
- data is read into the worker's buffer, split into runs of zero and
  non-zero ``--sparse`` blocks, and the runs are zeroed or written.

The first failure anywhere stops every lane and is the copy's error; a copy
is reported as done only when every write (and ``--flush``) succeeded.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from dataclasses import dataclass, fields

from ...proto.errors import ProtocolError
from .endpoint import CopyError, Endpoint
from .options import CopyOptions
from .plan import SLICE, Plan, Slices
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

    def add(self, other: Counters) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def plan_layout(opts: CopyOptions, src: Endpoint, dst: Endpoint) -> Layout:
    """Connections, request size, sparse block and parallelism for these endpoints."""
    sequential = is_sequential(opts, src, dst)
    connections = 1 if sequential else max(1, min(opts.connections, threads_for(opts),
                                                  src.max_connections(), dst.max_connections()))
    request_size = min(opts.request_size, src.max_request, dst.max_request)
    sparse = max(opts.sparse, dst.preferred_block) if opts.sparse else 0
    requests = 1 if sequential else opts.requests_in_flight
    zero_piece = SLICE if dst.zero_is_cheap else request_size
    return Layout(connections, requests, request_size, sparse, zero_piece, src.size)


def threads_for(opts: CopyOptions) -> int:
    """``-T``, or the processors this process may run on (nbdcopy's default)."""
    return opts.threads or len(os.sched_getaffinity(0)) or 1


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
        self.slices = Slices(layout.length)
        self.lanes = [Lane(self, i) for i in range(layout.connections)]
        self.skip_zeroes = dst.reads_as_zero and not opts.allocated
        self.failures: list[BaseException] = []
        self.elapsed = 0.0

    @property
    def counters(self) -> Counters:
        total = Counters()
        for lane in self.lanes:
            total.add(lane.counters)
        return total

    @property
    def extents_failed(self) -> str | None:
        return next((lane.plan.extents_failed for lane in self.lanes
                     if lane.plan.extents_failed), None)

    def fail(self, exc: BaseException) -> None:
        """Record a lane's failure and make every lane stop."""
        self.failures.append(exc)
        self.slices.abort()

    async def run(self) -> int:
        """Copy everything; return the number of bytes copied."""
        started = time.monotonic()
        self.progress.start()
        threads = [threading.Thread(target=lane.run_in_thread, name=f"copy-lane-{lane.index}",
                                    daemon=True) for lane in self.lanes[1:]]
        for thread in threads:
            thread.start()
        try:
            await self.lanes[0].run()
        except BaseException:
            self.slices.abort()  # interrupted: the other lanes stop at their next operation
            raise
        finally:
            for thread in threads:
                await asyncio.to_thread(thread.join)
        if self.failures:
            raise self.failures[0]
        length = self.slices.length
        try:
            await self.dst.finish(0, length, self.opts.flush)
        except _IO_ERRORS as exc:
            raise wrap(self.dst, exc) from None
        self.progress.finish()
        self.elapsed = time.monotonic() - started
        return length


class Lane:
    """One connection to each end and the workers that use them."""

    def __init__(self, copier: Copier, index: int) -> None:
        self.copier, self.index = copier, index
        layout = copier.layout
        self.src, self.dst = copier.src, copier.dst
        self.plan = Plan(self.src, copier.slices, layout.request_size, layout.zero_piece,
                         copier.opts.extents)
        self.scanner = ZeroScanner(layout.sparse, layout.request_size)
        self.counters = Counters()
        self.allocate = copier.opts.allocated

    def run_in_thread(self) -> None:
        asyncio.run(self.run())

    async def run(self) -> None:
        """Connect (lanes after the first), run the workers, disconnect; never raises."""
        opened: list[Endpoint] = []
        try:
            for endpoint in (self.src, self.dst) if self.index else ():
                await endpoint.connect_lane(self.index)
                opened.append(endpoint)
            async with asyncio.TaskGroup() as group:
                for _ in range(self.copier.layout.requests):
                    group.create_task(self._worker())
        except BaseExceptionGroup as failures:
            self.copier.fail(first_error(failures))
        except (CopyError, *_IO_ERRORS) as exc:
            self.copier.fail(exc)
        finally:
            for endpoint in opened:
                await endpoint.close_lane(self.index)

    async def _worker(self) -> None:
        buf = bytearray(self.copier.layout.request_size)
        view = memoryview(buf)
        conn, progress = self.index, self.copier.progress
        while (op := await self.plan.next(conn)) is not None:
            offset, length, zero = op
            if zero:
                await self._zero(offset, length)
            else:
                length = await self._copy(buf, view, offset, length)
            progress.advance(length)

    async def _zero(self, offset: int, length: int) -> None:
        if self.copier.skip_zeroes:
            self.counters.skipped += length
            return
        try:
            await self.dst.zero(self.index, length, offset, self.allocate)
        except _IO_ERRORS as exc:
            raise wrap(self.dst, exc) from None
        self.counters.zeroed += length

    async def _copy(self, buf: bytearray, view: memoryview, offset: int, length: int) -> int:
        try:
            n = await self.src.read(self.index, view[:length], offset)
        except _IO_ERRORS as exc:
            raise wrap(self.src, exc) from None
        if n < length:
            self.plan.stop(offset + n)
        if n and self.dst.size is not None and offset + n > self.dst.size:
            raise CopyError(self.dst.label, f"the source is larger than the destination "
                                            f"({self.dst.size} bytes)")
        for start, run, zero in self.scanner.runs(buf, n):
            if zero:
                await self._zero(offset + start, run)
                continue
            try:
                await self.dst.write(self.index, view[start:start + run], offset + start)
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
