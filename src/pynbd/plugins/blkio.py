"""blkio: disks through io_uring and vhost-user-blk (nbdkit's blkio plugin, two of libblkio's drivers).

    pynbd serve blkio io_uring path=FILE [direct=true] [num-entries=N]
    pynbd serve blkio virtio-blk-vhost-user path=SOCKET [num-queues=N]
    pynbd serve blkio virtio-blk-vhost-user path=sock --run 'nbdsh -u "$uri" -c "print(h.pread(512, 0))"'

Parameters
    driver=NAME      io_uring or virtio-blk-vhost-user (the magic parameter)
    path=PATH        io_uring: the file or block device;
                     virtio-blk-vhost-user: the backend's Unix socket
    direct=BOOL      io_uring: open the file O_DIRECT, bypassing the page cache
                     (default false); requests are then 4096-byte aligned (the
                     block size advertised to clients) and buffers the kernel
                     cannot use directly go through an aligned bounce buffer
    num-entries=N    io_uring: submission queue entries of each connection's
                     ring (default 128)
    num-queues=N     virtio-blk-vhost-user: virtqueues to use (default 1; no
                     more than the device offers)
    read-only=BOOL   serve the disk read-only (as -r does)

io_uring
    Each client connection gets its own io_uring. Reads and writes are
    answered later (the server's ``AsyncReads`` / ``AsyncWrites``, when no
    filter above changes them and ``-v`` is not given; not with
    direct=true): the reading thread queues every read and write of a batch
    of client requests on the ring (a write's data in a buffer of its own),
    submits them in one io_uring_enter and sends the replies of those
    already complete (cached data usually is); while it waits for its
    client it also polls the ring's eventfd and reaps the others (a
    completion thread does while it waits for anything else), so up to 128
    requests are in flight per connection. A flush, zero or trim waits
    until the writes started before it are done.
    Other requests are short, as the file plugin's are: they run on the
    connection's reading thread, which submits one and waits for it in a
    single io_uring_enter (no thread switch). With ``-t N`` (N > 1), N
    worker threads submit to the ring at the same time, so up to N of them
    are in flight; whichever waits on the ring hands the others their
    completions. Buffered writes on a file system without asynchronous
    buffered writes (ext4) complete in the kernel's io-wq thread (one per
    ring: writes to one file are queued there one after the other). Reads
    and writes are IORING_OP_READ / WRITE into the request buffers (no
    copies without direct=true); FUA writes carry RWF_DSYNC; flush is
    IORING_OP_FSYNC; trim punches a hole and write-zeroes uses ZERO_RANGE
    (or punches when the client allows it) through IORING_OP_FALLOCATE;
    where the file system cannot, zeroes are written (a fast-zero request
    then fails with ENOTSUP). The ring is driven from Python through the
    io_uring_setup and io_uring_enter system calls and the shared rings (no
    liburing needed). Linux 5.6 or later.
    Speed (4 KiB requests at depth 16, bench/blkio.py): a read of cached
    data completes inside the io_uring_enter that submits its batch, one
    call per batch where the file plugin makes a pread per request, but a
    started request takes more Python steps (queued, reaped, answered). A
    buffered write on ext4 costs the kernel what the file plugin's pwrite
    costs, in the io-wq thread, plus the hand-over to that thread and back:
    there the file plugin writes faster.

virtio-blk-vhost-user
    A vhost-user-blk frontend for a backend such as
    ``qemu-storage-daemon --export type=vhost-user-blk,addr.path=SOCKET,...``:
    the vhost-user handshake on the Unix socket at start-up (a socket nobody
    listens on stops the server with an error), one shared-memory region
    (memfd, passed with SCM_RIGHTS), split virtqueues with eventfds to kick
    and to be called, and virtio-blk requests: IN, OUT, FLUSH, DISCARD,
    WRITE_ZEROES (with UNMAP when the client allows a hole) and GET_ID (the
    device's ID is logged with ``-v``). The size and block size come from the
    device's config space; a device without FLUSH, DISCARD or WRITE_ZEROES
    serves no flush, no trim, and writes zeroes (fast-zero requests then fail
    with ENOTSUP); a read-only device is served read-only. Every client
    shares the one device (a backend serves one frontend at a time), up to
    32 requests in flight per virtqueue; data is copied through the shared
    memory. Reads and writes of up to 128 KiB are answered later (the
    server's ``AsyncReads`` / ``AsyncWrites``, when no filter above changes
    them and ``-v`` is not given): the reading thread starts every read and
    write of a batch of requests, kicks the queue once (reaping what the
    used ring already holds), and reaps them and sends their replies while
    it waits for its client, polling the queues' call eventfds (a completion
    thread per queue does while it waits for anything else), so one
    connection keeps up to 32 requests in flight per queue (a FUA write runs
    at once: the write, then FLUSH; a flush, zero or trim waits until the
    writes started before it are done). With VIRTIO_RING_F_EVENT_IDX (which
    qemu-storage-daemon offers) the backend calls once per round of reaping,
    not once per completion; kicks are always sent (a libvhost-user backend
    publishes its avail event index without a barrier, so a kick skipped on
    its strength could be lost). More queues (num-queues) add no speed with
    qemu-storage-daemon, whose export serves every queue from one thread.
    Other requests run on each connection's
    reading thread by default (it kicks the queue and waits on the call
    eventfd itself: no thread switch);
    ``-t N`` (N > 1) keeps up to N of them in flight, the thread waiting on
    the queue handing the others their completions. If the backend goes
    away, requests in flight and later fail with EIO and the server shuts
    down (it does not reconnect).

Limits: no extents (the whole disk reads as data).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import signal
import stat
from collections.abc import Callable
from typing import Any

from ..backend import (
    FLAG_FAST_ZERO,
    FLAG_FUA,
    FLAG_MAY_TRIM,
    FUA_NATIVE,
    ConfigError,
    Connection,
    OpenContext,
    Param,
    Plugin,
    ThreadModel,
    io_error,
)
from ..backend.connection import Completions
from ..backend.linux import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, is_not_supported
from ._io_uring import OP_FALLOCATE, OP_FSYNC, OP_READ, OP_WRITE, RWF_DSYNC, Ring, address_of
from ._vhost_user import (
    CHUNK,
    F_DISCARD,
    F_FLUSH,
    F_WRITE_ZEROES,
    SECTOR,
    T_DISCARD,
    T_FLUSH,
    T_IN,
    T_OUT,
    T_WRITE_ZEROES,
    VhostUserBlk,
)

log = logging.getLogger("pynbd.plugins.blkio")
VHOST_USER_BLK = "virtio-blk-vhost-user"

DIRECT_ALIGNMENT = 4096
_READ_ONLY_ERRORS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


class IoUringConnection(Connection):
    """One client's ring over the plugin's file descriptor."""

    def __init__(self, plugin: BlkioPlugin, readonly: bool) -> None:
        self.plugin = plugin
        self.fd = plugin.fd
        self.readonly = readonly or plugin.readonly
        self.ring = Ring(plugin.num_entries)

    def _io(self, opcode: int, buf: memoryview, offset: int, op_flags: int = 0) -> None:
        done = 0
        while done < len(buf):
            part = buf[done:]
            address, keep = address_of(part)
            if self.plugin.direct and address % DIRECT_ALIGNMENT:
                n = self._bounced(opcode, part, offset + done, op_flags)
            else:
                n = self.ring.run(opcode, self.fd, offset + done, address, len(part), op_flags, keep)
            if n == 0:
                if opcode == OP_READ:  # past the end of a file that shrank: zeroes
                    part[:] = bytes(len(part))
                    return
                raise io_error(errno.EIO, "io_uring: a write made no progress")
            done += n

    def _bounced(self, opcode: int, part: memoryview, offset: int, op_flags: int) -> int:
        """One O_DIRECT transfer through a page-aligned buffer."""
        with mmap.mmap(-1, len(part)) as bounce:
            view = memoryview(bounce)
            try:
                if opcode == OP_WRITE:
                    view[:] = part
                address, keep = address_of(view)
                n = self.ring.run(opcode, self.fd, offset, address, len(part), op_flags, keep)
                if opcode == OP_READ:
                    part[:n] = view[:n]
                del keep
            finally:
                view.release()
        return n

    def get_size(self) -> int:
        return self.plugin.size()

    def can_write(self) -> bool:
        return not self.readonly

    def can_flush(self) -> bool:
        return True

    def can_trim(self) -> bool:
        return not self.readonly

    def can_fua(self) -> int:
        return FUA_NATIVE

    def can_multi_conn(self) -> bool:
        return True

    def can_fast_zero(self) -> bool:
        return True

    def block_size(self) -> tuple[int, int, int]:
        if self.plugin.direct:
            return (DIRECT_ALIGNMENT, DIRECT_ALIGNMENT, 0xFFFFFFFF)
        return (1, 4096, 0xFFFFFFFF)

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self._io(OP_READ, buf, offset)

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self._io(OP_WRITE, buf, offset, RWF_DSYNC if flags & FLAG_FUA else 0)

    def flush(self, flags: int) -> None:
        self.ring.run(OP_FSYNC, self.fd)

    def _fallocate(self, mode: int, count: int, offset: int) -> None:
        # IORING_OP_FALLOCATE: the length goes in addr, the mode in len.
        self.ring.run(OP_FALLOCATE, self.fd, offset, count, mode)

    def trim(self, count: int, offset: int, flags: int) -> None:
        try:
            self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, count, offset)
        except OSError as exc:
            if not is_not_supported(exc):  # trim is advisory: nothing to do where unsupported
                raise
        if flags & FLAG_FUA:
            self.flush(0)

    def zero(self, count: int, offset: int, flags: int) -> None:
        modes = [FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE]
        if flags & FLAG_MAY_TRIM:
            modes.insert(0, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            try:
                self._fallocate(mode, count, offset)
            except OSError as exc:
                if not is_not_supported(exc):
                    raise
                continue
            if flags & FLAG_FUA:
                self.flush(0)
            return
        if flags & FLAG_FAST_ZERO:
            raise io_error(errno.ENOTSUP, "zero: the file system cannot zero quickly")
        super().zero(count, offset, flags & ~FLAG_FAST_ZERO)

    def close(self) -> None:
        self.ring.close()


class AsyncIoUringConnection(IoUringConnection):
    """An ``IoUringConnection`` whose reads and writes the server may start and have
    answered later (``backend.connection.AsyncReads`` and ``AsyncWrites``): each is
    queued on the ring, the ones a batch of requests brings are submitted together,
    and completions are reported as they are reaped. Not with direct=true (buffers
    need aligning there)."""

    def __init__(self, plugin: BlkioPlugin, readonly: bool) -> None:
        super().__init__(plugin, readonly)
        self.ring.completed = self._completed

    # Each started request's ring entry: (opcode, tag, completions, buf, offset, RWF flags,
    # what keeps buf's address valid), one tuple: no closure or object per request.
    def start_pread(self, buf: memoryview, offset: int, flags: int, tag: object,
                    completions: Completions) -> None:
        keep = ctypes.c_char.from_buffer(buf)  # (a read's buffer is writable: address_of's way)
        self.ring.start(OP_READ, self.fd, offset, ctypes.addressof(keep), len(buf), 0,
                        (OP_READ, tag, completions, buf, offset, 0, keep))

    def start_pwrite(self, buf: memoryview, offset: int, flags: int, tag: object,
                     completions: Completions) -> None:
        op_flags = RWF_DSYNC if flags & FLAG_FUA else 0
        address, keep = address_of(buf)
        self.ring.start(OP_WRITE, self.fd, offset, address, len(buf), op_flags,
                        (OP_WRITE, tag, completions, buf, offset, op_flags, keep))

    def _completed(self, done: list[tuple[Any, int]]) -> None:
        """A burst of completions reaped: report each request, then each client's burst."""
        bursts: dict[Completions, None] = {}
        for (opcode, tag, completions, buf, offset, op_flags, _), result in done:
            error = None
            if result != len(buf):
                if result < 0:
                    error = OSError(-result, os.strerror(-result))
                else:
                    try:
                        self._rest(opcode, buf[result:], offset + result, op_flags)
                    except OSError as exc:
                        error = exc
            if opcode == OP_READ:
                completions.read_done(tag, error)
            else:
                completions.write_done(tag, error)
            bursts[completions] = None
        for completions in bursts:
            completions.burst_done()

    def _rest(self, opcode: int, buf: memoryview, offset: int, op_flags: int) -> None:
        """After a short transfer, on the reaping thread: the rest with preadv / pwritev
        (the ring is this thread's to reap); reads past the end of a file that shrank
        are zeroes."""
        while len(buf):
            if opcode == OP_READ:
                n = os.preadv(self.fd, (buf,), offset)
                if n == 0:
                    buf[:] = bytes(len(buf))
                    return
            else:
                n = os.pwritev(self.fd, (buf,), offset, os.RWF_DSYNC if op_flags else 0)
                if n == 0:
                    raise io_error(errno.EIO, "io_uring: a write made no progress")
            buf, offset = buf[n:], offset + n

    def send_started(self) -> None:
        self.ring.submit_started()

    # PolledCompletions: the server's reading thread reaps, polling the ring's eventfd.
    def completion_fd(self) -> int:
        return self.ring.completion_fd()

    def submit_started(self) -> None:
        self.ring.submit_started(reaper=False)

    def reap_started(self) -> None:
        self.ring.reap()


class VhostUserConnection(Connection):
    """One client of the shared vhost-user-blk device."""

    def __init__(self, device: VhostUserBlk, readonly: bool) -> None:
        self.device = device
        self.readonly = readonly or device.read_only

    def _aligned(self, offset: int, count: int) -> None:
        if offset % SECTOR or count % SECTOR:
            raise io_error(errno.EINVAL, f"virtio-blk: {count} bytes at {offset} are not "
                                         "whole 512-byte sectors")

    def get_size(self) -> int:
        return self.device.capacity * SECTOR

    def block_size(self) -> tuple[int, int, int]:
        return (self.device.block_size, max(self.device.block_size, 4096), 0xFFFFFFFF)

    def can_write(self) -> bool:
        return not self.readonly

    def can_flush(self) -> bool:
        return self.device.has(F_FLUSH)

    def can_trim(self) -> bool:
        return not self.readonly and self.device.has(F_DISCARD)

    def can_fast_zero(self) -> bool:
        return self.device.has(F_WRITE_ZEROES)

    def can_multi_conn(self) -> bool:
        return True  # one device behind every connection: a flush covers all of them

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self._aligned(offset, len(buf))
        self.device.request(T_IN, offset, buf)

    # AsyncReads, AsyncWrites: reads and writes the server starts and has answered later.
    def start_pread(self, buf: memoryview, offset: int, flags: int, tag: object,
                    completions: Completions) -> None:
        self._start(T_IN, buf, offset, flags, tag, completions.read_done, completions)

    def start_pwrite(self, buf: memoryview, offset: int, flags: int, tag: object,
                     completions: Completions) -> None:
        self._start(T_OUT, buf, offset, flags, tag, completions.write_done, completions)

    def _start(self, kind: int, buf: memoryview, offset: int, flags: int, tag: object,
               report: Callable[[object, OSError | None], None], completions: Completions) -> None:
        if len(buf) > CHUNK or flags & FLAG_FUA:  # more than one slot, or a flush after: now
            if kind == T_IN:
                self.pread(buf, offset, flags)
            else:
                self.pwrite(buf, offset, flags)
            report(tag, None)
            completions.burst_done()
            return
        self._aligned(offset, len(buf))
        self.device.start_request(kind, offset, buf, report, tag, completions.burst_done)

    def send_started(self) -> None:
        self.device.kick_started()

    # PolledCompletions: the server's reading thread reaps, polling the call eventfds.
    def completion_fd(self) -> int:
        return self.device.completion_fd()

    def submit_started(self) -> None:
        self.device.kick_started(reaper=False)

    def reap_started(self) -> None:
        self.device.reap_started()

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self._aligned(offset, len(buf))
        self.device.request(T_OUT, offset, buf)
        if flags & FLAG_FUA and self.device.has(F_FLUSH):
            self.flush(0)

    def flush(self, flags: int) -> None:
        self.device.request(T_FLUSH)

    def trim(self, count: int, offset: int, flags: int) -> None:
        self._aligned(offset, count)
        self.device.request(T_DISCARD, offset, count=count)
        if flags & FLAG_FUA and self.device.has(F_FLUSH):
            self.flush(0)

    def zero(self, count: int, offset: int, flags: int) -> None:
        self._aligned(offset, count)
        if self.device.has(F_WRITE_ZEROES):
            self.device.request(T_WRITE_ZEROES, offset, count=count,
                                unmap=bool(flags & FLAG_MAY_TRIM))
            if flags & FLAG_FUA and self.device.has(F_FLUSH):
                self.flush(0)
            return
        if flags & FLAG_FAST_ZERO:
            raise io_error(errno.ENOTSUP, "virtio-blk: the device has no WRITE_ZEROES")
        super().zero(count, offset, flags)


class BlkioPlugin(Plugin):
    name = "blkio"
    magic_param = "driver"
    thread_model = ThreadModel.PARALLEL
    short_requests = True  # a local disk, directly or behind shared memory (see the manual)
    params = (
        Param("driver", "str", "the libblkio driver", required=True,
              choices=("io_uring", VHOST_USER_BLK)),
        Param("path", "path", "the file or block device (io_uring), or the backend's "
                              "socket (virtio-blk-vhost-user)", required=True),
        Param("direct", "bool", "io_uring: O_DIRECT, bypassing the page cache", default=False),
        Param("num-entries", "int", "io_uring: submission queue entries per connection",
              default=128),
        Param("num-queues", "int", "virtio-blk-vhost-user: virtqueues to use", default=1),
        Param("read-only", "bool", "open the disk read-only", default=False),
    )

    driver: str
    path: str
    direct: bool
    num_entries: int
    num_queues: int
    read_only: bool
    device: VhostUserBlk | None = None

    def config_complete(self) -> None:
        if self.driver == VHOST_USER_BLK:
            if not 1 <= self.num_queues <= 64:
                raise ConfigError(f"blkio: num-queues={self.num_queues}: expected 1 to 64")
            try:
                self.device = VhostUserBlk(self.path, self.num_queues, self._device_gone)
            except OSError as exc:
                raise ConfigError(f"blkio: {exc.strerror or exc}") from None
            return
        if not 1 <= self.num_entries <= 32768:
            raise ConfigError(f"blkio: num-entries={self.num_entries}: expected 1 to 32768")
        flags = os.O_CLOEXEC | (os.O_DIRECT if self.direct else 0)
        self.readonly = self.read_only
        try:
            if self.readonly:
                raise PermissionError(errno.EACCES, "read-only=true")
            self.fd = os.open(self.path, os.O_RDWR | flags)
        except OSError as exc:
            if exc.errno not in _READ_ONLY_ERRORS:
                raise ConfigError(f"blkio: {self.path}: {exc.strerror}") from None
            try:
                self.fd = os.open(self.path, os.O_RDONLY | flags)
            except OSError as again:
                raise ConfigError(f"blkio: {self.path}: {again.strerror}") from None
            self.readonly = True
        try:
            Ring(1).close()
        except OSError as exc:
            raise ConfigError(f"blkio: io_uring is not available here: {exc.strerror}") from None

    def _device_gone(self) -> None:
        log.error("blkio: the vhost-user backend at %s has gone away: shutting down", self.path)
        os.kill(os.getpid(), signal.SIGTERM)

    def size(self) -> int:
        info = os.fstat(self.fd)
        if stat.S_ISBLK(info.st_mode):
            return os.lseek(self.fd, 0, os.SEEK_END)
        return info.st_size

    def after_fork(self) -> None:
        if self.device is not None:
            self.device.start()
            try:
                log.debug("blkio: vhost-user-blk device %r, %d bytes", self.device.serial(),
                          self.device.capacity * SECTOR)
            except OSError as exc:  # GET_ID is optional for a device
                log.debug("blkio: the device has no ID: %s", exc)

    def open(self, ctx: OpenContext) -> Connection:
        if self.device is not None:
            self.device.start()
            return VhostUserConnection(self.device, ctx.readonly or self.read_only)
        if self.direct:
            return IoUringConnection(self, ctx.readonly)
        return AsyncIoUringConnection(self, ctx.readonly)

    def unload(self) -> None:
        if self.device is not None:
            self.device.close()
        fd: Any = getattr(self, "fd", None)
        if fd is not None:
            os.close(fd)


PLUGIN = BlkioPlugin
