"""zstd: serve the uncompressed contents of a zstd file; random access in the seekable format.

    pynbd serve --filter=zstd file disk.img.zst
    pynbd serve --filter=zstd file disk.img.zst zstd-max-depth=32

Parameters
    zstd-max-depth=N   how many decoded frames to keep (default 8), least
                       recently used dropped first; shared by all clients

zstd frames decode independently. A file in zstd's *seekable format*
(facebook/zstd ``contrib/seekable_format``: frames of a MiB or so and a
seek table at the end) is read anywhere: a read decodes only the frames it
falls in. ``pynbd zstd create IN OUT.zst [--frame-size=1M]`` writes such
files (so do ``t2sz`` and facebook's ``seekable_format`` examples).

An ordinary ``.zst`` (what ``zstd`` writes: usually a single frame) works
too, with a warning: without a seek table its frames are found by walking
their headers at open, and a frame is read sequentially from its start.
Frames up to 32 MiB are decoded whole and cached; a larger frame is decoded
forwards as reads advance, keeping its last 16 MiB decoded, so a sequential
copy (``nbdcopy``, ``qemu-img convert``) is fast but a read far behind the
last one starts again from the frame's start.

Read-only. A file that is not zstd, is truncated, or has a damaged seek
table or frame headers refuses the open with one line saying why; a
damaged frame fails the reads that need it with EIO, logged.
"""

from __future__ import annotations

import collections
import errno
import logging
import threading
from collections.abc import Callable, Iterator

from ..backend import (
    ConfigError,
    Connection,
    Filter,
    OpenContext,
    Param,
    io_error,
)
from ..formats.zstd_seekable import Frame, FrameDecoder, Frames, ReadFn, ZstdError, read_frames
from .gzip import DecodedCache, DecodedConnection, Images, Step, reader_of

log = logging.getLogger("pynbd.filters.zstd")
WHOLE_FRAME = 32 << 20
KEEP_PIECES = 16  # of a MiB each, for a frame read sequentially


class SequentialFrame:
    """A large frame decoded forwards, its most recent pieces kept, shared by all clients."""

    def __init__(self, frame: Frame) -> None:
        self.frame = frame
        self.lock = threading.Lock()
        self.pieces: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=KEEP_PIECES)
        self.decoder: Iterator[bytes] | None = None
        self.next_out = frame.out  # where the decoder's next piece starts

    def copy(self, read: ReadFn, buf: memoryview, offset: int) -> None:
        with self.lock:
            pos = 0
            while pos < len(buf):
                at = offset + pos
                piece = next(((start, data) for start, data in self.pieces
                              if start <= at < start + len(data)), None)
                if piece is None:
                    self._advance(read, at)
                    continue
                start, data = piece
                take = min(len(buf) - pos, start + len(data) - at)
                buf[pos:pos + take] = data[at - start:at - start + take]
                pos += take

    def _advance(self, read: ReadFn, at: int) -> None:
        if self.decoder is None or at < self.next_out - sum(len(d) for _, d in self.pieces):
            self.decoder = FrameDecoder(read, self.frame).pieces()
            self.next_out = self.frame.out
            self.pieces.clear()
        data = next(self.decoder, b"")
        if not data:
            self.decoder = None
            raise ZstdError(f"damaged zstd frame at offset {self.frame.file}: it ends early")
        self.pieces.append((self.next_out, data))
        self.next_out += len(data)


class ZstdImage:
    def __init__(self, frames: Frames, depth: int) -> None:
        self.frames = frames
        self.cache = DecodedCache("zstd", depth, whole=True)
        self.sequential = {i: SequentialFrame(f) for i, f in enumerate(frames.frames) if f.size > WHOLE_FRAME}


class ZstdConnection(DecodedConnection["ZstdFilter"]):
    def __init__(self, next: Connection, filter: ZstdFilter, ctx: OpenContext) -> None:
        super().__init__(next, filter, ctx)
        self.image = filter.images.get(next, ctx)
        self.read_file = reader_of(next, next.get_size())

    def get_size(self) -> int:
        return self.image.frames.size

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        frames = self.image.frames
        i = frames.find(offset)
        pos = 0
        try:
            while pos < len(buf):
                frame = frames.frames[i]
                take = min(len(buf) - pos, frame.out + frame.size - (offset + pos))
                if frame.size:
                    self._copy(i, buf[pos:pos + take], offset + pos)
                pos += take
                i += 1
        except ZstdError as exc:
            log.error("zstd: %s", exc)
            raise io_error(errno.EIO, f"zstd: {exc}") from None

    def _copy(self, i: int, buf: memoryview, offset: int) -> None:
        sequential = self.image.sequential.get(i)
        if sequential is not None:
            sequential.copy(self.read_file, buf, offset)
            return
        frame = self.image.frames.frames[i]
        self.image.cache.copy(i, frame.size, self._decoder(frame), buf, offset - frame.out)

    def _decoder(self, frame: Frame) -> Callable[[], Step]:
        def start() -> Step:
            return FrameDecoder(self.read_file, frame).step
        return start


class ZstdFilter(Filter):
    name = "zstd"
    params = (Param("zstd-max-depth", "int", "decoded frames kept (LRU, shared by all clients)", default=8),)
    zstd_max_depth: int
    images: Images[ZstdImage]
    connection = ZstdConnection

    def config_complete(self) -> None:
        if self.zstd_max_depth < 1:
            raise ConfigError(f"zstd: zstd-max-depth={self.zstd_max_depth}: must be at least 1")
        self.images = Images(self.name, self.open_image)

    def open_image(self, below: Connection, file_size: int) -> ZstdImage:
        frames = read_frames(reader_of(below, file_size), file_size)
        if not frames.seekable:
            log.warning("zstd: the file is not in the seekable format (no seek table): %d frame(s), "
                        "each read sequentially from its start; random access will be slow",
                        len(frames.frames))
        return ZstdImage(frames, self.zstd_max_depth)
