"""The asyncio transport of the client: many commands in flight on one connection.

The asyncio face (``AsyncNBD`` in ``aio.py``) does all its I/O through this
module; ``stream_sync`` offers the very same names to the blocking face, so
``scripts/unasync.py`` only swaps the module.

    stream = await open_unix("/tmp/sock", timeout=30.0)   # NBDError if it cannot connect
    data = await stream.receive(16)                      # handshake: up to 16 bytes, b"" at EOF
    await stream.send(b"...")
    await stream.start_tls(context, "server.example")
    stream.start_transmission(Transmission(...))         # no timeout from here on
    command = await stream.run(Cmd.READ, 0, len(buf), 0, memoryview(buf))
    stream.close(goodbye)                                # sends goodbye (best effort), closes

**Tasks.** In the transmission phase a ``BufferedProtocol`` feeds received
bytes to the sans-IO parser (into its buffers, so large read data lands
straight in the caller's buffer) and completes each command's future. Any
number of tasks may ``run`` at once; replies are matched to them by cookie
in whatever order the server sends them, and writes respect the transport's
flow control. A server that breaks the protocol or hangs up fails every
command in flight (RemoteProtocolError, or the connection's OSError);
``settle`` waits for the answers of the commands in flight (before a
goodbye), ``close`` fails those still waiting.
Cancelling a waiting ``run`` does not recall its request: a read still
lands in its buffer when the reply comes.

Each wait for the server while connecting or negotiating gives up after the
``timeout`` given to ``open_*`` (TimeoutError); the transmission phase has
no timeout. ``Lock`` and ``to_thread`` are asyncio's, under the names the
blocking twin uses for a thread lock and a plain call.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
from collections.abc import Awaitable

from ..proto.client_transmission import Command, Transmission
from ..proto.constants import Cmd
from ..proto.errors import ProtocolError
from .common import closed_error, connect_error, tls_error
from .errors import NBDError

Lock = asyncio.Lock
to_thread = asyncio.to_thread

_Opening = Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]


async def open_tcp(host: str, port: int, timeout: float | None) -> Stream:
    return await _open(f"{host}:{port}", timeout, asyncio.open_connection(host, port))


async def open_unix(path: str, timeout: float | None) -> Stream:
    return await _open(path, timeout, asyncio.open_unix_connection(path))


async def open_vsock(cid: int, port: int, timeout: float | None) -> Stream:
    where = f"vsock {cid}:{port}"
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, (cid, port))
    except OSError as exc:
        sock.close()
        raise connect_error(exc, where) from None
    return await open_socket(sock, where, timeout)


async def open_socket(sock: socket.socket, where: str, timeout: float | None) -> Stream:
    """A stream over a socket that is already connected to a server."""
    return await _open(where, timeout, asyncio.open_connection(sock=sock))


async def _open(where: str, timeout: float | None, opening: _Opening) -> Stream:
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await opening
    except OSError as exc:
        raise connect_error(exc, where) from None
    return Stream(reader, writer, where, timeout)


class Stream:
    """One asyncio connection to a server (see the module's manual)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, where: str,
                 timeout: float | None) -> None:
        self.where = where  # the server, for error messages
        self.tx: Transmission | None = None  # set by start_transmission
        self._reader, self._writer, self._timeout = reader, writer, timeout
        self._protocol: _Protocol | None = None
        self._refusal: tuple[int, str] | None = None  # why run() refuses (closed)

    # ---------------------------------------------------------- handshake
    async def receive(self, size: int) -> bytes:
        """Up to ``size`` bytes from the server; b"" when it hung up."""
        async with asyncio.timeout(self._timeout):
            return await self._reader.read(size)

    async def send(self, data: bytes) -> None:
        self._writer.write(data)
        async with asyncio.timeout(self._timeout):
            await self._writer.drain()

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str | None) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._writer.start_tls(context, server_hostname=server_hostname)
        except ssl.SSLError as exc:
            raise tls_error(exc) from None

    def start_transmission(self, tx: Transmission) -> None:
        self.tx = tx
        transport = self._writer.transport
        self._protocol = _Protocol(tx, transport)
        transport.set_protocol(self._protocol)

    # ------------------------------------------------------- transmission
    async def run(self, cmd: int, offset: int, count: int, flags: int,
                  buf: memoryview | None) -> Command:
        """Send one request (``buf``: READ fills it, WRITE sends it) and wait for its reply.

        Raises the connection's OSError or the parser's ProtocolError if the
        connection fails, NBDError (ENOTCONN) if it is closed.
        """
        protocol = self._transmitting()
        command, header = protocol.tx.request(cmd, offset, count, flags,
                                              buf if cmd == Cmd.READ else None)
        future: asyncio.Future[Command] = asyncio.get_running_loop().create_future()
        command.token = future
        protocol.transport.write(header)
        if cmd == Cmd.WRITE and buf is not None and len(buf):
            protocol.transport.write(buf)
        await protocol.drain()
        return await future

    def in_flight(self) -> int:
        """Commands sent and not yet answered."""
        return len(self.tx.in_flight) if self.tx is not None else 0

    async def settle(self) -> None:
        """Wait until every command in flight has its answer (or has failed)."""
        waiting = [command.token for command in self.tx.in_flight.values()] if self.tx else []
        futures = [token for token in waiting if isinstance(token, asyncio.Future)]
        if futures:
            await asyncio.wait(futures)

    def close(self, goodbye: bytes = b"") -> None:
        """Send ``goodbye`` (best effort) and close; later commands raise ENOTCONN."""
        self._refusal = (errno.ENOTCONN, "the handle is not connected")
        transport = self._writer.transport
        if goodbye and not transport.is_closing():
            transport.write(goodbye)
        transport.close()

    def _transmitting(self) -> _Protocol:
        if self._refusal is not None:
            raise NBDError(*self._refusal)
        protocol = self._protocol
        if protocol is None:
            raise closed_error()
        if protocol.dead is not None:
            raise protocol.dead
        return protocol


class _Protocol(asyncio.BufferedProtocol):
    """Feeds received bytes to the sans-IO parser and completes futures."""

    def __init__(self, tx: Transmission, transport: asyncio.WriteTransport) -> None:
        self.tx = tx
        self.transport = transport
        self.dead: BaseException | None = None
        self._paused = False
        self._resume: asyncio.Future[None] | None = None

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.tx.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            finished = self.tx.buffer_updated(nbytes)
        except ProtocolError as exc:
            self.fail(exc)
            self.transport.abort()
            return
        for command in finished:
            future = command.token
            if isinstance(future, asyncio.Future) and not future.done():
                future.set_result(command)

    def eof_received(self) -> bool:
        self.fail(self.tx.connection_lost())
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(self.tx.connection_lost() if exc is None else exc)
        self.resume_writing()

    def fail(self, exc: BaseException) -> None:
        """Fail every command in flight (once); later commands fail at once."""
        if self.dead is None:
            self.dead = exc
        for command in list(self.tx.in_flight.values()):
            self.tx.forget(command)
            future = command.token
            if isinstance(future, asyncio.Future) and not future.done():
                future.set_exception(self.dead)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)
        self._resume = None

    async def drain(self) -> None:
        if self._paused and self.dead is None:
            if self._resume is None:
                self._resume = asyncio.get_running_loop().create_future()
            await self._resume
