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
    FLAG_FUA,
    FUA_EMULATE,
    FUA_NATIVE,
    FUA_NONE,
    Filter,
    FilterConnection,
    Param,
    io_error,
)

MODES = ("none", "emulate", "native", "force", "pass", "discard")


class FuaConnection(FilterConnection):
    """Rewrites the FUA flag of writes and decides what flush does."""

    def __init__(self, next, filter, ctx) -> None:  # noqa: A002
        super().__init__(next, filter, ctx)
        self.mode: str = filter.fuamode
        below = next.can_fua()
        if self.mode == "emulate" and not next.can_flush():
            raise io_error(errno.EINVAL, "fua: fuamode=emulate needs a plugin that can flush")
        if self.mode in ("native", "force") and below == FUA_NONE:
            raise io_error(errno.EINVAL, f"fua: fuamode={self.mode} needs a plugin with FUA support")
        self.below_native = below == FUA_NATIVE

    def can_fua(self) -> int:
        return {"none": FUA_NONE, "emulate": FUA_EMULATE}.get(self.mode, FUA_NATIVE)

    def can_flush(self) -> bool:
        return self.mode in ("force", "discard") or self.next.can_flush()

    def flush(self, flags: int) -> None:
        if self.mode not in ("force", "discard"):
            self.next.flush(flags)

    def _run(self, op, flags: int, *args) -> None:
        """Call ``op(*args, flags)`` with FUA as the mode wants it, done durably."""
        if self.mode == "force":
            flags |= FLAG_FUA
        elif self.mode in ("none", "discard"):
            flags &= ~FLAG_FUA
        if flags & FLAG_FUA and (self.mode == "emulate" or not self.below_native):
            op(*args, flags & ~FLAG_FUA)
            self.next.flush(0)
        else:
            op(*args, flags)

    def pwrite(self, buf, offset, flags):
        self._run(self.next.pwrite, flags, buf, offset)

    def zero(self, count, offset, flags):
        self._run(self.next.zero, flags, count, offset)

    def trim(self, count, offset, flags):
        self._run(self.next.trim, flags, count, offset)


class FuaFilter(Filter):
    short_requests = True
    name = "fua"
    params = (Param("fuamode", "str", "how FUA is handled", default="none", choices=MODES),)
    connection = FuaConnection

    def wrap(self, below, ctx):
        return below if self.fuamode == "pass" else self.connection(below, self, ctx)
