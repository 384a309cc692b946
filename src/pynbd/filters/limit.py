"""limit: limit the number of clients connected at the same time.

    pynbd serve --filter=limit file disk.img            # one client at a time
    pynbd serve --filter=limit file disk.img limit=4

Parameters
    limit=N   the most clients served at once (default 1); 0: no limit

A client beyond the limit is refused when it asks for an export and
disconnected (``limit: too many clients connected, connection rejected``);
the clients already connected carry on.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable

from ..backend import ConfigError, Connection, Filter, FilterConnection, OpenContext, Param, io_error
from ..backend.shutdown import disconnect_client


class LimitConnection(FilterConnection["LimitFilter"]):
    def close(self) -> None:
        try:
            super().close()
        finally:
            with self.filter.lock:
                self.filter.connections -= 1


class LimitFilter(Filter):
    short_requests = True
    name = "limit"
    params = (Param("limit", "int", "the most clients connected at once (0: no limit)",
                    default=1),)
    limit: int
    connection = LimitConnection

    def config_complete(self) -> None:
        if self.limit < 0:
            raise ConfigError(f"limit: limit={self.limit}: must be 0 or more")
        self.lock = threading.Lock()
        self.connections = 0

    def open(self, next_open: Callable[[OpenContext], Connection], ctx: OpenContext) -> Connection:
        with self.lock:
            if self.limit and self.connections >= self.limit:
                disconnect_client(ctx)  # as nbdkit's preconnect refusal: the client is dropped
                raise io_error(errno.EBUSY, "limit: too many clients connected, connection rejected")
            self.connections += 1
        try:
            return super().open(next_open, ctx)
        except BaseException:
            with self.lock:
                self.connections -= 1
            raise
