"""count: count the bytes read, written, zeroed and trimmed.

    pynbd serve -v --filter=count file disk.img

It takes no parameters. When the server exits, the totals of every
connection are logged (shown with ``-v``), as nbdkit's debug line:

    count: bytes read: 1048576 written: 4096 zeroed: 0 trimmed: 65536

For request counts, sizes and timings see the stats filter.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from ..backend import Buffer, Filter, FilterConnection

log = logging.getLogger("pynbd.filters.count")


class CountConnection(FilterConnection["CountFilter"]):
    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self.next.pread(buf, offset, flags)
        self.filter.add(0, len(buf))

    def pread_buffers(self, count: int, offset: int, flags: int) -> Sequence[Buffer] | None:
        buffers = self.next.pread_buffers(count, offset, flags)
        if buffers is not None:
            self.filter.add(0, count)
        return buffers

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self.next.pwrite(buf, offset, flags)
        self.filter.add(1, len(buf))

    def zero(self, count: int, offset: int, flags: int) -> None:
        self.next.zero(count, offset, flags)
        self.filter.add(2, count)

    def trim(self, count: int, offset: int, flags: int) -> None:
        self.next.trim(count, offset, flags)
        self.filter.add(3, count)


class CountFilter(Filter):
    short_requests = True
    name = "count"
    connection = CountConnection

    def config_complete(self) -> None:
        self.lock = threading.Lock()
        self.totals = [0, 0, 0, 0]  # read, written, zeroed, trimmed

    def add(self, which: int, count: int) -> None:
        with self.lock:
            self.totals[which] += count

    def unload(self) -> None:
        log.debug("count: bytes read: %d written: %d zeroed: %d trimmed: %d", *self.totals)
