"""scan: prefetch the whole disk while a client is connected.

    pynbd serve --filter=scan --filter=cache curl https://example.com/disk.img
    pynbd serve --filter=scan file disk.img scan-size=8M scan-forever=true

When a client connects to the default export, a background thread sends
cache (prefetch) requests across the disk, ``scan-size`` bytes at a time,
through the layer below, so that the client's later (sequential) reads find
the data ready. A layer below that cannot cache makes the filter do
nothing (a warning says so): put the cache filter, or cow with
``cow-on-cache=true``, below it to give it somewhere to prefetch into.

Parameters
    scan-ahead=BOOL     true (default): when the client reads past the
                        prefetch point, skip ahead to just after its read;
                        false: prefetch in order regardless
    scan-clock=BOOL     true (default): a new client resumes where the last
                        one's scan stopped; false: each scan starts at 0
    scan-forever=BOOL   false (default): scan the disk once; true: start
                        over at the end, for as long as clients are connected
    scan-size=N         the size of each prefetch (a power of 2, default 2M)

Only the default export is scanned, and only while at least one client is
connected to it. The prefetches run beside the client's own requests, so the
layers below must allow parallel requests (nbdkit refuses to scan otherwise).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from ..backend import (
    CACHE_NONE,
    Buffer,
    ConfigError,
    Connection,
    Filter,
    FilterConnection,
    OpenContext,
    Param,
)

log = logging.getLogger("pynbd.filters.scan")


class ScanConnection(FilterConnection["ScanFilter"]):
    def __init__(self, next: Connection, filter: ScanFilter, ctx: OpenContext) -> None:
        super().__init__(next, filter, ctx)
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        if ctx.export_name != filter.default_name:
            return
        if next.can_cache() == CACHE_NONE:
            log.warning("scan: the layer below cannot cache: nothing will be prefetched "
                        "(put --filter=cache after --filter=scan)")
            return
        self.thread = threading.Thread(target=self._scan, name="scan", daemon=True)
        self.thread.start()

    def _scan(self) -> None:
        flt = self.filter
        size = self.next.get_size()
        step = flt.scan_size
        while not self.stop.is_set():
            with flt.lock:
                pos = flt.position
                if pos >= size:
                    if not flt.scan_forever:
                        return
                    pos = 0
                flt.position = min(size, pos + step)
            try:
                self.next.cache(min(step, size - pos), pos, 0)
            except OSError as exc:
                log.debug("scan: prefetch at %d failed: %s", pos, exc)

    def _ahead(self, end: int) -> None:
        flt = self.filter
        if end > flt.position:
            with flt.lock:
                flt.position = max(flt.position, end)

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self._ahead(offset + len(buf))
        self.next.pread(buf, offset, flags)

    def pread_buffers(self, count: int, offset: int, flags: int) -> Sequence[Buffer] | None:
        self._ahead(offset + count)
        return self.next.pread_buffers(count, offset, flags)

    def passes_through(self) -> frozenset[str]:
        if not self.filter.scan_ahead or self.thread is None:
            return super().passes_through() | {"pread", "pread_buffers"}
        return super().passes_through()

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
            if not self.filter.scan_clock:
                with self.filter.lock:
                    self.filter.position = 0
        super().close()


class ScanFilter(Filter):
    short_requests = True
    name = "scan"
    params = (
        Param("scan-ahead", "bool", "skip ahead past the client's reads", default=True),
        Param("scan-clock", "bool", "resume where the last client's scan stopped", default=True),
        Param("scan-forever", "bool", "start over at the end of the disk", default=False),
        Param("scan-size", "size", "the size of each prefetch (a power of 2)", default=2 << 20),
    )
    scan_ahead: bool
    scan_clock: bool
    scan_forever: bool
    scan_size: int
    connection = ScanConnection

    def config_complete(self) -> None:
        if self.scan_size < 512 or self.scan_size & (self.scan_size - 1):
            raise ConfigError(f"scan: scan-size={self.scan_size}: must be a power of 2, at least 512")
        self.lock = threading.Lock()
        self.position = 0
        self.default_name: str | None = None

    def default_export(self, next_default: Callable[[OpenContext], str], ctx: OpenContext) -> str:
        name = next_default(ctx)
        self.default_name = name  # the export a client asking for "" opens: the one scanned
        return name
