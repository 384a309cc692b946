"""Reading a chain of backups: qcow2 images, each backed by the one before.

``ChainEndpoint`` is a source for the copy engine (``pynbd backup restore``
is ``pynbd copy`` from it): reads go through ``formats.qcow2.Qcow2Reader``
of the top image, whose unallocated clusters read from the image below,
down to the full backup. Its extents are the chain's: a range is data
where the first image that allocates it stores data, and reads as zeroes
where that image marks it zero or no image allocates it, so a restore
writes only data and zeroes the rest.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from ...formats.qcow2 import RUN_UNALLOCATED, RUN_ZERO, Qcow2Error, Qcow2Reader, ReadIntoFn
from ..copying.dirty import merged
from ..copying.endpoint import CopyError, Done, Endpoint, Extent, Facts
from ..copying.local import pread_full


class ChainEndpoint(Endpoint):
    """The disk that a chain of qcow2 files (the full backup first) holds."""

    def __init__(self, label: str, paths: list[Path]) -> None:
        super().__init__(label)
        self.fds: list[int] = []
        self.readers: list[Qcow2Reader] = []
        self.paths: list[Path] = []
        try:
            for path in paths:
                self._open(path)
        except BaseException:
            self.close()
            raise
        self.size = self.readers[-1].size

    def _open(self, path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise CopyError(str(path), exc.strerror or exc) from None
        self.fds.append(fd)

        def pread(buf: memoryview, offset: int) -> None:
            n = pread_full(fd, buf, offset)
            if n < len(buf):
                raise CopyError(str(path), f"truncated: {n} of {len(buf)} bytes at {offset}")

        below = self.readers[-1].pread if self.readers else None
        expected = self.paths[-1].name if self.paths else None

        def open_backing(name: str, fmt: str | None) -> ReadIntoFn:
            if below is None or name != expected or fmt not in (None, "qcow2"):
                raise Qcow2Error(f"qcow2: backing file {name!r} ({fmt}), not the previous "
                                 f"backup {expected!r}: the chain is damaged")
            return below

        try:
            reader = Qcow2Reader(pread, os.fstat(fd).st_size, open_backing=open_backing)
        except Qcow2Error as exc:
            raise CopyError(str(path), exc) from None
        if self.readers and reader.size != self.readers[-1].size:
            raise CopyError(str(path), f"size {reader.size} differs from the image below "
                                       f"({self.readers[-1].size})")
        self.readers.append(reader)
        self.paths.append(path)

    def facts(self) -> Facts:
        return Facts(f"qcow2 chain of {len(self.readers)}")

    def read(self, conn: int, view: memoryview, offset: int, done: Done) -> None:
        try:
            self.readers[-1].pread(view, offset)
        except Qcow2Error as exc:
            raise CopyError(self.label, exc) from None
        done(len(view), None)

    def extents(self, conn: int, count: int, offset: int) -> list[Extent] | None:
        try:
            return [(o, n, bool(z)) for o, n, z in
                    merged((o, n, int(z)) for o, n, z in self._extents(len(self.readers) - 1,
                                                                       offset, count))]
        except Qcow2Error as exc:
            raise CopyError(self.label, exc) from None

    def _extents(self, level: int, offset: int, count: int) -> Iterator[Extent]:
        for kind, guest, length, _host in self.readers[level].map(offset, count):
            if kind == RUN_UNALLOCATED and level > 0:
                yield from self._extents(level - 1, guest, length)
            else:
                yield guest, length, kind in (RUN_ZERO, RUN_UNALLOCATED)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
