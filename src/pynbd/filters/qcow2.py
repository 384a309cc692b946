"""qcow2: serve the disk inside a qcow2 image (read-only), as nbdkit's qcow2dec filter.

    pynbd serve --filter=qcow2 file disk.qcow2
    pynbd serve -U - --filter=qcow2 file disk.qcow2 --run 'nbdcopy "$uri" disk.raw'
    pynbd serve --filter=qcow2 --filter=tar file vm.ova tar-entry=disk.qcow2

No parameters. The layer below holds the qcow2 file; this layer serves the
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
    encryption (AES or LUKS), external data files, backing files (the
    message names the backing file; use ``qemu-img convert`` or qemu-nbd),
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
from collections.abc import Iterator

from ..backend import (
    CACHE_EMULATE,
    Connection,
    Extent,
    Filter,
    FilterConnection,
    OpenContext,
    io_error,
)
from ..formats.qcow2 import Qcow2Error, Qcow2Reader

log = logging.getLogger("pynbd.filters.qcow2")


class Qcow2Connection(FilterConnection["Qcow2Filter"]):
    def __init__(self, next: Connection, filter: Qcow2Filter, ctx: OpenContext) -> None:
        super().__init__(next, filter, ctx)
        try:
            self.image = Qcow2Reader(lambda buf, offset: next.pread(buf, offset, 0),
                                     next.get_size())
        except Qcow2Error as exc:  # the server logs it as the reason the open failed
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
    connection = Qcow2Connection
