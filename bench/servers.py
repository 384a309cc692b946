"""Starting and stopping the servers a benchmark compares.

A ``ServerSpec`` is a command line with ``{sock}``/``{port}`` placeholders;
``running(spec, transport)`` starts it on a fresh Unix socket or TCP port,
waits until it accepts, yields the URI and the process, and stops it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pynbd.process import stop_process

PYNBD = [sys.executable, "-m", "pynbd", "serve", "-f"]
# Measure Python the way users run it: with bytecode caches (some CI images
# disable them, which adds ~0.1 s of compiling to every start).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


@dataclass(frozen=True)
class ServerSpec:
    """A server to measure: ``label`` in tables, ``argv`` with placeholders."""

    label: str
    argv: tuple[str, ...]
    kind: str  # "pynbd", "nbdkit" or "qemu-nbd"

    def command(self, transport: str, sock: str, port: int) -> list[str]:
        listen: list[str]
        if self.kind == "qemu-nbd":
            listen = ["-k", sock] if transport == "unix" else ["-b", "127.0.0.1", "-p", str(port)]
        else:
            listen = ["-U", sock] if transport == "unix" else ["-i", "127.0.0.1", "-p", str(port)]
        head = {"pynbd": PYNBD, "nbdkit": ["nbdkit", "-f"], "qemu-nbd": ["qemu-nbd"]}[self.kind]
        return [*head, *listen, *self.argv]


def pynbd(label: str, *argv: str) -> ServerSpec:
    return ServerSpec(label, argv, "pynbd")


def nbdkit(label: str, *argv: str) -> ServerSpec:
    return ServerSpec(label, argv, "nbdkit")


def qemu_nbd(label: str, *argv: str) -> ServerSpec:
    return ServerSpec(label, argv, "qemu-nbd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(transport: str, sock: str, port: int, proc: subprocess.Popen,
               timeout: float = 20.0) -> float:
    """Seconds until the server accepted a connection."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}")
        family = socket.AF_UNIX if transport == "unix" else socket.AF_INET
        with socket.socket(family) as s:
            try:
                s.connect(sock if transport == "unix" else ("127.0.0.1", port))
                return time.monotonic() - start
            except OSError:
                time.sleep(0.002)
    raise TimeoutError("server did not start")


@dataclass
class Running:
    uri: str
    proc: subprocess.Popen
    startup: float

    def rss_kib(self) -> int:
        """Resident set of the server process, in KiB."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0


@contextmanager
def running(spec: ServerSpec, transport: str = "unix", timeout: float = 20.0) -> Iterator[Running]:
    tmp = tempfile.mkdtemp(prefix="nbdbench")
    sock = os.path.join(tmp, "sock")
    port = free_port()
    begin = time.monotonic()
    proc = subprocess.Popen(spec.command(transport, sock, port), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        wait_ready(transport, sock, port, proc, timeout)
        startup = time.monotonic() - begin
        uri = f"nbd+unix:///?socket={sock}" if transport == "unix" else f"nbd://127.0.0.1:{port}"
        yield Running(uri, proc, startup)
    finally:
        stop_process(proc)
        for name in os.listdir(tmp):
            os.unlink(os.path.join(tmp, name))
        os.rmdir(tmp)
