"""failing: a RAM disk whose first N requests fail with EIO, then all succeed.

A test plugin loaded by path, for the retry filter:

    pynbd serve tests/filters/failing_plugin.py failures=2

The count is shared by every connection, so a reopened connection succeeds
once enough requests have failed. Each open is counted and the count can be
read as the first byte of the disk.
"""

from __future__ import annotations

import errno
import itertools

from pynbd.backend import Connection, OpenContext, Param, Plugin, io_error


class FailingConnection(Connection):
    def __init__(self, plugin: FailingPlugin, readonly: bool) -> None:
        self.plugin = plugin
        self.readonly = readonly

    def get_size(self) -> int:
        return len(self.plugin.data)

    def can_write(self) -> bool:
        return not self.readonly

    def _maybe_fail(self) -> None:
        if next(self.plugin.requests) < self.plugin.failures:
            raise io_error(errno.EIO, "failing: injected failure")

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self._maybe_fail()
        buf[:] = self.plugin.data[offset:offset + len(buf)]

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        if self.readonly:
            raise io_error(errno.EROFS, "failing: opened read-only")
        self._maybe_fail()
        self.plugin.data[offset:offset + len(buf)] = buf


class FailingPlugin(Plugin):
    name = "failing"
    params = (Param("failures", "int", "how many requests fail first", default=1),)

    def config_complete(self) -> None:
        self.requests = itertools.count()
        self.opens = 0
        self.data = bytearray(64 * 1024)

    def open(self, ctx: OpenContext) -> Connection:
        self.opens += 1
        self.data[0] = self.opens
        return FailingConnection(self, ctx.readonly)
