"""The copy itself: lanes that keep requests in flight between the two ends.

A lane is one connection to each end. There are as many lanes as
``--connections``, at most ``--threads`` (by default the number of
processors, as nbdcopy does) and one if a server cannot multi-conn. Every
lane is driven from the calling thread: the lanes' NBD connections are
channels of one event loop (``loop.py``), files are read and written with
plain system calls as the loop goes round. Lanes share the disk through
``Slices``. A lane owns ``--requests`` slots (one in ``--synchronous``
mode or when a stream is involved), each with a buffer of
``--request-size`` bytes allocated once; while a slot is free the lane takes
the next operation and starts it, without waiting for it to finish, then
the loop sends what was started and waits for replies:

- a range that reads as zero on the source is skipped when the destination
  already reads as zero (and ``--allocated`` is not given), else zeroed;
- a range unchanged since the ``--dirty-bitmap`` checkpoint is left alone;
- data is read into the slot's buffer; when the read is done (at once for a
  file, when its reply is in for a server) the buffer is split into runs of
  zero and non-zero ``--sparse`` blocks, and the runs are zeroed or written
  (all at once, or one after the other when only one request may be in
  flight); with ``--blkhash`` the buffer is hashed by worker threads
  meanwhile;
- the slot is free again when the last of those writes is done.

The first failure anywhere stops every lane, which then waits for its
requests in flight; a copy is reported as done only when every write (and
``--flush``) succeeded.

Where the time goes (2026-12-01, 2-core machine shared with other work;
/usr/bin/time-style rusage of the copy and /proc CPU of the servers over a
1 GiB copy of random data, every pair of ``make bench``, min-median of 3).
Before, every lane was a thread and every connection had a receiver
thread: -C 4 (two lanes on two cores) made ~10,600 futex calls per GiB as
five threads handed the interpreter lock around, and a receiver thread
that died left the copy waiting for ever. Now one thread drives every
connection (no futex calls at all; ~7,300 recvfrom, ~1,800 sendmsg,
~2,700 epoll_wait per GiB nbdkit -> nbdkit). CPU seconds per GiB of the
copy, old engine / this one / nbdcopy:

    nbdkit -> nbdkit  -C 4  0.58 / 0.46-0.48 / 0.45    -C 1  0.47 / 0.42 / 0.37
    file -> nbdkit    -C 4  0.43-0.49 / 0.39-0.43 / 0.35-0.37
                      -C 1  0.40-0.45 / 0.37-0.38 / 0.30-0.31
    nbdkit -> file    -C 4  0.65 / 0.61-0.62 / 0.66-0.76
                      -C 1  0.57-0.63 / 0.59-0.61 / 0.69-0.74
    pynbd -> nbdkit   -C 4  0.49 / 0.42-0.44 / 0.42-0.46   -C 1  0.46-0.49 / 0.40 / 0.39-0.40
    nbdkit -> pynbd   -C 4  0.52-0.55 / 0.55-0.56 / 0.47  -C 1  0.48-0.50 / 0.48-0.50 / 0.40-0.42

What is left above nbdcopy is user time: 0.13-0.20 s against 0.02-0.08,
about 0.09 of it the start-up (the interpreter and its site hooks ~50 ms,
pynbd's client, proto and backend imports ~45 ms: spread thin), the rest
the Python around each system call (``Transmission``'s parsing of every
``recv``). The servers spend less with pynbd copy: requests go out in
batches, so ``pynbd serve`` as the source spends 0.25-0.28 s per GiB
against 0.36-0.40 under nbdcopy. A ``pynbd serve`` destination went slower
with two connections than with one (666-787 against 922-949 MiB/s) with
the same CPU, hence ``Ramp``. The kernel's copies cost ~1.7x as much into
and out of a bytearray's bytes (16 bytes into a page) as on a page
boundary, hence ``Slot``. Tried and dropped, no CPU gain measurable:
MSG_WAITALL on data reads, garbage collection tuning, queue sizes of
4-64 MiB, request sizes of 256 KiB-4 MiB, greedy (not exact) reads of a
destination's write replies (the replies come one at a time anyway).

A second look (2026-12-01, later; ``perf stat`` of the servers, ``strace
-tt`` of the start, ``perf record``, py-spy; same machine, busier): the
steady state is at its floor. The three processes need 1.5-2.0 s of CPU per
GiB between them on two cores, most of it the kernel's six copies of every
byte (the source server's memcpy and send, the copy's recv and sendmsg, the
destination's recv and memcpy) and the destination server (0.8-1.0 s, with
262,144 page faults into fresh memory). The servers do less work
for pynbd copy than for nbdcopy (nbdkit -> nbdkit: the destination made
3,100 against 11,700 context switches per GiB, the source 11,100 against
17,100). The copy's own Python costs ~33 us per read and write pair (at
256 KiB requests it spent 0.1 s per GiB more than at 1 MiB). What is left
is serial time, when the servers are idle: the interpreter and its site
hooks (~34 ms), pynbd's imports (~36 ms: dataclasses and inspect, socket,
ctypes; subprocess, for captive servers, is now imported only by them), opening the connections (~5 ms),
exit (~10 ms plus ~4 ms per 16 MiB of buffers freed), and the 16 MiB of
buffers of each lane, zeroed before the first request went out (20-40 ms;
``Slot`` now leaves them to be faulted in as used). A 32 MiB queue saved
an nbdkit source 0.1 s per GiB (fewer of its threads woken, 8 runs) but
the copy to a ``pynbd serve`` destination took 0.24 s more CPU in all (4
runs): the queue stays at 16 MiB.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, fields

from ...proto.errors import ProtocolError
from .blkhash import BlockHash, Hasher
from .dirty import CLEAN, ZERO
from .endpoint import CopyError, Done, Endpoint, Fanout, start
from .loop import Loop
from .options import CopyOptions
from .plan import SLICE, Op, Plan, Slices
from .progress import Progress
from .zeroes import Run, ZeroScanner

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
    unchanged: int = 0  # left alone: not in the --dirty-bitmap

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
    """Runs one copy with a fixed layout, every lane from the calling thread."""

    def __init__(self, opts: CopyOptions, src: Endpoint, dst: Endpoint, layout: Layout,
                 progress: Progress, loop: Loop) -> None:
        self.opts, self.src, self.dst, self.layout = opts, src, dst, layout
        self.progress, self.loop = progress, loop
        self.slices = Slices(layout.length)
        self.plan = Plan(src, self.slices, layout.request_size, layout.zero_piece,
                         opts.extents, dirty=opts.dirty_bitmap is not None)
        self.planned = False  # the plan has run dry
        self.lanes = [Lane(self, i) for i in range(layout.connections)]
        self.ramp = Ramp(len(self.lanes))
        self.skip_zeroes = dst.reads_as_zero and not opts.allocated
        self.blkhash = None if opts.blkhash is None else BlockHash(*opts.blkhash, layout.length)
        self.hasher: Hasher | None = None
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
        return self.plan.extents_failed

    def next_op(self) -> Op | None:
        """The next operation, for whichever lane has a free slot."""
        if not self.planned:
            op = self.plan.next()
            if op is not None:
                return op
            self.planned = True
        return None

    def fail(self, exc: BaseException) -> None:
        """Record a failure and make every lane stop."""
        self.failures.append(exc)
        self.slices.abort()

    def run(self) -> int:
        """Copy everything; return the number of bytes copied."""
        started = time.monotonic()
        self.progress.start()
        opened: list[Lane] = []
        if self.blkhash is not None:
            self.hasher = Hasher(self.blkhash, threads_for(self.opts), self.loop.call_soon_threadsafe)
        try:
            for lane in self.lanes:
                opened.append(lane)  # closed even if only its source connection opened
                lane.connect()
            self._drive()
        except (CopyError, *_IO_ERRORS) as exc:
            self.fail(exc)
            self.loop.run_until(lambda: all(lane.idle for lane in opened))
        finally:
            for lane in opened:
                lane.close()
            if self.hasher is not None:
                self.hasher.close()
        if self.failures:
            raise self.failures[0]
        length = self.slices.length
        try:
            self.dst.finish(0, length, self.opts.flush)
        except _IO_ERRORS as exc:
            raise wrap(self.dst, exc) from None
        self.progress.finish()
        self.elapsed = time.monotonic() - started
        return length

    def _drive(self) -> None:
        """Start work on the lanes in use while they have free slots; poll for replies
        between; let the ramp decide how many lanes are in use."""
        while True:
            for lane in self.lanes[:self.ramp.active]:
                lane.fill()
            if self.planned and all(lane.idle for lane in self.lanes):
                return
            self.loop.poll()
            self.ramp.update(self.progress.done)


class Ramp:
    """How many lanes take new work: one more for as long as that raised the rate.

    Every lane's connections are opened at the start (``-C`` opens as many as
    nbdcopy's), but a connection costs the servers CPU, and a server that
    serves connections in threads of one interpreter (``pynbd serve``) may go
    slower with more. So the copy starts on one lane and measures its rate
    over a window of at least ``WINDOW`` bytes and ``SPAN`` seconds, then
    takes one more lane and measures again, for as long as each lane added
    raised the rate by ``GAIN``. A lane that did not is left (it finishes what
    it started) and the count stays where it was: more connections are never
    slower than one by more than one window's worth.

    - The window lasts ``SPAN`` at least because 64 MiB go by in 60 ms at
      1 GiB/s, a few of the scheduler's time slices: successive 64 MiB windows
      of a one-lane copy differed by up to 14% on a busy two-core machine, more
      than ``GAIN``, so noise could keep a lane that did not help.
    - Each window begins ``WARMUP`` bytes after the lane count changed: a lane
      first fills its requests in flight and faults in its buffers' pages,
      which would count against the lane it is measuring.
    """

    WARMUP, WINDOW, SPAN, GAIN = 32 * 1024 * 1024, 64 * 1024 * 1024, 0.2, 1.1

    def __init__(self, lanes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.limit, self.active = lanes, 1
        self.settled = lanes == 1
        self.best = 0.0
        self.changed = 0  # bytes done when the lane count last changed
        self.mark: tuple[float, int] | None = None  # (time, bytes done) the window began at

    def update(self, done: int) -> None:
        if self.settled:
            return
        if self.mark is None:
            if done - self.changed >= self.WARMUP:
                self.mark = (self.clock(), done)
            return
        began, at = self.mark
        if done - at < self.WINDOW:
            return
        now = self.clock()
        if now - began < self.SPAN:
            return
        rate = (done - at) / (now - began)
        if rate < self.best * self.GAIN:
            self.active -= 1
            self.settled = True
        elif self.active < self.limit:
            self.best, self.active, self.changed, self.mark = rate, self.active + 1, done, None
        else:
            self.settled = True


class Slot:
    """One request's worth of buffer, reused for the whole copy.

    An anonymous mapping, so ``view`` starts on a page boundary: the kernel's
    copies into and out of it (pread, recv, sendmsg, pwrite) then run at full
    speed. (A bytearray's own bytes start 16 bytes into a page, which makes a
    1 GiB pread from the page cache take 0.23 s of system time instead of
    0.13.) Its pages are faulted in by the first request that uses them: a
    bytearray is zeroed when it is made, and the 16 MiB of slots of each lane
    took 20-40 ms before the first request could go out.
    """

    __slots__ = ("buf", "view")

    def __init__(self, size: int) -> None:
        self.buf = mmap.mmap(-1, size)
        self.view = memoryview(self.buf)


class Lane:
    """One connection to each end and the requests in flight on them."""

    def __init__(self, copier: Copier, index: int) -> None:
        self.copier, self.index = copier, index
        layout = copier.layout
        self.src, self.dst = copier.src, copier.dst
        self.plan = copier.plan
        self.scanner = ZeroScanner(layout.sparse, layout.request_size)
        self.counters = Counters()
        self.allocate = copier.opts.allocated
        self.slots = layout.requests
        self.free: list[Slot] = []

    def connect(self) -> None:
        """Open this lane's connections (lane 0 uses the endpoints' first)."""
        self.free = [Slot(self.copier.layout.request_size) for _ in range(self.slots)]
        for endpoint in (self.src, self.dst) if self.index else ():
            endpoint.connect_lane(self.index)

    def close(self) -> None:
        for endpoint in (self.src, self.dst) if self.index else ():
            try:
                endpoint.close_lane(self.index)
            except _IO_ERRORS:
                continue  # closing a connection that failed: the failure is already recorded

    @property
    def idle(self) -> bool:
        """No request of this lane is in flight."""
        return len(self.free) == self.slots

    def fill(self) -> None:
        """Start operations while a slot is free (those that finish at once free it again)."""
        while self.free and (op := self.copier.next_op()) is not None:
            slot = self.free.pop()
            offset, length, kind = op
            if kind == CLEAN:
                self.counters.unchanged += length
                self._releaser(slot)(length, None)
            elif kind == ZERO:
                if self.copier.blkhash is not None:
                    self.copier.blkhash.zero(offset, length)
                self._zero(offset, length, self._releaser(slot))
            else:
                self._read(slot, offset, length)

    def _releaser(self, slot: Slot) -> Done:
        """The completion that ends a slot's work: count it, report it, free the slot."""
        def release(n: int, error: BaseException | None) -> None:
            if error is None:
                self.copier.progress.advance(n)
            else:
                self.copier.fail(error)
            self.free.append(slot)
        return release

    def _zero(self, offset: int, length: int, done: Done) -> None:
        if self.copier.skip_zeroes:
            self.counters.skipped += length
            done(length, None)
            return
        self.counters.zeroed += length
        start(self.dst.zero, _blaming(self.dst, done), self.index, length, offset, self.allocate)

    def _read(self, slot: Slot, offset: int, length: int) -> None:
        release = self._releaser(slot)

        def read_done(n: int, error: BaseException | None) -> None:
            if error is not None:
                release(0, error)
                return
            try:
                runs = self._runs(slot, offset, n, length)
            except CopyError as exc:
                release(0, exc)
                return
            fan = Fanout(n, release)
            if self.copier.hasher is not None:  # hashed in another thread meanwhile
                self.copier.hasher.data(offset, slot.view[:n], _calling(fan.part(), n))
            if self.slots == 1:  # --synchronous, streams, -R 1: one request at a time
                Chain(self, slot, offset, runs, n, fan.part()).step()
            else:
                for run in runs:
                    self.write_run(slot, offset, run, fan.part())
            fan.close()

        start(self.src.read, _blaming(self.src, read_done), self.index, slot.view[:length], offset)

    def _runs(self, slot: Slot, offset: int, n: int, length: int) -> list[Run]:
        if n < length:
            self.plan.stop(offset + n)
        if n and self.dst.size is not None and offset + n > self.dst.size:
            raise CopyError(self.dst.label, f"the source is larger than the destination "
                                            f"({self.dst.size} bytes)")
        return self.scanner.runs(slot.buf, n)

    def write_run(self, slot: Slot, offset: int, run: Run, done: Done) -> None:
        begin, length, zero = run
        if zero:
            self._zero(offset + begin, length, done)
        else:
            self.counters.written += length
            start(self.dst.write, _blaming(self.dst, done), self.index,
                  slot.view[begin:begin + length], offset + begin)


class Chain:
    """A read's runs written one after the other, each once the last is done.

    A write that finishes at once (files) starts the next from ``step``'s
    own loop, not from inside its completion, so a long chain never recurses.
    """

    def __init__(self, lane: Lane, slot: Slot, offset: int, runs: list[Run], n: int,
                 done: Done) -> None:
        self.lane, self.slot, self.offset, self.runs = lane, slot, offset, runs
        self.n, self.done = n, done
        self.next = 0
        self.waiting = self.stepping = False

    def step(self) -> None:
        self.stepping = True
        while not self.waiting and self.next < len(self.runs):
            run = self.runs[self.next]
            self.next += 1
            self.waiting = True
            self.lane.write_run(self.slot, self.offset, run, self._finished)
        self.stepping = False
        if not self.waiting and self.next == len(self.runs):
            self.next += 1  # finished exactly once
            self.done(self.n, None)

    def _finished(self, n: int, error: BaseException | None) -> None:
        self.waiting = False
        if error is not None:
            self.next = len(self.runs) + 1
            self.done(0, error)
        elif not self.stepping:
            self.step()


def _calling(done: Done, n: int) -> Callable[[], None]:
    return lambda: done(n, None)


def _blaming(endpoint: Endpoint, done: Done) -> Done:
    """``done`` with its error turned into a CopyError naming ``endpoint``."""
    def finished(n: int, error: BaseException | None) -> None:
        done(n, None if error is None else wrap(endpoint, error))
    return finished
