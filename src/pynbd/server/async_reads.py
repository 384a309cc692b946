"""Reads answered later: the server's side of the ``AsyncReads`` capability.

A plugin whose reads wait on another server (the nbd proxy) may offer
``backend.connection.AsyncReads``. When the stack passes reads straight
down to it (``async_reader``: every filter above leaves ``pread`` unchanged,
no layer changes the size, ``-v`` is not logging each call, and the stack's
thread model is parallel), a session routes its clients' reads through an
``AsyncReadPath`` instead of the ``RequestRunner``:

- the reading thread checks each read as the runner would
  (``ServerTransmission.check``), takes a buffer from the session's pool and
  calls ``start_pread``; it does not wait. Before the reader waits for its
  client (and every few requests within a batch) it calls ``kick``, and the
  plugin sends what was started, several requests in one send;
- the plugin calls ``read_done`` from the thread that receives its answers;
  the reply (data, or the read's errno as for any failed request) is copied
  into this path's own ``ReplyBatch``, and ``reads_done`` sends the batch:
  the answers one upstream receive brought leave in one send.

Every other command (writes, zero, trim, flush, block status, cache) goes
to the runner as before, on the reading thread or the worker pool, so a
write is answered only when it is done and a FLUSH still covers every write
answered before it: NBD lets replies arrive in any order, and a read never
needs flushing. At most ``MAX_IN_FLIGHT`` reads of one client are in flight;
the reader waits for room beyond that.

The end: after NBD_CMD_DISC the session waits until every read in flight
is answered (``finish``); a client that vanished gets nothing more — its
reads still in flight are dropped as they complete, and closing the stack
fails the rest.
"""

from __future__ import annotations

import errno
import logging
import threading
from typing import cast

from ..backend import ThreadModel
from ..backend.connection import AsyncReads, FilterConnection
from ..backend.layer import Layer
from ..backend.stack import Stack
from ..proto.server_transmission import READ, ServerTransmission
from .channel import Buffer, Channel, ClientGone, ReplyBatch
from .dispatch import Execute

log = logging.getLogger("pynbd.server")

MAX_IN_FLIGHT = 256  # reads of one client started and not answered before the reader waits
POOL_BUFFER = 256 * 1024  # reads up to this size use the session's pooled buffers
_PASSED = frozenset({"pread", "pread_buffers"})


def async_reader(stack: Stack, top: Layer) -> AsyncReads | None:
    """The plugin connection whose ``start_pread`` may serve the top layer's reads, or None.

    Only when the stack runs requests in parallel and each filter layer passes
    reads to the layer below unchanged, every layer has the top's size (so the
    top's range check is theirs too) and none is logging its calls (-v).
    """
    if stack.thread_model() != ThreadModel.PARALLEL:
        return None
    layer = top
    while type(layer) is Layer and layer.size == top.size:
        conn = layer.conn
        if not isinstance(conn, FilterConnection):
            return conn if isinstance(conn, AsyncReads) else None
        if not _PASSED <= conn.passes_through() or not isinstance(conn.next, Layer):
            return None
        layer = conn.next
    return None


class AsyncReadPath:
    """One session's reads in flight (see the module's manual); the plugin's ``ReadCompletions``."""

    def __init__(self, reads: AsyncReads, tx: ServerTransmission, channel: Channel,
                 execute: Execute, address: object) -> None:
        self.reads = reads
        self.tx = tx
        self.others = execute  # every command but a well-formed read
        self.address = address
        self.batch = ReplyBatch(channel)
        self.lock = threading.Condition(threading.Lock())
        self.in_flight = 0
        self.gone = False  # the client is gone: replies are dropped
        self.pool: list[bytearray] = []  # free read buffers of POOL_BUFFER bytes
        self.kick = reads.send_started

    def execute(self, flags: int, cmd: int, cookie: int, offset: int, length: int,
                payload: memoryview | None, scratch: bytearray) -> None:
        """``Execute`` for the reader: start a read, or hand anything else to ``others``."""
        if cmd != READ or self.tx.check(flags, cmd, offset, length) is not None:
            self.others(flags, cmd, cookie, offset, length, payload, scratch)
            return
        lock = self.lock
        if self.in_flight >= MAX_IN_FLIGHT:
            # Outside the lock: a plugin may answer reads (read_done) while it sends them.
            # Only this thread adds reads, so the count can only have fallen meanwhile.
            self.kick()
        with lock:
            while self.in_flight >= MAX_IN_FLIGHT and not self.gone:
                lock.wait()
            self.in_flight += 1
        pool = self.pool
        buf = pool.pop() if pool and length <= POOL_BUFFER else \
            bytearray(POOL_BUFFER if length <= POOL_BUFFER else length)
        tag = (cookie, offset, memoryview(buf)[:length], buf)
        try:
            self.reads.start_pread(tag[2], offset, 0, tag, self)
        except Exception as exc:  # noqa: BLE001 (a failed start fails that read only)
            self.read_done(tag, exc if isinstance(exc, OSError) else self._bug(exc, offset, length))
            self.reads_done()

    def _bug(self, exc: Exception, offset: int, length: int) -> OSError:
        log.error("client %s: read at %d+%d raised", self.address, offset, length, exc_info=exc)
        return OSError(errno.EIO, f"{type(exc).__name__}: {exc}")

    # ---- ReadCompletions (called from the plugin's receiving thread)
    def read_done(self, tag: object, error: OSError | None) -> None:
        cookie, offset, view, buf = cast("tuple[int, int, memoryview, bytearray]", tag)
        tx = self.tx
        parts: tuple[Buffer, ...]
        if error is None:
            parts = (tx.read_header(cookie, offset, len(view)), view)
        else:
            log.debug("client %s: read at %d+%d failed: %s", self.address, offset, len(view), error)
            parts = (tx.error(cookie, READ, error.errno or errno.EIO, error.strerror or str(error),
                              offset),)
        with self.lock:
            self.in_flight -= 1
            if not self.gone:
                try:
                    self.batch.send(parts)
                except ClientGone:
                    self.gone = True
            if self.in_flight < MAX_IN_FLIGHT:
                self.lock.notify_all()
        if len(buf) == POOL_BUFFER:
            self.pool.append(buf)

    def reads_done(self) -> None:
        with self.lock:
            if not self.gone:
                try:
                    self.batch.flush()
                except ClientGone:
                    self.gone = True

    # ---- the end
    def finish(self, disconnected: bool) -> None:
        """After NBD_CMD_DISC (``disconnected``): answer every read in flight first.
        Otherwise the client is gone: drop what is still to come."""
        lock = self.lock
        if disconnected:
            self.kick()
            with lock:
                while self.in_flight and not self.gone:
                    lock.wait()
        with lock:
            self.gone = True
            lock.notify_all()
