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
from dataclasses import dataclass

from ..backend import ConfigError, Filter, FilterConnection, Param, io_error

log = logging.getLogger("pynbd.filters.error")

OPS = ("pread", "pwrite", "trim", "zero", "extents", "cache")
ERRNOS = ("EPERM", "EIO", "ENOMEM", "EINVAL", "ENOSPC", "ESHUTDOWN", "EOVERFLOW", "ENOTSUP")


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


class ErrorConnection(FilterConnection):
    def __init__(self, next, filter, ctx) -> None:  # noqa: A002
        super().__init__(next, filter, ctx)
        self.inject = filter.injections

    def pread(self, buf, offset, flags):
        self.inject["pread"].maybe_fail()
        self.next.pread(buf, offset, flags)

    def pwrite(self, buf, offset, flags):
        self.inject["pwrite"].maybe_fail()
        self.next.pwrite(buf, offset, flags)

    def trim(self, count, offset, flags):
        self.inject["trim"].maybe_fail()
        self.next.trim(count, offset, flags)

    def zero(self, count, offset, flags):
        self.inject["zero"].maybe_fail()
        self.next.zero(count, offset, flags)

    def extents(self, count, offset, flags):
        self.inject["extents"].maybe_fail()
        return self.next.extents(count, offset, flags)

    def cache(self, count, offset, flags):
        self.inject["cache"].maybe_fail()
        self.next.cache(count, offset, flags)


def _params() -> tuple[Param, ...]:
    out = []
    for prefix, what in [("error", "every request"), *((f"error-{op}", op) for op in OPS)]:
        out += [Param(prefix, "str", f"errno injected into {what}", choices=ERRNOS),
                Param(f"{prefix}-rate", "str", f"chance of an error in {what} (0..1 or N%)"),
                Param(f"{prefix}-file", "path", f"inject into {what} only while this file exists")]
    return tuple(out)


class ErrorFilter(Filter):
    short_requests = True
    name = "error"
    params = _params()
    connection = ErrorConnection

    def config_complete(self) -> None:
        self.injections = {op: self._injection(op) for op in OPS}

    def _setting(self, op: str, suffix: str):
        specific = getattr(self, f"error_{op}{suffix}")
        return specific if specific is not None else getattr(self, f"error{suffix}")

    def _injection(self, op: str) -> Injection:
        rate_text = self._setting(op, "_rate")
        specific = getattr(self, f"error_{op}_rate") is not None
        key = f"error-{op}-rate" if specific else "error-rate"
        rate = 0.0 if rate_text is None else parse_rate(key, rate_text)
        name = self._setting(op, "") or "EIO"
        return Injection(op, getattr(errno, name), rate, self._setting(op, "_file"))
