#!/usr/bin/env -S pynbd serve
"""A native pynbd plugin in a few lines: a disk whose bytes spell a chosen letter.

    ./native_disk.py -U - letter=Q size=1M --run 'nbdcopy "$uri" -'
"""

from pynbd.backend import Connection, Param, Plugin


class Letters(Connection):
    def __init__(self, size: int, letter: str) -> None:
        self.size, self.byte = size, letter.encode()

    def get_size(self) -> int:
        return self.size

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        buf[:] = self.byte * len(buf)


class LetterPlugin(Plugin):
    name = "letters"
    params = (Param("size", "size", "disk size", default=1 << 20),
              Param("letter", "str", "the byte every read returns", default="A"))

    def open(self, ctx) -> Connection:
        return Letters(self.size, self.letter)
