"""The inline transmission loop: requests served in batches on the reading thread.

When every layer of a stack promises that its requests never block (memory,
null, offset…; see ``Plugin.blocking``), handing each request to a worker
thread costs more than the request itself: under the GIL, every hand-off is a
thread switch. This loop instead reads as many bytes as the socket has (a
client with 16 requests in flight usually delivers several at once), serves
every complete request in the buffer one after the other, collects the
replies in one output arena and sends them with a single call. Write payloads
are handed to the plugin as memoryviews into the receive buffer, so nothing
is copied on the way in.

Replies too large for the arena (big reads, reads with holes, block status)
flush the arena and go out on their own, so reply order stays the order in
which requests completed.
"""

from __future__ import annotations

import logging
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

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("pynbd.server")

RECV_SIZE = 1 << 20  # receive buffer; larger write payloads get their own
ARENA_SIZE = 1 << 20  # replies collected before one send
DIRECT_SEND = 64 * 1024  # reply parts at least this long are sent without copying

_WRITE, _DISC = int(Cmd.WRITE), int(Cmd.DISC)
_PAYLOAD_LEN = int(CmdFlag.PAYLOAD_LEN)


class InlineLoop:
    """Serves one session's transmission phase on the calling thread."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.arena = bytearray(ARENA_SIZE)
        self.arena_view = memoryview(self.arena)
        self.used = 0
        self.scratch = bytearray(RECV_SIZE)

    # ---- reply sink, installed as the session's send function
    def emit(self, parts) -> None:
        """Queue a reply; parts are copied into the arena unless large."""
        size = sum(len(p) for p in parts)
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

    # ---- the loop
    def run(self) -> None:
        session = self.session
        sock = session.sock
        extended = session.extended
        header_size = EXTENDED_REQUEST_SIZE if extended else REQUEST_SIZE
        unpack_from = (wire.EXTENDED_REQUEST if extended else wire.REQUEST).unpack_from
        expected_magic = EXTENDED_REQUEST_MAGIC if extended else REQUEST_MAGIC
        execute = session._execute  # noqa: SLF001
        max_payload = session.max_payload
        scratch = self.scratch
        buf = bytearray(RECV_SIZE)
        view = memoryview(buf)
        start = end = 0
        more_pending = False
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
                            raise ProtocolError(f"payload of {length} bytes is over the maximum")
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
                    self.flush()
                    return
                execute(flags, cmd, cookie, offset, length, payload, scratch)
            if start == end:
                start = end = 0
            elif start and RECV_SIZE - end < RECV_SIZE // 4:
                buf[:end - start] = buf[start:end]
                end -= start
                start = 0
            if self.used and not more_pending:
                # Before sending the replies, take whatever requests arrived
                # meanwhile: their replies then share the same send.
                try:
                    n = sock.recv_into(view[end:], 0, MSG_DONTWAIT)
                except BlockingIOError:
                    n = -1
                if n > 0:
                    end += n
                    more_pending = True
                    continue
            more_pending = False
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
