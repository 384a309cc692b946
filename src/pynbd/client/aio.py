"""The asyncio client handle: many commands in flight on one connection.

    from pynbd.client.aio import connect

    async with await connect("nbd+unix:///?socket=/tmp/sock",
                             meta_contexts=["base:allocation"]) as h:
        size = h.get_size()
        buf = bytearray(1 << 20)
        await asyncio.gather(h.pread_into(memoryview(buf)[:65536], 0),
                             h.pwrite(b"x" * 4096, 1 << 20))
        extents = await h.block_status(size, 0)   # {"base:allocation": [len, flags, ...]}

``connect(target, **settings)`` takes an NBD URI or, for a captive server,
the server's argv as a list (``["qemu-nbd", "-f", "qcow2", "disk.qcow2"]``,
run with systemd socket activation). ``settings`` are attributes of the
handle: ``meta_contexts``, ``export_name``, ``opt_mode``,
``request_structured_replies``, ``request_extended_headers``,
``connect_timeout``, ``tls``, ``tls_certificates``, ``tls_verify_peer``.

``AsyncNBD`` has the blocking handle's getters (``get_size``, ``can_zero``,
``get_block_size``, ``can_meta_context`` ...) and coroutine commands:

- ``await h.pread(count, offset, flags=0) -> bytes``
- ``await h.pread_into(buf, offset, flags=0)``: fills ``buf`` in place; large
  data is received straight into it (no copy). Do not touch ``buf`` until done.
- ``await h.pwrite(buf, offset, flags=0)``: ``buf`` is sent without a copy
  where the kernel takes it at once; do not change it until the await returns.
- ``await h.zero(count, offset, flags=0)``, ``trim``, ``cache``, ``flush(flags=0)``
- ``await h.block_status(count, offset, flags=0) -> {context: [length, flags, ...]}``
- ``await h.close()`` (sends NBD_CMD_DISC, stops a captive server), or ``async with``.

Each command is one request; any number may be awaited concurrently (the
caller bounds them, e.g. with a semaphore), and replies are matched to them
by cookie in whatever order the server sends them. Server errors raise
``NBDError`` (errno set); a server that breaks the protocol or hangs up
fails every command in flight with ``ProtocolError``. Writes respect the
transport's flow control. Cancelling an awaiting coroutine does not recall
its request: a read still lands in its buffer when the reply comes.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
from collections.abc import Sequence
from typing import Any

from ..proto.client_handshake import (
    ClientHandshake,
    NeedData,
    OptionDone,
    OptionRefused,
    Send,
    StartTLS,
)
from ..proto.client_handshake import (
    State as HandshakeState,
)
from ..proto.client_transmission import Command, Transmission
from ..proto.constants import Cmd
from ..proto.errors import ProtocolError
from .captive import Captive, spawn_activated, spawn_stdin
from .common import (
    Buffer,
    HandleBase,
    apply_settings,
    bytes_view,
    command_error,
    connect_error,
    extents_by_name,
    refused_error,
    tls_error,
)
from .errors import NBDError


class _Protocol(asyncio.BufferedProtocol):
    """Feeds received bytes to the sans-IO parser and completes futures."""

    def __init__(self, tx: Transmission, transport: asyncio.BaseTransport) -> None:
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
            self.transport.abort()  # type: ignore[attr-defined]
            return
        for command in finished:
            future = command.token
            if isinstance(future, asyncio.Future) and not future.done():
                future.set_result(command)

    def eof_received(self) -> bool:
        self.fail(self.tx.connection_lost())
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self.fail(self.tx.connection_lost())
        else:
            self.fail(NBDError(getattr(exc, "errno", None) or errno.EIO,
                               f"connection lost: {exc}"))
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


class AsyncNBD(HandleBase):
    """An asyncio connection to one NBD export."""

    def __init__(self) -> None:
        super().__init__()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._protocol: _Protocol | None = None
        self._captive: Captive | None = None

    async def __aenter__(self) -> AsyncNBD:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ connect
    async def connect_uri(self, uri: str) -> None:
        name, args = self._uri_connector(uri)
        await getattr(self, name)(*args)

    async def connect_tcp(self, host: str, port: int | str) -> None:
        self._server_hostname = host
        await self._open(f"{host}:{port}", lambda: asyncio.open_connection(host, int(port)))

    async def connect_unix(self, path: str) -> None:
        await self._open(path, lambda: asyncio.open_unix_connection(path))

    async def connect_vsock(self, cid: int, port: int) -> None:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (cid, port)),
                                   self.connect_timeout)
        except OSError as exc:
            sock.close()
            raise connect_error(exc, f"vsock {cid}:{port}") from None
        await self.connect_socket(sock)

    async def connect_socket(self, sock: socket.socket) -> None:
        """Negotiate over a socket that is already connected to a server."""
        await self._open("socket", lambda: asyncio.open_connection(sock=sock))

    async def connect_command(self, argv: Sequence[str]) -> None:
        """Run a server (``nbdkit -s ...``) with a socket as its stdin and stdout."""
        sock, self._captive = await asyncio.to_thread(spawn_stdin, argv)
        await self._open(argv[0], lambda: asyncio.open_connection(sock=sock))

    async def connect_systemd_socket_activation(self, argv: Sequence[str]) -> None:
        """Run a server (``qemu-nbd ...``) handed a listening socket as fd 3."""
        path, self._captive = await asyncio.to_thread(spawn_activated, argv)
        await self.connect_unix(path)

    async def _open(self, where: str, opener: Any) -> None:
        if self._writer is not None:
            raise NBDError(errno.EISCONN, "the handle is already connected")
        self._where = where
        try:
            async with asyncio.timeout(self.connect_timeout):
                self._reader, self._writer = await opener()
                self._hs = ClientHandshake(self._handshake_config())
                await self._drive()
        except TimeoutError:
            self._drop()
            raise NBDError(errno.ETIMEDOUT, f"connect: {where}: timed out") from None
        except OSError as exc:
            raise connect_error(exc, where) from None

    # ---------------------------------------------------------- handshake
    async def _drive(self) -> object:
        assert self._hs is not None
        try:
            return await self._drive_events(self._hs)
        except OptionRefused as refused:
            if self._hs.state is HandshakeState.CLOSED:
                self._drop()
            raise refused_error(refused) from None
        except (ProtocolError, OSError):
            self._drop()
            raise

    async def _drive_events(self, hs: ClientHandshake) -> object:
        assert self._reader is not None and self._writer is not None
        while True:
            event = hs.next_event()
            if isinstance(event, NeedData):
                try:
                    hs.receive_data(await self._reader.readexactly(event.size))
                except asyncio.IncompleteReadError:
                    raise hs.connection_lost() from None
            elif isinstance(event, Send):
                self._writer.write(event.data)
                await self._writer.drain()
            elif isinstance(event, StartTLS):
                await self._start_tls()
                hs.tls_established()
            else:
                return self._settle(hs, event)

    async def _start_tls(self) -> None:
        assert self._writer is not None
        sock = self._writer.get_extra_info("socket")
        unix = sock is not None and sock.family == socket.AF_UNIX
        context, server_hostname = self._tls_context(unix)
        try:
            await self._writer.start_tls(context, server_hostname=server_hostname)
        except ssl.SSLError as exc:
            raise tls_error(exc) from None

    def _start_transmission(self, tx: Transmission) -> None:
        assert self._writer is not None
        transport = self._writer.transport
        self._protocol = _Protocol(tx, transport)
        transport.set_protocol(self._protocol)

    # -------------------------------------------------------- option mode
    async def _option(self, name: str) -> object:
        self._begin_option(name)
        return await self._drive()

    async def opt_go(self) -> None:
        await self._option("opt_go")

    async def opt_info(self) -> None:
        await self._option("opt_info")

    async def opt_list(self) -> list[tuple[str, str]]:
        event = await self._option("opt_list")
        return event.result if isinstance(event, OptionDone) else []  # type: ignore[return-value]

    async def opt_list_meta_context(self) -> list[str]:
        event = await self._option("opt_list_meta_context")
        return event.result if isinstance(event, OptionDone) else []  # type: ignore[return-value]

    # ------------------------------------------------------- transmission
    async def _run(self, cmd: int, offset: int, count: int, flags: int,
                   buf: memoryview | None = None) -> Command:
        self._check_command(cmd, offset, count, flags)
        protocol = self._protocol
        assert protocol is not None
        if protocol.dead is not None:
            raise protocol.dead
        command, header = protocol.tx.request(cmd, offset, count, flags,
                                              buf if cmd == Cmd.READ else None)
        future: asyncio.Future[Command] = asyncio.get_running_loop().create_future()
        command.token = future
        transport = protocol.transport
        transport.write(header)  # type: ignore[attr-defined]
        if cmd == Cmd.WRITE and buf is not None and len(buf):
            transport.write(buf)  # type: ignore[attr-defined]
        await protocol.drain()
        await future
        error = command_error(command)
        if error is not None:
            raise error
        return command

    async def pread(self, count: int, offset: int, flags: int = 0) -> bytes:
        buf = bytearray(count)
        await self.pread_into(buf, offset, flags)
        return bytes(buf)

    async def pread_into(self, buf: Buffer, offset: int, flags: int = 0) -> None:
        view = bytes_view(buf)
        await self._run(Cmd.READ, offset, len(view), flags, view)

    async def pwrite(self, buf: Buffer, offset: int, flags: int = 0) -> None:
        view = bytes_view(buf)
        await self._run(Cmd.WRITE, offset, len(view), flags, view)

    async def zero(self, count: int, offset: int, flags: int = 0) -> None:
        await self._run(Cmd.WRITE_ZEROES, offset, count, flags)

    async def trim(self, count: int, offset: int, flags: int = 0) -> None:
        await self._run(Cmd.TRIM, offset, count, flags)

    async def cache(self, count: int, offset: int, flags: int = 0) -> None:
        await self._run(Cmd.CACHE, offset, count, flags)

    async def flush(self, flags: int = 0) -> None:
        await self._run(Cmd.FLUSH, 0, 0, flags)

    async def block_status(self, count: int, offset: int, flags: int = 0) -> dict[str, list[int]]:
        command = await self._run(Cmd.BLOCK_STATUS, offset, count, flags)
        return extents_by_name(self.negotiated.meta_contexts, command)

    def in_flight(self) -> int:
        return len(self._protocol.tx.in_flight) if self._protocol else 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """The transport's extra info (``"socket"`` to tune buffer sizes, ``"peername"``...)."""
        if self._writer is None:
            return default
        return self._writer.transport.get_extra_info(name, default)

    # ------------------------------------------------------------- ending
    async def shutdown(self) -> None:
        """Send NBD_CMD_DISC and close the connection."""
        protocol = self._protocol
        if self._ready and protocol is not None and protocol.dead is None:
            protocol.transport.write(protocol.tx.disconnect())  # type: ignore[attr-defined]
        elif self._hs is not None and self._hs.state is HandshakeState.NEGOTIATING:
            if self._writer is not None:
                self._writer.write(self._hs.opt_abort())
        self._drop()

    async def close(self) -> None:
        await self.shutdown()
        if self._captive is not None:
            captive, self._captive = self._captive, None
            await asyncio.to_thread(captive.close)

    def _drop(self) -> None:
        self._ready = False
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.transport.close()


async def connect(target: str | Sequence[str], **settings: Any) -> AsyncNBD:
    """Connect to an NBD URI, or run ``target`` (an argv list) as a captive server."""
    handle = AsyncNBD()
    apply_settings(handle, settings)
    try:
        if isinstance(target, str):
            await handle.connect_uri(target)
        else:
            await handle.connect_systemd_socket_activation(target)
    except BaseException:
        await handle.close()
        raise
    return handle
