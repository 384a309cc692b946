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
to their completions: of the threads waiting on a queue, one (the leader) waits on
its call eventfd and hands the others their completions, so a lone caller
kicks and waits with no thread switch. ``start_request`` and ``kick_started``
start reads and writes without waiting: a completion thread per queue (or the
caller, polling ``completion_fd`` and calling ``reap_started``) reaps them and
reports each one. A started request costs one lock, two structure packs and
a ring store; its completion, one used-ring entry read and (a read) the data
copied out. With VIRTIO_RING_F_EVENT_IDX the backend calls once per round of
reaping, not once per completion (the used ring's event index is moved on
after each round); kicks are not suppressed by the avail event index, since
a backend built on libvhost-user publishes it without a barrier before
checking the ring again (a kick skipped on a stale index would be lost).
One thread watches the socket, to fail every request when the backend goes
away. Message and structure layouts are the vhost-user specification's and
virtio 1.x's (little-endian).
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
F_EVENT_IDX = 1 << 29  # VIRTIO_RING_F_EVENT_IDX: the driver says when it wants to be called
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
AVAIL_AT, USED_AT = 16 * QUEUE_SIZE, 16 * QUEUE_SIZE + 512  # in a queue's 4096 bytes

_HEADER = struct.Struct("<III")
_DESC = struct.Struct("<QIHH")
_U64 = struct.Struct("<Q")
_REQUEST = struct.Struct("<IIQ")  # virtio_blk_outhdr: type, ioprio, sector
_USED = struct.Struct("<II")  # vring_used_elem: id, len
_LEN_FLAGS = struct.Struct("<IH")  # a descriptor's len and flags (at 8)

# A started request: (slot, a read's destination or None, report, tag, burst)
Started = tuple[int, "memoryview | None", "Callable[[object, OSError | None], None]", object,
                "Callable[[], None] | None"]


class DeviceGone(OSError):
    """The backend closed its socket: every request fails with EIO from now on."""


class _Slot(Sleeper):
    """A request a thread waits for (``submit``): its status, and a lock the thread
    sleeps on while another thread of the queue (the leader) waits for the backend's calls."""

    __slots__ = ("index", "finished", "status")

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index
        self.finished = False
        self.status = S_IOERR


def _fence() -> None:
    """A full memory barrier: a lock's atomic read-modify-write (a store before it is
    seen by the other side before a load after it)."""
    _FENCE.acquire()
    _FENCE.release()


_FENCE = threading.Lock()


class _Queue:
    """One split virtqueue in the shared region, its eventfds and its slots."""

    def __init__(self, device: VhostUserBlk, number: int, base: int, data_base: int,
                 first_index: int) -> None:
        self.device = device
        self.number = number
        self.desc, self.avail, self.used = base, base + AVAIL_AT, base + USED_AT
        self.data_base = data_base
        self.kick = os.eventfd(0, os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_CLOEXEC)
        self.lock = threading.Lock()  # the slots, the rings and the wake-ups
        self.room = threading.Condition(self.lock)  # for a free slot
        self.full = 0  # threads waiting for a free slot
        self.leader = threading.Lock()  # held by the thread waiting on the call eventfd
        # The backend makes the call eventfd non-blocking (a flag of the file both share):
        # the leader polls it, then reads it.
        self.call_poller = select.poll()
        self.call_poller.register(self.call, select.POLLIN)
        self.free = list(range(SLOTS))
        # In flight, by head descriptor: requests a thread waits for (``submit``), and
        # requests started without waiting (``start``).
        self.waiting: dict[int, _Slot] = {}
        self.started: dict[int, Started] = {}
        self.unkicked = False  # some started requests are not kicked yet
        self.reaping = False  # the completion thread is wanted
        self.wanted = threading.Condition(self.lock)
        self.reaper = threading.Thread(target=self._reap_started, name=f"vhost-user-q{number}",
                                       daemon=True)
        self.avail_idx = self.used_idx = first_index
        # The indexes the other side reads while they change are stored and loaded
        # whole (one 16-bit access), never byte by byte as struct would.
        mem = device.mem
        self.avail_idx_ref = ctypes.c_uint16.from_buffer(mem, self.avail + 2)
        self.avail_ring = (ctypes.c_uint16 * QUEUE_SIZE).from_buffer(mem, self.avail + 4)
        self.used_idx_ref = ctypes.c_uint16.from_buffer(mem, self.used + 2)
        # (The backend takes the used index from the ring when it is given the ring.)
        self.avail_idx_ref.value = self.used_idx_ref.value = first_index
        self.used_ring = (ctypes.c_uint32 * (2 * QUEUE_SIZE)).from_buffer(mem, self.used + 4)
        # EVENT_IDX: the used index the backend calls at (avail->used_event): set to the
        # next one after each reap, so completions arriving before the next reap make
        # one call, not one each.
        self.used_event = (ctypes.c_uint16.from_buffer(mem, self.avail + 4 + 2 * QUEUE_SIZE)
                           if device.features & F_EVENT_IDX else None)
        if self.used_event is not None:
            self.used_event.value = first_index
        self.areas = [self.area(slot) for slot in range(SLOTS)]
        self.slot_data = [device.view[area + 64:area + 64 + CHUNK] for area in self.areas]
        for slot in range(SLOTS):  # header -> data -> status, linked once
            area = self.area(slot)
            d = 3 * slot
            _DESC.pack_into(mem, self.desc + 16 * d, area, 16, DESC_F_NEXT, d + 1)
            _DESC.pack_into(mem, self.desc + 16 * (d + 1), area + 64, 0, DESC_F_NEXT, d + 2)
            _DESC.pack_into(mem, self.desc + 16 * (d + 2), area + 32, 1, DESC_F_WRITE, 0)

    def area(self, slot: int) -> int:
        return self.data_base + slot * SLOT_BYTES

    def _free_slot(self) -> int:
        """(Under ``lock``.) A free slot, waiting for one if need be."""
        if not self.free:  # what was started must go, and be reaped, to free slots
            if self.unkicked:
                self.unkicked = False
                os.eventfd_write(self.kick, 1)
            self._want_reaper()
            while not self.free:
                self.full += 1
                self.room.wait()
                self.full -= 1
        if self.device.gone:
            raise DeviceGone(errno.EIO, "vhost-user: the backend has gone away")
        return self.free.pop()

    def _publish(self, head: int) -> None:
        """(Under ``lock``.) Make the chain at ``head`` available to the backend."""
        self.avail_ring[self.avail_idx % QUEUE_SIZE] = head
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.avail_idx_ref.value = self.avail_idx

    def _fill(self, slot: int, kind: int, sector: int, length: int, writable: bool) -> int:
        """Write ``slot``'s request header and its data descriptor; its area."""
        mem = self.device.mem
        area = self.data_base + slot * SLOT_BYTES
        _REQUEST.pack_into(mem, area, kind, 0, sector)
        mem[area + 32] = 0xFF
        _LEN_FLAGS.pack_into(mem, self.desc + 48 * slot + 24, length,
                             DESC_F_NEXT | DESC_F_WRITE if writable else DESC_F_NEXT)
        return area

    def submit(self, kind: int, sector: int, length: int = 0, writable: bool = False,
               fill: bytes | memoryview | None = None, out: memoryview | None = None) -> int:
        """Run one request with at most CHUNK bytes of data in the slot's area (written
        there from ``fill`` first, read from there into ``out`` after); its status."""
        mem, view = self.device.mem, self.device.view
        with self.lock:
            slot = _Slot(self._free_slot())
        head = 3 * slot.index
        try:
            area = self._fill(slot.index, kind, sector, length, writable)
            if fill is not None:
                view[area + 64:area + 64 + len(fill)] = fill
            if not length:  # flush: header -> status
                _DESC.pack_into(mem, self.desc + 16 * head, area, 16, DESC_F_NEXT, head + 2)
            with self.lock:
                if self.device.gone:
                    raise DeviceGone(errno.EIO, "vhost-user: the backend has gone away")
                self.waiting[head] = slot
                self._publish(head)
            os.eventfd_write(self.kick, 1)
            self._wait(slot)
            if self.device.gone and slot.status == S_IOERR and mem[area + 32] == 0xFF:
                raise DeviceGone(errno.EIO, "vhost-user: the backend has gone away")
            if out is not None and slot.status == S_OK:
                out[:] = view[area + 64:area + 64 + len(out)]
            return slot.status
        finally:
            if not length:
                _DESC.pack_into(mem, self.desc + 16 * head, self.area(slot.index), 16,
                                DESC_F_NEXT, head + 1)
            with self.lock:
                if not slot.finished and self.waiting.get(head) is slot:
                    del self.waiting[head]  # failed waiting: no one hands it out
                self.free.append(slot.index)
                if self.full:
                    self.room.notify()

    # ------------------------------------------------------------ without waiting
    def start(self, kind: int, sector: int, data: memoryview,
              report: Callable[[object, OSError | None], None], tag: object,
              burst: Callable[[], None] | None) -> None:
        """Start a read (T_IN, into ``data``) or a write (T_OUT, from ``data``, copied
        now) of ``len(data)`` <= CHUNK bytes: ``report(tag, error)`` is called (None
        on success, a read's ``data`` filled) from the thread that reaps it, then
        ``burst``. ``kick_started`` sends it."""
        mem = self.device.mem
        n = len(data)
        with self.lock:  # (_free_slot, _fill and _publish, inlined: this runs per request)
            free = self.free
            slot = free.pop() if free and not self.device.gone else self._free_slot()
            head = 3 * slot
            _REQUEST.pack_into(mem, self.areas[slot], kind, 0, sector)
            if kind == T_IN:
                _LEN_FLAGS.pack_into(mem, self.desc + 16 * head + 24, n, DESC_F_NEXT | DESC_F_WRITE)
                self.started[head] = (slot, data, report, tag, burst)
            else:
                _LEN_FLAGS.pack_into(mem, self.desc + 16 * head + 24, n, DESC_F_NEXT)
                self.slot_data[slot][:n] = data
                self.started[head] = (slot, None, report, tag, burst)
            index = self.avail_idx
            self.avail_ring[index % QUEUE_SIZE] = head
            self.avail_idx = index = (index + 1) & 0xFFFF
            self.avail_idx_ref.value = index
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
                return
            self.reaping = False  # (the completion thread stops after its next wait)
        # Completions already in the used ring go with this round: no call for them
        # (the event index moves past them), no wake-up, no eventfd read.
        if self.used_idx_ref.value != self.used_idx and self.leader.acquire(blocking=False):
            try:
                self._reap()
            finally:
                self.leader.release()
                self._promote()

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
                slot.wake()
                return

    def _reap(self) -> None:
        """Hand out the completions in the used ring: wake the threads waiting for
        theirs; copy out started reads' data and free their slots (under the lock:
        a slot's area is reused as soon as it is free), then report them."""
        mem = self.device.mem
        error = self.device.error
        ring, started, areas, slot_data = self.used_ring, self.started, self.areas, self.slot_data
        reports: list[tuple[Callable[[object, OSError | None], None], object, OSError | None,
                            Callable[[], None] | None]] = []
        with self.lock:
            used = self.used_idx_ref.value
            while used != self.used_idx:
                # The heads of the new used elements (id, len), in one or two slices.
                first = self.used_idx % QUEUE_SIZE
                end = first + ((used - self.used_idx) & 0xFFFF)
                heads = ring[2 * first:2 * min(end, QUEUE_SIZE):2]
                if end > QUEUE_SIZE:
                    heads += ring[0:2 * (end - QUEUE_SIZE):2]
                self.used_idx = used
                for head in heads:
                    entry = started.pop(head, None)
                    if entry is not None:
                        slot, out, report, tag, burst = entry
                        status = mem[areas[slot] + 32]
                        if status:
                            reports.append((report, tag, error(status), burst))
                        else:
                            if out is not None:
                                out[:] = slot_data[slot][:len(out)]
                            reports.append((report, tag, None, burst))
                        self.free.append(slot)
                        continue
                    waiter = self.waiting.pop(head, None)
                    if waiter is not None:
                        waiter.status = mem[areas[waiter.index] + 32]
                        waiter.finished = True
                        waiter.wake()
                if self.used_event is not None:
                    # Call at the next completion; one that came before the backend
                    # could see this is found by looking again after a barrier.
                    self.used_event.value = used
                    _fence()
                    used = self.used_idx_ref.value
            if reports and self.full:
                self.room.notify(len(reports))
        if reports:
            bursts: dict[Callable[[], None], None] = {}
            for report, tag, failure, burst in reports:
                report(tag, failure)
                if burst is not None:
                    bursts[burst] = None
            for burst in bursts:
                burst()

    def fail_all(self) -> None:
        """The backend is gone: every request waiting fails (and a leader wakes up)."""
        with self.lock:
            for slot in self.waiting.values():
                slot.finished = True
                slot.wake()
            self.waiting.clear()
            started = list(self.started.values())
            self.started.clear()
            self.free.extend(entry[0] for entry in started)
            self.wanted.notify()
            self.room.notify_all()
        os.eventfd_write(self.call, 1)
        bursts: dict[Callable[[], None], None] = {}
        for _, _, report, tag, burst in started:
            report(tag, DeviceGone(errno.EIO, "vhost-user: the backend has gone away"))
            if burst is not None:
                bursts[burst] = None
        for burst in bursts:
            burst()


class VhostUserBlk:
    """A connection to a vhost-user-blk backend. ``first_index``: where the rings'
    16-bit indexes start (0; the tests start them just below the wrap)."""

    def __init__(self, path: str, num_queues: int = 1,
                 on_gone: Callable[[], None] | None = None, first_index: int = 0) -> None:
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
            self._handshake(num_queues, first_index)
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
    def _handshake(self, num_queues: int, first_index: int) -> None:
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
                                    | F_BLK_SIZE | F_FLUSH | F_MQ | F_DISCARD | F_WRITE_ZEROES
                                    | F_EVENT_IDX)
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
        self.queues = [_Queue(self, q, q * RING_BYTES, rings_end + q * SLOTS * SLOT_BYTES, first_index)
                       for q in range(count)]
        for q in self.queues:
            n = q.number
            self._send(SET_VRING_NUM, struct.pack("<II", n, QUEUE_SIZE))
            self._send(SET_VRING_BASE, struct.pack("<II", n, first_index))
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
                      report: Callable[[object, OSError | None], None], tag: object,
                      burst: Callable[[], None] | None = None) -> None:
        """Start reading (T_IN) or writing (T_OUT) ``len(buf)`` <= CHUNK bytes (whole
        sectors) at ``offset``: ``report(tag, error)`` is called once done (``error``
        None on success, a read's data in ``buf``), then ``burst``."""
        next(self._next_queue).start(kind, offset // SECTOR, buf, report, tag, burst)

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
            del q.avail_idx_ref, q.avail_ring, q.used_idx_ref, q.used_ring, q.used_event
            for data in q.slot_data:
                data.release()
        self.sock.close()
        if self._calls is not None:
            self._calls.close()
        del self._anchor
        self.view.release()
        self.mem.close()
