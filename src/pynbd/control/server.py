"""The control socket of a running server: a listener thread and the command table.

``ControlSocket.bind(PATH, table)`` claims the Unix socket (a live one is
refused, a stale one replaced) in the foreground, before the server
daemonizes; ``start()`` serves it from threads: one accepts, one per client reads
lines, runs each request's command and writes its reply, in order. A
command runs on its client's thread, concurrently with the exports' I/O
and with other control clients. ``close()`` disconnects the clients and
removes the socket file.

``CommandTable`` maps words to commands: the built-in ``help`` and
``status`` and those of every layer (``control_commands()``). A refusal
(``ControlError``), a command nobody registered, a wrong number of
arguments and a line that is not a request get an error reply; any other
exception from a command is logged with its traceback and answered with an
error reply. Nothing a control client sends reaches the data path.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable

from ..backend import Command, ConfigError, ControlError, OpenContext
from ..backend.stack import Stack
from .protocol import CLOSED, Invalid, Request, RequestReader, error_line, ok_line

log = logging.getLogger("pynbd.control")

MAX_CLIENTS = 256  # beyond this a new control client is told so and disconnected
RECV_SIZE = 64 * 1024
CLOSE_WAIT = 10.0  # seconds close() waits for running commands


class CommandTable:
    """Commands by their words; the longest matching words win."""

    def __init__(self, commands: Iterable[Command]) -> None:
        self.commands: dict[tuple[str, ...], Command] = {}
        self.longest = 0
        for command in commands:
            self.add(command)

    @classmethod
    def for_stack(cls, stack: Stack, connections: Callable[[], int]) -> CommandTable:
        """The built-in commands and every layer's, for a server of ``stack``."""
        started = time.monotonic()

        def status() -> object:
            try:
                exports: object = [{"name": e.name, "description": e.description}
                                   for e in stack.list_exports(OpenContext())]
            except (OSError, LookupError, ConfigError) as exc:  # e.g. a remote server is down
                exports = f"cannot list them: {exc}"
            return {"pid": os.getpid(), "uptime": round(time.monotonic() - started, 3),
                    "connections": connections(), "exports": exports,
                    "layers": [layer.name for layer in stack.layers]}

        table = cls([Command(("status",), (), "the server's pid, uptime, connections and exports",
                             status)])
        table.add(Command(("help",), ("*WORDS",), "the commands (those starting with WORDS), "
                          "their arguments and what they do", table.help))
        for layer in stack.layers:
            for command in layer.control_commands():
                table.add(command)
        return table

    def add(self, command: Command) -> None:
        if command.words in self.commands:
            raise ConfigError(f"two layers register the control command '{command.name}'")
        self.commands[command.words] = command
        self.longest = max(self.longest, len(command.words))

    def help(self, *words: str) -> list[dict[str, str]]:
        """Each command's usage and help, or those of the commands whose words start with ``words``."""
        chosen = [c for c in self.commands.values() if c.words[:len(words)] == words]
        if not chosen:
            raise ControlError(f"no command starts with {' '.join(words)!r}")
        return [{"command": c.usage, "help": c.help} for c in chosen]

    def lookup(self, words: tuple[str, ...]) -> tuple[Command, tuple[str, ...]]:
        """The command ``words`` start with, and the arguments after its words."""
        for count in range(min(self.longest, len(words)), 0, -1):
            command = self.commands.get(words[:count])
            if command is not None:
                return command, words[count:]
        near = sorted(c.name for c in self.commands.values() if c.words[0] == words[0])
        shown = " ".join(words)[:80]
        if near:
            raise ControlError(f"unknown command {shown!r}; did you mean: {', '.join(near)}")
        raise ControlError(f"unknown command {shown!r}; 'help' lists the commands")

    def run(self, words: tuple[str, ...]) -> object:
        """Run a request's command; ControlError for anything the client got wrong."""
        command, arguments = self.lookup(words)
        return command.invoke(arguments)

    def reply(self, words: tuple[str, ...], request_id: object, has_id: bool) -> bytes:
        """The reply line to a request. Never raises."""
        try:
            return ok_line(self.run(words), request_id, has_id)
        except ControlError as exc:
            return error_line(str(exc), request_id, has_id)
        except Exception as exc:  # noqa: BLE001 (a bug in a command fails that request only)
            log.exception("control command %r raised", " ".join(words)[:200])
            return error_line(f"internal error: {type(exc).__name__}: {exc}", request_id, has_id)


class ControlSocket:
    """The listening control socket and its client threads."""

    def __init__(self, sock: socket.socket, path: str, table: CommandTable) -> None:
        self.sock = sock
        self.path = path
        self.table = table
        self.inode = os.stat(path).st_ino
        self._clients: dict[socket.socket, threading.Thread] = {}
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def bind(cls, path: str, table: CommandTable) -> ControlSocket:
        """Listen on ``path``; ConfigError if a server answers there or it is not a socket."""
        path = os.path.abspath(path)
        _clear_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, 0o600)  # the control plane is for the server's owner
            sock.listen(64)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen on control socket {path}: {exc.strerror}") from None
        return cls(sock, path, table)

    def start(self) -> None:
        """Serve the commands from background threads (after the server daemonized)."""
        threading.Thread(target=self._accept_loop, name="control-accept", daemon=True).start()

    def close(self) -> None:
        """Stop accepting, disconnect the clients, remove the socket file (if still ours).

        Commands still running are waited for (up to CLOSE_WAIT seconds in
        all), so that the layers are not unloaded under them.
        """
        with self._lock:
            self._closed = True
            clients = dict(self._clients)
        with contextlib.suppress(OSError):  # not connected: already closed
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for client in clients:
            with contextlib.suppress(OSError):  # the client hung up meanwhile
                client.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + CLOSE_WAIT
        for thread in clients.values():
            thread.join(max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError as exc:
                if self._closed:
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("control socket: accept failed: %s", exc)
                    time.sleep(0.1)
                continue
            thread = threading.Thread(target=self._serve_client, args=(client,), name="control-client",
                                      daemon=True)
            with self._lock:
                refused = self._closed or len(self._clients) >= MAX_CLIENTS
                if not refused:
                    self._clients[client] = thread
            if refused:
                with contextlib.suppress(OSError):  # the client left already
                    client.sendall(error_line(f"too many control clients (at most {MAX_CLIENTS})"))
                client.close()
                continue
            thread.start()

    def _serve_client(self, client: socket.socket) -> None:
        table = self.table
        reader = RequestReader()
        try:
            while True:
                event = reader.next_event()
                if isinstance(event, Request):
                    client.sendall(table.reply(event.command, event.id, event.has_id))
                elif isinstance(event, Invalid):
                    client.sendall(error_line(event.message, event.id, event.has_id))
                elif event is CLOSED:
                    return
                else:
                    data = client.recv(RECV_SIZE)
                    if data:
                        reader.receive_data(data)
                    else:
                        reader.receive_eof()
        except OSError as exc:
            log.debug("control client went away: %s", exc)
        finally:
            with self._lock:
                self._clients.pop(client, None)
            client.close()


def _clear_stale(path: str) -> None:
    """Remove a dead server's socket at ``path``; refuse a live one or a non-socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"control socket {path} exists and is not a socket; not replacing it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # nobody listens: a stale socket from a server that died
            return
        except OSError as exc:
            raise ConfigError(f"control socket {path}: {exc.strerror}") from None
    raise ConfigError(f"control socket {path} is in use by a running server")
