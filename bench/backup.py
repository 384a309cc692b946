"""pynbd backup: an incremental backup after 1% of the disk changed, against the full backup.

``backup_workloads`` is called by ``run.py``'s ``build()``. The server is
``pynbd serve --filter=cbt --filter=cow sparse-random SIZE`` (the cow
overlay makes the generated disk writable; cbt tracks the writes). Each
measurement starts a fresh server. The full variant times ``pynbd backup
full --control`` into an empty directory; the incremental variant first
takes that full backup (not timed), writes 1% of the disk as random 64 KiB
blocks, then times ``pynbd backup inc``. Seconds, lower is better; the
ratio is full / incremental (target 10).

The issue asks for 10 GiB (``BENCH_BACKUP_GIB=10``); this is 4 GiB with
sparse-random's data at 25% (1 GiB to read for the full backup, 41 MiB
changed) so that a run takes seconds on a shared two-core machine. The
ratio is bounded by the bytes read (25% against 1%) less what both pay
alike: starting Python (~0.1 s of CPU before any pynbd module, 30 ms of it
this sandbox's certifi .pth), importing the client and the backup modules
(~60 ms), the checkpoint, the block status over the whole disk (~15 ms at
4 GiB), the final fsync. What the incremental costs per changed 64 KiB
cluster, measured in process: ~45 us of client CPU to read it (4
connections, 32 requests in flight), ~21 us of kernel time to write it into
the qcow2 file, ~1 us of qcow2 bookkeeping, ~30 us of server CPU.
Measured on the loaded machine (2026-11-30, CPU of ``pynbd backup inc`` at
4 GiB, median of 6): 400 -> 284 ms of client CPU after the start-up cuts.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable

from servers import ServerSpec, pynbd, running

from pynbd.client.sync import connect

BACKUP = [sys.executable, "-m", "pynbd", "backup"]
SIZE = int(os.environ.get("BENCH_BACKUP_GIB", "4")) << 30  # BENCH_BACKUP_GIB=10: the size
PERCENT = 25
BLOCK = 64 * 1024


def change(uri: str, fraction: float, seed: int = 1) -> None:
    """Write ``fraction`` of the disk as random blocks (not timed)."""
    rng = random.Random(seed)
    blocks = rng.sample(range(SIZE // BLOCK), int(SIZE * fraction) // BLOCK)
    with connect(uri) as h:
        for block in blocks:
            h.pwrite(rng.randbytes(BLOCK), block * BLOCK)
        h.flush()


def backup(kind: str, uri: str, directory: str, control: str) -> float:
    start = time.perf_counter()
    subprocess.run([*BACKUP, kind, uri, directory, f"--control={control}"], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def backup_measure(spec: ServerSpec, tmp: str, incremental: bool) -> Callable[[], float]:
    control, bitmaps, directory = (os.path.join(tmp, n) for n in ("backup.ctl", "bitmaps", "backups"))

    def measure() -> float:
        for path in (bitmaps, directory):
            shutil.rmtree(path, ignore_errors=True)
        with running(spec, "unix") as srv:
            if not incremental:
                return backup("full", srv.uri, directory, control)
            backup("full", srv.uri, directory, control)
            change(srv.uri, 0.01)
            return backup("inc", srv.uri, directory, control)
    return measure


def backup_workloads(tmp: str, workload: Callable[..., object],
                     variant: Callable[..., object]) -> list[object]:
    """pynbd backup inc after 1% changed ≥ 10× faster than pynbd backup full."""
    control = os.path.join(tmp, "backup.ctl")
    spec = pynbd("cbt", f"--control={control}", "--filter=cbt", "--filter=cow", "sparse-random",
                 str(SIZE), "seed=1", f"percent={PERCENT}", f"bitmap-dir={os.path.join(tmp, 'bitmaps')}")
    return [workload(f"backup inc after 1% changed vs full, sparse-random {SIZE >> 30}G "
                     f"{PERCENT}% [unix]", "s", [
                         variant("pynbd backup inc", backup_measure(spec, tmp, True)),
                         variant("pynbd backup full", backup_measure(spec, tmp, False))],
                     10.0, True)]
