"""ones: a disk where every byte is 0xff (or another byte); writes are discarded.

    pynbd serve ones 1G
    pynbd serve ones size=1M byte=0x55

Parameters (nbdkit's names)
    [size=]SIZE   the size of the disk (the magic parameter; default 0, a
                  zero-length disk)
    byte=N        the byte every read returns: decimal, 0x hex or 0 octal,
                  0 to 255 (default 0xff, all ones)

Reads return the byte repeated; writes, zeroes, trims and flushes succeed and
are forgotten, as on ``null``. Extents report the whole disk as allocated
data (for ``byte=0`` the ``null`` plugin, which reports a hole, is cheaper).
Most clients are very confused by this device: it is for testing them.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..backend import ConfigError, Connection, Extent, OpenContext, Param, Plugin
from .null import NullConnection

_CHUNK = 1 << 20  # the size of the buffer of repeated bytes reads are served from


class OnesDisk(NullConnection):
    """The null disk whose bytes are all ``byte``, allocated everywhere."""

    def __init__(self, size: int, chunk: memoryview) -> None:
        super().__init__(size)
        self.chunk = chunk

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        chunk = self.chunk
        for pos in range(0, len(buf), _CHUNK):
            piece = buf[pos:pos + _CHUNK]
            piece[:] = chunk[:len(piece)]

    def pread_buffers(self, count: int, offset: int, flags: int) -> list[memoryview]:
        return [self.chunk[:min(_CHUNK, count - pos)] for pos in range(0, count, _CHUNK)]

    def extents(self, count: int, offset: int, flags: int) -> Iterable[Extent]:
        return (Extent(offset, count),)


def parse_byte(text: str, key: str = "byte", owner: str = "ones") -> int:
    """A byte as nbdkit's parser reads one (C's strtoul base 0): 255, 0xff, 0377."""
    word = text.strip().lower()
    base = 16 if word.startswith("0x") else 8 if len(word) > 1 and word.startswith("0") else 10
    try:
        value = int(word, base)
    except ValueError:
        raise ConfigError(f"{owner}: {key}: could not parse number {text!r}") from None
    if not 0 <= value <= 255:
        raise ConfigError(f"{owner}: {key}: {text!r} is out of range (0 to 255)")
    return value


class OnesPlugin(Plugin):
    name = "ones"
    short_requests = True
    magic_param = "size"
    params = (
        Param("size", "size", "size of the disk", default=0),
        Param("byte", "str", "the repeated byte (0-255, 0x.. hex)", default="0xff"),
    )
    size: int
    byte: str

    def config_complete(self) -> None:
        self.chunk = memoryview(bytes([parse_byte(self.byte)]) * _CHUNK)

    def open(self, ctx: OpenContext) -> Connection:
        return OnesDisk(self.size, self.chunk)
