"""pattern: a read-only disk where every 8-byte word holds its own offset.

    pynbd serve pattern 1G
    pynbd serve pattern size=9223372036854775807

Parameters
    [size=]SIZE   the size of the disk (required); up to 2^63-1

The word at offset N (N a multiple of 8) is N as a 64-bit big-endian
integer, so the disk reads 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 08
... A size that is not a multiple of 8 cuts the last word short. The same
bytes as nbdkit's pattern plugin; useful to check that a filter or client
moved data to the right place (each word says where it came from).

Reads are built 64 KiB at a time from a precomputed table with big-integer
arithmetic, never word by word.
"""

from __future__ import annotations

import array
import sys

from ..backend import Connection, OpenContext, Param, Plugin, ResidentDisk, block_runs

CHUNK = 1 << 16  # bytes per generated chunk; word offsets inside it fit in 16 bits
WORDS = CHUNK // 8


def _low_table() -> int:
    words = array.array("Q", range(0, CHUNK, 8))
    if sys.byteorder == "little":
        words.byteswap()
    return int.from_bytes(words.tobytes(), "big")


_LOW = _low_table()


def pattern_chunk(base: int) -> bytes:
    """The CHUNK bytes at ``base`` (a multiple of CHUNK)."""
    high = ((base >> 16).to_bytes(6, "big") + b"\0\0") * WORDS
    return (int.from_bytes(high, "big") | _LOW).to_bytes(CHUNK, "big")


def fill_pattern(buf: memoryview, offset: int) -> None:
    """Fill ``buf`` with the pattern bytes found at ``offset``."""
    for chunk, inner, take, pos in block_runs(offset, len(buf), CHUNK):
        buf[pos:pos + take] = pattern_chunk(chunk * CHUNK)[inner:inner + take]


class PatternDisk(ResidentDisk):
    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        fill_pattern(buf, offset)


class PatternPlugin(Plugin):
    short_requests = True
    name = "pattern"
    magic_param = "size"
    params = (Param("size", "size", "size of the disk", required=True),)
    size: int

    def open(self, ctx: OpenContext) -> Connection:
        return PatternDisk(self.size)
