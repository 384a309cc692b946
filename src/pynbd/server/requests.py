"""The transmission phase's request loop: read requests in batches, run them.

One thread per connection reads as many bytes as the socket has (a client
with 16 requests in flight usually delivers several at once) and parses every
complete request in the buffer. What happens next depends on the stack:

- **inline** (every layer declares ``short_requests = True``, or the thread model
  allows one request at a time): each request runs right here, its reply is
  collected in an output arena, and the whole batch of replies leaves in one
  send. No thread switch per request: under the GIL that is several times
  faster than handing requests to workers.
- **workers** (a layer may block: sleeps, network, scripts): each request is
  submitted to a ``WorkerPool``, whose threads run requests in parallel and
  send their own replies.

Write payloads reach the plugin as memoryviews into the receive buffer (inline)
or a copy of it (workers). Replies too large for the arena (big reads, reads
with holes, block status) flush the arena and go out on their own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from socket import MSG_DONTWAIT
from typing import TYPE_CHECKING

from ..proto import wire
from ..proto.constants import (
    EXTENDED_REQUEST_MAGIC,
    EXTENDED_REQUEST_SIZE,
    REQUEST_MAGIC,
    REQUEST_SIZE,
    Cmd,
    CmdFlag,
)
from ..proto.errors import ProtocolError
from .workers import WorkerPool

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("pynbd.server")

RECV_SIZE = 1 << 20  # receive buffer; larger write payloads get their own
ARENA_SIZE = 1 << 20  # replies collected before one send
DIRECT_SEND = 64 * 1024  # reply parts at least this long are sent without copying

_WRITE, _DISC = int(Cmd.WRITE), int(Cmd.DISC)
_PAYLOAD_LEN = int(CmdFlag.PAYLOAD_LEN)

Execute = Callable[[int, int, int, int, int, "memoryview | None", bytearray], None]


class RequestLoop:
    """Serves one session's transmission phase from the calling thread.

    ``workers`` is 0 to run requests inline, else the size of the pool.
    """

    def __init__(self, session: Session, workers: int,
                 request_lock: threading.Lock | None = None) -> None:
        self.session = session
        self.scratch = bytearray(RECV_SIZE)
        self.used = 0
        self.pool: WorkerPool | None = None
        if workers:
            self.pool = WorkerPool(session, workers, request_lock)
            self.execute: Execute = self.pool.submit
        else:
            self.arena = bytearray(ARENA_SIZE)
            self.arena_view = memoryview(self.arena)
            session._send = self.emit  # noqa: SLF001 (replies are batched)
            self.execute = session._execute if request_lock is None else self._locked(  # noqa: SLF001
                session._execute, request_lock)  # noqa: SLF001
        # An SSLSocket refuses recv flags: no opportunistic read under TLS.
        self.can_probe = session._use_sendmsg  # noqa: SLF001

    @staticmethod
    def _locked(execute: Execute, lock: threading.Lock) -> Execute:
        def run(*request) -> None:
            with lock:
                execute(*request)
        return run

    # ---- reply sink of the inline mode
    def emit(self, parts: Sequence[bytes | memoryview]) -> None:
        """Queue a reply; parts are copied into the arena unless large."""
        size = len(parts[0]) if len(parts) == 1 else sum(map(len, parts))
        if size >= DIRECT_SEND or self.used + size > ARENA_SIZE:
            self.flush()
            if size >= DIRECT_SEND:
                self.session._send_now(parts)  # noqa: SLF001
                return
        used = self.used
        arena = self.arena_view
        for part in parts:
            n = len(part)
            arena[used:used + n] = part
            used += n
        self.used = used

    def flush(self) -> None:
        if self.used:
            view, self.used = self.arena_view[:self.used], 0
            self.session._send_now((view,))  # noqa: SLF001

    def close(self) -> None:
        """Send what is queued and wait for requests still running."""
        try:
            self.flush()
        finally:
            if self.pool is not None:
                self.pool.close()

    # ---- the loop
    def run(self) -> None:
        """Serve until the client disconnects (NBD_CMD_DISC or end of stream)."""
        session = self.session
        sock = session.sock
        extended = session.extended
        header_size = EXTENDED_REQUEST_SIZE if extended else REQUEST_SIZE
        unpack_from = (wire.EXTENDED_REQUEST if extended else wire.REQUEST).unpack_from
        expected_magic = EXTENDED_REQUEST_MAGIC if extended else REQUEST_MAGIC
        execute = self.execute
        max_payload = session.max_payload
        scratch = self.scratch
        buf = bytearray(RECV_SIZE)
        view = memoryview(buf)
        start = end = 0
        more_pending = False
        served = 0  # requests served since the last blocking receive
        while True:
            while end - start >= header_size:
                magic, flags, cmd, cookie, offset, length = unpack_from(buf, start)
                if magic != expected_magic:
                    raise ProtocolError(f"bad request magic {magic:#x}, expected {expected_magic:#x}")
                payload = None
                if (flags & _PAYLOAD_LEN) if extended else cmd == _WRITE:
                    body = start + header_size
                    if length > max_payload:
                        if extended:
                            raise ProtocolError(f"payload of {length} bytes is over the maximum "
                                                f"{max_payload}")
                        in_buffer = min(length, end - body)
                        self.flush()
                        self._discard(length - in_buffer)
                        start = body + in_buffer
                    elif end - body >= length:
                        payload = view[body:body + length]
                        start = body + length
                    elif header_size + length > RECV_SIZE:
                        self.flush()
                        payload = self._read_large(view[body:end], length)
                        start = end = 0
                    else:
                        break  # wait for the rest of the payload
                else:
                    start += header_size
                if cmd == _DISC:
                    return
                execute(flags, cmd, cookie, offset, length, payload, scratch)
                served += 1
            if start == end:
                start = end = 0
            elif start and RECV_SIZE - end < RECV_SIZE // 4:
                buf[:end - start] = buf[start:end]
                end -= start
                start = 0
            if served > 1 and self.used and not more_pending and self.can_probe:
                # The client keeps several requests in flight: before sending
                # the replies, take whatever requests arrived meanwhile, so
                # that their replies share the same send. (With one request
                # at a time the probe would only add latency.)
                try:
                    n = sock.recv_into(view[end:], 0, MSG_DONTWAIT)
                except BlockingIOError:
                    n = -1
                if n > 0:
                    end += n
                    more_pending = True
                    continue
            more_pending = False
            served = 0
            self.flush()
            n = sock.recv_into(view[end:])
            if n == 0:
                return
            end += n

    def _read_large(self, have: memoryview, length: int) -> memoryview:
        """A write payload bigger than the receive buffer, in its own buffer."""
        payload = memoryview(bytearray(length))
        payload[:len(have)] = have
        self.session._recv_exact(payload[len(have):])  # noqa: SLF001
        return payload

    def _discard(self, left: int) -> None:
        """Drain an oversized write payload the server refuses."""
        sink = memoryview(self.scratch)
        while left:
            n = min(left, len(sink))
            self.session._recv_exact(sink[:n])  # noqa: SLF001
            left -= n
