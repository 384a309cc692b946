"""random: a read-only-consistent disk of random bytes.

    pynbd serve random 1G
    pynbd serve random size=100M seed=42
    pynbd serve -U - random 100M --run 'nbdcopy "$uri" "$uri"'

Parameters
    [size=]SIZE   the size of the disk (required)
    seed=N        the random seed: the same seed gives the same disk in every
                  run (default: a new seed each time the server starts)

Every byte is random, and reading the same offset twice gives the same
bytes. The generator is SHAKE-128 over (seed, 64 KiB block number): fast,
not meant for cryptography, and not the same bytes as nbdkit's plugin.

Writes are accepted when they hold exactly what the disk already reads at
that offset, and fail with EIO otherwise; so copying the disk onto itself
(nbdcopy or qemu-img convert -n with the same URI as source and target)
succeeds, and a copy that corrupts data fails.
"""

from __future__ import annotations

import errno
import hashlib
import secrets

from ..backend import Connection, OpenContext, Param, Plugin, ResidentDisk, block_runs
from ..backend.errors import io_error

BLOCK = 1 << 16
_CHECK = 4 << 20  # writes are compared against the disk this much at a time


def random_block(seed: int, index: int, length: int = BLOCK) -> bytes:
    """``length`` pseudo-random bytes determined by (seed, index)."""
    key = (seed & (2**64 - 1)).to_bytes(8, "little") + index.to_bytes(8, "little")
    return hashlib.shake_128(key).digest(length)


def default_seed() -> int:
    return secrets.randbits(32)


class VerifiedDisk(ResidentDisk):
    """A computed disk: writes must repeat what reads return, else EIO."""

    def flush(self, flags: int) -> None:
        return None  # nothing is ever stored

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        scratch = bytearray(min(len(buf), _CHECK))
        for pos in range(0, len(buf), _CHECK):
            part = buf[pos:pos + _CHECK]
            expected = scratch if len(part) == len(scratch) else bytearray(len(part))
            self.pread(memoryview(expected), offset + pos, 0)
            if expected != part:
                raise io_error(errno.EIO, f"data written at offset {offset + pos} differs from the disk")


class RandomDisk(VerifiedDisk):
    def __init__(self, size: int, seed: int) -> None:
        super().__init__(size)
        self.seed = seed

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        for index, inner, take, pos in block_runs(offset, len(buf), BLOCK):
            buf[pos:pos + take] = random_block(self.seed, index, inner + take)[inner:]


class RandomPlugin(Plugin):
    short_requests = True
    name = "random"
    magic_param = "size"
    params = (
        Param("size", "size", "size of the disk", required=True),
        Param("seed", "int", "random seed (default: chosen at start)"),
    )
    size: int
    seed: int | None

    def config_complete(self) -> None:
        self.disk_seed = default_seed() if self.seed is None else self.seed

    def open(self, ctx: OpenContext) -> Connection:
        return RandomDisk(self.size, self.disk_seed)
