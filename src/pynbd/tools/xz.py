"""pynbd xz — make an xz image that can be modified in place, and repair its checks.

Usage:
    pynbd xz create IN OUT.xz --stored=START-END[,START-END…] [--preset=N]
    pynbd xz repair FILE.xz

``create`` compresses IN into OUT.xz, a standard xz file (``xz -t``, ``xz -d``
and nbdkit's xz filter read it) in which each listed range of IN is kept
uncompressed: 64 KiB per block, as uncompressed LZMA2 chunks with CRC-32
checks. The rest is compressed a MiB per stream (``--preset``, default 6),
which also makes it randomly accessible. ``pynbd serve --filter=xz file
OUT.xz`` then serves it writable: writes inside the stored ranges go into the
file in place and the checks of the blocks written are updated.

Ranges are START-END as for ``pynbd gzip create``: END exclusive, K/M/G
suffixes, START and END multiples of 512 (END may be the size of IN), no
overlaps. See ``pydoc pynbd.formats.xz_stored`` for the layout.

``repair`` rewrites the checks of stored blocks that do not match their data
(after a crash between a write and its check update), reading only the
stored ranges; the xz filter does the same when it opens the file writable.

Errors are one line on stderr, exit status 1.
"""

from __future__ import annotations

import argparse
import os

from ..formats.gzip_stored import parse_ranges
from ..formats.xz import XzError, read_index
from ..formats.xz_stored import StoredXz, check_of, check_offset, create, data_offset, stale_blocks
from .gzip import compress_file, file_reader, run_command

PROG = "pynbd xz"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Modifiable xz images.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("create", help="compress IN into OUT.xz with stored (modifiable) ranges")
    c.add_argument("input", metavar="IN")
    c.add_argument("output", metavar="OUT.xz")
    c.add_argument("--stored", required=True, metavar="START-END[,…]")
    c.add_argument("--preset", type=int, default=6, choices=range(0, 10), metavar="N")
    r = sub.add_parser("repair", help="rewrite stale block checks of a modifiable xz file")
    r.add_argument("file", metavar="FILE.xz")
    return p


def _create(args: argparse.Namespace) -> int:
    size = compress_file(args.input, args.output, lambda read, size, write: create(
        read, size, write, parse_ranges(args.stored, size), args.preset))
    print(f"{args.output}: {size} bytes")
    return 0


def _repair(args: argparse.Namespace) -> int:
    fd = os.open(args.file, os.O_RDWR)
    try:
        read = file_reader(fd)
        stored = StoredXz(read, read_index(read, os.fstat(fd).st_size))
        if not stored.blocks:
            raise XzError(f"{args.file} has no stored blocks (not made by 'pynbd xz create')")
        stale = stale_blocks(read, stored)
        for block in stale:
            os.pwrite(fd, check_of(read(data_offset(block), block.size)), check_offset(block))
        os.fsync(fd)
    finally:
        os.close(fd)
    print(f"{args.file}: {len(stale)} block check(s) repaired" if stale
          else f"{args.file}: checks are correct")
    return 0


def main(argv: list[str]) -> int:
    return run_command(PROG, {"create": _create, "repair": _repair}, build_parser().parse_args(argv),
                       (XzError,))
