"""zstd files as frames: the seekable format's seek table, or the frames walked one by one.

    from pynbd.formats.zstd_seekable import read_frames, write_seekable, FrameDecoder

    write_seekable(read_in, size, write_out, frame_size=1 << 20)   # a seekable .zst
    frames = read_frames(read, file_size)     # Frames: list of Frame(out, size, file, length)
    frames.seekable                           # True if it came from a seek table
    FrameDecoder(read, frame).step(view)      # decode forwards through one frame

zstd frames decode independently, so a file of many small frames can be
read anywhere. The *seekable format* (facebook/zstd ``contrib/seekable_format``)
is such a file with a seek table at the end: a skippable frame (magic
0x184D2A5E) holding each frame's compressed and decompressed size, then a
9-byte footer (frame count, descriptor, magic 0x8F92EAB1). ``zstd -d`` and
every other zstd reader skip the table. The optional per-frame XXH64
checksums in the table are not verified (Python has no XXH64); frames written
here carry zstd's own content checksum instead, which the decoder checks.

A file without a seek table (what the ``zstd`` command writes) is walked
frame by frame from the start — frame headers and block headers only, no
decoding, unless a frame does not record its size (from a pipe), which is
then decoded once to learn it. Skippable frames are passed over. Most such
files are one frame: reading them is sequential, from the frame's start.

Damaged or truncated files raise ZstdError with one line saying which.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, cast

import zstandard

ReadFn = Callable[[int, int], bytes]
WriteFn = Callable[[int, bytes], None]
FRAME_MAGIC = 0xFD2FB528
SKIPPABLE_MASK, SKIPPABLE_MAGIC = 0xFFFFFFF0, 0x184D2A50
SEEK_TABLE_MAGIC = 0x184D2A5E
SEEKABLE_MAGIC = 0x8F92EAB1
_FOOTER = struct.Struct("<IBI")
_CHUNK = 1 << 20
_FCS_SIZES = (0, 2, 4, 8)
_DID_SIZES = (0, 1, 2, 4)


class ZstdError(ValueError):
    """Not a zstd file, or a damaged/truncated one."""


@dataclass(frozen=True)
class Frame:
    out: int  # uncompressed offset
    size: int  # uncompressed size
    file: int  # offset of the frame in the file
    length: int  # compressed length


class Frames:
    def __init__(self, frames: list[Frame], seekable: bool) -> None:
        self.frames = frames
        self.seekable = seekable
        self.size = frames[-1].out + frames[-1].size if frames else 0
        self.starts = [f.out for f in frames]

    def find(self, offset: int) -> int:
        return bisect.bisect_right(self.starts, offset) - 1


def write_seekable(read: ReadFn, size: int, write: WriteFn, frame_size: int = 1 << 20,
                   level: int = 3) -> int:
    """Compress ``size`` bytes into seekable-format frames; returns the file size."""
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    entries = []
    pos = 0
    for offset in range(0, size, frame_size):
        data = read(offset, min(frame_size, size - offset))
        frame = compressor.compress(data)
        write(pos, frame)
        pos += len(frame)
        entries.append(struct.pack("<II", len(frame), len(data)))
    body = b"".join(entries) + _FOOTER.pack(len(entries), 0, SEEKABLE_MAGIC)
    table = struct.pack("<II", SEEK_TABLE_MAGIC, len(body)) + body
    write(pos, table)
    return pos + len(table)


def _seek_table(read: ReadFn, file_size: int) -> list[Frame] | None:
    if file_size < 17:
        return None
    count, descriptor, magic = _FOOTER.unpack(read(file_size - 9, 9))
    if magic != SEEKABLE_MAGIC:
        return None
    entry = 12 if descriptor & 0x80 else 8
    body_size = count * entry + 9
    start = file_size - body_size - 8
    if start < 0 or descriptor & 0x7C:
        raise ZstdError("damaged zstd seek table (bad frame count or descriptor)")
    table = read(start, body_size + 8)
    skip_magic, length = struct.unpack_from("<II", table)
    if skip_magic != SEEK_TABLE_MAGIC or length != body_size:
        raise ZstdError("damaged zstd seek table (its skippable frame header does not match)")
    frames = []
    out = file = 0
    for i in range(count):
        csize, dsize = struct.unpack_from("<II", table, 8 + i * entry)
        frames.append(Frame(out, dsize, file, csize))
        out += dsize
        file += csize
    if file != start:
        raise ZstdError("damaged zstd seek table (frame sizes do not add up to the file)")
    return frames


class _Bytes:
    """Small reads of the file through a buffer (frame and block headers)."""

    def __init__(self, read: ReadFn, file_size: int) -> None:
        self.read, self.file_size = read, file_size
        self.start, self.data = 0, b""

    def get(self, offset: int, count: int) -> bytes:
        if not self.start <= offset <= offset + count <= self.start + len(self.data):
            self.start, self.data = offset, self.read(offset, max(count, _CHUNK))
        got = self.data[offset - self.start:offset - self.start + count]
        if len(got) != count:
            raise ZstdError(f"truncated zstd file (ends inside the frame at offset {offset})")
        return got


def _walk_frame(src: _Bytes, pos: int) -> tuple[int, int | None]:
    """(compressed length, content size or None) of the zstd frame at ``pos``."""
    descriptor = src.get(pos + 4, 1)[0]
    single = bool(descriptor & 0x20)
    fcs_size = _FCS_SIZES[descriptor >> 6] or (1 if single else 0)
    did_size = _DID_SIZES[descriptor & 3]
    if descriptor & 0x08:
        raise ZstdError(f"damaged zstd frame header at offset {pos}")
    at = pos + 5 + (0 if single else 1) + did_size
    content: int | None = None
    if fcs_size:
        content = int.from_bytes(src.get(at, fcs_size), "little") + (256 if fcs_size == 2 else 0)
    at += fcs_size
    while True:
        header = int.from_bytes(src.get(at, 3), "little")
        kind, size = (header >> 1) & 3, header >> 3
        if kind == 3:
            raise ZstdError(f"damaged zstd block header at offset {at}")
        at += 3 + (1 if kind == 1 else size)
        if header & 1:
            break
    if descriptor & 0x04:
        at += 4
    if at > src.file_size:
        raise ZstdError(f"truncated zstd file (ends inside the frame at offset {pos})")
    return at - pos, content


def _walk(read: ReadFn, file_size: int) -> list[Frame]:
    src = _Bytes(read, file_size)
    frames = []
    pos = out = 0
    while pos < file_size:
        (magic,) = struct.unpack("<I", src.get(pos, 4))
        if magic & SKIPPABLE_MASK == SKIPPABLE_MAGIC:
            pos += 8 + struct.unpack("<I", src.get(pos + 4, 4))[0]
            continue
        if magic != FRAME_MAGIC:
            what = "not a zstd file" if pos == 0 else f"garbage after the zstd frames at offset {pos}"
            raise ZstdError(what)
        length, content = _walk_frame(src, pos)
        if content is None:  # not recorded: decode once to learn it
            content = sum(map(len, FrameDecoder(read, Frame(out, -1, pos, length)).pieces()))
        frames.append(Frame(out, content, pos, length))
        out += content
        pos += length
    if pos != file_size:
        raise ZstdError("truncated zstd file (a skippable frame runs past the end)")
    if not frames:
        raise ZstdError("not a zstd file (no frames)")
    return frames


def read_frames(read: ReadFn, file_size: int) -> Frames:
    """The frames of a zstd file: from its seek table, or walked from the start."""
    table = _seek_table(read, file_size)
    if table is not None:
        return Frames(table, True)
    return Frames(_walk(read, file_size), False)


class FrameDecoder:
    """Decodes one frame forwards, as far as asked: ``step(view)`` fills the start
    of ``view`` and returns how many bytes it wrote (0 at the frame's end)."""

    def __init__(self, read: ReadFn, frame: Frame) -> None:
        self.frame = frame
        source = cast(IO[bytes], _FrameFile(read, frame))  # read(size) is all it uses
        self.reader = zstandard.ZstdDecompressor().stream_reader(source, read_across_frames=False)

    def step(self, view: memoryview) -> int:
        try:
            return int(self.reader.readinto(view))
        except zstandard.ZstdError as exc:
            raise ZstdError(f"damaged zstd frame at offset {self.frame.file}: {exc}") from None

    def pieces(self, size: int = _CHUNK) -> Iterator[bytes]:
        """The rest of the frame's bytes, ``size`` at a time."""
        buf = bytearray(size)
        while made := self.step(memoryview(buf)):
            yield bytes(buf[:made])


class _FrameFile:
    """The compressed bytes of one frame as a file object for zstandard's stream_reader."""

    def __init__(self, read: ReadFn, frame: Frame) -> None:
        self.read_at = read
        self.pos = frame.file
        self.end = frame.file + frame.length

    def read(self, size: int = -1) -> bytes:
        count = self.end - self.pos if size < 0 else min(size, self.end - self.pos)
        data = self.read_at(self.pos, count) if count > 0 else b""
        self.pos += len(data)
        return data
