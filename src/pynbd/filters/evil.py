"""evil: corrupt data read from the layer below, to test checksums and scrubbing.

    pynbd serve --filter=evil file disk.img                          # stuck bits
    pynbd serve --filter=evil file disk.img evil=cosmic-rays evil-probability=1e-6
    pynbd serve --filter=evil file disk.img evil=stuck-wires evil-seed=42

Writes are not changed: the layer below keeps the correct data.

Modes (``evil=``)
    stuck-bits    (default) fixed bits of the disk are stuck high or low:
                  each bit is stuck with probability ``evil-probability``
                  (default 1e-8); the same bits for every read, given a seed
    stuck-wires   bits stuck in the data path instead: the same bit
                  positions of every read request, wherever on the disk it
                  reads (default probability 1e-6)
    cosmic-rays   bits flipped at random as they are read (default 1e-8)

Parameters
    evil=MODE                  as above
    evil-probability=PROB      the probability per bit: ``1e-8``, ``0.001``,
                               ``1%`` or ``1:1000``
    evil-stuck-probability=PROB
                               the chance that a stuck bit reads as its stuck
                               value rather than its true one (default 100%)
    evil-seed=N                the seed choosing the stuck bits (default: a
                               new one each run)
"""

from __future__ import annotations

import math
import random
import time

from ..backend import ConfigError, Filter, FilterConnection, Param

BLOCK_BITS = 64 * 1024 * 8  # stuck bits are drawn per block of the disk
_DEFAULT_PROBABILITY = {"cosmic-rays": 1e-8, "stuck-bits": 1e-8, "stuck-wires": 1e-6}


def parse_probability(key: str, text: str) -> float:
    """``0.25``, ``25%`` or ``1:4``; ConfigError outside 0..1."""
    body = text.strip()
    try:
        if body.endswith("%"):
            value = float(body[:-1]) / 100
        elif ":" in body:
            num, den = body.split(":", 1)
            value = float(num) / float(den)
        else:
            value = float(body)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"evil: {key}={text}: not a probability") from None
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"evil: {key}={text}: the probability must be between 0 and 1")
    return value


def positions(rng: random.Random, probability: float, bits: int) -> list[int]:
    """The bits of ``range(bits)`` chosen each with ``probability``, drawn by
    geometric gaps (one random number per chosen bit, not per bit)."""
    if probability <= 0:
        return []
    if probability >= 1:
        return list(range(bits))
    scale = 1 / math.log1p(-probability)
    chosen: list[int] = []
    pos = -1
    while True:
        pos += 1 + int(math.log(1.0 - rng.random()) * scale)
        if pos >= bits:
            return chosen
        chosen.append(pos)


def set_bit(buf: memoryview, bit: int, high: bool) -> None:
    mask = 0x80 >> (bit & 7)
    index = bit >> 3
    buf[index] = buf[index] | mask if high else buf[index] & ~mask


class EvilConnection(FilterConnection["EvilFilter"]):
    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self.next.pread(buf, offset, flags)
        self.filter.corrupt(buf, offset)


class EvilFilter(Filter):
    short_requests = True
    name = "evil"
    params = (
        Param("evil", "str", "how data is corrupted", default="stuck-bits",
              choices=("cosmic-rays", "stuck-bits", "stuck-wires")),
        Param("evil-probability", "str", "probability per bit"),
        Param("evil-stuck-probability", "str", "chance a stuck bit reads stuck", default="1"),
        Param("evil-seed", "int", "seed choosing the stuck bits"),
    )
    evil: str
    evil_probability: str | None
    evil_stuck_probability: str
    evil_seed: int | None
    connection = EvilConnection

    def config_complete(self) -> None:
        self.probability = (_DEFAULT_PROBABILITY[self.evil] if self.evil_probability is None
                            else parse_probability("evil-probability", self.evil_probability))
        self.stuck_probability = parse_probability("evil-stuck-probability",
                                                   self.evil_stuck_probability)
        self.seed = self.evil_seed if self.evil_seed is not None else time.time_ns()
        self.rng = random.Random(self.seed)  # cosmic rays and the stuck-probability draws

    def _stuck(self, block: int) -> list[tuple[int, bool]]:
        """The stuck bits of one block (of the disk, or of a request for stuck
        wires): (position in the block, stuck high), the same on every call."""
        rng = random.Random(self.seed * 1_000_003 + block)
        return [(pos, rng.random() < 0.5) for pos in positions(rng, self.probability, BLOCK_BITS)]

    def _reads_stuck(self) -> bool:
        return self.stuck_probability >= 1 or self.rng.random() < self.stuck_probability

    def corrupt(self, buf: memoryview, offset: int) -> None:
        bits = len(buf) * 8
        if self.evil == "cosmic-rays":
            for pos in positions(self.rng, self.probability, bits):
                buf[pos >> 3] ^= 0x80 >> (pos & 7)
        else:
            # Stuck bits belong to the disk's blocks, stuck wires to the request's.
            first_bit = 0 if self.evil == "stuck-wires" else offset * 8
            for block in range(first_bit // BLOCK_BITS, (first_bit + bits - 1) // BLOCK_BITS + 1):
                base = block * BLOCK_BITS - first_bit
                for pos, high in self._stuck(block):
                    if 0 <= base + pos < bits and self._reads_stuck():
                        set_bit(buf, base + pos, high)
