"""partition: serve one partition of a partitioned disk.

    pynbd serve --filter=partition file disk.img partition=1
    qemu-img create -f raw disk.img 64M && sfdisk disk.img <<< $',16M\\n,\\n'
    pynbd serve -U - --filter=partition file disk.img partition=2 --run 'nbdinfo "$uri"'

Parameters
    partition=N   the partition to serve, counting from 1 (required). On an
                  MBR disk 1-4 are the primary partitions and 5 onward the
                  logical partitions inside the extended partition; on a GPT
                  disk N is entry N of the partition array.

The table is read when each client connects (through the layers below, so
``--filter=partition --filter=xz`` finds the table inside the decompressed
disk while ``--filter=xz --filter=partition`` would decompress one
partition). Every request is then shifted into the partition and extents
are shifted back. A missing table, a partition number that does not exist or
a partition that runs past the end of the disk refuses the connection with a
one-line message, e.g. ``partition: MBR partition 7 not found``.

Works like ``qemu-nbd -P N`` and nbdkit's partition filter. Sectors are 512
bytes.
"""

from __future__ import annotations

import errno
import logging

from ..backend import ConfigError, Connection, Filter, OpenContext, Param, io_error
from ..formats.partition_table import PartitionError, find_partition
from .offset import SliceConnection

log = logging.getLogger("pynbd.filters.partition")


class PartitionConnection(SliceConnection["PartitionFilter"]):
    """The slice of the disk below that the partition table gives."""

    def __init__(self, next: Connection, filter: PartitionFilter, ctx: OpenContext) -> None:
        size = next.get_size()

        def read(offset: int, count: int) -> bytes:
            buf = bytearray(count)
            next.pread(memoryview(buf), offset, 0)
            return bytes(buf)

        try:
            part = find_partition(read, size, filter.partition)
        except PartitionError as exc:
            log.error("partition: %s", exc)
            raise io_error(errno.ENOENT, f"partition: {exc}") from None
        super().__init__(next, filter, ctx, part.start, part.length)


class PartitionFilter(Filter):
    short_requests = True
    name = "partition"
    params = (Param("partition", "int", "partition number, counting from 1", required=True),)
    partition: int
    connection = PartitionConnection

    def config_complete(self) -> None:
        if self.partition < 1:
            raise ConfigError(f"partition: partition={self.partition}: partitions count from 1")
