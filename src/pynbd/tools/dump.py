"""pynbd dump — a hex dump of an NBD export (nbddump).

Usage:
    pynbd dump [-n N | --length=N] URI
    pynbd dump [-n N] -- [ CMD ARGS ... ]          a captive server

Each line shows the offset (10 hex digits), 16 bytes in hex split 8 + 8, and
the printable ASCII characters between bars, in the style of ``hexdump -C``:

    0000000000: 01 02 03 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|
    0000000010: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|
    *
    0000000ff0: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|

Runs of identical lines are folded into one ``*``; the last line of the
dump is always printed. ``-n N`` stops after N bytes (K/M/G suffixes
allowed). The export is read a megabyte at a time; long zero runs are
skipped without formatting them.

Errors (bad URI, no server, unknown export) are one line on stderr, exit 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import TextIO

from ..backend.params import parse_size
from ..client import NBD
from ..client.sync import connect
from ..client.target import (
    Target,
    UsageError,
    add_version,
    one_target,
    parse_command_line,
    report,
    usage_error,
)

PROG = "pynbd dump"
CHUNK = 1 << 20
LINE = 16
_PRINTABLE = bytes(b if 0x20 <= b < 0x7F else ord(".") for b in range(256))
_ZERO_LINE = bytes(LINE)
_ZEROS = memoryview(bytes(CHUNK))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Hex dump the content of an NBD export.",
                                usage="%(prog)s [-n N] URI | [-n N] -- [ CMD ARGS ... ]")
    p.add_argument("-n", "--length", metavar="N", help="dump at most N bytes")
    p.add_argument("--color", "--colour", "--no-color", "--no-colour", dest="color",
                   action="store_true", help="accepted for nbddump compatibility")
    add_version(p)
    p.add_argument("uri", nargs="?", help="NBD URI")
    return p


def main(argv: list[str]) -> int:
    try:
        args, captive = parse_command_line(build_parser(), argv)
        target = one_target(args.uri, captive)
        limit = _length(args.length)
    except UsageError as exc:
        return usage_error(PROG, exc)
    return report(PROG, lambda: _dump(target, limit))


def _length(text: str | None) -> int | None:
    try:
        return None if text is None else parse_size(text)
    except ValueError as exc:
        raise UsageError(f"-n: {exc}") from None


def _dump(target: Target, limit: int | None) -> int:
    with connect(target) as h:
        size = h.get_size() if limit is None else min(limit, h.get_size())
        try:
            write_dump(chunks(h, size), sys.stdout, show_last=size == h.get_size())
        except BrokenPipeError:
            sys.stderr.close()  # the reader went away (| head): not an error
    return 0


def chunks(h: NBD, size: int) -> Iterator[tuple[int, memoryview]]:
    """(offset, data) of the first ``size`` bytes, a megabyte at a time, one buffer reused."""
    buf = bytearray(min(size, CHUNK))
    view = memoryview(buf)
    for offset in range(0, size, CHUNK):
        piece = view[:min(CHUNK, size - offset)]
        h.pread_into(piece, offset)
        yield offset, piece


def format_line(offset: int, data: bytes) -> str:
    """One dump line for up to 16 bytes at ``offset``."""
    left, right = data[:8].hex(" "), data[8:].hex(" ")
    hexes = f"{left:<23}  {right:<23}" if right else f"{left:<23}"
    return f"{offset:010x}: {hexes:<48} |{data.translate(_PRINTABLE).decode('ascii'):<16}|"


def write_dump(source: Iterator[tuple[int, memoryview]], out: TextIO,
               show_last: bool = True) -> None:
    """Write the dump of ``source`` to ``out``, folding repeated lines.

    A short final line counts as a repeat when it matches the start of the
    line before; a folded last line is shown again when ``show_last`` (the
    dump reaches the end of the export), as nbddump does.
    """
    previous: bytes | None = None
    folded = False
    last: tuple[int, bytes] | None = None
    for base, data in source:
        end = len(data)
        if previous == _ZERO_LINE and data == _ZEROS[:end]:
            folded = _fold(out, folded)
            tail = (end - 1) // LINE * LINE
            last = (base + tail, bytes(data[tail:]))
            continue
        lines = []
        for at in range(0, end, LINE):
            line = bytes(data[at:at + LINE])
            if previous is not None and line == previous[:len(line)]:
                if not folded:
                    lines.append("*")
                    folded = True
            else:
                lines.append(format_line(base + at, line))
                previous, folded = line, False
            last = (base + at, line)
        if lines:
            out.write("\n".join(lines) + "\n")
    if show_last and folded and last is not None:
        out.write(format_line(*last) + "\n")


def _fold(out: TextIO, folded: bool) -> bool:
    if not folded:
        out.write("*\n")
    return True
