"""noparallel: serve requests one at a time (or clients one at a time).

    pynbd serve --filter=noparallel file disk.img
    pynbd serve --filter=noparallel file disk.img serialize=connections

Parameters
    serialize=requests       one request at a time per client; other clients
                             still run in parallel (the default)
    serialize=all-requests   one request at a time across all clients
    serialize=connections    one client at a time; multi-conn is no longer
                             advertised

The filter only lowers the stack's thread model, which the server enforces,
so requests pay nothing for it. Useful to compare timings, to work around a
plugin that claims more parallelism than it handles, or for clients that
cannot cope with replies out of order.
"""

from __future__ import annotations

from ..backend import Connection, Filter, FilterConnection, OpenContext, Param, ThreadModel

MODELS = {
    "requests": ThreadModel.SERIALIZE_REQUESTS,
    "all-requests": ThreadModel.SERIALIZE_ALL_REQUESTS,
    "connections": ThreadModel.SERIALIZE_CONNECTIONS,
}


class SingleClientConnection(FilterConnection["NoParallelFilter"]):
    def can_multi_conn(self) -> bool:
        return False


class NoParallelFilter(Filter):
    short_requests = True
    name = "noparallel"
    params = (Param("serialize", "str", "what is serialized", default="requests",
                    choices=tuple(MODELS)),)
    serialize: str
    connection = SingleClientConnection

    def get_thread_model(self) -> ThreadModel:
        return MODELS[self.serialize]

    def wrap(self, below: Connection, ctx: OpenContext) -> Connection:
        return self.connection(below, self, ctx) if self.serialize == "connections" else below
