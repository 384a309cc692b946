"""What nbdkit's small data-path filters cost, pynbd against nbdkit.

``nbdkit_filter_workloads`` is called by ``run.py``'s ``build()``: 4 KiB
random reads (queue depth 16, one job) over a prefilled 1G memory disk
through swab, nocache, multi-conn and blocksize-policy, each served by pynbd
and by nbdkit with the same arguments (no target: the ratios are reported).
"""

from __future__ import annotations

from collections.abc import Callable

import workloads as w
from servers import ServerSpec, nbdkit, pynbd, running

FILTERS = (("swab", ()), ("nocache", ()), ("multi-conn", ("multi-conn-mode=emulate",)),
           ("blocksize-policy", ("blocksize-minimum=4K", "blocksize-error-policy=error")))


def measure(spec: ServerSpec, data: str, client: Callable[[str], float]) -> Callable[[], float]:
    def run() -> float:
        with running(spec, "unix") as srv:
            w.fill(srv.uri, data)
            return client(srv.uri)
    return run


def nbdkit_filter_workloads(tmp: str, data: str, runtime: float, workload: Callable[..., object],
                            variant: Callable[..., object]) -> list[object]:
    def client(uri: str) -> float:
        return w.fio(uri, "randread", "4k", 16, 1, runtime)

    out = []
    for name, params in FILTERS:
        specs = [make(f"{who} {name} memory", f"--filter={name}", "memory", "1G", *params)
                 for who, make in (("pynbd", pynbd), ("nbdkit", nbdkit))]
        out.append(workload(f"filter {name} memory fio randread 4k qd16 j1 [unix]", "IOPS",
                            [variant(s.label, measure(s, data, client)) for s in specs], None))
    return out
