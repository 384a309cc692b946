"""The blocking transport of the client: one socket, one command at a time.

The blocking face (``NBD``, generated from ``aio.py`` into ``blocking.py``)
does all its I/O through this module; ``stream_async`` offers the very same
names to the asyncio face, so ``scripts/unasync.py`` only swaps the module.

    stream = open_unix("/tmp/sock", timeout=30.0)      # NBDError if it cannot connect
    data = stream.receive(16)                          # handshake: up to 16 bytes, b"" at EOF
    stream.send(b"...")
    stream.start_tls(context, "server.example")        # wraps the socket
    stream.start_transmission(Transmission(...))       # no timeout from here on
    command = stream.run(Cmd.READ, 0, len(buf), 0, memoryview(buf))
    stream.close(goodbye)                              # sends goodbye (best effort), closes

**Threads.** ``run`` holds the stream's lock from sending the request to
the last byte of its reply, so any number of threads may share one handle,
as with libnbd (whose handle lock does the same): their commands reach the
server one after the other, each thread waiting for its own reply.
``settle`` and ``close`` take the lock too, so they wait for a command in
progress. For many commands in flight on one connection, give it to a
``sync.Pipeline`` (``hand_over``); ``run`` then refuses with EBUSY.

Each wait for the server while connecting or negotiating gives up after the
``timeout`` given to ``open_*`` (TimeoutError); the transmission phase has
no timeout. ``Lock`` and ``to_thread`` are what the asyncio twin offers
under the same names: a thread lock, and a plain call.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from ..proto.client_transmission import Command, Transmission
from ..proto.constants import Cmd
from .common import closed_error, connect_error, is_tls, tls_error
from .errors import NBDError

if TYPE_CHECKING:
    import ssl

Lock = threading.Lock

P = ParamSpec("P")
T = TypeVar("T")


def to_thread(func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Call ``func`` (the asyncio twin runs it in a worker thread)."""
    return func(*args, **kwargs)


def open_tcp(host: str, port: int, timeout: float | None) -> Stream:
    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise connect_error(exc, where) from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Stream(sock, where, timeout)


def open_unix(path: str, timeout: float | None) -> Stream:
    return _open(socket.AF_UNIX, path, path, timeout)


def open_vsock(cid: int, port: int, timeout: float | None) -> Stream:
    return _open(socket.AF_VSOCK, (cid, port), f"vsock {cid}:{port}", timeout)


def open_socket(sock: socket.socket, where: str, timeout: float | None) -> Stream:
    """A stream over a socket that is already connected to a server."""
    return Stream(sock, where, timeout)


def _open(family: int, address: str | tuple[int, int], where: str, timeout: float | None) -> Stream:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except OSError as exc:
        sock.close()
        raise connect_error(exc, where) from None
    return Stream(sock, where, timeout)


class Stream:
    """One blocking connection to a server (see the module's manual)."""

    def __init__(self, sock: socket.socket, where: str, timeout: float | None) -> None:
        sock.settimeout(timeout)
        self.sock = sock
        self.where = where  # the server, for error messages
        self.tx: Transmission | None = None  # set by start_transmission
        self._lock = threading.Lock()
        self._refusal: tuple[int, str] | None = None  # why run() refuses (closed, handed over)

    # ---------------------------------------------------------- handshake
    def receive(self, size: int) -> bytes:
        """Up to ``size`` bytes from the server; b"" when it hung up."""
        return self.sock.recv(size)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def start_tls(self, context: ssl.SSLContext, server_hostname: str | None) -> None:
        import ssl  # loaded already: the context is one of its
        try:
            self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
        except ssl.SSLError as exc:
            raise tls_error(exc) from None

    def start_transmission(self, tx: Transmission) -> None:
        self.tx = tx
        self.sock.settimeout(None)

    # ------------------------------------------------------- transmission
    def run(self, cmd: int, offset: int, count: int, flags: int, buf: memoryview | None) -> Command:
        """Send one request (``buf``: READ fills it, WRITE sends it) and wait for its reply.

        Raises the socket's OSError or the parser's ProtocolError if the
        connection fails, NBDError (ENOTCONN, EBUSY) if it is not ours to use.
        """
        with self._lock:
            tx = self._transmission()
            command, header = tx.request(cmd, offset, count, flags, buf if cmd == Cmd.READ else None)
            send_request(self.sock, header, buf if cmd == Cmd.WRITE else None)
            while not command.done:
                n = self.sock.recv_into(tx.get_buffer())
                if n == 0:
                    raise tx.connection_lost()
                tx.buffer_updated(n)
            return command

    def in_flight(self) -> int:
        """Commands sent and not yet answered (0 or 1, seen from another thread)."""
        return len(self.tx.in_flight) if self.tx is not None else 0

    def settle(self) -> None:
        """Wait until the command in progress (another thread's) has its answer."""
        with self._lock:
            pass  # the command in progress holds the lock until its answer is in

    def hand_over(self) -> tuple[socket.socket, Transmission]:
        """Give the connection to a ``Pipeline``: from now on ``run`` refuses (EBUSY)."""
        with self._lock:
            tx = self._transmission()
            self._refusal = (errno.EBUSY, "the connection is driven by a Pipeline; submit commands there")
            return self.sock, tx

    def close(self, goodbye: bytes = b"") -> None:
        """Send ``goodbye`` (best effort) and close; later commands raise ENOTCONN."""
        with self._lock:
            self._refusal = (errno.ENOTCONN, "the handle is not connected")
            if goodbye:
                with contextlib.suppress(OSError):  # a goodbye the server cannot hear is moot
                    self.sock.sendall(goodbye)
            with contextlib.suppress(OSError):  # the stream lets go of the socket either way
                self.sock.close()

    def _transmission(self) -> Transmission:
        if self._refusal is not None:
            raise NBDError(*self._refusal)
        if self.tx is None:
            raise closed_error()
        return self.tx


def send_request(sock: socket.socket, header: bytes, payload: memoryview | None) -> None:
    """Send a request header and its payload (WRITE), in one ``sendmsg`` where TLS allows."""
    if payload is None:
        sock.sendall(header)
    elif is_tls(sock):
        sock.sendall(header)
        sock.sendall(payload)
    else:
        sendmsg_all(sock, [memoryview(header), payload])


def sendmsg_all(sock: socket.socket, parts: list[memoryview]) -> None:
    """Send every byte of ``parts`` with as few ``sendmsg`` calls as the kernel allows."""
    parts = [p for p in parts if len(p)]
    while parts:
        sent = sock.sendmsg(parts)
        while sent and parts:
            if sent >= len(parts[0]):
                sent -= len(parts.pop(0))
            else:
                parts[0], sent = parts[0][sent:], 0

