"""The blocking client handle, shaped like libnbd's Python ``nbd.NBD``.

    from pynbd.client import NBD
    h = NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri("nbd+unix:///?socket=/tmp/sock")
    data = h.pread(512, 0)
    h.pwrite(b"hello", 0, flags=CMD_FLAG_FUA)
    h.block_status(h.get_size(), 0, lambda ctx, off, entries, err: print(ctx, entries))
    h.shutdown(); h.close()

One command is in flight at a time on the handle itself; for many, use
``pynbd.client.aio`` or wrap a connected handle in a ``Pipeline``:

    p = Pipeline(h)                          # starts a receiver thread
    p.submit(CMD_READ, offset, len(buf), 0, buf, lambda command, error: ...)
    p.call(Cmd.FLUSH)                        # submit and wait
    p.close()                                # stops the thread, closes the handle

``submit`` may be called from any thread; it sends header and payload with
one ``sendmsg``, and the receiver thread reads replies (read data straight
into the caller's buffer) and calls each command's ``done(command, error)``
(``error`` None, an ``NBDError``, or the ``ProtocolError`` or connection
failure that ended the connection and every command in flight). Over TLS,
where one SSL connection cannot be read and written by two threads at once,
``submit`` waits for its own reply instead (one command in flight), calling
``done`` before it returns.
Errors from the server raise ``NBDError`` (an ``OSError`` with the errno);
a server that breaks the protocol raises ``ProtocolError`` and the handle
is closed. Connecting (socket and handshake) gives up after
``connect_timeout`` seconds (30 by default, ``set_connect_timeout``).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
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
    ExtentCallback,
    HandleBase,
    apply_settings,
    bytes_view,
    call_extent_callback,
    command_error,
    connect_error,
    extents_by_name,
    refused_error,
    tls_error,
)
from .errors import NBDError


class NBD(HandleBase):
    """A blocking connection to one NBD export."""

    def __init__(self) -> None:
        super().__init__()
        self._sock: socket.socket | None = None
        self._tx: Transmission | None = None
        self._captive: Captive | None = None

    def __enter__(self) -> NBD:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ connect
    def connect_uri(self, uri: str) -> None:
        name, args = self._uri_connector(uri)
        getattr(self, name)(*args)

    def connect_tcp(self, host: str, port: int | str) -> None:
        where = f"{host}:{port}"
        try:
            sock = socket.create_connection((host, int(port)), timeout=self.connect_timeout)
        except OSError as exc:
            raise connect_error(exc, where) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._server_hostname = host
        self._start(sock, where)

    def connect_unix(self, path: str) -> None:
        self._connect_family(socket.AF_UNIX, path, path)

    def connect_vsock(self, cid: int, port: int) -> None:
        self._connect_family(socket.AF_VSOCK, (cid, port), f"vsock {cid}:{port}")

    def _connect_family(self, family: int, address: object, where: str) -> None:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(self.connect_timeout)
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            raise connect_error(exc, where) from None
        self._start(sock, where)

    def connect_socket(self, sock: socket.socket) -> None:
        """Negotiate over a socket that is already connected to a server."""
        self._start(sock, "socket")

    def connect_command(self, argv: Sequence[str]) -> None:
        """Run a server (``nbdkit -s ...``) with a socket as its stdin and stdout."""
        sock, self._captive = spawn_stdin(argv)
        self._start(sock, argv[0])

    def connect_systemd_socket_activation(self, argv: Sequence[str]) -> None:
        """Run a server (``qemu-nbd ...``) handed a listening socket as fd 3."""
        path, self._captive = spawn_activated(argv)
        self.connect_unix(path)

    def _start(self, sock: socket.socket, where: str) -> None:
        if self._sock is not None:
            sock.close()
            raise NBDError(errno.EISCONN, "the handle is already connected")
        sock.settimeout(self.connect_timeout)
        self._sock, self._where = sock, where
        self._hs = ClientHandshake(self._handshake_config())
        self._drive()

    # ---------------------------------------------------------- handshake
    def _drive(self) -> object:
        """Run the handshake until it needs the user or is over."""
        assert self._hs is not None
        try:
            return self._drive_events(self._hs)
        except OptionRefused as refused:
            if self._hs.state is HandshakeState.CLOSED:
                self._drop()
            raise refused_error(refused) from None
        except ProtocolError:
            self._drop()
            raise
        except OSError as exc:
            self._drop()
            raise connect_error(exc, self._where) from None

    def _drive_events(self, hs: ClientHandshake) -> object:
        while True:
            event = hs.next_event()
            if isinstance(event, NeedData):
                hs.receive_data(self._recv_exact(event.size, hs))
            elif isinstance(event, Send):
                self._socket().sendall(event.data)
            elif isinstance(event, StartTLS):
                self._start_tls()
                hs.tls_established()
            else:
                return self._settle(hs, event)

    def _recv_exact(self, size: int, hs: ClientHandshake) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = self._socket().recv(size - len(data))
            if not chunk:
                raise hs.connection_lost()
            data += chunk
        return bytes(data)

    def _start_tls(self) -> None:
        unix = self._socket().family != socket.AF_INET and self._socket().family != socket.AF_INET6
        context, server_hostname = self._tls_context(unix)
        try:
            self._sock = context.wrap_socket(self._socket(), server_hostname=server_hostname)
        except ssl.SSLError as exc:
            raise tls_error(exc) from None

    def _start_transmission(self, tx: Transmission) -> None:
        self._tx = tx
        self._socket().settimeout(None)

    # -------------------------------------------------------- option mode
    def _option(self, name: str) -> object:
        self._begin_option(name)
        return self._drive()

    def opt_go(self) -> None:
        self._option("opt_go")

    def opt_info(self) -> None:
        self._option("opt_info")

    def opt_list(self, callback: Callable[[str, str], Any] | None = None) -> list[tuple[str, str]]:
        """Ask for every export; call ``callback(name, description)`` for each; return them."""
        event = self._option("opt_list")
        exports: list[tuple[str, str]] = event.result if isinstance(event, OptionDone) else []
        for name, description in exports if callback else ():
            callback(name, description)
        return exports

    def opt_list_meta_context(self, callback: Callable[[str], Any] | None = None) -> list[str]:
        event = self._option("opt_list_meta_context")
        names: list[str] = event.result if isinstance(event, OptionDone) else []
        for name in names if callback else ():
            callback(name)
        return names

    def opt_abort(self) -> None:
        hs = self._negotiating("opt_abort")
        try:
            self._socket().sendall(hs.opt_abort())
        finally:
            self._drop()

    # ------------------------------------------------------- transmission
    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise NBDError(errno.ENOTCONN, "the handle is not connected")
        return self._sock

    def _run(self, cmd: int, offset: int, count: int, flags: int,
             buf: memoryview | None = None) -> Command:
        self._check_command(cmd, offset, count, flags)
        assert self._tx is not None
        command, header = self._tx.request(cmd, offset, count, flags,
                                           buf if cmd == Cmd.READ else None)
        try:
            self._send(header, buf if cmd == Cmd.WRITE else None)
            self._wait(command)
        except ProtocolError:
            self._drop()
            raise
        except OSError as exc:
            self._drop()
            raise self._lost(exc) from None
        error = command_error(command)
        if error is not None:
            raise error
        return command

    def _lost(self, exc: OSError) -> NBDError:
        return NBDError(exc.errno or errno.EIO, f"connection to {self._where} failed: "
                                                f"{exc.strerror or exc}")

    def _send(self, header: bytes, payload: memoryview | None) -> None:
        sock = self._socket()
        if payload is None:
            sock.sendall(header)
        elif isinstance(sock, ssl.SSLSocket):
            sock.sendall(header)
            sock.sendall(payload)
        else:
            sendmsg_all(sock, [memoryview(header), payload])

    def _wait(self, command: Command) -> None:
        sock, tx = self._socket(), self._tx
        assert tx is not None
        while not command.done:
            n = sock.recv_into(tx.get_buffer())
            if n == 0:
                raise tx.connection_lost()
            tx.buffer_updated(n)

    def pread(self, count: int, offset: int, flags: int = 0) -> bytes:
        buf = bytearray(count)
        self.pread_into(buf, offset, flags)
        return bytes(buf)

    def pread_into(self, buf: Buffer, offset: int, flags: int = 0) -> None:
        """Read ``len(buf)`` bytes at ``offset`` straight into ``buf``."""
        view = bytes_view(buf)
        self._run(Cmd.READ, offset, len(view), flags, view)

    def pwrite(self, buf: Buffer, offset: int, flags: int = 0) -> None:
        view = bytes_view(buf)
        self._run(Cmd.WRITE, offset, len(view), flags, view)

    def zero(self, count: int, offset: int, flags: int = 0) -> None:
        self._run(Cmd.WRITE_ZEROES, offset, count, flags)

    def trim(self, count: int, offset: int, flags: int = 0) -> None:
        self._run(Cmd.TRIM, offset, count, flags)

    def cache(self, count: int, offset: int, flags: int = 0) -> None:
        self._run(Cmd.CACHE, offset, count, flags)

    def flush(self, flags: int = 0) -> None:
        self._run(Cmd.FLUSH, 0, 0, flags)

    def block_status(self, count: int, offset: int, callback: ExtentCallback | None = None,
                     flags: int = 0) -> dict[str, list[int]]:
        """Ask for extents from ``offset``; call ``callback(context, offset, entries, err)``
        per context as libnbd does, and return ``{context: [length, flags, ...]}``."""
        command = self._run(Cmd.BLOCK_STATUS, offset, count, flags)
        contexts = self.negotiated.meta_contexts
        if callback is not None:
            call_extent_callback(callback, contexts, command)
        return extents_by_name(contexts, command)

    # ------------------------------------------------------------- ending
    def shutdown(self, flags: int = 0) -> None:
        """Tell the server we are done (NBD_CMD_DISC) and close the connection."""
        goodbye = b""
        if self._ready and self._tx is not None:
            goodbye = self._tx.disconnect()
        elif self._hs is not None and self._hs.state is HandshakeState.NEGOTIATING:
            goodbye = self._hs.opt_abort()
        if goodbye and self._sock is not None:
            with contextlib.suppress(OSError):  # a goodbye the server cannot hear is moot
                self._sock.sendall(goodbye)
        self._drop()

    def close(self) -> None:
        self.shutdown()
        if self._captive is not None:
            captive, self._captive = self._captive, None
            captive.close()

    def _drop(self) -> None:
        self._ready = False
        if self._sock is not None:
            sock, self._sock = self._sock, None
            with contextlib.suppress(OSError):  # the handle lets go of the socket either way
                sock.close()


Done = Callable[[Command, BaseException | None], None]
PIPELINE_SEND_BUFFER = 4 * 1024 * 1024


class Pipeline:
    """Many commands in flight on one connected ``NBD`` handle (see the module's manual)."""

    def __init__(self, handle: NBD) -> None:
        if handle._tx is None:
            raise NBDError(errno.ENOTCONN, "the handle is not ready for commands")
        self.handle = handle
        self._sock, self._tx = handle._socket(), handle._tx
        self._tx.direct_reads = True
        widen_send_buffer(self._sock)
        self._lock = threading.Lock()  # sending, and registering commands
        self._dead: BaseException | None = None
        self._closing = False
        self._thread: threading.Thread | None = None
        if not isinstance(self._sock, ssl.SSLSocket):
            self._thread = threading.Thread(target=self._receive, daemon=True,
                                            name=f"nbd-receive {handle._where}")
            self._thread.start()

    def submit(self, cmd: int, offset: int, count: int, flags: int,
               buf: memoryview | None, done: Done) -> None:
        """Send one command; ``done(command, error)`` is called once when it is over.

        Raises (without calling ``done``) if the command is invalid or the
        connection is already dead.
        """
        self.handle._check_command(cmd, offset, count, flags)
        with self._lock:
            if self._dead is not None:
                raise self._dead
            command, header = self._tx.request(cmd, offset, count, flags,
                                               buf if cmd == Cmd.READ else None)
            command.token = done
            try:
                self.handle._send(header, buf if cmd == Cmd.WRITE else None)
                finished = self._wait_lockstep(command) if self._thread is None else ()
            except (OSError, ProtocolError) as exc:
                self._broken(exc)
                finished = () if self._thread is not None else self._fail_all()
        for command in finished:
            self._deliver(command)

    def call(self, cmd: int, offset: int = 0, count: int = 0, flags: int = 0,
             buf: memoryview | None = None) -> Command:
        """Submit one command and wait for it; raise its error."""
        over = threading.Event()
        outcome: list[tuple[Command, BaseException | None]] = []

        def done(command: Command, error: BaseException | None) -> None:
            outcome.append((command, error))
            over.set()

        self.submit(cmd, offset, count, flags, buf, done)
        over.wait()
        command, error = outcome[0]
        if error is not None:
            raise error
        return command

    def close(self) -> None:
        """Stop the receiver (commands still in flight fail) and close the handle."""
        with self._lock:
            self._closing = True
        if self._thread is not None:
            with contextlib.suppress(OSError):  # already gone is as good as shut
                self._sock.shutdown(socket.SHUT_RD)
            self._thread.join()
        self.handle.close()

    # ------------------------------------------------------------ inside
    def _wait_lockstep(self, command: Command) -> list[Command]:
        finished: list[Command] = []
        while not command.done:
            n = self._sock.recv_into(self._tx.get_buffer())
            if n == 0:
                raise self._tx.connection_lost()
            finished.extend(self._tx.buffer_updated(n))
        return finished

    def _receive(self) -> None:
        sock, tx = self._sock, self._tx
        try:
            while True:
                n = sock.recv_into(tx.get_buffer())
                if n == 0:
                    if self._closing and not tx.in_flight:
                        return
                    raise tx.connection_lost()
                for command in tx.buffer_updated(n):
                    self._deliver(command)
        except (OSError, ProtocolError) as exc:
            with self._lock:
                self._broken(exc)
            for command in self._fail_all():
                self._deliver(command)

    def _broken(self, exc: BaseException) -> None:
        """Record why the connection ended (the lock is held)."""
        if self._dead is None:
            self._dead = self.handle._lost(exc) if isinstance(exc, OSError) else exc
        with contextlib.suppress(OSError):  # wake the receiver; the socket may be gone
            self._sock.shutdown(socket.SHUT_RDWR)

    def _fail_all(self) -> list[Command]:
        failed = list(self._tx.in_flight.values())
        for command in failed:
            self._tx.forget(command)
        return failed

    def _deliver(self, command: Command) -> None:
        done: Done = command.token  # type: ignore[assignment]
        if command.done:
            done(command, command_error(command))
        else:
            done(command, self._dead)


def widen_send_buffer(sock: socket.socket) -> None:
    """Let a Unix socket take a whole large write at once.

    Its default send buffer (about 200 KiB) is smaller than one 256 KiB
    write, so a sender would wait for the server to read each write in
    pieces. TCP sizes its buffers itself.
    """
    if sock.family == socket.AF_UNIX:
        with contextlib.suppress(OSError):  # a smaller buffer is slower, not wrong
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PIPELINE_SEND_BUFFER)


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


def connect(target: str | Sequence[str], **settings: Any) -> NBD:
    """Connect to an NBD URI, or run ``target`` (an argv list) as a captive server
    with socket activation; ``settings`` are handle attributes (see ``aio.connect``)."""
    handle = NBD()
    apply_settings(handle, settings)
    try:
        if isinstance(target, str):
            handle.connect_uri(target)
        else:
            handle.connect_systemd_socket_activation(target)
    except BaseException:
        handle.close()
        raise
    return handle
