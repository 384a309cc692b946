"""Finding zeroes in read buffers without a Python loop over bytes.

``bytearray.startswith(zeroes, start, end)`` is a memcmp against a zero
block, so a 256 KiB buffer is checked in a few microseconds, block by block
(``-S``, 4 KiB by default), and runs of all-zero blocks become zero requests.
"""

from __future__ import annotations

from itertools import groupby

Run = tuple[int, int, bool]  # start in the buffer, length, all zero


class ZeroSource:
    """Shared read-only zero bytes: for comparisons and for writing zeroes."""

    def __init__(self, size: int) -> None:
        self.data = bytes(size)
        self.view = memoryview(self.data)

    def __len__(self) -> int:
        return len(self.data)


def zero_runs(buf: bytearray, length: int, block: int, zero_block: bytes) -> list[Run]:
    """Split ``buf[:length]`` into runs of data and of all-zero ``block``-sized blocks.

    ``zero_block`` is ``bytes(block)``. A final partial block is compared on
    its own. With ``block`` 0 the whole buffer is one data run; nothing for ``length`` 0.
    """
    if length <= 0:
        return []
    if block <= 0:
        return [(0, length, False)]
    flags = [buf.startswith(zero_block, start, start + block) for start in range(0, length, block)]
    tail = length % block
    if tail:
        flags[-1] = buf.startswith(zero_block[:tail], length - tail, length)
    if not any(flags):
        return [(0, length, False)]
    if all(flags):
        return [(0, length, True)]
    runs: list[Run] = []
    start = 0
    for zero, group in groupby(flags):
        end = min(length, start + block * sum(1 for _ in group))
        runs.append((start, end - start, zero))
        start = end
    return runs
