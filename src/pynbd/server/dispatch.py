"""Where a request runs: the one rule, and the worker pool it may choose.

The rule (``plan``), from the stack's thread model (nbdkit's four, the most
restrictive of any layer) and whether every layer's requests are short
(``short_requests``), and ``-t/--threads`` when the user gave it:

==============================  =========================================
thread model                    a connection's requests run
==============================  =========================================
serialize_connections           on its reading thread, one at a time; one
                                connection is served at a time
serialize_all_requests          on its reading thread, one at a time, under
                                one lock shared by all connections
serialize_requests              on its reading thread, one at a time
parallel, every layer short     on its reading thread, in batches — unless
                                ``-t N`` (N > 1) was given: then on a pool
                                of N worker threads
parallel, some layer may wait   on a pool of ``-t`` worker threads (16 by
                                default); ``-t 1``: on the reading thread
==============================  =========================================

Why: under the GIL, handing a short request to another thread costs more
than running it (a thread switch per request is several microseconds), so
short requests run where they are read, and their replies leave together
in one send. A layer that may wait (a sleep, the network, a subprocess)
would stall every request behind it, so its requests go to a pool whose
threads wait in parallel and send their own replies in completion order.
``-t`` is always honoured: it is the number of requests of one connection
that may run at once.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..backend import ThreadModel
from ..backend.stack import Stack
from .channel import ClientGone

log = logging.getLogger("pynbd.server")

DEFAULT_THREADS = 16
SCRATCH_SIZE = 256 * 1024  # each worker's read buffer; larger reads get their own
# What one connection may have waiting for its workers before the reader stops reading
# (a client that never reads its replies cannot make the server queue without end).
MAX_QUEUED = 256
MAX_QUEUED_BYTES = 64 * 1024 * 1024

Execute = Callable[[int, int, int, int, int, "memoryview | None", bytearray], None]


@dataclass(frozen=True)
class Dispatch:
    """How one server runs its connections' requests (see the module's table)."""

    workers: int  # 0: on the reading thread
    request_lock: threading.Lock | None = None  # serialize_all_requests
    one_connection: threading.Semaphore | None = None  # serialize_connections

    @property
    def inline(self) -> bool:
        return self.workers == 0


def plan(model: ThreadModel, short_requests: bool, threads: int | None = None) -> Dispatch:
    """The rule: where requests run, for a stack's thread model and kind of requests.

    ``threads`` is ``-t`` as the user gave it, or None.
    """
    if model == ThreadModel.SERIALIZE_CONNECTIONS:
        return Dispatch(0, one_connection=threading.Semaphore(1))
    if model == ThreadModel.SERIALIZE_ALL_REQUESTS:
        return Dispatch(0, request_lock=threading.Lock())
    if model == ThreadModel.SERIALIZE_REQUESTS:
        return Dispatch(0)
    if threads is None:
        threads = 1 if short_requests else DEFAULT_THREADS
    return Dispatch(threads if threads > 1 else 0)


def plan_for(stack: Stack, threads: int | None = None) -> Dispatch:
    """``plan`` for a configured stack: its most restrictive thread model, and
    whether all its layers' requests are short."""
    return plan(stack.thread_model(), stack.requests_are_short(), threads)


def serialized(execute: Execute, lock: threading.Lock | None) -> Execute:
    """``execute`` under ``lock`` (serialize_all_requests), or as it is."""
    if lock is None:
        return execute

    def run(flags: int, cmd: int, cookie: int, offset: int, length: int,
            payload: memoryview | None, scratch: bytearray) -> None:
        with lock:
            execute(flags, cmd, cookie, offset, length, payload, scratch)
    return run


class WorkerPool:
    """Runs one connection's requests on ``size`` threads.

    The reading thread ``submit``s each request; a worker runs it with
    ``execute`` (which sends its own reply). Write payloads are copied on
    submission, since the reader reuses its buffer at once. When a reply
    cannot be sent the client is gone: ``on_gone`` stops the reader.
    """

    def __init__(self, size: int, execute: Execute, on_gone: Callable[[], None],
                 name: str = "nbd-worker") -> None:
        self.execute = execute
        self.on_gone = on_gone
        self.queue: queue.SimpleQueue[tuple[int, int, int, int, int, memoryview | None] | None] = \
            queue.SimpleQueue()
        # A client that sends requests but reads no replies blocks the workers in send;
        # then the reader waits here instead of queueing without end.
        self.room = threading.Condition()
        self.queued = 0  # requests submitted and not finished
        self.queued_bytes = 0  # their write payloads
        self.threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                        for i in range(size)]
        for thread in self.threads:
            thread.start()

    def submit(self, flags: int, cmd: int, cookie: int, offset: int, length: int,
               payload: memoryview | None, scratch: bytearray) -> None:
        """Queue a request (the same signature as the inline ``execute``)."""
        size = 0
        if payload is not None:
            payload = memoryview(bytearray(payload))
            size = len(payload)
        with self.room:
            while self.queued and (self.queued >= MAX_QUEUED or self.queued_bytes + size > MAX_QUEUED_BYTES):
                self.room.wait()
            self.queued += 1
            self.queued_bytes += size
        self.queue.put((flags, cmd, cookie, offset, length, payload))

    def close(self) -> None:
        """Wait for the requests in flight, then stop the threads."""
        for _ in self.threads:
            self.queue.put(None)
        for thread in self.threads:
            thread.join()

    def _work(self) -> None:
        execute = self.execute
        scratch = bytearray(SCRATCH_SIZE)
        while (item := self.queue.get()) is not None:
            flags, cmd, cookie, offset, length, payload = item
            try:
                execute(flags, cmd, cookie, offset, length, payload, scratch)
            except ClientGone as exc:
                log.debug("%s: %s", threading.current_thread().name, exc)
                self.on_gone()
            finally:
                with self.room:
                    self.queued -= 1
                    self.queued_bytes -= len(payload) if payload is not None else 0
                    self.room.notify()
