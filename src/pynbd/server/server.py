"""Listening sockets, the accept loop and the server's lifetime.

``Server`` owns the listeners (TCP, Unix, inherited systemd sockets or one
already-connected socket for ``--single``), starts a ``Session`` thread per
client, enforces ``serialize_connections`` and shuts everything down on
``shutdown()``, a signal, or the end of a ``--run`` command.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import shutil
import socket
import struct
import tempfile
import threading

from ..backend import ConfigError
from ..backend.shutdown import on_shutdown_request
from ..control.server import ControlSocket
from .session import Session, SessionConfig

log = logging.getLogger("pynbd.server")

SD_LISTEN_FDS_START = 3
SEND_BUFFER = 4 << 20  # room for several large read replies before sendmsg waits
REPLY_TIMEOUT = 60  # seconds a reply may wait for a client that does not read; then it is dropped
MAX_CONNECTIONS = 1024  # clients served at once; more are refused (--filter=limit sets fewer)


class Listener:
    """The sockets a server accepts on, and how to name them in a URI."""

    def __init__(self, sockets: list[socket.socket], port: int | None = None,
                 unix_path: str | None = None, private_dir: str | None = None,
                 activated: bool = False) -> None:
        self.sockets = sockets
        self.activated = activated  # inherited from systemd (implies foreground)
        self.port = port
        self.unix_path = unix_path
        self.private_dir = private_dir

    @classmethod
    def tcp(cls, ipaddr: str | None, port: int) -> Listener:
        """Listen on every address ``ipaddr`` resolves to (all when None)."""
        try:
            infos = socket.getaddrinfo(ipaddr, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise ConfigError(f"cannot resolve listening address {ipaddr!r}: {exc}") from None
        sockets: list[socket.socket] = []
        seen: set[tuple[int, object]] = set()
        for family, kind, proto, _, addr in infos:
            if (family, addr[0]) in seen:
                continue
            seen.add((family, addr[0]))
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(addr)
            except OSError as exc:
                sock.close()
                for other in sockets:
                    other.close()
                raise ConfigError(f"cannot listen on {addr[0]} port {port}: {exc.strerror}") from None
            sock.listen(128)
            sockets.append(sock)
        actual = sockets[0].getsockname()[1]
        return cls(sockets, port=actual)

    @classmethod
    def unix(cls, path: str) -> Listener:
        """Listen on a Unix socket; ``-`` makes a private one in a fresh temp dir."""
        private = None
        if path == "-":
            private = tempfile.mkdtemp(prefix="pynbd")
            path = os.path.join(private, "socket")
        path = os.path.abspath(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen on Unix socket {path}: {exc.strerror}") from None
        sock.listen(128)
        return cls([sock], unix_path=path, private_dir=private)

    @classmethod
    def systemd(cls) -> Listener | None:
        """Sockets passed by systemd socket activation, or None."""
        if os.environ.get("LISTEN_PID") != str(os.getpid()):
            return None
        count = int(os.environ.get("LISTEN_FDS", "0"))
        if count <= 0:
            return None
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
        sockets = [socket.socket(fileno=fd) for fd in range(SD_LISTEN_FDS_START,
                                                             SD_LISTEN_FDS_START + count)]
        return cls(sockets, port=_port_of(sockets[0]), unix_path=_path_of(sockets[0]),
                   activated=True)

    def uri(self, exportname: str = "", tls: bool = False) -> str:
        """An NBD URI a client can use to reach this listener."""
        scheme = "nbds" if tls else "nbd"
        name = exportname
        if self.unix_path is not None:
            return f"{scheme}+unix:///{name}?socket={self.unix_path}"
        return f"{scheme}://localhost:{self.port}/{name}" if name else f"{scheme}://localhost:{self.port}"

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        if self.unix_path is not None and not self.activated:  # systemd owns its sockets
            with contextlib.suppress(FileNotFoundError):  # someone removed it: the goal is met
                os.unlink(self.unix_path)
        if self.private_dir is not None:
            shutil.rmtree(self.private_dir, ignore_errors=True)


def _port_of(sock: socket.socket) -> int | None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        port: int = sock.getsockname()[1]
        return port
    return None


def _path_of(sock: socket.socket) -> str | None:
    if sock.family == socket.AF_UNIX:
        name = sock.getsockname()
        return name if isinstance(name, str) and name else None
    return None


class Server:
    """Accepts clients on a listener and serves each in its own thread."""

    def __init__(self, config: SessionConfig, listener: Listener) -> None:
        self.config = config
        self.listener = listener
        self._one_connection = config.dispatch.one_connection
        self._stop_r, self._stop_w = os.pipe()
        self._sessions: set[Session] = set()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self.stopping = False
        self.control: ControlSocket | None = None  # --control=PATH, closed before the stack unloads
        # Filters that end the server (exitlast, exitwhen) reach this one, embedded or not.
        self._forget_shutdown = on_shutdown_request(self.shutdown)

    # ---- lifetime
    def serve_forever(self) -> None:
        """Accept clients until shutdown() is called."""
        selector = selectors.DefaultSelector()
        for sock in self.listener.sockets:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        selector.register(self._stop_r, selectors.EVENT_READ)
        try:
            while not self.stopping:
                for key, _ in selector.select():
                    if key.fileobj == self._stop_r:
                        self.stopping = True
                        break
                    self._accept(key.fileobj)  # type: ignore[arg-type]
        finally:
            selector.close()
            self._finish()

    def serve_one(self, sock: socket.socket) -> None:
        """Serve a single already-connected client (``--single``) in this thread."""
        try:
            self._session(sock, "stdin")
        finally:
            self._finish()

    def shutdown(self) -> None:
        """Stop accepting and disconnect every client. Safe from any thread or a signal."""
        with contextlib.suppress(OSError):  # pipe full or closed: a stop is already pending or done
            os.write(self._stop_w, b"x")

    def connection_count(self) -> int:
        """How many clients are connected now."""
        with self._lock:
            return len(self._sessions)

    def _finish(self) -> None:
        self.stopping = True
        self.listener.close()
        if self.control is not None:
            self.control.close()
        with self._lock:
            sessions = list(self._sessions)
            threads = list(self._threads)
        for session in sessions:
            session.stop()
        for thread in threads:
            thread.join(timeout=10)
        self._forget_shutdown()
        self.config.stack.unload()
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):  # already closed by an earlier shutdown
                os.close(fd)

    # ---- clients
    def _accept(self, listening: socket.socket) -> None:
        try:
            sock, address = listening.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("accept failed: %s", exc)
            return
        with self._lock:
            crowded = len(self._threads) >= MAX_CONNECTIONS
        if crowded:
            log.warning("refusing a client: %d connections already (the most one server serves)",
                        MAX_CONNECTIONS)
            sock.close()
            return
        sock.setblocking(True)
        # A client that stops reading its replies is dropped instead of holding its workers.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", REPLY_TIMEOUT, 0))
        if sock.family == socket.AF_UNIX:  # TCP tunes its own buffers; setting one stops that
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.config.keepalive:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        else:
            address = f"unix#{sock.fileno()}"  # Unix clients have no address of their own
        thread = threading.Thread(target=self._session, args=(sock, address),
                                  name=f"nbd-client-{address}", daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _session(self, sock: socket.socket, address: object) -> None:
        session = Session(sock, self.config, address)
        with self._lock:
            self._sessions.add(session)
        try:
            if self._one_connection is not None:
                with self._one_connection:
                    session.run()
            else:
                session.run()
        finally:
            with self._lock:
                self._sessions.discard(session)
                self._threads.discard(threading.current_thread())
