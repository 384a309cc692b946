"""retry-request: retry a single request that fails, without reopening anything.

    pynbd serve --filter=retry-request curl https://example.com/disk.img
    pynbd serve --filter=retry-request nbd uri=nbd://flaky retry-request-retries=5 retry-request-delay=500ms

Each read, write, zero, trim, flush, cache and block-status request that
fails is tried again, up to ``retry-request-retries`` more times, waiting
``retry-request-delay`` before each try; the client sees the last error only
if every try failed. Opening the layer below is retried the same way. The
retry filter is the heavier alternative: it reopens the whole connection
below after a failure.

Parameters
    retry-request-retries=N    tries after the first (default 2)
    retry-request-delay=SECS   wait before each retry (default 2; fractions
                               or an ``ms`` suffix allowed)
    retry-request-open=BOOL    false: do not retry opening (default true)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from ..backend import (
    Buffer,
    ConfigError,
    Connection,
    ContextExtent,
    Extent,
    Filter,
    FilterConnection,
    OpenContext,
    Param,
)

log = logging.getLogger("pynbd.filters.retry_request")

T = TypeVar("T")


class RetryRequestConnection(FilterConnection["RetryRequestFilter"]):
    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self.filter.retry("pread", self.next.pread, buf, offset, flags)

    def pread_buffers(self, count: int, offset: int, flags: int) -> Sequence[Buffer] | None:
        return self.filter.retry("pread", self.next.pread_buffers, count, offset, flags)

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self.filter.retry("pwrite", self.next.pwrite, buf, offset, flags)

    def zero(self, count: int, offset: int, flags: int) -> None:
        self.filter.retry("zero", self.next.zero, count, offset, flags)

    def trim(self, count: int, offset: int, flags: int) -> None:
        self.filter.retry("trim", self.next.trim, count, offset, flags)

    def flush(self, flags: int) -> None:
        self.filter.retry("flush", self.next.flush, flags)

    def cache(self, count: int, offset: int, flags: int) -> None:
        self.filter.retry("cache", self.next.cache, count, offset, flags)

    def extents(self, count: int, offset: int, flags: int) -> Iterable[Extent]:
        return self.filter.retry("extents", lambda *a: list(self.next.extents(*a)), count, offset, flags)

    def block_status(self, context: str, count: int, offset: int, flags: int) -> Iterable[ContextExtent]:
        return self.filter.retry("block_status", lambda *a: list(self.next.block_status(*a)),
                                 context, count, offset, flags)


class RetryRequestFilter(Filter):
    name = "retry-request"
    params = (
        Param("retry-request-retries", "int", "tries after the first", default=2),
        Param("retry-request-delay", "duration", "seconds to wait before each retry", default=2.0),
        Param("retry-request-open", "bool", "retry opening the layer below too", default=True),
    )
    retry_request_retries: int
    retry_request_delay: float
    retry_request_open: bool
    connection = RetryRequestConnection

    def config_complete(self) -> None:
        if not 0 <= self.retry_request_retries <= 1000:
            raise ConfigError(f"retry-request: retry-request-retries={self.retry_request_retries}: "
                              f"must be between 0 and 1000")

    def retry(self, what: str, call: Callable[..., T], *args: object) -> T:
        """``call(*args)``, tried again after an OSError as the parameters say."""
        retries = self.retry_request_retries
        for attempt in range(1, retries + 1):
            try:
                return call(*args)
            except OSError as exc:
                log.info("retry-request: %s failed (%s), retry %d of %d", what,
                         exc.strerror or exc, attempt, retries)
                time.sleep(self.retry_request_delay)
        return call(*args)  # the last try: its error is the client's

    def open(self, next_open: Callable[[OpenContext], Connection], ctx: OpenContext) -> Connection:
        if self.retry_request_open:
            return self.retry("open", super().open, next_open, ctx)
        return super().open(next_open, ctx)
