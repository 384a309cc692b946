"""The checked boundary between layers, as nbdkit's ``server/backend.c``.

Every call into an opened layer — from the server into the top layer, and
from each filter into the layer below it — goes through a ``Layer`` wrapped
around that layer's connection. The ``Layer`` is the one place that:

- asks the layer's ``get_size``, ``block_size`` and every ``can_*`` **once**,
  when it is opened, and answers later questions from that cache (a plugin
  or filter never caches its own answers);
- makes the answers consistent, as nbdkit does: a layer that cannot write
  cannot trim, zero or FUA; one that cannot zero cannot fast-zero; a layer
  opened read-only (``OpenContext.readonly``) cannot write;
- **checks every call** against those answers: the range lies inside the
  layer's size, the flags are ones the call takes and the layer said it
  supports, and the operation is one the layer offers. A failed check is a
  bug in the caller (usually a filter): it raises ``LayerCallError``, which
  the server reports as EIO for that request and logs with its traceback;
- emulates what a layer asked to have emulated: FUA on a layer whose
  ``can_fua`` is ``FUA_EMULATE`` becomes the write followed by ``flush``,
  and ``extents`` on a layer without ``can_extents`` is one data extent;
- with ``-v`` (the ``pynbd.layer`` logger at DEBUG when the layer is opened)
  logs each call, one line per layer: ``offset: pread count=4096 offset=0
  flags=0``;
- passes a call straight to the layer below when a filter leaves that call
  unchanged (``FilterConnection.passes_through``), so a filter that changes
  nothing costs no Python frame of its own.

Everything is decided when the layer is opened (``Layer.__init__``): the
per-request path is one range check and one call.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterable, Sequence

from .connection import (
    CACHE_EMULATE,
    CACHE_NONE,
    FLAG_FAST_ZERO,
    FLAG_FUA,
    FLAG_MAY_TRIM,
    FLAG_REQ_ONE,
    FUA_EMULATE,
    FUA_NONE,
    Buffer,
    Connection,
    ContextExtent,
    Extent,
    FilterConnection,
)
from .debugflags import server_flag
from .errors import io_error

log = logging.getLogger("pynbd.layer")


class LayerCallError(RuntimeError):
    """A call broke the layer boundary's rules (out of range, a flag the layer
    did not offer, an operation it cannot do): a bug in the calling layer."""


ReadBuffers = Callable[[int, int, int], "Sequence[Buffer] | None"]


def _no_buffers(count: int, offset: int, flags: int) -> None:
    """pread_buffers of a filter that changes reads: it has no zero-copy path."""
    return None


class Layer(Connection):
    """One opened layer as its caller sees it: answers cached, calls checked.

    ``name`` is what ``-v`` prints (the plugin's or filter's name);
    ``readonly`` is the open's ``OpenContext.readonly``.
    """

    def __init__(self, conn: Connection, name: str, readonly: bool = False) -> None:
        self.conn = conn
        self.name = name
        self.size = conn.get_size()
        self.sizes = conn.block_size()
        writable = not readonly and conn.can_write()
        self.writable = writable
        self.flushable = conn.can_flush()
        self.trimmable = writable and conn.can_trim()
        self.zeroable = writable and conn.can_zero()
        self.fast_zero = self.zeroable and conn.can_fast_zero()
        self.fua = conn.can_fua() if writable else FUA_NONE
        self.multi_conn = conn.can_multi_conn()
        self.cacheable = conn.can_cache()
        self.has_extents = conn.can_extents()
        self.rotational = conn.is_rotational()
        if self.fua == FUA_EMULATE and not self.flushable:
            raise io_error(errno.EINVAL, f"{name}: can_fua is 'emulate' but the layer cannot flush")

        # Flags each call takes, given what the layer offers.
        fua = FLAG_FUA if self.fua != FUA_NONE else 0
        self.write_flags = fua
        self.zero_flags = fua | FLAG_MAY_TRIM | (FLAG_FAST_ZERO if self.fast_zero else 0)
        # FLAG_FUA where the layer has it emulated (write, then flush), else 0.
        self.emulated_fua = FLAG_FUA if self.fua == FUA_EMULATE else 0
        # The end a write may reach: the size, or -1 so that every write fails the
        # one range test on the fast path when the layer cannot write.
        self.write_limit = self.size if writable else -1

        # The callables that do the work: the layer's own, or, for what a
        # filter passes through unchanged, the checked layer below it.
        target: Connection = conn
        unchanged: frozenset[str] = frozenset()
        if isinstance(conn, FilterConnection):
            unchanged = conn.passes_through()
        below = conn.next if isinstance(conn, FilterConnection) else conn

        def owner(method: str) -> Connection:
            """Whose ``method`` does the work: the layer below's if it is left unchanged."""
            return below if method in unchanged else target

        self._pread: Callable[[memoryview, int, int], None] = owner("pread").pread
        if isinstance(conn, FilterConnection) and "pread" not in unchanged \
                and not conn.overrides("pread_buffers"):
            # The filter changes reads: the layer below's buffers would bypass it.
            self._pread_buffers: ReadBuffers = _no_buffers
        else:
            self._pread_buffers = owner("pread_buffers").pread_buffers
        self._pwrite: Callable[[memoryview, int, int], None] = owner("pwrite").pwrite
        self._zero: Callable[[int, int, int], None] = owner("zero").zero
        self._trim: Callable[[int, int, int], None] = owner("trim").trim
        self._flush: Callable[[int], None] = owner("flush").flush
        self._cache: Callable[[int, int, int], None] = owner("cache").cache
        self._extents: Callable[[int, int, int], Iterable[Extent]] = owner("extents").extents
        self._block_status: Callable[[str, int, int, int], Iterable[ContextExtent]] = \
            owner("block_status").block_status

    # ---- cached answers
    def get_size(self) -> int:
        return self.size

    def block_size(self) -> tuple[int, int, int]:
        return self.sizes

    def export_description(self) -> str:
        """The layer's description; "" if asking fails (the client then gets none, as from nbdkit)."""
        try:
            return self.conn.export_description()
        except OSError as exc:
            log.warning("%s: export_description: %s", self.name, exc)
            return ""

    def can_write(self) -> bool:
        return self.writable

    def can_flush(self) -> bool:
        return self.flushable

    def can_trim(self) -> bool:
        return self.trimmable

    def can_zero(self) -> bool:
        return self.zeroable

    def can_fast_zero(self) -> bool:
        return self.fast_zero

    def can_fua(self) -> int:
        return self.fua

    def can_multi_conn(self) -> bool:
        return self.multi_conn

    def can_cache(self) -> int:
        return self.cacheable

    def can_extents(self) -> bool:
        return self.has_extents

    def is_rotational(self) -> bool:
        return self.rotational

    # ---- checks
    def _refuse(self, what: str) -> LayerCallError:
        return LayerCallError(f"{self.name}: {what}")

    def _check(self, call: str, count: int, offset: int, flags: int, allowed: int) -> None:
        if offset < 0 or count < 0 or offset + count > self.size:
            raise self._refuse(f"{call} count={count} offset={offset} is outside the "
                               f"layer's size {self.size}")
        if flags & ~allowed:
            raise self._refuse(f"{call} with flags {flags:#x}, of which {flags & ~allowed:#x} "
                               f"the layer does not take")

    # ---- checked calls
    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        if offset < 0 or offset + len(buf) > self.size or flags:
            self._check("pread", len(buf), offset, flags, 0)
        self._pread(buf, offset, flags)

    def pread_buffers(self, count: int, offset: int, flags: int) -> Sequence[Buffer] | None:
        if offset < 0 or offset + count > self.size or flags:
            self._check("pread", count, offset, flags, 0)
        return self._pread_buffers(count, offset, flags)

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        if offset < 0 or offset + len(buf) > self.write_limit or flags & ~self.write_flags:
            if not self.writable:
                raise self._refuse("pwrite on a layer that cannot write")
            self._check("pwrite", len(buf), offset, flags, self.write_flags)
        if flags & self.emulated_fua:
            self._pwrite(buf, offset, flags & ~FLAG_FUA)
            self._flush(0)
        else:
            self._pwrite(buf, offset, flags)

    def zero(self, count: int, offset: int, flags: int) -> None:
        if not self.zeroable:
            raise self._refuse("zero on a layer that cannot zero")
        self._check("zero", count, offset, flags, self.zero_flags)
        if flags & self.emulated_fua:
            self._zero(count, offset, flags & ~FLAG_FUA)
            self._flush(0)
        else:
            self._zero(count, offset, flags)

    def trim(self, count: int, offset: int, flags: int) -> None:
        if not self.trimmable:
            raise self._refuse("trim on a layer that cannot trim")
        self._check("trim", count, offset, flags, self.write_flags)
        if flags & self.emulated_fua:
            self._trim(count, offset, flags & ~FLAG_FUA)
            self._flush(0)
        else:
            self._trim(count, offset, flags)

    def flush(self, flags: int) -> None:
        if not self.flushable:
            raise self._refuse("flush on a layer that cannot flush")
        if flags:
            raise self._refuse(f"flush with flags {flags:#x}")
        self._flush(flags)

    def cache(self, count: int, offset: int, flags: int) -> None:
        if self.cacheable == CACHE_NONE:
            raise self._refuse("cache on a layer that cannot cache")
        self._check("cache", count, offset, flags, 0)
        if self.cacheable == CACHE_EMULATE:
            Connection.cache(self, count, offset, flags)  # read and discard, through the checks
        else:
            self._cache(count, offset, flags)

    def extents(self, count: int, offset: int, flags: int) -> Iterable[Extent]:
        self._check("extents", count, offset, flags, FLAG_REQ_ONE)
        if not self.has_extents:
            return (Extent(offset, count),)
        return self._extents(count, offset, flags)

    def block_status(self, context: str, count: int, offset: int, flags: int) -> Iterable[ContextExtent]:
        self._check("block_status", count, offset, flags, FLAG_REQ_ONE)
        return self._block_status(context, count, offset, flags)

    def close(self) -> None:
        self.conn.close()


def _hex(flags: int) -> str:
    return f"{flags:#x}" if flags else "0"


class LoggedLayer(Layer):
    """A Layer that logs every call (``-v``), then makes it."""

    def _log(self, call: str, text: str) -> None:
        log.debug("%s: %s %s", self.name, call, text)

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self._log("pread", f"count={len(buf)} offset={offset} flags={_hex(flags)}")
        super().pread(buf, offset, flags)

    def pread_buffers(self, count: int, offset: int, flags: int) -> Sequence[Buffer] | None:
        self._log("pread", f"count={count} offset={offset} flags={_hex(flags)}")
        return super().pread_buffers(count, offset, flags)

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self._log("pwrite", f"count={len(buf)} offset={offset} flags={_hex(flags)}")
        super().pwrite(buf, offset, flags)

    def zero(self, count: int, offset: int, flags: int) -> None:
        self._log("zero", f"count={count} offset={offset} flags={_hex(flags)}")
        super().zero(count, offset, flags)

    def trim(self, count: int, offset: int, flags: int) -> None:
        self._log("trim", f"count={count} offset={offset} flags={_hex(flags)}")
        super().trim(count, offset, flags)

    def flush(self, flags: int) -> None:
        self._log("flush", f"flags={_hex(flags)}")
        super().flush(flags)

    def cache(self, count: int, offset: int, flags: int) -> None:
        self._log("cache", f"count={count} offset={offset} flags={_hex(flags)}")
        super().cache(count, offset, flags)

    def extents(self, count: int, offset: int, flags: int) -> Iterable[Extent]:
        self._log("extents", f"count={count} offset={offset} flags={_hex(flags)}")
        return super().extents(count, offset, flags)

    def block_status(self, context: str, count: int, offset: int, flags: int) -> Iterable[ContextExtent]:
        self._log("block_status", f"context={context} count={count} offset={offset} flags={_hex(flags)}")
        return super().block_status(context, count, offset, flags)

    def close(self) -> None:
        self._log("close", "")
        super().close()


def open_layer(conn: Connection, name: str, readonly: bool) -> Layer:
    """Wrap an opened connection in its checked boundary (logged with ``-v``).

    The connection is closed if asking its answers fails.
    """
    logged = log.isEnabledFor(logging.DEBUG) and server_flag("backend.datapath", 1)
    kind = LoggedLayer if logged else Layer
    try:
        return kind(conn, name, readonly)
    except BaseException:
        conn.close()
        raise
