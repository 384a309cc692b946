"""multi-conn: advertise multi-conn, emulating flush consistency across connections.

    pynbd serve --filter=multi-conn nbd uri=nbd://slow-server
    pynbd serve --filter=multi-conn file disk.img multi-conn-mode=plugin multi-conn-track-dirty=fast

Multi-conn promises a client that a flush on any connection makes every
write acknowledged before it visible on all of them. In ``emulate`` mode
this filter keeps that promise for a layer below that cannot: a flush (or a
FUA write) on one connection is passed down on every open connection.

Parameters
    multi-conn-mode=auto     plugin mode if the layer below offers multi-conn,
                             else emulate (default)
    multi-conn-mode=emulate  replicate flushes to every connection; advertise
                             multi-conn (the layer below must be able to flush,
                             or clients are refused)
    multi-conn-mode=disable  never advertise multi-conn, never replicate
    multi-conn-mode=plugin   advertise what the layer below does, never replicate
    multi-conn-mode=unsafe   advertise multi-conn without doing anything for it
                             (dangerous: for testing clients only)
    multi-conn-track-dirty=connection
                             a flush skips connections with nothing to
                             flush: no write since their last flush, and
                             no read since the last write anywhere (default)
    multi-conn-track-dirty=fast
                             flushes are passed down only if some connection
                             wrote since the last flush, which then counts
                             as a flush of all of them
    multi-conn-track-dirty=off
                             every flush is passed down
    multi-conn-exportname=BOOL
                             true: replicate only to connections of the same
                             export name (default false: to all)

Do not use it over a plugin whose connections hold independent data (such
as a per-connection temporary disk).
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Sequence

from ..backend import (
    FUA_EMULATE,
    FUA_NATIVE,
    Buffer,
    Connection,
    Filter,
    FilterConnection,
    OpenContext,
    Param,
    io_error,
)

READ, WRITE = 1, 2  # what a connection did since its last flush


class Group:
    """The connections whose flushes are replicated to each other."""

    def __init__(self) -> None:
        self.connections: list[MultiConnConnection] = []
        self.dirty = False  # some connection of the group wrote since the last flush


class MultiConnConnection(FilterConnection["MultiConnFilter"]):
    def __init__(self, next: Connection, filter: MultiConnFilter, ctx: OpenContext) -> None:
        super().__init__(next, filter, ctx)
        mode = filter.multi_conn_mode
        if mode == "auto":
            mode = "plugin" if next.can_multi_conn() else "emulate"
        if mode == "emulate" and not next.can_flush():
            raise io_error(errno.EINVAL, "multi-conn: emulating multi-conn requires working flush")
        self.mode = mode
        self.dirty = 0
        self.group = filter.join(self)

    def can_multi_conn(self) -> bool:
        if self.mode in ("emulate", "unsafe"):
            return True
        return self.mode == "plugin" and self.next.can_multi_conn()

    def can_fua(self) -> int:
        # Emulated, a FUA write becomes the write and then a flush of every connection.
        fua = self.next.can_fua()
        return FUA_EMULATE if fua == FUA_NATIVE and self.mode == "emulate" else fua

    def passes_through(self) -> frozenset[str]:
        if self.filter.multi_conn_track_dirty == "off":  # nothing to mark
            return super().passes_through() | {"pread", "pread_buffers", "pwrite", "zero", "trim",
                                               "cache"}
        return super().passes_through()

    def _mark(self, what: int) -> None:
        # No lock, as in nbdkit: a client waits for a flush's reply before
        # relying on it, so a race here is the client's own.
        if self.filter.multi_conn_track_dirty == "connection":
            self.dirty |= what
        if what == WRITE:
            self.group.dirty = True

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self._mark(READ)
        self.next.pread(buf, offset, flags)

    def pread_buffers(self, count: int, offset: int, flags: int) -> Sequence[Buffer] | None:
        self._mark(READ)
        return self.next.pread_buffers(count, offset, flags)

    def cache(self, count: int, offset: int, flags: int) -> None:
        self._mark(READ)
        self.next.cache(count, offset, flags)

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self._mark(WRITE)
        self.next.pwrite(buf, offset, flags)

    def zero(self, count: int, offset: int, flags: int) -> None:
        self._mark(WRITE)
        self.next.zero(count, offset, flags)

    def trim(self, count: int, offset: int, flags: int) -> None:
        self._mark(WRITE)
        self.next.trim(count, offset, flags)

    def flush(self, flags: int) -> None:
        self.filter.flush(self)

    def close(self) -> None:
        self.filter.leave(self)
        super().close()


class MultiConnFilter(Filter):
    short_requests = True
    name = "multi-conn"
    params = (
        Param("multi-conn-mode", "str", "when to advertise and emulate multi-conn",
              default="auto", choices=("auto", "emulate", "disable", "plugin", "unsafe")),
        Param("multi-conn-track-dirty", "str", "which flushes are passed down",
              default="connection", choices=("connection", "fast", "off")),
        Param("multi-conn-exportname", "bool", "replicate flushes within one export name only",
              default=False),
    )
    multi_conn_mode: str
    multi_conn_track_dirty: str
    multi_conn_exportname: bool
    connection = MultiConnConnection

    def config_complete(self) -> None:
        self.lock = threading.Lock()
        self.groups: dict[str, Group] = {}

    def join(self, conn: MultiConnConnection) -> Group:
        key = conn.ctx.export_name if self.multi_conn_exportname else ""
        with self.lock:
            group = self.groups.setdefault(key, Group())
            group.connections.append(conn)
            return group

    def leave(self, conn: MultiConnConnection) -> None:
        with self.lock:
            group = conn.group
            group.connections.remove(conn)
            if not group.connections:
                self.groups = {k: g for k, g in self.groups.items() if g is not group}

    def flush(self, origin: MultiConnConnection) -> None:
        """A client's flush on ``origin``: pass it down where it is needed."""
        track = self.multi_conn_track_dirty
        group = origin.group
        if origin.mode == "emulate":
            with self.lock:
                for conn in group.connections:
                    if track == "off" or conn.dirty & WRITE or (
                            group.dirty and (track == "fast" or conn.dirty & READ)):
                        conn.next.flush(0)
                        conn.dirty = 0
                group.dirty = False
            return
        if track != "off" and not group.dirty:
            return
        origin.next.flush(0)
        if track == "connection" and not origin.next.can_multi_conn():
            origin.dirty = 0
        elif track != "off":
            with self.lock:
                for conn in group.connections:
                    conn.dirty = 0
                group.dirty = False
