"""A vhost-user-blk frontend: the disk of a vhost-user backend (qemu-storage-daemon), from Python.

``VhostUserBlk(path, num_queues)`` connects to the backend's Unix socket and
does what a VMM does before its guest's driver starts: the vhost-user
handshake (features, protocol features, owner, the device's config space),
one shared-memory region made with memfd and passed with SCM_RIGHTS, and
split virtqueues with an eventfd each to kick the backend and to be called
back. ``request(kind, offset, buf)`` then runs one virtio-blk request (IN,
OUT, FLUSH, DISCARD, WRITE_ZEROES, GET_ID). The descriptors of each request
slot are linked once, up front; data is copied between the caller's buffer
and the slot's area of shared memory. Many threads may call ``request`` at
once: each queue holds ``SLOTS`` requests in flight. No thread is dedicated
to completions: of the threads waiting on a queue, one (the leader) waits on
its call eventfd and hands the others their completions, so a lone caller
kicks and waits with no thread switch. ``start_request`` and ``kick_started``
start reads and writes without waiting: a completion thread per queue reaps them while
any are outstanding and calls each one's callback. One thread watches the
socket, to fail every request when the backend goes away. Message and structure
layouts are the vhost-user specification's and virtio 1.x's (little-endian).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import mmap
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Sequence

from ._wakeup import Sleeper

# vhost-user requests
GET_FEATURES, SET_FEATURES, SET_OWNER = 1, 2, 3
SET_MEM_TABLE = 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE = 8, 9, 10
SET_VRING_KICK, SET_VRING_CALL = 12, 13
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
GET_CONFIG = 24
VERSION, REPLY = 0x1, 0x4
PROTOCOL_F_MQ, PROTOCOL_F_CONFIG = 1 << 0, 1 << 9
F_PROTOCOL_FEATURES = 1 << 30
F_VERSION_1 = 1 << 32

# virtio-blk
F_SIZE_MAX, F_SEG_MAX, F_RO, F_BLK_SIZE, F_FLUSH = 1 << 1, 1 << 2, 1 << 5, 1 << 6, 1 << 9
F_MQ, F_DISCARD, F_WRITE_ZEROES = 1 << 12, 1 << 13, 1 << 14
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
WRITE_ZEROES_UNMAP = 1
CONFIG_SIZE = 60
SECTOR = 512

# split virtqueue
DESC_F_NEXT, DESC_F_WRITE = 1, 2
QUEUE_SIZE = 128  # descriptors: three per slot
SLOTS = 32  # requests in flight per queue
CHUNK = 128 * 1024  # data bytes a slot carries; larger requests are split
SLOT_BYTES = 64 + CHUNK  # header 0..16, segment 16..32, status 32, data from 64
RING_BYTES = 4096  # desc (16 * 128) + avail (6 + 2 * 128) + used (6 + 8 * 128), 4-aligned

_HEADER = struct.Struct("<III")
_DESC = struct.Struct("<QIHH")
_U64 = struct.Struct("<Q")
_REQUEST = struct.Struct("<IIQ")  # virtio_blk_outhdr: type, ioprio, sector
_USED = struct.Struct("<II")  # vring_used_elem: id, len


class DeviceGone(OSError):
    """The backend closed its socket: every request fails with EIO from now on."""


class _Slot(Sleeper):
    """One request in flight: its status, and a lock its thread sleeps on while
    another thread of the queue (the leader) waits for the backend's calls."""

    __slots__ = ("index", "finished", "status", "out", "callback", "burst")

    def __init__(self, index: int, out: memoryview | None = None,
                 callback: Callable[[int], None] | None = None,
                 burst: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.index = index
        self.finished = False
        self.status = S_IOERR
        self.out = out  # a started read's destination
        self.callback = callback  # a started request's: called with its status
        self.burst = burst  # called once per burst of completions


class _Queue:
    """One split virtqueue in the shared region, its eventfds and its slots."""

    def __init__(self, device: VhostUserBlk, number: int, base: int, data_base: int) -> None:
        self.device = device
        self.number = number
        self.desc, self.avail, self.used = base, base + 16 * QUEUE_SIZE, base + 2048 + 512
        self.data_base = data_base
        self.kick = os.eventfd(0, os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_CLOEXEC)
        self.lock = threading.Lock()  # the slots, the avail ring and the wake-ups
        self.room = threading.Condition(self.lock)  # for a free slot
        self.full = 0  # threads waiting for a free slot
        self.leader = threading.Lock()  # held by the thread waiting on the call eventfd
        # The backend makes the call eventfd non-blocking (a flag of the file both share):
        # the leader polls it, then reads it.
        self.call_poller = select.poll()
        self.call_poller.register(self.call, select.POLLIN)
        self.free = list(range(SLOTS))
        self.waiting: dict[int, _Slot] = {}
        self.started = 0  # requests started without waiting (``start``), not completed
        self.unkicked = False  # some of them are not kicked yet
        self.reaping = False  # the completion thread is wanted
        self.wanted = threading.Condition(self.lock)
        self.reaper = threading.Thread(target=self._reap_started, name=f"vhost-user-q{number}",
                                       daemon=True)
        self.avail_idx = 0
        self.used_idx = 0
        # The indexes the other side reads while they change are stored and loaded
        # whole (one 16-bit access), never byte by byte as struct would.
        self.avail_idx_ref = ctypes.c_uint16.from_buffer(device.mem, self.avail + 2)
        self.avail_ring = (ctypes.c_uint16 * QUEUE_SIZE).from_buffer(device.mem, self.avail + 4)
        self.used_idx_ref = ctypes.c_uint16.from_buffer(device.mem, self.used + 2)
        mem = device.mem
        for slot in range(SLOTS):  # header -> data -> status, linked once
            area = data_base + slot * SLOT_BYTES
            d = 3 * slot
            _DESC.pack_into(mem, self.desc + 16 * d, area, 16, DESC_F_NEXT, d + 1)
            _DESC.pack_into(mem, self.desc + 16 * (d + 1), area + 64, 0, DESC_F_NEXT, d + 2)
            _DESC.pack_into(mem, self.desc + 16 * (d + 2), area + 32, 1, DESC_F_WRITE, 0)

    def area(self, slot: int) -> int:
        return self.data_base + slot * SLOT_BYTES

    def _take(self, out: memoryview | None = None, callback: Callable[[int], None] | None = None,
              burst: Callable[[], None] | None = None) -> _Slot:
        """A free slot (waiting for one if need be)."""
        with self.lock:
            if not self.free:  # what was started must go, and be reaped, to free slots
                if self.unkicked:
                    self.unkicked = False
                    os.eventfd_write(self.kick, 1)
                self._want_reaper()
            while not self.free:
                self.full += 1
                self.room.wait()
                self.full -= 1
            return _Slot(self.free.pop(), out, callback, burst)

    def _release(self, slot: _Slot) -> None:
        """Give ``slot`` back (under ``lock``)."""
        self.free.append(slot.index)
        if self.full:
            self.room.notify()

    def _post(self, slot: _Slot, kind: int, sector: int, length: int, writable: bool,
              fill: bytes | memoryview | None) -> None:
        """Fill ``slot``'s header and descriptors and make it available to the backend."""
        mem, view = self.device.mem, self.device.view
        area = self.area(slot.index)
        _REQUEST.pack_into(mem, area, kind, 0, sector)
        mem[area + 32] = 0xFF
        if fill is not None:
            view[area + 64:area + 64 + len(fill)] = fill
        d = 3 * slot.index
        if length:
            flags = DESC_F_NEXT | (DESC_F_WRITE if writable else 0)
            _DESC.pack_into(mem, self.desc + 16 * (d + 1), area + 64, length, flags, d + 2)
            _DESC.pack_into(mem, self.desc + 16 * d, area, 16, DESC_F_NEXT, d + 1)
        else:  # flush: header -> status
            _DESC.pack_into(mem, self.desc + 16 * d, area, 16, DESC_F_NEXT, d + 2)
        with self.lock:
            if self.device.gone:
                raise DeviceGone(errno.EIO, "vhost-user: the backend has gone away")
            self.waiting[d] = slot
            if slot.callback is not None:
                self.started += 1
            self.avail_ring[self.avail_idx % QUEUE_SIZE] = d
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
            self.avail_idx_ref.value = self.avail_idx

    def submit(self, kind: int, sector: int, length: int = 0, writable: bool = False,
               fill: bytes | memoryview | None = None, out: memoryview | None = None) -> int:
        """Run one request with at most CHUNK bytes of data in the slot's area (written
        there from ``fill`` first, read from there into ``out`` after); its status."""
        mem, view = self.device.mem, self.device.view
        slot = self._take()
        try:
            area = self.area(slot.index)
            self._post(slot, kind, sector, length, writable, fill)
            os.eventfd_write(self.kick, 1)
            self._wait(slot)
            if self.device.gone and slot.status == S_IOERR and mem[area + 32] == 0xFF:
                raise DeviceGone(errno.EIO, "vhost-user: the backend has gone away")
            if out is not None and slot.status == S_OK:
                out[:] = view[area + 64:area + 64 + len(out)]
            return slot.status
        finally:
            with self.lock:
                if not slot.finished and self.waiting.get(3 * slot.index) is slot:
                    del self.waiting[3 * slot.index]  # failed waiting: no one hands it out
                self._release(slot)

    # ------------------------------------------------------------ without waiting
    def start(self, kind: int, sector: int, data: memoryview, callback: Callable[[int], None],
              burst: Callable[[], None] | None) -> None:
        """Start a read (T_IN, into ``data``) or a write (T_OUT, from ``data``, copied
        now) of ``len(data)`` <= CHUNK bytes: ``callback(status)`` is called, a read's
        ``data`` filled, from the thread that reaps it. ``kick_started`` sends it."""
        reading = kind == T_IN
        slot = self._take(data if reading else None, callback, burst)
        try:
            self._post(slot, kind, sector, len(data), reading, None if reading else data)
        except BaseException:
            with self.lock:
                self._release(slot)
            raise
        self.unkicked = True

    def kick_started(self, reaper: bool = True) -> None:
        """Kick the backend for the started requests, and have them reaped: by the
        completion thread, or (``reaper=False``) by the caller, who polls the call
        eventfd and calls ``reap_now``."""
        if self.unkicked:
            self.unkicked = False
            os.eventfd_write(self.kick, 1)
        with self.lock:
            if reaper:
                self._want_reaper()
            else:
                self.reaping = False  # (the completion thread stops after its next wait)

    def reap_now(self) -> None:
        """Hand out the completions there are, unless another thread leads (it will:
        the call eventfd is left to it)."""
        if self.leader.acquire(blocking=False):
            try:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self.call)
                self._reap()
            finally:
                self.leader.release()
                self._promote()

    def _want_reaper(self) -> None:
        """(Under ``lock``.) Wake the completion thread if started requests are out."""
        if self.started and not self.reaping:
            self.reaping = True
            self.wanted.notify()

    def _reap_started(self) -> None:
        """The completion thread: lead while started requests are outstanding."""
        while True:
            with self.lock:
                while not self.reaping and not self.device.gone:
                    self.wanted.wait()
                if self.device.gone:
                    return
            with self.leader:
                while True:
                    with self.lock:
                        if not self.started or self.device.gone or not self.reaping:
                            self.reaping = False
                            break
                    self.call_poller.poll()
                    with contextlib.suppress(BlockingIOError):  # taken: reap anyway
                        os.eventfd_read(self.call)
                    self._reap()
            self._promote()

    def _finish_started(self, slots: list[_Slot]) -> None:
        """Hand completed started requests their data and status, give their slots back."""
        view = self.device.view
        bursts: dict[Callable[[], None], None] = {}
        for slot in slots:
            out = slot.out
            if out is not None and slot.status == S_OK:
                area = self.area(slot.index) + 64
                out[:] = view[area:area + len(out)]
            with self.lock:
                self._release(slot)
            if slot.callback is not None:
                slot.callback(slot.status)
            if slot.burst is not None:
                bursts[slot.burst] = None
        for burst in bursts:
            burst()

    def _wait(self, slot: _Slot) -> None:
        """Until ``slot`` completes: lead (wait on the call eventfd, the GIL released, and
        hand out completions) or sleep until the leader hands this one out."""
        while not slot.finished:
            if self.leader.acquire(blocking=False):
                try:
                    while not slot.finished:
                        self.call_poller.poll()
                        with contextlib.suppress(BlockingIOError):  # taken: reap anyway
                            os.eventfd_read(self.call)
                        self._reap()
                finally:
                    self.leader.release()
                    self._promote()
            else:
                slot.sleep()

    def _promote(self) -> None:
        """After leading: wake a thread still waiting, to lead in its turn. (One that
        starts waiting after this look tries to lead itself.)"""
        if not self.waiting:
            return
        with self.lock:
            for slot in self.waiting.values():
                if slot.callback is None:  # (a started request has no thread)
                    slot.wake()
                    return

    def _reap(self) -> None:
        """Hand out the completions in the used ring."""
        mem = self.device.mem
        started: list[_Slot] = []
        with self.lock:
            used = self.used_idx_ref.value
            while self.used_idx != used:
                head, _ = _USED.unpack_from(mem, self.used + 4 + 8 * (self.used_idx % QUEUE_SIZE))
                self.used_idx = (self.used_idx + 1) & 0xFFFF
                slot = self.waiting.pop(head, None)
                if slot is not None:
                    slot.status = mem[self.area(slot.index) + 32]
                    slot.finished = True
                    if slot.callback is None:
                        slot.wake()
                    else:
                        started.append(slot)
                        self.started -= 1
        if started:
            self._finish_started(started)

    def fail_all(self) -> None:
        """The backend is gone: every request waiting fails (and a leader wakes up)."""
        started: list[_Slot] = []
        with self.lock:
            for slot in self.waiting.values():
                slot.finished = True
                if slot.callback is None:
                    slot.wake()
                else:
                    started.append(slot)
            self.waiting.clear()
            self.started = 0
            self.wanted.notify()
        os.eventfd_write(self.call, 1)
        self._finish_started(started)


class VhostUserBlk:
    """A connection to a vhost-user-blk backend."""

    def __init__(self, path: str, num_queues: int = 1,
                 on_gone: Callable[[], None] | None = None) -> None:
        self.gone = False
        self.closing = False
        self.on_gone = on_gone
        self._started = False
        self._start_lock = threading.Lock()
        self._monitor = threading.Thread(target=self._watch, name="vhost-user", daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise OSError(exc.errno, f"cannot connect to {path}: {exc.strerror}") from None
        try:
            self._handshake(num_queues)
        except BaseException:
            self.sock.close()
            raise
        self._next_queue = itertools.cycle(self.queues)
        self._calls: select.epoll | None = None  # see completion_fd

    # ------------------------------------------------------------ messages
    def _send(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        data = _HEADER.pack(request, VERSION, len(payload)) + payload
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
        self.sock.sendmsg([data], ancillary)

    def _recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            part = self.sock.recv(n - len(data))
            if not part:
                raise OSError(errno.ECONNRESET, "vhost-user: the backend closed the connection")
            data += part
        return data

    def _ask(self, request: int, payload: bytes = b"") -> bytes:
        self._send(request, payload)
        reply, flags, size = _HEADER.unpack(self._recv_exact(12))
        if reply != request or not flags & REPLY:
            raise OSError(errno.EPROTO, f"vhost-user: reply {reply} to request {request}")
        return self._recv_exact(size)

    def _u64(self, request: int) -> int:
        return int(_U64.unpack(self._ask(request)[:8])[0])

    # ------------------------------------------------------------ set-up
    def _handshake(self, num_queues: int) -> None:
        features = self._u64(GET_FEATURES)
        if not features & F_PROTOCOL_FEATURES:
            raise OSError(errno.ENOTSUP, "vhost-user: the backend has no protocol features")
        protocol = self._u64(GET_PROTOCOL_FEATURES)
        if not protocol & PROTOCOL_F_CONFIG:
            raise OSError(errno.ENOTSUP, "vhost-user: the backend does not offer its config space")
        wanted = protocol & (PROTOCOL_F_MQ | PROTOCOL_F_CONFIG)
        self._send(SET_PROTOCOL_FEATURES, _U64.pack(wanted))
        most = self._u64(GET_QUEUE_NUM) if wanted & PROTOCOL_F_MQ else 1
        self._send(SET_OWNER)
        reply = self._ask(GET_CONFIG, struct.pack("<III", 0, CONFIG_SIZE, 0) + bytes(CONFIG_SIZE))
        self.config = reply[12:12 + CONFIG_SIZE]
        self.features = features & (F_VERSION_1 | F_PROTOCOL_FEATURES | F_SIZE_MAX | F_SEG_MAX | F_RO
                                    | F_BLK_SIZE | F_FLUSH | F_MQ | F_DISCARD | F_WRITE_ZEROES)
        self.capacity: int = struct.unpack_from("<Q", self.config, 0)[0]
        self.block_size: int = (struct.unpack_from("<I", self.config, 20)[0]
                                if self.features & F_BLK_SIZE else SECTOR)
        device_queues = struct.unpack_from("<H", self.config, 34)[0] if self.features & F_MQ else 1
        count = max(1, min(num_queues, most, device_queues or 1))
        self._send(SET_FEATURES, _U64.pack(self.features))
        size = count * (RING_BYTES + SLOTS * SLOT_BYTES)
        size = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        memfd = os.memfd_create("pynbd-vhost-user", os.MFD_CLOEXEC)
        try:
            os.ftruncate(memfd, size)
            self.mem = mmap.mmap(memfd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self.view = memoryview(self.mem)
            self._anchor = ctypes.c_char.from_buffer(self.mem)
            self.address = ctypes.addressof(self._anchor)
            # One region: guest physical address 0 is the start of the memfd.
            region = struct.pack("<QQQQ", 0, size, self.address, 0)
            self._send(SET_MEM_TABLE, struct.pack("<II", 1, 0) + region + bytes(32 * 7), [memfd])
        finally:
            os.close(memfd)
        rings_end = count * RING_BYTES
        self.queues = [_Queue(self, q, q * RING_BYTES, rings_end + q * SLOTS * SLOT_BYTES)
                       for q in range(count)]
        for q in self.queues:
            n = q.number
            self._send(SET_VRING_NUM, struct.pack("<II", n, QUEUE_SIZE))
            self._send(SET_VRING_BASE, struct.pack("<II", n, 0))
            self._send(SET_VRING_ADDR, struct.pack("<IIQQQQ", n, 0, self.address + q.desc,
                                                   self.address + q.used, self.address + q.avail, 0))
            self._send(SET_VRING_KICK, _U64.pack(n), [q.kick])
            self._send(SET_VRING_CALL, _U64.pack(n), [q.call])
            self._send(SET_VRING_ENABLE, struct.pack("<II", n, 1))
        self._u64(GET_FEATURES)  # a round trip: the backend has taken every message above

    def start(self) -> None:
        """Start watching the backend's socket (after the server forked into the background)."""
        with self._start_lock:
            if not self._started:
                self._started = True
                self._monitor.start()
                for q in self.queues:
                    q.reaper.start()

    def _watch(self) -> None:
        """Wait for the backend to close its socket (or for ``close``): then every
        request fails, and ``on_gone`` is told unless we are closing."""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN | select.POLLHUP)
        poller.poll()
        self.gone = True
        for q in self.queues:
            q.fail_all()
        if not self.closing and self.on_gone is not None:
            self.on_gone()

    # ------------------------------------------------------------ requests
    @property
    def read_only(self) -> bool:
        return bool(self.features & F_RO)

    def has(self, feature: int) -> bool:
        return bool(self.features & feature)

    def request(self, kind: int, offset: int = 0, buf: memoryview | None = None,
                count: int = 0, unmap: bool = False) -> None:
        """One NBD request as virtio-blk requests (split into CHUNK-sized parts)."""
        queue = next(self._next_queue)
        if kind == T_FLUSH:
            self._check(queue.submit(T_FLUSH, 0))
            return
        if kind in (T_DISCARD, T_WRITE_ZEROES):
            limit = (1 << 32) - self.block_size // SECTOR
            done = 0
            while done < count:
                sectors = min((count - done) // SECTOR, limit)
                segment = struct.pack("<QII", (offset + done) // SECTOR, sectors,
                                      WRITE_ZEROES_UNMAP if unmap else 0)
                self._check(queue.submit(kind, 0, len(segment), False, segment))
                done += sectors * SECTOR
            return
        assert buf is not None
        done = 0
        while done < len(buf):
            part = buf[done:done + CHUNK]
            sector = (offset + done) // SECTOR
            if kind == T_OUT:
                self._check(queue.submit(T_OUT, sector, len(part), False, part))
            else:
                self._check(queue.submit(kind, sector, len(part), True, out=part))
            done += len(part)

    def start_request(self, kind: int, offset: int, buf: memoryview,
                      callback: Callable[[int], None], burst: Callable[[], None] | None = None
                      ) -> None:
        """Start reading (T_IN) or writing (T_OUT) ``len(buf)`` <= CHUNK bytes (whole
        sectors) at ``offset``: ``callback(status)`` is called once done, a read's data
        in ``buf`` (``check`` the status)."""
        next(self._next_queue).start(kind, offset // SECTOR, buf, callback, burst)

    def kick_started(self, reaper: bool = True) -> None:
        for q in self.queues:
            q.kick_started(reaper)

    def completion_fd(self) -> int:
        """A file descriptor readable when a queue's backend has called (its call
        eventfd; with several queues, an epoll of theirs): then ``reap_started``."""
        if len(self.queues) == 1:
            return self.queues[0].call
        if self._calls is None:
            self._calls = select.epoll()
            for q in self.queues:
                self._calls.register(q.call, select.EPOLLIN)
        return self._calls.fileno()

    def reap_started(self) -> None:
        for q in self.queues:
            q.reap_now()

    def serial(self) -> str:
        """The device's ID string (GET_ID: up to 20 bytes)."""
        data = memoryview(bytearray(20))
        self._check(next(self._next_queue).submit(T_GET_ID, 0, 20, True, out=data))
        return bytes(data).rstrip(b"\0").decode("ascii", "replace")

    def _check(self, status: int) -> None:
        error = self.error(status)
        if error is not None:
            raise error

    def error(self, status: int) -> OSError | None:
        """What a request's status means for the client: None for success."""
        if status == S_OK:
            return None
        if self.gone:
            return DeviceGone(errno.EIO, "vhost-user: the backend has gone away")
        if status == S_UNSUPP:
            return OSError(errno.ENOTSUP, "vhost-user: the device does not support this request")
        return OSError(errno.EIO, "vhost-user: the device failed the request")

    def close(self) -> None:
        self.closing = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            self.closing = True
        if self._monitor.is_alive():
            self._monitor.join()
        for q in self.queues:
            if q.reaper.is_alive():
                q.reaper.join()
            os.close(q.kick)
            os.close(q.call)
            del q.avail_idx_ref, q.avail_ring, q.used_idx_ref
        self.sock.close()
        if self._calls is not None:
            self._calls.close()
        del self._anchor
        self.view.release()
        self.mem.close()
