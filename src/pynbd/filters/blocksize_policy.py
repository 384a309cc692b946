"""blocksize-policy: advertise block size constraints and enforce them.

    pynbd serve --filter=blocksize-policy memory 1G blocksize-preferred=32K
    pynbd serve --filter=blocksize-policy file disk.img \\
        blocksize-minimum=4K blocksize-error-policy=error
    pynbd serve --filter=blocksize-policy --filter=blocksize file disk.img \\
        blocksize-minimum=64K minblock=64K

Parameters
    blocksize-minimum=N     advertise this minimum (a power of 2, at most 64K)
    blocksize-preferred=N   advertise this preferred size (a power of 2,
                            512 to 32M)
    blocksize-maximum=N     advertise this maximum (a multiple of the minimum)
    blocksize-error-policy=allow|error
                            allow (default): requests that break the
                            constraints pass down anyway; error: they fail
                            with EINVAL and the layer below never sees them
                            (too small, unaligned, or — reads and writes only
                            — too large)
    blocksize-write-disconnect=N
                            disconnect a client that writes more than N bytes
                            in one request (as nbdkit 1.34)

A size not given is the layer below's, or (where the layer below says
nothing) 1, 4096 and 4294967295.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable

from ..backend import ConfigError, Extent, Filter, FilterConnection, Param, io_error
from ..backend.shutdown import disconnect_client

_DEFAULTS = (1, 4096, 0xFFFFFFFF)


def _power_of_2(n: int) -> bool:
    return n > 0 and not n & (n - 1)


class BlocksizePolicyConnection(FilterConnection["BlocksizePolicyFilter"]):
    def block_size(self) -> tuple[int, int, int]:
        flt = self.filter
        given = (flt.blocksize_minimum, flt.blocksize_preferred, flt.blocksize_maximum)
        if all(given):
            return flt.blocksize_minimum or 0, flt.blocksize_preferred or 0, flt.blocksize_maximum or 0
        below = self.next.block_size()
        if not any(given):
            return below
        maximum_default = _DEFAULTS[2]
        if flt.blocksize_write_disconnect:
            maximum_default = flt.blocksize_write_disconnect // (flt.blocksize_minimum or 1) \
                * (flt.blocksize_minimum or 1)
        base = below if below[0] else (_DEFAULTS[0], _DEFAULTS[1], maximum_default)
        sizes = tuple(g or b for g, b in zip(given, base, strict=True))
        minimum, preferred, maximum = sizes
        if minimum > preferred or preferred > maximum:
            raise io_error(errno.EINVAL, f"blocksize-policy: computed block size values are invalid, "
                                         f"minimum {minimum} > preferred {preferred} or preferred > "
                                         f"maximum {maximum}")
        return minimum, preferred, maximum

    def _check(self, call: str, count: int, offset: int, data: bool) -> None:
        if not self.filter.error_policy:
            return
        minimum, _, maximum = self.block_size()
        if not minimum:
            return
        if count < minimum:
            problem = f"count {count} is smaller than minimum size {minimum}"
        elif data and count > maximum:
            problem = f"count {count} is larger than maximum size {maximum}"
        elif count % minimum:
            problem = f"count {count} is not a multiple of minimum size {minimum}"
        elif offset % minimum:
            problem = f"offset {offset} is not aligned to a multiple of minimum size {minimum}"
        else:
            return
        raise io_error(errno.EINVAL, f"client {call} request rejected: {problem}")

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self._check("pread", len(buf), offset, True)
        self.next.pread(buf, offset, flags)

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        limit = self.filter.blocksize_write_disconnect
        if limit and len(buf) > limit:
            disconnect_client(self.ctx)
            raise io_error(errno.EINVAL, "blocksize-policy: disconnecting client due to oversize "
                                         "write request")
        self._check("pwrite", len(buf), offset, True)
        self.next.pwrite(buf, offset, flags)

    def zero(self, count: int, offset: int, flags: int) -> None:
        self._check("zero", count, offset, False)
        self.next.zero(count, offset, flags)

    def trim(self, count: int, offset: int, flags: int) -> None:
        self._check("trim", count, offset, False)
        self.next.trim(count, offset, flags)

    def cache(self, count: int, offset: int, flags: int) -> None:
        self._check("cache", count, offset, False)
        self.next.cache(count, offset, flags)

    def extents(self, count: int, offset: int, flags: int) -> Iterable[Extent]:
        self._check("extents", count, offset, False)
        return self.next.extents(count, offset, flags)


class BlocksizePolicyFilter(Filter):
    short_requests = True
    name = "blocksize-policy"
    params = (
        Param("blocksize-minimum", "size", "the minimum block size advertised"),
        Param("blocksize-preferred", "size", "the preferred block size advertised"),
        Param("blocksize-maximum", "size", "the maximum block size advertised"),
        Param("blocksize-error-policy", "str", "what to do with requests that break them",
              default="allow", choices=("allow", "error")),
        Param("blocksize-write-disconnect", "size", "disconnect a client writing more than this"),
    )
    blocksize_minimum: int | None
    blocksize_preferred: int | None
    blocksize_maximum: int | None
    blocksize_error_policy: str
    blocksize_write_disconnect: int | None
    connection = BlocksizePolicyConnection

    def config_complete(self) -> None:
        minimum, preferred = self.blocksize_minimum, self.blocksize_preferred
        maximum, disconnect = self.blocksize_maximum, self.blocksize_write_disconnect
        problems = []
        if minimum and (not _power_of_2(minimum) or minimum > 65536):
            problems.append("blocksize-minimum must be a power of 2, at most 64K")
        if preferred and (not _power_of_2(preferred) or not 512 <= preferred <= 32 << 20):
            problems.append("blocksize-preferred must be a power of 2 between 512 and 32M")
        if minimum and maximum and maximum != 0xFFFFFFFF and maximum % minimum:
            problems.append("blocksize-maximum must be -1 or a multiple of blocksize-minimum")
        if minimum and preferred and minimum > preferred:
            problems.append("blocksize-minimum must be <= blocksize-preferred")
        if preferred and maximum and preferred > maximum:
            problems.append("blocksize-preferred must be <= blocksize-maximum")
        if minimum and disconnect and disconnect <= minimum:
            problems.append("blocksize-write-disconnect must be larger than blocksize-minimum")
        if problems:
            raise ConfigError(f"blocksize-policy: {problems[0]}")
        self.error_policy = self.blocksize_error_policy == "error"
