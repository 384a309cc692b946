"""fua: change how Forced Unit Access (FUA) and flush are handled.

    pynbd serve --filter=fua file disk.img                    # fuamode=none
    pynbd serve --filter=fua file disk.img fuamode=force      # write-through
    pynbd serve --filter=fua file disk.img fuamode=discard    # fast and unsafe

Parameters
    fuamode=none      FUA is not advertised; clients flush explicitly
                      (flush still works if the layer below can). Default.
    fuamode=emulate   FUA is advertised and done by a flush after each FUA
                      write, even if the layer below has cheaper native FUA.
                      Refused (when a client connects) if it cannot flush.
    fuamode=native    FUA is advertised as native and passed down with each
                      write (or turned into write + flush where the layer
                      below only emulates it). Refused if it has no FUA.
    fuamode=force     every write is made with FUA, as if the client had
                      asked; flush requests then do nothing. Refused if the
                      layer below has no FUA.
    fuamode=pass      change nothing (the filter removes itself).
    fuamode=discard   FUA is advertised but dropped, and flush does nothing.
                      Data may be lost on a crash: only for scratch disks.

Above a splitting filter (blocksize, cache) the mode decides whether FUA is
sent with every fragment or done by one flush; the log filter placed below
shows the difference.
"""

from __future__ import annotations

import errno

from ..backend import (
    DATA_METHODS,
    FLAG_FUA,
    FUA_EMULATE,
    FUA_NATIVE,
    FUA_NONE,
    Connection,
    Filter,
    FilterConnection,
    OpenContext,
    Param,
    io_error,
)

MODES = ("none", "emulate", "native", "force", "pass", "discard")


class FuaConnection(FilterConnection["FuaFilter"]):
    """Says what FUA and flush the client gets; rewrites FUA in force and discard modes.

    The other modes change no request. With ``none`` the boundary refuses
    FUA (none is offered); with ``emulate`` it strips FUA and calls flush
    after the write; with ``native`` FUA goes down as it came, and the layer
    below's boundary emulates it there if that layer only can by flushing.
    """

    def __init__(self, next: Connection, filter: FuaFilter, ctx: OpenContext) -> None:
        super().__init__(next, filter, ctx)
        self.mode = filter.fuamode
        if self.mode == "emulate" and not next.can_flush():
            raise io_error(errno.EINVAL, "fua: fuamode=emulate needs a plugin that can flush")
        if self.mode in ("native", "force") and next.can_fua() == FUA_NONE:
            raise io_error(errno.EINVAL, f"fua: fuamode={self.mode} needs a plugin with FUA support")
        # force: every write with FUA; discard: none.
        self.fua = FLAG_FUA if self.mode == "force" else 0

    def passes_through(self) -> frozenset[str]:
        if self.mode in ("force", "discard"):
            return super().passes_through()
        return DATA_METHODS

    def can_fua(self) -> int:
        return {"none": FUA_NONE, "emulate": FUA_EMULATE}.get(self.mode, FUA_NATIVE)

    def can_flush(self) -> bool:
        return self.mode in ("force", "discard") or self.next.can_flush()

    def flush(self, flags: int) -> None:
        """Nothing to do: with force every write was durable, with discard none need be."""

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self.next.pwrite(buf, offset, flags & ~FLAG_FUA | self.fua)

    def zero(self, count: int, offset: int, flags: int) -> None:
        self.next.zero(count, offset, flags & ~FLAG_FUA | self.fua)

    def trim(self, count: int, offset: int, flags: int) -> None:
        self.next.trim(count, offset, flags & ~FLAG_FUA | self.fua)


class FuaFilter(Filter):
    short_requests = True
    name = "fua"
    params = (Param("fuamode", "str", "how FUA is handled", default="none", choices=MODES),)
    fuamode: str
    connection = FuaConnection

    def wrap(self, below: Connection, ctx: OpenContext) -> Connection:
        return below if self.fuamode == "pass" else self.connection(below, self, ctx)
