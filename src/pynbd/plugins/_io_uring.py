"""A Linux io_uring in pure Python: the two system calls, the three shared rings.

``Ring(entries)`` sets up an io_uring (``io_uring_setup``), maps its
submission queue, completion queue and SQE array, and starts one thread that
waits for completions (``io_uring_enter`` with GETEVENTS, the GIL released)
and hands each result to the thread that submitted it. ``Ring.run(...)``
fills an SQE, submits it and blocks until its completion: any number of
threads may call it at once, so a connection served by a pool of threads
keeps that many requests in flight. Struct layouts and constants are the
kernel's (include/uapi/linux/io_uring.h); x86-64 and other little-endian,
strongly ordered machines only need the plain stores used here.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import threading
from typing import Any

import cffi

SYS_IO_URING_SETUP = 425
SYS_IO_URING_ENTER = 426
IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000
IORING_ENTER_GETEVENTS = 1

OP_NOP = 0
OP_FSYNC = 3
OP_FALLOCATE = 17
OP_READ = 22
OP_WRITE = 23

FSYNC_DATASYNC = 1
RWF_DSYNC = 2

_SQE = struct.Struct("<BBHiQQIIQHHiQQ")  # 64 bytes
_CQE = struct.Struct("<QiI")  # 16 bytes
_U32 = struct.Struct("<I")
_STOP = 0xFFFFFFFFFFFFFFFF

_ffi = cffi.FFI()
_libc = ctypes.CDLL(None, use_errno=True)
_syscall: Any = _libc.syscall
_syscall.restype = ctypes.c_long


def _enter(fd: int, to_submit: int, min_complete: int, flags: int) -> int:
    while True:
        n = int(_syscall(SYS_IO_URING_ENTER, ctypes.c_int(fd), ctypes.c_uint(to_submit),
                     ctypes.c_uint(min_complete), ctypes.c_uint(flags), None, ctypes.c_size_t(0)))
        if n >= 0:
            return n
        err = ctypes.get_errno()
        if err not in (errno.EINTR, errno.EAGAIN, errno.EBUSY):
            raise OSError(err, f"io_uring_enter: {os.strerror(err)}")


class _Waiter:
    """One request in flight: a lock held until its completion arrives."""

    __slots__ = ("done", "result", "keep")

    def __init__(self, keep: object) -> None:
        self.done = threading.Lock()
        self.done.acquire()
        self.result = 0
        self.keep = keep  # the buffer the kernel reads or writes, alive until then


class Ring:
    """An io_uring of ``entries`` submission slots, used by many threads."""

    def __init__(self, entries: int) -> None:
        params = ctypes.create_string_buffer(120)
        fd = _syscall(SYS_IO_URING_SETUP, ctypes.c_uint(entries), params)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"io_uring_setup({entries}): {os.strerror(err)}")
        self.fd = int(fd)
        raw = params.raw
        sq_entries, cq_entries = struct.unpack_from("<II", raw, 0)
        _, sq_tail, sq_mask, _, _, _, sq_array = struct.unpack_from("<7I", raw, 40)
        cq_head, cq_tail, cq_mask, _, _, cqes = struct.unpack_from("<6I", raw, 80)
        access = mmap.PROT_READ | mmap.PROT_WRITE
        self.sq = mmap.mmap(self.fd, sq_array + 4 * sq_entries, mmap.MAP_SHARED, access,
                            offset=IORING_OFF_SQ_RING)
        self.cq = mmap.mmap(self.fd, cqes + 16 * cq_entries, mmap.MAP_SHARED, access,
                            offset=IORING_OFF_CQ_RING)
        self.sqes = mmap.mmap(self.fd, 64 * sq_entries, mmap.MAP_SHARED, access,
                              offset=IORING_OFF_SQES)
        for i in range(sq_entries):
            _U32.pack_into(self.sq, sq_array + 4 * i, i)
        self.entries = sq_entries
        # The offsets locate the kernel's values in the rings (the masks are read once).
        self._sq_mask = _U32.unpack_from(self.sq, sq_mask)[0]
        self._cqes = cqes
        self._cq_mask = _U32.unpack_from(self.cq, cq_mask)[0]
        # The kernel reads the SQ tail and CQ head while they change: they are
        # stored whole (one 32-bit access), never byte by byte as struct would.
        self._sq_tail_ref = ctypes.c_uint32.from_buffer(self.sq, sq_tail)
        self._cq_head_ref = ctypes.c_uint32.from_buffer(self.cq, cq_head)
        self._cq_tail_ref = ctypes.c_uint32.from_buffer(self.cq, cq_tail)
        self._tail = self._sq_tail_ref.value
        self._head = self._cq_head_ref.value
        self._submit_lock = threading.Lock()
        self._reap_lock = threading.Lock()
        self._slots = threading.Semaphore(sq_entries)  # never more in flight than the rings hold
        self._waiters: dict[int, _Waiter] = {}
        self._next = 1
        self._closed = False
        self._reaper = threading.Thread(target=self._reap, name="io_uring", daemon=True)
        self._reaper.start()

    def _push(self, opcode: int, fd: int, offset: int, addr: int, length: int, op_flags: int,
              user_data: int) -> None:
        with self._submit_lock:
            index = self._tail & self._sq_mask
            _SQE.pack_into(self.sqes, 64 * index, opcode, 0, 0, fd, offset, addr, length,
                           op_flags, user_data, 0, 0, 0, 0, 0)
            self._tail = (self._tail + 1) & 0xFFFFFFFF
            self._sq_tail_ref.value = self._tail
        _enter(self.fd, 1, 0, 0)

    def run(self, opcode: int, fd: int, offset: int = 0, addr: int = 0, length: int = 0,
            op_flags: int = 0, keep: object = None) -> int:
        """Submit one operation and wait for it; its result (>= 0) or OSError."""
        if self._closed:
            raise OSError(errno.EBADF, "io_uring: the ring is closed")
        waiter = _Waiter(keep)
        self._slots.acquire()
        try:
            with self._submit_lock:
                user_data = self._next
                self._next += 1
                self._waiters[user_data] = waiter
            self._push(opcode, fd, offset, addr, length, op_flags, user_data)
            # Most operations on cached data complete during the submission:
            # take the result here rather than wait for the completion thread.
            if self._reap_lock.acquire(blocking=False):
                try:
                    self._drain()
                finally:
                    self._reap_lock.release()
            waiter.done.acquire()
        finally:
            self._slots.release()
        if waiter.result < 0:
            raise OSError(-waiter.result, os.strerror(-waiter.result))
        return waiter.result

    def _drain(self) -> bool:
        """Hand out the completions in the ring (under ``_reap_lock``); False on the stop marker."""
        cq, mask, cqes = self.cq, self._cq_mask, self._cqes
        head = self._head
        tail = self._cq_tail_ref.value
        running = True
        while head != tail:
            user_data, result, _ = _CQE.unpack_from(cq, cqes + 16 * (head & mask))
            head = (head + 1) & 0xFFFFFFFF
            if user_data == _STOP:
                running = False
                continue
            with self._submit_lock:
                waiter = self._waiters.pop(user_data, None)
            if waiter is not None:
                waiter.result = result
                waiter.done.release()
        self._head = head
        self._cq_head_ref.value = head
        return running

    def _reap(self) -> None:
        while True:
            _enter(self.fd, 0, 1, IORING_ENTER_GETEVENTS)
            with self._reap_lock:
                if not self._drain():
                    return

    def close(self) -> None:
        """Stop the completion thread (after the requests in flight) and unmap the rings."""
        if self._closed:
            return
        self._closed = True
        self._push(OP_NOP, -1, 0, 0, 0, 0, _STOP)
        self._reaper.join()
        del self._sq_tail_ref, self._cq_head_ref, self._cq_tail_ref
        for area in (self.sq, self.cq, self.sqes):
            area.close()
        os.close(self.fd)


def address_of(buf: Any) -> tuple[int, Any]:
    """The address of a buffer's first byte, and the object that keeps it valid."""
    keep = _ffi.from_buffer(buf)
    return int(_ffi.cast("uintptr_t", keep)), keep
