"""Random access into gzip files: an index of restart points (zlib's zran.c).

    from pynbd.formats.gzip_index import build_index, GzipIndex, SpanDecoder

    index = build_index(read, file_size)       # one pass of decompression
    index.size                                  # uncompressed size (all members)
    i = index.find(offset)                      # the point at or before offset
    d = SpanDecoder(read, index, i, size)       # decodes from point i towards point i+1
    d.step(view)                                # as far as asked: bytes written into view
    index.save(path, identity); GzipIndex.load(path, identity)

``read(offset, count) -> bytes`` reads the compressed file. The index keeps a
point about every ``span`` bytes of output (1 MiB by default, more for files
over 2 GiB) at a deflate block boundary: where the block starts in the file,
down to the bit, and the 32 KiB of output before it (kept compressed), which
the next blocks may refer back to. Reading from a point decodes at most one
span. Every gzip member starts with a point
of its own (no history), so multi-member files (``pigz``, ``cat a.gz b.gz``)
work; zero padding after the last member is ignored, other trailing bytes are
an error. Each member's CRC-32 and length are checked while the index is built,
so a damaged file is refused at open, not served wrong.

The saved index (``index=PATH``) holds the points with their windows
compressed, and an identity of the gzip file (its size and the CRC-32 of its
first and last 64 KiB) so that an index of another file is never used.
"""

from __future__ import annotations

import bisect
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from .inflate import WINDOW, DeflateError, Inflater

ReadFn = Callable[[int, int], bytes]
SPAN = 1 << 20
CHUNK = 256 * 1024
GZIP_MAGIC = b"\x1f\x8b"
FHCRC, FEXTRA, FNAME, FCOMMENT = 2, 4, 8, 16
_INDEX_MAGIC = b"PYNBD-GZIP-INDEX-1\n"
_POINT = struct.Struct("<QQBI")  # uncompressed offset, file offset, bits, window bytes (compressed)
_IDENTITY_SAMPLE = 65536


class GzipError(ValueError):
    """Not a gzip file, or a damaged one (one line for the user)."""


@dataclass(frozen=True)
class Header:
    """A gzip member header: where the deflate data starts, and the extra field."""

    data_offset: int
    extra: bytes


def parse_header(read: ReadFn, offset: int, file_size: int) -> Header:
    """The member header at ``offset`` (GzipError if there is none)."""
    fixed = read(offset, 10)
    if len(fixed) < 10 or fixed[:2] != GZIP_MAGIC:
        raise GzipError(f"no gzip header at offset {offset}")
    if fixed[2] != 8:
        raise GzipError(f"unknown compression method {fixed[2]} at offset {offset}")
    flags = fixed[3]
    pos = offset + 10
    extra = b""
    if flags & FEXTRA:
        xlen = struct.unpack("<H", read(pos, 2).ljust(2, b"\0"))[0]
        extra = read(pos + 2, xlen)
        pos += 2 + xlen
    for flag in (FNAME, FCOMMENT):
        if flags & flag:
            while True:
                piece = read(pos, 256)
                if not piece:
                    raise GzipError("truncated gzip header")
                nul = piece.find(b"\0")
                if nul >= 0:
                    pos += nul + 1
                    break
                pos += len(piece)
    if flags & FHCRC:
        pos += 2
    if pos >= file_size:
        raise GzipError("truncated gzip header")
    return Header(pos, extra)


@dataclass(frozen=True)
class Point:
    """A place to start decoding: output offset, file offset, bits of the byte before it."""

    out: int
    file: int
    bits: int
    packed_window: bytes  # zlib-compressed (b"": no history)

    def window(self) -> bytes:
        return zlib.decompress(self.packed_window) if self.packed_window else b""


class GzipIndex:
    """The access points of a gzip file and its uncompressed size."""

    def __init__(self, points: list[Point], size: int) -> None:
        self.points = points
        self.size = size
        self.starts = [p.out for p in points]

    def find(self, offset: int) -> int:
        """Index of the last point at or before ``offset``."""
        return bisect.bisect_right(self.starts, offset) - 1

    def span_end(self, i: int) -> int:
        return self.starts[i + 1] if i + 1 < len(self.starts) else self.size

    def save(self, path: str, identity: bytes) -> None:
        """Write the index to ``path`` atomically (new file, fsync, rename)."""
        parts = [_INDEX_MAGIC, struct.pack("<I", len(identity)), identity,
                 struct.pack("<QI", self.size, len(self.points))]
        for p in self.points:
            parts += [_POINT.pack(p.out, p.file, p.bits, len(p.packed_window)), p.packed_window]
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(b"".join(parts))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str, identity: bytes) -> GzipIndex | None:
        """The index saved at ``path`` if it is one of this file, else None."""
        try:
            with open(path, "rb") as f:
                data = f.read()
            if not data.startswith(_INDEX_MAGIC):
                return None
            pos = len(_INDEX_MAGIC)
            (id_len,) = struct.unpack_from("<I", data, pos)
            if data[pos + 4:pos + 4 + id_len] != identity:
                return None
            pos += 4 + id_len
            size, count = struct.unpack_from("<QI", data, pos)
            pos += 12
            points = []
            for _ in range(count):
                out, file, bits, wlen = _POINT.unpack_from(data, pos)
                pos += _POINT.size
                points.append(Point(out, file, bits, data[pos:pos + wlen]))
                pos += wlen
        except (OSError, struct.error, zlib.error):
            return None
        return cls(points, size)


def identity_of(read: ReadFn, file_size: int) -> bytes:
    """What tells this gzip file from another for a saved index."""
    head = read(0, _IDENTITY_SAMPLE)
    tail_at = max(0, file_size - _IDENTITY_SAMPLE)
    tail = read(tail_at, file_size - tail_at)
    return struct.pack("<QII", file_size, zlib.crc32(head), zlib.crc32(tail))


class _Input:
    """Compressed bytes read ahead in chunks; ``pos`` is the file offset of the next byte."""

    def __init__(self, read: ReadFn, pos: int, file_size: int) -> None:
        self.read = read
        self.file_size = file_size
        self.data = b""
        self.start = 0  # file offset of data[0]
        self.used = 0  # bytes of data consumed
        self.seek(pos)

    @property
    def pos(self) -> int:
        return self.start + self.used

    def seek(self, pos: int) -> None:
        self.start, self.data, self.used = pos, b"", 0

    def refill(self) -> bool:
        """Make unconsumed bytes available; False at the end of the file."""
        if self.used < len(self.data):
            return True
        self.seek(self.pos)
        if self.start >= self.file_size:
            return False
        self.data = self.read(self.start, min(CHUNK, self.file_size - self.start))
        return bool(self.data)


def _member_trailer(read: ReadFn, pos: int, file_size: int, crc: int, length: int) -> None:
    trailer = read(pos, 8)
    if len(trailer) < 8:
        raise GzipError("truncated gzip file (the trailer is missing)")
    want_crc, want_len = struct.unpack("<II", trailer)
    if want_crc != crc or want_len != length & 0xFFFFFFFF:
        raise GzipError(f"gzip member ending at offset {pos + 8}: CRC-32 or length mismatch "
                        "(the file is damaged)")


def _next_member(read: ReadFn, pos: int, file_size: int) -> Header | None:
    """The header of the member at ``pos``, or None if only zero padding follows."""
    while pos < file_size:
        chunk = read(pos, min(CHUNK, file_size - pos))
        stripped = chunk.lstrip(b"\0")
        if stripped:
            if len(chunk) != len(stripped):
                raise GzipError(f"trailing garbage after the gzip data at offset {pos}")
            if not stripped.startswith(GZIP_MAGIC[:len(stripped)]):
                raise GzipError(f"trailing garbage after the gzip data at offset {pos}")
            return parse_header(read, pos, file_size)
        pos += len(chunk)
    return None


def build_index(read: ReadFn, file_size: int, span: int | None = None,
                sink: Callable[[memoryview], None] | None = None) -> GzipIndex:
    """Decode the whole file once, keeping a point about every ``span`` output bytes.

    ``sink``, if given, is handed every piece of output in order (a view that
    is reused for the next piece: copy what you keep).

    The default span is a MiB, or more for files over 2 GiB compressed, so that
    there are at most about 8192 points (at most 256 MiB of windows, kept
    compressed: a few dozen MiB for most images).
    """
    if span is None:
        span = max(SPAN, file_size // 2048)
    header = parse_header(read, 0, file_size)
    points: list[Point] = []
    out_total = 0
    out = memoryview(bytearray(CHUNK * 4))
    z = Inflater()
    try:
        while True:  # one member per turn
            src = _Input(read, header.data_offset, file_size)
            points.append(Point(out_total, header.data_offset, 0, b""))
            last = out_total
            crc = 0
            member_out = 0
            while True:
                if not src.refill():
                    raise GzipError("truncated gzip file (the compressed data ends early)")
                used, made, ended = z.inflate(src.data, src.used, out, stop_at_block=True)
                src.used += used
                crc = zlib.crc32(out[:made], crc)
                if sink is not None and made:
                    sink(out[:made])
                member_out += made
                out_total += made
                if ended:
                    break
                if z.at_block_boundary and out_total - last > span:
                    bits = z.bits_pending
                    points.append(Point(out_total, src.pos, bits, zlib.compress(z.dictionary(), 1)))
                    last = out_total
            _member_trailer(read, src.pos, file_size, crc, member_out)
            following = _next_member(read, src.pos + 8, file_size)
            if following is None:
                break
            header = following
            z.reset()
    except DeflateError as exc:
        raise GzipError(str(exc)) from None
    finally:
        z.close()
    return GzipIndex(points, out_total)


class SpanDecoder:
    """Decodes the span from point ``i`` forwards, as far as asked: ``step(view)``
    fills the start of ``view`` and returns how many bytes it wrote (> 0)."""

    def __init__(self, read: ReadFn, index: GzipIndex, i: int, file_size: int) -> None:
        point = index.points[i]
        self.left = index.span_end(i) - point.out
        bit_value = read(point.file - 1, 1)[0] >> (8 - point.bits) if point.bits else 0
        self.z = Inflater(point.window()[-WINDOW:], point.bits, bit_value)
        self.src = _Input(read, point.file, file_size)

    def step(self, view: memoryview) -> int:
        view = view[:self.left]
        try:
            while True:
                if not self.src.refill():
                    raise GzipError("truncated gzip file (the compressed data ends early)")
                used, made, ended = self.z.inflate(self.src.data, self.src.used, view)
                self.src.used += used
                self.left -= made
                if ended and self.left:
                    raise GzipError("gzip member ended before the index said it would (file changed?)")
                if made or not view:
                    if not self.left:
                        self.z.close()
                    return made
        except DeflateError as exc:
            raise GzipError(str(exc)) from None
