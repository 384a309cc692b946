"""sparse-random: a large disk with runs of random data among holes.

    pynbd serve sparse-random 1T
    pynbd serve sparse-random size=100G seed=1 percent=25 runlength=1M
    pynbd serve -U - sparse-random 1T --run 'nbdcopy "$uri" "$uri"'
    pynbd serve -U - sparse-random 1T --run 'qemu-img convert -n "$uri" "$uri"'

Parameters
    [size=]SIZE          the size of the disk (required)
    seed=N               the random seed; the same seed gives the same disk in
                         every run (default: a new seed at each start)
    percent=N            about how much of the disk holds data, 0 to 100
                         (default 10)
    runlength=SIZE       the average length of a run of data (default 16M)
    random-content=BOOL  fill data blocks with random bytes rather than one
                         random non-zero byte repeated over each 4 KiB block
                         (default false: faster to generate and to check)

The disk looks like a virtual machine's: runs of data (average length
``runlength``) separated by holes, laid out in 4 KiB blocks. Extents report
the holes, so copying tools skip them. Nothing is stored: the layout is
computed, one 1 GiB region (or 64 run lengths, if larger) at a time from
the seed, and only a few regions are cached, so a 1 TiB disk costs a few
megabytes of memory. The bytes are not nbdkit's for the same seed.

Writes are checked against what the disk reads at that offset and fail with
EIO when they differ; writing zeroes succeeds only over holes. So a disk can
be copied onto itself to test a copying tool, and a copy that corrupts data
fails.
"""

from __future__ import annotations

import errno
import functools
import random as stdlib_random
from collections.abc import Iterator

from ..backend import (
    ConfigError,
    Connection,
    Extent,
    OpenContext,
    Param,
    Plugin,
    block_runs,
    extents_of_runs,
    fill_zero,
)
from ..backend.errors import io_error
from .random import VerifiedDisk, default_seed, random_block

BLOCK = 4096
REGION_MIN = 1 << 30
_BYTE_BLOCKS = [bytes((v,)) * BLOCK for v in range(256)]
_MIX = 0x9E3779B97F4A7C15


class Layout:
    """Where the data runs lie: computed per region from the seed, cached."""

    def __init__(self, size: int, seed: int, percent: float, runlength: int) -> None:
        self.size = size
        self.seed = seed
        self.fraction = percent / 100
        self.runlength = max(BLOCK, runlength)
        region = max(REGION_MIN, 64 * self.runlength)
        self.region = -(-region // BLOCK) * BLOCK
        self.runs = functools.lru_cache(maxsize=16)(self._runs)

    def _runs(self, index: int) -> tuple[tuple[int, int], ...]:
        """Data runs (start, end) of region ``index``, sorted, absolute."""
        lo = index * self.region
        hi = min(lo + self.region, self.size)
        if self.fraction <= 0:
            return ()
        if self.fraction >= 1:
            return ((lo, hi),)
        rng = stdlib_random.Random((self.seed << 64) | index)
        mean_gap = self.runlength * (1 - self.fraction) / self.fraction
        runs = []
        pos = lo
        data = rng.random() < self.fraction
        while pos < hi:
            mean = self.runlength if data else mean_gap
            length = max(1, round(rng.expovariate(1 / mean) / BLOCK)) * BLOCK
            end = min(pos + length, hi)
            if data:
                runs.append((pos, end))
            pos, data = end, not data
        return tuple(runs)

    def data_runs(self, lo: int, hi: int) -> Iterator[tuple[int, int]]:
        """Data runs clipped to [lo, hi), in order."""
        for index in range(lo // self.region, (hi - 1) // self.region + 1):
            for start, end in self.runs(index):
                if end > lo and start < hi:
                    yield max(start, lo), min(end, hi)


class SparseRandomDisk(VerifiedDisk):
    def __init__(self, layout: Layout, random_content: bool) -> None:
        super().__init__(layout.size)
        self.layout = layout
        self.seed = layout.seed
        self.random_content = random_content

    def can_zero(self) -> bool:
        return True

    def can_fast_zero(self) -> bool:
        return True

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        pos = offset
        for start, end in self.layout.data_runs(offset, offset + len(buf)):
            if start > pos:
                fill_zero(buf[pos - offset:start - offset])
            self._fill_data(buf[start - offset:end - offset], start)
            pos = end
        if pos < offset + len(buf):
            fill_zero(buf[pos - offset:])

    def _fill_data(self, view: memoryview, offset: int) -> None:
        for block, inner, take, pos in block_runs(offset, len(view), BLOCK):
            view[pos:pos + take] = self._block(block)[inner:inner + take]

    def _block(self, block: int) -> bytes:
        if self.random_content:
            return random_block(self.seed, block, BLOCK)
        value = (((block ^ self.seed) * _MIX) >> 40) & 0xFF
        return _BYTE_BLOCKS[value or 1]

    def zero(self, count: int, offset: int, flags: int) -> None:
        for start, _ in self.layout.data_runs(offset, offset + count):
            raise io_error(errno.EIO, f"zeroes written at offset {start} over data")

    def extents(self, count: int, offset: int, flags: int) -> Iterator[Extent]:
        return extents_of_runs(offset, offset + count, self.layout.data_runs(offset, offset + count))


class SparseRandomPlugin(Plugin):
    short_requests = True
    name = "sparse-random"
    magic_param = "size"
    params = (
        Param("size", "size", "size of the disk", required=True),
        Param("seed", "int", "random seed (default: chosen at start)"),
        Param("percent", "float", "percentage of the disk that holds data", default=10.0),
        Param("runlength", "size", "average length of a data run", default=16 << 20),
        Param("random-content", "bool", "random bytes in every data block", default=False),
    )
    size: int
    seed: int | None
    percent: float
    runlength: int
    random_content: bool

    def config_complete(self) -> None:
        if not 0 <= self.percent <= 100:
            raise ConfigError(f"sparse-random: percent must be between 0 and 100, not {self.percent}")
        if self.runlength <= 0:
            raise ConfigError("sparse-random: runlength must be greater than 0")
        seed = default_seed() if self.seed is None else self.seed
        layout = Layout(self.size, seed, self.percent, self.runlength)
        self.disk = SparseRandomDisk(layout, self.random_content)

    def open(self, ctx: OpenContext) -> Connection:
        return self.disk
