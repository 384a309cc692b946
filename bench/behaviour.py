"""The filters whose behaviour was brought in line with nbdkit (issue 15), pynbd against nbdkit.

``behaviour_workloads`` is called by ``run.py``'s ``build()``: 4 KiB random
writes at queue depth 16 through ``blocksize minblock=4K`` (aligned writes
now run in parallel instead of one block range at a time), and 256 KiB
sequential reads through ``readahead`` (nbdkit's window) over a 1G memory
disk, each served by pynbd and by nbdkit with the same arguments (no target:
the ratios are reported).
"""

from __future__ import annotations

from collections.abc import Callable

import workloads as w
from servers import ServerSpec, nbdkit, pynbd, running

JOBS = (("blocksize", ("minblock=4K",), "randwrite", "4k"),
        ("readahead", (), "read", "256k"))


def measure(spec: ServerSpec, data: str, client: Callable[[str], float]) -> Callable[[], float]:
    def run() -> float:
        with running(spec, "unix") as srv:
            w.fill(srv.uri, data)
            return client(srv.uri)
    return run


def behaviour_workloads(data: str, runtime: float, workload: Callable[..., object],
                        variant: Callable[..., object]) -> list[object]:
    out = []
    for name, params, rw, bs in JOBS:
        def client(uri: str, rw: str = rw, bs: str = bs) -> float:
            return w.fio(uri, rw, bs, 16, 1, runtime)

        specs = [make(f"{who} {name} memory", f"--filter={name}", "memory", "1G", *params)
                 for who, make in (("pynbd", pynbd), ("nbdkit", nbdkit))]
        out.append(workload(f"filter {name} memory fio {rw} {bs} qd16 j1 [unix]",
                            "IOPS" if bs == "4k" else "MiB/s",
                            [variant(s.label, measure(s, data, client)) for s in specs], None))
    return out
