"""pynbd heatmap — draw which parts of a disk were read and written, and when.

Usage:
    pynbd heatmap [--time=clock|requests] [--width=W] [--height=H] [--scale=S] LOG OUT.png
    pynbd heatmap --gif | --apng [--frames=N] [--time=clock|requests] LOG OUT

LOG is the file of the log filter (``pynbd serve --filter=log … logfile=LOG``,
or nbdkit's log filter: the format is the same). Needs Pillow
(``pip install 'pynbd[pictures]'``).

The picture has time from left to right and the disk's offset from top (0)
to bottom (the export's size, from the log's ``Connect`` lines), in W × H
cells (default 400 × 256) of S × S pixels (default 2), with axes and a
legend. A cell is coloured where a request touched that part of the disk at
that time: reads blue, writes vermilion, zeroes and trims green, read and
written purple; the stronger the colour, the more requests (on a
logarithmic scale, so a single request still shows). Untouched cells stay
white. ``--time=requests`` spaces the requests evenly instead of by their
timestamps, so bursts separated by idle minutes each get room.

``--gif`` (or ``--apng``, an animated PNG in full colour) animates it
instead: each of N frames (default 48) is the disk as ``pynbd info --map
--png`` lays it out (a square along a Hilbert curve, offset 0 top left),
showing the requests of that slice of time in full colour and, pale, the
last access of every place touched before.

Example: what mkfs.ext4 and then a file copy touch on an empty disk::

    pynbd serve -U /tmp/sock --filter=log memory 256M logfile=/tmp/disk.log
    touch disk.raw; nbdfuse disk.raw 'nbd+unix:///?socket=/tmp/sock' &
    mkfs.ext4 disk.raw && sudo mount -o loop disk.raw /mnt && sudo cp -r /usr/share/doc /mnt
    sudo umount /mnt; umount disk.raw
    pynbd heatmap --time=requests /tmp/disk.log mkfs.png

(``docs/make-pictures.sh`` does this for the README's picture.)

Only Read, Write, Zero and Trim are drawn, as they started (a failed request
counts: the client asked for it); Cache, Extents and Flush touch no data and
are skipped, as are the "...Read" result lines, Connect (which gives the
size) and any other text. A log with no read or write, or that cannot be
read, is an error (one line, exit status 1).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

PROG = "pynbd heatmap"
KINDS = {"Read": 0, "Write": 1, "Zero": 2, "Trim": 2}  # picture.ACCESS_READ, _WRITE, _ZERO

_REQUEST = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) (?:connection=\d+ )?"
                      r"(Read|Write|Zero|Trim) id=\d+ offset=0x([0-9a-fA-F]+) count=0x([0-9a-fA-F]+) ")
_SIZE = re.compile(r" Connect .*?\bsize=0x([0-9a-fA-F]+)")


class HeatmapError(Exception):
    """A log that cannot be drawn; the message is one line."""


@dataclass(frozen=True)
class Access:
    time: float  # seconds since the log's earliest request
    kind: int  # picture.ACCESS_READ, _WRITE or _ZERO (a Zero or a Trim)
    offset: int
    count: int


@dataclass(frozen=True)
class Log:
    accesses: list[Access]
    size: int  # of the export: the largest Connect size, else the end of the furthest request

    @property
    def duration(self) -> float:
        return max(a.time for a in self.accesses)


def parse_log(lines: Iterable[str]) -> Log:
    """The requests of a log filter's file (pynbd's or nbdkit's), in the order logged.

    Requests running in parallel may be logged a little out of time order:
    times count from the earliest.
    """
    found: list[tuple[datetime, int, int, int]] = []
    size = 0
    for line in lines:
        request = _REQUEST.match(line)
        if request is None:
            connect = _SIZE.search(line)
            if connect is not None:
                size = max(size, int(connect.group(1), 16))
            continue
        stamp, action, offset, count = request.groups()
        found.append((datetime.fromisoformat(stamp), KINDS[action], int(offset, 16), int(count, 16)))
    if not found:
        raise HeatmapError("no reads or writes in the log")
    start = min(when for when, *_ in found)
    accesses = [Access((when - start).total_seconds(), kind, offset, count)
                for when, kind, offset, count in found]
    return Log(accesses, max(size, max(a.offset + a.count for a in accesses)))


def read_log(path: str) -> Log:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse_log(f)
    except OSError as exc:
        raise HeatmapError(f"cannot read {path}: {exc.strerror or exc}") from None
    except HeatmapError as exc:
        raise HeatmapError(f"{path}: {exc}") from None


def touches(log: Log, by_requests: bool) -> list[tuple[float, int, int, int]]:
    """(place on the time axis from 0 to 1, kind, offset, count) for each access."""
    if by_requests:
        last = max(len(log.accesses) - 1, 1)
        return [(i / last, a.kind, a.offset, a.count) for i, a in enumerate(log.accesses)]
    span = log.duration or 1.0
    return [(a.time / span, a.kind, a.offset, a.count) for a in log.accesses]


def _at_least(minimum: int) -> Callable[[str], int]:
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {minimum}, got {text!r}")
        return value
    return check


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Draw where and when a disk was read and "
                                "written, from a log filter's file.",
                                usage="%(prog)s [OPTIONS] LOG OUT")
    a = p.add_argument
    animate = p.add_mutually_exclusive_group()
    animate.add_argument("--gif", dest="animate", action="store_const", const="GIF",
                         help="an animated GIF of the disk, slice of time by slice")
    animate.add_argument("--apng", dest="animate", action="store_const", const="PNG",
                         help="the same as an animated PNG (full colour)")
    a("--frames", type=_at_least(1), default=48, help="with --gif or --apng: how many frames (default 48)")
    a("--time", choices=("clock", "requests"), default="clock",
      help="space requests by their timestamps (clock, the default) or evenly (requests)")
    a("--width", type=_at_least(2), default=400, help="time cells across (default 400)")
    a("--height", type=_at_least(2), default=256, help="offset cells down (default 256)")
    a("--scale", type=_at_least(1), default=2, help="pixels per cell, each way (default 2)")
    a("log", help="the log filter's file")
    a("out", help="the picture to write")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if importlib.util.find_spec("PIL") is None:
        print(f"{PROG}: needs Pillow: pip install 'pynbd[pictures]'", file=sys.stderr)
        return 1
    from .picture import HeatAnimation, HeatMap  # Pillow is optional: imported only to draw

    try:
        log = read_log(args.log)
    except HeatmapError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    by_requests = args.time == "requests"
    points = touches(log, by_requests)
    duration = None if by_requests else log.duration
    title = os.path.basename(args.log)
    try:
        if args.animate:
            HeatAnimation(points, log.size, duration, title, frames=args.frames).save(args.out, args.animate)
        else:
            HeatMap(points, log.size, duration, title, args.width, args.height, args.scale).image.save(
                args.out, format="PNG")
    except OSError as exc:
        print(f"{PROG}: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
