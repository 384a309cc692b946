# Generated from aio.py by scripts/unasync.py. Do not edit: edit aio.py,
# then run python3 scripts/unasync.py.
"""The NBD client handle, shaped like libnbd's Python ``nbd.NBD``.

The client has two faces with one API: the asyncio one (``pynbd.client.aio``)
and the blocking one (``pynbd.client.sync``). Both come from one source,
``aio.py``: ``scripts/unasync.py`` writes ``blocking.py`` from it by dropping
every ``async`` and ``await``, and a test runs ``scripts/unasync.py --check``
so that the two cannot drift. Edit ``aio.py`` only, then run the script.
This face does its I/O through ``stream_sync``, whose manual says how
callers running at the same time share one connection.

    h = NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri("nbd+unix:///?socket=/tmp/sock")
    data = h.pread(512, 0)
    h.pwrite(b"hello", 0, flags=CMD_FLAG_FUA)
    extents = h.block_status(h.get_size(), 0)   # {"base:allocation": [length, flags, ...]}
    h.close()

or, with the settings given by name:

    with connect("nbd+unix:///?socket=/tmp/sock", meta_contexts=["base:allocation"]) as h:
        ...

``connect(target, **settings)`` takes an NBD URI or, for a captive server,
its argv as a list (``["qemu-nbd", "-f", "qcow2", "disk.qcow2"]``, run with
systemd socket activation). Settings are attributes of the handle:
``meta_contexts``, ``export_name``, ``opt_mode``, ``request_structured_replies``,
``request_extended_headers``, ``full_info``, ``connect_timeout``, ``tls``,
``tls_certificates``, ``tls_verify_peer`` (each also has libnbd's ``set_*``).

- Connecting: ``connect_uri``, ``connect_tcp``, ``connect_unix``,
  ``connect_vsock``, ``connect_socket``, ``connect_command(argv)`` (a captive
  server on its stdin and stdout), ``connect_systemd_socket_activation(argv)``.
  Each wait for the server gives up after ``connect_timeout`` seconds (30 by
  default).
- Option mode (``opt_mode``): ``opt_list(callback=None)`` -> [(name,
  description)], ``opt_list_meta_context(callback=None)`` -> [name],
  ``opt_info()``, ``opt_go()``, ``opt_abort()``.
- Facts, once connected (no I/O, the same in both faces): ``get_size``,
  ``can_zero``, ``get_block_size``, ``can_meta_context`` ...
- Commands, each taking ``flags=0`` last (``CMD_FLAG_FUA`` ...):
  ``pread(count, offset) -> bytes``; ``pread_into(buf, offset)`` fills
  ``buf`` in place, large data received straight into it; ``pwrite(buf,
  offset)`` sends ``buf`` without a copy (do not change either buffer until
  the call returns); ``zero(count, offset)``, ``trim``, ``cache``, ``flush()``;
  ``block_status(count, offset, callback=None)`` returns ``{context: [length,
  flags, ...]}`` and calls libnbd's ``callback(context, offset, entries,
  error)`` per chunk.
- Ending: ``shutdown()`` waits for the commands in flight, sends NBD_CMD_DISC
  (NBD_OPT_ABORT in option mode) and closes the connection; ``close()`` also
  stops a captive server.

Errors: ``NBDError`` (an ``OSError`` whose ``errno`` says why) when the server
refuses a command or an option, when a command is invalid for the export,
and when the connection fails; ``RemoteProtocolError`` (a ``ProtocolError``)
when the server breaks the protocol. After a failed connection the handle is
closed, and every later command raises ``NBDError`` (ENOTCONN).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence
from typing import Any

from ..proto.client_handshake import ClientHandshake, Event, OptionRefused, StartTLS
from ..proto.client_handshake import State as HandshakeState
from ..proto.client_transmission import Command
from ..proto.constants import Cmd
from ..proto.errors import ProtocolError
from ..proto.machine import NeedData, Send
from .captive import Captive, spawn_activated, spawn_stdin
from .common import (
    Buffer,
    ContextCallback,
    ExportCallback,
    ExtentCallback,
    HandleBase,
    apply_settings,
    bytes_view,
    call_extent_callback,
    closed_error,
    command_error,
    connect_error,
    extents_by_name,
    lost_error,
    option_result,
    refused_error,
)
from .errors import NBDError
from .stream_sync import Lock, Stream, open_socket, open_tcp, open_unix, open_vsock, to_thread


class NBD(HandleBase):
    """A connection to one NBD export (see the module's manual)."""

    def __init__(self) -> None:
        super().__init__()
        self._stream: Stream | None = None
        self._captive: Captive | None = None
        self._lock = Lock()  # one connect, option or shutdown at a time

    def __enter__(self) -> NBD:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ connect
    def connect_uri(self, uri: str) -> None:
        parsed = self._apply_uri(uri)
        if parsed.transport == "unix":
            self.connect_unix(parsed.socket)
        elif parsed.transport == "vsock":
            self.connect_vsock(int(parsed.host), parsed.port)
        else:
            self.connect_tcp(parsed.host, parsed.port)

    def connect_tcp(self, host: str, port: int | str) -> None:
        with self._lock:
            self._unconnected(host)
            self._negotiate(open_tcp(host, int(port), self.connect_timeout))

    def connect_unix(self, path: str) -> None:
        with self._lock:
            self._unconnected()
            self._negotiate(open_unix(path, self.connect_timeout))

    def connect_vsock(self, cid: int, port: int) -> None:
        with self._lock:
            self._unconnected()
            self._negotiate(open_vsock(cid, port, self.connect_timeout))

    def connect_socket(self, sock: socket.socket) -> None:
        """Negotiate over a socket that is already connected to a server."""
        with self._lock:
            self._unconnected()
            self._negotiate(open_socket(sock, "socket", self.connect_timeout))

    def connect_command(self, argv: Sequence[str]) -> None:
        """Run a server (``nbdkit -s ...``) with a socket as its stdin and stdout."""
        with self._lock:
            self._unconnected()
            sock, self._captive = to_thread(spawn_stdin, argv)
            self._negotiate(open_socket(sock, argv[0], self.connect_timeout))

    def connect_systemd_socket_activation(self, argv: Sequence[str]) -> None:
        """Run a server (``qemu-nbd ...``) handed a listening socket as fd 3."""
        with self._lock:
            self._unconnected()
            path, self._captive = to_thread(spawn_activated, argv)
            self._negotiate(open_unix(path, self.connect_timeout))

    def _unconnected(self, host: str | None = None) -> None:
        """Refuse to connect twice; remember the TCP host name TLS checks."""
        if self._stream is not None:
            raise NBDError(errno.EISCONN, "the handle is already connected")
        self._server_hostname = host

    def _negotiate(self, stream: Stream) -> None:
        self._stream = stream
        self._hs = ClientHandshake(self._handshake_config())
        self._drive(self._hs)

    # ---------------------------------------------------------- handshake
    def _drive(self, hs: ClientHandshake) -> Event:
        """Run the handshake until it needs the user or is over."""
        stream = self.stream()
        try:
            while True:
                event = hs.next_event()
                if isinstance(event, NeedData):
                    data = stream.receive(event.size)
                    if not data:
                        raise hs.connection_lost()
                    hs.receive_data(data)
                elif isinstance(event, Send):
                    stream.send(event.data)
                elif isinstance(event, StartTLS):
                    stream.start_tls(*self._tls_context())
                    hs.tls_established()
                else:
                    tx = self._settle(event)
                    if tx is not None:
                        stream.start_transmission(tx)
                    return event
        except OptionRefused as refused:
            if hs.state is HandshakeState.CLOSED:
                self._drop()
            raise refused_error(refused) from None
        except ProtocolError:
            self._drop()
            raise
        except OSError as exc:
            self._drop()
            raise connect_error(exc, stream.where) from None

    # -------------------------------------------------------- option mode
    def _option(self, name: str) -> Event:
        with self._lock:
            return self._drive(self._begin_option(name))

    def opt_go(self) -> None:
        self._option("opt_go")

    def opt_info(self) -> None:
        self._option("opt_info")

    def opt_list(self, callback: ExportCallback | None = None) -> list[tuple[str, str]]:
        """Ask for every export; call ``callback(name, description)`` for each; return them."""
        exports: list[tuple[str, str]] = option_result(self._option("opt_list"))
        if callback is not None:
            for name, description in exports:
                callback(name, description)
        return exports

    def opt_list_meta_context(self, callback: ContextCallback | None = None) -> list[str]:
        """Ask which meta contexts match the ones added; call ``callback(name)`` for each;
        return them."""
        names: list[str] = option_result(self._option("opt_list_meta_context"))
        if callback is not None:
            for name in names:
                callback(name)
        return names

    def opt_abort(self) -> None:
        """Leave option mode: send NBD_OPT_ABORT and close the connection."""
        with self._lock:
            self._drop(self._negotiating("opt_abort").opt_abort())

    # ------------------------------------------------------- transmission
    def _run(
        self, cmd: int, offset: int, count: int, flags: int, buf: memoryview | None = None,
    ) -> Command:
        self.check_command(cmd, offset, count, flags)
        stream = self.stream()
        try:
            command = stream.run(cmd, offset, count, flags, buf)
        except NBDError:
            raise  # the stream refused: the connection is as it was
        except ProtocolError:
            self._drop()
            raise
        except OSError as exc:
            self._drop()
            raise lost_error(exc, stream.where) from None
        error = command_error(command)
        if error is not None:
            raise error
        return command

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

    def block_status(
        self, count: int, offset: int, callback: ExtentCallback | None = None, flags: int = 0,
    ) -> dict[str, list[int]]:
        """Ask for extents from ``offset``; call ``callback(context, offset, entries, err)``
        per chunk as libnbd does, and return ``{context: [length, flags, ...]}``."""
        command = self._run(Cmd.BLOCK_STATUS, offset, count, flags)
        contexts = self.negotiated.meta_contexts
        if callback is not None:
            call_extent_callback(callback, contexts, command)
        return extents_by_name(contexts, command)

    def in_flight(self) -> int:
        """Commands sent and not yet answered."""
        return self._stream.in_flight() if self._stream is not None else 0

    def stream(self) -> Stream:
        """The connection's transport (a ``sync.Pipeline`` takes the blocking one over)."""
        if self._stream is None:
            raise closed_error()
        return self._stream

    # ------------------------------------------------------------- ending
    def shutdown(self, flags: int = 0) -> None:
        """Wait for the answers to the commands in flight, tell the server we are done and
        close the connection (``flags``, libnbd's, are accepted and ignored)."""
        with self._lock:
            if self._stream is not None:
                self._stream.settle()
            self._drop(self._goodbye())

    def close(self) -> None:
        """Shut down, then stop and reap a captive server."""
        self.shutdown()
        if self._captive is not None:
            captive, self._captive = self._captive, None
            to_thread(captive.close)

    def _goodbye(self) -> bytes:
        """NBD_CMD_DISC in transmission, NBD_OPT_ABORT in option mode, else nothing."""
        stream, hs = self._stream, self._hs
        if self._ready and stream is not None and stream.tx is not None:
            return stream.tx.disconnect()
        if hs is not None and hs.state is HandshakeState.NEGOTIATING:
            return hs.opt_abort()
        return b""

    def _drop(self, goodbye: bytes = b"") -> None:
        """Let go of the connection, sending ``goodbye`` first (best effort)."""
        self._ready = False
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close(goodbye)


def connect(target: str | Sequence[str], **settings: Any) -> NBD:
    """Connect to an NBD URI, or run ``target`` (an argv list) as a captive server;
    ``settings`` are handle attributes (see the module's manual)."""
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
