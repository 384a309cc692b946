"""data: a disk written on the command line.

    pynbd serve data '0 1 2 3 @0x1fe 0x55 0xaa'
    pynbd serve data '( 0x55 0xAA )*2048'
    pynbd serve data ' ( "Hello" )*2000 ' size=8192
    pynbd serve data ' <(while :; do printf "%04x" $((i++)); done) [:2048] '
    pynbd serve data ' </dev/urandom[:512]*16 '
    pynbd serve data ' @32768 1 ' --run 'nbdinfo --map "$uri"'
    pynbd serve data '$sig*16' sig='0x55 0xAA'
    pynbd serve data base64=MTIz size=1M
    pynbd serve data raw='Hello, world!'

Parameters (exactly one of data, base64 and raw)
    [data=]EXPR        the disk in the data language below (the magic parameter)
    base64=TEXT        the disk's bytes, base64-encoded
    raw=TEXT           the disk's bytes, as given (encoded like file names)
    size=SIZE          cut the disk to SIZE or extend it with zeroes
    allocator=sparse   extents report 32 KiB pages never written as holes (default)
    allocator=zstd     accepted for nbdkit's command lines; the same as sparse
    allocator=malloc   extents report the whole disk as data
    NAME=EXPR          any other key is a variable for $NAME in the expression

The data language (nbdkit-data-plugin's). Bytes are written one after the
other from offset 0; the disk is as large as the highest offset reached.
    BYTE           0..255 in decimal, octal (017) or hex (0x1f)
    le16:W be16:W le32:W be32:W le64:W be64:W   a word, little or big endian
    "STRING"       its bytes; C escapes \\n \\t \\\\ \\" \\xHH \\OOO
    @N @+N @-N     move to offset N, forwards or backwards by N
    @^N            move forward to a multiple of N (a power of 2)
    <FILE          the file's contents (no spaces in the name)
    <(COMMAND)     the output of bash -c COMMAND (/bin/sh without bash); parentheses must pair
    ( ... )        a group: offsets inside are relative to its start
    EXPR*N         EXPR repeated N times
    EXPR[N:M] EXPR[:M] EXPR[N:]   bytes N to M-1 of EXPR
    EXPR -> \\NAME  name EXPR (not written); \\NAME writes it, within its group
    $VAR           a variable (a parameter, else the environment), as a group
    # ...          a comment to the end of the line

Holes: bytes never written (after @, inside groups, zero bytes such as
0*N) read as zero and are reported by extents as holes, page by page, as
nbdkit does. Repetition is lazy: '( 0x55 0xAA )*1000000000' is a 2 GB disk
that takes a few bytes of memory, and slices of <FILE or <(COMMAND) read
only what they need, so endless commands are fine under [:N].

-D data.AST=1 (with -v) prints the parsed disk, segment by segment.

The disk is writable (unless -r) and shared by every client; writes live in
memory until the server exits. Malformed expressions are refused with one
line naming the offset ("data: unexpected ')' at offset 14"); a command that
fails is refused with its exit status.

Limits: nbdkit's data plugin has no escapes beyond \\\\ and \\"; this one
accepts C's. Pages that were written but hold only zeroes may be reported as
holes where nbdkit says "zero" (both mean the bytes read as zero).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import threading
from collections.abc import Iterator

from ..backend import (
    ConfigError,
    Connection,
    Extent,
    OpenContext,
    Param,
    Plugin,
    RamDisk,
    block_runs,
    fill_zero,
)
from ..backend.debugflags import debug_flag
from ..backend.params import MAX_SIZE
from ._datalang import PAGE, Image, evaluate

log = logging.getLogger("pynbd.plugins.data")
ZERO_PAGE = bytes(PAGE)
_CHECK_CHUNK = 32 * PAGE  # pages are checked for zeroes 1 MiB at a time


class DataDisk(RamDisk):
    """The evaluated image, with the pages clients wrote laid over it.

    ``overlay`` maps a page number to its bytes, or to None when the page
    was zeroed or trimmed whole (a hole again).
    """

    def __init__(self, image: Image, report_holes: bool) -> None:
        super().__init__(image.size)
        self.image = image
        self.report_holes = report_holes
        self.overlay: dict[int, bytearray | None] = {}
        self._create = threading.Lock()

    # -- data (trim and zero are fast: they only drop or clear overlay pages)

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        if not self.overlay:
            self.image.read_into(buf, offset)
            return
        get = self.overlay.get
        for page, inner, take, pos in block_runs(offset, len(buf), PAGE):
            part = buf[pos:pos + take]
            if page not in self.overlay:
                self.image.read_into(part, offset + pos)
                continue
            data = get(page)
            if data is None:
                fill_zero(part)
            else:
                part[:] = data[inner:inner + take]

    def _writable_page(self, page: int) -> bytearray:
        data = self.overlay.get(page)
        if data is not None:
            return data
        with self._create:
            data = self.overlay.get(page)
            if data is None:
                fresh = bytearray(PAGE)
                if page not in self.overlay:
                    start = page * PAGE
                    self.image.read_into(memoryview(fresh)[:min(PAGE, self.size - start)], start)
                self.overlay[page] = data = fresh
        return data

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        for page, inner, take, pos in block_runs(offset, len(buf), PAGE):
            self._writable_page(page)[inner:inner + take] = buf[pos:pos + take]

    def zero(self, count: int, offset: int, flags: int) -> None:
        for page, inner, take, _ in block_runs(offset, count, PAGE):
            if take == PAGE or (inner == 0 and page * PAGE + take >= self.size):
                self.overlay[page] = None
            else:
                self._writable_page(page)[inner:inner + take] = ZERO_PAGE[:take]

    def trim(self, count: int, offset: int, flags: int) -> None:
        self.zero(count, offset, flags)

    # -- extents

    def extents(self, count: int, offset: int, flags: int) -> Iterator[Extent]:
        if not self.report_holes:
            yield Extent(offset, count)
            return
        end = min(offset + count, self.size)
        pos = offset - offset % PAGE
        if self.overlay:
            lo, hi = pos // PAGE, (end - 1) // PAGE
            for page in sorted(p for p in list(self.overlay) if lo <= p <= hi):
                yield from self._base_extents(pos, page * PAGE)
                yield self._overlay_extent(page)
                pos = (page + 1) * PAGE
        yield from self._base_extents(pos, end)

    def _overlay_extent(self, page: int) -> Extent:
        start = page * PAGE
        length = min(PAGE, self.size - start)
        data = self.overlay.get(page)
        if data is None:
            return Extent(start, length, hole=True, zero=True)
        return Extent(start, length, zero=data[:length] == ZERO_PAGE[:length])

    def _base_extents(self, lo: int, hi: int) -> Iterator[Extent]:
        """Page-granular extents of the evaluated image in [lo, hi)."""
        pos = lo
        for start, stop, nonzero in self.image.spans(lo, hi):
            start = max(start - start % PAGE, pos)
            stop = min(-(-stop // PAGE) * PAGE, hi)
            if stop <= start:
                continue
            if start > pos:
                yield Extent(pos, start - pos, hole=True, zero=True)
            yield from ((Extent(start, stop - start),) if nonzero else self._checked(start, stop))
            pos = stop
        if pos < hi:
            yield Extent(pos, hi - pos, hole=True, zero=True)

    def _checked(self, lo: int, hi: int) -> Iterator[Extent]:
        """Allocated pages in [lo, hi): data, or zero when they hold only zeroes."""
        scratch = memoryview(bytearray(_CHECK_CHUNK))
        for chunk in range(lo, hi, _CHECK_CHUNK):
            n = min(_CHECK_CHUNK, hi - chunk)
            view = scratch[:n]
            self.image.read_into(view, chunk)
            for inner in range(0, n, PAGE):
                take = min(PAGE, n - inner)
                yield Extent(chunk + inner, take, zero=view[inner:inner + take] == ZERO_PAGE[:take])


class DataPlugin(Plugin):
    short_requests = True
    name = "data"
    magic_param = "data"
    accept_unknown_params = True  # NAME=EXPR variables
    params = (
        Param("data", "str", "the disk in the data language"),
        Param("base64", "str", "the disk's bytes, base64-encoded"),
        Param("raw", "str", "the disk's bytes"),
        Param("size", "size", "truncate or extend the disk to this size"),
        Param("allocator", "str", "sparse|malloc|zstd: how extents are reported", default="sparse"),
    )
    data: str | None
    base64: str | None
    raw: str | None
    size: int | None
    allocator: str

    def config_complete(self) -> None:
        given = [(key, text) for key, text in (("data", self.data), ("base64", self.base64),
                                               ("raw", self.raw)) if text is not None]
        if len(given) != 1:
            raise ConfigError("data: exactly one of data=, base64= or raw= must be given")
        declared = {p.name for p in self.params}
        extra = sorted(k for k, v in vars(self).items() if k not in declared and isinstance(v, str))
        if extra and self.data is None:
            raise ConfigError(f"data: extra parameters passed and not using data='...': {', '.join(extra)}")
        kind = self.allocator.split(",")[0]
        if kind not in ("sparse", "malloc", "zstd"):
            raise ConfigError(f"data: allocator: {self.allocator!r} is not sparse, malloc or zstd")
        image = self._image(*given[0])
        if debug_flag(self.name, "AST"):
            log.debug("BEGIN AST (-D data.AST=1)")
            for line in image.describe():
                log.debug("%s", line)
            log.debug("END AST")
        if self.size is not None:
            image = image.resized(self.size)
        if image.size > MAX_SIZE:
            raise ConfigError("data: the disk is larger than 2^63-1 bytes")
        self.disk = DataDisk(image, report_holes=kind != "malloc")

    def _image(self, kind: str, text: str) -> Image:
        """The disk that ``kind=text`` (data, base64 or raw) describes."""
        if kind == "raw":  # bytes given explicitly are allocated, zeroes included (as nbdkit)
            return Image.of_bytes(os.fsencode(text), zero_is_hole=False)
        if kind == "base64":
            try:
                return Image.of_bytes(base64.b64decode(text, validate=True), zero_is_hole=False)
            except (binascii.Error, ValueError) as exc:
                raise ConfigError(f"data: base64: {exc}") from None
        declared = {p.name for p in self.params}
        variables = {k: v for k, v in vars(self).items()
                     if k not in declared and isinstance(v, str)}
        return evaluate(text, variables)

    def dump_plugin(self) -> list[str]:
        return ["data_base64=yes", "mlock=no"]

    def open(self, ctx: OpenContext) -> Connection:
        return self.disk
