"""NBD endpoints: a URI or a captive ``[ CMD ARGS ... ]`` server.

One ``AsyncNBD`` handle per connection: the first is opened (and closed) in
the main event loop, the others in their lanes' loops. More than one is opened
only when the server advertises multi-conn and it is not captive (a captive
server is started per connection, so it gets exactly one). Extents come from
``base:allocation``; zeroing uses WRITE_ZEROES (with NO_HOLE for
``--allocated``) where the server offers it, else writes of zero bytes.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Sequence

from ...client import CMD_FLAG_NO_HOLE, CONTEXT_BASE_ALLOCATION, STATE_ZERO, AsyncNBD, NBDError
from ...client.aio import connect
from ...client.common import SIZE_MAXIMUM, SIZE_PREFERRED
from ...proto.errors import ProtocolError
from .endpoint import UNLIMITED, CopyError, Endpoint, Extent, Facts
from .options import MAX_REQUEST, Spec

MAX_STATUS = 0xFFFF_F000  # one block status request (fits a 32-bit length, 4 KiB aligned)
SEND_BUFFER = 4 * 1024 * 1024
ZERO_PROBES = 64  # block status requests spent deciding whether a destination reads as zero


class NBDEndpoint(Endpoint):
    """An NBD export reached over one or more connections."""

    def __init__(self, spec: Spec, writing: bool) -> None:
        super().__init__(spec.label)
        self.spec, self.writing = spec, writing
        self.handles: dict[int, AsyncNBD] = {}  # lane -> its connection

    @property
    def _target(self) -> str | list[str]:
        return list(self.spec.command) if self.spec.kind == "captive" else self.spec.text

    async def _connect(self) -> AsyncNBD:
        try:
            h = await connect(self._target, meta_contexts=[CONTEXT_BASE_ALLOCATION])
        except (NBDError, ProtocolError) as exc:
            raise CopyError(self.label, exc) from None
        widen_send_buffer(h)
        return h

    async def open(self) -> None:
        """Open the first connection and learn the export's facts."""
        h = self.handles[0] = await self._connect()
        if self.writing and h.is_read_only():
            raise CopyError(self.label, "the export is read-only")
        self.size = h.get_size()
        self.preferred_block = h.get_block_size(SIZE_PREFERRED) or self.preferred_block
        self.max_request = min(MAX_REQUEST, h.get_block_size(SIZE_MAXIMUM) or MAX_REQUEST)
        self.zero_is_cheap = h.can_zero()

    def facts(self) -> Facts:
        h = self.handles[0]
        return Facts("captive nbd" if self.spec.kind == "captive" else "nbd",
                     "write_zeroes" if h.can_zero() else "write")

    def max_connections(self) -> int:
        if self.spec.kind == "captive" or not self.handles[0].can_multi_conn():
            return 1
        return UNLIMITED

    async def connect_lane(self, lane: int) -> None:
        self.handles[lane] = await self._connect()

    async def close_lane(self, lane: int) -> None:
        h = self.handles.pop(lane, None)
        if h is not None:
            await h.close()

    async def read(self, conn: int, view: memoryview, offset: int) -> int:
        await self.handles[conn].pread_into(view, offset)
        return len(view)

    async def write(self, conn: int, view: memoryview, offset: int) -> None:
        await self.handles[conn].pwrite(view, offset)

    async def zero(self, conn: int, count: int, offset: int, allocate: bool) -> None:
        h = self.handles[conn]
        if h.can_zero():
            await h.zero(count, offset, CMD_FLAG_NO_HOLE if allocate else 0)
        else:
            await self.write_zeroes(conn, count, offset)

    async def extents(self, conn: int, count: int, offset: int) -> list[Extent] | None:
        h = self.handles[conn]
        if not h.can_meta_context(CONTEXT_BASE_ALLOCATION):
            return None
        reply = await h.block_status(min(count, MAX_STATUS), offset)
        return _as_extents(reply.get(CONTEXT_BASE_ALLOCATION, []), offset, offset + count)

    async def probe_zero(self) -> bool:
        """True if base:allocation says the whole export reads as zeroes."""
        assert self.size is not None
        offset = 0
        for _ in range(ZERO_PROBES):
            if offset >= self.size:
                return True
            extents = await self.extents(0, self.size - offset, offset)
            if not extents:
                return False
            for start, length, zero in extents:
                if not zero:
                    return False
                offset = start + length
        return offset >= self.size

    async def finish(self, conn: int, length: int, flush: bool) -> None:
        h = self.handles[conn]
        if flush and h.can_flush():
            await h.flush()

    async def close(self) -> None:
        """Close the first connection (each lane closes its own)."""
        h = self.handles.pop(0, None)
        if h is not None:
            await h.close()


def widen_send_buffer(h: AsyncNBD) -> None:
    """Let a Unix socket take a whole request at once.

    Its default send buffer (about 200 KiB) is smaller than one 256 KiB
    write, so the transport would keep (copy) the rest of every request and
    send it later. TCP sizes its buffers itself.
    """
    sock = h.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)


def _as_extents(entries: Sequence[int], offset: int, end: int) -> list[Extent]:
    """``[length, flags, ...]`` from ``offset`` as extents clipped to ``end``."""
    out: list[Extent] = []
    for i in range(0, len(entries) - 1, 2):
        if offset >= end:
            break
        length = min(entries[i], end - offset)
        if length <= 0:
            break
        out.append((offset, length, bool(entries[i + 1] & STATE_ZERO)))
        offset += length
    return out
