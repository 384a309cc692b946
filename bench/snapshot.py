"""The snapshot filter's cost: origin writes with one live snapshot against none.

``snapshot_workloads`` is called by ``run.py``'s ``build()``. Both variants
serve the same file through the snapshot filter; before each measurement the
store is emptied and, for the first variant, one snapshot is taken through
the control socket, so every first write to a 64 KiB chunk copies it out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable

import workloads as w
from servers import ServerSpec, pynbd, running

CTL = [sys.executable, "-m", "pynbd", "ctl"]


def snapshot_measure(spec: ServerSpec, control: str, store: str, snapshots: int,
                     client: Callable[[str], float]) -> Callable[[], float]:
    def measure() -> float:
        shutil.rmtree(store, ignore_errors=True)
        with running(spec, "unix") as srv:
            for i in range(snapshots):
                subprocess.run([*CTL, control, "snapshot", "create", f"bench{i}"], check=True,
                               stdout=subprocess.DEVNULL)
            listed = subprocess.run([*CTL, control, "--json", "snapshot", "list"], check=True,
                                    capture_output=True).stdout
            assert len(json.loads(listed)) == snapshots
            return client(srv.uri)
    return measure


def snapshot_workloads(tmp: str, raw: str, runtime: float,
                       workload: Callable[..., object], variant: Callable[..., object]) -> list[object]:
    """fio 4k randwrite qd16 on the origin: one live snapshot ≥ 0.5× none."""
    control, store = os.path.join(tmp, "snap.ctl"), os.path.join(tmp, "snapstore")
    spec = pynbd("snapshot", f"--control={control}", "--filter=snapshot", "file", raw, f"store={store}")

    def client(uri: str) -> float:
        return w.fio(uri, "randwrite", "4k", 16, 1, runtime)

    return [workload("snapshot origin fio randwrite 4k qd16 j1 [unix]", "IOPS", [
        variant("pynbd 1 live snapshot", snapshot_measure(spec, control, store, 1, client)),
        variant("pynbd no snapshot", snapshot_measure(spec, control, store, 0, client))], 0.5)]
