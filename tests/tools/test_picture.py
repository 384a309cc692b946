"""pynbd info --map --png: the picture's size and its colours at known offsets.

Servers: pynbd's and nbdkit's memory plugins (the same writes draw the same
picture), qemu-nbd over qcow2 images (allocated zero clusters, a dirty bitmap).
"""

from __future__ import annotations

import json
import subprocess

import pytest
from PIL import Image

from nbdtest import PYNBD, nbdsh, run, served
from pynbd.proto.constants import BASE_ALLOCATION
from pynbd.tools.picture import (
    DATA,
    DIRTY,
    HOLE,
    LINE,
    MARGIN,
    ZERO,
    AllocationPicture,
    approx_size,
    cell_range,
    hilbert_order,
    hilbert_point,
    paint,
    percent,
)

BOTH = ("pynbd", "nbdkit")
INFO = [*PYNBD, "info"]
KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize("side", [1, 2, 16, 64])
def test_the_hilbert_curve_visits_every_cell_once_in_steps_of_one(side):
    order = hilbert_order(side)
    assert sorted(order) == list(range(side * side))
    points = [hilbert_point(side, d) for d in range(side * side)]
    assert points[0] == (0, 0) and points[-1] == (side - 1, 0)
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        assert abs(x1 - x0) + abs(y1 - y0) == 1
    assert all(order[y * side + x] == d for d, (x, y) in enumerate(points))


def test_cells_and_ranks():
    assert cell_range(0, 1, 1 << 40, 65536) == (0, 1)  # 1 byte still touches one cell
    assert cell_range(10, 0, 100, 10) == (1, 1)
    assert cell_range(0, 100, 100, 10) == (0, 10)
    assert cell_range(15, 10, 100, 10) == (1, 3)
    # data (rank 3) wins a cell it shares with a hole (rank 0), whatever the order
    runs = [(0, 5, 3), (5, 1, 0), (6, 94, 3)]
    assert paint(runs, 100, 10, {3: 0, 0: 3}, {3: 1, 0: 2}) == bytes([2] + [1] * 9)
    assert percent(4 * MiB, TiB) == "0.0004%" and percent(1, 8) == "12.5%" and percent(0, 3) == "0.0%"
    assert [approx_size(n) for n in (0, 512, 100001 / 65536, 1536, TiB, 5 << 60)] == [
        "0 B", "512 B", "1.5 B", "1.5 KiB", "1 TiB", "5120 PiB"]


def draw(uri_or_captive: list[str], out, *options: str) -> Image.Image:
    run([*INFO, "--map", *options, "--png", str(out), *uri_or_captive])
    with Image.open(out) as img:
        assert img.format == "PNG"
        return img.convert("RGB")


def geometry(size: int, context: str = BASE_ALLOCATION) -> AllocationPicture:
    """A picture of the same size drawn in-process: where offsets land."""
    return AllocationPicture(size, [(0, size, 3)], context)


WRITES = "h.pwrite(b'x' * 65536, 0); h.pwrite(b'y' * (1 << 20), 5 << 20); h.zero(1 << 20, 8 << 20)"


@pytest.mark.parametrize("server", BOTH)
def test_a_10_mib_disk(tmp_path, server):
    with served("memory", "10M", server=server) as srv:
        nbdsh(srv.uri, WRITES)
        img = draw([srv.uri], tmp_path / "map.png")
        found = json.loads(run([*INFO, "--map", "--json", srv.uri]).stdout)
    where = geometry(10 * MiB)
    assert img.size == (2 * MARGIN + 512, where.image.height + LINE)  # two kinds in the legend, not one
    for offset in (0, 60 * KiB, 5 * MiB, 5 * MiB + 700 * KiB, 6 * MiB - 1):
        assert img.getpixel(where.point(offset)) == DATA, offset
        assert img.getpixel(where.strip_point(offset)) == DATA, offset
    for offset in (64 * KiB + 200, 3 * MiB, 6 * MiB + 200, 8 * MiB + 1, 10 * MiB - 1):
        assert img.getpixel(where.point(offset)) == HOLE, offset
    # the same map drawn in-process gives the same picture, and its legend the exact shares
    runs = [(e["offset"], e["length"], e["type"]) for e in found]
    again = AllocationPicture(10 * MiB, runs, BASE_ALLOCATION, srv.uri)
    assert again.image.tobytes() == img.tobytes()
    assert [(s.words, s.length) for s in again.shares] == [("data", 65536 + MiB),
                                                           ("hole,zero", 10 * MiB - 65536 - MiB)]


def test_a_1_tib_sparse_disk_shows_4_kib_of_data(tmp_path):
    written = [0, 300 * GiB, 700 * GiB + 123 * MiB, TiB - 4 * KiB]
    with served("memory", "1T") as srv:
        nbdsh(srv.uri, "".join(f"h.pwrite(b'd' * 4096, {o});" for o in written))
        img = draw([srv.uri], tmp_path / "big.png")
    where = geometry(TiB)
    for offset in written:
        assert img.getpixel(where.point(offset)) == DATA
        assert img.getpixel(where.strip_point(offset)) == DATA
    for offset in (GiB, 500 * GiB, TiB - 100 * MiB):
        assert img.getpixel(where.point(offset)) == HOLE


def qcow2(path, *qemu_io: str, options: str = "") -> None:
    run(["qemu-img", "create", "-q", "-f", "qcow2", *(["-o", options] if options else []), str(path), "10M"])
    if qemu_io:
        run(["qemu-io", "-f", "qcow2", *(a for c in qemu_io for a in ("-c", c)), str(path)])


def test_allocated_zeroes_from_qemu_nbd(tmp_path):
    disk = tmp_path / "z.qcow2"
    qcow2(disk, "write -P 1 1M 64k", options="preallocation=metadata")
    img = draw(["--", "[", "qemu-nbd", "-r", "-f", "qcow2", str(disk), "]"], tmp_path / "z.png")
    where = geometry(10 * MiB)
    assert img.getpixel(where.point(MiB + 32 * KiB)) == DATA
    assert img.getpixel(where.point(0)) == ZERO
    assert img.getpixel(where.point(9 * MiB)) == ZERO


@pytest.mark.parametrize("server", ["qemu-nbd", "pynbd cbt"])
def test_a_dirty_bitmap(tmp_path, server):
    context = "qemu:dirty-bitmap:b0"
    if server == "qemu-nbd":
        disk = tmp_path / "d.qcow2"
        qcow2(disk)
        run(["qemu-img", "bitmap", "--add", str(disk), "b0"])
        run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 1M 64k", "-c", "write -z 4M 1M", str(disk)])
        img = draw(["--", "[", "qemu-nbd", "-r", "-B", "b0", "-f", "qcow2", str(disk), "]"],
                   tmp_path / "d.png", f"--map={context}")
    else:
        ctl = tmp_path / "ctl"
        with served("--filter=cbt", "memory", "10M", f"bitmap-dir={tmp_path / 'bitmaps'}",
                    options=("--control", str(ctl))) as srv:
            run([*PYNBD, "ctl", str(ctl), "checkpoint", "create", "b0"])
            nbdsh(srv.uri, "h.pwrite(b'x' * 65536, 1 << 20); h.zero(1 << 20, 4 << 20)")
            img = draw([srv.uri], tmp_path / "d.png", f"--map={context}")
    where = geometry(10 * MiB, context)
    for offset in (MiB, 4 * MiB + 512 * KiB):
        assert img.getpixel(where.point(offset)) == DIRTY
    for offset in (0, 3 * MiB, 9 * MiB):
        assert img.getpixel(where.point(offset)) == HOLE


@pytest.mark.parametrize("options, message", [
    (["--png", "x.png"], "--png needs --map"),
    (["--map", "--totals", "--png", "x.png"], "--png needs --map"),
    (["--map", "--json", "--png", "x.png"], "--png needs --map"),
])
def test_png_needs_a_plain_map(tmp_path, options, message):
    with served("memory", "1M") as srv:
        result = run([*INFO, *options, srv.uri], check=False)
    assert result.returncode != 0 and message in result.stderr.decode()
    assert "Traceback" not in result.stderr.decode()
    assert not (tmp_path / "x.png").exists()


def test_unwritable_file_and_empty_export_are_one_line_errors(tmp_path):
    with served("memory", "1M") as srv:
        bad = tmp_path / "no" / "such" / "dir.png"
        result = run([*INFO, "--map", "--png", str(bad), srv.uri], check=False)
        assert result.returncode == 1
        assert result.stderr.decode() == f"pynbd info: cannot write {bad}: No such file or directory\n"
        run(["nbdinfo", "--size", srv.uri])  # the server is still serving
    with served("memory", "0") as srv:
        result = run([*INFO, "--map", "--png", str(tmp_path / "e.png"), srv.uri], check=False)
        assert result.returncode == 1
        assert "the export is empty" in result.stderr.decode()
        assert result.stderr.decode().count("\n") == 1


def test_without_pillow_the_error_says_how_to_get_it(tmp_path):
    code = ("import sys; sys.modules['PIL'] = None; from pynbd.tools import info; "
            "sys.exit(info.main(['--map', '--png', 'x.png', 'nbd://localhost']))")
    result = subprocess.run([PYNBD[0], "-c", code], capture_output=True, cwd=tmp_path)
    assert (result.returncode, result.stderr) == (
        1, b"pynbd info: --png needs Pillow: pip install 'pynbd[pictures]'\n")
