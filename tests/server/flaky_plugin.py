"""flaky: a 1 MiB RAM disk whose reads at offset 4096 raise RuntimeError.

A test plugin loaded by path (``pynbd serve tests/server/flaky_plugin.py``)
to prove that a plugin bug fails one request with EIO, is logged with its
traceback, and leaves the server running.
"""

from __future__ import annotations

from pynbd.backend import Connection, OpenContext, Plugin

BAD_OFFSET = 4096


class FlakyConnection(Connection):
    def __init__(self, data: bytearray) -> None:
        self.data = data

    def get_size(self) -> int:
        return len(self.data)

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        if offset == BAD_OFFSET:
            raise RuntimeError(f"plugin bug at {BAD_OFFSET}")
        buf[:] = self.data[offset:offset + len(buf)]

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self.data[offset:offset + len(buf)] = buf


class FlakyPlugin(Plugin):
    name = "flaky"

    def get_ready(self) -> None:
        self.data = bytearray(b"\x07" * (1 << 20))

    def open(self, ctx: OpenContext) -> Connection:
        return FlakyConnection(self.data)
