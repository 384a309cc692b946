"""nocache: take away (or change) the handling of clients' cache requests.

    pynbd serve --filter=nocache file disk.img                 # cachemode=none
    pynbd serve --filter=nocache file disk.img cachemode=nop

Parameters
    cachemode=none      cache requests are not advertised (default)
    cachemode=emulate   cache requests are done by reading the range and
                        discarding it, whatever the layer below offers
    cachemode=nop       cache requests are accepted and do nothing

Useful for timing how much a client's cache (prefetch) requests are worth;
it combines with the cache filter, which caches reads and writes.
"""

from __future__ import annotations

from ..backend import CACHE_EMULATE, CACHE_NATIVE, CACHE_NONE, Filter, FilterConnection, Param

_MODES = {"none": CACHE_NONE, "emulate": CACHE_EMULATE, "nop": CACHE_NATIVE}


class NocacheConnection(FilterConnection["NocacheFilter"]):
    def can_cache(self) -> int:
        return _MODES[self.filter.cachemode]

    def cache(self, count: int, offset: int, flags: int) -> None:
        """cachemode=nop: nothing (the boundary itself reads for emulate)."""


class NocacheFilter(Filter):
    short_requests = True
    name = "nocache"
    params = (Param("cachemode", "str", "how cache requests are handled", default="none",
                    choices=tuple(_MODES)),)
    cachemode: str
    connection = NocacheConnection
