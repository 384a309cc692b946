"""xz: serve the uncompressed contents of an xz file, with random access by block.

    pynbd serve --filter=xz file disk.img.xz
    pynbd serve --filter=xz file disk.img.xz xz-max-depth=64
    pynbd serve --filter=tar --filter=xz file images.tar.xz tar-entry=disk.img

Parameters (nbdkit's)
    xz-max-block=SIZE   refuse files with an uncompressed block larger than
                        this (default 512M): a block is decoded whole
    xz-max-depth=N      how many decoded blocks to keep in memory (default 8)
                        when $TMPDIR is full (see below), least recently
                        used dropped first; shared by all clients (nbdkit
                        keeps N per connection)

xz files are seekable only at block boundaries, and ``xz`` writes a single
block unless told otherwise. Make images with small blocks for random
access (the size penalty is small):

    xz --block-size=16MiB disk.img          (or -T0: threads cut blocks too)
    xz --list disk.img.xz                    (the Blocks column)

The first read of a block decodes it whole, its check verified, before
any of it is served (so a damaged file never serves wrong bytes), into a
sparse, unlinked temporary file in ``$TMPDIR`` shared by all clients; every
later read of the block is a plain ``pread`` of that file, and each block is
decoded at most once. Blocks decode in parallel on the server's threads
(nbdkit's xz filter serializes a connection's requests). A file with one
block works, with a warning: the first read decodes all of it. If
``$TMPDIR`` cannot hold the decoded blocks (ENOSPC), one warning is logged
and blocks not kept yet are decoded again whenever a read misses the
``xz-max-depth`` blocks kept in memory. Several streams (``cat a.xz b.xz``) and stream padding work.
The filter is read-only, except for modifiable images made by ``pynbd xz
create IN OUT.xz --stored=START-END,...`` (standard xz files whose stored
ranges are uncompressed LZMA2 chunks, 64 KiB per block, CRC-32 checks; see
``pydoc pynbd.formats.xz_stored``): when the plugin is writable, writes
wholly inside those ranges go into the file in place and each block's check
is rewritten (the index holds only sizes and does not change); other writes
fail with EPERM and a log line naming the stored ranges. If the server dies
between a data write and its check update, the next writable open finds
the stale checks (it reads the stored ranges) and rewrites them, with a
warning; ``pynbd xz repair OUT.xz`` does the same offline. Either way ``xz
-t`` passes again.

At open the filter reads the stream footer and index from
the end of the file (see ``pydoc pynbd.formats.xz``); a file that is not xz,
is truncated or has a damaged index refuses the open with one line saying
why, and a damaged block fails the reads of that block with EIO (liblzma
checks each block's CRC-32/CRC-64/SHA-256) and is logged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ..backend import (
    FLAG_FUA,
    ConfigError,
    Connection,
    Filter,
    OpenContext,
    Param,
)
from ..formats.xz import Block, BlockDecoder, ReadFn, XzError, XzIndex, read_index
from ..formats.xz_stored import StoredXz, check_of, check_offset, data_offset, stale_blocks
from .gzip import DecodedCache, DecodedConnection, Images, SpillCache, Step, reader_of, refuse_write

log = logging.getLogger("pynbd.filters.xz")


class XzImage:
    def __init__(self, index: XzIndex, depth: int, stored: StoredXz | None) -> None:
        self.index = index
        self.blocks = SpillCache("xz", index.size, len(index.blocks), DecodedCache("xz", depth, whole=True))
        self.stored = stored
        self.is_stored = set(stored.blocks if stored else ())
        self.write_lock = threading.Lock()


class XzConnection(DecodedConnection["XzFilter"]):
    def __init__(self, next: Connection, filter: XzFilter, ctx: OpenContext) -> None:
        super().__init__(next, filter, ctx)
        self.image = filter.images.get(next, ctx)
        self.read_file = reader_of(next, next.get_size())

    def stored(self) -> object | None:
        return self.image.stored

    def get_size(self) -> int:
        return self.image.index.size

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        index = self.image.index
        i = index.find(offset)
        pos = 0
        while pos < len(buf):
            block = index.blocks[i]
            inner = offset + pos - block.out
            take = min(len(buf) - pos, block.size - inner)
            if i in self.image.is_stored:  # the bytes are in the file as they are
                self.next.pread(buf[pos:pos + take], data_offset(block) + inner, 0)
            else:
                self.image.blocks.copy(i, block.out, block.size, self._decoder(block), buf[pos:pos + take],
                                       inner)
            pos += take
            i += 1

    def _decoder(self, block: Block) -> Callable[[], Step]:
        def start() -> Step:
            return BlockDecoder(self.read_file, block).step
        return start

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        stored = self.image.stored
        pieces = None if stored is None else stored.pieces(offset, len(buf))
        if stored is None or pieces is None:
            raise refuse_write("xz", len(buf), offset, "none" if stored is None else stored.ranges())
        fua = flags & FLAG_FUA
        with self.image.write_lock:
            pos = 0
            for block, file_offset, take in pieces:
                piece = buf[pos:pos + take]
                self.next.pwrite(piece, file_offset, fua)
                if take == block.size:
                    check = check_of(piece)
                else:
                    data = bytearray(block.size)
                    self.next.pread(memoryview(data), data_offset(block), 0)
                    check = check_of(data)
                self.next.pwrite(memoryview(check), check_offset(block), fua)
                pos += take

    def zero(self, count: int, offset: int, flags: int) -> None:
        Connection.zero(self, count, offset, flags)


class XzFilter(Filter):
    name = "xz"
    params = (
        Param("xz-max-block", "size", "largest uncompressed block accepted", default=512 << 20),
        Param("xz-max-depth", "int", "decoded blocks kept (LRU, shared by all clients)", default=8),
    )
    xz_max_block: int
    xz_max_depth: int
    images: Images[XzImage]
    connection = XzConnection

    def config_complete(self) -> None:
        if self.xz_max_depth < 1:
            raise ConfigError(f"xz: xz-max-depth={self.xz_max_depth}: must be at least 1")
        self.images = Images(self.name, self.open_image)

    def open_image(self, below: Connection, file_size: int) -> XzImage:
        read = reader_of(below, file_size)
        index = read_index(read, file_size)
        largest = index.largest_block
        if largest > self.xz_max_block:
            raise XzError(f"the file has a block of {largest} bytes, larger than xz-max-block="
                          f"{self.xz_max_block} (recompress it with xz --block-size=16MiB)")
        if len(index.blocks) == 1:
            log.warning("xz: the file has only one block: random access will be slow "
                        "(recompress it with xz --block-size=16MiB)")
        stored = StoredXz(read, index)
        if stored.blocks:
            repair_checks(below, read, stored)
        return XzImage(index, self.xz_max_depth, stored if stored.blocks else None)


def repair_checks(below: Connection, read: ReadFn, stored: StoredXz) -> None:
    """Rewrite the checks of stored blocks that do not match their data (a write was
    interrupted before its check was updated), or warn if the file is read-only."""
    stale = stale_blocks(read, stored)
    if not stale:
        return
    if not below.can_write():
        log.warning("xz: %d stored block check(s) do not match their data (a write was interrupted); "
                    "serving the data anyway; 'pynbd xz repair FILE' fixes them", len(stale))
        return
    for block in stale:
        below.pwrite(memoryview(check_of(read(data_offset(block), block.size))), check_offset(block), 0)
    if below.can_flush():
        below.flush(0)
    log.warning("xz: %d stored block check(s) did not match their data (a write was interrupted); "
                "rewrote them", len(stale))
