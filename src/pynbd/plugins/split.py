"""split: several files served as one disk, one after the other.

    pynbd serve split disk-1.img disk-2.img disk-3.img
    pynbd serve split file=a.img file=b.img -r

Parameters (nbdkit's names)
    [file=]FILE   a file to concatenate; give it once per file, in order (it is
                  the magic parameter, so bare file names work). At least one.

Behaviour
    - The disk is the files' contents end to end; its size is the sum of the
      files' sizes, read when each client connects. Files must not be resized
      while served.
    - Each piece is served as the ``file`` plugin serves a file (without
      copies; trim punches holes; zero uses fallocate; extents from
      SEEK_DATA/SEEK_HOLE, so ``nbdinfo --map`` shows each file's holes);
      requests that straddle two files are split between them. Flush
      syncs every file.
    - If any file cannot be opened for writing, the whole disk is read-only.
    - Only regular files (nbdkit's limit too); for one file use ``file``,
      and for a partition table around the files, ``partitioning``.
"""

from __future__ import annotations

import bisect
import os
import stat
from collections.abc import Iterator, Sequence

from ..backend import (
    CACHE_NATIVE,
    FLAG_REQ_ONE,
    FUA_NATIVE,
    ConfigError,
    Connection,
    Extent,
    OpenContext,
    Param,
    Plugin,
)
from .file import FileConnection, open_file


class ConcatDisk(Connection):
    """Pieces (each a Connection) laid end to end: ``starts[i]`` is where piece i begins.

    Every request is cut at the pieces' boundaries and each part goes to its
    piece with the offset inside it. ``can_*`` answers are those all pieces share.
    """

    def __init__(self, pieces: Sequence[Connection]) -> None:
        self.pieces = list(pieces)
        self.sizes = [piece.get_size() for piece in self.pieces]
        self.starts: list[int] = []
        size = 0
        for piece_size in self.sizes:
            self.starts.append(size)
            size += piece_size
        self.size = size

    def _runs(self, count: int, offset: int) -> Iterator[tuple[Connection, int, int, int]]:
        """(piece, offset in piece, length, offset in the request) for each piece touched."""
        index = bisect.bisect_right(self.starts, offset) - 1
        pos = 0
        while pos < count:
            piece, start = self.pieces[index], self.starts[index]
            inner = offset + pos - start
            take = min(self.sizes[index] - inner, count - pos)
            if take > 0:
                yield piece, inner, take, pos
                pos += take
            index += 1

    def get_size(self) -> int:
        return self.size

    def can_write(self) -> bool:
        return all(p.can_write() for p in self.pieces)

    def can_flush(self) -> bool:
        return True

    def can_trim(self) -> bool:
        return all(p.can_trim() for p in self.pieces)

    def can_zero(self) -> bool:
        return self.can_write()

    def can_fast_zero(self) -> bool:
        return all(p.can_fast_zero() for p in self.pieces)

    def can_fua(self) -> int:
        return FUA_NATIVE

    def can_multi_conn(self) -> bool:
        return all(p.can_multi_conn() for p in self.pieces)

    def can_cache(self) -> int:
        return CACHE_NATIVE

    def can_extents(self) -> bool:
        return any(p.can_extents() for p in self.pieces)

    def _within(self, count: int, offset: int) -> tuple[Connection, int] | None:
        """(piece, offset in it) when the range lies inside one piece (the usual case)."""
        index = bisect.bisect_right(self.starts, offset) - 1
        inner = offset - self.starts[index]
        piece = self.pieces[index]
        return (piece, inner) if inner + count <= self.sizes[index] else None

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        one = self._within(len(buf), offset)
        if one is not None:
            one[0].pread(buf, one[1], flags)
            return
        for piece, inner, take, pos in self._runs(len(buf), offset):
            piece.pread(buf[pos:pos + take], inner, flags)

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        one = self._within(len(buf), offset)
        if one is not None:
            one[0].pwrite(buf, one[1], flags)
            return
        for piece, inner, take, pos in self._runs(len(buf), offset):
            piece.pwrite(buf[pos:pos + take], inner, flags)

    def zero(self, count: int, offset: int, flags: int) -> None:
        for piece, inner, take, _ in self._runs(count, offset):
            piece.zero(take, inner, flags)

    def trim(self, count: int, offset: int, flags: int) -> None:
        for piece, inner, take, _ in self._runs(count, offset):
            piece.trim(take, inner, flags)

    def flush(self, flags: int) -> None:
        for piece in self.pieces:
            if piece.can_flush():
                piece.flush(flags)

    def cache(self, count: int, offset: int, flags: int) -> None:
        for piece, inner, take, _ in self._runs(count, offset):
            piece.cache(take, inner, flags)

    def extents(self, count: int, offset: int, flags: int) -> Iterator[Extent]:
        for piece, inner, take, pos in self._runs(count, offset):
            shift = offset + pos - inner
            if piece.can_extents():
                for ext in piece.extents(take, inner, flags & ~FLAG_REQ_ONE):
                    yield ext._replace(offset=ext.offset + shift)
            else:
                yield Extent(offset + pos, take)
            if flags & FLAG_REQ_ONE:
                return

    def close(self) -> None:
        for piece in self.pieces:
            piece.close()


def check_regular_files(owner: str, paths: Sequence[str]) -> list[int]:
    """The sizes of ``paths``, each checked to be a regular file (ConfigError if not)."""
    sizes = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise ConfigError(f"{owner}: {path}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{owner}: {path}: not a regular file")
        sizes.append(st.st_size)
    return sizes


def open_files(paths: Sequence[str], readonly: bool) -> list[FileConnection]:
    """One FileConnection per path; read-only for all if one cannot be written."""
    opened: list[FileConnection] = []
    try:
        for path in paths:
            fd, writable = open_file(path, readonly)
            try:
                opened.append(FileConnection(fd, writable))
            except BaseException:
                os.close(fd)
                raise
        if not all(f.writable for f in opened):
            for f in opened:
                f.writable = False
    except BaseException:
        for f in opened:
            f.close()
        raise
    return opened


class SplitPlugin(Plugin):
    name = "split"
    short_requests = True
    magic_param = "file"
    params = (Param("file", "path", "a file to concatenate (repeat, in order)", repeat=True),)
    file: list[str]

    def config_complete(self) -> None:
        if not self.file:
            raise ConfigError("split: give at least one file (file=FILE)")
        check_regular_files("split", self.file)

    def open(self, ctx: OpenContext) -> Connection:
        return ConcatDisk(open_files(self.file, ctx.readonly))
