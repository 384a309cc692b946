"""blkio's drivers: io_uring against the file plugin on the same raw file (target: at
least the file plugin's rate), and virtio-blk-vhost-user in front of qemu-storage-daemon
against qemu-nbd serving the same image (target: at least qemu-nbd's rate), 4 KiB random
reads and writes at depth 16. ``blkio_workloads`` is called by ``run.py``'s ``build()``."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import workloads as w
from servers import ServerSpec, pynbd, qemu_nbd, running


@contextmanager
def storage_daemon(image: str, sock: str) -> Iterator[None]:
    """qemu-storage-daemon exporting ``image`` (raw) as vhost-user-blk on ``sock``."""
    if os.path.exists(sock):
        os.unlink(sock)
    proc = subprocess.Popen([
        "qemu-storage-daemon", "--blockdev",
        f"driver=file,node-name=file,filename={image},cache.direct=off,aio=threads",
        "--export", f"type=vhost-user-blk,id=exp,node-name=file,addr.type=unix,addr.path={sock},"
                    "writable=on"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("qemu-storage-daemon did not start")
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait()


def measure(spec: ServerSpec, client: Callable[[str], float], daemon: tuple[str, str] | None = None
            ) -> Callable[[], float]:
    def run() -> float:
        if daemon is None:
            with running(spec, "unix") as srv:
                return client(srv.uri)
        with storage_daemon(*daemon), running(spec, "unix") as srv:
            return client(srv.uri)
    return run


def blkio_workloads(tmp: str, raw: str, runtime: float, workload: Callable[..., object],
                    variant: Callable[..., object]) -> list[object]:
    sock = os.path.join(tmp, "vhost-user.sock")
    io_uring = [pynbd("pynbd blkio io_uring", "blkio", "io_uring", f"path={raw}"),
                pynbd("pynbd file", "file", raw)]
    vhost = pynbd("pynbd blkio vhost-user", "blkio", "virtio-blk-vhost-user", f"path={sock}")
    qemu = qemu_nbd("qemu-nbd", "-f", "raw", "-t", "-e", "8", raw)
    out = []
    for rw in ("randread", "randwrite"):
        def client(uri: str, rw: str = rw) -> float:
            return w.fio(uri, rw, "4k", 16, 1, runtime)
        out.append(workload(f"blkio io_uring fio {rw} 4k qd16 j1 [unix]", "IOPS",
                            [variant(s.label, measure(s, client)) for s in io_uring], 1.0))
        out.append(workload(f"blkio vhost-user fio {rw} 4k qd16 j1 [unix]", "IOPS",
                            [variant(vhost.label, measure(vhost, client, (raw, sock))),
                             variant(qemu.label, measure(qemu, client))], 1.0))
    return out
