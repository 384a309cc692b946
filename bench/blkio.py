"""blkio's drivers: io_uring against the file plugin on the same raw file (target: at
least the file plugin's rate), and virtio-blk-vhost-user in front of qemu-storage-daemon
against qemu-nbd serving the same image (target: at least qemu-nbd's rate), 4 KiB random
reads and writes at depth 16. ``blkio_workloads`` is called by ``run.py``'s ``build()``.

Where an io_uring row's time goes: server CPU per request (the process and its io-wq
thread: ``perf record -F 4000 -e cpu-clock -p PID`` during fio, sorted by thread and
symbol), Linux 6.18, ext4, two shared cores, one loaded run each (absolute values swing
by half with the load; the split does not):

    µs per request            file plugin   blkio io_uring
    randread   total              10.9           16.0
               Python              4.6            9.2
               kernel              5.6            6.1
               libc                0.6            0.7
    randwrite  total              17.2           30.4
               Python              4.0           10.3
               kernel, server     12.9            8.4
               libc                0.3            1.0
               io-wq thread         -            10.7

- Reads of cached data complete inside the io_uring_enter that submits them: one
  call per 8 requests against a pread each, the same page-cache copy. What is left is
  Python: a started request is taken, queued, reaped and answered, about twice the
  steps of a pread answered on the spot. (Later, on a quieter machine, with the reader
  waiting in its receive alone when nothing is in flight, ``bash
  bench/cpu_per_request.sh randread 16 pynbd serve -f blkio io_uring path=FILE``:
  8.7 and 12.0 µs against the file plugin's 6.8 and 9.3, two runs each.)
- Every buffered write goes to io-wq (tracepoint io_uring:io_uring_queue_async_work:
  1.0 per write): ext4 cannot write without blocking, so io_uring never tries it
  inline. That thread spends on the write (8.0) what the file plugin's pwrite costs,
  plus 2.7 handing work over and sleeping, and the reading thread alone (19.7) costs
  more than the file plugin's. So on two cores shared with fio the io_uring rate is
  bounded near (17.2 + 8) / (30.4 + 8) = 0.66 of the file plugin's (fio takes about
  8 µs per request). Reaching 1.0 leaves the reading thread 6.5 µs per write: its
  kernel time alone is 8.4 (submitting to io-wq, being woken by its completions; the
  file plugin's thread spends 4.2 besides the write), which leaves at best about 2 µs
  for Python, half of what the file plugin's simpler path takes.
- Ring options that do not change this: there is no task work to defer
  (io_uring:io_uring_task_add: 0 per request), so COOP_TASKRUN / DEFER_TASKRUN have
  nothing to save; io-wq runs one file's buffered writes one at a time (hashed by
  inode), so a ring uses one busy worker and capping them saves nothing; fixed files
  would save fget/fput (under 0.1 µs); fixed buffers only help O_DIRECT."""

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
