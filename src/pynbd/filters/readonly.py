"""readonly: make the export read-only, always or while a file exists.

    pynbd serve --filter=readonly file disk.img
    rm -f /tmp/ro
    pynbd serve --filter=readonly file disk.img readonly-file=/tmp/ro
    sleep 60; touch /tmp/ro            # from now on writes fail with EPERM

Parameters
    readonly-file=PATH  without it the export is read-only, as with ``-r``.
                        With it, writes, zeroes and trims fail with EPERM
                        while PATH exists and succeed while it does not;
                        the export stays writable in what it advertises, so
                        the switch works on connections already open.
"""

from __future__ import annotations

import errno
import os
from contextlib import AbstractContextManager

from ..backend import Filter, Param, io_error
from ..backend.guarded import NO_GUARD, GuardedConnection


class ReadonlyConnection(GuardedConnection["ReadonlyFilter"]):
    guarded = frozenset({"pwrite", "zero", "trim"})

    def can_write(self) -> bool:
        return self.filter.readonly_file is not None and self.next.can_write()

    def _check(self) -> None:
        path = self.filter.readonly_file
        if path is not None and os.path.exists(path):
            raise io_error(errno.EPERM, f"readonly: {path} exists: the export is read-only")

    def guard(self) -> AbstractContextManager[object]:
        self._check()
        return NO_GUARD


class ReadonlyFilter(Filter):
    short_requests = True
    name = "readonly"
    params = (Param("readonly-file", "path", "read-only while this file exists"),)
    readonly_file: str | None
    connection = ReadonlyConnection
