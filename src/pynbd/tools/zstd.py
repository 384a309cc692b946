"""pynbd zstd — write a zstd file in the seekable format (random access for the zstd filter).

Usage:
    pynbd zstd create IN OUT.zst [--frame-size=SIZE] [--level=N]

Compresses IN into OUT.zst as independent frames of ``--frame-size`` input
bytes each (default 1M; K/M/G suffixes) followed by a seek table (facebook/zstd
``contrib/seekable_format``). ``zstd -d`` and every zstd reader read it as
usual; ``pynbd serve --filter=zstd file OUT.zst`` reads it anywhere, decoding
only the frames a request touches. Smaller frames mean faster random reads
and a slightly larger file. ``--level`` is zstd's (1-19, default 3).

Errors are one line on stderr, exit status 1.
"""

from __future__ import annotations

import argparse

from ..backend.params import parse_size
from ..formats.zstd_seekable import ZstdError, write_seekable
from .gzip import compress_file, run_command

PROG = "pynbd zstd"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Seekable zstd files.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("create", help="compress IN into a seekable OUT.zst")
    c.add_argument("input", metavar="IN")
    c.add_argument("output", metavar="OUT.zst")
    c.add_argument("--frame-size", type=parse_size, default=1 << 20, metavar="SIZE")
    c.add_argument("--level", type=int, default=3, choices=range(1, 20), metavar="N")
    return p


def _create(args: argparse.Namespace) -> int:
    if not 0 < args.frame_size < 1 << 32:
        raise ZstdError(f"--frame-size={args.frame_size}: must be between 1 byte and 4 GiB")
    size = compress_file(args.input, args.output, lambda read, size, write: write_seekable(
        read, size, write, args.frame_size, args.level))
    print(f"{args.output}: {size} bytes")
    return 0


def main(argv: list[str]) -> int:
    return run_command(PROG, {"create": _create}, build_parser().parse_args(argv), (ZstdError,))
