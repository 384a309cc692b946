"""exitwhen: exit the server gracefully when an event happens.

    pynbd serve --filter=exitwhen memory 1G exit-when-file-created=/tmp/stop
    pynbd serve --filter=exitwhen memory 1G exit-when-process-exits=1234

Once an event has happened the server refuses new clients, and exits as
soon as the clients still connected have gone. Events are looked for when a
client connects or disconnects and, while no client is connected, every
``exit-when-poll`` seconds. An event that has already happened when the
server starts makes it exit at once.

Parameters (each exit-when-* may be given more than once; any event exits)
    exit-when-file-created=FILE   FILE exists
    exit-when-file-deleted=FILE   FILE does not exist
    exit-when-pipe-closed=FD      the write end of the pipe whose read end is
                                  file descriptor FD was closed (nothing is read)
    exit-when-process-exits=PID   process PID has exited
    exit-when-script=SCRIPT       SCRIPT (run by /bin/sh) exits with status 88;
                                  0 means no event, 1-87 are logged as errors
    exit-when-poll=SECS           how often to look while idle (default 60)

Without exit-when-* parameters the filter does nothing.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import select
import subprocess
import threading
from collections.abc import Callable

from ..backend import ConfigError, Connection, Filter, OpenContext, Param, io_error
from ..backend.connection import CloseNotifyingConnection
from ..backend.shutdown import request_shutdown

log = logging.getLogger("pynbd.filters.exitwhen")

EVENT_STATUS = 88


def file_created(path: str) -> bool:
    return os.path.exists(path)


def file_deleted(path: str) -> bool:
    return not os.path.exists(path)


def pipe_closed(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    return any(mask & (select.POLLHUP | select.POLLERR | select.POLLNVAL)
               for _, mask in poller.poll(0))


def process_exited(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def script_says(script: str) -> bool:
    status = subprocess.run(["/bin/sh", "-c", script], stdin=subprocess.DEVNULL,
                            check=False).returncode
    if 0 < status < EVENT_STATUS:
        log.error("exitwhen: exit-when-script: %r exited with status %d", script, status)
    return status == EVENT_STATUS


class ExitwhenConnection(CloseNotifyingConnection["ExitwhenFilter"]):
    """Counts its client out when it closes."""


class ExitwhenFilter(Filter):
    short_requests = True
    name = "exitwhen"
    params = (
        Param("exit-when-file-created", "path", "exit once FILE exists", repeat=True),
        Param("exit-when-file-deleted", "path", "exit once FILE does not exist", repeat=True),
        Param("exit-when-pipe-closed", "int", "exit once the pipe on FD is closed", repeat=True),
        Param("exit-when-process-exits", "int", "exit once process PID has exited", repeat=True),
        Param("exit-when-script", "str", "exit once SCRIPT exits with status 88", repeat=True),
        Param("exit-when-poll", "duration", "seconds between looks while idle", default=60.0),
    )
    exit_when_file_created: list[str]
    exit_when_file_deleted: list[str]
    exit_when_pipe_closed: list[int]
    exit_when_process_exits: list[int]
    exit_when_script: list[str]
    exit_when_poll: float
    connection = ExitwhenConnection

    def config_complete(self) -> None:
        if self.exit_when_poll <= 0:
            raise ConfigError("exitwhen: exit-when-poll must be more than 0 seconds")
        for fd in self.exit_when_pipe_closed:
            try:
                os.fstat(fd)
            except OSError as exc:
                raise ConfigError(f"exitwhen: exit-when-pipe-closed={fd}: {exc.strerror}") from None
        checks: list[Callable[[], bool]] = [
            *(functools.partial(file_created, p) for p in self.exit_when_file_created),
            *(functools.partial(file_deleted, p) for p in self.exit_when_file_deleted),
            *(functools.partial(pipe_closed, fd) for fd in self.exit_when_pipe_closed),
            *(functools.partial(process_exited, pid) for pid in self.exit_when_process_exits),
            *(functools.partial(script_says, s) for s in self.exit_when_script),
        ]
        self.checks = checks
        self.lock = threading.Lock()
        self.connections = 0
        self.exiting = False
        self.stop = threading.Event()

    def happened(self) -> bool:
        """Whether an event has happened (remembered once it has)."""
        if not self.exiting and any(check() for check in self.checks):
            log.info("exitwhen: an exit event happened")
            self.exiting = True
        return self.exiting

    def exit_if_idle(self) -> None:
        with self.lock:
            idle = self.connections == 0
        if idle and self.happened():
            self.stop.set()
            request_shutdown("exitwhen: an exit event happened and no client is connected")

    def after_fork(self) -> None:
        if self.checks:
            threading.Thread(target=self._poll, name="exitwhen-poll", daemon=True).start()

    def _poll(self) -> None:
        while True:
            self.exit_if_idle()
            if self.stop.wait(self.exit_when_poll):
                return

    def open(self, next_open: Callable[[OpenContext], Connection], ctx: OpenContext) -> Connection:
        if self.checks and self.happened():
            raise io_error(errno.ESHUTDOWN, "exitwhen: exiting, no new connections accepted")
        conn = super().open(next_open, ctx)
        with self.lock:
            self.connections += 1
        return conn

    def closed(self) -> None:
        with self.lock:
            self.connections -= 1
        if self.checks:
            self.exit_if_idle()

    def unload(self) -> None:
        self.stop.set()
