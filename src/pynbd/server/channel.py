"""A client's socket: exact receives, zero-copy sends, and batched replies.

``Channel`` is the only object that touches a client's socket once it is
accepted. Sends are whole replies, each one ``sendmsg`` of its parts (header
bytes and memoryviews of the data, never copied), under a lock so that
worker threads never interleave their replies. ``ReplyBatch`` is the
reading thread's output arena: small replies are copied into it and leave
together in one send when the reader runs out of requests; a large reply
flushes the arena and goes out on its own, still without a copy.

Any failure of the socket is ``ClientGone``: the client closed it, reset
it, or stopped reading. Nothing else here raises.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
import time
from collections.abc import Sequence

Buffer = bytes | bytearray | memoryview

IOV_MAX = 1024  # buffers one sendmsg takes (Linux UIO_MAXIOV)
ARENA_SIZE = 1 << 20  # replies collected before one send
DIRECT_SEND = 64 * 1024  # replies at least this long are sent without copying


PEERCRED = struct.Struct("3i")  # struct ucred


class ClientGone(Exception):
    """The client closed the connection or the socket failed."""


class Channel:
    """One accepted client connection."""

    def __init__(self, sock: socket.socket, address: object) -> None:
        self.sock = sock
        self.address = address
        self.send_lock = threading.Lock()
        self.tls = False  # an SSLSocket takes no sendmsg and no recv flags
        self.deadline: float | None = None  # see set_deadline
        self.expired = False  # the deadline passed: the handshake took too long

    def peer_credentials(self) -> tuple[int, int, int] | None:
        """(pid, uid, gid) of the process at the other end of a Unix socket; None otherwise."""
        if self.sock.family != socket.AF_UNIX:
            return None
        try:
            data = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size)
        except OSError:
            return None
        pid, uid, gid = PEERCRED.unpack(data)
        return pid, uid, gid

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def can_probe(self) -> bool:
        """Whether ``probe`` works (not under TLS)."""
        return not self.tls

    # ---- the handshake's deadline
    def set_deadline(self, deadline: float | None) -> None:
        """Until ``deadline`` (a ``time.monotonic()`` time) every receive, send and TLS
        handshake waits at most what is left of it, so a client that sends nothing, or a
        byte a second, is dropped in time (``--timeout``); None: wait as long as it takes."""
        self.deadline = deadline
        if deadline is None:
            self.sock.settimeout(None)

    def _arm(self) -> None:
        """Before a wait: the socket's timeout is what is left until the deadline."""
        assert self.deadline is not None
        left = self.deadline - time.monotonic()
        if left <= 0:
            self.expired = True
            raise ClientGone("the handshake took too long")
        self.sock.settimeout(left)

    def _gone(self, exc: BaseException) -> ClientGone:
        if isinstance(exc, TimeoutError) and self.deadline is not None:
            self.expired = True
        return ClientGone(str(exc) or type(exc).__name__)

    # ---- receiving
    def recv_exact(self, view: memoryview) -> None:
        """Fill ``view`` completely, or raise ClientGone."""
        sock = self.sock
        flags = 0 if self.tls else socket.MSG_WAITALL
        got = 0
        need = len(view)
        while got < need:
            if self.deadline is not None:
                self._arm()
            try:
                n = sock.recv_into(view[got:], need - got, flags)
            except (OSError, ValueError) as exc:
                raise self._gone(exc) from None
            if n == 0:
                raise ClientGone("end of stream" if got == 0 else "connection closed mid-message")
            got += n

    def recv_bytes(self, size: int) -> bytes:
        buf = bytearray(size)
        self.recv_exact(memoryview(buf))
        return bytes(buf)

    def recv_some(self, view: memoryview) -> int:
        """Whatever has arrived, at most ``len(view)`` bytes, waiting for some; 0 at the end."""
        try:
            return self.sock.recv_into(view)
        except (OSError, ValueError) as exc:
            raise ClientGone(str(exc)) from None

    def probe(self, view: memoryview) -> int:
        """Bytes that have already arrived, without waiting (0 when none)."""
        try:
            return self.sock.recv_into(view, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return 0
        except (OSError, ValueError) as exc:
            raise ClientGone(str(exc)) from None

    # ---- sending
    def send(self, parts: Sequence[Buffer]) -> None:
        """Send a whole reply now: one sendmsg of all its parts when it can."""
        with self.send_lock:
            try:
                if self.deadline is not None:
                    self._arm()
                if self.tls:
                    self.sock.sendall(b"".join(parts))
                    return
                for first in range(0, len(parts), IOV_MAX):
                    group = parts[first:first + IOV_MAX] if len(parts) > IOV_MAX else parts
                    sent = self.sock.sendmsg(group)
                    if sent < sum(map(len, group)):
                        self._send_rest(group, sent)
            except OSError as exc:
                raise ClientGone(str(exc)) from None

    def _send_rest(self, parts: Sequence[Buffer], sent: int) -> None:
        for part in parts:
            if sent >= len(part):
                sent -= len(part)
                continue
            self.sock.sendall(memoryview(part)[sent:])
            sent = 0

    # ---- life
    def start_tls(self, context: ssl.SSLContext) -> None:
        """Run the server side of a TLS handshake on the socket."""
        try:
            if self.deadline is not None:
                self._arm()  # the whole TLS handshake must fit in what is left
            self.sock = context.wrap_socket(self.sock, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self._gone(exc)
            raise ClientGone(f"TLS handshake failed: {exc}") from None
        self.tls = True

    def stop_reading(self) -> None:
        """Make the reader's next receive see the end of the stream."""
        with contextlib.suppress(OSError):  # the client may have closed it already
            self.sock.shutdown(socket.SHUT_RD)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # closing is all that is left to do with it
            self.sock.close()


class ReplyBatch:
    """The reading thread's replies, collected and sent together."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.arena = memoryview(bytearray(ARENA_SIZE))
        self.used = 0

    @property
    def pending(self) -> bool:
        return self.used > 0

    def send(self, parts: Sequence[Buffer]) -> None:
        """Queue a reply: copied into the arena unless large (then sent at once)."""
        size = len(parts[0]) if len(parts) == 1 else sum(map(len, parts))
        if size >= DIRECT_SEND or self.used + size > ARENA_SIZE:
            self.flush()
            if size >= DIRECT_SEND:
                self.channel.send(parts)
                return
        used = self.used
        arena = self.arena
        for part in parts:
            n = len(part)
            arena[used:used + n] = part
            used += n
        self.used = used

    def flush(self) -> None:
        """Send what is queued."""
        if self.used:
            view, self.used = self.arena[:self.used], 0
            self.channel.send((view,))
