"""The cc plugin: the same C RAM disk (tests/plugins/cc/ramdisk.c, PARALLEL, 1 GiB)
compiled and served by pynbd and by Debian's nbdkit cc, 4 KiB random reads and
writes at depth 16. ``cc_workloads`` is called by ``run.py``'s ``build()``.

What it measures is pynbd's per-request cost around C callbacks (the plugin's
memcpy is the same in both); the target is nbdkit's rate within a factor of
two (0.5), as for the other in-memory plugins under the GIL.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import workloads as w
from servers import ServerSpec, nbdkit, pynbd, running

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAMDISK = os.path.join(ROOT, "tests", "plugins", "cc", "ramdisk.c")
INCLUDE = os.path.join(ROOT, "src", "pynbd", "plugins", "cc_include")


def measure(spec: ServerSpec, client: Callable[[str], float]) -> Callable[[], float]:
    def run() -> float:
        with running(spec, "unix") as srv:
            return client(srv.uri)
    return run


def cc_workloads(runtime: float, workload: Callable[..., object],
                 variant: Callable[..., object]) -> list[object]:
    servers = [pynbd("pynbd cc", "cc", RAMDISK, "size=1G"),
               nbdkit("nbdkit cc", "cc", RAMDISK, "size=1G", f"EXTRA_CFLAGS=-I{INCLUDE}")]
    out = []
    for rw in ("randread", "randwrite"):
        def client(uri: str, rw: str = rw) -> float:
            return w.fio(uri, rw, "4k", 16, 1, runtime)
        out.append(workload(f"cc ramdisk fio {rw} 4k qd16 j1 [unix]", "IOPS",
                            [variant(s.label, measure(s, client)) for s in servers], 0.5))
    return out
