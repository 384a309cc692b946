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
once: each queue holds ``SLOTS`` requests in flight, and a thread per queue
waits on its call eventfd and hands out completions. Message and structure
layouts are the vhost-user specification's and virtio 1.x's (little-endian).
"""

from __future__ import annotations

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


class DeviceGone(OSError):
    """The backend closed its socket: every request fails with EIO from now on."""


class _Slot:
    __slots__ = ("index", "done", "status")

    def __init__(self, index: int) -> None:
        self.index = index
        self.done = threading.Lock()
        self.done.acquire()
        self.status = S_IOERR


class _Queue:
    """One split virtqueue in the shared region, its eventfds and its slots."""

    def __init__(self, device: VhostUserBlk, number: int, base: int, data_base: int) -> None:
        self.device = device
        self.number = number
        self.desc, self.avail, self.used = base, base + 16 * QUEUE_SIZE, base + 2048 + 512
        self.data_base = data_base
        self.kick = os.eventfd(0, os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_CLOEXEC)
        self.lock = threading.Lock()
        self.free = list(range(SLOTS))
        self.slots_free = threading.Semaphore(SLOTS)
        self.waiting: dict[int, _Slot] = {}
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
        self.thread = threading.Thread(target=self._complete, name=f"vhost-user-q{number}",
                                       daemon=True)

    def area(self, slot: int) -> int:
        return self.data_base + slot * SLOT_BYTES

    def submit(self, kind: int, sector: int, length: int = 0, writable: bool = False,
               fill: bytes | memoryview | None = None) -> tuple[int, memoryview]:
        """Run one request with at most CHUNK bytes of data in the slot's area (written
        there from ``fill`` first); its status and a view of that area."""
        mem, view = self.device.mem, self.device.view
        self.slots_free.acquire()
        try:
            with self.lock:
                slot = _Slot(self.free.pop())
            area = self.area(slot.index)
            struct.pack_into("<IIQ", mem, area, kind, 0, sector)
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
                    self.free.append(slot.index)
                    raise DeviceGone(errno.EIO, "vhost-user: the backend has gone away")
                self.waiting[d] = slot
                self.avail_ring[self.avail_idx % QUEUE_SIZE] = d
                self.avail_idx = (self.avail_idx + 1) & 0xFFFF
                self.avail_idx_ref.value = self.avail_idx
            os.eventfd_write(self.kick, 1)
            slot.done.acquire()
            with self.lock:
                self.free.append(slot.index)
            if self.device.gone and slot.status == S_IOERR and mem[area + 32] == 0xFF:
                raise DeviceGone(errno.EIO, "vhost-user: the backend has gone away")
            return slot.status, view[area + 64:area + 64 + length]
        finally:
            self.slots_free.release()

    def _complete(self) -> None:
        mem = self.device.mem
        poller = select.poll()
        poller.register(self.call, select.POLLIN)
        poller.register(self.device.sock.fileno(), select.POLLIN | select.POLLHUP)
        while True:
            events = dict(poller.poll())
            if self.call in events:
                os.eventfd_read(self.call)
            with self.lock:
                used = self.used_idx_ref.value
                while self.used_idx != used:
                    head, _ = struct.unpack_from("<II", mem, self.used + 4 + 8 * (self.used_idx % QUEUE_SIZE))
                    self.used_idx = (self.used_idx + 1) & 0xFFFF
                    slot = self.waiting.pop(head, None)
                    if slot is not None:
                        slot.status = mem[self.area(slot.index) + 32]
                        slot.done.release()
                if self.device.sock.fileno() in events or self.device.closing:
                    self.device.gone = True
                    for slot in self.waiting.values():
                        slot.done.release()
                    self.waiting.clear()
                    break
        if not self.device.closing and self.device.on_gone is not None:
            self.device.on_gone()


class VhostUserBlk:
    """A connection to a vhost-user-blk backend."""

    def __init__(self, path: str, num_queues: int = 1,
                 on_gone: Callable[[], None] | None = None) -> None:
        self.gone = False
        self.closing = False
        self.on_gone = on_gone
        self._started = False
        self._start_lock = threading.Lock()
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
        """Start the completion threads (after the server forked into the background)."""
        with self._start_lock:
            if not self._started:
                self._started = True
                for q in self.queues:
                    q.thread.start()

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
            self._check(queue.submit(T_FLUSH, 0)[0])
            return
        if kind in (T_DISCARD, T_WRITE_ZEROES):
            limit = (1 << 32) - self.block_size // SECTOR
            done = 0
            while done < count:
                sectors = min((count - done) // SECTOR, limit)
                segment = struct.pack("<QII", (offset + done) // SECTOR, sectors,
                                      WRITE_ZEROES_UNMAP if unmap else 0)
                self._check(queue.submit(kind, 0, len(segment), False, segment)[0])
                done += sectors * SECTOR
            return
        assert buf is not None
        done = 0
        while done < len(buf):
            part = buf[done:done + CHUNK]
            sector = (offset + done) // SECTOR
            if kind == T_OUT:
                self._check(queue.submit(T_OUT, sector, len(part), False, part)[0])
            else:
                status, data = queue.submit(kind, sector, len(part), True)
                self._check(status)
                part[:] = data
            done += len(part)

    def serial(self) -> str:
        """The device's ID string (GET_ID: up to 20 bytes)."""
        status, data = next(self._next_queue).submit(T_GET_ID, 0, 20, True)
        self._check(status)
        return bytes(data).rstrip(b"\0").decode("ascii", "replace")

    def _check(self, status: int) -> None:
        if status == S_OK:
            return
        if status == S_UNSUPP:
            raise OSError(errno.ENOTSUP, "vhost-user: the device does not support this request")
        raise OSError(errno.EIO, "vhost-user: the device failed the request")

    def close(self) -> None:
        self.closing = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            self.closing = True
        for q in self.queues:
            os.eventfd_write(q.call, 1)
            if q.thread.is_alive():
                q.thread.join()
            os.close(q.kick)
            os.close(q.call)
            del q.avail_idx_ref, q.avail_ring, q.used_idx_ref
        self.sock.close()
        del self._anchor
        self.view.release()
        self.mem.close()
