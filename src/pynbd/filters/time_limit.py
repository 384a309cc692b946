"""time-limit: limit how long a client may stay connected.

    pynbd serve --filter=time-limit file disk.img                 # 60 seconds
    pynbd serve --filter=time-limit file disk.img time-limit=600

Parameters
    time-limit=TIME   seconds a connection may last (default 60; fractions,
                      or an ``ms`` suffix, allowed)

When the time is up the client is disconnected, even if it is idle (nbdkit
enforces the limit only when a request arrives); a request that reaches the
filter after that fails with ESHUTDOWN. Other clients are not affected.
"""

from __future__ import annotations

import errno
import threading
import time
from contextlib import AbstractContextManager

from ..backend import ConfigError, Connection, Filter, OpenContext, Param, io_error
from ..backend.guarded import NO_GUARD, GuardedConnection
from ..backend.shutdown import disconnect_client


class TimeLimitConnection(GuardedConnection["TimeLimitFilter"]):
    guarded = frozenset({"pread", "pread_buffers", "pwrite", "zero", "trim", "flush"})

    def __init__(self, next: Connection, filter: TimeLimitFilter, ctx: OpenContext) -> None:
        super().__init__(next, filter, ctx)
        self.deadline = time.monotonic() + filter.time_limit
        self.timer = threading.Timer(filter.time_limit, disconnect_client, (ctx,))
        self.timer.daemon = True
        self.timer.start()

    def _check(self) -> None:
        if time.monotonic() >= self.deadline:
            disconnect_client(self.ctx)
            raise io_error(errno.ESHUTDOWN, "time-limit: the connection's time limit is up")

    def guard(self) -> AbstractContextManager[object]:
        self._check()
        return NO_GUARD

    def close(self) -> None:
        self.timer.cancel()
        super().close()


class TimeLimitFilter(Filter):
    short_requests = True
    name = "time-limit"
    params = (Param("time-limit", "duration", "seconds a connection may last", default=60.0),)
    time_limit: float
    connection = TimeLimitConnection

    def config_complete(self) -> None:
        if self.time_limit <= 0:
            raise ConfigError("time-limit: time-limit must be more than 0 seconds")
