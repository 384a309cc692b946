"""noextents: hide sparseness — the disk reports itself fully allocated.

    pynbd serve --filter=noextents file disk.img

No parameters. Block-status requests are answered with one allocated extent
covering the range asked for, and reads are never split around holes, so
clients such as ``qemu-img map`` and ``nbdinfo --map`` see all data. Useful
over file systems whose hole lookups are slow, or to test clients' fallback
paths. Everything else passes straight through.
"""

from __future__ import annotations

from ..backend import Filter, FilterConnection


class NoExtentsConnection(FilterConnection["NoExtentsFilter"]):
    """Says it has no extents: the boundary then answers block-status requests
    with one data extent and never asks the layer below."""

    def can_extents(self) -> bool:
        return False


class NoExtentsFilter(Filter):
    short_requests = True
    name = "noextents"
    connection = NoExtentsConnection
