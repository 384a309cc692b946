"""extentlist: serve a fixed list of extents over the layer below.

    pynbd serve -r --filter=extentlist ssh host=server path=/disk.img extentlist=disk.extents

For layers that cannot tell which parts of the disk are allocated (ssh,
curl) when that is known from elsewhere (``xfs_bmap`` on the server, say).

Parameters
    extentlist=FILE   the extents, one a line: ``OFFSET LENGTH [TYPE]``
                      (required). OFFSET and LENGTH are sizes (K/M/G/T
                      suffixes allowed); TYPE is a number (1 hole, 2 zero, 3
                      both), missing (0: data), or a comma-separated list of
                      the words ``hole`` and ``zero``. Lines need not be in
                      order but must not overlap; what no line covers is a
                      hole that reads as zeroes. Blank lines and lines
                      starting with ``#`` are ignored.

For example, a 10M disk whose first megabyte only is allocated:

    0  1M
    1M 9M  hole,zero

The list never changes: writes are not reflected in it, so serve read-only
(``-r``) unless the list is known to stay true.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from ..backend import ConfigError, Extent, Filter, FilterConnection, Param, parse_size

_WORDS = {"hole": 1, "zero": 2}


def parse_type(text: str) -> int:
    if text.isdigit():
        return int(text)
    value = 0
    for word in text.split(","):
        if word not in _WORDS:
            raise ValueError(f"unknown extent type {text!r} (a number, or hole and/or zero)")
        value |= _WORDS[word]
    return value


def parse_extentlist(path: str) -> list[Extent]:
    """The extents of FILE, sorted, gaps filled as holes; ConfigError if malformed."""
    listed: list[Extent] = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"extentlist: {path}: {exc.strerror}") from None
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        try:
            if len(fields) not in (2, 3):
                raise ValueError("expected OFFSET LENGTH [TYPE]")
            state = parse_type(fields[2]) if len(fields) == 3 else 0
            extent = Extent(parse_size(fields[0]), parse_size(fields[1]), bool(state & 1),
                            bool(state & 2))
        except ValueError as exc:
            raise ConfigError(f"extentlist: {path}:{number}: {exc}") from None
        if extent.length:
            listed.append(extent)
    listed.sort()
    filled: list[Extent] = []
    pos = 0
    for extent in listed:
        if extent.offset < pos:
            raise ConfigError(f"extentlist: {path}: extents overlap at offset {extent.offset}")
        if extent.offset > pos:
            filled.append(Extent(pos, extent.offset - pos, True, True))
        filled.append(extent)
        pos = extent.offset + extent.length
    return filled


class ExtentlistConnection(FilterConnection["ExtentlistFilter"]):
    def can_extents(self) -> bool:
        return True

    def extents(self, count: int, offset: int, flags: int) -> Iterator[Extent]:
        extents = self.filter.extents
        end = offset + count
        index = max(0, bisect.bisect_right(self.filter.starts, offset) - 1)
        pos = offset
        for extent in extents[index:]:
            if pos >= end:
                return
            stop = extent.offset + extent.length
            if stop <= pos:
                continue
            yield extent._replace(offset=pos, length=min(stop, end) - pos)
            pos = stop
        if pos < end:  # past the list's last extent: a hole
            yield Extent(pos, end - pos, True, True)


class ExtentlistFilter(Filter):
    short_requests = True
    name = "extentlist"
    params = (Param("extentlist", "path", "the file listing the extents", required=True),)
    extentlist: str
    connection = ExtentlistConnection

    def config_complete(self) -> None:
        self.extents = parse_extentlist(self.extentlist)
        self.starts = [e.offset for e in self.extents]
