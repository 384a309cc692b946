"""retry: when a request fails, reopen the layers below and try it again.

    pynbd serve -U - --filter=retry ssh host=remote /var/tmp/test.iso \\
        --run 'qemu-img convert -p -f raw "$uri" -O qcow2 test.qcow2'
    pynbd serve --filter=retry curl https://example.com/disk.img retries=10 retry-delay=1

Parameters
    retries=N               how often one request is retried before its error
                            goes to the client (default 5)
    retry-delay=SECONDS     wait this long before the first retry (default 2;
                            fractions and ``ms`` allowed)
    retry-exponential=BOOL  double the wait after each retry (default yes)
    retry-readonly=BOOL     after the first failure reopen read-only; writes
                            then fail with EROFS for the rest of this client's
                            connection (default no)

On a failure the filter closes the connection to everything below it, waits,
opens it again (as when the client connected) and repeats the request. A
reopen that fails counts as a failed attempt. With the defaults a request
gives up after about a minute. Every error is retried, even those a retry
cannot fix, so put this filter above the layer that has transient failures
(a network plugin) rather than above filters that refuse requests on purpose.
The sizes and capabilities the client was told at connection time stay as
they were; after a reopen each request is checked against the new
connection, as nbdkit does: beyond its size is EIO, a write it cannot take
EROFS, FUA it cannot do EIO, a flush, cache or extents it lacks EIO (each
retried like any failure). After a read-only reopen a write fails with EROFS
at once. Requests that fail together trigger only one reopen.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from ..backend import (
    FLAG_FUA,
    FUA_NONE,
    ConfigError,
    Connection,
    Extent,
    Filter,
    FilterConnection,
    OpenContext,
    Param,
    io_error,
)

log = logging.getLogger("pynbd.filters.retry")

T = TypeVar("T")


class RetryConnection(FilterConnection["RetryFilter"]):
    """Requests go to ``current``, the connection below as last (re)opened.

    ``next`` stays the connection opened with the client: the boundary asks
    it the size and capabilities once, and the client keeps those answers
    across reopens. Every request is overridden, so none is bound to it.
    """

    def __init__(self, next: Connection, filter: RetryFilter, ctx: OpenContext,
                 reopen: Callable[[OpenContext], Connection]) -> None:
        super().__init__(next, filter, ctx)
        self.current: Connection | None = next
        self.reopen = reopen
        self.generation = 0
        self.readonly = False
        self._lock = threading.Lock()

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self._retry("pread", lambda conn: conn.pread(buf, offset, flags), len(buf), offset)

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self._retry("pwrite", lambda conn: conn.pwrite(buf, offset, flags), len(buf), offset, flags,
                    can="can_write")

    def zero(self, count: int, offset: int, flags: int) -> None:
        self._retry("zero", lambda conn: conn.zero(count, offset, flags), count, offset, flags,
                    can="can_zero")

    def trim(self, count: int, offset: int, flags: int) -> None:
        self._retry("trim", lambda conn: conn.trim(count, offset, flags), count, offset, flags,
                    can="can_trim")

    def flush(self, flags: int) -> None:
        self._retry("flush", lambda conn: conn.flush(flags), can="can_flush")

    def cache(self, count: int, offset: int, flags: int) -> None:
        self._retry("cache", lambda conn: conn.cache(count, offset, flags), count, offset,
                    can="can_cache")

    def extents(self, count: int, offset: int, flags: int) -> list[Extent]:
        return self._retry("extents", lambda conn: list(conn.extents(count, offset, flags)),
                           count, offset, can="can_extents")

    def _retry(self, name: str, request: Callable[[Connection], T], count: int = 0, offset: int = 0,
               flags: int = 0, can: str = "") -> T:
        """Run ``request`` on the current connection, reopening and retrying on failure.

        ``can`` is the capability the request needs; after a reopen it, the
        range and FUA are checked against the new connection first."""
        settings = self.filter
        delay = settings.retry_delay
        attempt = 0
        writes = can in _WRITES
        while True:
            if writes and self.readonly:
                raise io_error(errno.EROFS, "retry: the plugin was reopened read-only")
            generation = self.generation
            try:
                conn = self.current
                if conn is None:
                    raise io_error(errno.EIO, "retry: the plugin could not be reopened")
                if generation:
                    _check(conn, name, count, offset, flags, can)
                return request(conn)
            except Exception as exc:  # noqa: BLE001 (any failure is worth a retry)
                if attempt >= settings.retries:
                    raise
                attempt += 1
                log.warning("retry: %s failed (%s); retry %d of %d in %gs", name, exc, attempt,
                            settings.retries, delay)
            time.sleep(delay)
            if settings.retry_exponential:
                delay *= 2
            self._reopen(generation)

    def _reopen(self, generation: int) -> None:
        """Close and reopen the layers below, unless another request just did."""
        with self._lock:
            if generation != self.generation:
                return
            self.generation += 1
            old, self.current = self.current, None
            if old is not None:
                try:
                    old.close()
                except Exception as exc:  # noqa: BLE001
                    log.debug("retry: closing the failed connection: %s", exc)
            ctx = self.ctx
            if self.filter.retry_readonly:
                self.readonly = True
                ctx = dataclasses.replace(ctx, readonly=True)
            try:
                self.current = self.reopen(ctx)
            except Exception as exc:  # noqa: BLE001 (counted as a failed attempt)
                log.warning("retry: reopening failed: %s", exc)

    def close(self) -> None:
        with self._lock:
            conn, self.current = self.current, None
        if conn is not None:
            conn.close()


_WRITES = ("can_write", "can_zero", "can_trim")


def _check(conn: Connection, name: str, count: int, offset: int, flags: int,
           can: str) -> None:
    """What nbdkit's retry filter checks of a reopened connection before a request."""
    if count and offset + count > conn.get_size():
        raise io_error(errno.EIO, f"retry: {name} beyond the end of the reopened disk")
    if can and not getattr(conn, can)():
        error = errno.EROFS if can in _WRITES else errno.EIO
        raise io_error(error, f"retry: the reopened connection cannot {name}")
    if flags & FLAG_FUA and conn.can_fua() == FUA_NONE:
        raise io_error(errno.EIO, f"retry: the reopened connection cannot {name} with FUA")


class RetryFilter(Filter):
    name = "retry"
    params = (
        Param("retries", "int", "how often a request is retried", default=5),
        Param("retry-delay", "duration", "seconds before the first retry", default=2.0),
        Param("retry-exponential", "bool", "double the delay after each retry", default=True),
        Param("retry-readonly", "bool", "reopen read-only after a failure", default=False),
    )
    retries: int
    retry_delay: float
    retry_exponential: bool
    retry_readonly: bool

    def config_complete(self) -> None:
        if self.retries < 0:
            raise ConfigError(f"retry: retries={self.retries}: must be 0 or more")

    def open(self, next_open: Callable[[OpenContext], Connection], ctx: OpenContext) -> Connection:
        below = next_open(ctx)
        try:
            return RetryConnection(below, self, ctx, next_open)
        except BaseException:
            below.close()
            raise
