"""CRC-32 (gzip's, zlib.crc32) of concatenations, without the bytes: ``crc32_combine``.

    from pynbd.formats.crc32 import crc32_combine, CrcTree

    crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    tree = CrcTree([(crc, length), ...])     # pieces in order
    tree.update(i, new_crc)                  # one piece changed: log2(n) combines
    tree.crc                                 # CRC-32 of the whole

Python's zlib has no ``crc32_combine``; this is zlib's own algorithm (1.2.12
and later): appending ``len(b)`` bytes to ``a`` multiplies ``crc(a)`` by
x^(8·len(b)) modulo the CRC polynomial in GF(2), and the CRC's linearity does
the rest. zlib before 1.2.12 built the same operator as a 32×32 GF(2) matrix
raised to the power by repeated squaring; the polynomial form gives the same
answers with a 32-step multiply, and the operator for each length is cached
(a tree's pieces have few distinct lengths).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

POLY = 0xEDB88320  # reflected x^32 + x^26 + ... + 1


def multmodp(a: int, b: int) -> int:
    """a·b modulo the CRC polynomial (reflected bit order, as zlib's multmodp)."""
    m = 1 << 31
    p = 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ POLY if b & 1 else b >> 1


def _x2n_table() -> list[int]:
    table = [1 << 30]  # x^1
    for _ in range(31):
        table.append(multmodp(table[-1], table[-1]))
    return table


_X2N = _x2n_table()  # x^(2^k) mod p


@lru_cache(maxsize=4096)
def shift_operator(length: int) -> int:
    """x^(8·length) mod p: what appending ``length`` bytes does to a CRC."""
    n = length * 8
    p = 1 << 31  # x^0 == 1
    k = 0
    while n:
        if n & 1:
            p = multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of A + B from crc(A), crc(B) and len(B)."""
    return multmodp(shift_operator(len2), crc1) ^ crc2


class CrcTree:
    """The CRC-32 of a sequence of pieces, kept up to date as pieces change.

    A segment tree over (crc, length) leaves: changing one piece recomputes
    the log2(n) nodes above it, so a write that touches one piece of a
    gigabyte costs a few dozen combines, never a pass over the data.
    """

    def __init__(self, pieces: Sequence[tuple[int, int]]) -> None:
        size = 1
        while size < max(1, len(pieces)):
            size *= 2
        self.leaves = size
        self.crc_of = [0] * (2 * size)
        self.len_of = [0] * (2 * size)
        for i, (crc, length) in enumerate(pieces):
            self.crc_of[size + i] = crc
            self.len_of[size + i] = length
        for node in range(size - 1, 0, -1):
            self._join(node)

    def _join(self, node: int) -> None:
        left, right = 2 * node, 2 * node + 1
        self.len_of[node] = self.len_of[left] + self.len_of[right]
        if self.len_of[right] == 0:
            self.crc_of[node] = self.crc_of[left]
        else:
            self.crc_of[node] = crc32_combine(self.crc_of[left], self.crc_of[right], self.len_of[right])

    def update(self, index: int, crc: int) -> None:
        node = self.leaves + index
        self.crc_of[node] = crc
        node //= 2
        while node:
            self._join(node)
            node //= 2

    @property
    def crc(self) -> int:
        return self.crc_of[1]

    @property
    def length(self) -> int:
        return self.len_of[1]
