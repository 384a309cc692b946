"""error: inject errors into requests, to test how clients cope.

    pynbd serve --filter=error file disk.img error-rate=1%
    pynbd serve --filter=error memory 1G error=ENOSPC error-pwrite-rate=100% error-zero-rate=100%
    rm -f /tmp/inject
    pynbd serve --filter=error file disk.img error-rate=100% error-file=/tmp/inject
    sleep 60; touch /tmp/inject        # from now on every request fails

Parameters
    error=ERRNO        the error injected: EPERM, EIO (default), ENOMEM,
                       EINVAL, ENOSPC, ESHUTDOWN, EOVERFLOW or ENOTSUP
    error-rate=RATE    the chance that a request fails: a probability from 0
                       to 1 (``0.25``) or a percentage (``25%``); default 0
    error-file=FILE    inject errors only while FILE exists

    error-OP, error-OP-rate, error-OP-file
                       the same for one kind of request only, where OP is
                       pread, pwrite, trim, zero, extents or cache; each falls
                       back to the general setting when not given.

Flush requests never fail. A rate outside 0..1 (or 0%..100%) is refused at
start-up: ``error: error-rate=1.5: the rate must be between 0 and 1 (or 0% and
100%)``. Each injected error is logged (``error: injecting ENOSPC error into
pwrite``) and the client sees the chosen errno.
"""

from __future__ import annotations

import errno
import logging
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass

from ..backend import (
    ConfigError,
    Connection,
    Extent,
    Filter,
    FilterConnection,
    OpenContext,
    Param,
    io_error,
)

log = logging.getLogger("pynbd.filters.error")

OPS = ("pread", "pwrite", "trim", "zero", "extents", "cache")
ERRNOS = {"EPERM": errno.EPERM, "EIO": errno.EIO, "ENOMEM": errno.ENOMEM, "EINVAL": errno.EINVAL,
          "ENOSPC": errno.ENOSPC, "ESHUTDOWN": errno.ESHUTDOWN, "EOVERFLOW": errno.EOVERFLOW,
          "ENOTSUP": errno.ENOTSUP}


def parse_rate(key: str, text: str) -> float:
    """A probability from ``0.25`` or ``25%``; ConfigError outside 0..1."""
    body = text.strip()
    percent = body.endswith("%")
    try:
        value = float(body[:-1] if percent else body)
    except ValueError:
        raise ConfigError(f"error: {key}={text}: not a number or percentage") from None
    if percent:
        value /= 100
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"error: {key}={text}: the rate must be between 0 and 1 "
                          f"(or 0% and 100%)")
    return value


@dataclass(frozen=True)
class Injection:
    """When and how one kind of request fails."""

    op: str
    err: int
    rate: float
    file: str | None

    def maybe_fail(self) -> None:
        if self.rate <= 0.0:
            return
        if self.file is not None and not os.path.exists(self.file):
            return
        if self.rate >= 1.0 or random.random() < self.rate:
            name = errno.errorcode[self.err]
            log.error("error: injecting %s error into %s", name, self.op)
            raise io_error(self.err, f"error: injecting {name} error into {self.op}")


class ErrorConnection(FilterConnection["ErrorFilter"]):
    def __init__(self, next: Connection, filter: ErrorFilter, ctx: OpenContext) -> None:
        super().__init__(next, filter, ctx)
        self.inject = filter.injections

    def passes_through(self) -> frozenset[str]:
        # A request that can never fail is the layer below's own.
        return super().passes_through() | {op for op, how in self.inject.items() if how.rate <= 0.0}

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self.inject["pread"].maybe_fail()
        self.next.pread(buf, offset, flags)

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self.inject["pwrite"].maybe_fail()
        self.next.pwrite(buf, offset, flags)

    def trim(self, count: int, offset: int, flags: int) -> None:
        self.inject["trim"].maybe_fail()
        self.next.trim(count, offset, flags)

    def zero(self, count: int, offset: int, flags: int) -> None:
        self.inject["zero"].maybe_fail()
        self.next.zero(count, offset, flags)

    def extents(self, count: int, offset: int, flags: int) -> Iterable[Extent]:
        self.inject["extents"].maybe_fail()
        return self.next.extents(count, offset, flags)

    def cache(self, count: int, offset: int, flags: int) -> None:
        self.inject["cache"].maybe_fail()
        self.next.cache(count, offset, flags)


def _params() -> tuple[Param, ...]:
    out = []
    for prefix, what in [("error", "every request"), *((f"error-{op}", op) for op in OPS)]:
        out += [Param(prefix, "str", f"errno injected into {what}", choices=tuple(ERRNOS)),
                Param(f"{prefix}-rate", "str", f"chance of an error in {what} (0..1 or N%)"),
                Param(f"{prefix}-file", "path", f"inject into {what} only while this file exists")]
    return tuple(out)


@dataclass(frozen=True)
class Setting:
    """error, error-rate and error-file as given for all requests or one kind."""

    name: str | None
    rate: str | None
    file: str | None


class ErrorFilter(Filter):
    short_requests = True
    name = "error"
    params = _params()
    error: str | None
    error_rate: str | None
    error_file: str | None
    error_pread: str | None
    error_pread_rate: str | None
    error_pread_file: str | None
    error_pwrite: str | None
    error_pwrite_rate: str | None
    error_pwrite_file: str | None
    error_trim: str | None
    error_trim_rate: str | None
    error_trim_file: str | None
    error_zero: str | None
    error_zero_rate: str | None
    error_zero_file: str | None
    error_extents: str | None
    error_extents_rate: str | None
    error_extents_file: str | None
    error_cache: str | None
    error_cache_rate: str | None
    error_cache_file: str | None
    connection = ErrorConnection

    def config_complete(self) -> None:
        every = Setting(self.error, self.error_rate, self.error_file)
        specific = {
            "pread": Setting(self.error_pread, self.error_pread_rate, self.error_pread_file),
            "pwrite": Setting(self.error_pwrite, self.error_pwrite_rate, self.error_pwrite_file),
            "trim": Setting(self.error_trim, self.error_trim_rate, self.error_trim_file),
            "zero": Setting(self.error_zero, self.error_zero_rate, self.error_zero_file),
            "extents": Setting(self.error_extents, self.error_extents_rate,
                               self.error_extents_file),
            "cache": Setting(self.error_cache, self.error_cache_rate, self.error_cache_file),
        }
        self.injections = {op: _injection(op, specific[op], every) for op in OPS}


def _injection(op: str, own: Setting, every: Setting) -> Injection:
    """How ``op`` fails: its own settings, each falling back to the general one."""
    key = f"error-{op}-rate" if own.rate is not None else "error-rate"
    rate_text = own.rate if own.rate is not None else every.rate
    rate = 0.0 if rate_text is None else parse_rate(key, rate_text)
    name = (own.name if own.name is not None else every.name) or "EIO"
    file = own.file if own.file is not None else every.file
    return Injection(op, ERRNOS[name], rate, file)
