"""Requests answered later: the server's side of ``AsyncReads`` and ``AsyncWrites``.

A plugin whose reads or writes complete elsewhere (the nbd proxy and curl:
another server; blkio: io_uring's kernel workers, a vhost-user backend) may
offer ``backend.connection.AsyncReads`` and/or ``AsyncWrites``. When the
stack passes those calls straight down to it (``async_plugin``: every filter
above leaves ``pread`` / ``pwrite`` unchanged, no layer changes the size,
``-v`` is not logging each call, and the stack's thread model is parallel),
a session routes its clients' reads and writes through an
``AsyncRequestPath`` instead of the ``RequestRunner``:

- the reading thread checks each one as the runner would
  (``ServerTransmission.check``), takes a buffer from the session's pool
  (a write's payload is copied into it: the receive buffer is reused at
  once) and calls ``start_pread`` / ``start_pwrite``; it does not wait.
  Before the reader waits for its client (and every few requests within a
  batch) it calls ``kick``, and the plugin sends what was started, several
  requests in one system call or one send;
- the plugin calls ``read_done`` / ``write_done`` from the thread that
  learns of the outcome; the reply (data, success, or the request's errno
  as for any failed request) is copied into this path's own ``ReplyBatch``,
  and ``burst_done`` sends the batch: the answers one receive or one reap
  brought leave in one send. The buffer goes back to the pool;
- a plugin that also offers ``PolledCompletions`` (io_uring, vhost-user)
  has the reading thread itself wait for the completions while it waits
  for its client (one ``poll`` of the socket and the plugin's
  ``completion_fd``; not under TLS, whose buffered bytes a poll cannot
  see): the reader then kicks with ``submit_started`` and reaps with
  ``reap_started``, and no plugin thread wakes per completion (with nothing
  in flight it waits for its client alone: reads of cached data are all
  answered by then, and their completions' signals need no wake-up). Whenever the
  reader waits for anything else (room, the writes before a flush, the
  end) it kicks with ``send_started``, and the plugin reaps on its own.

Every other command (zero, trim, flush, block status, cache; a read or
write the plugin does not start) goes to the runner as before, on the
reading thread or the worker pool — but only once every write started
before it has been answered (``_drain_writes``): so a FLUSH covers every
write answered before it, and a zero or trim never overtakes a write the
client sent first. Reads are not waited for: NBD lets replies arrive in any
order and a read never needs flushing. At most ``MAX_IN_FLIGHT`` requests
of one client are in flight; the reader waits for room beyond that.

The end: after NBD_CMD_DISC the session waits until every request in
flight is answered (``finish``). A client that vanished gets nothing more —
its reads still in flight are dropped as they complete, and closing the
stack fails the rest — but its started writes are waited for before the
stack closes: each one lands, and nothing the client was answered is lost.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from typing import Any

from ..backend import FLAG_FUA, ThreadModel
from ..backend.connection import AsyncReads, AsyncWrites, FilterConnection, PolledCompletions
from ..backend.layer import Layer
from ..backend.stack import Stack
from ..proto.server_transmission import F_FUA, READ, WRITE, ServerTransmission
from .channel import Buffer, Channel, ClientGone, ReplyBatch
from .dispatch import Execute

log = logging.getLogger("pynbd.server")

MAX_IN_FLIGHT = 256  # requests of one client started and not answered before the reader waits
POOL_BUFFER = 256 * 1024  # requests up to this size use the session's pooled buffers
_READS = frozenset({"pread", "pread_buffers"})
_WRITES = frozenset({"pwrite"})

# A started request: (command, cookie, offset, its view of the buffer, the buffer)
Tag = tuple[int, int, int, memoryview, bytearray]


def async_plugin(stack: Stack, top: Layer) -> tuple[AsyncReads | None, AsyncWrites | None]:
    """The plugin connection whose ``start_pread`` / ``start_pwrite`` may serve the top
    layer's reads / writes (None where it may not).

    Only when the stack runs requests in parallel and each filter layer passes
    those calls to the layer below unchanged, every layer has the top's size
    (so the top's range check is theirs too) and none is logging its calls (-v).
    """
    if stack.thread_model() != ThreadModel.PARALLEL:
        return None, None
    reads = writes = True
    layer = top
    while type(layer) is Layer and layer.size == top.size:
        conn = layer.conn
        if not isinstance(conn, FilterConnection):
            return (conn if reads and isinstance(conn, AsyncReads) else None,
                    conn if writes and isinstance(conn, AsyncWrites) else None)
        passed = conn.passes_through()
        reads = reads and _READS <= passed
        writes = writes and _WRITES <= passed
        if not (reads or writes) or not isinstance(conn.next, Layer):
            break
        layer = conn.next
    return None, None


class AsyncRequestPath:
    """One session's requests in flight (see the module's manual); the plugin's ``Completions``."""

    def __init__(self, reads: AsyncReads | None, writes: AsyncWrites | None, tx: ServerTransmission,
                 channel: Channel, execute: Execute, address: object) -> None:
        self.reads = reads
        self.writes = writes
        self.tx = tx
        self.others = execute  # every command not started here
        self.address = address
        self.batch = ReplyBatch(channel)
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # fewer in flight, or the client gone
        self.waiting = 0  # threads waiting on ``changed``
        # In flight: started - answered (of writes: writes_started - writes_answered).
        # Only the reader starts requests, so it counts them without the lock.
        self.started = self.writes_started = 0
        self.answered = self.writes_answered = 0  # (under the lock)
        self.gone = False  # the client is gone: replies are dropped
        self.pool: list[bytearray] = []  # free buffers of POOL_BUFFER bytes
        plugin = reads if reads is not None else writes
        assert plugin is not None, "an AsyncRequestPath with nothing to start"
        self.kick = plugin.send_started  # before waiting for something else
        # The reader's: before it waits for its client (and reaps while it does).
        self.reader_kick: Callable[[], None] = self.kick
        self.completions: tuple[int, Callable[[], None], Callable[[], bool]] | None = None
        if isinstance(plugin, PolledCompletions) and channel.can_probe:
            self.reader_kick = plugin.submit_started
            self.completions = (plugin.completion_fd(), plugin.reap_started, self.busy)

    def execute(self, flags: int, cmd: int, cookie: int, offset: int, length: int,
                payload: memoryview | None, scratch: bytearray) -> None:
        """``Execute`` for the reader: start a read or write, or hand anything else to
        ``others`` (once the writes started before it are answered)."""
        if cmd == READ:
            if self.reads is not None and self.tx.check(flags, cmd, offset, length) is None:
                tag = self._take(cmd, cookie, offset, length)
                try:
                    self.reads.start_pread(tag[3], offset, 0, tag, self)
                except Exception as exc:  # noqa: BLE001 (a failed start fails that request only)
                    self._not_started(tag, exc)
                return
        elif cmd == WRITE and self.writes is not None and payload is not None \
                and self.tx.check(flags, cmd, offset, length) is None:
            tag = self._take(cmd, cookie, offset, length)
            view = tag[3]
            view[:] = payload
            try:
                self.writes.start_pwrite(view, offset, FLAG_FUA if flags & F_FUA else 0, tag, self)
            except Exception as exc:  # noqa: BLE001 (a failed start fails that request only)
                self._not_started(tag, exc)
            return
        if self.writes_started != self.writes_answered:
            self._drain_writes()
        self.others(flags, cmd, cookie, offset, length, payload, scratch)

    def busy(self) -> bool:
        """Whether requests are in flight (for the reader, who alone starts them: when it
        sees none, none is)."""
        return self.started != self.answered

    def _take(self, cmd: int, cookie: int, offset: int, length: int) -> Tag:
        """Room for one more request in flight, and its buffer."""
        if self.started - self.answered >= MAX_IN_FLIGHT:
            # Outside the lock: a plugin may answer requests while it sends them.
            # Only this thread adds requests, so the count can only have fallen meanwhile.
            self.kick()
            self._wait_while(lambda: self.started - self.answered >= MAX_IN_FLIGHT and not self.gone)
        self.started += 1
        if cmd == WRITE:
            self.writes_started += 1
        pool = self.pool
        buf = pool.pop() if pool and length <= POOL_BUFFER else \
            bytearray(POOL_BUFFER if length <= POOL_BUFFER else length)
        return (cmd, cookie, offset, memoryview(buf)[:length], buf)

    def _not_started(self, tag: Tag, exc: Exception) -> None:
        """``start_pread`` / ``start_pwrite`` raised: that request fails (EIO unless an OSError)."""
        if not isinstance(exc, OSError):
            log.error("client %s: command %d at %d+%d raised", self.address, tag[0], tag[2],
                      len(tag[3]), exc_info=exc)
            exc = OSError(errno.EIO, f"{type(exc).__name__}: {exc}")
        self.read_done(tag, exc)
        self.burst_done()

    def _drain_writes(self) -> None:
        """Wait until every write started is answered."""
        self.kick()
        self._wait_while(lambda: self.writes_started != self.writes_answered)

    def _wait_while(self, busy: Callable[[], bool]) -> None:
        """Wait until ``busy()`` is false (it is evaluated under the lock)."""
        with self.lock:
            self.waiting += 1
            try:
                while busy():
                    self.changed.wait()
            finally:
                self.waiting -= 1

    # ---- Completions (called from the plugin's completing thread)
    def read_done(self, tag: Any, error: OSError | None) -> None:
        cmd, cookie, offset, view, buf = tag  # (a Tag: Any spares a cast call per request)
        tx = self.tx
        parts: tuple[Buffer, ...]
        if error is not None:
            log.debug("client %s: command %d at %d+%d failed: %s", self.address, cmd, offset,
                      len(view), error)
            parts = (tx.error(cookie, cmd, error.errno or errno.EIO, error.strerror or str(error),
                              offset),)
        elif cmd == READ:
            parts = (tx.read_header(cookie, offset, len(view)), view)
        else:
            parts = (tx.ok(cookie, offset),)
        lock = self.lock
        lock.acquire()
        try:
            self.answered += 1
            if cmd == WRITE:
                self.writes_answered += 1
            if not self.gone:
                try:
                    self.batch.send(parts)
                except ClientGone:
                    self.gone = True
            if self.waiting:
                self.changed.notify_all()
        finally:
            lock.release()
        if len(buf) == POOL_BUFFER:
            self.pool.append(buf)

    write_done = read_done  # (the tag says which command it was)

    def burst_done(self) -> None:
        with self.lock:
            if not self.gone:
                try:
                    self.batch.flush()
                except ClientGone:
                    self.gone = True

    # ---- the end
    def finish(self, disconnected: bool) -> None:
        """After NBD_CMD_DISC (``disconnected``): answer every request in flight first.
        Otherwise the client is gone: drop what is still to come. Either way, every
        started write is done before the session closes the stack."""
        self.kick()
        if disconnected:
            self._wait_while(lambda: self.started != self.answered and not self.gone)
        with self.lock:
            self.gone = True
            self.changed.notify_all()
        self._wait_while(lambda: self.writes_started != self.writes_answered)
