"""xz: serve the uncompressed contents of an xz file, with random access by block.

    pynbd serve --filter=xz file disk.img.xz
    pynbd serve --filter=xz file disk.img.xz xz-max-depth=64
    pynbd serve --filter=tar --filter=xz file images.tar.xz tar-entry=disk.img

Parameters (nbdkit's)
    xz-max-block=SIZE   refuse files with an uncompressed block larger than
                        this (default 512M): a block is decoded whole
    xz-max-depth=N      how many decoded blocks to keep (default 8), least
                        recently used dropped first; shared by all clients
                        (nbdkit keeps N per connection)

xz files are seekable only at block boundaries, and ``xz`` writes a single
block unless told otherwise. Make images with small blocks for random
access (the size penalty is small):

    xz --block-size=16MiB disk.img          (or -T0: threads cut blocks too)
    xz --list disk.img.xz                    (the Blocks column)

A read decodes the block(s) it falls in, unless they are cached: the
whole block, its check verified, before any of it is served (so a damaged
file never serves wrong bytes); blocks decode in parallel on the server's
threads (nbdkit's xz filter serializes a connection's requests). A file with
one block works, with a warning: every read outside the cached block decodes
from the start. Several streams (``cat a.xz b.xz``) and stream padding work.
The filter is read-only. At open it reads the stream footer and index from
the end of the file (see ``pydoc pynbd.formats.xz``); a file that is not xz,
is truncated or has a damaged index refuses the open with one line saying
why, and a damaged block fails the reads of that block with EIO (liblzma
checks each block's CRC-32/CRC-64/SHA-256) and is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..backend import (
    CACHE_EMULATE,
    ConfigError,
    Connection,
    Filter,
    FilterConnection,
    OpenContext,
    Param,
)
from ..formats.xz import Block, BlockDecoder, XzError, XzIndex, read_index
from .gzip import DecodedCache, Images, Step, reader_of

log = logging.getLogger("pynbd.filters.xz")


class XzImage:
    def __init__(self, index: XzIndex, depth: int) -> None:
        self.index = index
        self.cache = DecodedCache("xz", depth, whole=True)


class XzConnection(FilterConnection["XzFilter"]):
    def __init__(self, next: Connection, filter: XzFilter, ctx: OpenContext) -> None:
        super().__init__(next, filter, ctx)
        self.image = filter.images.get(next, ctx)
        self.read_file = reader_of(next, next.get_size())

    def get_size(self) -> int:
        return self.image.index.size

    def block_size(self) -> tuple[int, int, int]:
        return (0, 0, 0)

    def can_write(self) -> bool:
        return False

    def can_extents(self) -> bool:
        return False

    def can_cache(self) -> int:
        return CACHE_EMULATE

    def can_multi_conn(self) -> bool:
        return True

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        index = self.image.index
        i = index.find(offset)
        pos = 0
        while pos < len(buf):
            block = index.blocks[i]
            inner = offset + pos - block.out
            take = min(len(buf) - pos, block.size - inner)
            self.image.cache.copy(i, block.size, self._decoder(block), buf[pos:pos + take], inner)
            pos += take
            i += 1

    def _decoder(self, block: Block) -> Callable[[], Step]:
        def start() -> Step:
            return BlockDecoder(self.read_file, block).step
        return start


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
        index = read_index(reader_of(below, file_size), file_size)
        largest = index.largest_block
        if largest > self.xz_max_block:
            raise XzError(f"the file has a block of {largest} bytes, larger than xz-max-block="
                          f"{self.xz_max_block} (recompress it with xz --block-size=16MiB)")
        if len(index.blocks) == 1:
            log.warning("xz: the file has only one block: random access will be slow "
                        "(recompress it with xz --block-size=16MiB)")
        return XzImage(index, self.xz_max_depth)
