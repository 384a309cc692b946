"""file: serve a file or a block device, or every file of a directory.

    pynbd serve file disk.img
    pynbd serve file file=/dev/sdb
    pynbd serve file disk.img fadvise=sequential cache=none
    pynbd serve file dir=/srv/images          # export "a.img" is /srv/images/a.img

Parameters (give exactly one of file= and dir=)
    file=PATH          a regular file or a block device (the magic parameter:
                       ``pynbd serve file disk.img``). The export name the
                       client asks for is ignored.
    dir=DIR            every regular file or block device directly inside DIR
    directory=DIR      is an export named after it; NBD_OPT_LIST lists them
                       (``nbdinfo --list``) in directory order, as nbdkit. Names with ``/``, ``.``/``..`` or
                       a symbolic link that resolves outside DIR are refused as
                       unknown exports, and so is the default export "".
    cache=default      leave the kernel's page cache alone (the default)
    cache=none         keep served data out of the page cache: pages read are
                       dropped (posix_fadvise DONTNEED) after each read; pages
                       written are queued for writeback at once and dropped a
                       few writes later, and all of them on flush
    fadvise=normal     the access pattern hinted to the kernel at open
    fadvise=random     (posix_fadvise): ``random`` turns read-ahead off,
    fadvise=sequential ``sequential`` doubles it; ``normal`` is the default

Behaviour
    - Reads and writes go straight between the file and the request buffer
      (preadv/pwritev), without copies.
    - A file the server may not write (no write permission, read-only file
      system) is served read-only without being asked; ``-r`` opens every
      file read-only.
    - Sparse files stay sparse. Trim punches a hole. Write-zeroes punches a
      hole when the client allows it, and otherwise uses fallocate's
      ZERO_RANGE (or punch + allocate), writing zero buffers only when the
      file system can do none of these; a client asking for a fast zero then
      gets ENOTSUP instead. Block devices use fallocate where the kernel
      supports it, else the BLKZEROOUT and BLKDISCARD ioctls. Errors that
      say "not supported here" (EOPNOTSUPP, ENOSYS, ...) only make it try
      the next way; any other error (EIO, ENOSPC) is the client's answer.
      (All of this lives in ``pynbd.backend.linux``.)
    - Extents come from SEEK_DATA/SEEK_HOLE: holes are reported as holes that
      read as zeroes, so ``nbdinfo --map`` and ``nbdcopy`` see the sparseness.
    - Flush, and any request with FUA, runs fdatasync. Cache requests ask the
      kernel to read ahead (posix_fadvise WILLNEED).
    - Every client gets its own file descriptor and sees the others' writes
      at once, so multi-conn is advertised.
    - Each connection's requests are served in order on that connection's
      own thread, in batches (the plugin declares ``short_requests = True``): for
      data in the page cache this is several times faster than handing each
      request to a worker thread. Clients that want disk parallelism open
      several connections (``nbdcopy --connections``, fio ``numjobs``).

Limits
    The size is read when a client connects; a file that grows or shrinks
    while served keeps its old size for connected clients. Linux only
    (fallocate, SEEK_DATA, block-device ioctls).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator

from ..backend import (
    CACHE_NATIVE,
    FLAG_FAST_ZERO,
    FLAG_FUA,
    FLAG_MAY_TRIM,
    FLAG_REQ_ONE,
    FUA_NATIVE,
    ConfigError,
    Connection,
    Export,
    Extent,
    OpenContext,
    Param,
    Plugin,
    io_error,
)
from ..backend.linux import (
    ACCESS_PATTERNS,
    WriteBehind,
    Zeroer,
    advise_access,
    drop_cache,
    is_rotational,
    logical_sector_size,
    will_need,
    write_zeroes,
)

# errno values of open(O_RDWR) that mean "serve it read-only instead".
_READ_ONLY_ERRORS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})

# cache=none: how many written ranges wait for writeback before they are
# evicted (nbdkit's and nbdcopy's window).
_WRITE_BEHIND_RANGES = 8


class FileConnection(Connection):
    """One client's open file descriptor on a file or block device."""

    def __init__(self, fd: int, writable: bool, cache_none: bool = False,
                 fadvise: str = "normal") -> None:
        self.fd = fd
        self.writable = writable
        st = os.fstat(fd)
        self.block_device = stat.S_ISBLK(st.st_mode)
        self.size = os.lseek(fd, 0, os.SEEK_END) if self.block_device else st.st_size
        self.sector = logical_sector_size(fd) if self.block_device else 1
        self.rotational = self.block_device and is_rotational(fd)
        self.seekable_holes = _probe_seek_data(fd)
        self.evictor = WriteBehind(fd, max_ranges=_WRITE_BEHIND_RANGES) if cache_none else None
        # The ways to zero without writing; those the kernel refused once are
        # not tried again on this fd.
        self.zeroer = Zeroer(fd, self.block_device, self.sector)
        advise_access(fd, fadvise)

    # ---------------------------------------------------------- what it can do
    def get_size(self) -> int:
        return self.size

    def can_write(self) -> bool:
        return self.writable

    def can_flush(self) -> bool:
        return True

    def can_trim(self) -> bool:
        return True

    def can_zero(self) -> bool:
        return True

    def can_fast_zero(self) -> bool:
        return True

    def can_fua(self) -> int:
        return FUA_NATIVE

    def can_multi_conn(self) -> bool:
        return True

    def can_cache(self) -> int:
        return CACHE_NATIVE

    def can_extents(self) -> bool:
        return self.seekable_holes

    def is_rotational(self) -> bool:
        return self.rotational

    # ------------------------------------------------------------------ data
    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        length = len(buf)
        done = os.preadv(self.fd, (buf,), offset)
        while done < length:
            got = os.preadv(self.fd, (buf[done:],), offset + done)
            if got == 0:
                raise io_error(errno.EIO, f"pread at {offset + done}: unexpected end of file")
            done += got
        if self.evictor is not None:
            drop_cache(self.fd, offset, length)

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        length = len(buf)
        done = os.pwritev(self.fd, (buf,), offset)
        while done < length:
            wrote = os.pwritev(self.fd, (buf[done:],), offset + done)
            if wrote == 0:
                raise io_error(errno.EIO, f"pwrite at {offset + done}: nothing was written")
            done += wrote
        self._written(offset, length, flags)

    def zero(self, count: int, offset: int, flags: int) -> None:
        if not self.zeroer.zero(offset, count, may_punch=bool(flags & FLAG_MAY_TRIM),
                                fast_only=bool(flags & FLAG_FAST_ZERO)):
            if flags & FLAG_FAST_ZERO:
                raise io_error(errno.ENOTSUP, "file: no fast way to zero this range")
            write_zeroes(self.fd, offset, count)
        self._written(offset, count, flags)

    def trim(self, count: int, offset: int, flags: int) -> None:
        self.zeroer.discard(offset, count)
        self._written(offset, count, flags)

    def flush(self, flags: int) -> None:
        os.fdatasync(self.fd)
        if self.evictor is not None:
            self.evictor.drain()

    def cache(self, count: int, offset: int, flags: int) -> None:
        will_need(self.fd, offset, count)

    def extents(self, count: int, offset: int, flags: int) -> Iterator[Extent]:
        end = offset + count
        pos = offset
        while pos < end:
            data = min(self._seek(pos, os.SEEK_DATA, end), end)
            if data > pos:
                yield Extent(pos, data - pos, hole=True, zero=True)
            else:
                data = min(self._seek(pos, os.SEEK_HOLE, end), end)
                if data == pos:
                    continue  # the file changed between the two seeks: look again
                yield Extent(pos, data - pos)
            pos = data
            if flags & FLAG_REQ_ONE:
                return

    def close(self) -> None:
        if self.evictor is not None:
            self.evictor.drain()
        os.close(self.fd)

    # --------------------------------------------------------------- helpers
    def _written(self, offset: int, length: int, flags: int) -> None:
        """After a change: FUA makes it durable, cache=none evicts it."""
        if flags & FLAG_FUA:
            os.fdatasync(self.fd)
        if self.evictor is not None:
            self.evictor.written(offset, length)

    def _seek(self, pos: int, whence: int, end: int) -> int:
        """lseek for SEEK_DATA/SEEK_HOLE; past the file's end means ``end``."""
        try:
            return os.lseek(self.fd, pos, whence)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return end
            raise


def _probe_seek_data(fd: int) -> bool:
    """Whether SEEK_DATA/SEEK_HOLE work on this file."""
    try:
        os.lseek(fd, 0, os.SEEK_DATA)
    except OSError as exc:
        return exc.errno == errno.ENXIO
    return True


def open_file(path: str, readonly: bool) -> tuple[int, bool]:
    """Open ``path`` for serving: (fd, writable). Falls back to read-only."""
    flags = os.O_CLOEXEC | os.O_NOCTTY
    if not readonly:
        try:
            return os.open(path, flags | os.O_RDWR), True
        except OSError as exc:
            if exc.errno not in _READ_ONLY_ERRORS:
                raise
    return os.open(path, flags | os.O_RDONLY), False


def _servable(mode: int) -> bool:
    return stat.S_ISREG(mode) or stat.S_ISBLK(mode)


class FilePlugin(Plugin):
    short_requests = True
    name = "file"
    # Set from params by the backend.
    file: str | None
    dir: str | None
    directory: str | None
    cache: str
    fadvise: str
    magic_param = "file"
    params = (
        Param("file", "path", "the file or block device to serve"),
        Param("dir", "path", "serve every file in this directory, by export name"),
        Param("directory", "path", "the same as dir= (nbdkit's name)"),
        Param("cache", "str", "page cache use", default="default", choices=("default", "none")),
        Param("fadvise", "str", "access pattern hint", default="normal",
              choices=tuple(ACCESS_PATTERNS)),
    )

    def config_complete(self) -> None:
        if self.directory is not None:
            if self.dir is not None:
                raise ConfigError("file: give dir= or directory=, not both")
            self.dir = self.directory
        if (self.file is None) == (self.dir is None):
            raise ConfigError("file: give exactly one of file=PATH and dir=DIR")
        if self.file is not None:
            self._check_file(self.file)
        elif self.dir is not None:
            self.root = self._check_dir(self.dir)

    @staticmethod
    def _check_file(path: str) -> None:
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise ConfigError(f"file: file: {path}: {exc.strerror}") from None
        if not _servable(mode):
            raise ConfigError(f"file: file: {path}: not a regular file or block device")

    @staticmethod
    def _check_dir(path: str) -> str:
        if not os.path.isdir(path):
            raise ConfigError(f"file: dir: {path}: not a directory")
        return os.path.realpath(path)

    # ------------------------------------------------------------- dir mode
    def list_exports(self, ctx: OpenContext) -> list[Export]:
        if self.dir is None:
            return [Export("")]
        try:
            names = os.listdir(self.root)  # directory order, as nbdkit's readdir
        except OSError as exc:
            raise io_error(exc.errno or errno.EIO, f"file: dir: {self.root}") from None
        return [Export(name) for name in names if self._resolve(name) is not None]

    def _resolve(self, name: str) -> tuple[str, os.stat_result] | None:
        """The real path and stat of export ``name`` if it is one, else None."""
        if not name or name in (".", "..") or "/" in name or "\0" in name:
            return None
        real = os.path.realpath(os.path.join(self.root, name))
        if os.path.dirname(real) != self.root:
            return None
        try:
            st = os.stat(real)
        except OSError:
            return None
        return (real, st) if _servable(st.st_mode) else None

    def _open_export(self, name: str, readonly: bool) -> tuple[int, bool]:
        found = self._resolve(name)
        if found is None:
            raise LookupError(f"file: no export named {name!r} in {self.root}")
        real, st = found
        fd, writable = open_file(real, readonly)
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            os.close(fd)
            raise LookupError(f"file: export {name!r} changed while being opened")
        return fd, writable

    # ----------------------------------------------------------------- open
    def open(self, ctx: OpenContext) -> Connection:
        if self.file is not None:
            fd, writable = open_file(self.file, ctx.readonly)
        else:
            fd, writable = self._open_export(ctx.export_name, ctx.readonly)
        try:
            return FileConnection(fd, writable, self.cache == "none", self.fadvise)
        except BaseException:
            os.close(fd)
            raise
