"""One thread, many NBD connections: the copy's event loop.

A ``Loop`` is an epoll set of non-blocking NBD connections (``Channel``).
``Channel.submit`` only queues a request; ``Loop.poll`` sends every queued
request of a connection with one ``sendmsg`` (headers and write payloads
together, up to ``IOV_MAX`` buffers), waits for replies, reads them with
``recv_into`` (read data straight into the caller's buffer) and finishes
each command by calling its ``done(command, error)`` from the loop's own
thread. Nothing is shared between threads, so there is no lock to take and
no interpreter lock to hand over: one copy with four connections costs
the CPU of one with a single connection.

A connection that fails (the server hung up, a reply breaks the protocol)
finishes every command in flight on it with the same error; later submits
raise it. ``call`` (block status, flush) submits one command and polls
until it is over; it must not be called from a ``done`` callback. Another
thread hands work back to the loop's thread with ``call_soon_threadsafe``
(an eventfd wakes the loop).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
from collections import deque
from collections.abc import Callable

from ...client.common import command_error, lost_error
from ...client.sync import NBD, widen_send_buffer
from ...proto.client_transmission import Command
from ...proto.constants import Cmd
from ...proto.errors import ProtocolError

Done = Callable[[Command, BaseException | None], None]
IOV_MAX = 1024  # buffers in one sendmsg


class Loop:
    """The connections of one copy, driven from one thread."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._channels: dict[int, Channel] = {}
        self._queued: list[Channel] = []  # channels with requests not sent yet
        self._failed = False  # a channel failed this round: its commands are finished
        self._calls: deque[Callable[[], None]] = deque()  # from other threads
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake, select.EPOLLIN)

    def add(self, channel: Channel) -> None:
        self._channels[channel.fd] = channel
        self._epoll.register(channel.fd, select.EPOLLIN)

    def remove(self, channel: Channel) -> None:
        if self._channels.pop(channel.fd, None) is not None:
            self._epoll.unregister(channel.fd)

    def want_write(self, channel: Channel, on: bool) -> None:
        self._epoll.modify(channel.fd, select.EPOLLIN | (select.EPOLLOUT if on else 0))

    def queued(self, channel: Channel) -> None:
        self._queued.append(channel)

    def failed(self, channel: Channel) -> None:
        """``channel`` is over and has finished its commands: stop driving it, and do not
        wait for events this round (what the caller waits for may be among them)."""
        self.remove(channel)
        self._failed = True

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        """Have ``fn`` called from the loop's thread (from any thread)."""
        self._calls.append(fn)
        os.eventfd_write(self._wake, 1)

    def poll(self) -> None:
        """Send what is queued, then wait for at least one reply (or room to send) and
        finish the commands it completes."""
        queued, self._queued, self._failed = self._queued, [], False
        for channel in queued:
            channel.send()
        if self._queued or self._failed:
            return  # a send failed and finished commands (which may have queued more)
        for fd, events in self._epoll.poll():
            if fd == self._wake:
                os.eventfd_read(self._wake)
                while self._calls:
                    self._calls.popleft()()
                continue
            ready = self._channels.get(fd)
            if ready is None:
                continue  # closed by a callback of this same round
            if events & select.EPOLLOUT:
                ready.send()
            if events & ~select.EPOLLOUT:
                ready.receive()

    def run_until(self, over: Callable[[], bool]) -> None:
        while not over():
            self.poll()

    def close(self) -> None:
        self._epoll.close()
        os.close(self._wake)


class Channel:
    """One connected NBD handle, driven by a ``Loop``."""

    def __init__(self, handle: NBD, loop: Loop) -> None:
        stream = handle.stream()
        self.handle, self.loop = handle, loop
        self._where = stream.where
        self._sock, self._tx = stream.hand_over()
        self._tx.direct_reads = True
        self.fd = self._sock.fileno()
        widen_send_buffer(self._sock)
        self._sock.setblocking(False)
        self._out: list[memoryview] = []  # requests not (wholly) sent yet
        self._writing = False  # waiting for room in the socket's send buffer
        self._dead: BaseException | None = None
        loop.add(self)

    def submit(self, cmd: int, offset: int, count: int, flags: int,
               buf: memoryview | None, done: Done) -> None:
        """Queue one command; ``done(command, error)`` is called once when it is over.

        Raises (without calling ``done``) if the command is invalid or the
        connection is already dead.
        """
        self.handle.check_command(cmd, offset, count, flags)
        if self._dead is not None:
            raise self._dead
        command, header = self._tx.request(cmd, offset, count, flags,
                                           buf if cmd == Cmd.READ else None)
        command.token = done
        if not self._out and not self._writing:
            self.loop.queued(self)
        self._out.append(memoryview(header))
        if cmd == Cmd.WRITE and buf is not None and len(buf):
            self._out.append(buf)

    def call(self, cmd: int, offset: int = 0, count: int = 0, flags: int = 0,
             buf: memoryview | None = None) -> Command:
        """Submit one command and poll until it is over; raise its error."""
        outcome: list[tuple[Command, BaseException | None]] = []
        self.submit(cmd, offset, count, flags, buf,
                    lambda command, error: outcome.append((command, error)))
        self.loop.run_until(lambda: bool(outcome))
        command, error = outcome[0]
        if error is not None:
            raise error
        return command

    def send(self) -> None:
        out = self._out
        try:
            while out:
                sent = self._sock.sendmsg(out[:IOV_MAX])
                done = 0
                for part in out:
                    if sent < len(part):
                        break
                    sent -= len(part)
                    done += 1
                del out[:done]
                if sent:
                    out[0] = out[0][sent:]
        except BlockingIOError:
            if not self._writing:
                self._writing = True
                self.loop.want_write(self, True)
            return
        except OSError as exc:
            self._fail(exc)
            return
        if self._writing:
            self._writing = False
            self.loop.want_write(self, False)

    def receive(self) -> None:
        sock, tx = self._sock, self._tx
        try:
            while True:
                buf = tx.get_buffer()
                n = sock.recv_into(buf)
                if n == 0:
                    raise tx.connection_lost()
                for command in tx.buffer_updated(n):
                    done: Done = command.token  # type: ignore[assignment]
                    done(command, command_error(command))
                if n < len(buf):
                    return  # the socket is empty for now
        except BlockingIOError:
            return
        except (OSError, ProtocolError) as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        """The connection is over: every command in flight finishes with ``exc``."""
        if self._dead is None:
            self._dead = lost_error(exc, self._where) if isinstance(exc, OSError) else exc
        self._out.clear()
        self._writing = False
        self.loop.failed(self)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        failed = list(self._tx.in_flight.values())
        for command in failed:
            self._tx.forget(command)
        for command in failed:
            done: Done = command.token  # type: ignore[assignment]
            done(command, self._dead)

    def close(self) -> None:
        """Stop driving the connection and close the handle (commands in flight are
        abandoned: the copy has already finished or failed)."""
        self.loop.remove(self)
        with contextlib.suppress(OSError):
            self._sock.setblocking(True)
        self.handle.close()
