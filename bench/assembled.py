"""Disks assembled from files or built from a directory: split and partitioning
over four pieces of the 256 MiB random file (partitioning read only: fio writes
anywhere, the table too), linuxdisk over a directory holding
it, each pynbd against nbdkit's plugin of the same name.

``assembled_workloads`` is called by ``run.py``'s ``build()``; the pieces are
cut once per run. Requests straddle the pieces' boundaries now and then, as
they would on a real split image.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import workloads as w
from servers import ServerSpec, nbdkit, pynbd, running

PIECES = 4


def _served(spec: ServerSpec, client: Callable[[str], float]) -> Callable[[], float]:
    def measure() -> float:
        with running(spec, "unix") as srv:
            return client(srv.uri)
    return measure


def _pieces(tmp: str, data256: str) -> list[str]:
    """The random file cut into PIECES files (made once)."""
    paths = [os.path.join(tmp, f"piece{i}.raw") for i in range(PIECES)]
    if not all(os.path.exists(p) for p in paths):
        size = os.path.getsize(data256) // PIECES
        with open(data256, "rb") as src:
            for path in paths:
                with open(path, "wb") as dst:
                    dst.write(src.read(size))
    return paths


def assembled_workloads(tmp: str, data256: str, runtime: float,
                        workload: Callable[..., object], variant: Callable[..., object]) -> list[object]:
    pieces = _pieces(tmp, data256)
    tree = os.path.join(tmp, "linuxdisk-tree")
    if not os.path.isdir(tree):
        os.mkdir(tree)
        shutil.copyfile(data256, os.path.join(tree, "data.bin"))

    def fio(rw: str, bs: str) -> Callable[[str], float]:
        return lambda uri: w.fio(uri, rw, bs, 16, 1, runtime)

    cases = [
        ("split", ("split", *pieces), [("randread", "4k"), ("read", "256k"), ("randwrite", "4k")]),
        ("partitioning", ("partitioning", "partition-type=gpt", *pieces),
         [("randread", "4k")]),  # random writes would hit the table: EIO
        ("linuxdisk", ("linuxdisk", tree, "type=ext4"), [("randread", "4k"), ("read", "256k")]),
    ]
    out: list[object] = []
    for name, args, jobs in cases:
        mine, peer = pynbd(f"pynbd {name}", *args), nbdkit(f"nbdkit {name}", *args)
        for rw, bs in jobs:
            unit = "IOPS" if bs == "4k" else "MiB/s"
            out.append(workload(f"{name} fio {rw} {bs} qd16 j1 [unix]", unit, [
                variant(mine.label, _served(mine, fio(rw, bs))),
                variant(peer.label, _served(peer, fio(rw, bs)))], None))
    return out
