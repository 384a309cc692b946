"""Serve a plugin stack from Python: ``pynbd.serve()``.

    import subprocess
    import pynbd

    with pynbd.serve("memory", size="1G", filters=["delay"], rdelay="10ms") as srv:
        subprocess.run(["qemu-img", "info", srv.uri], check=True)

``serve(plugin, *args, filters=[...], subprocess=False, readonly=False, **params)``
returns a ``ServedStack``; entering it starts the server, leaving it stops
the server and removes everything it made.

Arguments
    plugin       a plugin name (``memory``, ``file``) or a path to a ``.py`` file
    *args        command-line words, as after the plugin on ``pynbd serve``:
                 the magic first parameter (``"1G"``) and ``key=value`` words
    filters      filter names, the first one is the outermost (as ``--filter=``)
    subprocess   False (default): the server runs in this process, in a
                 background thread accepting on a private Unix socket.
                 True: ``pynbd serve -f -U SOCKET ...`` runs as a child process.
    readonly     serve read-only (``-r``)
    **params     ``key=value`` parameters; an underscore in a keyword stands
                 for a hyphen (``delay_open=1`` is ``delay-open=1``) unless a
                 layer declares the name with the underscore. Values are
                 converted with ``str()``; booleans become ``true``/``false``.

The ``ServedStack`` has
    uri          ``nbd+unix:///?socket=...``, for qemu-img, nbdinfo, libnbd
    socket       the Unix socket's path (in a fresh private directory)
    pid          the server's process ID (this process when in-process)

A configuration mistake (unknown plugin, malformed parameter) raises
``pynbd.backend.ConfigError`` from ``__enter__``: in-process it is the same
error ``pynbd serve`` would print; for a subprocess its message is the
server's error output. On exit the in-process server stops accepting,
disconnects its clients, joins its threads and unloads the stack; a
subprocess is sent SIGTERM (SIGKILL after 10 s). Either way the private
socket directory is removed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess as _subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from ..backend import ConfigError
from ..backend.registry import find_filter, find_plugin
from ..backend.stack import Stack
from ..process import stop_process
from .dispatch import plan_for
from .server import Listener, Server
from .session import SessionConfig

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def serve(plugin: str, *args: str, filters: Sequence[str] = (), subprocess: bool = False,
          readonly: bool = False, **params: Any) -> ServedStack:
    """A context manager serving ``plugin`` with ``filters``; see the module manual."""
    words = [*args, *param_words(plugin, filters, params)]
    return ServedStack(plugin, words, list(filters), subprocess=subprocess, readonly=readonly)


def param_words(plugin: str, filters: Sequence[str], params: dict[str, Any]) -> list[str]:
    """``key=value`` words for keyword parameters (``_`` read as ``-`` when undeclared)."""
    if not params:
        return []
    declared = {p.name for p in find_plugin(plugin).params}
    for name in filters:
        declared.update(p.name for p in find_filter(name).params)
    words = []
    for key, value in params.items():
        if key not in declared:
            key = key.replace("_", "-")
        if isinstance(value, bool):
            value = "true" if value else "false"
        words.append(f"{key}={value}")
    return words


class ServedStack:
    """A running server: ``.uri``, ``.socket``, ``.pid``. Use it with ``with``."""

    def __init__(self, plugin: str, words: Sequence[str], filters: Sequence[str],
                 subprocess: bool = False, readonly: bool = False) -> None:
        self.plugin = plugin
        self.words = list(words)
        self.filters = list(filters)
        self.subprocess = subprocess
        self.readonly = readonly
        self.uri = ""
        self.socket = ""
        self.pid = 0
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self._proc: _subprocess.Popen[bytes] | None = None
        self._dir: str | None = None

    # ---- context manager
    def __enter__(self) -> ServedStack:
        if self.subprocess:
            self._start_subprocess()
        else:
            self._start_thread()
        self.uri = f"nbd+unix:///?socket={self.socket}"
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Stop the server and remove its socket directory (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None
        if self._proc is not None:
            stop_process(self._proc, STOP_TIMEOUT)
            self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # ---- in-process
    def _start_thread(self) -> None:
        stack = Stack.from_args(self.plugin, self.words, self.filters)
        stack.get_ready()
        listener = Listener.unix("-")
        stack.after_fork()
        config = SessionConfig(stack=stack, dispatch=plan_for(stack), readonly=self.readonly)
        self._server = Server(config, listener)
        self.socket = listener.unix_path or ""
        self.pid = os.getpid()
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name=f"pynbd-serve-{self.plugin}", daemon=True)
        self._thread.start()

    # ---- subprocess
    def _start_subprocess(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="pynbd")
        self.socket = os.path.join(self._dir, "socket")
        command = [sys.executable, "-m", "pynbd", "serve", "-f", "-U", self.socket,
                   *(["-r"] if self.readonly else []),
                   *(f"--filter={name}" for name in self.filters), self.plugin, *self.words]
        errors = open(os.path.join(self._dir, "stderr"), "w+b")  # noqa: SIM115 (kept for the child)
        with errors:
            self._proc = _subprocess.Popen(command, stdin=_subprocess.DEVNULL,
                                           stdout=_subprocess.DEVNULL, stderr=errors)
            self.pid = self._proc.pid
            try:
                _wait_for_socket(self.socket, self._proc, errors)
            except BaseException:
                self.close()
                raise


def _wait_for_socket(path: str, proc: _subprocess.Popen[bytes], errors: Any) -> None:
    """Return once ``path`` accepts a connection; ConfigError if the server exits."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            errors.seek(0)
            text = errors.read().decode(errors="replace").strip()
            last = text.splitlines()[-1] if text else f"exited with status {proc.returncode}"
            raise ConfigError(last.removeprefix("pynbd: error: "))
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(path)
                return
            except OSError:
                time.sleep(0.02)
    raise ConfigError(f"pynbd serve did not listen on {path} within {START_TIMEOUT:.0f} s")
