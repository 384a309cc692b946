"""Local endpoints: regular files, block devices and streams.

- A regular file or block device is read and written with ``preadv`` /
  ``pwritev`` called straight from the copy's thread (a page-cache copy
  costs less than handing it to another thread) while the requests of the
  NBD end are in flight. A source file's extents come from ``SEEK_DATA`` /
  ``SEEK_HOLE``.
- Written ranges of a regular file are pushed to the disk as the copy goes
  (``sync_file_range``) and dropped from the page cache once a connection
  has 16 MiB more in flight, as nbdcopy does: the copy does not fill memory
  with dirty pages that the kernel would otherwise throttle or reclaim in
  the middle of it. A write-back error (EIO) found on the way fails the
  copy; it is not left for the final fsync, which would no longer see it.
- A regular-file destination is truncated and then extended to the source's
  size, as nbdcopy does, so it reads as zeroes and holes need no writing
  (a file copied onto itself is left alone; with ``--dirty-bitmap`` it is
  updated in place, only extended if it is shorter). Zeroing tries what nbdcopy
  tries, in its order: a hole (``fallocate`` PUNCH_HOLE, not with
  ``--allocated``), ZERO_RANGE, then a hole allocated again (files) or the
  BLKZEROOUT ioctl (block devices, whole sectors). A way the file system
  does not support (EOPNOTSUPP, ENOSYS, ...) is not tried again; where none
  works, zero bytes are written. Other errors (EIO, ENOSPC) fail the copy.
  (The Linux calls live in ``pynbd.backend.linux``.)
- ``-``, pipes, character devices and sockets are streams: read or written in
  order, one request at a time, and a stream source's length is wherever it
  ends.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import Any

from ...backend.linux import (
    WriteBehind,
    Zeroer,
    is_not_supported,
    logical_sector_size,
    write_zeroes,
)
from .endpoint import NULL_SIZE, CopyError, Done, Endpoint, Extent, Facts
from .options import Spec

EVICT_BEHIND = 16 * 1024 * 1024  # bytes written per connection before they leave the cache


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
        sector = self._call(logical_sector_size, fd) if block_device else 1
        self._zeroer = Zeroer(fd, block_device, sector)
        # Per connection (lane), set for a regular file being written.
        self._write_behind: dict[int, WriteBehind] | None = None

    def facts(self) -> Facts:
        method = "fallocate/BLKZEROOUT" if self.block_device else "fallocate"
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
        self._written(conn, offset, len(view))
        done(len(view), None)

    def zero(self, conn: int, count: int, offset: int, allocate: bool, done: Done) -> None:
        if not self._call(self._zeroer.zero, offset, count, not allocate):
            self._call(write_zeroes, self.fd, offset, count)
            self._written(conn, offset, count)
        done(count, None)

    def _written(self, conn: int, offset: int, count: int) -> None:
        """Start writing a range back; evict this connection's older ones."""
        if self._write_behind is None:
            return
        behind = self._write_behind.get(conn)
        if behind is None:
            behind = self._write_behind.setdefault(conn, WriteBehind(self.fd, max_bytes=EVICT_BEHIND))
        self._call(behind.written, offset, count)

    def extents(self, conn: int, count: int, offset: int) -> list[Extent] | None:
        if self.block_device:
            return None
        try:
            return file_extents(self.fd, offset, offset + count)
        except OSError as exc:
            if is_not_supported(exc):
                return None
            raise CopyError(self.label, exc.strerror or exc) from None

    def prepare(self, length: int | None, source: Endpoint, keep: bool = False) -> None:
        if self.block_device:
            return
        self._write_behind = {}
        if isinstance(source, FileEndpoint) and source.identity() == self.identity():
            return  # a file copied onto itself: truncating would destroy the source
        if keep:
            if length is not None and (self.size or 0) < length:
                self._call(os.ftruncate, self.fd, length)  # grown, never cut: it is updated
                self.size = length
            return
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
