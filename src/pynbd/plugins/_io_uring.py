"""A Linux io_uring in pure Python: the two system calls, the three shared rings.

``Ring(entries)`` sets up an io_uring (``io_uring_setup``) and maps its
submission queue, completion queue and SQE array. ``Ring.run(...)`` fills an
SQE, submits it and blocks until its completion (``io_uring_enter`` with
GETEVENTS, the GIL released): any number of threads may call it at once, so
a connection served by a pool of threads keeps that many requests in flight.
Struct layouts and constants are the kernel's (include/uapi/linux/io_uring.h);
x86-64 and other little-endian, strongly ordered machines only need the plain
stores used here.
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

OP_FSYNC = 3
OP_FALLOCATE = 17
OP_READ = 22
OP_WRITE = 23

FSYNC_DATASYNC = 1
RWF_DSYNC = 2

_SQE = struct.Struct("<BBHiQQIIQHHiQQ")  # 64 bytes
_CQE = struct.Struct("<QiI")  # 16 bytes
_U32 = struct.Struct("<I")

_ffi = cffi.FFI()
_libc = ctypes.CDLL(None, use_errno=True)
_syscall: Any = _libc.syscall
_syscall.restype = ctypes.c_long
# io_uring_enter through cffi, whose calls cost less than ctypes' (declared with its
# arguments' types: on x86-64 and arm64 Linux a variadic callee is called the same way).
_ffi.cdef("long syscall (long number, unsigned int fd, unsigned int to_submit, "
          "unsigned int min_complete, unsigned int flags, void *sig, size_t size);")
_cffi_libc: Any = _ffi.dlopen(None)
_enter_syscall: Any = _cffi_libc.syscall


def _enter(fd: int, to_submit: int, min_complete: int, flags: int) -> int:
    while True:
        n = int(_enter_syscall(SYS_IO_URING_ENTER, fd, to_submit, min_complete, flags,
                               _ffi.NULL, 0))
        if n >= 0:
            return n
        err = _ffi.errno
        if err not in (errno.EINTR, errno.EAGAIN, errno.EBUSY):
            raise OSError(err, f"io_uring_enter: {os.strerror(err)}")


class _Waiter:
    """One request in flight: its result, and a lock its thread sleeps on when
    another thread is waiting on the ring (the leader) for the completions."""

    __slots__ = ("done", "finished", "signalled", "result", "keep")

    def __init__(self, keep: object) -> None:
        self.done = threading.Lock()
        self.done.acquire()
        self.finished = False
        self.signalled = False  # ``done`` is released (or about to be taken)
        self.result = 0
        self.keep = keep  # the buffer the kernel reads or writes, alive until then


class Ring:
    """An io_uring of ``entries`` submission slots, used by any number of threads.

    No thread is dedicated to completions: the thread holding the leader lock
    waits for them in ``io_uring_enter`` (GETEVENTS, the GIL released) and
    hands out what arrives; when its own has come it passes the role to a
    thread still waiting. A lone caller (a connection whose requests run one
    at a time) thus submits and waits in one system call, with no thread
    switch, and ``n`` callers keep ``n`` requests in flight.
    """

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
        self._lock = threading.Lock()  # the SQ tail, the waiters and their wake-ups
        self._leader = threading.Lock()  # held by the thread reaping completions
        # Never more in flight than the rings hold: a caller past that waits for room.
        self._room = threading.Condition(self._lock)
        self._full = 0  # callers waiting for room
        self._waiters: dict[int, _Waiter] = {}
        self._next = 1
        self._closed = False

    def run(self, opcode: int, fd: int, offset: int = 0, addr: int = 0, length: int = 0,
            op_flags: int = 0, keep: object = None) -> int:
        """Submit one operation and wait for it; its result (>= 0) or OSError."""
        if self._closed:
            raise OSError(errno.EBADF, "io_uring: the ring is closed")
        waiter = _Waiter(keep)
        user_data = 0
        try:
            with self._lock:
                while len(self._waiters) >= self.entries:
                    self._full += 1
                    self._room.wait()
                    self._full -= 1
                user_data = self._next
                self._next += 1
                self._waiters[user_data] = waiter
                index = self._tail & self._sq_mask
                _SQE.pack_into(self.sqes, 64 * index, opcode, 0, 0, fd, offset, addr, length,
                               op_flags, user_data, 0, 0, 0, 0, 0)
                self._tail = (self._tail + 1) & 0xFFFFFFFF
                self._sq_tail_ref.value = self._tail
            submit = 1  # each caller submits one entry (not necessarily its own)
            while not waiter.finished:
                if self._leader.acquire(blocking=False):
                    try:
                        while not waiter.finished:
                            _enter(self.fd, submit, 1, IORING_ENTER_GETEVENTS)
                            submit = 0
                            self._drain()
                    finally:
                        self._leader.release()
                        self._promote()
                else:
                    if submit:
                        _enter(self.fd, submit, 0, 0)
                        submit = 0
                    waiter.done.acquire()
                    waiter.signalled = False
        finally:
            if not waiter.finished:  # io_uring_enter failed: no one is to wake this thread
                with self._lock:
                    self._waiters.pop(user_data, None)
        if waiter.result < 0:
            raise OSError(-waiter.result, os.strerror(-waiter.result))
        return waiter.result

    @staticmethod
    def _wake(waiter: _Waiter) -> None:
        """Wake ``waiter``'s thread (under ``_lock``); a wake-up already pending suffices."""
        if not waiter.signalled:
            waiter.signalled = True
            waiter.done.release()

    def _promote(self) -> None:
        """After leading: wake a thread still waiting, to take the leader's place. (One
        that starts waiting after this look tries to lead itself.)"""
        if not self._waiters:
            return
        with self._lock:
            for waiter in self._waiters.values():
                self._wake(waiter)
                return

    def _drain(self) -> None:
        """Hand out the completions in the ring (the leader does)."""
        cq, mask, cqes = self.cq, self._cq_mask, self._cqes
        head = self._head
        tail = self._cq_tail_ref.value
        with self._lock:
            while head != tail:
                user_data, result, _ = _CQE.unpack_from(cq, cqes + 16 * (head & mask))
                head = (head + 1) & 0xFFFFFFFF
                waiter = self._waiters.pop(user_data, None)
                if waiter is not None:
                    waiter.result = result
                    waiter.finished = True
                    self._wake(waiter)
            if self._full:
                self._room.notify(self._full)
        self._head = head
        self._cq_head_ref.value = head

    def close(self) -> None:
        """Unmap the rings (no request may be in flight)."""
        if self._closed:
            return
        self._closed = True
        del self._sq_tail_ref, self._cq_head_ref, self._cq_tail_ref
        for area in (self.sq, self.cq, self.sqes):
            area.close()
        os.close(self.fd)


def address_of(buf: Any) -> tuple[int, Any]:
    """The address of a buffer's first byte, and the object that keeps it valid."""
    keep = _ffi.from_buffer(buf)
    return int(_ffi.cast("uintptr_t", keep)), keep
