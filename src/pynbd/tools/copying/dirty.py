"""Changed ranges: ``qemu:dirty-bitmap:NAME`` intersected with ``base:allocation``.

A server that tracks changes (qemu-nbd ``-B NAME``, ``pynbd serve
--filter=cbt``) answers the meta context ``qemu:dirty-bitmap:NAME`` with bit
0 set where the disk changed since checkpoint NAME. ``pynbd copy
--dirty-bitmap=NAME`` and ``pynbd backup inc`` copy only what changed: a
changed range that holds data is read and written, a changed range that
reads as zeroes is zeroed, and an unchanged range is left alone.

Ranges are ``(offset, length, flag)`` runs in order; the helpers here sweep
such lists once, run by run (never byte by byte).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from .endpoint import Extent

BITMAP_PREFIX = "qemu:dirty-bitmap:"
STATE_DIRTY = 1  # bit 0 of a dirty-bitmap context's flags

# What to do with a range (a copy's operation kinds; DATA and ZERO equal False and True,
# the "reads as zero" flag of an extent, so plain extents are operations too).
DATA, ZERO, CLEAN = 0, 1, 2


def bitmap_context(name: str) -> str:
    """The meta context that carries bitmap ``name``."""
    return BITMAP_PREFIX + name


def covered(runs: Sequence[Extent]) -> int:
    """Where the runs end (they are contiguous and in order)."""
    return runs[-1][0] + runs[-1][1] if runs else 0


def sweep(lists: Sequence[Sequence[Extent]], start: int, end: int) -> Iterator[tuple[int, int, list[bool]]]:
    """Cut ``[start, end)`` where any list's runs change: ``(offset, length, flags)``.

    Each list holds contiguous runs from ``start`` to at least ``end``;
    ``flags[i]`` is list ``i``'s flag over the piece.
    """
    index = [0] * len(lists)
    offset = start
    while offset < end:
        stop = end
        flags = []
        for i, runs in enumerate(lists):
            while runs[index[i]][0] + runs[index[i]][1] <= offset:
                index[i] += 1
            run = runs[index[i]]
            stop = min(stop, run[0] + run[1])
            flags.append(run[2])
        yield offset, stop - offset, flags
        offset = stop


def merged(pieces: Iterable[tuple[int, int, int]]) -> Iterator[tuple[int, int, int]]:
    """Neighbouring pieces of one kind joined."""
    pending: tuple[int, int, int] | None = None
    for offset, length, kind in pieces:
        if pending is not None and pending[2] == kind and pending[0] + pending[1] == offset:
            pending = (pending[0], pending[1] + length, kind)
            continue
        if pending is not None:
            yield pending
        pending = (offset, length, kind)
    if pending is not None:
        yield pending


def union(lists: Sequence[Sequence[Extent]]) -> list[Extent]:
    """Runs flagged where any list is, over the part every list covers."""
    if not lists or not all(lists):
        return []
    start, end = lists[0][0][0], min(covered(runs) for runs in lists)
    return [(o, n, bool(k)) for o, n, k in
            merged((o, n, int(any(f))) for o, n, f in sweep(lists, start, end))]


def classify(extents: Sequence[Extent], changes: Sequence[Extent]) -> Iterator[tuple[int, int, int]]:
    """``(offset, length, DATA | ZERO | CLEAN)`` over the range both lists cover.

    ``extents`` flag ranges that read as zeroes, ``changes`` ranges that changed.
    """
    if not extents or not changes:
        return iter(())
    end = min(covered(extents), covered(changes))
    return merged((o, n, (ZERO if zero else DATA) if dirty else CLEAN)
                  for o, n, (zero, dirty) in sweep((extents, changes), extents[0][0], end))
