"""pynbd copy --dirty-bitmap and pynbd info --map=qemu:dirty-bitmap:NAME against qemu-nbd -B.

qemu is the oracle: a qcow2 image with a persistent bitmap (qemu-img bitmap
--add) records every write qemu-io makes afterwards, and qemu-nbd -B serves
it as the meta context ``qemu:dirty-bitmap:NAME``. A copy of the image taken
when the bitmap started, updated with only the dirty ranges, must equal the
image now; ranges that did not change must be left untouched on the target.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from nbdtest import PYNBD, run, served, wait_for_socket
from pynbd.process import stop_process
from pynbd.tools.copying.dirty import CLEAN, DATA, ZERO, classify, union

pytestmark = pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="qemu-nbd missing")

MiB = 1024 * 1024
SIZE = 64 * MiB
GARBAGE = b"\xee" * 4096  # planted in an unchanged range of the target: must survive


def qemu_io(image: Path, *commands: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    run([*args, str(image)])


def to_raw(image: Path, raw: Path) -> None:
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw)])


@pytest.fixture
def changed(tmp_path: Path) -> dict[str, Path]:
    """An image with data, its raw copy when bitmap b0 started, and the image after changes."""
    image = tmp_path / "disk.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", str(image), str(SIZE)])
    qemu_io(image, "write -P 7 0 8M", "write -P 9 40M 2M")
    run(["qemu-img", "bitmap", "--add", str(image), "b0"])
    before = tmp_path / "before.raw"
    to_raw(image, before)
    qemu_io(image, "write -P 1 1M 64K", "write -P 2 10M 4K", "write -z 4M 128K",
            "write -P 3 30M 1M", "discard 40M 1M", "write -P 4 63M 1M")
    after = tmp_path / "after.raw"
    to_raw(image, after)
    return {"image": image, "before": before, "after": after}


def qemu_nbd(image: Path, sock: Path, *options: str) -> subprocess.Popen:
    proc = subprocess.Popen(["qemu-nbd", "-r", "-t", "-f", "qcow2", *options, "-k", str(sock),
                             str(image)], stderr=subprocess.PIPE)
    wait_for_socket(str(sock), proc)
    return proc


def pynbd(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([*PYNBD, *args], check=check)


def plant_garbage(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(20 * MiB)  # nothing there changed
        f.write(GARBAGE)


def expected_with_garbage(after: Path) -> bytes:
    data = bytearray(after.read_bytes())
    data[20 * MiB:20 * MiB + len(GARBAGE)] = GARBAGE
    return bytes(data)


@pytest.mark.parametrize("connections", ["1", "4"])
def test_dirty_copy_updates_a_file_copy(changed, tmp_path, connections):
    target = tmp_path / "target.raw"
    shutil.copy(changed["before"], target)
    plant_garbage(target)
    sock = tmp_path / "sock"
    proc = qemu_nbd(changed["image"], sock, "-B", "b0", "-e", "4")
    try:
        result = pynbd("copy", "-v", "-C", connections, "--dirty-bitmap=b0",
                       f"nbd+unix:///?socket={sock}", str(target))
    finally:
        stop_process(proc)
    assert target.read_bytes() == expected_with_garbage(changed["after"])
    summary = result.stderr.decode().splitlines()[-1]
    assert "unchanged" in summary and " 0 unchanged" not in summary


def test_dirty_copy_from_a_captive_server_into_an_nbd_target(changed, tmp_path):
    target = tmp_path / "target.raw"
    shutil.copy(changed["before"], target)
    plant_garbage(target)
    with served("file", str(target)) as dst:
        pynbd("copy", "--dirty-bitmap", "b0", "--", "[", "qemu-nbd", "-r", "-f", "qcow2", "-B", "b0",
              str(changed["image"]), "]", dst.uri)
    assert target.read_bytes() == expected_with_garbage(changed["after"])


def test_info_map_of_a_dirty_bitmap_matches_nbdinfo(changed, tmp_path):
    sock = tmp_path / "sock"
    proc = qemu_nbd(changed["image"], sock, "-B", "b0")
    uri = f"nbd+unix:///?socket={sock}"
    try:
        for extra in ([], ["--totals"]):
            ours = pynbd("info", "--map=qemu:dirty-bitmap:b0", *extra, uri).stdout
            theirs = run(["nbdinfo", "--map=qemu:dirty-bitmap:b0", *extra, uri]).stdout
            assert ours == theirs
        assert b"dirty" in ours
    finally:
        stop_process(proc)


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_refusals(changed, tmp_path):
    target = tmp_path / "target.raw"
    shutil.copy(changed["before"], target)
    sock = tmp_path / "sock"
    proc = qemu_nbd(changed["image"], sock, "-B", "b0")
    uri = f"nbd+unix:///?socket={sock}"
    try:
        one_line_error(pynbd("copy", "--dirty-bitmap=nope", uri, str(target), check=False),
                       "qemu:dirty-bitmap:nope")
        # the server still serves other clients
        pynbd("copy", "--dirty-bitmap=b0", uri, str(target))
    finally:
        stop_process(proc)
    assert target.read_bytes() == changed["after"].read_bytes()
    one_line_error(pynbd("copy", "--dirty-bitmap=b0", str(changed["before"]), str(target),
                         check=False), "needs an NBD source")
    one_line_error(pynbd("copy", "--dirty-bitmap=", uri, str(target), check=False),
                   "--dirty-bitmap")


def test_classify_and_union_sweep_runs():
    extents = [(0, 100, False), (100, 50, True), (150, 50, False)]
    changes = [(0, 40, False), (40, 80, True), (120, 100, False)]
    assert list(classify(extents, changes)) == [
        (0, 40, CLEAN), (40, 60, DATA), (100, 20, ZERO), (120, 80, CLEAN)]
    assert union([[(0, 10, False), (10, 10, True)], [(0, 5, True), (5, 30, False)]]) == [
        (0, 5, True), (5, 5, False), (10, 10, True)]
    assert list(classify([], changes)) == [] and union([]) == []
