"""exitlast: exit the server when the last client disconnects.

    pynbd serve --filter=exitlast memory 1G

It takes no parameters. The server does not exit before its first client.
Useful under a superserver (socket activation), or to make sure a server
started for one job goes away when the job's client is done (see also
``--run`` and ``-s``). To exit when an event happens, see exitwhen.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..backend import Connection, Filter, OpenContext
from ..backend.connection import CloseNotifyingConnection
from ..backend.shutdown import request_shutdown


class ExitlastConnection(CloseNotifyingConnection["ExitlastFilter"]):
    """Counts its client out when it closes."""


class ExitlastFilter(Filter):
    short_requests = True
    name = "exitlast"
    connection = ExitlastConnection

    def config_complete(self) -> None:
        self.lock = threading.Lock()
        self.connections = 0

    def open(self, next_open: Callable[[OpenContext], Connection], ctx: OpenContext) -> Connection:
        conn = super().open(next_open, ctx)
        with self.lock:
            self.connections += 1
        return conn

    def closed(self) -> None:
        with self.lock:
            self.connections -= 1
            last = self.connections == 0
        if last:
            request_shutdown("exitlast: the last client disconnected")
