"""Modifiable xz files: chosen ranges kept as uncompressed LZMA2 chunks, writable in place.

    from pynbd.formats.xz_stored import create, StoredXz, check_of, check_offset, data_offset

    create(read_in, input_size, write_out, ranges)      # a standard .xz file
    s = StoredXz(read, read_index(read, file_size))     # its stored blocks, found by shape
    s.pieces(offset, count)     # (block, file offset, length) of a range, None if not all stored
    check_of(data)              # a block's check (its data at data_offset(block)),
                                # written at check_offset(block)

The file is ordinary xz (``xz -t``, ``xz -d`` and nbdkit's xz filter read
it), made of several streams, one after another:

- the input between stored ranges is cut into segments of about a MiB (as for
  gzip, ``formats.gzip_stored.plan``), each compressed as its own stream
  (CRC-64 checks), which makes them a random-access index too;
- each stored range is one stream with a CRC-32 check whose blocks each hold
  64 KiB of the range as a single *uncompressed* LZMA2 chunk: a 12-byte block
  header, the chunk's 3-byte header, the bytes as they are, the end marker,
  padding to four bytes and the CRC-32 of the 64 KiB.

Such a block is recognised by its shape alone (CRC-32 check, unpadded size =
size + 20, that block header, an uncompressed chunk of exactly its size), so
nothing else is recorded. A write inside one replaces bytes in place and
rewrites the block's 4-byte check; the index holds only sizes and never
changes. Ranges follow ``formats.gzip_stored.parse_ranges`` (512-byte
alignment, END exclusive).
"""

from __future__ import annotations

import bisect
import lzma
import struct
import zlib
from collections.abc import Callable, Iterator

from .gzip_stored import plan
from .xz import FOOTER_MAGIC, HEADER_MAGIC, Block, ReadFn, XzIndex

WriteFn = Callable[[int, bytes], None]
CHUNK = 65536  # bytes per stored block: one uncompressed LZMA2 chunk
CHECK_CRC32 = b"\x00\x01"  # stream flags
_FILTER = bytes([0x02, 0x00, 0x21, 0x01, 0x08, 0, 0, 0])  # header size, flags, LZMA2, props: 64 KiB dict
BLOCK_HEADER = _FILTER + struct.pack("<I", zlib.crc32(_FILTER))
DATA_AT = len(BLOCK_HEADER) + 3  # the bytes start after the block header and the chunk header


def _vli(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _pad4(n: int) -> int:
    return -n % 4


def _stored_stream(read: ReadFn, start: int, length: int, write: WriteFn, pos: int) -> int:
    """Write the stream of one stored range at ``pos``; returns the position after it."""
    write(pos, HEADER_MAGIC + CHECK_CRC32 + struct.pack("<I", zlib.crc32(CHECK_CRC32)))
    pos += 12
    records = []
    for offset in range(start, start + length, CHUNK):
        data = read(offset, min(CHUNK, start + length - offset))
        n = len(data)
        body = BLOCK_HEADER + b"\x01" + (n - 1).to_bytes(2, "big") + data + b"\x00"
        block = body + bytes(_pad4(len(body))) + struct.pack("<I", zlib.crc32(data))
        write(pos, block)
        pos += len(block)
        records.append(_vli(n + 20) + _vli(n))
    index = b"\x00" + _vli(len(records)) + b"".join(records)
    index += bytes(_pad4(len(index)))
    index += struct.pack("<I", zlib.crc32(index))
    backward = struct.pack("<I", len(index) // 4 - 1)
    footer = struct.pack("<I", zlib.crc32(backward + CHECK_CRC32)) + backward + CHECK_CRC32 + FOOTER_MAGIC
    write(pos, index + footer)
    return pos + len(index) + len(footer)


def create(read: ReadFn, size: int, write: WriteFn, ranges: list[tuple[int, int]], preset: int = 6) -> int:
    """Write the xz file (one stream per segment); returns its size."""
    pos = 0
    for seg in plan(size, ranges):
        if seg.stored:
            pos = _stored_stream(read, seg.out, seg.length, write, pos)
        else:
            stream = lzma.compress(read(seg.out, seg.length), lzma.FORMAT_XZ, lzma.CHECK_CRC64, preset)
            write(pos, stream)
            pos += len(stream)
    return pos


class StoredXz:
    """The stored blocks of an xz file (those of the shape above), in order."""

    def __init__(self, read: ReadFn, index: XzIndex) -> None:
        candidates = [i for i, b in enumerate(index.blocks)
                      if b.flags == CHECK_CRC32 and 0 < b.size <= CHUNK and b.unpadded == b.size + 20]
        self.blocks = [i for i in candidates if self._is_stored(read, index.blocks[i])]
        self.index = index
        self.starts = [index.blocks[i].out for i in self.blocks]

    @staticmethod
    def _is_stored(read: ReadFn, block: Block) -> bool:
        head = read(block.file, DATA_AT)
        end = read(block.file + DATA_AT + block.size, 1)
        return head == BLOCK_HEADER + b"\x01" + (block.size - 1).to_bytes(2, "big") and end == b"\x00"

    def ranges(self) -> str:
        """The stored ranges, merged, for messages: ``1048576-2097152, …``."""
        spans: list[list[int]] = []
        for i in self.blocks:
            b = self.index.blocks[i]
            if spans and spans[-1][1] == b.out:
                spans[-1][1] = b.out + b.size
            else:
                spans.append([b.out, b.out + b.size])
        return ", ".join(f"{a}-{z}" for a, z in spans) or "none"

    def pieces(self, offset: int, count: int) -> list[tuple[Block, int, int]] | None:
        """(block, file offset, length) for each stored block a range covers; None if
        any of it is not stored."""
        out = []
        k = bisect.bisect_right(self.starts, offset) - 1
        pos, end = offset, offset + count
        while pos < end:
            if k < 0 or k >= len(self.blocks):
                return None
            block = self.index.blocks[self.blocks[k]]
            if not block.out <= pos < block.out + block.size:
                return None
            take = min(end, block.out + block.size) - pos
            out.append((block, block.file + DATA_AT + pos - block.out, take))
            pos += take
            k += 1
        return out

    def all_blocks(self) -> Iterator[Block]:
        return (self.index.blocks[i] for i in self.blocks)


def data_offset(block: Block) -> int:
    return block.file + DATA_AT


def check_offset(block: Block) -> int:
    """Where a stored block's CRC-32 check is in the file."""
    body = DATA_AT + block.size + 1
    return block.file + body + _pad4(body)


def check_of(data: bytes | bytearray | memoryview) -> bytes:
    return struct.pack("<I", zlib.crc32(data))


def stale_blocks(read: ReadFn, stored: StoredXz) -> list[Block]:
    """Stored blocks whose check does not match their data (a write interrupted before
    its check was updated): rewrite ``check_of(data)`` at ``check_offset``."""
    return [b for b in stored.all_blocks()
            if read(check_offset(b), 4) != check_of(read(data_offset(b), b.size))]
