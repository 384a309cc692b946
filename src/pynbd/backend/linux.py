"""Linux specifics: fallocate, posix_fadvise, page-cache eviction, block-device ioctls.

The file plugin, the cache filter and ``pynbd copy``'s local files all zero
ranges without writing them, punch holes, hint the page cache and keep
written data out of it. They do it through this module, so they agree on
how the kernel is called and on what its errors mean. Import it as::

    from pynbd.backend import linux

    linux.punch_hole(fd, offset, count)

Errors
    Every call raises ``OSError`` with the kernel's errno. Some errno values
    mean "this file system, kernel or device cannot do that here", not "it
    failed": they are ``NOT_SUPPORTED_ERRNOS`` and ``is_not_supported(exc)``
    says whether an error is one of them. A caller falls back to another way
    (usually writing zeroes) only for those, and passes every other error on:
    ENOSPC, EIO, EROFS, EPERM (an immutable file) and EBADF are real failures
    and must reach the client.

    ======================  ===================================================
    EOPNOTSUPP / ENOTSUP    the file system (tmpfs: ZERO_RANGE; ramfs, vfat:
                            any hole) or the device refuses this operation or
                            fallocate mode (the same number on Linux)
    ENOSYS                  the kernel or the C library has no such call
    ENODEV                  fallocate on a file that is neither a regular file
                            nor a block device; kernels before 4.9 also said
                            it for block devices without fallocate
    ENOTTY                  a block-device ioctl the device does not know
    EINVAL                  a file system refusing this mode for this range
                            (XFS and others with unaligned ZERO_RANGE; qemu
                            falls back to writing zeroes for it too), or a
                            block device given a range not in whole sectors
    ======================  ===================================================

    EINVAL also means "bad argument", so the wrappers below check their own
    arguments first (a negative offset or count is a ``ValueError``, a count
    of 0 does nothing): an EINVAL that reaches a caller is the file's answer.

fallocate
    ``fallocate(fd, mode, offset, count)`` calls the C library's
    ``fallocate64`` through ctypes (``os.posix_fallocate`` has no modes), with
    the errno taken from ``ctypes.get_errno()`` and EINTR retried as Python
    retries its own system calls. On top of it:

    ``punch_hole``     PUNCH_HOLE | KEEP_SIZE: the range reads as zeroes and
                       its blocks are freed. A block device zeroes it only if
                       it can do so without writing (it may unmap).
    ``zero_range``     ZERO_RANGE (| KEEP_SIZE, the default): the range reads
                       as zeroes and stays allocated (unwritten extents). On
                       a block device the kernel may write zeroes.
    ``allocate``       mode KEEP_SIZE: allocate blocks, data unchanged.
    ``try_punch_hole`` punch, or return False where holes are not supported.
    ``write_zeroes``   the fallback: zero bytes from ``ZERO_BUFFER``.

    ``Zeroer`` tries these in order for one file descriptor and remembers
    which ones its file refused.

Block devices
    ``logical_sector_size`` (BLKSSZGET), ``is_rotational`` (BLKROTATIONAL),
    ``blkzeroout`` (BLKZEROOUT: zeroes, possibly by writing) and
    ``blkdiscard`` (BLKDISCARD: contents undefined afterwards). The ioctl
    numbers are those of the generic ioctl encoding (x86, arm, riscv, s390).

Page cache
    ``ACCESS_PATTERNS`` and ``advise_access`` (posix_fadvise NORMAL, RANDOM,
    SEQUENTIAL for the whole file), ``will_need`` (WILLNEED: read ahead now),
    ``drop_cache`` (DONTNEED: drop clean cached pages), ``start_writeback`` and
    ``evict`` (sync_file_range, then DONTNEED), and ``WriteBehind``, which
    keeps a writer's data out of the page cache a few writes behind it, as
    nbdcopy and nbdkit's ``cache=none`` do.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from .connection import ZERO_BUFFER

# ---------------------------------------------------------------- errors
NOT_SUPPORTED_ERRNOS: frozenset[int] = frozenset({
    errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.ENODEV, errno.ENOTTY, errno.EINVAL,
})
"""errno values meaning "not supported here" (see the module's manual), not "it failed"."""


def is_not_supported(exc: OSError) -> bool:
    """True if ``exc`` says the file, kernel or device cannot do the operation.

    Then the caller may fall back to another way of doing it (write zeroes,
    skip a hint). Any other error is a real failure to pass on.
    """
    return exc.errno in NOT_SUPPORTED_ERRNOS


def _check_range(offset: int, count: int) -> bool:
    """False for an empty range; ValueError for a negative offset or count."""
    if offset < 0 or count < 0:
        raise ValueError(f"bad range: offset={offset} count={count}")
    return count > 0


# ---------------------------------------------------------------- the C library
_libc = ctypes.CDLL(None, use_errno=True)


def _libc_function(*names: str) -> Any:
    """The first of ``names`` the C library has, or None."""
    for name in names:
        function = getattr(_libc, name, None)
        if function is not None:
            return function
    return None


# off64_t everywhere: fallocate64 and sync_file_range take 64-bit offsets
# even on 32-bit systems (plain fallocate is the same symbol on 64-bit ones).
_fallocate = _libc_function("fallocate64", "fallocate")
if _fallocate is not None:
    _fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    _fallocate.restype = ctypes.c_int
_sync_file_range = _libc_function("sync_file_range")
if _sync_file_range is not None:
    _sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    _sync_file_range.restype = ctypes.c_int


def _call(function: Callable[..., int] | None, name: str, *args: int) -> None:
    """Call a C function returning 0 or -1/errno; raise OSError, retry EINTR."""
    if function is None:
        raise OSError(errno.ENOSYS, f"{name}: not in this C library")
    while function(*args) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, f"{name}: {os.strerror(err)}")


# ---------------------------------------------------------------- memory locking
MCL_CURRENT, MCL_FUTURE = 1, 2
_mlock = _libc_function("mlock")
_mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)


def mlock(address: int, length: int) -> None:
    """Lock ``length`` bytes at ``address`` in RAM (raises OSError, e.g. ENOMEM over RLIMIT_MEMLOCK)."""
    _call(_mlock, "mlock", address, length)


def mlockall() -> None:
    """Lock the whole process, now and later, in RAM (nbdkit's --swap)."""
    _call(_libc_function("mlockall"), "mlockall", MCL_CURRENT | MCL_FUTURE)


# ---------------------------------------------------------------- fallocate
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def fallocate(fd: int, mode: int, offset: int, count: int) -> None:
    """fallocate(2) with its mode flags; OSError with the kernel's errno.

    The raw call: it does not check its arguments (``punch_hole`` and the
    others below do). Linux refuses PUNCH_HOLE without KEEP_SIZE, and
    PUNCH_HOLE with ZERO_RANGE, with EOPNOTSUPP.
    """
    _call(_fallocate, "fallocate", fd, mode, offset, count)


def punch_hole(fd: int, offset: int, count: int) -> None:
    """Make [offset, offset+count) read as zeroes and free its blocks.

    PUNCH_HOLE | KEEP_SIZE: the file's size never changes; a range past the
    end of the file is left alone. File systems free whole blocks and zero
    the partial blocks at either end in place. tmpfs, ext4, XFS and btrfs
    punch; ramfs and vfat raise EOPNOTSUPP. A block device does it only
    where it can without writing zeroes (it may discard), else EOPNOTSUPP;
    it needs whole logical sectors (EINVAL otherwise).
    """
    if _check_range(offset, count):
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, count)


def try_punch_hole(fd: int, offset: int, count: int) -> bool:
    """``punch_hole``, or False where the file cannot have holes.

    Errors that say "not supported here" (``is_not_supported``) become
    False; real ones (EIO, ENOSPC for the metadata a punch may need, ...)
    are raised.
    """
    try:
        punch_hole(fd, offset, count)
    except OSError as exc:
        if not is_not_supported(exc):
            raise
        return False
    return True


def zero_range(fd: int, offset: int, count: int, keep_size: bool = True) -> None:
    """Make [offset, offset+count) read as zeroes and keep it allocated.

    FALLOC_FL_ZERO_RANGE turns the range into unwritten extents without
    writing data (ext4 with extents, XFS, btrfs); tmpfs raises EOPNOTSUPP,
    as do ext4 files without extents. With ``keep_size`` (the default, which
    all of pynbd uses) the size never changes and blocks past the end are
    only preallocated; without it a range past the end extends the file.
    On a block device the kernel zeroes the sectors, writing zeroes if the
    device cannot do better: not a fast operation there.
    """
    if _check_range(offset, count):
        mode = FALLOC_FL_ZERO_RANGE | (FALLOC_FL_KEEP_SIZE if keep_size else 0)
        fallocate(fd, mode, offset, count)


def allocate(fd: int, offset: int, count: int) -> None:
    """Allocate the blocks of [offset, offset+count) without changing data or size.

    fallocate mode KEEP_SIZE: holes become allocated blocks that read as
    zeroes; data already there is untouched. Block devices raise EOPNOTSUPP.
    """
    if _check_range(offset, count):
        fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, count)


_ZERO_VIEW = memoryview(ZERO_BUFFER)
_ZERO_IOVECS = 16  # iovecs of ZERO_BUFFER per pwritev: up to 16 MiB per call


def write_zeroes(fd: int, offset: int, count: int) -> None:
    """Write ``count`` zero bytes at ``offset``: the fallback when nothing else works.

    The bytes come from the backend's ``ZERO_BUFFER`` (one shared mebibyte,
    never copied), several views of it per ``pwritev``, so zeroing allocates
    no memory whatever its size. Short writes are continued; a write that
    makes no progress raises EIO.
    """
    if not _check_range(offset, count):
        return
    chunk = len(ZERO_BUFFER)
    end = offset + count
    while offset < end:
        left = end - offset
        iovecs = [_ZERO_VIEW] * min(left // chunk, _ZERO_IOVECS) or [_ZERO_VIEW[:left]]
        written = os.pwritev(fd, iovecs, offset)
        if written <= 0:
            raise OSError(errno.EIO, f"writing zeroes at {offset}: nothing was written")
        offset += written


# ---------------------------------------------------------------- block devices
BLKSSZGET = 0x1268
BLKDISCARD = 0x1277
BLKROTATIONAL = 0x127E
BLKZEROOUT = 0x127F


def _range_ioctl(fd: int, request: int, offset: int, count: int) -> None:
    fcntl.ioctl(fd, request, struct.pack("=QQ", offset, count))


def logical_sector_size(fd: int) -> int:
    """The logical sector size of a block device (BLKSSZGET): 512 or 4096."""
    size: int = struct.unpack("=i", fcntl.ioctl(fd, BLKSSZGET, bytes(4)))[0]
    return size


def is_rotational(fd: int) -> bool:
    """Whether a block device spins (BLKROTATIONAL); False if the kernel cannot say."""
    try:
        value: int = struct.unpack("=H", fcntl.ioctl(fd, BLKROTATIONAL, bytes(2)))[0]
    except OSError:
        return False
    return bool(value)


def blkzeroout(fd: int, offset: int, count: int) -> None:
    """Zero sectors of a block device (BLKZEROOUT), writing zeroes if need be.

    The range must be in whole logical sectors (EINVAL otherwise). The
    sectors stay allocated (the kernel passes NOUNMAP).
    """
    if _check_range(offset, count):
        _range_ioctl(fd, BLKZEROOUT, offset, count)


def blkdiscard(fd: int, offset: int, count: int) -> None:
    """Discard sectors of a block device (BLKDISCARD); their contents become undefined.

    Devices without discard raise EOPNOTSUPP; whole logical sectors only.
    """
    if _check_range(offset, count):
        _range_ioctl(fd, BLKDISCARD, offset, count)


class Zeroer:
    """Zero or discard ranges of one file or block device without writing zeroes.

    ``zero`` tries, in order (nbdcopy's order, and nbdkit's file plugin's):

    1. ``punch_hole``, only if the caller allows a hole (``may_punch``);
    2. for a regular file: ``zero_range``, then ``punch_hole`` followed by
       ``allocate`` (tmpfs has no ZERO_RANGE but gets allocated zeroes so);
    3. for a block device, unless only fast methods are wanted
       (``fast_only``, as for NBD's FAST_ZERO): ``zero_range``, then
       ``blkzeroout``; both may write zeroes in the kernel.

    It returns False when none of them applies, and the caller writes zeroes
    (``write_zeroes``) or, for a fast zero, refuses. A method that fails
    with a "not supported" errno is not tried again on this descriptor; an
    EINVAL (a file system refusing a particular range) only skips it this
    time, as qemu does. Block devices take whole sectors only: other ranges
    are left to the caller at once. Real errors (EIO, ENOSPC, ...) are
    raised. Methods the kernel refused are the ``can_*`` attributes, which
    a caller may also clear itself.
    """

    def __init__(self, fd: int, block_device: bool = False, sector: int = 1) -> None:
        self.fd = fd
        self.block_device = block_device
        self.sector = sector
        self.can_punch = self.can_zero_range = self.can_allocate = True
        self.can_zeroout = self.can_discard = block_device

    def aligned(self, offset: int, count: int) -> bool:
        """Whether the range is in whole sectors (always true for regular files)."""
        return offset % self.sector == 0 and count % self.sector == 0

    def _try(self, capability: str, method: Callable[[int, int, int], None], offset: int,
             count: int) -> bool:
        """Run ``method(fd, offset, count)`` unless refused before; True if it worked."""
        if not getattr(self, capability):
            return False
        try:
            method(self.fd, offset, count)
        except OSError as exc:
            if not is_not_supported(exc):
                raise
            if exc.errno != errno.EINVAL:
                setattr(self, capability, False)
            return False
        return True

    def discard(self, offset: int, count: int) -> bool:
        """Trim: punch a hole, else BLKDISCARD on a block device; False if neither."""
        if not self.aligned(offset, count):
            return False
        return self._try("can_punch", punch_hole, offset, count) \
            or self._try("can_discard", blkdiscard, offset, count)

    def zero(self, offset: int, count: int, may_punch: bool = False,
             fast_only: bool = False) -> bool:
        """Make the range read as zeroes without writing them; False if no method did."""
        if not self.aligned(offset, count):
            return False
        if may_punch and self._try("can_punch", punch_hole, offset, count):
            return True
        if self.block_device:
            if fast_only:
                return False  # both below may write zeroes in the kernel
            return self._try("can_zero_range", zero_range, offset, count) \
                or self._try("can_zeroout", blkzeroout, offset, count)
        if self._try("can_zero_range", zero_range, offset, count):
            return True
        if self.can_allocate and self._try("can_punch", punch_hole, offset, count):
            # The hole reads as zeroes; allocating it again keeps it allocated.
            self._try("can_allocate", allocate, offset, count)
            return True
        return False


# ---------------------------------------------------------------- page cache
ACCESS_PATTERNS: dict[str, int] = {
    "normal": os.POSIX_FADV_NORMAL,
    "random": os.POSIX_FADV_RANDOM,
    "sequential": os.POSIX_FADV_SEQUENTIAL,
}
"""Access patterns for ``advise_access``: RANDOM turns read-ahead off, SEQUENTIAL doubles it."""


def advise_access(fd: int, pattern: str) -> None:
    """Tell the kernel how the whole file will be read (a key of ``ACCESS_PATTERNS``)."""
    os.posix_fadvise(fd, 0, 0, ACCESS_PATTERNS[pattern])


def will_need(fd: int, offset: int, count: int) -> None:
    """Start reading [offset, offset+count) into the page cache (POSIX_FADV_WILLNEED).

    Returns at once; the reads go on in the background. A count of 0 does
    nothing (posix_fadvise would take it as "to the end of the file").
    """
    if _check_range(offset, count):
        os.posix_fadvise(fd, offset, count, os.POSIX_FADV_WILLNEED)


FOLIO_MAX = 2 * 1024 * 1024
"""The largest page-cache folio Linux builds (a PMD: 2 MiB on x86-64)."""


def drop_cache(fd: int, offset: int, count: int) -> None:
    """Drop clean cached pages of [offset, offset+count) (POSIX_FADV_DONTNEED).

    DONTNEED only drops a folio that lies wholly inside the range, so the
    range is stretched back to a ``FOLIO_MAX`` boundary: large folios that
    end inside it go too (the folio at its end may stay). Dirty pages are
    not dropped (the kernel starts writing them back): ``evict`` waits for
    them first. Never loses data. A count of 0 does nothing.
    """
    if count > 0:
        start = offset & ~(FOLIO_MAX - 1)
        os.posix_fadvise(fd, start, offset + count - start, os.POSIX_FADV_DONTNEED)


SYNC_FILE_RANGE_WAIT_BEFORE = 1
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT_AFTER = 4


def sync_file_range(fd: int, offset: int, count: int, flags: int) -> None:
    """sync_file_range(2); OSError with the kernel's errno (ENOSYS if libc lacks it).

    With WAIT_AFTER it reports (and consumes, for this open file) writeback
    errors such as EIO: a caller that ignored them would hide them from a
    later fsync, so they must be passed on.
    """
    _call(_sync_file_range, "sync_file_range", fd, offset, count, flags)


def start_writeback(fd: int, offset: int, count: int) -> None:
    """Start writing the dirty pages of a range to disk; does not wait.

    Where sync_file_range is not supported this does nothing (it is only a
    head start for ``evict``). Real errors are raised. A count of 0 does
    nothing.
    """
    # Called for every write under cache=none: the C function directly.
    if count > 0 and _sync_file_range is not None \
            and _sync_file_range(fd, offset, count, SYNC_FILE_RANGE_WRITE) != 0:
        err = ctypes.get_errno()
        if err == errno.EINTR:
            start_writeback(fd, offset, count)
        elif err not in NOT_SUPPORTED_ERRNOS:
            raise OSError(err, f"sync_file_range: {os.strerror(err)}")


def evict(fd: int, offset: int, count: int) -> None:
    """Write a range to disk, wait for it, and drop it from the page cache.

    sync_file_range (WAIT_BEFORE | WRITE | WAIT_AFTER), or fdatasync where
    that is not supported, then ``drop_cache``. Writeback errors (EIO,
    ENOSPC) are raised. It does not make the data durable (no metadata, no
    disk cache flush): ``os.fdatasync`` does that.
    """
    if not _check_range(offset, count):
        return
    try:
        sync_file_range(fd, offset, count, SYNC_FILE_RANGE_WAIT_BEFORE
                        | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER)
    except OSError as exc:
        if not is_not_supported(exc):
            raise
        os.fdatasync(fd)
    drop_cache(fd, offset, count)


class WriteBehind:
    """Keep a writer's data out of the page cache, a few writes behind it.

    Dirty pages cannot be dropped, and waiting for each write to reach the
    disk would make every write synchronous. So ``written`` starts the
    writeback of a range at once (``start_writeback``) and remembers it;
    once more than ``max_ranges`` ranges, or more than ``max_bytes`` bytes,
    are remembered, the oldest are ``evict``-ed — by then their writeback
    has usually finished. ``drain`` evicts everything remembered (on flush
    and close). This is nbdcopy's and nbdkit's ``cache=none`` scheme; the
    kernel is not left with gigabytes of dirty pages to throttle or reclaim
    in the middle of a copy.

    Thread-safe. Writeback errors are raised from the call that evicts the
    range, which may be a later write's.
    """

    def __init__(self, fd: int, max_ranges: int | None = None,
                 max_bytes: int | None = None) -> None:
        self.fd = fd
        self.max_ranges = sys.maxsize if max_ranges is None else max_ranges
        self.max_bytes = sys.maxsize if max_bytes is None else max_bytes
        self.pending: deque[tuple[int, int]] = deque()
        self.queued = 0
        self.lock = threading.Lock()

    def written(self, offset: int, count: int) -> None:
        """Note a range just written: start its writeback, evict older ones."""
        start_writeback(self.fd, offset, count)
        pending = self.pending
        with self.lock:
            pending.append((offset, count))
            self.queued += count
            if len(pending) <= self.max_ranges and self.queued <= self.max_bytes:
                return
            old = []
            while len(pending) > self.max_ranges or self.queued > self.max_bytes:
                old.append(pending.popleft())
                self.queued -= old[-1][1]
        for range_ in old:
            evict(self.fd, *range_)

    def drain(self) -> None:
        """Evict every remembered range."""
        with self.lock:
            ranges = list(self.pending)
            self.pending.clear()
            self.queued = 0
        for offset, count in ranges:
            evict(self.fd, offset, count)
