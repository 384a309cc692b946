"""NBD exports seen as files: each request of the kernel becomes one NBD command.

An ``ExportFile`` owns one or more connections to one export. With several
(multi-conn), each FUSE thread borrows a free connection, sends its command
and reads the reply itself (no other thread to wake: the least work per
request), waiting for a connection only when all are busy. With one, the
connection is driven as a ``Pipeline`` (many commands in flight, replies
matched by a receiver thread), so FUSE's threads still wait on the server
at the same time.

    read        -> READ, straight into FUSE's buffer
    write       -> WRITE, straight from FUSE's buffer
    fsync       -> FLUSH (nothing when the server cannot flush)
    fallocate   PUNCH_HOLE|KEEP_SIZE -> TRIM (WRITE_ZEROES if the server
                cannot trim, so the hole still reads as zeroes);
                ZERO_RANGE -> WRITE_ZEROES with NO_HOLE (space stays allocated)
"""

from __future__ import annotations

import errno
import os
import queue
import threading

from ...client.sync import NBD, Pipeline
from ...proto.constants import Cmd, CmdFlag

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
RANGE_CHUNK = 1 << 30  # TRIM and WRITE_ZEROES are sent in pieces of at most this


class ExportFile:
    """One export, as a file of its size, over ``handles`` (connected, same export)."""

    def __init__(self, name: str, handles: list[NBD], readonly: bool) -> None:
        first = handles[0]
        self.name = name
        self.size = first.get_size()
        self.readonly = readonly or first.is_read_only()
        self.can_flush = first.can_flush()
        self.can_trim = first.can_trim()
        self.can_zero = first.can_zero()
        self.handles = handles
        self.pipeline = Pipeline(first) if len(handles) == 1 else None
        self.free: queue.SimpleQueue[NBD] = queue.SimpleQueue()
        for h in handles:
            self.free.put(h)
        self._closed = threading.Lock()

    def _call(self, cmd: int, offset: int, count: int, flags: int = 0,
              buf: memoryview | None = None) -> None:
        if self.pipeline is not None:
            self.pipeline.call(cmd, offset, count, flags, buf)
            return
        h = self.free.get()
        try:
            if cmd == Cmd.READ and buf is not None:
                h.pread_into(buf, offset, flags)
            elif cmd == Cmd.WRITE and buf is not None:
                h.pwrite(buf, offset, flags)
            elif cmd == Cmd.FLUSH:
                h.flush(flags)
            elif cmd == Cmd.TRIM:
                h.trim(count, offset, flags)
            else:
                h.zero(count, offset, flags)
        finally:
            self.free.put(h)

    def _writable(self) -> None:
        if self.readonly:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    def read_into(self, buf: memoryview, offset: int) -> int:
        """Fill ``buf`` from ``offset`` (short at the end of the export); the bytes read."""
        count = max(0, min(len(buf), self.size - offset))
        if count:
            self._call(Cmd.READ, offset, count, 0, buf[:count])
        return count

    def write_from(self, buf: memoryview, offset: int) -> int:
        """Write all of ``buf`` at ``offset``; past the end of the export is ENOSPC."""
        self._writable()
        if offset + len(buf) > self.size:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if len(buf):
            self._call(Cmd.WRITE, offset, len(buf), 0, buf)
        return len(buf)

    def flush(self) -> None:
        """Make what was written durable (NBD FLUSH)."""
        if self.can_flush and not self.readonly:
            self._call(Cmd.FLUSH, 0, 0)

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """Punch a hole (TRIM) or zero a range (WRITE_ZEROES); other modes are EOPNOTSUPP."""
        self._writable()
        if offset + length > self.size:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if mode == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE and self.can_trim:
            cmd, flags = Cmd.TRIM, 0
        elif mode == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE and self.can_zero:
            cmd, flags = Cmd.WRITE_ZEROES, 0
        elif mode & ~FALLOC_FL_KEEP_SIZE == FALLOC_FL_ZERO_RANGE and self.can_zero:
            cmd, flags = Cmd.WRITE_ZEROES, int(CmdFlag.NO_HOLE)
        else:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        for start in range(offset, offset + length, RANGE_CHUNK):
            self._call(cmd, start, min(RANGE_CHUNK, offset + length - start), flags)

    def close(self) -> None:
        """Disconnect every connection (once)."""
        if self._closed.acquire(blocking=False):
            if self.pipeline is not None:
                self.pipeline.close()
            for h in self.handles:
                h.close()
