"""later: a 2 MiB disk whose reads are answered later, from a thread of its own.

A test plugin loaded by path (``pynbd serve tests/server/later_plugin.py``)
offering ``backend.connection.AsyncReads``. The disk starts as nbdkit's
pattern plugin (each 8 bytes hold their own offset, big-endian). It offers
``AsyncWrites`` too: each ``send_started`` hands the reads and writes started
since the last one to the thread, which answers them in reverse order (a
batch holding writes a millisecond late). Reads and writes at ``EIO_OFFSET``
fail with EIO, reads at ``BUG_OFFSET`` raise RuntimeError in ``start_pread``
(a plugin bug), reads at ``HOLD_OFFSET`` are answered only when the
connection closes (with an error). Requests not started run on the reading
thread (short requests), in order: a flush, zero or trim while a started
write is unanswered, or a close, fails with EIO and is logged — the server
must wait for the writes started before them. On close it logs how many reads were answered later.
"""

from __future__ import annotations

import errno
import logging
import queue
import threading
import time

from pynbd.backend import Connection, OpenContext, Plugin
from pynbd.backend.connection import Completions

SIZE = 2 << 20
EIO_OFFSET = 4096
BUG_OFFSET = 8192
HOLD_OFFSET = 12288

log = logging.getLogger("pynbd.plugins.later")

Started = tuple[bool, memoryview, int, object, Completions]  # (a write?, ...)


class LaterConnection(Connection):
    def __init__(self, data: bytearray) -> None:
        self.data = data
        self.started: list[Started] = []
        self.held: list[Started] = []
        self.answered = 0
        self.writes = 0  # started and not answered
        self.lock = threading.Lock()  # for ``writes``
        self.batches: queue.SimpleQueue[list[Started] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self.answer, daemon=True)
        self.thread.start()

    def get_size(self) -> int:
        return len(self.data)

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        buf[:] = self.data[offset:offset + len(buf)]

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self.data[offset:offset + len(buf)] = buf

    def _writes_done(self, what: str) -> None:
        if self.writes:
            log.error("later: %s with %d writes unanswered", what, self.writes)
            raise OSError(errno.EIO, f"later: {what} with writes unanswered")

    def flush(self, flags: int) -> None:
        """Nothing to make durable (the disk is in memory), once the writes are done."""
        self._writes_done("flush")

    def zero(self, count: int, offset: int, flags: int) -> None:
        self._writes_done("zero")
        super().zero(count, offset, flags)

    def trim(self, count: int, offset: int, flags: int) -> None:
        self._writes_done("trim")

    def start_pread(self, buf: memoryview, offset: int, flags: int, tag: object,
                    completions: Completions) -> None:
        if offset == BUG_OFFSET:
            raise RuntimeError(f"plugin bug at {BUG_OFFSET}")
        self.started.append((False, buf, offset, tag, completions))

    def start_pwrite(self, buf: memoryview, offset: int, flags: int, tag: object,
                     completions: Completions) -> None:
        with self.lock:
            self.writes += 1
        self.started.append((True, buf, offset, tag, completions))

    def send_started(self) -> None:
        if self.started:
            batch, self.started = self.started, []
            self.batches.put(batch)

    def answer(self) -> None:
        while (batch := self.batches.get()) is not None:
            if any(write for write, *_ in batch):
                time.sleep(0.001)
            for write, buf, offset, tag, sink in reversed(batch):
                error = OSError(errno.EIO, "later: a bad sector") if offset == EIO_OFFSET else None
                if write:
                    if error is None:
                        self.data[offset:offset + len(buf)] = buf
                    with self.lock:
                        self.writes -= 1
                    sink.write_done(tag, error)
                    continue
                if offset == HOLD_OFFSET:
                    self.held.append((write, buf, offset, tag, sink))
                    continue
                self.answered += 1
                if error is None:
                    buf[:] = self.data[offset:offset + len(buf)]
                sink.read_done(tag, error)
            sink.burst_done()

    def close(self) -> None:
        self.batches.put(None)
        self.thread.join()
        self._writes_done("close")
        for _write, _buf, _offset, tag, sink in self.held:
            sink.read_done(tag, OSError(errno.ESHUTDOWN, "later: closed"))
            sink.burst_done()
        log.warning("later: %d reads answered later", self.answered)


class LaterPlugin(Plugin):
    name = "later"
    short_requests = True  # what is not started runs on the reading thread, in order

    def get_ready(self) -> None:
        self.data = bytearray(b"".join(i.to_bytes(8, "big") for i in range(0, SIZE, 8)))

    def open(self, ctx: OpenContext) -> Connection:
        return LaterConnection(self.data)
