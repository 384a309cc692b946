"""blkio io_uring against the file plugin: the same raw file, 4 KiB random reads and
writes at depth 16 (target: at least the file plugin's rate, as issue 17 asks).
``blkio_workloads`` is called by ``run.py``'s ``build()``."""

from __future__ import annotations

from collections.abc import Callable

import workloads as w
from servers import ServerSpec, pynbd, running


def measure(spec: ServerSpec, client: Callable[[str], float]) -> Callable[[], float]:
    def run() -> float:
        with running(spec, "unix") as srv:
            return client(srv.uri)
    return run


def blkio_workloads(raw: str, runtime: float, workload: Callable[..., object],
                    variant: Callable[..., object]) -> list[object]:
    servers = [pynbd("pynbd blkio io_uring", "blkio", "io_uring", f"path={raw}"),
               pynbd("pynbd file", "file", raw)]
    out = []
    for rw in ("randread", "randwrite"):
        def client(uri: str, rw: str = rw) -> float:
            return w.fio(uri, rw, "4k", 16, 1, runtime)
        out.append(workload(f"blkio io_uring fio {rw} 4k qd16 j1 [unix]", "IOPS",
                            [variant(s.label, measure(s, client)) for s in servers], 1.0))
    return out
