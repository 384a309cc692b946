"""ddrescue: serve a disk rescued by GNU ddrescue, failing reads of bad blocks.

    pynbd serve --filter=ddrescue file disk.img ddrescue-mapfile=disk.map

Reads of ranges the mapfile marks as rescued (status ``+``) return the
data; a read touching any other range fails with EIO, as the original disk
did, instead of returning zeroes that look like valid data. Useful to find
which files or filesystem structures a rescue left damaged, or to try fsck.

Parameters
    ddrescue-mapfile=FILE   the GNU ddrescue mapfile (required): ``#``
                            comment lines, a status line, then one
                            ``POS SIZE STATUS`` line per block (hex or
                            decimal numbers)

The export is read-only and offers no cache requests, as in nbdkit.
Neighbouring rescued blocks count as one range.
"""

from __future__ import annotations

import bisect
import errno
from collections.abc import Sequence

from ..backend import CACHE_NONE, Buffer, ConfigError, Filter, FilterConnection, Param, io_error


def parse_mapfile(path: str) -> list[tuple[int, int]]:
    """The rescued ranges (start, end) of a mapfile, sorted and merged."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"ddrescue: {path}: {exc.strerror}") from None
    ranges: list[tuple[int, int]] = []
    status_seen = False
    for number, line in enumerate(lines, start=1):
        if not line or line.startswith("#"):
            continue
        if not status_seen:
            status_seen = True  # the current position and pass: not needed
            continue
        fields = line.split()
        if len(fields) < 3:
            continue  # as nbdkit: a line that is not POS SIZE STATUS is skipped
        try:
            pos, size = int(fields[0], 0), int(fields[1], 0)
        except ValueError:
            raise ConfigError(f"ddrescue: {path}:{number}: not a block line: {line!r}") from None
        if pos < 0 or size < 0:
            raise ConfigError(f"ddrescue: {path}:{number}: block offset and length must not "
                              f"be negative")
        if fields[2] == "+" and size:
            ranges.append((pos, pos + size))
    ranges.sort()
    merged: list[tuple[int, int]] = []
    for start, end in ranges:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


class DdrescueConnection(FilterConnection["DdrescueFilter"]):
    def can_write(self) -> bool:
        return False

    def can_cache(self) -> int:
        return CACHE_NONE

    def _check(self, count: int, offset: int) -> None:
        flt = self.filter
        index = bisect.bisect_right(flt.starts, offset) - 1
        if index < 0 or offset + count > flt.ranges[index][1]:
            raise io_error(errno.EIO, f"ddrescue: read of {count} bytes at offset {offset} "
                                      f"touches a block that was not rescued")

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self._check(len(buf), offset)
        self.next.pread(buf, offset, flags)

    def pread_buffers(self, count: int, offset: int, flags: int) -> Sequence[Buffer] | None:
        self._check(count, offset)
        return self.next.pread_buffers(count, offset, flags)


class DdrescueFilter(Filter):
    short_requests = True
    name = "ddrescue"
    params = (Param("ddrescue-mapfile", "path", "the GNU ddrescue mapfile", required=True),)
    ddrescue_mapfile: str
    connection = DdrescueConnection

    def config_complete(self) -> None:
        self.ranges = parse_mapfile(self.ddrescue_mapfile)
        self.starts = [start for start, _ in self.ranges]
