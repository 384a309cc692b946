"""pynbd gzip — make a gzip image that can be modified in place, and repair its trailer.

Usage:
    pynbd gzip create IN OUT.gz --stored=START-END[,START-END…] [--level=N]
    pynbd gzip repair FILE.gz
    pynbd gzip show FILE.gz

``create`` compresses IN into OUT.gz, a standard gzip file (``gzip -t``,
``zcat`` and nbdkit's gzip filter read it) in which each listed range of IN is
kept uncompressed, as deflate stored blocks. ``pynbd serve --filter=gzip file
OUT.gz`` then serves it writable: writes inside those ranges go into the file
in place and the trailer's CRC-32 is updated by combining CRCs, never by
reading the whole file again.

Ranges are START-END, END exclusive, with K/M/G suffixes (``1M-65M``). START
and END must be multiples of 512 (END may also be the size of IN); ranges may
not overlap. ``--level`` is the compression level of the rest (1-9, default 6).
See ``pydoc pynbd.formats.gzip_stored`` for the layout.

``repair`` recomputes the trailer of such a file from its stored ranges and
the CRC-32s of its compressed parts recorded in the header (it reads only the
stored ranges): after a crash between a write and its trailer update, this
makes ``gzip -t`` pass again. The gzip filter does the same when it opens the
file writable. ``show`` lists the segments.

Errors are one line on stderr, exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TypeVar

from ..formats.gzip_index import GzipError, ReadFn
from ..formats.gzip_stored import RangeError, StoredGzip, WriteFn, create, open_layout, parse_ranges

PROG = "pynbd gzip"
T = TypeVar("T")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Modifiable gzip images.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("create", help="compress IN into OUT.gz with stored (modifiable) ranges")
    c.add_argument("input", metavar="IN")
    c.add_argument("output", metavar="OUT.gz")
    c.add_argument("--stored", required=True, metavar="START-END[,…]")
    c.add_argument("--level", type=int, default=6, choices=range(1, 10), metavar="N")
    r = sub.add_parser("repair", help="rewrite the trailer of a modifiable gzip file")
    r.add_argument("file", metavar="FILE.gz")
    s = sub.add_parser("show", help="list the segments of a modifiable gzip file")
    s.add_argument("file", metavar="FILE.gz")
    return p


def file_reader(fd: int) -> ReadFn:
    def read(offset: int, count: int) -> bytes:
        return os.pread(fd, count, offset)
    return read


def compress_file(source: str, target: str, make: Callable[[ReadFn, int, WriteFn], T]) -> T:
    """Run ``make(read, size, write)`` from file ``source`` into a new file ``target``
    (fsynced before returning). The xz and zstd tools use it too."""
    fd_in = os.open(source, os.O_RDONLY)
    try:
        size = os.fstat(fd_in).st_size
        read = file_reader(fd_in)
        fd_out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            def write(offset: int, data: bytes) -> None:
                os.pwrite(fd_out, data, offset)
            result = make(read, size, write)
            os.fsync(fd_out)
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)
    return result


def run_command(prog: str, commands: dict[str, Callable[[argparse.Namespace], int]],
                args: argparse.Namespace, errors: tuple[type[Exception], ...]) -> int:
    """Run the chosen subcommand; an OSError or one of ``errors`` (the user's
    mistakes, damaged files) is one line on stderr and status 1."""
    caught: tuple[type[Exception], ...] = (OSError, RangeError, *errors)
    try:
        return commands[args.command](args)
    except caught as exc:
        text = f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) and exc.filename else str(exc)
        print(f"{prog}: {text}", file=sys.stderr)
        return 1


def _open_stored(fd: int, path: str) -> StoredGzip:
    size = os.fstat(fd).st_size
    layout = open_layout(file_reader(fd), size)
    if layout is None:
        raise GzipError(f"{path} is a gzip file without stored ranges (not made by 'pynbd gzip create')")
    return StoredGzip(file_reader(fd), size, layout)


def _create(args: argparse.Namespace) -> int:
    segments = compress_file(args.input, args.output, lambda read, size, write: create(
        read, size, write, parse_ranges(args.stored, size), args.level))
    stored = sum(s.length for s in segments if s.stored)
    print(f"{args.output}: {len(segments)} segments, {stored} bytes stored in "
          f"{sum(1 for s in segments if s.stored)} ranges")
    return 0


def _repair(args: argparse.Namespace) -> int:
    fd = os.open(args.file, os.O_RDWR)
    try:
        g = _open_stored(fd, args.file)
        if g.trailer_is_current(file_reader(fd)):
            print(f"{args.file}: trailer is correct")
            return 0
        os.pwrite(fd, g.trailer(), g.trailer_offset())
        os.fsync(fd)
    finally:
        os.close(fd)
    print(f"{args.file}: trailer repaired (CRC-32 {g.tree.crc:08x})")
    return 0


def _show(args: argparse.Namespace) -> int:
    fd = os.open(args.file, os.O_RDONLY)
    try:
        g = _open_stored(fd, args.file)
    finally:
        os.close(fd)
    for seg in g.segments:
        kind = "stored" if seg.stored else "deflate"
        print(f"{kind:8} {seg.out:>14} {seg.length:>12}  file {seg.file:>14} {seg.file_length:>12}")
    print(f"stored ranges: {g.ranges()}")
    return 0


def main(argv: list[str]) -> int:
    return run_command(PROG, {"create": _create, "repair": _repair, "show": _show},
                       build_parser().parse_args(argv), (GzipError,))
