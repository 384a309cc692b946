"""Helpers shared by the test suite: start servers, run peers, wait for conditions.

    from nbdtest import served, run, wait_for, PYNBD

    with served("memory", "1M") as srv:          # pynbd serve -f -U SOCK memory 1M
        run(["nbdinfo", srv.uri])
    with served("memory", "1M", server="nbdkit") as srv:   # the same under nbdkit
        ...

Waiting: a test never samples a moving quantity once (a thread count, a
file's contents, whether a process or a socket still exists) right after an
action that completes asynchronously, and never sleeps in the hope that
something has happened. It states the condition it expects and waits for it
with ``wait_for``, the one way the suite waits:

    wait_for(lambda: threads(pid) == 2, message=lambda: f"{threads(pid)} threads")
    pid = wait_for(lambda: pidfile.exists() and int(pidfile.read_text()))
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from pynbd.process import stop_process

PYNBD = [sys.executable, "-m", "pynbd"]
SERVE = [*PYNBD, "serve"]

T = TypeVar("T")

WAIT = 30.0  # seconds: spent only by a test that is failing anyway, so be generous


def wait_for(predicate: Callable[[], T], timeout: float = WAIT,
             message: str | Callable[[], str] = "", *, interval: float = 0.02) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns a true value; return that.

    ``predicate`` is called at least once, and once more when the deadline has
    passed, so a slow machine never fails a condition that did come true.
    After ``timeout`` seconds it raises AssertionError with ``message`` (a
    string, or a callable describing the state at that moment) and the
    predicate's last value. An exception from ``predicate`` propagates: a
    predicate that can fail while the condition is not yet met (a file that
    is not written yet) says so itself, e.g. ``path.exists() and ...``.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    text = message() if callable(message) else message
    raise AssertionError(f"{text or 'condition'}: still not true after {timeout:g} s "
                         f"(last value {value!r})")


# ---------------------------------------------------------------- processes

def threads(pid: int) -> int:
    """How many threads process ``pid`` runs now (a moving quantity: wait_for a value)."""
    return len(os.listdir(f"/proc/{pid}/task"))


def open_fds(pid: int) -> int:
    """How many file descriptors process ``pid`` has open now (moving: wait_for a value)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def exited(pid: int) -> bool:
    """True once process ``pid`` has exited: gone, or a zombie its parent has not reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


@dataclass
class Served:
    uri: str
    socket: str
    proc: subprocess.Popen

    def stderr(self) -> str:
        """What the server logged so far (only after it exited)."""
        return self.proc.stderr.read().decode() if self.proc.stderr else ""


def wait_for_socket(path: str, proc: subprocess.Popen, timeout: float = WAIT) -> None:
    """Wait until a Unix socket accepts connections (RuntimeError if the server died)."""

    def accepts() -> bool:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"server exited with {proc.returncode}: {err}")
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(path)
            except OSError:
                return False
            return True

    wait_for(accepts, timeout, message=f"no server accepting on {path}")


def sync_accepts(srv: Served, timeout: float = WAIT) -> None:
    """Return once the server has accepted every connection made before this call.

    Counting a server's threads cannot tell "that client has gone" from "that
    client is still waiting to be accepted". Connections are accepted in the
    order they were made, so once a new one has been greeted (by its own
    session thread), every earlier one has been accepted and has its thread.
    This one's session ends when it hangs up, as any client's does.
    """
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(srv.socket)
        assert s.recv(8) == b"NBDMAGIC"


def wait_idle(srv: Served, timeout: float = WAIT) -> None:
    """Wait until the foreground pynbd server ``srv`` has no client left.

    An idle server runs its main thread only. ``served`` itself leaves a
    client behind (the connection that found the socket), whose thread may
    not even have started yet: hence ``sync_accepts`` first.
    """
    sync_accepts(srv, timeout)
    pid = srv.proc.pid
    wait_for(lambda: threads(pid) == 1, timeout,
             message=lambda: f"server {pid} still runs {threads(pid)} threads with no client")


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


NBDSH_OUTCOMES = """
def outcomes(cookies):  # wait for every command in flight: 'ok' or the errno name of each
    while h.aio_in_flight() > 0:
        h.poll(-1)
    out = []
    for c in cookies:
        try:
            h.aio_command_completed(c)
            out.append('ok')
        except nbd.Error as exc:
            out.append(exc.errno)
    return out
"""
"""nbdsh code defining ``outcomes(cookies)``: prepend it to a script that starts aio commands."""


def nbdsh(uri: str, code: str, **kw) -> str:
    """Run Python code in libnbd's nbdsh with ``h`` connected to ``uri``; its stdout."""
    return run(["nbdsh", "-u", uri, "-c", code], **kw).stdout.decode()
