"""Workloads of the torrent plugin: a download from a seeder on loopback, and reads once it is done.

``torrent_workloads`` is called by ``run.py``'s ``build()``. The seeder is the
torrent tests' (``tests/plugins/torrentpeer.py``: a libtorrent session on
127.0.0.1, no tracker, no DHT, TCP only: uTP crawls on loopback), started for
each measurement, seeding the 256 MiB random file in 256 KiB pieces (the
.torrent is made once per run).

- ``torrent nbdcopy 256M from a seeder``: nbdcopy to ``null:`` from pynbd's
  plugin and from nbdkit's, both given a magnet link naming the seeder
  (``x.pe=``: nbdkit has no ``peer=``), so the whole download is timed.
  nbdkit 1.32's plugin can miss the wake-up of its last piece and wait for
  ever (it did in one of five runs here), so a copy is given 120 s, then
  tried once more from the start; a second hang counts as 0 MiB/s.
- ``torrent fio randread 4k qd16 [downloaded]``: pynbd's plugin over a cache
  that holds the whole file (checked, then read from disk), against the file
  plugin on the same file: what the torrent layer costs once the pieces are
  in. (nbdkit's plugin cannot serve a complete cache: it waits for a piece to
  arrive before the first client.) No target: most of the gap is the server's
  dispatch, not the plugin. A plugin whose reads may wait on the network gets
  a pool of worker threads; the file plugin's short requests run on the
  connection's own thread. Against ``pynbd serve -t 16 file`` the two are
  even, within this machine's noise.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import workloads as w
from servers import ENV, ServerSpec, nbdkit, pynbd, running

sys.path[:0] = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", p)
                for p in ("", "plugins")]
from torrentpeer import PLUGIN_QUIET, magnet, make_torrent, seeder  # noqa: E402

PIECE = 256 << 10
COPY_TIMEOUT = 120.0
ATTEMPTS = 2


def torrent_of(tmp: str, data256: str) -> tuple[Path, Path]:
    """(the seeder's directory, the .torrent) for the 256 MiB file, made on first use."""
    directory = Path(tmp, "torrent-seed")
    torrent = Path(tmp, "disk.torrent")
    if not torrent.exists():
        directory.mkdir(exist_ok=True)
        if not (directory / "disk.img").exists():
            os.link(data256, directory / "disk.img")
        make_torrent(directory / "disk.img", torrent, PIECE)
    return directory, torrent


def download_measure(spec: ServerSpec, tmp: str, data256: str) -> Callable[[], float]:
    """MiB/s of nbdcopy to null: from ``spec`` (``{magnet}``) while a seeder serves the file."""
    def once() -> float:
        directory, torrent = torrent_of(tmp, data256)
        with seeder(torrent, directory, tcp_only=True) as port:
            link = magnet(torrent, port)
            served = ServerSpec(spec.label, tuple(a.replace("{magnet}", link) for a in spec.argv), spec.kind)
            with running(served, "unix") as srv:
                start = time.perf_counter()
                subprocess.run(["nbdcopy", srv.uri, "null:"], check=True, timeout=COPY_TIMEOUT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
                return os.path.getsize(data256) / w.MiB / (time.perf_counter() - start)

    def measure() -> float:
        for _ in range(ATTEMPTS):
            try:
                return once()
            except subprocess.TimeoutExpired:
                print(f"{spec.label}: the download hung for {COPY_TIMEOUT:g} s", file=sys.stderr)
        return 0.0
    return measure


def downloaded_measure(spec: ServerSpec, tmp: str, data256: str, runtime: float) -> Callable[[], float]:
    """IOPS of fio 4k randread qd16 on ``spec`` (``{torrent}``, ``{cache}``) once all is read once."""
    def measure() -> float:
        directory, torrent = torrent_of(tmp, data256)
        served = ServerSpec(spec.label, tuple(a.replace("{torrent}", str(torrent)).replace(
            "{cache}", str(directory)) for a in spec.argv), spec.kind)
        with running(served, "unix") as srv:
            subprocess.run(["nbdcopy", srv.uri, "null:"], check=True, timeout=COPY_TIMEOUT, env=ENV)
            return w.fio(srv.uri, "randread", "4k", 16, 1, runtime)
    return measure


def torrent_workloads(tmp: str, data256: str, runtime: float,
                      workload: Callable[..., object], variant: Callable[..., object]) -> list[object]:
    mine = pynbd("pynbd torrent", "torrent", "{magnet}", *PLUGIN_QUIET)
    theirs = nbdkit("nbdkit torrent", "torrent", "{magnet}", "listen-interfaces=127.0.0.1:0")
    local = pynbd("pynbd torrent (cache)", "torrent", "{torrent}", "cache={cache}", "timeout=0",
                  *PLUGIN_QUIET)
    plain = pynbd("pynbd file", "-r", "file", data256)
    return [
        workload("torrent nbdcopy 256M from a seeder [loopback]", "MiB/s",
                 [variant(s.label, download_measure(s, tmp, data256)) for s in (mine, theirs)], 1.0),
        workload("torrent fio randread 4k qd16 [downloaded]", "IOPS", [
            variant(local.label, downloaded_measure(local, tmp, data256, runtime)),
            variant(plain.label, downloaded_measure(plain, tmp, data256, runtime))], None),
    ]
