"""pynbd backup against pynbd serve --filter=cbt (checkpoints through the control socket).

Rounds of: write (data, zeroes, trims) through an NBD client, keep a copy of
the disk, back up (full, then incrementals that take the next checkpoint).
Every point restores byte for byte, with pynbd and with qemu-img alone. A
server killed with SIGKILL comes back with its checkpoints inconsistent:
``backup inc`` refuses, a full backup starts a new chain that continues.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from nbdtest import PYNBD, Served, run, served, wait_for
from pynbd.client.sync import connect
from pynbd.tools.backups.take import LANE_BYTES, cluster_runs, lanes_for
from pynbd.tools.copying.dirty import CLEAN, DATA, ZERO

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")

MiB = 1024 * 1024
SIZE = 64 * MiB


def pynbd(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([*PYNBD, *args], check=check)


@contextmanager
def cbt_server(tmp_path: Path) -> Iterator[tuple[Served, str]]:
    control = str(tmp_path / "ctl")
    with served("--filter=cbt", "file", str(tmp_path / "disk.img"),
                f"bitmap-dir={tmp_path / 'bitmaps'}", options=(f"--control={control}",)) as srv:
        yield srv, control


def scribble(uri: str, rng: random.Random, rounds: int = 20) -> int:
    """Random writes, zeroes and trims; the bytes they touched."""
    touched = 0
    with connect(uri) as h:
        for _ in range(rounds):
            length = rng.choice([512, 4096, 65536, 200 * 1024, MiB])
            offset = rng.randrange(0, SIZE - length) // 512 * 512
            kind = rng.random()
            if kind < 0.7:
                h.pwrite(rng.randbytes(length), offset)
            elif kind < 0.85:
                h.zero(length, offset)
            else:
                h.trim(length, offset)
            touched += length
        h.flush()
    return touched


def keep(disk: Path, path: Path) -> Path:
    """A copy of the served file as it is now (the file plugin writes through; flushed)."""
    shutil.copyfile(disk, path)
    return path


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def manifest(backups: Path) -> dict:
    return json.loads((backups / "manifest.json").read_text())


def test_checkpoints_and_restores(tmp_path):
    rng = random.Random(5)
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(SIZE)
        f.seek(0)
        f.write(rng.randbytes(6 * MiB))
        f.seek(50 * MiB)
        f.write(rng.randbytes(2 * MiB))
    backups = tmp_path / "backups"
    states: list[Path] = []
    with cbt_server(tmp_path) as (srv, control):
        pynbd("backup", "full", srv.uri, str(backups), f"--control={control}")
        states.append(keep(disk, tmp_path / "s0.raw"))
        for i in range(1, 4):
            touched = scribble(srv.uri, rng)
            if i == 2:  # a checkpoint nobody backed up (a failed backup leaves one): read it too
                pynbd("ctl", control, "checkpoint", "create", "stray")
                touched += scribble(srv.uri, rng, 5)
            states.append(keep(disk, tmp_path / f"s{i}.raw"))
            pynbd("backup", "inc", "-p", srv.uri, str(backups), f"--control={control}")
            assert manifest(backups)["backups"][-1]["data"] <= touched + 40 * 65536
        listed = json.loads(pynbd("ctl", "--json", control, "checkpoint", "list").stdout)
        rows = manifest(backups)["backups"]
        names = [r["checkpoint"] for r in rows]
        assert [c["name"] for c in listed] == names[:2] + ["stray"] + names[2:]
        assert [r["since"] for r in rows[1:]] == [names[:1], [names[1], "stray"], names[2:3]]
        # a checkpoint name that exists: refused, nothing written
        before = sorted(p.name for p in backups.iterdir())
        one_line_error(pynbd("backup", "inc", srv.uri, str(backups), f"--control={control}",
                             f"--checkpoint={listed[0]['name']}", check=False), listed[0]["name"])
        assert sorted(p.name for p in backups.iterdir()) == before
        assert len(manifest(backups)["backups"]) == 4
        # no server behind the control socket: refused before the directory is made
        elsewhere = tmp_path / "elsewhere"
        one_line_error(pynbd("backup", "full", srv.uri, str(elsewhere),
                             f"--control={tmp_path / 'nobody.ctl'}", check=False), "control socket")
        assert not elsewhere.exists()

    for i, (row, state) in enumerate(zip(rows, states, strict=True)):
        restored = tmp_path / f"r{i}.raw"
        pynbd("backup", "restore", str(backups), str(restored), f"--at={row['checkpoint']}")
        assert restored.read_bytes() == state.read_bytes(), f"restore at {row['checkpoint']}"
        qcow2 = backups / row["file"]
        run(["qemu-img", "check", str(qcow2)])
        converted = tmp_path / f"q{i}.raw"
        run(["qemu-img", "convert", "-O", "raw", str(qcow2), str(converted)])
        assert converted.read_bytes() == state.read_bytes(), f"qemu-img at {row['checkpoint']}"

    # restore into an NBD export
    target = tmp_path / "target.img"
    with open(target, "wb") as f:
        f.truncate(SIZE)
    with served("file", str(target)) as dst:
        pynbd("backup", "restore", str(backups), dst.uri, "--at", "2")
    assert target.read_bytes() == states[2].read_bytes()


def test_unclean_stop_needs_a_full_backup(tmp_path):
    rng = random.Random(7)
    with open(tmp_path / "disk.img", "wb") as f:
        f.truncate(SIZE)
    backups = tmp_path / "backups"
    with cbt_server(tmp_path) as (srv, control):
        scribble(srv.uri, rng, 5)
        pynbd("backup", "full", srv.uri, str(backups), f"--control={control}")
        scribble(srv.uri, rng, 5)
        srv.proc.kill()
        srv.proc.wait()
    first = manifest(backups)["backups"][0]["checkpoint"]
    with cbt_server(tmp_path) as (srv, control):
        before = sorted(p.name for p in backups.iterdir())
        one_line_error(pynbd("backup", "inc", srv.uri, str(backups), f"--control={control}",
                             check=False),
                       f"checkpoint {first} is inconsistent (the server stopped uncleanly); "
                       "take a full backup")
        assert sorted(p.name for p in backups.iterdir()) == before
        scribble(srv.uri, rng, 5)  # the server still serves
        pynbd("backup", "full", srv.uri, str(backups), f"--control={control}")
        scribble(srv.uri, rng, 5)
        pynbd("backup", "inc", srv.uri, str(backups), f"--control={control}")
        pynbd("backup", "inc", srv.uri, str(backups), f"--control={control}")  # nothing changed
        state = keep(tmp_path / "disk.img", tmp_path / "now.raw")
    rows = manifest(backups)["backups"]
    assert [r["kind"] for r in rows] == ["full", "full", "inc", "inc"]
    assert rows[-1]["data"] == rows[-1]["zero"] == 0
    restored = tmp_path / "restored.raw"
    pynbd("backup", "restore", str(backups), str(restored))
    assert restored.read_bytes() == state.read_bytes()


def test_a_cluster_mixing_kinds_is_read_whole():
    k = 65536
    runs = list(cluster_runs([(0, 2 * k, ZERO), (2 * k, 100, CLEAN), (2 * k + 100, 100, ZERO),
                              (2 * k + 200, 8 * k - 200, CLEAN), (10 * k, 100, DATA),
                              (10 * k + 100, 2 * k - 100, CLEAN)], 12 * k - 512))
    assert runs == [(0, 2 * k, ZERO), (2 * k, k, DATA), (3 * k, 7 * k, CLEAN),
                    (10 * k, k, DATA), (11 * k, k - 512, CLEAN)]


def test_fine_granularity_trims_inside_data_clusters(tmp_path):
    """4 KiB granules: a trimmed granule inside a cluster of unchanged data keeps the data."""
    rng = random.Random(3)
    disk = tmp_path / "disk.img"
    disk.write_bytes(rng.randbytes(4 * MiB))
    backups = tmp_path / "backups"
    control = str(tmp_path / "ctl")
    with served("--filter=cbt", "file", str(disk), f"bitmap-dir={tmp_path / 'bitmaps'}",
                "granularity=4K", options=(f"--control={control}",)) as srv:
        pynbd("backup", "full", srv.uri, str(backups), f"--control={control}")
        with connect(srv.uri) as h:
            h.trim(4096, 65536 + 8192)
            h.zero(4096, 3 * 65536)
            h.pwrite(b"\x01" * 4096, 5 * 65536 + 4096)
            h.flush()
        state = keep(disk, tmp_path / "now.raw")
        pynbd("backup", "inc", srv.uri, str(backups), f"--control={control}")
    assert manifest(backups)["backups"][1]["data"] <= 3 * 65536
    restored = tmp_path / "restored.raw"
    pynbd("backup", "restore", str(backups), str(restored))
    assert restored.read_bytes() == state.read_bytes()


def test_a_killed_backup_leaves_the_directory_as_it_was(tmp_path):
    rng = random.Random(4)
    disk = tmp_path / "disk.img"
    # 48 MiB read 16 MiB at a time (16 requests in flight), each round held 300 ms: the image
    # is written to for 600 ms or more before it is complete, however loaded the machine
    disk.write_bytes(rng.randbytes(48 * MiB))
    backups = tmp_path / "backups"
    control = str(tmp_path / "ctl")
    with served("--filter=cbt", "--filter=delay", "file", str(disk), "rdelay=300ms",
                f"bitmap-dir={tmp_path / 'bitmaps'}", options=(f"--control={control}",)) as srv:
        command = [*PYNBD, "backup", "full", srv.uri, str(backups), f"--control={control}", "-C1"]
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            part = backups / "0000.qcow2.part"
            wait_for(lambda: part.exists() and part.stat().st_size > 0,
                     message="the backup never started writing")
        finally:
            proc.kill()
            proc.wait()
        assert not (backups / "manifest.json").exists()
        pynbd(*command[len(PYNBD):])
    assert sorted(p.name for p in backups.iterdir()) == ["0000.qcow2", "manifest.json"]
    restored = tmp_path / "restored.raw"
    pynbd("backup", "restore", str(backups), str(restored))
    assert restored.read_bytes() == disk.read_bytes()


def test_a_server_killed_mid_backup_fails_it_cleanly(tmp_path):
    """The server dies with reads in flight: one line, exit 1, no image or manifest left."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(random.Random(5).randbytes(16 * MiB))
    backups = tmp_path / "backups"
    # (every read held 2 s: the backup cannot finish before the kill, however loaded the machine)
    with served("--filter=delay", "file", str(disk), "rdelay=2s") as srv:
        proc = subprocess.Popen([*PYNBD, "backup", "full", srv.uri, str(backups)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        part = backups / "0000.qcow2.part"
        wait_for(lambda: part.exists(), message="the backup never started")
        srv.proc.kill()
        _, err = proc.communicate(timeout=60)
    one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, b"", err))
    assert not backups.exists()  # it was made for this backup, and is gone again


def test_connections_follow_the_bytes_to_read():
    assert lanes_for(0, 4) == lanes_for(100 * MiB, 4) == lanes_for(LANE_BYTES, 4) == 1
    assert lanes_for(LANE_BYTES + 1, 4) == 2
    assert lanes_for(10 * LANE_BYTES, 4) == 4
    assert lanes_for(10 * LANE_BYTES, 1) == 1


def test_a_backup_read_over_several_connections(tmp_path):
    """More than 2 x LANE_BYTES to read: three connections; the image holds every byte."""
    size = 2 * LANE_BYTES + 64 * MiB
    backups = tmp_path / "backups"
    with served("pattern", str(size)) as srv:
        pynbd("backup", "full", srv.uri, str(backups), "-C", "3")
        run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw",
             str(backups / "0000.qcow2"), srv.uri])
