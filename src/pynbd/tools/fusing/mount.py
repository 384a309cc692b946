"""The FUSE side of ``pynbd fuse``: libfuse 3's high-level API through mfusepy (ctypes).

``mount(files, mountpoint, ...)`` runs libfuse's loop until the file system
is unmounted (``fusermount3 -u``) or the process gets SIGTERM, SIGINT or
SIGHUP (libfuse's own handlers unmount and end the loop), then returns.

Read-ahead: the kernel gives a FUSE mount 128 KiB of read-ahead and caps
it at what the INIT reply says, so a sequential read through the page
cache arrives as 128 KiB requests, each a round trip through libfuse,
ctypes and the interpreter (~40 µs of CPU here). Once the mount answers
(a ``stat`` of the mountpoint waits for INIT to be done), its
``/sys/class/bdi/0:N/read_ahead_kb`` is raised (root only; elsewhere the
128 KiB stay): reads then come as requests of up to 1 MiB, several in
flight. Per GiB read (nbdkit memory, 2026-11-30): 0.06-0.11 s user +
0.34-0.43 s system instead of 0.30-0.39 + 0.52-0.67 with 128 KiB;
nbdfuse, which keeps the kernel's 128 KiB, 0.05-0.07 + 0.43-0.55.

Why mfusepy and not pyfuse3: pyfuse3 has no ``fallocate`` operation, so
punching holes and zeroing ranges (what a loop device's discard becomes)
could not reach the server. mfusepy is a maintained binding of the whole
high-level API, pure Python, and lets FUSE's threads call in directly: with
libfuse's multi-threaded loop every request runs on its own FUSE thread and
waits on the server without holding the interpreter lock. Reads and writes
use the buffer libfuse hands over, without a copy in Python.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import threading
import time
from collections.abc import Callable
from typing import Any

from .files import ExportFile

ROOT = "/"
# fuse_main_real's status when its loop ended with an error, which is also how a
# SIGTERM/SIGINT/SIGHUP (libfuse's handlers unmount) ends it: a clean end once mounted.
LOOP_ENDED_BY_SIGNAL = 8


class MountError(Exception):
    """libfuse is missing or the mount failed (one line for the user)."""


def _load() -> Any:
    """Import mfusepy on libfuse 3 (it prefers libfuse 2 where both are installed)."""
    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    try:
        import mfusepy  # type: ignore[import-untyped]
    except ImportError:
        raise MountError("needs mfusepy: pip install 'pynbd[fuse]'") from None
    except OSError as exc:  # mfusepy raises this when libfuse cannot be found
        raise MountError(f"{exc} (install Debian's fuse3)") from None
    return mfusepy


def _no_entry() -> OSError:
    return OSError(errno.ENOENT, os.strerror(errno.ENOENT))


class Tree:
    """What the mount shows: the mountpoint itself as one file (``naked``), or a
    directory holding one file per export."""

    use_ns = True  # mfusepy: times in nanoseconds

    def __init__(self, files: list[ExportFile], naked: bool, on_ready: Callable[[], None]) -> None:
        self.files = {f.name: f for f in files}
        self.naked = naked
        self.paths: dict[str | None, ExportFile] = (
            {ROOT: files[0]} if naked else {ROOT + f.name: f for f in files})
        self.on_ready = on_ready
        self.uid, self.gid = os.getuid(), os.getgid()
        self.when = time.time_ns()

    def file(self, path: str | bytes | None) -> ExportFile:
        """The export at ``path`` (str, or bytes as libfuse passes them)."""
        found = self.paths.get(os.fsdecode(path) if isinstance(path, bytes) else path)
        if found is None:
            raise _no_entry()
        return found

    # mfusepy's Operations protocol (read and write take libfuse's buffer, see mount)
    def init(self, path: str) -> None:
        self.on_ready()

    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        common = {"st_uid": self.uid, "st_gid": self.gid, "st_atime": self.when,
                  "st_mtime": self.when, "st_ctime": self.when}
        if path == ROOT and not self.naked:
            return {**common, "st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        f = self.file(path)
        mode = 0o444 if f.readonly else 0o666
        return {**common, "st_mode": stat.S_IFREG | mode, "st_nlink": 1, "st_size": f.size,
                "st_blocks": (f.size + 511) // 512, "st_blksize": 4096}

    def readdir(self, path: str, fh: int) -> list[str]:
        if path != ROOT or self.naked:
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        return [".", "..", *self.files]

    def open(self, path: str, flags: int) -> int:
        f = self.file(path)
        if f.readonly and flags & os.O_ACCMODE != os.O_RDONLY:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return 0

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        if length != self.file(path).size:
            raise OSError(errno.EINVAL, "an export's size cannot change")

    def read(self, path: bytes, buf: memoryview, offset: int) -> int:
        return self.file(path).read_into(buf, offset)

    def write(self, path: bytes, buf: memoryview, offset: int) -> int:
        return self.file(path).write_from(buf, offset)

    def utimens(self, path: str, times: Any = None, fh: int | None = None) -> None:
        self.file(path)  # touch works; the times stay those of the mount

    def fsync(self, path: str, datasync: int, fh: int) -> None:
        self.file(path).flush()

    def fallocate(self, path: str, mode: int, offset: int, size: int, fh: int) -> None:
        self.file(path).fallocate(mode, offset, size)

    def statfs(self, path: str) -> dict[str, int]:
        total = sum(f.size for f in self.files.values())
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": (total + 4095) // 4096,
                "f_namemax": 255}


def _buffer(buf: Any, size: int) -> memoryview:
    """A writable view of ``size`` bytes at libfuse's buffer (a ``c_byte`` pointer)."""
    address = ctypes.cast(buf, ctypes.c_void_p).value or 0
    return memoryview((ctypes.c_char * size).from_address(address)).cast("B")


def set_readahead(path: str, size: int, beneath: int) -> None:
    """Give the FUSE mount at ``path`` ``size`` bytes of read-ahead, where the kernel
    lets us (root); elsewhere it keeps its own. ``beneath`` is the device ``path``
    had before the mount (never to be touched)."""
    try:
        device = os.stat(path).st_dev
        if device == beneath:
            return
        knob = f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb"
        with open(knob, "w", encoding="ascii") as out:
            out.write(str(size // 1024))
    except OSError:
        return  # not root, no sysfs, or unmounted already: slower, not wrong


def mount(files: list[ExportFile], mountpoint: str, *, naked: bool, single_thread: bool,
          debug: bool, options: dict[str, str | bool], readahead: int,
          on_ready: Callable[[], None]) -> None:
    """Serve ``files`` at ``mountpoint`` until it is unmounted (see the module's manual)."""
    fuse_base: Any = _load().FUSE

    class Mount(fuse_base):  # type: ignore[misc]  # mfusepy has no type hints
        """libfuse's read and write callbacks, without copying through bytes objects."""

        def read(self, path: bytes, buf: Any, size: int, offset: int, fip: Any) -> int:
            tree: Tree = self.operations
            return tree.read(path, _buffer(buf, size), offset)

        def write(self, path: bytes, buf: Any, size: int, offset: int, fip: Any) -> int:
            tree: Tree = self.operations
            return tree.write(path, _buffer(buf, size), offset)

    ready = False
    beneath = os.stat(mountpoint).st_dev

    def settle() -> None:
        if readahead:  # the stat waits for the FUSE threads to answer INIT, then GETATTR
            set_readahead(mountpoint, readahead, beneath)
        on_ready()

    def mounted() -> None:
        # Called by libfuse before it answers INIT: what needs the mount working
        # (and, for a pidfile inside the mount, the FUSE threads) runs on a thread.
        nonlocal ready
        ready = True
        threading.Thread(target=settle, name="fuse-ready", daemon=True).start()

    tree = Tree(files, naked, mounted)
    settings: dict[str, Any] = {"fsname": "pynbd", "subtype": "pynbd", **options}
    try:
        Mount(tree, mountpoint, foreground=True, nothreads=single_thread, debug=debug,
              **settings)
    except RuntimeError as exc:  # mfusepy: fuse_main_real's non-zero status
        if not (ready and exc.args == (LOOP_ENDED_BY_SIGNAL,)):
            raise MountError(f"cannot mount {mountpoint} (libfuse status {exc})") from None
