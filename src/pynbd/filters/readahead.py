"""readahead: prefetch what a sequential reader will ask for next.

    pynbd serve --filter=readahead curl https://example.com/disk.img
    pynbd serve --filter=readahead --filter=cache file slow.img

No parameters. When a client reads, the filter asks the layer below to
prefetch (NBD_CMD_CACHE) the data that follows, on a background thread of
the connection, so the prefetch overlaps with the client's next request.
The window is nbdkit's: each read is followed by a prefetch of the window
after it, the window starting at 32 KiB. A read that starts inside the last
prefetch keeps the window; one that jumps forward past it doubles the window
(up to 4 MiB) and one that goes backwards shrinks it to 32 KiB again, each
change applying from the next read on.

Limits: prefetching only helps if the layer below can cache — plugins that
keep data elsewhere (curl, nbd, ssh) or the cache filter placed below this
one. Over a layer that cannot cache at all the filter does nothing and says
so once. The prefetch runs beside the client's requests, so the layers below
must tolerate parallel requests.
"""

from __future__ import annotations

import logging
import queue
import threading

from ..backend import CACHE_NONE, Connection, Filter, FilterConnection, OpenContext

log = logging.getLogger("pynbd.filters.readahead")

MIN_WINDOW = 32 * 1024  # nbdkit's READAHEAD_MIN and READAHEAD_MAX
MAX_WINDOW = 4 * 1024 * 1024
_STOP = None


class ReadaheadConnection(FilterConnection["ReadaheadFilter"]):
    def __init__(self, next: Connection, filter: ReadaheadFilter, ctx: OpenContext) -> None:
        super().__init__(next, filter, ctx)
        self.size = next.get_size()
        self.window = MIN_WINDOW
        self.last_offset = 0
        self.ahead = (0, 0)  # the last prefetch: [start, end)
        self._lock = threading.Lock()
        self.requests: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self.worker = threading.Thread(target=self._prefetch_loop, name="readahead", daemon=True)
        self.worker.start()

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self.next.pread(buf, offset, flags)
        wanted = self._plan(offset, len(buf))
        if wanted is not None:
            self.requests.put(wanted)

    def _plan(self, offset: int, count: int) -> tuple[int, int] | None:
        """The range to prefetch after a read of [offset, offset+count), if any."""
        end = offset + count
        with self._lock:
            window = self.window
            if not self.ahead[0] <= offset < self.ahead[1]:
                self.window = min(window * 2, MAX_WINDOW) if offset > self.last_offset else MIN_WINDOW
            self.last_offset = offset
            stop = min(end + window, self.size)
            self.ahead = (end, stop)
        return (end, stop - end) if end < stop else None

    def _prefetch_loop(self) -> None:
        while (item := self.requests.get()) is not _STOP:
            offset, count = item
            try:
                self.next.cache(count, offset, 0)
            except Exception as exc:  # noqa: BLE001 (a failed prefetch only costs speed)
                log.debug("readahead: prefetch of %d+%d failed: %s", offset, count, exc)

    def close(self) -> None:
        self.requests.put(_STOP)
        self.worker.join()
        super().close()


class ReadaheadFilter(Filter):
    short_requests = True
    name = "readahead"
    connection = ReadaheadConnection
    _warned = False

    def wrap(self, below: Connection, ctx: OpenContext) -> Connection:
        if below.can_cache() == CACHE_NONE:
            if not self._warned:
                log.warning("readahead: the layers below cannot cache; the filter does nothing")
                self._warned = True
            return below
        return self.connection(below, self, ctx)
