"""NBD endpoints: a URI or a captive ``[ CMD ARGS ... ]`` server.

One connection per lane. In a copy, every connection is a ``Channel`` of
the copy's ``Loop`` (``loop.py``): one thread sends the requests of all
of them (header and data, several requests in one ``sendmsg``) and reads
the replies, read data straight into the lane's buffers. Without a loop
(``pynbd backup``) each connection is a ``Pipeline`` with a receiver thread
of its own. The first connection is opened with the endpoint, the others
by the copy's lanes. More than one is opened only when the server
advertises multi-conn and it is not captive (a captive server is started
per connection, so it gets exactly one). Extents come from
``base:allocation``, changed ranges (``--dirty-bitmap``, ``pynbd backup``)
from ``qemu:dirty-bitmap:NAME`` (several bitmaps: their union); zeroing
uses WRITE_ZEROES (with NO_HOLE for ``--allocated``) where the server
offers it, else writes of zero bytes. Over TLS each connection is a
``Pipeline`` with one request in flight at a time, which finishes before
``submit`` returns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from ...client.common import (
    CMD_FLAG_NO_HOLE,
    CONTEXT_BASE_ALLOCATION,
    SIZE_MAXIMUM,
    SIZE_PREFERRED,
    STATE_ZERO,
    extents_by_name,
    is_tls,
)
from ...client.errors import NBDError
from ...client.sync import NBD, Pipeline, connect
from ...proto.client_transmission import Command
from ...proto.constants import Cmd
from ...proto.errors import ProtocolError
from .dirty import STATE_DIRTY, bitmap_context, union
from .endpoint import UNLIMITED, CopyError, Done, Endpoint, Extent, Facts
from .loop import Channel, Loop
from .options import MAX_REQUEST, Spec

MAX_STATUS = 0xFFFF_F000  # one block status request (fits a 32-bit length, 4 KiB aligned)
ZERO_PROBES = 64  # block status requests spent deciding whether a destination reads as zero


class Connection(Protocol):
    """What a lane's connection is: a ``Channel`` of the copy's loop or a ``Pipeline``."""

    handle: NBD

    def submit(self, cmd: int, offset: int, count: int, flags: int,
               buf: memoryview | None, done: Callable[[Command, BaseException | None], None],
               ) -> None: ...

    def call(self, cmd: int, offset: int = 0, count: int = 0, flags: int = 0,
             buf: memoryview | None = None) -> Command: ...

    def close(self) -> None: ...


class NBDEndpoint(Endpoint):
    """An NBD export reached over one or more connections."""

    def __init__(self, spec: Spec, writing: bool, bitmaps: Sequence[str] = (),
                 loop: Loop | None = None) -> None:
        super().__init__(spec.label)
        self.spec, self.writing, self.loop = spec, writing, loop
        self.bitmaps = [bitmap_context(name) for name in bitmaps]
        self.pipes: dict[int, Connection] = {}  # lane -> its connection
        # lane -> (offset, count, reply) of its last block status: one request answers every
        # context, so extents() and changes() over the same range share it
        self._status: dict[int, tuple[int, int, dict[str, list[int]]]] = {}

    @property
    def _target(self) -> str | list[str]:
        return list(self.spec.command) if self.spec.kind == "captive" else self.spec.text

    def _connect(self) -> Connection:
        try:
            h = connect(self._target, meta_contexts=[CONTEXT_BASE_ALLOCATION, *self.bitmaps])
        except (NBDError, ProtocolError) as exc:
            raise CopyError(self.label, exc) from None
        if self.loop is None or is_tls(h.stream().sock):
            return Pipeline(h)
        return Channel(h, self.loop)

    @property
    def handle(self) -> NBD:
        return self.pipes[0].handle

    def open(self) -> None:
        """Open the first connection and learn the export's facts."""
        h = (p := self._connect()).handle
        self.pipes[0] = p
        if self.writing and h.is_read_only():
            raise CopyError(self.label, "the export is read-only")
        for context in self.bitmaps:
            if not h.can_meta_context(context):
                raise CopyError(self.label, f"the server does not offer {context}")
        self.size = h.get_size()
        self.preferred_block = h.get_block_size(SIZE_PREFERRED) or self.preferred_block
        self.max_request = min(MAX_REQUEST, h.get_block_size(SIZE_MAXIMUM) or MAX_REQUEST)
        self.zero_is_cheap = h.can_zero()

    def facts(self) -> Facts:
        h = self.handle
        return Facts("captive nbd" if self.spec.kind == "captive" else "nbd",
                     "write_zeroes" if h.can_zero() else "write")

    def max_connections(self) -> int:
        if self.spec.kind == "captive" or not self.handle.can_multi_conn():
            return 1
        return UNLIMITED

    def connect_lane(self, lane: int) -> None:
        self.pipes[lane] = self._connect()

    def close_lane(self, lane: int) -> None:
        p = self.pipes.pop(lane, None)
        if p is not None:
            p.close()

    def read(self, conn: int, view: memoryview, offset: int, done: Done) -> None:
        self.pipes[conn].submit(Cmd.READ, offset, len(view), 0, view, _counted(done))

    def write(self, conn: int, view: memoryview, offset: int, done: Done) -> None:
        self.pipes[conn].submit(Cmd.WRITE, offset, len(view), 0, view, _counted(done))

    def zero(self, conn: int, count: int, offset: int, allocate: bool, done: Done) -> None:
        if self.handle.can_zero():
            self.pipes[conn].submit(Cmd.WRITE_ZEROES, offset, count,
                                    CMD_FLAG_NO_HOLE if allocate else 0, None, _counted(done))
        else:
            self.write_zeroes(conn, count, offset, done)

    def extents(self, conn: int, count: int, offset: int) -> list[Extent] | None:
        if not self.handle.can_meta_context(CONTEXT_BASE_ALLOCATION):
            return None
        reply = self._block_status(conn, count, offset)
        return _as_extents(reply.get(CONTEXT_BASE_ALLOCATION, []), offset, offset + count)

    def changes(self, conn: int, count: int, offset: int) -> list[Extent]:
        reply = self._block_status(conn, count, offset)
        return union([_as_extents(reply.get(context, []), offset, offset + count, STATE_DIRTY)
                      for context in self.bitmaps])

    def _block_status(self, conn: int, count: int, offset: int) -> dict[str, list[int]]:
        last = self._status.pop(conn, None)
        if last is not None and last[:2] == (offset, count):
            return last[2]
        command = self.pipes[conn].call(Cmd.BLOCK_STATUS, offset, min(count, MAX_STATUS))
        reply = extents_by_name(self.handle.negotiated.meta_contexts, command)
        if self.bitmaps:
            self._status[conn] = (offset, count, reply)
        return reply

    def probe_zero(self) -> bool:
        """True if base:allocation says the whole export reads as zeroes."""
        assert self.size is not None
        offset = 0
        for _ in range(ZERO_PROBES):
            if offset >= self.size:
                return True
            extents = self.extents(0, self.size - offset, offset)
            if not extents:
                return False
            for start, length, zero in extents:
                if not zero:
                    return False
                offset = start + length
        return offset >= self.size

    def finish(self, conn: int, length: int, flush: bool) -> None:
        if flush and self.handle.can_flush():
            self.pipes[conn].call(Cmd.FLUSH)

    def close(self) -> None:
        """Close the first connection (each lane closes its own)."""
        self.close_lane(0)


def _counted(done: Done) -> Callable[[Command, BaseException | None], None]:
    """A pipeline completion that reports the command's byte count to ``done``."""
    return lambda command, error: done(command.count, error)


def _as_extents(entries: Sequence[int], offset: int, end: int,
                flag: int = STATE_ZERO) -> list[Extent]:
    """``[length, flags, ...]`` from ``offset`` as extents clipped to ``end``, flagged
    where ``flag`` is set."""
    out: list[Extent] = []
    for i in range(0, len(entries) - 1, 2):
        if offset >= end:
            break
        length = min(entries[i], end - offset)
        if length <= 0:
            break
        out.append((offset, length, bool(entries[i + 1] & flag)))
        offset += length
    return out
