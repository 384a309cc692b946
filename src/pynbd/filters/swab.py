"""swab: swap the bytes of each 16-, 32- or 64-bit word of the disk below.

    pynbd serve --filter=swab file disk.img                # 0 1 2 3 → 1 0 3 2
    pynbd serve --filter=swab file disk.img swab-bits=32   # 0 1 2 3 → 3 2 1 0
    pynbd serve --filter=swab pattern 1M swab-bits=64      # a little-endian pattern

Parameters
    swab-bits=8|16|32|64   the word size (default 16, as on the Atari Falcon's
                           byte-swapped IDE wiring; 8 swaps nothing)

The size is rounded down to a whole word and every request must be aligned
to a word, or it fails with EINVAL (put the blocksize filter in front for
byte-level access; the minimum block size advertised is one word).
"""

from __future__ import annotations

import errno
from array import array
from collections.abc import Iterable

from ..backend import (
    ConfigError,
    Connection,
    Extent,
    Filter,
    FilterConnection,
    OpenContext,
    Param,
    align_extents,
    io_error,
)

# array typecodes of each word size (checked at import: 'I' and 'Q' are 4 and 8 bytes on Linux).
_TYPECODES = {16: "H", 32: "I", 64: "Q"}
assert all(array(code).itemsize * 8 == bits for bits, code in _TYPECODES.items())


def swap_into(dest: memoryview, src: memoryview, typecode: str) -> None:
    """dest[:] = src with the bytes of each word reversed (dest may be src)."""
    words = array(typecode)
    words.frombytes(src)
    words.byteswap()
    dest[:] = memoryview(words).cast("B")


class SwabConnection(FilterConnection["SwabFilter"]):
    def __init__(self, next: Connection, filter: SwabFilter, ctx: OpenContext) -> None:
        super().__init__(next, filter, ctx)
        self.word = filter.swab_bits // 8
        self.typecode = _TYPECODES.get(filter.swab_bits, "")

    def get_size(self) -> int:
        return self.next.get_size() // self.word * self.word

    def block_size(self) -> tuple[int, int, int]:
        minimum, preferred, maximum = self.next.block_size()
        if minimum == 0:
            return self.word, 512, 0xFFFFFFFF
        return max(minimum, self.word), preferred, maximum

    def _aligned(self, count: int, offset: int) -> None:
        if (count | offset) % self.word:
            raise io_error(errno.EINVAL, "swab: requests to this filter must be aligned")

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self._aligned(len(buf), offset)
        self.next.pread(buf, offset, flags)
        if self.typecode:
            swap_into(buf, buf, self.typecode)

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self._aligned(len(buf), offset)
        if self.typecode:
            swapped = memoryview(bytearray(len(buf)))
            swap_into(swapped, buf, self.typecode)
            buf = swapped
        self.next.pwrite(buf, offset, flags)

    def zero(self, count: int, offset: int, flags: int) -> None:
        self._aligned(count, offset)
        self.next.zero(count, offset, flags)

    def trim(self, count: int, offset: int, flags: int) -> None:
        self._aligned(count, offset)
        self.next.trim(count, offset, flags)

    def cache(self, count: int, offset: int, flags: int) -> None:
        self._aligned(count, offset)
        self.next.cache(count, offset, flags)

    def extents(self, count: int, offset: int, flags: int) -> Iterable[Extent]:
        self._aligned(count, offset)
        return align_extents(self.next.extents(count, offset, flags), offset, count, self.word)


class SwabFilter(Filter):
    short_requests = True
    name = "swab"
    params = (Param("swab-bits", "int", "the word size whose bytes are swapped", default=16),)
    swab_bits: int
    connection = SwabConnection

    def config_complete(self) -> None:
        if self.swab_bits not in (8, 16, 32, 64):
            raise ConfigError(f"swab: swab-bits={self.swab_bits}: must be 8, 16, 32 or 64")
