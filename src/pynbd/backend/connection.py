"""The Connection contract: the methods every layer of a stack implements.

A plugin's ``open()`` returns a ``Connection``; a filter's returns a
``FilterConnection`` wrapping the next layer. Buffers are memoryviews:
``pread`` fills its buffer in place, ``pwrite`` reads from it; no layer
copies data it does not transform. Failures are ``OSError`` with an errno
(see ``backend.errors.io_error``), which the server sends to the client.

Request flags (the ``flags`` argument) use nbdkit's values, so nbdkit
plugins translate one to one:

    FLAG_MAY_TRIM   zero(): the range may be punched as a hole
    FLAG_FUA        the data must be durable before returning
    FLAG_REQ_ONE    extents(): the caller wants only the first extent
    FLAG_FAST_ZERO  zero(): fail with ENOTSUP rather than be slow
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, Protocol, TypeVar, runtime_checkable

from .errors import io_error

Buffer = bytes | bytearray | memoryview

ZERO_BUFFER = bytes(1 << 20)
"""A mebibyte of zeroes. ``pread_buffers`` may return views of it for ranges
that read as zeroes: the server recognises them and sends those ranges as
holes (NBD_REPLY_TYPE_OFFSET_HOLE) instead of data."""

FLAG_MAY_TRIM = 1 << 0
FLAG_FUA = 1 << 1
FLAG_REQ_ONE = 1 << 2
FLAG_FAST_ZERO = 1 << 3

# What can_fua / can_cache report, as in nbdkit.
FUA_NONE, FUA_EMULATE, FUA_NATIVE = 0, 1, 2
CACHE_NONE, CACHE_EMULATE, CACHE_NATIVE = 0, 1, 2

_ZERO_CHUNK = 1024 * 1024
CACHE_CHUNK = 64 * 1024 * 1024  # an emulated cache reads this much at a time, as nbdkit does


class Extent(NamedTuple):
    """A run of bytes with the same allocation state."""

    offset: int
    length: int
    hole: bool = False
    zero: bool = False

    @property
    def state(self) -> int:
        """base:allocation flags (hole = 1, zero = 2)."""
        return (1 if self.hole else 0) | (2 if self.zero else 0)


class ContextExtent(NamedTuple):
    """A run of bytes with the same status in a meta context other than
    ``base:allocation`` (``flags`` as that context defines them: for
    ``qemu:dirty-bitmap:NAME`` 1 means dirty; for ``qemu:allocation-depth``
    the depth)."""

    offset: int
    length: int
    flags: int = 0

    @property
    def state(self) -> int:
        return self.flags


E = TypeVar("E", Extent, ContextExtent)

ALLOCATION_DEPTH = "qemu:allocation-depth"
"""The meta context of overlays: 0 unallocated, 1 in this layer, 2+ in the layers below."""


class Connection:
    """One client's view of a plugin. Subclass it and override what you serve.

    Defaults: a read-only disk of size 0 that supports nothing optional;
    ``zero`` falls back to writing zeroes, ``cache`` to reading, ``extents``
    to one allocated extent. ``can_write`` defaults to whether ``pwrite``
    was overridden, and likewise for flush, trim and zero.
    """

    def get_size(self) -> int:
        return 0

    def can_write(self) -> bool:
        return type(self).pwrite is not Connection.pwrite

    def can_flush(self) -> bool:
        return type(self).flush is not Connection.flush

    def can_trim(self) -> bool:
        return type(self).trim is not Connection.trim

    def can_zero(self) -> bool:
        return self.can_write()

    def can_fast_zero(self) -> bool:
        """True only where zero() is fast (it must then honour FLAG_FAST_ZERO)."""
        return type(self).zero is not Connection.zero

    def can_fua(self) -> int:
        """FUA_NATIVE if writes honour FLAG_FUA, FUA_EMULATE to flush after them."""
        return FUA_EMULATE if self.can_flush() else FUA_NONE

    def can_multi_conn(self) -> bool:
        return False

    def can_cache(self) -> int:
        return CACHE_NATIVE if type(self).cache is not Connection.cache else CACHE_EMULATE

    def can_extents(self) -> bool:
        return type(self).extents is not Connection.extents

    def is_rotational(self) -> bool:
        return False

    def block_size(self) -> tuple[int, int, int]:
        """(minimum, preferred, maximum) I/O sizes; (0, 0, 0) means no preference."""
        return (0, 0, 0)

    def export_description(self) -> str:
        """The description sent to a client that asks (NBD_INFO_DESCRIPTION); "" for none."""
        return ""

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        raise io_error(errno.EIO, "pread is not implemented")

    def pread_buffers(self, count: int, offset: int, flags: int) -> Sequence[Buffer] | None:
        """Optional zero-copy read: buffers that together hold the data, or None.

        A plugin whose data already sits in memory may return views of it;
        the server hands them to the kernel as they are, without copying
        them into a reply buffer first. The default, None, makes the server
        call ``pread`` with a buffer of its own. Return views of
        ``ZERO_BUFFER`` for ranges known to read as zeroes.
        """
        return None

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        raise io_error(errno.EROFS, "this export is read-only")

    def zero(self, count: int, offset: int, flags: int) -> None:
        """Write zeroes; the default writes a zero buffer (never fast)."""
        if flags & FLAG_FAST_ZERO:
            raise io_error(errno.ENOTSUP, "fast zero is not supported")
        chunk = memoryview(bytes(min(count, _ZERO_CHUNK)))
        end = offset + count
        write_flags = flags & FLAG_FUA
        while offset < end:
            n = min(end - offset, len(chunk))
            self.pwrite(chunk[:n], offset, write_flags)
            offset += n

    def trim(self, count: int, offset: int, flags: int) -> None:
        raise io_error(errno.EOPNOTSUPP, "trim is not supported")

    def flush(self, flags: int) -> None:
        """Make completed writes durable. The default has nothing to flush."""

    def cache(self, count: int, offset: int, flags: int) -> None:
        """Prefetch; the default reads the range and discards it."""
        buf = memoryview(bytearray(min(count, CACHE_CHUNK)))
        end = offset + count
        while offset < end:
            n = min(end - offset, len(buf))
            self.pread(buf[:n], offset, 0)
            offset += n

    def extents(self, count: int, offset: int, flags: int) -> Iterable[Extent]:
        """Allocation state from ``offset``; default: all data."""
        return (Extent(offset, count),)

    def block_status(self, context: str, count: int, offset: int, flags: int) -> Iterable[ContextExtent]:
        """Status from ``offset`` in meta context ``context``, one this layer's
        ``list_meta_contexts`` offered (``base:allocation`` is ``extents``).
        The default knows no context."""
        raise io_error(errno.EINVAL, f"no meta context {context!r} here")

    def close(self) -> None:
        """Release what open() took."""


class Completions(Protocol):
    """Where a layer that answers requests later (``AsyncReads``, ``AsyncWrites``)
    reports them: the server.

    ``read_done`` / ``write_done`` is called exactly once per started read /
    write, from any thread (usually the one that learns of the outcome), with
    None on success or the OSError the request failed with (its errno goes to
    the client). ``burst_done`` follows a burst of those calls (what one
    receive or one reap brought), so that their replies leave together; a
    layer that reports one completion at a time calls it after each.
    """

    def read_done(self, tag: object, error: OSError | None) -> None: ...

    def write_done(self, tag: object, error: OSError | None) -> None: ...

    def burst_done(self) -> None: ...


@runtime_checkable
class AsyncReads(Protocol):
    """An optional capability of a plugin's connection: reads answered later.

    A layer whose reads wait on something else that answers many requests
    at once (the nbd proxy: another server; io_uring; vhost-user) may offer
    it. The server then starts every read of a client with ``start_pread``
    as soon as it is read, instead of holding a thread until it is answered,
    and sends each reply when ``completions.read_done(tag, error)`` is
    called. It is used only when every layer above passes reads through
    unchanged (see ``server.async_requests``); every other call, and every
    other stack, keeps the synchronous contract.

    - ``start_pread(buf, offset, flags, tag, completions)``: fill ``buf``
      later; the buffer is the caller's until ``read_done`` is called. It
      may queue the read without sending it; it may raise OSError (then
      ``read_done`` is never called for it).
    - ``send_started()``: the caller is about to wait for its client:
      send what was started and queued (several requests in one send).
    """

    def start_pread(self, buf: memoryview, offset: int, flags: int, tag: object,
                    completions: Completions) -> None: ...

    def send_started(self) -> None: ...


@runtime_checkable
class AsyncWrites(Protocol):
    """An optional capability of a plugin's connection: writes answered later.

    For a layer whose writes complete elsewhere (io_uring's kernel workers,
    a vhost-user backend): the server starts a client's writes one after
    another, without waiting, and replies to each when it is done. It is
    used only when every layer above passes writes through unchanged; the
    contract, as the plugin sees it:

    - ``start_pwrite(buf, offset, flags, tag, completions)``: write ``buf``
      at ``offset`` later and call ``completions.write_done(tag, error)``
      once it is done (the data is where a later ``flush`` makes it durable)
      or failed (an OSError: its errno is the client's). ``buf`` is the
      plugin's until then: the server neither changes nor reuses it. The
      range was checked (within the size, writable). ``flags`` may hold
      ``FLAG_FUA``: then the data must be durable before ``write_done`` —
      the plugin honours it itself, whatever its ``can_fua`` says. It may
      queue the write until ``send_started``; it may raise OSError (then
      ``write_done`` is never called for it).
    - ``send_started()``: as for ``AsyncReads``: send what was queued.
    - Ordering is the server's business: before any other request (flush,
      zero, trim, a read or write it does not start, ...) reaches the
      connection, every write started before it has been reported done, so
      ``flush`` covers every write the client was answered. (Writes the
      client sends after a flush may be started while a worker thread runs
      it.) Writes in flight may be done in any order, as NBD allows. A
      connection's ``close`` is called only after every started write was
      reported.
    """

    def start_pwrite(self, buf: memoryview, offset: int, flags: int, tag: object,
                     completions: Completions) -> None: ...

    def send_started(self) -> None: ...


@runtime_checkable
class PolledCompletions(Protocol):
    """An optional addition to ``AsyncReads`` / ``AsyncWrites``: the server's reading
    thread waits for the completions itself, together with its client's socket, so
    that no thread of the plugin's wakes to report them (one thread switch less per
    request). The server uses it on clients without TLS; the contract:

    - ``completion_fd()``: a file descriptor that becomes readable when started
      requests may have completed (called once per connection).
    - ``submit_started()``: as ``send_started``, but the caller is going to poll
      ``completion_fd`` and call ``reap_started``: nothing else need wait for the
      completions. (``send_started`` still means that the caller waits for something
      else, so the plugin must see to them itself.)
    - ``reap_started()``: report what has completed (``read_done`` / ``write_done``,
      then ``burst_done``) without waiting. Completions it cannot report now (another
      thread of the plugin's is reporting) make ``completion_fd`` readable again
      unless that thread reports them.
    """

    def completion_fd(self) -> int: ...

    def submit_started(self) -> None: ...

    def reap_started(self) -> None: ...


DATA_METHODS = frozenset({"pread", "pread_buffers", "pwrite", "zero", "trim", "flush", "cache",
                          "extents", "block_status"})
"""The per-request calls a filter may pass through unchanged (see
``FilterConnection.passes_through``)."""

F = TypeVar("F")  # the filter whose connection this is (a ``Filter`` subclass)


@dataclass
class OpenContext:
    """What a layer knows about the client it is opened for."""

    readonly: bool = False
    export_name: str = ""
    tls: bool = False
    client_address: Any = None
    # (pid, uid, gid) of a client on a Unix socket, from SO_PEERCRED; None for TCP clients
    peer_credentials: tuple[int, int, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class FilterConnection(Connection, Generic[F]):
    """A filter's layer over ``self.next``. Override only what the filter changes.

    ``next`` is the layer below, already wrapped in its checked boundary
    (``backend.layer.Layer``): its answers are cached and every call into it
    is checked. ``filter`` is the Filter object (its parameters, typed: a
    ``FilterConnection[MyFilter]`` sees ``self.filter`` as ``MyFilter``),
    ``ctx`` the OpenContext of this open.

    Every method here passes the call to ``next`` unchanged. A call the
    subclass does not override, or that ``passes_through`` names, is bound
    by the boundary straight to the layer below, so passing through costs
    nothing per request. ``close`` closes the next layer after this one.
    """

    def __init__(self, next: Connection, filter: F, ctx: OpenContext) -> None:
        self.next = next
        self.filter = filter
        self.ctx = ctx

    @classmethod
    def overrides(cls, method: str) -> bool:
        """Whether this class defines its own ``method`` (not FilterConnection's)."""
        return getattr(cls, method) is not getattr(FilterConnection, method)

    def passes_through(self) -> frozenset[str]:
        """The per-request calls (of ``DATA_METHODS``) this layer leaves unchanged.

        The default is every call the class does not override. A filter
        whose parameters make an override a no-op (``offset=0``, a zero
        delay) extends it, and the boundary then calls the layer below
        directly.
        """
        return frozenset(m for m in DATA_METHODS if not self.overrides(m))

    def get_size(self) -> int:
        return self.next.get_size()

    def can_write(self) -> bool:
        return self.next.can_write()

    def can_flush(self) -> bool:
        return self.next.can_flush()

    def can_trim(self) -> bool:
        return self.next.can_trim()

    def can_zero(self) -> bool:
        return self.next.can_zero()

    def can_fast_zero(self) -> bool:
        return self.next.can_fast_zero()

    def can_fua(self) -> int:
        return self.next.can_fua()

    def can_multi_conn(self) -> bool:
        return self.next.can_multi_conn()

    def can_cache(self) -> int:
        return self.next.can_cache()

    def can_extents(self) -> bool:
        return self.next.can_extents()

    def is_rotational(self) -> bool:
        return self.next.is_rotational()

    def block_size(self) -> tuple[int, int, int]:
        return self.next.block_size()

    def export_description(self) -> str:
        return self.next.export_description()

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self.next.pread(buf, offset, flags)

    def pread_buffers(self, count: int, offset: int, flags: int) -> Sequence[Buffer] | None:
        return self.next.pread_buffers(count, offset, flags)

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self.next.pwrite(buf, offset, flags)

    def zero(self, count: int, offset: int, flags: int) -> None:
        self.next.zero(count, offset, flags)

    def trim(self, count: int, offset: int, flags: int) -> None:
        self.next.trim(count, offset, flags)

    def flush(self, flags: int) -> None:
        self.next.flush(flags)

    def cache(self, count: int, offset: int, flags: int) -> None:
        self.next.cache(count, offset, flags)

    def extents(self, count: int, offset: int, flags: int) -> Iterable[Extent]:
        return self.next.extents(count, offset, flags)

    def block_status(self, context: str, count: int, offset: int, flags: int) -> Iterable[ContextExtent]:
        return self.next.block_status(context, count, offset, flags)

    def close(self) -> None:
        self.next.close()


class ClosingFilter(Protocol):
    def closed(self) -> None:
        """One of this filter's connections closed."""


C = TypeVar("C", bound=ClosingFilter)


class CloseNotifyingConnection(FilterConnection[C]):
    """Tells its filter when it closes (the exitlast and exitwhen filters count clients)."""

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.filter.closed()


def clip_extents(extents: Iterable[E], offset: int, count: int,
                 req_one: bool = False) -> Iterator[E]:
    """Extents (``Extent`` or ``ContextExtent``) limited to [offset, offset+count),
    merged, gap-free from offset.

    Layers may return extents that start before ``offset`` or run past the
    end; this trims them, merges neighbours with the same state and stops
    at the first gap (the client asks again from there).
    """
    end = offset + count
    pos = offset
    first: E | None = None  # the extent the run being gathered began with
    start = offset  # where that run begins
    for ext in extents:
        ext_end = ext.offset + ext.length
        if ext_end <= pos or ext.length <= 0:
            continue
        if ext.offset > pos:
            break
        if first is None or first.state != ext.state:
            if first is not None:
                yield _span(first, start, pos)
                if req_one:
                    return
            first, start = ext, pos
        pos = min(ext_end, end)
        if pos >= end:
            break
    if first is not None:
        yield _span(first, start, pos)


def _span(ext: E, start: int, stop: int) -> E:
    """``ext``'s state over [start, stop): ``ext`` itself when it is exactly that."""
    if ext.offset == start and ext.offset + ext.length == stop:
        return ext  # (most extents: a layer's answer is usually merged and in range already)
    return ext._replace(offset=start, length=stop - start)
