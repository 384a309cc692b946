"""gzip: serve the uncompressed contents of a gzip file, with random access.

    pynbd serve --filter=gzip file disk.img.gz
    pynbd serve --filter=gzip file disk.img.gz index=disk.img.gz.idx
    pynbd serve --filter=gzip file image.gz              (writable: see below)
    pynbd serve --filter=cache --filter=gzip file disk.img.gz cache-on-read=true

Parameters
    index=PATH   keep the random-access index in PATH: built and saved at the
                 first open, reused by later servers when it belongs to this
                 gzip file (same size, same first and last 64 KiB); an index
                 of another file is rebuilt, not trusted
    gzip-prefetch=BOOL
                 keep everything that building the index decodes in the
                 temporary file (below), written while the index is built,
                 so that every read after the open is a plain ``pread``.
                 Default true: the decoding is done anyway, and random reads
                 right after the open are then as fast as from a file; the
                 writing costs about 40% more CPU at the first open (0.5 s
                 per GiB here), so the first byte comes later. false keeps
                 the first open as fast as possible and TMPDIR use down to
                 the spans clients read. An index loaded from
                 ``index=`` decodes nothing at open: spans are then kept as
                 clients first read them. With gzip-prefetch and no
                 ``index=``, reads run on each connection's reading thread
                 (they are short); otherwise on a pool of worker threads, so
                 that one connection's reads decode spans in parallel.

At the first client's open the filter decodes the file once and keeps a
restart point about every MiB of output (zlib's ``zran.c`` method, at deflate
block boundaries, to the bit, with the 32 KiB of history each needs; see
``pydoc pynbd.formats.gzip_index``), and serves the first read as soon as
that is done (nbdkit's gzip filter first writes the whole uncompressed image
to a temporary file, then serves). Decoded data is kept in a sparse,
unlinked temporary file in ``$TMPDIR``, shared by all clients: the output of
that first decoding (``gzip-prefetch``), and any span (the output between two
points) a read needs before it is there, decoded whole. Every later read of
a span is a plain ``pread`` of that file. Each span is decoded at most once
by reads, also when several clients want it at the same time (the others
wait for it). Memory holds one byte per span; the file grows to at most the
uncompressed size. If ``$TMPDIR`` cannot hold it (ENOSPC, or no temporary
file can be made) the filter logs one warning and decodes the spans not kept
yet on each read from the nearest point, as far as the read needs, keeping
the 32 most recently used spans in memory.
Multi-member files (``pigz``, concatenated ``.gz``) work; zero padding after
the data is ignored. A damaged, truncated or non-gzip file refuses the open
with one line saying why (every member's CRC-32 is checked while indexing).

Modifiable images
    A file made by ``pynbd gzip create IN OUT.gz --stored=START-END,...``
    needs no index (its header lists where every part starts), opens at
    once, and is writable when the plugin is: writes wholly inside the stored
    ranges go into the file in place, then the trailer's CRC-32 is updated by
    combining per-block CRCs (only the 32 KiB blocks written are read back).
    A write that touches anything else fails with EPERM and a log line naming
    the stored ranges. Zeroing is writing zeroes; trim is not supported.

    If the server dies between a data write and its trailer update, the file
    holds the new data and an old trailer. The next writable open finds that
    the trailer does not match (it recomputes it from the stored ranges and
    the CRC-32s the header records for the compressed parts — it reads the
    stored ranges, never the compressed ones), logs a warning and rewrites
    it; offline, ``pynbd gzip repair OUT.gz`` does the same. Either way
    ``gzip -t`` passes again. Plain gzip files are read-only.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Generic, TypeVar

from ..backend import (
    CACHE_EMULATE,
    FLAG_FUA,
    Connection,
    Filter,
    FilterConnection,
    OpenContext,
    Param,
    io_error,
)
from ..backend.overlay import BlockLocks, pread_all, pwrite_all
from ..formats.gzip_index import GzipIndex, ReadFn, SpanDecoder, build_index, identity_of
from ..formats.gzip_stored import StoredGzip, open_layout

log = logging.getLogger("pynbd.filters.gzip")
CACHED_SPANS = 32
KEEP_PIECE = 1 << 20  # StreamKeeper writes pieces of this size
SPILL_STEP = 256 * 1024  # decode into the temporary file this much at a time
DECODE_STEP = 64 * 1024  # decode this much per call (liblzma is slower asked for a MiB at once)
T = TypeVar("T")


def reader_of(below: Connection, size: int) -> ReadFn:
    """``read(offset, count) -> bytes`` over a layer of ``size`` bytes (short at the end)."""
    def read(offset: int, count: int) -> bytes:
        count = min(count, size - offset)
        if count <= 0:
            return b""
        buf = bytearray(count)
        below.pread(memoryview(buf), offset, 0)
        return bytes(buf)
    return read


Step = Callable[[memoryview], int]


def refuse_write(name: str, count: int, offset: int, ranges: str) -> OSError:
    """Log a write outside the stored ranges of a modifiable image; the EPERM to raise."""
    log.error("%s: write of %d bytes at offset %d refused: outside the stored ranges (%s)",
              name, count, offset, ranges)
    return io_error(errno.EPERM, f"{name}: writes must fall inside the stored ranges ({ranges})")


class Progressive:
    """One decoded piece (a gzip span, an xz block, a zstd frame), decoded only as far
    as reads have needed so far.

    ``start()`` makes the decoder at the first read; its ``step(view)`` fills the
    start of ``view`` and returns how many bytes it wrote. A random 4 KiB read
    decodes half a piece on average instead of all of it, and a later read
    further in continues where the decoder stopped. Bytes below ``filled``
    never change, so they are copied out without the lock.
    """

    def __init__(self, size: int, start: Callable[[], Step], whole: bool = False) -> None:
        self.whole = whole
        self.data = memoryview(bytearray(size))
        self.filled = 0
        self.start = start
        self.step: Step | None = None
        self.lock = threading.Lock()

    def copy(self, buf: memoryview, inner: int) -> None:
        end = inner + len(buf)
        if self.filled < end:
            decode_to = len(self.data) if self.whole else end
            with self.lock:
                if self.step is None:
                    self.step = self.start()
                while self.filled < decode_to:
                    target = min(len(self.data), self.filled + DECODE_STEP)
                    made = self.step(self.data[self.filled:target])
                    if made <= 0:
                        raise ValueError(f"the compressed data ends {len(self.data) - self.filled} "
                                         "bytes early")
                    self.filled += made
        buf[:] = self.data[inner:end]


def damaged(name: str, exc: ValueError) -> OSError:
    """Log a piece that failed to decode (GzipError, XzError, ZstdError); the EIO to raise."""
    log.error("%s: %s", name, exc)
    return io_error(errno.EIO, f"{name}: {exc}")


class DecodedCache:
    """The most recently used pieces (number -> Progressive), shared by every client.

    Least recently used pieces are dropped beyond ``capacity``; a piece whose
    decoding failed is dropped at once. Decoding happens outside the cache's
    lock, one piece at a time per piece, so different pieces decode in parallel
    (zlib, liblzma and zstd release the GIL). The xz and zstd filters use it too.
    """

    def __init__(self, name: str, capacity: int, whole: bool = False) -> None:
        self.name = name
        self.whole = whole
        self.capacity = max(1, capacity)
        self.pieces: OrderedDict[int, Progressive] = OrderedDict()
        self.lock = threading.Lock()

    def copy(self, key: int, size: int, start: Callable[[], Step], buf: memoryview, inner: int) -> None:
        """Fill ``buf`` from byte ``inner`` of piece ``key`` (``size`` bytes, decoded by ``start()``)."""
        with self.lock:
            piece = self.pieces.get(key)
            if piece is None:
                piece = self.pieces[key] = Progressive(size, start, self.whole)
                while len(self.pieces) > self.capacity:
                    self.pieces.popitem(last=False)
            else:
                self.pieces.move_to_end(key)
        try:
            piece.copy(buf, inner)
        except ValueError as exc:  # GzipError, XzError, ZstdError: a damaged piece
            with self.lock:
                if self.pieces.get(key) is piece:
                    del self.pieces[key]
            raise damaged(self.name, exc) from None


class SpillCache:
    """Decoded pieces kept in a sparse, unlinked temporary file in ``$TMPDIR``.

    Piece ``key`` covers bytes [out, out + size) of the uncompressed image and
    sits at that offset in the file. The first read of a piece decodes it
    whole under the piece's lock (``BlockLocks``, as the cow overlay's), so a
    piece is decoded at most once however many readers want it; ``present``
    (one byte per piece, in memory) is set after its bytes are written, and
    later reads are plain ``pread`` calls, without a lock. A damaged piece is
    never kept (its reads fail with EIO). If no temporary file can be made,
    or writing it fails (ENOSPC), one warning is logged and pieces not kept
    yet are read through ``fallback`` (the in-memory LRU); pieces already
    kept are still read from the file.
    """

    def __init__(self, name: str, size: int, pieces: int, fallback: DecodedCache,
                 file: IO[bytes] | None = None) -> None:
        self.name = name
        self.fallback = fallback
        self.present = bytearray(pieces)
        self.locks = BlockLocks()
        self.full = False
        self.fd = -1
        self.file: IO[bytes] | None = None
        try:
            self.file = file or tempfile.TemporaryFile(prefix=f"pynbd-{name}-")
            self.fd = self.file.fileno()
            os.ftruncate(self.fd, size)
        except OSError as exc:
            self.give_up(exc)

    def give_up(self, exc: OSError) -> None:
        """Stop keeping pieces (the file cannot take them); warn once."""
        if not self.full:
            self.full = True
            log.warning("%s: cannot keep decoded data in a temporary file in %s (%s): decoding on "
                        "each read instead", self.name, tempfile.gettempdir(), exc.strerror or exc)

    def copy(self, key: int, out: int, size: int, start: Callable[[], Step], buf: memoryview,
             inner: int) -> None:
        """Fill ``buf`` from byte ``inner`` of piece ``key`` (``size`` bytes at ``out``)."""
        if not self.present[key]:
            with self.locks.one(key):
                kept = self.present[key] or self._keep(key, out, size, start)
            if not kept:
                self.fallback.copy(key, size, start, buf, inner)
                return
        pread_all(self.fd, buf, out + inner)

    def _keep(self, key: int, out: int, size: int, start: Callable[[], Step]) -> bool:
        """Decode piece ``key`` into the file; False if the file cannot take it."""
        if self.full:
            return False
        scratch = memoryview(bytearray(min(size, SPILL_STEP)))
        done = 0
        try:
            step = start()  # (an error reading the compressed file is the read's error)
            while done < size:
                made = step(scratch[:size - done])
                if made <= 0:
                    raise ValueError(f"the compressed data ends {size - done} bytes early")
                try:
                    pwrite_all(self.fd, scratch[:made], out + done)
                except OSError as exc:
                    self.give_up(exc)
                    return False
                done += made
        except ValueError as exc:
            raise damaged(self.name, exc) from None
        self.present[key] = 1
        log.debug("%s: piece %d (%d bytes at %d) decoded into the temporary file", self.name, key,
                  size, out)
        return True


class StreamKeeper:
    """Writes a whole decoded image, as a decoder produces it from offset 0 on,
    into an unlinked temporary file, in pieces of ``KEEP_PIECE`` bytes.

    ``write(view)`` takes each view; ``finish(spill)`` hands the file over
    to ``spill`` (made with ``file=keeper.file``): all its pieces become
    present, or, if a write failed (ENOSPC), ``spill`` gives up keeping with
    that error. ``finish(None)`` (the decoding failed) drops what is left.
    (Writing on the decoding thread costs less than handing the pieces to a
    thread of its own: measured, the handoffs cost more than the writes.)
    """

    def __init__(self, name: str) -> None:
        self.file: IO[bytes] | None = None
        self.error: OSError | None = None
        try:
            self.file = tempfile.TemporaryFile(prefix=f"pynbd-{name}-")
        except OSError as exc:
            self.error = exc
        self.pending = bytearray()
        self.written = 0

    def write(self, view: memoryview) -> None:
        if self.error is None:
            self.pending += view
            if len(self.pending) >= KEEP_PIECE:
                self._flush()

    def _flush(self) -> None:
        if self.error is None and self.file is not None:
            try:
                pwrite_all(self.file.fileno(), self.pending, self.written)
            except OSError as exc:
                self.error = exc
        self.written += len(self.pending)
        self.pending = bytearray()

    def finish(self, spill: SpillCache | None) -> None:
        if spill is None:
            return
        self._flush()
        if self.error is not None:
            spill.give_up(self.error)
        else:
            spill.present[:] = b"\1" * len(spill.present)
            log.debug("%s: the whole image (%d bytes) is in the temporary file", spill.name, self.written)


class Images(Generic[T]):
    """What a filter learned about each export's file at its first open (an index),
    shared by later opens, which wait for it; rebuilt if the file's size changed.

    ``build(below, file_size)`` makes it; a ValueError it raises (a damaged
    file) refuses the open with EINVAL and that one-line message, which the
    server logs. The xz and zstd filters use it too.
    """

    def __init__(self, name: str, build: Callable[[Connection, int], T]) -> None:
        self.name = name
        self.build = build
        self.table: dict[str, tuple[int, T]] = {}
        self.lock = threading.Lock()

    def get(self, below: Connection, ctx: OpenContext) -> T:
        with self.lock:
            file_size = below.get_size()
            entry = self.table.get(ctx.export_name)
            if entry is None or entry[0] != file_size:
                try:
                    entry = (file_size, self.build(below, file_size))
                except ValueError as exc:
                    raise io_error(errno.EINVAL, f"{self.name}: {exc}") from None
                self.table[ctx.export_name] = entry
            return entry[1]


@dataclass
class Image:
    """What the filter knows about one gzip file, shared by its connections."""

    file_size: int
    index: GzipIndex
    stored: StoredGzip | None
    spans: SpillCache
    write_lock: threading.Lock = field(default_factory=threading.Lock)


F = TypeVar("F")


class DecodedConnection(FilterConnection[F]):
    """What the gzip, xz and zstd filters' connections share: a decoded image is
    read-only except where a modifiable image keeps bytes as they are (``stored``
    is then not None) and the layer below is writable; no extents; cache requests
    are served by reading; one shared cache, so multi-conn is safe when read-only."""

    def stored(self) -> object | None:
        """The image's stored (modifiable) ranges, or None for a read-only image."""
        return None

    def block_size(self) -> tuple[int, int, int]:
        return (0, 0, 0)

    def can_write(self) -> bool:
        return self.stored() is not None and self.next.can_write()

    def can_zero(self) -> bool:
        return self.can_write()

    def can_fast_zero(self) -> bool:
        return False

    def can_trim(self) -> bool:
        return False

    def can_extents(self) -> bool:
        return False

    def can_cache(self) -> int:
        return CACHE_EMULATE

    def can_multi_conn(self) -> bool:
        return self.stored() is None or self.next.can_multi_conn()


class GzipConnection(DecodedConnection["GzipFilter"]):
    def __init__(self, next: Connection, filter: GzipFilter, ctx: OpenContext) -> None:
        super().__init__(next, filter, ctx)
        self.image = filter.images.get(next, ctx)
        self.read_file = reader_of(next, self.image.file_size)
        self.is_stored = [False] * len(self.image.index.points)
        if self.image.stored is not None:
            self.is_stored = [s.stored for s in self.image.stored.segments]

    def stored(self) -> object | None:
        return self.image.stored

    def get_size(self) -> int:
        return self.image.index.size

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        image = self.image
        index = image.index
        i = index.find(offset)
        pos = 0
        end = offset + len(buf)
        while offset + pos < end:
            start, stop = index.starts[i], index.span_end(i)
            take = min(stop, end) - (offset + pos)
            if self.is_stored[i]:
                self._read_stored(buf[pos:pos + take], offset + pos)
            else:
                image.spans.copy(i, start, stop - start, self._span_decoder(i), buf[pos:pos + take],
                                 offset + pos - start)
            pos += take
            i += 1

    def _span_decoder(self, i: int) -> Callable[[], Step]:
        def start() -> Step:
            return SpanDecoder(self.read_file, self.image.index, i, self.image.file_size).step
        return start

    def _read_stored(self, buf: memoryview, offset: int) -> None:
        stored = self.image.stored
        assert stored is not None, "a stored span in a file without a layout"
        pos = 0
        for _leaf, _block, _length, file_offset, take in stored.stored_pieces(offset, len(buf)) or ():
            self.next.pread(buf[pos:pos + take], file_offset, 0)
            pos += take

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        stored = self.image.stored
        pieces = None if stored is None else stored.stored_pieces(offset, len(buf))
        if stored is None or pieces is None:
            raise refuse_write("gzip", len(buf), offset, "none" if stored is None else stored.ranges())
        fua = flags & FLAG_FUA
        with self.image.write_lock:
            pos = 0
            for leaf, block_start, block_length, file_offset, take in pieces:
                piece = buf[pos:pos + take]
                self.next.pwrite(piece, file_offset, fua)
                if take == block_length:
                    crc = zlib.crc32(piece)
                else:
                    block = bytearray(block_length)
                    self.next.pread(memoryview(block), file_offset - (offset + pos - block_start), 0)
                    crc = zlib.crc32(block)
                stored.tree.update(leaf, crc)
                pos += take
            self.next.pwrite(memoryview(stored.trailer()), stored.trailer_offset(), fua)

    def zero(self, count: int, offset: int, flags: int) -> None:
        Connection.zero(self, count, offset, flags)


class GzipFilter(Filter):
    name = "gzip"
    params = (
        Param("index", "path", "file to keep the random-access index in (built once, reused)"),
        Param("gzip-prefetch", "bool", "keep all that indexing decodes in the temporary file",
              default=True),
    )
    index: str | None
    gzip_prefetch: bool
    images: Images[Image]
    connection = GzipConnection

    def config_complete(self) -> None:
        self.images = Images(self.name, self.open_image)

    def requests_are_short(self) -> bool:
        """With the image kept whole at open, a read is a pread of the temporary file (or, until
        that file is complete or when it cannot be written, the decoding of one span): short
        enough to run on the connection's reading thread, without a hop to a worker thread."""
        return self.gzip_prefetch and self.index is None

    def open_image(self, below: Connection, file_size: int) -> Image:
        read = reader_of(below, file_size)
        layout = open_layout(read, file_size)
        if layout is not None:
            stored = StoredGzip(read, file_size, layout)
            self._check_trailer(below, read, stored)
            index = stored.index()
            return Image(file_size, index, stored, self.spans_of(index))
        identity = b""
        if self.index is not None:
            identity = identity_of(read, file_size)
            saved = GzipIndex.load(self.index, identity)
            if saved is not None:
                return Image(file_size, saved, None, self.spans_of(saved))
        keeper = StreamKeeper(self.name) if self.gzip_prefetch else None
        spans = None
        try:
            index = build_index(read, file_size, sink=keeper.write if keeper else None)
            spans = self.spans_of(index, keeper.file if keeper else None)
        finally:
            if keeper is not None:
                keeper.finish(spans)
        if self.index is not None:
            try:
                index.save(self.index, identity)
            except OSError as exc:
                log.warning("gzip: cannot save the index in %s: %s", self.index, exc.strerror or exc)
        return Image(file_size, index, None, spans)

    @staticmethod
    def spans_of(index: GzipIndex, file: IO[bytes] | None = None) -> SpillCache:
        return SpillCache("gzip", index.size, len(index.points), DecodedCache("gzip", CACHED_SPANS), file)

    @staticmethod
    def _check_trailer(below: Connection, read: ReadFn, stored: StoredGzip) -> None:
        if stored.trailer_is_current(read):
            return
        if below.can_write():
            below.pwrite(memoryview(stored.trailer()), stored.trailer_offset(), 0)
            if below.can_flush():
                below.flush(0)
            log.warning("gzip: the trailer did not match the stored ranges (a write was interrupted); "
                        "rewrote it")
        else:
            log.warning("gzip: the trailer does not match the stored ranges (a write was interrupted); "
                        "serving the data anyway; 'pynbd gzip repair FILE' fixes it")

