"""Compressed images: the xz and gzip filters against nbdkit's.

``compressed_workloads`` is called by ``run.py``'s ``build()``. One 1 GiB
image (each MiB a quarter random bytes, the rest numbered text lines: it
compresses about 4:1) is made once per run and compressed with
``xz -1 --block-size=1MiB -T0`` and ``gzip -1``.

- xz: fio 4k randread qd16 over the whole GiB (pynbd decodes each 1 MiB block
  once, at its first read, into a temporary file; nbdkit keeps 8 blocks);
- gzip time to first byte: seconds from starting the server to the first 4 KiB
  read answered (pynbd indexes the file; nbdkit decompresses it all into a
  temporary file), lower is better; once more with pynbd's saved index=;
- gzip fio 4k randread qd16 after the open (both read a temporary file: nbdkit
  decompressed the image into it at open; pynbd wrote what building its
  index decoded into it, ``gzip-prefetch=true``, the default).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable

import workloads as w
from servers import ServerSpec, nbdkit, pynbd, running

MiB = 1 << 20
GiB = 1 << 30


def _image(tmp: str) -> str:
    path = os.path.join(tmp, "compressible1G")
    if not os.path.exists(path):
        with open(path, "wb") as f:
            for i in range(GiB // MiB):
                text = b"".join(b"%08d line of a compressible disk image %d\n" % (i, n) for n in range(18000))
                f.write(os.urandom(MiB // 4) + text[:MiB - MiB // 4])
    return path


def _compress(cmd: list[str], src: str, dst: str) -> None:
    if not os.path.exists(dst):
        with open(src, "rb") as fin, open(dst + ".part", "wb") as fout:
            subprocess.run(cmd, stdin=fin, stdout=fout, check=True)
        os.rename(dst + ".part", dst)


class Images:
    """The compressed images, made at the first measurement that needs them (not for --only others)."""

    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        base = os.path.join(tmp, "compressible1G")
        self.xz, self.gz, self.index = base + ".xz", base + ".gz", base + ".gz.idx"

    def ready(self) -> None:
        image = _image(self.tmp)
        _compress(["xz", "-1", "--block-size=1MiB", "-T0", "-c"], image, self.xz)
        _compress(["gzip", "-1", "-c"], image, self.gz)


def _served(images: Images, spec: ServerSpec, client: Callable[[str], float]) -> Callable[[], float]:
    def measure() -> float:
        images.ready()
        with running(spec, "unix") as srv:
            return client(srv.uri)
    return measure


def _first_byte(images: Images, spec: ServerSpec) -> Callable[[], float]:
    def measure() -> float:
        images.ready()
        start = time.monotonic()
        with running(spec, "unix") as srv:
            subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read 0 4096", srv.uri], check=True,
                           stdout=subprocess.DEVNULL)
            return time.monotonic() - start
    return measure


def compressed_workloads(tmp: str, runtime: float, workload: Callable[..., object],
                         variant: Callable[..., object]) -> list[object]:
    images = Images(tmp)

    def rand(uri: str) -> float:
        return w.fio(uri, "randread", "4k", 16, 1, runtime, size="1G")

    def pair(kind: str, *extra: str) -> tuple[ServerSpec, ServerSpec]:
        path = images.xz if kind == "xz" else images.gz
        return (pynbd(f"pynbd {kind}", "-r", f"--filter={kind}", "file", path, *extra),
                nbdkit(f"nbdkit {kind}", "-r", f"--filter={kind}", "file", path))

    mine, peer = pair("xz")
    out = [workload("xz 1M blocks fio randread 4k qd16 j1 [unix]", "IOPS", [
        variant(mine.label, _served(images, mine, rand)), variant(peer.label, _served(images, peer, rand))],
        1.0)]
    mine, peer = pair("gzip")
    indexed = pynbd("pynbd gzip index=", "-r", "--filter=gzip", "file", images.gz, f"index={images.index}")
    out.append(workload("gzip 1G time to first byte [unix]", "s", [
        variant(mine.label, _first_byte(images, mine)), variant(peer.label, _first_byte(images, peer))],
        None, True))
    # (the warm-up run saves the index; the measured runs reuse it)
    out.append(workload("gzip 1G time to first byte, saved index [unix]", "s", [
        variant(indexed.label, _first_byte(images, indexed)),
        variant(peer.label, _first_byte(images, peer))], None, True))
    out.append(workload("gzip 1G fio randread 4k qd16 j1 [unix]", "IOPS", [
        variant(mine.label, _served(images, mine, rand)), variant(peer.label, _served(images, peer, rand))],
        None))
    return out
