"""Local endpoints: regular files, block devices and streams.

- A regular file or block device is read and written with ``preadv`` /
  ``pwritev`` called straight from the copy's lane (a page-cache copy costs
  less than handing it to another thread); the lanes, one thread each, keep
  several requests going at once. A source file's extents come from
  ``SEEK_DATA`` / ``SEEK_HOLE``.
- Written ranges of a regular file are pushed to the disk as the copy goes
  (``sync_file_range``) and dropped from the page cache a few requests
  later, as nbdcopy does: the copy does not fill memory with dirty pages
  that the kernel would otherwise throttle or reclaim in the middle of it.
- A regular-file destination is truncated and then extended to the source's
  size, as nbdcopy does, so it reads as zeroes and holes need no writing
  (a file copied onto itself is left alone). Zeroing punches holes
  (``fallocate`` PUNCH_HOLE) or, with ``--allocated``, uses ZERO_RANGE; a
  block device uses the BLKZEROOUT ioctl. Where those fail, zero bytes are
  written.
- ``-``, pipes, character devices and sockets are streams: read or written in
  order, one request at a time, and a stream source's length is wherever it
  ends.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

from .endpoint import NULL_SIZE, CopyError, Done, Endpoint, Extent, Facts
from .options import Spec

FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
BLKZEROOUT = 0x127F
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.ENOTTY)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_libc.sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
SYNC_WAIT_BEFORE, SYNC_WRITE, SYNC_WAIT_AFTER = 1, 2, 4
EVICT_BEHIND = 16 * 1024 * 1024  # bytes written per connection before they leave the cache


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Linux fallocate(2) with its mode flags (os.posix_fallocate has none)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class CacheEvictor:
    """Writes back and forgets written ranges of a file, per connection.

    ``written`` starts the write-back of a range at once and, once more than
    ``EVICT_BEHIND`` bytes of a connection are pending, waits for its oldest
    ranges and drops them from the page cache. Each connection is driven by
    one thread, so its queue needs no lock. Failures only cost speed (a file
    system without ``sync_file_range`` keeps its cache) and are ignored.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pending: dict[int, deque[tuple[int, int]]] = defaultdict(deque)
        self.queued: dict[int, int] = defaultdict(int)

    def written(self, conn: int, offset: int, length: int) -> None:
        _libc.sync_file_range(self.fd, offset, length, SYNC_WRITE)
        ranges = self.pending[conn]
        ranges.append((offset, length))
        self.queued[conn] += length
        while self.queued[conn] > EVICT_BEHIND:
            old, n = ranges.popleft()
            self.queued[conn] -= n
            _libc.sync_file_range(self.fd, old, n, SYNC_WAIT_BEFORE | SYNC_WRITE | SYNC_WAIT_AFTER)
            os.posix_fadvise(self.fd, old, n, os.POSIX_FADV_DONTNEED)


def pread_full(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``offset``; fewer bytes only at the end of the file."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def pwrite_full(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwritev(fd, [view[done:]], offset + done)


def read_full(fd: int, view: memoryview) -> int:
    """Fill ``view`` from a stream; fewer bytes only at its end."""
    done = 0
    while done < len(view):
        n = os.readv(fd, [view[done:]])
        if n == 0:
            break
        done += n
    return done


def write_full(fd: int, view: memoryview) -> None:
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])


class LocalEndpoint(Endpoint):
    """A file descriptor, used with plain blocking system calls."""

    def __init__(self, label: str, fd: int, owned: bool = True) -> None:
        super().__init__(label)
        self.fd, self.owned = fd, owned

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except OSError as exc:
            raise CopyError(self.label, exc.strerror or exc) from None

    def close(self) -> None:
        if self.owned and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


class FileEndpoint(LocalEndpoint):
    """A regular file or a block device: random access."""

    def __init__(self, label: str, fd: int, block_device: bool) -> None:
        super().__init__(label, fd)
        self.block_device = block_device
        self.size = os.lseek(fd, 0, os.SEEK_END)
        self.zero_is_cheap = True
        self._zero_native = True
        self._evictor: CacheEvictor | None = None  # set for a regular file being written

    def facts(self) -> Facts:
        method = "BLKZEROOUT" if self.block_device else "fallocate"
        return Facts("block device" if self.block_device else "file", zero_method=method)

    def identity(self) -> tuple[int, int]:
        st = os.fstat(self.fd)
        return st.st_dev, st.st_ino

    def read(self, conn: int, view: memoryview, offset: int, done: Done) -> None:
        n: int = self._call(pread_full, self.fd, view, offset)
        if n < len(view):
            raise CopyError(self.label, f"file shrank: read {n} of {len(view)} bytes at {offset}")
        done(n, None)

    def write(self, conn: int, view: memoryview, offset: int, done: Done) -> None:
        self._call(pwrite_full, self.fd, view, offset)
        if self._evictor is not None:
            self._evictor.written(conn, offset, len(view))
        done(len(view), None)

    def zero(self, conn: int, count: int, offset: int, allocate: bool, done: Done) -> None:
        if self._zero_native:
            try:
                self._zero_native_call(count, offset, allocate)
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise CopyError(self.label, exc.strerror or exc) from None
                self._zero_native = False
            else:
                done(count, None)
                return
        self.write_zeroes(conn, count, offset, done)

    def _zero_native_call(self, count: int, offset: int, allocate: bool) -> None:
        if self.block_device:
            fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("=QQ", offset, count))
        elif allocate:
            fallocate(self.fd, FALLOC_FL_ZERO_RANGE, offset, count)
        else:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, count)

    def extents(self, conn: int, count: int, offset: int) -> list[Extent] | None:
        if self.block_device:
            return None
        try:
            return file_extents(self.fd, offset, offset + count)
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                return None
            raise CopyError(self.label, exc.strerror or exc) from None

    def prepare(self, length: int | None, source: Endpoint) -> None:
        if self.block_device:
            return
        self._evictor = CacheEvictor(self.fd)
        if isinstance(source, FileEndpoint) and source.identity() == self.identity():
            return  # a file copied onto itself: truncating would destroy the source
        try:
            os.ftruncate(self.fd, 0)
            os.ftruncate(self.fd, length or 0)
        except OSError as exc:
            raise CopyError(self.label, f"truncate: {exc.strerror}") from None
        self.size = NULL_SIZE if length is None else length
        self.reads_as_zero = True

    def finish(self, conn: int, length: int, flush: bool) -> None:
        if not self.block_device and os.fstat(self.fd).st_size < length:
            self._call(os.ftruncate, self.fd, length)  # a stream's trailing zeroes
        if flush:
            self._call(os.fsync, self.fd)


def file_extents(fd: int, offset: int, end: int) -> list[Extent]:
    """Data and holes of a file between ``offset`` and ``end`` (SEEK_DATA / SEEK_HOLE)."""
    out: list[Extent] = []
    while offset < end:
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            data = end  # only a hole up to the end of the file
        if data > offset:
            out.append((offset, min(data, end) - offset, True))
            offset = min(data, end)
            if offset >= end:
                break
        hole = min(os.lseek(fd, offset, os.SEEK_HOLE), end)
        out.append((offset, hole - offset, False))
        offset = hole
    return out


class StreamEndpoint(LocalEndpoint):
    """stdin, stdout, a pipe or a character device: strictly in order."""

    sequential = True
    zero_is_cheap = False

    def __init__(self, label: str, fd: int, writing: bool, owned: bool = True) -> None:
        super().__init__(label, fd, owned)
        self.size = NULL_SIZE if writing else None
        self.position = 0

    def facts(self) -> Facts:
        return Facts("stream")

    def _check_position(self, offset: int) -> None:
        if offset != self.position:
            raise CopyError(self.label, f"a stream cannot seek (at {self.position}, asked {offset})")

    def read(self, conn: int, view: memoryview, offset: int, done: Done) -> None:
        self._check_position(offset)
        n: int = self._call(read_full, self.fd, view)
        self.position += n
        done(n, None)

    def write(self, conn: int, view: memoryview, offset: int, done: Done) -> None:
        self._check_position(offset)
        self._call(write_full, self.fd, view)
        self.position += len(view)
        done(len(view), None)

    def zero(self, conn: int, count: int, offset: int, allocate: bool, done: Done) -> None:
        self.write_zeroes(conn, count, offset, done)


def open_local(spec: Spec, writing: bool) -> LocalEndpoint:
    """Open ``-`` or a path as the right kind of local endpoint."""
    if spec.kind == "stdio":
        return StreamEndpoint("stdout" if writing else "stdin", 1 if writing else 0, writing,
                              owned=False)
    flags = (os.O_WRONLY | os.O_CREAT) if writing else os.O_RDONLY
    try:
        fd = os.open(spec.text, flags | os.O_CLOEXEC, 0o644)
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise CopyError(spec.text, exc.strerror or exc) from None
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return FileEndpoint(spec.text, fd, stat.S_ISBLK(mode))
    return StreamEndpoint(spec.text, fd, writing)
