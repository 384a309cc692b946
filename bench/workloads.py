"""The clients a benchmark runs and what each measures.

Every function takes a URI (or paths) and returns one number, larger is
better unless the workload says otherwise: IOPS for 4 KiB fio jobs, MiB/s for
sequential fio jobs and copies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from servers import ENV

MiB = 1 << 20


def fio(uri: str, rw: str, bs: str, iodepth: int, jobs: int, runtime: float,
        size: str = "256M") -> float:
    """IOPS (bs 4k) or MiB/s (larger blocks) of one fio run with the nbd engine."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
               f"--bs={bs}", f"--iodepth={iodepth}", f"--numjobs={jobs}", "--group_reporting",
               f"--size={size}", "--time_based", f"--runtime={runtime}", "--randrepeat=0",
               "--output-format=json", f"--output={out.name}"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        job = json.load(open(out.name))["jobs"][0]
    iops = job["read"]["iops"] + job["write"]["iops"]
    if bs == "4k":
        return iops
    return (job["read"]["bw_bytes"] + job["write"]["bw_bytes"]) / MiB


def timed_copy(cmd: list[str], nbytes: int) -> float:
    """MiB/s of a copy command."""
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    return nbytes / MiB / (time.perf_counter() - start)


def warm_copy_tools() -> None:
    """Start both copy programs once, untimed: after ``backup.settle()`` dropped the page
    cache, the next start would read the programs (and pynbd's modules) from disk."""
    for cmd in (["nbdcopy", "--version"], [sys.executable, "-m", "pynbd", "copy", "--version"]):
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=ENV)


def nbdcopy(src: str, dst: str, nbytes: int, *options: str) -> float:
    return timed_copy(["nbdcopy", *options, src, dst], nbytes)


def pynbd_copy(src: str, dst: str, nbytes: int, *options: str) -> float:
    return timed_copy([sys.executable, "-m", "pynbd", "copy", *options, src, dst], nbytes)


def fill(uri: str, path: str) -> None:
    """Write a file's bytes to an export (not timed)."""
    subprocess.run(["nbdcopy", path, uri], check=True)


def random_file(directory: str, size: int, name: str) -> str:
    """A file of random bytes, made once per run of the benchmark."""
    path = os.path.join(directory, name)
    if not os.path.exists(path) or os.path.getsize(path) != size:
        with open(path, "wb") as f:
            for _ in range(size // MiB):
                f.write(os.urandom(MiB))
    return path
