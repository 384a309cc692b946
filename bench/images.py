"""Disk images inside containers: a qcow2 file (against qemu-nbd) and a tar entry
(against nbdkit's tar filter), each read sequentially and at random.

``image_workloads`` is called by ``run.py``'s ``build()``. The qcow2 files are
made once per run with ``qemu-img convert`` from the 256 MiB random file: one
plain, one zlib-compressed (random data does not compress, so the compressed
image is made from a half-text copy of it). The tar archive holds a small file
and then the disk.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable

import workloads as w
from servers import ServerSpec, nbdkit, pynbd, qemu_nbd, running


def _served(spec: ServerSpec, client: Callable[[str], float]) -> Callable[[], float]:
    def measure() -> float:
        with running(spec, "unix") as srv:
            return client(srv.uri)
    return measure


def _half_text(data: str, tmp: str) -> str:
    """A copy of ``data`` whose every other MiB is text (compressible)."""
    path = os.path.join(tmp, "halftext256M")
    if not os.path.exists(path):
        text = (b"pynbd qcow2 bench " * 60000)[:1 << 20]
        with open(data, "rb") as src, open(path, "wb") as dst:
            for i in range(os.path.getsize(data) >> 20):
                chunk = src.read(1 << 20)
                dst.write(text if i % 2 else chunk)
    return path


def image_workloads(tmp: str, data256: str, runtime: float,
                    workload: Callable[..., object], variant: Callable[..., object]) -> list[object]:
    plain = os.path.join(tmp, "plain.qcow2")
    zlib = os.path.join(tmp, "zlib.qcow2")
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", data256, plain], check=True)
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", _half_text(data256, tmp), zlib],
                   check=True)
    tar = os.path.join(tmp, "disk.tar")
    if not os.path.exists(os.path.join(tmp, "disk.img")):
        os.symlink(data256, os.path.join(tmp, "disk.img"))
    with open(os.path.join(tmp, "readme.txt"), "w") as f:
        f.write("bench\n")
    subprocess.run(["tar", "-C", tmp, "-h", "-cf", tar, "readme.txt", "disk.img"], check=True)
    out: list[object] = []

    def seq(uri: str) -> float:
        return w.fio(uri, "read", "256k", 16, 1, runtime)

    def rand(uri: str) -> float:
        return w.fio(uri, "randread", "4k", 16, 1, runtime)

    for label, path in (("qcow2", plain), ("qcow2 zlib", zlib)):
        mine = pynbd(f"pynbd {label}", "-r", "--filter=qcow2", "file", path)
        peer = qemu_nbd(f"qemu-nbd {label}", "-r", "-f", "qcow2", "-t", path)
        for name, unit, client, target in (("fio read 256k qd16 j1", "MiB/s", seq, 0.8),
                                           ("fio randread 4k qd16 j1", "IOPS", rand, None)):
            out.append(workload(f"{label} {name} [unix]", unit, [
                variant(mine.label, _served(mine, client)),
                variant(peer.label, _served(peer, client))], target))
    mine = pynbd("pynbd tar", "-r", "file", tar, "--filter=tar", "tar-entry=disk.img")
    peer = nbdkit("nbdkit tar", "-r", "file", tar, "--filter=tar", "tar-entry=disk.img")
    for name, unit, client in (("fio read 256k qd16 j1", "MiB/s", seq),
                               ("fio randread 4k qd16 j1", "IOPS", rand)):
        out.append(workload(f"tar {name} [unix]", unit, [
            variant(mine.label, _served(mine, client)),
            variant(peer.label, _served(peer, client))], 1.0))
    return out
