"""pause: hold clients' requests while the storage below is snapshotted.

    pynbd serve --control=/run/disk.ctl --filter=pause file disk.img
    pynbd ctl /run/disk.ctl pause        # returns once requests in flight are done
    pynbd ctl /run/disk.ctl resume

    pynbd serve --filter=pause file disk.img pause-control=/run/pause.sock
    echo p | nc -U /run/pause.sock       # answers P; r resumes (answers R)

While paused, every request a client sends waits (it is not failed) until
the export is resumed. ``pause`` returns only when the requests already
running have finished, so the layer below is then idle (a plugin's own
background threads excepted). Clients time out on their own if the pause
is long: a kernel client or a virtual machine tolerates only short ones.

Commands on the server's control socket (``--control=PATH``)
    pause          hold new requests; wait for those running
    resume         let held requests run

Parameters
    pause-control=SOCKET   also listen on the Unix socket SOCKET, nbdkit's
                           way: each byte ``p`` pauses and answers ``P``,
                           ``r`` resumes and answers ``R``; spaces, tabs and
                           newlines are ignored; anything else answers ``X``.
                           An existing file of that name is replaced; the
                           socket is removed when the server exits.

Pausing does not flush: put the fua filter or flush from the client if the
snapshot must hold what was written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager

from ..backend import Command, ConfigError, Filter, Param
from ..backend.guarded import GuardedConnection

log = logging.getLogger("pynbd.filters.pause")

_ANSWERS = {ord("p"): b"P", ord("r"): b"R"}
_IGNORED = frozenset(b" \t\n")


class Gate:
    """Lets requests through unless paused; counts those in flight."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.paused = False
        self.running = 0

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        with self.cond:
            while self.paused:
                self.cond.wait()
            self.running += 1
        try:
            yield
        finally:
            with self.cond:
                self.running -= 1
                if not self.running:
                    self.cond.notify_all()

    def pause(self) -> str:
        with self.cond:
            self.paused = True
            while self.running:
                self.cond.wait()
        log.info("pause: requests paused")
        return "paused"

    def resume(self) -> str:
        with self.cond:
            self.paused = False
            self.cond.notify_all()
        log.info("pause: requests resumed")
        return "resumed"


class PauseConnection(GuardedConnection["PauseFilter"]):
    """Every request waits at the gate while the server is paused."""

    def guard(self) -> AbstractContextManager[object]:
        return self.filter.gate.request()


class PauseFilter(Filter):
    name = "pause"
    params = (Param("pause-control", "path", "also listen for p / r on this Unix socket"),)
    pause_control: str | None
    connection = PauseConnection

    def config_complete(self) -> None:
        self.gate = Gate()
        self.listener: socket.socket | None = None

    def control_commands(self) -> Sequence[Command]:
        return (Command(("pause",), (), "hold new requests, wait for those running", self.gate.pause),
                Command(("resume",), (), "let held requests run", self.gate.resume))

    def get_ready(self) -> None:
        path = self.pause_control
        if path is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            listener.listen()
        except OSError as exc:
            listener.close()
            raise ConfigError(f"pause: pause-control={path}: {exc.strerror}") from None
        self.listener = listener

    def after_fork(self) -> None:
        if self.listener is not None:
            threading.Thread(target=self._accept, args=(self.listener,), name="pause-control",
                             daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return  # closed at unload
            threading.Thread(target=self._serve, args=(sock,), name="pause-client",
                             daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        with sock, contextlib.suppress(OSError):
            while data := sock.recv(4096):
                for byte in data:
                    if byte in _IGNORED:
                        continue
                    if byte == ord("p"):
                        self.gate.pause()
                    elif byte == ord("r"):
                        self.gate.resume()
                    sock.sendall(_ANSWERS.get(byte, b"X"))

    def unload(self) -> None:
        if self.listener is not None:
            self.listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(str(self.pause_control))
