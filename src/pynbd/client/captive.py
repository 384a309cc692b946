"""Captive servers: an NBD server run as a subprocess that lives and dies with a handle.

Two ways to hand the child its connection, as libnbd does:

- ``spawn_stdin(argv)``: a socket pair; the server's end is its stdin and
  stdout (``nbdkit -s``, ``pynbd serve -s``, ``nbd-server``-less setups).
- ``spawn_activated(argv)``: systemd socket activation; a listening Unix
  socket is passed as fd 3 with ``LISTEN_PID``/``LISTEN_FDS=1`` (qemu-nbd,
  nbdkit and ``pynbd serve`` understand this), and the client connects to it.

The tools write a captive server on their command line between brackets,
``pynbd info -- [ qemu-nbd -f qcow2 disk.qcow2 ]``; ``split_captive`` finds it.
When the handle closes, the server is told to stop (SIGTERM if it did not
exit by itself) and reaped; its temporary directory is removed.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..process import stop_process
from .errors import NBDError

if TYPE_CHECKING:
    import subprocess

# subprocess and tempfile are imported where a captive server is started: every client
# tool loads this module, and most never start one (a few ms of each tool's start-up).

# A tiny launcher moves the listening socket to fd 3, sets LISTEN_PID to its
# own pid and execs the server, which keeps that pid.
_ACTIVATE = """import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
os.environ.pop("LISTEN_FDNAMES", None)
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as exc:
    sys.exit(f"cannot run {sys.argv[2]}: {exc.strerror}")
"""


class Captive:
    """A server subprocess owned by a client handle."""

    def __init__(self, proc: subprocess.Popen[bytes], tmpdir: str | None = None,
                 exits_alone: bool = False) -> None:
        self.proc, self.tmpdir, self.exits_alone = proc, tmpdir, exits_alone

    def close(self) -> None:
        """Stop and reap the server; remove its temporary directory."""
        if self.exits_alone:
            _wait(self.proc, 2.0)
        stop_process(self.proc, 5.0)
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    import subprocess
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def _popen(argv: Sequence[str], *, stdin: int, stdout: int | None = None,
           pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    import subprocess
    if not argv:
        raise NBDError(errno.EINVAL, "captive server: empty command")
    try:
        return subprocess.Popen(list(argv), stdin=stdin, stdout=stdout, pass_fds=pass_fds)
    except OSError as exc:
        raise NBDError(exc.errno or errno.ENOENT, f"cannot run {argv[0]}: {exc.strerror}") from None


def spawn_stdin(argv: Sequence[str]) -> tuple[socket.socket, Captive]:
    """Run ``argv`` with one end of a socket pair as stdin/stdout; return the other end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        proc = _popen(argv, stdin=theirs.fileno(), stdout=theirs.fileno())
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return ours, Captive(proc, exits_alone=True)


def spawn_activated(argv: Sequence[str]) -> tuple[str, Captive]:
    """Run ``argv`` with a listening Unix socket as fd 3; return the socket's path."""
    import subprocess
    import tempfile
    tmpdir = tempfile.mkdtemp(prefix="pynbd-captive")
    path = os.path.join(tmpdir, "sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(16)
        fd = listener.fileno()
        if not argv:
            raise NBDError(errno.EINVAL, "captive server: empty command")
        proc = _popen([sys.executable, "-c", _ACTIVATE, str(fd), *argv], pass_fds=(fd,),
                      stdin=subprocess.DEVNULL)
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    finally:
        listener.close()
    return path, Captive(proc, tmpdir)


def split_captive(args: Sequence[str]) -> tuple[list[str] | None, list[str]]:
    """Find ``[ CMD ARGS ... ]`` at the start of ``args``.

    Returns (the command, the arguments after ``]``), or (None, args) when
    ``args`` does not start with ``[``. A missing ``]`` is an error.
    """
    if not args or args[0] != "[":
        return None, list(args)
    try:
        end = list(args).index("]")
    except ValueError:
        raise NBDError(errno.EINVAL, "captive server: '[' without a matching ']'") from None
    command = list(args[1:end])
    if not command:
        raise NBDError(errno.EINVAL, "captive server: nothing between '[' and ']'")
    return command, list(args[end + 1:])
