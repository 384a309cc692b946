"""pynbd fuse against libnbd's nbdfuse: a sequential read of a whole export through the
FUSE file, both mounted on the same server (nbdkit memory 1G, filled with random data),
with the same options, and with pynbd bypassing the page cache (``-o direct_io``).

``fuse_workloads`` is called by ``run.py``'s ``build()``. Each measurement starts
the server, fills it, mounts it (a fresh mount: nothing in the page cache),
waits for the tool's pidfile (written once the mount is ready: pynbd fuse has
raised its read-ahead by then), reads the file from start to end in 1 MiB
reads and unmounts. Needs root or fusermount3, and /dev/fuse; skipped without
them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import workloads as w
from servers import nbdkit, running

CHUNK = 1 << 20
MOUNT_WAIT = 30.0


def is_mounted(path: str) -> bool:
    with open("/proc/mounts") as mounts:
        return any(line.split()[1] == path for line in mounts)


def read_through(tool: list[str], uri: str) -> float:
    """Mount ``uri`` with ``tool``, read the whole file once; MiB/s."""
    with tempfile.TemporaryDirectory(prefix="bench-fuse") as tmp:
        disk = os.path.join(tmp, "disk")
        pidfile = os.path.join(tmp, "pid")
        open(disk, "wb").close()
        proc = subprocess.Popen([*tool, "-P", pidfile, disk, uri], stdin=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + MOUNT_WAIT
            while not (os.path.exists(pidfile) and is_mounted(disk)):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{tool[0]} did not mount {disk}")
                time.sleep(0.02)
            buf = bytearray(CHUNK)
            total = 0
            fd = os.open(disk, os.O_RDONLY)
            try:
                start = time.perf_counter()
                while n := os.readv(fd, [buf]):
                    total += n
                elapsed = time.perf_counter() - start
            finally:
                os.close(fd)
        finally:
            subprocess.run(["fusermount3", "-u", disk], check=False)
            proc.wait(30)
    return total / elapsed / CHUNK


def fuse_workloads(tmp: str, data1g: str, workload: Callable[..., object],
                   variant: Callable[..., object]) -> list[object]:
    if not os.path.exists("/dev/fuse"):
        print("no /dev/fuse: fuse workloads skipped", file=sys.stderr)
        return []
    server = nbdkit("nbdkit memory", "memory", "1G")

    def measure(tool: list[str]) -> Callable[[], float]:
        def run() -> float:
            with running(server, "unix") as srv:
                w.fill(srv.uri, data1g)
                return read_through(tool, srv.uri)
        return run

    pynbd_fuse = [sys.executable, "-m", "pynbd", "fuse"]
    return [
        workload("fuse sequential read 1G, 1M reads [unix]", "MiB/s", [
            variant("pynbd fuse", measure(pynbd_fuse)),
            variant("nbdfuse", measure(["nbdfuse"]))], 1.0),
        # Bypassing the page cache, each 1 MiB read is one request, without read-ahead
        # (pynbd fuse's default raises the mount's read-ahead to 4 MiB instead: 1 MiB
        # requests, several in flight); nbdfuse refuses -o direct_io (libfuse 3 moved
        # it out of the mount options), so its default is the best it can do.
        workload("fuse sequential read 1G, 1M reads, pynbd -o direct_io [unix]", "MiB/s", [
            variant("pynbd fuse -o direct_io", measure([*pynbd_fuse, "-o", "direct_io"])),
            variant("nbdfuse", measure(["nbdfuse"]))], 1.0),
    ]
