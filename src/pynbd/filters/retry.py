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
they were. Requests that fail together trigger only one reopen.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..backend import ConfigError, Connection, Filter, FilterConnection, OpenContext, Param, io_error

log = logging.getLogger("pynbd.filters.retry")

_WRITES = frozenset({"pwrite", "zero", "trim"})
_CAPABILITIES = ("get_size", "can_write", "can_flush", "can_trim", "can_zero", "can_fast_zero",
                 "can_fua", "can_multi_conn", "can_cache", "can_extents", "is_rotational",
                 "block_size")


class RetryConnection(FilterConnection):
    def __init__(self, next, filter, ctx, reopen: Callable[[OpenContext], Connection]) -> None:  # noqa: A002
        super().__init__(next, filter, ctx)
        self.current: Connection | None = next
        self.reopen = reopen
        self.generation = 0
        self.readonly = False
        self._lock = threading.Lock()
        # What the client was told stays true: ask the first connection once.
        self.answers: dict[str, Any] = {name: getattr(next, name)() for name in _CAPABILITIES}

    def pread(self, buf, offset, flags):
        self._do("pread", buf, offset, flags)

    def pwrite(self, buf, offset, flags):
        self._do("pwrite", buf, offset, flags)

    def zero(self, count, offset, flags):
        self._do("zero", count, offset, flags)

    def trim(self, count, offset, flags):
        self._do("trim", count, offset, flags)

    def flush(self, flags):
        self._do("flush", flags)

    def cache(self, count, offset, flags):
        self._do("cache", count, offset, flags)

    def extents(self, count, offset, flags):
        return self._do("extents", count, offset, flags)

    def _do(self, name: str, *args: Any) -> Any:
        """Run one request, reopening and retrying on failure."""
        settings = self.filter
        delay = settings.retry_delay
        attempt = 0
        while True:
            generation = self.generation
            try:
                return self._call(name, args)
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

    def _call(self, name: str, args: tuple) -> Any:
        if self.readonly and name in _WRITES:
            raise io_error(errno.EROFS, "retry: the plugin was reopened read-only")
        conn = self.current
        if conn is None:
            raise io_error(errno.EIO, "retry: the plugin could not be reopened")
        result = getattr(conn, name)(*args)
        return list(result) if name == "extents" else result

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


def _remembered(name: str) -> Callable[[RetryConnection], Any]:
    def method(self: RetryConnection) -> Any:
        return self.answers[name]
    method.__name__ = name
    method.__doc__ = f"{name} as the layer below answered it when the client connected."
    return method


for _name in _CAPABILITIES:
    setattr(RetryConnection, _name, _remembered(_name))


class RetryFilter(Filter):
    name = "retry"
    params = (
        Param("retries", "int", "how often a request is retried", default=5),
        Param("retry-delay", "duration", "seconds before the first retry", default=2.0),
        Param("retry-exponential", "bool", "double the delay after each retry", default=True),
        Param("retry-readonly", "bool", "reopen read-only after a failure", default=False),
    )

    def config_complete(self) -> None:
        if self.retries < 0:
            raise ConfigError(f"retry: retries={self.retries}: must be 0 or more")

    def open(self, next_open, ctx):
        below = next_open(ctx)
        try:
            return RetryConnection(below, self, ctx, next_open)
        except BaseException:
            below.close()
            raise
