"""The xz container: streams, their indexes, and decoding one block at a time.

    from pynbd.formats.xz import read_index, BlockDecoder, XzError

    index = read_index(read, file_size)   # XzIndex: blocks, size, streams
    b = index.blocks[index.find(offset)]  # Block(out, size, file, unpadded, stream_flags)
    BlockDecoder(read, b).step(view)      # decodes it forwards (check verified at its end)

``read(offset, count) -> bytes`` reads the .xz file. The index is read from
the end, as ``xz --list`` does: stream padding (zero bytes in units of four),
the stream footer, the index it points back to, then the stream header the
sizes lead to; and again for the stream before, so concatenated streams and
padding between them work. Each index's CRC-32 and the headers' CRC-32s are
checked; a file without a valid footer and index (truncated, not xz, or
damaged) raises XzError with one line saying which.

A block is decoded with ``lzma.LZMADecompressor(FORMAT_XZ)`` fed a stream
header rebuilt from the stream's flags, followed by the block's bytes: liblzma
reads the block header (its filter chain: LZMA2, BCJ, delta…) itself and
verifies the block's check (CRC-32, CRC-64 or SHA-256). Decoding with
FORMAT_RAW would need the filter properties decoded by hand (Python's lzma
keeps that decoder private) and would skip the check, for the same speed:
the bytes go through the same liblzma decoder either way.
"""

from __future__ import annotations

import bisect
import lzma
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

ReadFn = Callable[[int, int], bytes]
HEADER_MAGIC = b"\xfd7zXZ\x00"
FOOTER_MAGIC = b"YZ"
STREAM_HEADER = 12
_PADDING_CHUNK = 4096


class XzError(ValueError):
    """Not an xz file, or one whose footer/index is missing or damaged."""


@dataclass(frozen=True)
class Block:
    out: int  # uncompressed offset
    size: int  # uncompressed size
    file: int  # offset of the block header in the file
    unpadded: int  # header + compressed data + check, without the padding
    flags: bytes  # the stream flags (check type)


class XzIndex:
    """The blocks of all streams in order, with their uncompressed offsets."""

    def __init__(self, blocks: list[Block], size: int, streams: int) -> None:
        self.blocks = blocks
        self.size = size
        self.streams = streams
        self.starts = [b.out for b in blocks]

    def find(self, offset: int) -> int:
        """The block holding uncompressed ``offset``."""
        return bisect.bisect_right(self.starts, offset) - 1

    @property
    def largest_block(self) -> int:
        return max((b.size for b in self.blocks), default=0)


def _vli(data: bytes, pos: int) -> tuple[int, int]:
    """A variable-length integer at ``pos``: (value, position after it)."""
    value = 0
    for i in range(9):
        if pos + i >= len(data):
            raise XzError("damaged xz index (a number runs past its end)")
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos + i + 1
    raise XzError("damaged xz index (a number is too long)")


def _skip_padding(read: ReadFn, end: int) -> int:
    """Where the stream before ``end`` ends, once trailing zero padding is skipped."""
    while end > 0:
        at = max(0, end - _PADDING_CHUNK)
        kept = len(read(at, end - at).rstrip(b"\0"))
        if kept:
            return at + kept
        end = at
    return 0


def _stream(read: ReadFn, end: int) -> tuple[int, list[tuple[int, int]], bytes]:
    """The stream ending at ``end``: (its start, [(unpadded, size)…], flags)."""
    if end < 2 * STREAM_HEADER:
        raise XzError("not an xz file (too short for a stream header and footer)")
    footer = read(end - 12, 12)
    crc, backward, flags, magic = struct.unpack("<I4s2s2s", footer)
    if magic != FOOTER_MAGIC:
        raise XzError("not an xz file, or a truncated one (no stream footer at the end)")
    if zlib.crc32(backward + flags) != crc:
        raise XzError("damaged xz stream footer (CRC-32 mismatch)")
    index_size = (struct.unpack("<I", backward)[0] + 1) * 4
    index_at = end - 12 - index_size
    if index_at < STREAM_HEADER:
        raise XzError("damaged xz stream footer (the index would start before the file)")
    index = read(index_at, index_size)
    if len(index) != index_size or index[0] != 0 or \
            zlib.crc32(index[:-4]) != struct.unpack("<I", index[-4:])[0]:
        raise XzError("missing or damaged xz index (the file may be truncated or corrupt)")
    count, pos = _vli(index, 1)
    records = []
    for _ in range(count):
        unpadded, pos = _vli(index, pos)
        size, pos = _vli(index, pos)
        records.append((unpadded, size))
    blocks_size = sum(-(-u // 4) * 4 for u, _ in records)
    start = index_at - blocks_size - STREAM_HEADER
    header = read(start, STREAM_HEADER) if start >= 0 else b""
    if len(header) != STREAM_HEADER or header[:6] != HEADER_MAGIC or header[6:8] != flags \
            or zlib.crc32(header[6:8]) != struct.unpack("<I", header[8:])[0]:
        raise XzError("damaged xz file (the stream header does not match its index)")
    return start, records, flags


def read_index(read: ReadFn, file_size: int) -> XzIndex:
    """Every block of every stream, from the footers and indexes at the end of each stream."""
    streams = []
    end = file_size
    while True:
        padded_end, end = end, _skip_padding(read, end)
        if end == 0:
            break
        if end % 4 or (padded_end - end) % 4:
            raise XzError("not an xz file, or a truncated one (no stream footer at the end)")
        start, records, flags = _stream(read, end)
        streams.append((start, records, flags))
        end = start
    if not streams:
        raise XzError("not an xz file (it holds only zero bytes)")
    blocks = []
    out = 0
    for start, records, flags in reversed(streams):
        file = start + STREAM_HEADER
        for unpadded, size in records:
            blocks.append(Block(out, size, file, unpadded, flags))
            out += size
            file += -(-unpadded // 4) * 4
    return XzIndex(blocks, out, len(streams))


class BlockDecoder:
    """Decodes one block forwards, as far as asked: ``step(view)`` fills the start
    of ``view`` and returns how many bytes it wrote (> 0). The block's check is
    verified when its last byte is decoded."""

    def __init__(self, read: ReadFn, block: Block) -> None:
        self.block = block
        self.left = block.size
        header = HEADER_MAGIC + block.flags + struct.pack("<I", zlib.crc32(block.flags))
        self.input = header + read(block.file, -(-block.unpadded // 4) * 4)
        self.decoder = lzma.LZMADecompressor(lzma.FORMAT_XZ)

    def step(self, view: memoryview) -> int:
        data, self.input = self.input, b""
        try:
            out = self.decoder.decompress(data, max_length=min(len(view), self.left))
            if len(out) == self.left:
                self.decoder.decompress(b"")  # the block's end: its check
        except lzma.LZMAError as exc:
            raise XzError(f"damaged xz block at offset {self.block.file}: {exc}") from None
        if not out and self.left:
            raise XzError(f"damaged xz block at offset {self.block.file}: it ends "
                          f"{self.left} bytes early")
        view[:len(out)] = out
        self.left -= len(out)
        return len(out)
