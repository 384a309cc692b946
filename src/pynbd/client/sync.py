"""The blocking face of the client: ``NBD``, ``connect`` and ``Pipeline``.

``NBD`` and ``connect`` are generated from the asyncio face (``aio.py``, whose
manual is theirs too) into ``blocking.py`` by ``scripts/unasync.py``: the
same methods, arguments, return values and exceptions, without ``await``.

    from pynbd.client.sync import connect
    with connect("nbd+unix:///?socket=/tmp/sock", meta_contexts=["base:allocation"]) as h:
        data = h.pread(512, 0)
        h.block_status(h.get_size(), 0, lambda ctx, off, entries, err: print(ctx, entries))

**Threads.** An ``NBD`` handle is safe to share between threads. Each
command holds the connection's lock from sending its request to receiving
the last byte of its reply, as libnbd's handle lock does, so the commands
of several threads reach the server one after the other and each thread
gets its own reply; connecting, option-mode calls and ``shutdown``/``close``
take the handle's lock (``close`` waits for a command in progress).

For many commands in flight on one connection, wrap a connected handle in
a ``Pipeline`` (the handle's own commands then refuse with EBUSY):

    p = Pipeline(h)                          # starts a receiver thread
    p.submit(Cmd.READ, offset, len(buf), 0, buf, lambda command, error: ...)
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
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

from ..proto.client_transmission import Command
from ..proto.constants import Cmd
from ..proto.errors import ProtocolError
from .blocking import NBD, connect
from .common import command_error, is_tls, lost_error
from .stream_sync import send_request

__all__ = ["NBD", "Pipeline", "connect"]

Done = Callable[[Command, BaseException | None], None]
PIPELINE_SEND_BUFFER = 4 * 1024 * 1024


class Pipeline:
    """Many commands in flight on one connected ``NBD`` handle (see the module's manual)."""

    def __init__(self, handle: NBD) -> None:
        stream = handle.stream()
        self.handle = handle
        self._where = stream.where
        self._sock, self._tx = stream.hand_over()
        self._tx.direct_reads = True
        widen_send_buffer(self._sock)
        self._lock = threading.Lock()  # sending, and registering commands
        self._dead: BaseException | None = None
        self._closing = False
        self._thread: threading.Thread | None = None
        if not is_tls(self._sock):
            self._thread = threading.Thread(target=self._receive, daemon=True,
                                            name=f"nbd-receive {self._where}")
            self._thread.start()

    def submit(self, cmd: int, offset: int, count: int, flags: int,
               buf: memoryview | None, done: Done) -> None:
        """Send one command; ``done(command, error)`` is called once when it is over.

        Raises (without calling ``done``) if the command is invalid or the
        connection is already dead.
        """
        self.handle.check_command(cmd, offset, count, flags)
        with self._lock:
            if self._dead is not None:
                raise self._dead
            command, header = self._tx.request(cmd, offset, count, flags,
                                               buf if cmd == Cmd.READ else None)
            command.token = done
            try:
                send_request(self._sock, header, buf if cmd == Cmd.WRITE else None)
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
            self._dead = lost_error(exc, self._where) if isinstance(exc, OSError) else exc
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

