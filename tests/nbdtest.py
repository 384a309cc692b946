"""Helpers shared by the test suite: start servers, run peers, wait for sockets.

    from nbdtest import served, run, PYNBD

    with served("memory", "1M") as srv:          # pynbd serve -f -U SOCK memory 1M
        run(["nbdinfo", srv.uri])
    with served("memory", "1M", server="nbdkit") as srv:   # the same under nbdkit
        ...
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from pynbd.process import stop_process

PYNBD = [sys.executable, "-m", "pynbd"]
SERVE = [*PYNBD, "serve"]


@dataclass
class Served:
    uri: str
    socket: str
    proc: subprocess.Popen

    def stderr(self) -> str:
        """What the server logged so far (only after it exited)."""
        return self.proc.stderr.read().decode() if self.proc.stderr else ""


def wait_for_socket(path: str, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Wait until a Unix socket accepts connections (or the server died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"server exited with {proc.returncode}: {err}")
        if os.path.exists(path):
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(path)
                    return
                except OSError:
                    pass
        time.sleep(0.02)
    raise TimeoutError(f"no server on {path} after {timeout}s")


@contextmanager
def served(*args: str, server: str = "pynbd", options: Sequence[str] = (),
           env: dict[str, str] | None = None) -> Iterator[Served]:
    """Serve ``args`` (plugin, params, --filter=…) on a fresh Unix socket.

    ``server`` is "pynbd" or "nbdkit" (the oracle for differential tests).
    """
    tmp = tempfile.mkdtemp(prefix="nbdtest")
    sock = os.path.join(tmp, "sock")
    base = SERVE if server == "pynbd" else ["nbdkit"]
    cmd = [*base, "-f", "-U", sock, *options, *args]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env)
    try:
        wait_for_socket(sock, proc)
        yield Served(f"nbd+unix:///?socket={sock}", sock, proc)
    finally:
        stop_process(proc)
        try:
            os.unlink(sock)
        except FileNotFoundError:
            pass
        os.rmdir(tmp)


def run(cmd: Sequence[str], *, input: bytes | None = None, check: bool = True,
        timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a peer; on failure the assertion shows its stderr."""
    result = subprocess.run(list(cmd), input=input, capture_output=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}:\n"
                             f"{result.stderr.decode(errors='replace')}")
    return result


def nbdsh(uri: str, code: str, **kw) -> str:
    """Run Python code in libnbd's nbdsh with ``h`` connected to ``uri``; its stdout."""
    return run(["nbdsh", "-u", uri, "-c", code], **kw).stdout.decode()
