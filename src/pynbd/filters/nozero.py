"""nozero: take away (or change) efficient zeroing, to test clients' fallbacks.

    pynbd serve --filter=nozero file disk.img                     # zeromode=none
    pynbd serve --filter=nozero file disk.img zeromode=emulate
    pynbd serve --filter=nozero file disk.img zeromode=plugin fastzeromode=none

Parameters
    zeromode=none       write-zeroes is not advertised: clients must write
                        zero bytes themselves (default)
    zeromode=emulate    write-zeroes is advertised but done by writing zero
                        buffers to the layer below, never by punching holes
    zeromode=notrim     zero requests pass down without the may-trim flag
    zeromode=plugin     zero requests pass down unchanged
    fastzeromode=default  with emulate, fast zeroes are advertised and always
                        fail with ENOTSUP; otherwise the layer below decides
    fastzeromode=none   fast zero is not advertised
    fastzeromode=slow   fast zero is advertised and always fails (ENOTSUP)
    fastzeromode=ignore fast zero is advertised and treated as a normal zero
                        (against the NBD spec; for comparisons only). With
                        zeromode=emulate fast zeroes still fail, as in nbdkit:
                        writing zero buffers is never fast.

``notrim`` and ``plugin`` need a layer below that can zero; a client
connecting otherwise is refused.
"""

from __future__ import annotations

import errno

from ..backend import (
    FLAG_FAST_ZERO,
    FLAG_MAY_TRIM,
    Connection,
    Filter,
    FilterConnection,
    OpenContext,
    Param,
    io_error,
)


class NoZeroConnection(FilterConnection["NoZeroFilter"]):
    def __init__(self, next: Connection, filter: NoZeroFilter, ctx: OpenContext) -> None:
        super().__init__(next, filter, ctx)
        self.mode = filter.zeromode
        self.fast = filter.fastzeromode
        if self.mode in ("notrim", "plugin") and not next.can_zero():
            raise io_error(errno.EINVAL, f"nozero: zeromode={self.mode} needs a plugin that can zero")

    def can_zero(self) -> bool:
        return self.mode != "none"

    def can_fast_zero(self) -> bool:
        if self.mode == "none" or self.fast == "none":
            return False
        if self.fast == "default" and self.mode != "emulate":
            return self.next.can_fast_zero()
        return True

    def zero(self, count: int, offset: int, flags: int) -> None:
        if flags & FLAG_FAST_ZERO:
            if self.fast == "slow" or self.mode == "emulate":
                raise io_error(errno.ENOTSUP, "nozero: fast zero is not supported")
            if self.fast == "ignore":
                flags &= ~FLAG_FAST_ZERO
        if self.mode == "emulate":
            # Connection's own zero: zero buffers written with self.pwrite (to the layer below)
            Connection.zero(self, count, offset, flags & ~(FLAG_MAY_TRIM | FLAG_FAST_ZERO))
        elif self.mode == "notrim":
            self.next.zero(count, offset, flags & ~FLAG_MAY_TRIM)
        else:
            self.next.zero(count, offset, flags)


class NoZeroFilter(Filter):
    short_requests = True
    name = "nozero"
    params = (
        Param("zeromode", "str", "how zero requests are handled", default="none",
              choices=("none", "emulate", "notrim", "plugin")),
        Param("fastzeromode", "str", "how fast zero requests are handled", default="default",
              choices=("default", "none", "slow", "ignore")),
    )
    zeromode: str
    fastzeromode: str
    connection = NoZeroConnection
