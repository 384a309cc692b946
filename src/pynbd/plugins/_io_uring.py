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

import contextlib
import ctypes
import errno
import mmap
import os
import struct
import threading
from collections.abc import Callable
from typing import Any

import cffi

from ._wakeup import Sleeper

SYS_IO_URING_SETUP = 425
SYS_IO_URING_ENTER = 426
SYS_IO_URING_REGISTER = 427
IORING_REGISTER_EVENTFD = 4
IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000
IORING_ENTER_GETEVENTS = 1
IORING_ENTER_EXT_ARG = 8
BATCH_WAIT_US = 50  # the completion thread waits this long for more than one completion
WAIT_TIMEOUT_S = 1  # a batch wait's timeout (it ends with ETIME, and waits again)

OP_FSYNC = 3
OP_FALLOCATE = 17
OP_READ = 22
OP_WRITE = 23

FSYNC_DATASYNC = 1
RWF_DSYNC = 2

# Operations started and not completed, at most: fewer than the reads a server
# keeps in flight per client (256) before it waits, lock held, for room: it must
# never wait on us while ``submit_started`` reports completions to it.
MAX_STARTED = 128

# An SQE's first 40 bytes (opcode, flags, ioprio, fd, off, addr, len, op flags, user_data):
# the other 24 (buf_index, personality, splice_fd_in, addr3) stay the zeroes mapped.
_SQE = struct.Struct("<BBHiQQIIQ")
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
_GETEVENTS_ARG_SIZE = 24
_enter_syscall: Any = _cffi_libc.syscall


def _enter(fd: int, to_submit: int, min_complete: int, flags: int, arg: Any = _ffi.NULL,
           size: int = 0) -> int:
    while True:
        n = int(_enter_syscall(SYS_IO_URING_ENTER, fd, to_submit, min_complete, flags, arg, size))
        if n >= 0:
            return n
        err = _ffi.errno
        if err == errno.ETIME:
            return 0
        if err not in (errno.EINTR, errno.EAGAIN, errno.EBUSY):
            raise OSError(err, f"io_uring_enter: {os.strerror(err)}")


class _Waiter(Sleeper):
    """One request a thread waits for (``Ring.run``): its result, and a lock the thread
    sleeps on while another thread waits on the ring (the leader) for the completions."""

    __slots__ = ("finished", "result")

    def __init__(self) -> None:
        super().__init__()
        self.finished = False
        self.result = 0


# What the completed operations started with ``Ring.start`` are reported to: each one's
# entry, with its result (>= 0, or -errno); called once per burst of completions.
Completed = Callable[[list[tuple[Any, int]]], None]


class Ring:
    """An io_uring of ``entries`` submission slots, used by any number of threads.

    No thread is dedicated to completions: the thread holding the leader lock
    waits for them in ``io_uring_enter`` (GETEVENTS, the GIL released) and
    hands out what arrives; when its own has come it passes the role to a
    thread still waiting. A lone caller (a connection whose requests run one
    at a time) thus submits and waits in one system call, with no thread
    switch, and ``n`` callers keep ``n`` requests in flight.

    ``start`` queues an operation without waiting for it and ``submit_started``
    submits what was queued in one system call, then hands out the completions
    already there (reads of cached data complete during the submission); a
    completion thread, started on first need, waits for the others while any
    are outstanding. The completed ones go to ``completed``, a burst at a time:
    each started operation's entry (any object the caller gave ``start``, kept
    until then) with its result. (Per operation, nothing is allocated here but
    its dictionary slot: the Python steps of a started request are its cost.)
    """

    def __init__(self, entries: int, completed: Completed | None = None) -> None:
        params = ctypes.create_string_buffer(120)
        fd = _syscall(SYS_IO_URING_SETUP, ctypes.c_uint(entries), params)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"io_uring_setup({entries}): {os.strerror(err)}")
        self.fd = int(fd)
        raw = params.raw
        sq_entries, cq_entries = struct.unpack_from("<II", raw, 0)
        sq_head, sq_tail, sq_mask, _, _, _, sq_array = struct.unpack_from("<7I", raw, 40)
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
        self._sq_head_ref = ctypes.c_uint32.from_buffer(self.sq, sq_head)  # the kernel's
        self._cq_head_ref = ctypes.c_uint32.from_buffer(self.cq, cq_head)
        self._cq_tail_ref = ctypes.c_uint32.from_buffer(self.cq, cq_tail)
        self._tail = self._sq_tail_ref.value
        self._head = self._cq_head_ref.value
        self._lock = threading.Lock()  # the SQ tail, the waiters and their wake-ups
        self._leader = threading.Lock()  # held by the thread reaping completions
        # Never more in flight than the rings hold: a caller past that waits for room.
        self._room = threading.Condition(self._lock)
        self._full = 0  # callers waiting for room
        # In flight, by user_data: the operations a thread waits for (in ``run``), and
        # the entries of those started without waiting (``start``).
        self._threads: dict[int, _Waiter] = {}
        self._started: dict[int, object] = {}
        self.completed = completed  # (may be set later, before the first ``start``)
        self._next = 1
        self._closed = False
        self._reaping = False  # the completion thread is wanted
        self._wanted = threading.Condition(self._lock)
        self._reaper: threading.Thread | None = None
        self._efd: int | None = None  # see completion_fd
        # struct io_uring_getevents_arg: sigmask, sigmask_sz, min_wait_usec, ts
        # (with no timeout the kernel ends the wait when min_wait_usec has passed, events or not)
        self._timeout: Any = _ffi.new("int64_t[2]", [WAIT_TIMEOUT_S, 0])  # struct __kernel_timespec
        self._batch_arg: Any = _ffi.new("uint64_t[3]", [0, BATCH_WAIT_US << 32, int(
            _ffi.cast("uintptr_t", self._timeout))])

    def run(self, opcode: int, fd: int, offset: int = 0, addr: int = 0, length: int = 0,
            op_flags: int = 0, keep: object = None) -> int:
        """Submit one operation and wait for it; its result (>= 0) or OSError."""
        if self._closed:
            raise OSError(errno.EBADF, "io_uring: the ring is closed")
        waiter = _Waiter()
        user_data = 0
        try:
            with self._lock:
                while len(self._threads) + len(self._started) >= self.entries:
                    self._full += 1
                    self._room.wait()
                    self._full -= 1
                user_data = self._next
                self._next += 1
                self._threads[user_data] = waiter
                index = self._tail & self._sq_mask
                _SQE.pack_into(self.sqes, 64 * index, opcode, 0, 0, fd, offset, addr, length,
                               op_flags, user_data)
                self._tail = (self._tail + 1) & 0xFFFFFFFF
                self._sq_tail_ref.value = self._tail
            # Each caller submits every entry queued so far (its own, and any started).
            submit = 1
            while not waiter.finished:
                if self._leader.acquire(blocking=False):
                    try:
                        while not waiter.finished:
                            _enter(self.fd, submit and self._published(), 1, IORING_ENTER_GETEVENTS)
                            submit = 0
                            self._drain()
                    finally:
                        self._leader.release()
                        self._promote()
                else:
                    if submit:
                        _enter(self.fd, self._published(), 0, 0)
                        submit = 0
                    waiter.sleep()
        finally:
            if not waiter.finished:  # io_uring_enter failed: no one is to wake this thread
                with self._lock:
                    self._threads.pop(user_data, None)
        if waiter.result < 0:
            raise OSError(-waiter.result, os.strerror(-waiter.result))
        return waiter.result

    def _published(self) -> int:
        """The entries published and not yet submitted: exactly what a waiting
        io_uring_enter may submit (one that submits fewer returns without waiting)."""
        return (self._sq_tail_ref.value - self._sq_head_ref.value) & 0xFFFFFFFF

    def _promote(self, poller: bool = False) -> None:
        """After leading: wake a thread still waiting, to take the leader's place. (One
        that starts waiting after this look tries to lead itself.) Completions left in
        the ring are signalled to the poller (``completion_fd``): it may have been told
        of them while this thread led — unless the poller itself led."""
        if not poller and self._efd is not None and self._cq_tail_ref.value != self._head:
            os.eventfd_write(self._efd, 1)
        if not self._threads:
            return
        with self._lock:
            for waiter in self._threads.values():
                waiter.wake()
                return

    def _drain(self) -> None:
        """Hand out the completions in the ring (the leader does): wake the threads
        waiting for theirs, then report the started operations' to ``completed``."""
        head = self._head
        tail = self._cq_tail_ref.value
        if head == tail:
            return
        cq, mask, cqes, unpack = self.cq, self._cq_mask, self._cqes, _CQE.unpack_from
        started, threads = self._started, self._threads
        done: list[tuple[Any, int]] = []
        lock = self._lock
        lock.acquire()
        try:
            while head != tail:
                user_data, result, _ = unpack(cq, cqes + 16 * (head & mask))
                head = (head + 1) & 0xFFFFFFFF
                entry = started.pop(user_data, None)
                if entry is not None:
                    done.append((entry, result))
                else:
                    waiter = threads.pop(user_data, None)
                    if waiter is not None:
                        waiter.result = result
                        waiter.finished = True
                        waiter.wake()
            if self._full:
                self._room.notify(self._full)
        finally:
            lock.release()
        self._head = head
        self._cq_head_ref.value = head
        if done:
            assert self.completed is not None, "operations started on a ring without completed"
            self.completed(done)

    # ------------------------------------------------------------ without waiting
    def start(self, opcode: int, fd: int, offset: int, addr: int, length: int, op_flags: int,
              entry: object) -> None:
        """Queue one operation: ``completed`` gets ``entry`` (not None; it keeps what the
        kernel reads or writes alive) with the result when it completes, from the thread
        that reaps it. ``submit_started`` submits it."""
        if self._closed:
            raise OSError(errno.EBADF, "io_uring: the ring is closed")
        started = self._started
        lock = self._lock
        lock.acquire()
        try:
            if len(started) >= MAX_STARTED or len(started) + len(self._threads) >= self.entries:
                # Make room: what is queued goes in, and its completions are reaped.
                lock.release()
                try:
                    self.submit_started()
                finally:
                    lock.acquire()
                while len(started) >= MAX_STARTED or \
                        len(started) + len(self._threads) >= self.entries:
                    self._full += 1
                    self._room.wait()
                    self._full -= 1
            user_data = self._next
            self._next = user_data + 1
            started[user_data] = entry
            tail = self._tail
            _SQE.pack_into(self.sqes, 64 * (tail & self._sq_mask), opcode, 0, 0, fd, offset,
                           addr, length, op_flags, user_data)
            # (The kernel sees the new tail when the next submitter publishes it.)
            self._tail = (tail + 1) & 0xFFFFFFFF
        finally:
            lock.release()

    def submit_started(self, reaper: bool = True) -> None:
        """Submit the queued operations, hand out the completions already there, and
        have the completion thread wait for the rest — or, ``reaper=False``, leave them
        to the caller, who polls ``completion_fd`` and calls ``reap``."""
        lock = self._lock
        lock.acquire()
        tail = self._tail
        queued = (tail - self._sq_head_ref.value) & 0xFFFFFFFF
        self._sq_tail_ref.value = tail
        lock.release()
        if queued:
            _enter(self.fd, queued, 0, 0)
        if self._cq_tail_ref.value != self._head and self._leader.acquire(blocking=False):
            try:
                self._drain()
            finally:
                self._leader.release()
                self._promote(poller=not reaper)
        if not reaper:
            self._reaping = False  # (the completion thread stops after its next wait)
            return
        with self._lock:
            if not self._started or self._reaping:
                return
            self._reaping = True
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, name="io_uring", daemon=True)
                self._reaper.start()
            self._wanted.notify()

    def completion_fd(self) -> int:
        """An eventfd that becomes readable when operations complete (IORING_REGISTER_EVENTFD:
        all of them — with the _ASYNC variant a completion posted by task work, as a
        buffered read's is, would go unnoticed): a caller waiting on other files too
        polls it and then calls ``reap``, instead of having the completion thread wake."""
        if self._efd is None:
            efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            arg = ctypes.c_int(efd)
            if _syscall(SYS_IO_URING_REGISTER, ctypes.c_uint(self.fd),
                        ctypes.c_uint(IORING_REGISTER_EVENTFD), ctypes.byref(arg),
                        ctypes.c_uint(1)) < 0:
                err = ctypes.get_errno()
                os.close(efd)
                raise OSError(err, f"io_uring_register: {os.strerror(err)}")
            self._efd = efd
        return self._efd

    def reap(self) -> None:
        """Hand out the completions there are, without waiting (after ``completion_fd``
        was readable). If another thread leads, it does (and signals what it leaves)."""
        assert self._efd is not None, "reap without completion_fd"
        with contextlib.suppress(BlockingIOError):  # (signalled by the kernel and a leader both)
            os.eventfd_read(self._efd)
        if self._leader.acquire(blocking=False):
            try:
                self._drain()
            finally:
                self._leader.release()
                self._promote(poller=True)

    def _reap(self) -> None:
        """The completion thread: lead while started operations are outstanding."""
        while True:
            with self._lock:
                while not self._reaping and not self._closed:
                    self._wanted.wait()
                if self._closed:
                    return
            with self._leader:
                while True:
                    with self._lock:
                        if not self._started or self._closed or not self._reaping:
                            self._reaping = False
                            break
                    self._wait_for_batch()
                    self._drain()
            self._promote()

    def _wait_for_batch(self) -> None:
        """Wait for completions: for every outstanding one, up to BATCH_WAIT_US (Linux 6.12's
        min_wait_usec), then for at least one; so completions that come close together
        are reaped, and answered, together."""
        if self._batch_arg is not None:
            try:
                _enter(self.fd, 0, max(1, len(self._started)), IORING_ENTER_GETEVENTS
                       | IORING_ENTER_EXT_ARG, self._batch_arg, _GETEVENTS_ARG_SIZE)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._batch_arg = None  # an older kernel
        _enter(self.fd, 0, 1, IORING_ENTER_GETEVENTS)

    def close(self) -> None:
        """Wait for the started operations, then unmap the rings (no caller may be
        waiting in ``run``)."""
        if self._closed:
            return
        with self._leader:
            while self._started:
                _enter(self.fd, 0, 1, IORING_ENTER_GETEVENTS)
                self._drain()
            with self._lock:
                self._closed = True
                self._wanted.notify()
        if self._reaper is not None:
            self._reaper.join()
        del self._sq_tail_ref, self._sq_head_ref, self._cq_head_ref, self._cq_tail_ref
        for area in (self.sq, self.cq, self.sqes):
            area.close()
        os.close(self.fd)
        if self._efd is not None:
            os.close(self._efd)


def address_of(buf: Any) -> tuple[int, Any]:
    """The address of a buffer's first byte, and the object that keeps it valid."""
    try:  # a writable buffer (every read's): ctypes' way costs a third of cffi's
        char = ctypes.c_char.from_buffer(buf)
        return ctypes.addressof(char), char
    except (TypeError, ValueError):  # read-only or empty
        keep = _ffi.from_buffer(buf)
        return int(_ffi.cast("uintptr_t", keep)), keep
