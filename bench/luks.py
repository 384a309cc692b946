"""The luks filter against nbdkit's, and opening a LUKS2 keyslot against cryptsetup.

``luks_workloads`` is called by ``run.py``'s ``build()``. The image is LUKS1
(the one version nbdkit's filter reads): aes-xts-plain64, 512-byte sectors,
a 1 GiB payload of random bytes, served by the file plugin under each
filter. The opening workload makes a LUKS2 keyslot with cryptsetup's default
argon2id costs (time 4, 1 GiB, 4 threads; fixed, not benchmarked) and times
a client's first answer from a listening ``pynbd serve --filter=luks``
against ``cryptsetup open --test-passphrase``.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from collections.abc import Callable

import workloads as w
from servers import ENV, ServerSpec, nbdkit, pynbd, running

PASSPHRASE = "bench passphrase"
GiB = 1 << 30


def luks1_image(tmp: str, data1g: str) -> str:
    """A LUKS1 image whose 1 GiB payload holds data1g's random bytes (as ciphertext)."""
    path = os.path.join(tmp, "luks1.img")
    subprocess.run([sys.executable, "-m", "pynbd", "luks", "format", path, "--type", "luks1",
                    "--size", "1G", "--iter-time", "10", "--passphrase", PASSPHRASE],
                   check=True, stdout=subprocess.DEVNULL, env=ENV)
    offset = os.path.getsize(path) - GiB
    with open(data1g, "rb") as src, open(path, "r+b") as dst:
        dst.seek(offset)
        while chunk := src.read(16 << 20):
            dst.write(chunk)
    return path


def open_measure(image_of: Callable[[], str], key: str, mine: bool) -> Callable[[], float]:
    """Seconds until the passphrase has opened the keyslot: for pynbd, from starting the
    server (which opens the keyslot before it listens; the interpreter's start is counted)
    to a client's first answer, for cryptsetup the whole command."""
    def measure() -> float:
        image = image_of()
        if mine:
            spec = pynbd("pynbd", "--filter=luks", "file", image, f"passphrase=+{key}")
            with running(spec, "unix", timeout=300) as srv:
                start = time.perf_counter()
                subprocess.run(["nbdinfo", "--size", srv.uri], check=True, stdout=subprocess.DEVNULL)
                return srv.startup + time.perf_counter() - start
        start = time.perf_counter()
        subprocess.run(["cryptsetup", "open", "--test-passphrase", "--key-file", key, image],
                       check=True)
        return time.perf_counter() - start
    return measure


def luks2_image(tmp: str, key: str) -> str:
    """A LUKS2 image with one keyslot at cryptsetup's default argon2id costs."""
    with open(key, "w") as f:
        f.write(PASSPHRASE)
    path = os.path.join(tmp, "luks2.img")
    with open(path, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["cryptsetup", "luksFormat", "-q", "--type", "luks2", "--pbkdf", "argon2id",
                    "--pbkdf-force-iterations", "4", "--pbkdf-memory", str(1 << 20),
                    "--pbkdf-parallel", "4", "--key-file", key, path], check=True)
    return path


def luks_workloads(tmp: str, data1g: str, runtime: float, workload: Callable[..., object],
                   variant: Callable[..., object]) -> list[object]:
    """The images are made when a workload first runs (not when another is chosen with --only)."""
    key = os.path.join(tmp, "luks.key")
    image1 = functools.cache(lambda: luks1_image(tmp, data1g))
    image2 = functools.cache(lambda: luks2_image(tmp, key))

    def served(client: Callable[[str], float]) -> list[object]:
        def measure(kind: Callable[..., ServerSpec], label: str) -> Callable[[], float]:
            def run() -> float:
                spec = kind(label, "--filter=luks", "file", image1(), f"passphrase={PASSPHRASE}")
                with running(spec, "unix") as srv:
                    return client(srv.uri)
            return run
        return [variant("pynbd luks", measure(pynbd, "pynbd luks")),
                variant("nbdkit luks", measure(nbdkit, "nbdkit luks"))]

    out = [workload(f"luks1 file fio {rw} 4k qd16 j1 [unix]", "IOPS", served(
        (lambda r: lambda uri: w.fio(uri, r, "4k", 16, 1, runtime))(rw)), 1.0)
        for rw in ("randread", "randwrite")]
    out.append(workload("luks1 file nbdcopy 1G to null: [unix]", "MiB/s",
                        served(lambda uri: w.nbdcopy(uri, "null:", GiB)), 1.0))
    out.append(workload("luks2 argon2id default cost: open keyslot", "s", [
        variant("pynbd first answer", open_measure(image2, key, True)),
        variant("cryptsetup --test-passphrase", open_measure(image2, key, False))],
        1.0, lower_is_better=True))
    return out
