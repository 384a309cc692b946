"""Modifiable gzip files: chosen ranges kept as deflate *stored* blocks, writable in place.

    from pynbd.formats.gzip_stored import create, parse_ranges, open_layout, StoredGzip

    ranges = parse_ranges("1M-65M,100M-101M", input_size)
    create(read_in, input_size, write_out, ranges)        # a standard gzip file
    g = StoredGzip(read, file_size, open_layout(read, file_size))
    g.stored_pieces(offset, count)   # where a range lives in the file (None: not all stored)
    g.tree.update(leaf, crc); g.trailer()                 # the new CRC-32, by combining
    g.trailer_is_current(read)       # False after a crash between data and trailer writes

The file is an ordinary single-member gzip file (``gzip -t``, ``zcat`` and
nbdkit's gzip filter read it); what makes it modifiable is its layout:

- the input is cut into *segments*: each stored range is one, and the data
  between them is cut into compressed segments of about a MiB (more for
  inputs over 1.5 GiB: at most ~1500 segments);
- a compressed segment ends with a zlib ``Z_FULL_FLUSH``: the output is
  byte-aligned and the compressor forgets its history, so no compressed byte
  ever refers back into a stored range (changing stored bytes changes
  nothing else) and every segment can be decoded on its own (a free
  random-access index);
- a stored range is written as stored blocks of 32 KiB each (a 5-byte
  header, then the bytes as they are), so uncompressed offset ``u`` of the
  range lives at file offset ``start + (u // 32768) * 32773 + 5 + u % 32768``;
- the gzip header's extra field (subfield ``PN``) lists the segments: kind,
  uncompressed offset and length, file offset and length, and for compressed
  segments their CRC-32; the list has its own CRC-32.

Alignment: stored ranges are ``START-END`` (END exclusive, K/M/G suffixes),
and START and END must be multiples of 512 bytes (sectors: clients write
whole sectors, so a write is either inside a range or refused whole), or END
may be the end of the input. Ranges may not overlap or be empty.

The trailer's CRC-32 is kept as a tree of pieces (each compressed segment and
each 32 KiB stored block): a write recomputes the CRC of the blocks it
touched and combines up the tree (``formats.crc32``), never reading the rest
of the file. ``StoredGzip`` recomputes it from the stored blocks and
the recorded CRCs of the compressed segments, which repairs a trailer left
stale by a crash between a data write and its trailer update.
"""

from __future__ import annotations

import bisect
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..backend.params import parse_size
from .crc32 import CrcTree, crc32_combine
from .gzip_index import FEXTRA, GzipError, GzipIndex, Point, ReadFn, parse_header

WriteFn = Callable[[int, bytes], None]
ALIGN = 512
BLOCK = 32768  # bytes of data per stored block
BLOCK_HEADER = 5
SEGMENT = 1 << 20
MAX_SEGMENTS = 1500
SUBFIELD = b"PN"
_VERSION = 1
_ENTRY = struct.Struct("<BQQQQI")  # stored?, out offset, out length, file offset, file length, crc
_LAYOUT_HEAD = struct.Struct("<BII")  # version, block size, entries
_READ = 1 << 20


class RangeError(ValueError):
    """A --stored list that cannot be used (one line for the user)."""


@dataclass(frozen=True)
class Segment:
    stored: bool
    out: int
    length: int
    file: int = 0
    file_length: int = 0
    crc: int = 0

    def blocks(self) -> int:
        return -(-self.length // BLOCK) if self.stored else 1

    def file_offset(self, out: int) -> int:
        """Where uncompressed offset ``out`` (inside this stored segment) is in the file."""
        block, inner = divmod(out - self.out, BLOCK)
        return self.file + block * (BLOCK + BLOCK_HEADER) + BLOCK_HEADER + inner


def parse_ranges(text: str, size: int) -> list[tuple[int, int]]:
    """``START-END[,START-END…]`` as sorted (start, end) pairs, checked."""
    ranges = []
    for item in text.split(","):
        start_text, sep, end_text = item.strip().partition("-")
        try:
            if not sep:
                raise ValueError("expected START-END")
            start, end = parse_size(start_text), parse_size(end_text)
        except ValueError as exc:
            raise RangeError(f"--stored: {item!r}: {exc}") from None
        if end <= start:
            raise RangeError(f"--stored: {item!r}: END must be larger than START")
        if end > size:
            raise RangeError(f"--stored: {item!r}: ends past the end of the input ({size} bytes)")
        if start % ALIGN or (end % ALIGN and end != size):
            raise RangeError(f"--stored: {item!r}: START and END must be multiples of {ALIGN} "
                             "(END may also be the end of the input)")
        ranges.append((start, end))
    ranges.sort()
    for (s1, e1), (s2, e2) in zip(ranges, ranges[1:], strict=False):
        if s2 < e1:
            raise RangeError(f"--stored: ranges {s1}-{e1} and {s2}-{e2} overlap")
    return ranges


def plan(size: int, ranges: list[tuple[int, int]]) -> list[Segment]:
    """The segments of an input of ``size`` bytes with these stored ranges."""
    step = max(SEGMENT, -(-size // MAX_SEGMENTS // SEGMENT) * SEGMENT)
    segments: list[Segment] = []
    pos = 0
    for start, end in [*ranges, (size, size)]:
        while pos < start:
            take = min(step, start - pos)
            segments.append(Segment(False, pos, take))
            pos += take
        if end > start:
            segments.append(Segment(True, start, end - start))
        pos = end
    return segments


def _layout_bytes(segments: list[Segment]) -> bytes:
    body = _LAYOUT_HEAD.pack(_VERSION, BLOCK, len(segments)) + b"".join(
        _ENTRY.pack(s.stored, s.out, s.length, s.file, s.file_length, s.crc) for s in segments)
    body += struct.pack("<I", zlib.crc32(body))
    return SUBFIELD + struct.pack("<H", len(body)) + body


def _header(segments: list[Segment]) -> bytes:
    extra = _layout_bytes(segments)
    if len(extra) > 0xFFFF:
        raise RangeError(f"--stored: too many ranges ({len(segments)} segments do not fit the header)")
    # magic, deflate, FEXTRA, no mtime, no XFL, OS unknown
    return b"\x1f\x8b\x08" + bytes([FEXTRA]) + bytes(5) + b"\xff" + struct.pack("<H", len(extra)) + extra


def create(read: ReadFn, size: int, write: WriteFn, ranges: list[tuple[int, int]],
           level: int = 6) -> list[Segment]:
    """Write the gzip file; returns its segments (with file offsets and CRCs)."""
    segments = plan(size, ranges)
    header_length = len(_header(segments))
    pos = header_length
    total_crc = 0
    done: list[Segment] = []
    compressor = zlib.compressobj(level, zlib.DEFLATED, -15)
    for seg in segments:
        first = pos
        crc = 0
        for offset in range(seg.out, seg.out + seg.length, _READ if not seg.stored else BLOCK):
            data = read(offset, min(_READ if not seg.stored else BLOCK, seg.out + seg.length - offset))
            crc = zlib.crc32(data, crc)
            if seg.stored:
                out = b"\0" + struct.pack("<HH", len(data), len(data) ^ 0xFFFF) + data
            else:
                out = compressor.compress(data)
            write(pos, out)
            pos += len(out)
        if not seg.stored:
            out = compressor.flush(zlib.Z_FULL_FLUSH)
            write(pos, out)
            pos += len(out)
        total_crc = crc32_combine(total_crc, crc, seg.length)
        done.append(Segment(seg.stored, seg.out, seg.length, first, pos - first,
                            0 if seg.stored else crc))
    final = compressor.flush(zlib.Z_FINISH)
    write(pos, final + struct.pack("<II", total_crc, size & 0xFFFFFFFF))
    write(0, _header(done))
    return done


def open_layout(read: ReadFn, file_size: int) -> list[Segment] | None:
    """The segments recorded in a modifiable gzip file; None for any other gzip file."""
    header = parse_header(read, 0, file_size)
    extra = header.extra
    pos = 0
    while pos + 4 <= len(extra):
        sub_id = extra[pos:pos + 2]
        (length,) = struct.unpack_from("<H", extra, pos + 2)
        body = extra[pos + 4:pos + 4 + length]
        pos += 4 + length
        if sub_id == SUBFIELD:
            return _parse_layout(body, header.data_offset, file_size)
    return None


def _parse_layout(body: bytes, data_offset: int, file_size: int) -> list[Segment]:
    damaged = GzipError("the modifiable-gzip layout in the header is damaged")
    if len(body) < _LAYOUT_HEAD.size + 4 or zlib.crc32(body[:-4]) != struct.unpack("<I", body[-4:])[0]:
        raise damaged
    version, block, count = _LAYOUT_HEAD.unpack_from(body)
    if version != _VERSION or block != BLOCK or len(body) != _LAYOUT_HEAD.size + count * _ENTRY.size + 4:
        raise damaged
    segments = []
    out = 0
    file = data_offset
    for i in range(count):
        kind, seg_out, length, seg_file, file_length, crc = _ENTRY.unpack_from(
            body, _LAYOUT_HEAD.size + i * _ENTRY.size)
        seg = Segment(bool(kind), seg_out, length, seg_file, file_length, crc)
        if seg_out != out or seg_file != file or (seg.stored and file_length !=
                                                  length + seg.blocks() * BLOCK_HEADER):
            raise damaged
        out += length
        file += file_length
        segments.append(seg)
    if file + 8 > file_size:
        raise GzipError("truncated gzip file (shorter than its layout says)")
    return segments


class StoredGzip:
    """The live state of a modifiable gzip file: segments, the CRC tree, the trailer."""

    def __init__(self, read: ReadFn, file_size: int, segments: list[Segment]) -> None:
        self.segments = segments
        self.file_size = file_size
        self.size = segments[-1].out + segments[-1].length if segments else 0
        self.starts = [s.out for s in segments]
        self.first_leaf = []
        pieces: list[tuple[int, int]] = []
        for seg in segments:
            self.first_leaf.append(len(pieces))
            if seg.stored:
                pieces += [(zlib.crc32(read(seg.file_offset(out), min(BLOCK, seg.out + seg.length - out))),
                            min(BLOCK, seg.out + seg.length - out))
                           for out in range(seg.out, seg.out + seg.length, BLOCK)]
            else:
                pieces.append((seg.crc, seg.length))
        self.tree = CrcTree(pieces)

    def index(self) -> GzipIndex:
        """Access points: every segment starts one (compressed ones with no history)."""
        return GzipIndex([Point(s.out, s.file, 0, b"") for s in self.segments], self.size)

    def ranges(self) -> str:
        """The stored ranges, for messages: ``1048576-2097152, …``."""
        return ", ".join(f"{s.out}-{s.out + s.length}" for s in self.segments if s.stored) or "none"

    def stored_pieces(self, offset: int, count: int) -> Iterator[tuple[int, int, int, int, int]] | None:
        """For a range wholly inside stored segments: (leaf, block start, block length,
        file offset, length) of each piece of a stored block it covers; None if it is not."""
        end = offset + count
        i = bisect.bisect_right(self.starts, offset) - 1
        j = i
        while j < len(self.segments) and self.segments[j].out < end:
            if not self.segments[j].stored:
                return None
            j += 1
        return self._pieces(i, offset, end)

    def _pieces(self, i: int, offset: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
        pos = offset
        while pos < end:
            seg = self.segments[i]
            seg_end = seg.out + seg.length
            while pos < min(end, seg_end):
                block = (pos - seg.out) // BLOCK
                block_start = seg.out + block * BLOCK
                block_len = min(BLOCK, seg_end - block_start)
                take = min(end, block_start + block_len) - pos
                yield (self.first_leaf[i] + block, block_start, block_len, seg.file_offset(pos), take)
                pos += take
            i += 1

    def trailer_offset(self) -> int:
        return self.file_size - 8

    def trailer(self) -> bytes:
        return struct.pack("<II", self.tree.crc, self.size & 0xFFFFFFFF)

    def trailer_is_current(self, read: ReadFn) -> bool:
        """Whether the file's trailer matches its data (False after an interrupted write)."""
        return read(self.trailer_offset(), 8) == self.trailer()
