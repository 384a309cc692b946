"""pynbd copy against real servers and nbdcopy (libnbd's, the oracle).

Every copy's result is compared byte for byte with what nbdcopy produces
from the same source, across nbdkit, qemu-nbd (a qcow2 image made with
qemu-img), pynbd serve, files, pipes and captive servers. nbdkit's log
filter shows what reached the server (extents, zero requests, flushes,
connections). The bad-input cases are in test_copy_errors.py.
"""

from __future__ import annotations

import filecmp
import os
import random
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from nbdtest import PYNBD, run, served

MiB = 1024 * 1024
IMAGE_SIZE = 16 * MiB

needs_qemu = pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="qemu-nbd missing")


# ------------------------------------------------------------------ helpers

def pynbd_copy(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return run([*PYNBD, "copy", *args], check=check, **kw)


def nbdcopy(*args: str, **kw) -> subprocess.CompletedProcess:
    return run(["nbdcopy", *args], **kw)


def make_image(path: Path) -> Path:
    """A sparse 16 MiB image: random data, a pattern, allocated zeroes, holes."""
    rng = random.Random(8)
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
        f.seek(1 * MiB)
        f.write(rng.randbytes(2 * MiB))
        f.seek(5 * MiB + 100)
        f.write(b"pynbd copy " * 500)
        f.seek(8 * MiB)
        f.write(bytes(MiB))  # allocated, but zero: zero detection turns it into a hole
        f.seek(9 * MiB + 4096)
        f.write(rng.randbytes(8192) + bytes(8192) + rng.randbytes(100))
        f.seek(IMAGE_SIZE - MiB + 1)
        f.write(rng.randbytes(MiB - 1))
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    return make_image(tmp_path_factory.mktemp("copy") / "image.raw")


def same(a: Path, b: Path) -> bool:
    return filecmp.cmp(a, b, shallow=False)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def log_actions(path: Path) -> Counter:
    """How many of each request nbdkit's log filter saw (the call lines)."""
    counts: Counter = Counter()
    for line in path.read_text().splitlines():
        match = re.search(r"connection=\d+ (\w+) id=", line)
        if match:
            counts[match.group(1)] += 1
    return counts


def log_connections(path: Path) -> int:
    return len(set(re.findall(r"connection=(\d+) Connect ", path.read_text())))


def log_counts(path: Path, action: str) -> list[int]:
    return [int(c, 16) for c in re.findall(rf"{action} id=\d+ offset=0x\w+ count=(0x\w+)",
                                           path.read_text())]


# ------------------------------------------------------- files and servers

def test_file_to_file_matches_nbdcopy_and_stays_sparse(image, tmp_path):
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    pynbd_copy(str(image), str(ours))
    nbdcopy(str(image), str(theirs))
    assert same(ours, theirs) and same(ours, image)
    assert allocated(ours) < 6 * MiB  # the holes and the allocated zeroes stay holes


def test_existing_destination_file_is_truncated_to_the_source(image, tmp_path):
    dest = tmp_path / "dest.raw"
    dest.write_bytes(b"\xff" * (IMAGE_SIZE + MiB))
    pynbd_copy(str(image), str(dest))
    assert same(dest, image)


def test_file_onto_itself_is_left_intact(image, tmp_path):
    twin = tmp_path / "twin.raw"
    shutil.copyfile(image, twin)
    pynbd_copy(str(twin), str(twin))
    assert same(twin, image)


@pytest.mark.parametrize("server", ["nbdkit", "pynbd"])
def test_upload_and_download_match_nbdcopy(image, tmp_path, server):
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    with served("memory", "16M", server=server) as srv:
        pynbd_copy(str(image), srv.uri)
        nbdcopy(srv.uri, str(theirs))
        pynbd_copy(srv.uri, str(ours))
    assert same(theirs, image) and same(ours, image)


def test_between_two_servers(image, tmp_path):
    out = tmp_path / "out.raw"
    with served("memory", "16M", server="nbdkit") as a, served("memory", "20M") as b:
        nbdcopy(str(image), a.uri)
        pynbd_copy(a.uri, b.uri)
        nbdcopy(b.uri, str(out))
    assert out.read_bytes()[:IMAGE_SIZE] == image.read_bytes()
    assert out.read_bytes()[IMAGE_SIZE:] == bytes(4 * MiB)


def test_nbdkit_data_plugin_matches_nbdcopy(tmp_path):
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    data = '( 0x55 0xAA )*1000 @0x100000 "hello" @0x1FFFFF 1'
    with served("data", data, "size=3M", server="nbdkit") as srv:
        pynbd_copy(srv.uri, str(ours))
        nbdcopy(srv.uri, str(theirs))
    assert same(ours, theirs)
    assert ours.stat().st_size == 3 * MiB


@needs_qemu
def test_qcow2_through_captive_qemu_nbd_matches_qemu_img(image, tmp_path):
    qcow2, ours, theirs, converted = (tmp_path / n for n in
                                      ("d.qcow2", "ours.raw", "theirs.raw", "conv.raw"))
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(image), str(qcow2)])
    pynbd_copy("--", "[", "qemu-nbd", "-r", "-f", "qcow2", str(qcow2), "]", str(ours))
    nbdcopy("--", "[", "qemu-nbd", "-r", "-f", "qcow2", str(qcow2), "]", str(theirs))
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(qcow2), str(converted)])
    assert same(ours, theirs) and same(ours, converted) and same(ours, image)


@needs_qemu
def test_captive_servers_at_both_ends(image, tmp_path):
    qcow2, out = tmp_path / "d.qcow2", tmp_path / "out.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(image), str(qcow2)])
    out.write_bytes(b"\x01" * IMAGE_SIZE)
    pynbd_copy("--", "[", "qemu-nbd", "-r", "-f", "qcow2", str(qcow2), "]",
               "[", "nbdkit", "file", str(out), "]")
    assert same(out, image)
    leftovers = run(["pgrep", "-f", f"qemu-nbd -r -f qcow2 {qcow2}"], check=False)
    assert leftovers.stdout == b""


@pytest.fixture
def loop_device(tmp_path):
    """A 16 MiB loop device full of 0xff bytes (root and losetup needed)."""
    backing = tmp_path / "loop.img"
    backing.write_bytes(b"\xff" * IMAGE_SIZE)
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("loop devices need root and losetup")
    made = run(["losetup", "-f", "--show", str(backing)], check=False)
    if made.returncode != 0:
        pytest.skip(f"losetup failed: {made.stderr.decode().strip()}")
    device = made.stdout.decode().strip()
    try:
        yield Path(device)
    finally:
        run(["losetup", "-d", device], check=False)


def test_block_device_both_ways(image, tmp_path, loop_device):
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    pynbd_copy(str(image), str(loop_device))  # its 0xff bytes are zeroed where the image has none
    assert loop_device.read_bytes() == image.read_bytes()  # filecmp refuses devices
    pynbd_copy(str(loop_device), str(ours))
    nbdcopy(str(loop_device), str(theirs))
    assert same(ours, theirs) and same(ours, image)


# ------------------------------------------------------------------ streams

def test_stdout_matches_nbdcopy(image):
    with served("memory", "16M") as srv:
        nbdcopy(str(image), srv.uri)
        ours = pynbd_copy(srv.uri, "-").stdout
        theirs = nbdcopy(srv.uri, "-").stdout
    assert ours == theirs == image.read_bytes()


def test_stdin_to_server_and_to_file(image, tmp_path):
    out, back = tmp_path / "out.raw", tmp_path / "back.raw"
    data = image.read_bytes()
    pynbd_copy("-", str(out), input=data)
    assert same(out, image)
    with served("memory", "16M", server="nbdkit") as srv:
        pynbd_copy("-", srv.uri, input=data[:IMAGE_SIZE - 1000])
        nbdcopy(srv.uri, str(back))
    assert back.read_bytes() == data[:IMAGE_SIZE - 1000] + bytes(1000)


def test_pipe_source_of_unaligned_length(tmp_path):
    out = tmp_path / "out.raw"
    data = os.urandom(300_001)
    pynbd_copy("-", str(out), input=data)
    assert out.read_bytes() == data


def test_null_destination_reads_everything(tmp_path):
    log = tmp_path / "log"
    with served("--filter=log", "pattern", "8M", f"logfile={log}", server="nbdkit") as srv:
        pynbd_copy("--no-extents", srv.uri, "null:")
    assert sum(log_counts(log, "Read")) == 8 * MiB


# -------------------------------------------------------- sparse-random disks

def test_sparse_random_onto_itself_nbdkit():
    with served("sparse-random", "8G", server="nbdkit") as srv:
        pynbd_copy(srv.uri, srv.uri)


@pytest.mark.skipif(not Path(__file__).parents[2].joinpath(
    "src/pynbd/plugins/sparse_random.py").exists(), reason="no sparse-random plugin")
def test_sparse_random_onto_itself_pynbd():
    with served("sparse-random", "4G") as srv:
        pynbd_copy(srv.uri, srv.uri)


def test_sparse_random_corruption_is_caught():
    """The oracle itself: writing anything else than what was read fails."""
    shape = ("percent=50", "runlength=1048576")
    with served("sparse-random", "64M", "seed=1", *shape, server="nbdkit") as a, \
         served("sparse-random", "64M", "seed=2", *shape, server="nbdkit") as b:
        result = pynbd_copy(a.uri, b.uri, check=False)
    assert result.returncode == 1
    assert "Input/output error" in result.stderr.decode()


# ----------------------------------------------------------- sparseness options

def test_allocated_fills_the_destination(image, tmp_path):
    dense = tmp_path / "dense.raw"
    pynbd_copy("--allocated", str(image), str(dense))
    assert same(dense, image)
    assert allocated(dense) >= IMAGE_SIZE


def test_zeroes_become_zero_requests_not_writes(tmp_path):
    log = tmp_path / "log"
    with served("--filter=log", "memory", "8M", f"logfile={log}", server="nbdkit") as dst:
        run(["nbdsh", "-u", dst.uri, "-c", "h.pwrite(b'x' * 8*1024*1024, 0)"])
        pynbd_copy("--no-extents", "--", "[", "nbdkit", "null", "8M", "]", dst.uri)
        pynbd_copy("--allocated", "--", "[", "nbdkit", "null", "8M", "]", dst.uri)
    actions = log_actions(log)
    assert actions["Write"] == 1  # only the nbdsh fill
    assert actions["Zero"] >= 2
    text = log.read_text()
    assert "trim=1" in text  # zero detection: the server may punch holes
    assert "trim=0" in text  # --allocated: NO_HOLE


def test_destination_is_zero_skips_zero_ranges(image, tmp_path):
    out = tmp_path / "out.raw"
    with served("memory", "16M", server="nbdkit") as dst:
        run(["nbdsh", "-u", dst.uri, "-c", "h.pwrite(b'\\xee' * 16*1024*1024, 0)"])
        pynbd_copy("--destination-is-zero", str(image), dst.uri)
        nbdcopy(dst.uri, str(out))
    got = out.read_bytes()
    assert got[MiB:3 * MiB] == image.read_bytes()[MiB:3 * MiB]
    assert got[:MiB] == b"\xee" * MiB  # a hole of the source: trusted to be zero, not written


def test_fresh_destination_gets_no_zero_requests(image, tmp_path):
    log = tmp_path / "log"
    with served("--filter=log", "memory", "16M", f"logfile={log}", server="nbdkit") as dst:
        pynbd_copy(str(image), dst.uri)
    actions = log_actions(log)
    assert actions["Zero"] == 0 and actions["Write"] > 0


def test_no_extents_asks_for_none(image, tmp_path):
    log = tmp_path / "log"
    with served("--filter=log", "file", str(image), f"logfile={log}", server="nbdkit") as srv:
        pynbd_copy(srv.uri, "null:")
        with_extents = log_actions(log)["Extents"]
        log.write_text("")
        pynbd_copy("--no-extents", srv.uri, "null:")
        without = log_actions(log)["Extents"]
    assert with_extents > 0 and without == 0


# ----------------------------------------------------------- other options

def test_flush_only_when_asked(image, tmp_path):
    log = tmp_path / "log"
    with served("--filter=log", "memory", "16M", f"logfile={log}", server="nbdkit") as dst:
        pynbd_copy(str(image), dst.uri)
        assert log_actions(log)["Flush"] == 0
        pynbd_copy("--flush", str(image), dst.uri)
        assert log_actions(log)["Flush"] >= 1


@pytest.mark.parametrize("options,expected", [
    (("-T", "8"), 4), (("-C", "2", "-T", "8"), 2), (("--connections=1",), 1),
    (("--synchronous", "-T", "8"), 1), (("-C", "4", "-T", "3"), 3),
    ((), min(4, len(os.sched_getaffinity(0)))),
])
def test_connections(image, tmp_path, options, expected):
    """As many connections as nbdcopy opens with the same options."""
    counts = []
    for tool in (pynbd_copy, nbdcopy):
        log = tmp_path / f"log-{tool.__name__}"
        with served("--filter=log", "memory", "16M", f"logfile={log}", server="nbdkit") as dst:
            tool(*options, str(image), dst.uri)
        counts.append(log_connections(log))
    assert counts == [expected, expected]


def test_one_connection_without_multi_conn(image, tmp_path):
    log = tmp_path / "log"
    with served("--filter=log", "--filter=multi-conn", "memory", "16M", f"logfile={log}",
                "multi-conn-mode=disable", server="nbdkit") as dst:
        pynbd_copy("-C", "4", str(image), dst.uri)
    assert log_connections(log) == 1


def test_request_size_and_synchronous_order(image, tmp_path):
    log = tmp_path / "log"
    with served("--filter=log", "memory", "16M", f"logfile={log}", server="nbdkit") as dst:
        pynbd_copy("--synchronous", "--request-size=64K", str(image), dst.uri)
    offsets = [int(o, 16) for o in re.findall(r"Write id=\d+ offset=(0x\w+)", log.read_text())]
    assert max(log_counts(log, "Write")) == 64 * 1024
    assert offsets == sorted(offsets)


def test_progress_fd_lines(image, tmp_path):
    progress = tmp_path / "progress"
    with open(progress, "w") as f:
        subprocess.run([*PYNBD, "copy", f"--progress={f.fileno()}", "--request-size=64K",
                        str(image), "null:"], check=True, pass_fds=(f.fileno(),))
    lines = progress.read_text().splitlines()
    values = [int(line.removesuffix("/100")) for line in lines]
    assert all(re.fullmatch(r"\d+/100", line) for line in lines)
    assert values[0] == 0 and values[-1] == 100 and values == sorted(values)
    assert len(values) > 3


def test_progress_bar_on_stderr(image):
    result = pynbd_copy("-p", str(image), "null:")
    assert "100%" in result.stderr.decode()
    assert result.stderr.decode().endswith("\n")


def test_verbose_help_version(image):
    verbose = pynbd_copy("-v", str(image), "null:").stderr.decode()
    assert "source: " in verbose and "bytes in" in verbose
    assert "--destination-is-zero" in pynbd_copy("--help").stdout.decode()
    assert pynbd_copy("-V").stdout.decode().startswith("pynbd copy ")
