"""qcow2: serve the disk inside a qcow2 image (read-only), as nbdkit's qcow2dec filter.

    pynbd serve --filter=qcow2 file disk.qcow2
    pynbd serve -U - --filter=qcow2 file disk.qcow2 --run 'nbdcopy "$uri" disk.raw'
    pynbd serve --filter=qcow2 --filter=tar file vm.ova tar-entry=disk.qcow2

    pynbd serve --filter=qcow2 file top.qcow2 follow-backing=true backing-dir=/images

Parameters
    follow-backing=BOOL  follow the image's backing file (raw or qcow2, and
                         that one's backing file in turn, up to 16 deep),
                         opened read-only by path (default false: refuse).
                         Only for images you trust: the path is the image's.
    backing-dir=DIR      where a relative backing file name is looked for
                         (default: the server's working directory; the
                         filter does not know where the layer below got
                         the qcow2 file from)

The layer below holds the qcow2 file; this layer serves the
virtual disk it describes: its virtual size, its bytes and its extents (from
the L1/L2 tables: unallocated and zero clusters are holes that read as
zeroes, as qemu-nbd reports them; nbdkit's qcow2dec filter reports none).

What is understood
    qcow2 versions 2 and 3 (compat=0.10 and 1.1), any cluster size from
    512 bytes to 2 MiB, zlib (deflate) and zstd compressed clusters, the v3
    zero flag: images from ``qemu-img convert -O qcow2 [-c] [-o
    compression_type=zstd]`` and ``qemu-img create``. L2 tables and
    decompressed clusters are kept in LRU caches (256 tables and 64 clusters
    per connection). The export is read-only; put ``--filter=cow`` on top to
    write (temporarily).

What is refused (the connection fails with one line in the log saying why)
    encryption (AES or LUKS), external data files, backing files unless
    follow-backing=true (the message names the backing file; a backing
    format other than raw or qcow2 is refused too),
    internal snapshots (listed by id and name), extended L2 entries and any
    incompatible feature this filter does not know. A file that is not
    qcow2 (bad magic or version), a truncated file or an L1 table pointing
    past its end also refuses the connection; an L2 table or compressed
    cluster found corrupt while serving fails that read with EIO and a log
    line.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterator

from ..backend import (
    CACHE_EMULATE,
    Connection,
    Extent,
    Filter,
    FilterConnection,
    OpenContext,
    Param,
    fill_zero,
    io_error,
)
from ..formats.qcow2 import Qcow2Error, Qcow2Reader, ReadIntoFn, is_qcow2

log = logging.getLogger("pynbd.filters.qcow2")


MAX_BACKING_DEPTH = 16


class BackingChain:
    """The files a qcow2 image's backing chain opens (read-only, by path), closed together."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.fds: list[int] = []

    def opener(self, depth: int = 1) -> Callable[[str, str | None], ReadIntoFn]:
        """``open_backing`` for a Qcow2Reader ``depth`` links down the chain."""
        def open_backing(name: str, fmt: str | None) -> ReadIntoFn:
            if depth > MAX_BACKING_DEPTH:
                raise Qcow2Error(f"qcow2: backing chain deeper than {MAX_BACKING_DEPTH} at {name!r}")
            if fmt not in (None, "raw", "qcow2"):
                raise Qcow2Error(f"qcow2: backing file {name!r} has format {fmt!r}: only raw "
                                 "and qcow2 backing files are followed")
            path = os.path.join(self.directory, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise Qcow2Error(f"qcow2: cannot open backing file {path!r}: "
                                 f"{exc.strerror}") from None
            self.fds.append(fd)
            size = os.fstat(fd).st_size

            def read_file(buf: memoryview, offset: int) -> None:
                inside = max(0, min(len(buf), size - offset))
                done = os.preadv(fd, [buf[:inside]], offset) if inside else 0
                if done < len(buf):
                    fill_zero(buf[done:])

            if fmt == "qcow2" or (fmt is None and is_qcow2(os.pread(fd, 4, 0))):
                return Qcow2Reader(read_file, size, open_backing=self.opener(depth + 1)).pread
            return read_file
        return open_backing

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


class Qcow2Connection(FilterConnection["Qcow2Filter"]):
    def __init__(self, next: Connection, filter: Qcow2Filter, ctx: OpenContext) -> None:
        super().__init__(next, filter, ctx)
        self.chain = BackingChain(filter.backing_dir or os.getcwd())
        try:
            self.image = Qcow2Reader(
                lambda buf, offset: next.pread(buf, offset, 0), next.get_size(),
                open_backing=self.chain.opener() if filter.follow_backing else None)
        except Qcow2Error as exc:  # the server logs it as the reason the open failed
            self.chain.close()
            raise io_error(errno.EINVAL, str(exc)) from None

    def get_size(self) -> int:
        return self.image.size

    def can_write(self) -> bool:
        return False

    def can_zero(self) -> bool:
        return False

    def can_trim(self) -> bool:
        return False

    def can_flush(self) -> bool:
        return False

    def can_fast_zero(self) -> bool:
        return False

    def can_extents(self) -> bool:
        return True

    def can_multi_conn(self) -> bool:
        return True  # read-only: every connection sees the same bytes

    def can_cache(self) -> int:
        return CACHE_EMULATE

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        try:
            self.image.pread(buf, offset)
        except Qcow2Error as exc:
            log.error("%s", exc)
            raise io_error(errno.EIO, str(exc)) from None

    def close(self) -> None:
        self.chain.close()
        super().close()

    def extents(self, count: int, offset: int, flags: int) -> Iterator[Extent]:
        try:
            for start, length, hole, zero in self.image.extents(offset, count):
                yield Extent(start, length, hole, zero)
        except Qcow2Error as exc:
            log.error("%s", exc)
            raise io_error(errno.EIO, str(exc)) from None


class Qcow2Filter(Filter):
    short_requests = True
    name = "qcow2"
    params = (
        Param("follow-backing", "bool", "follow raw/qcow2 backing files by path", default=False),
        Param("backing-dir", "path", "where relative backing file names are looked for"),
    )
    follow_backing: bool
    backing_dir: str | None
    connection = Qcow2Connection
