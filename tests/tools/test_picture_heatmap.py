"""pynbd heatmap: log files of pynbd's and nbdkit's log filter drawn as pictures.

The same client run against both servers (each with --filter=log) gives the same
picture with --time=requests; colours are checked where known requests landed.
"""

from __future__ import annotations

import os

import pytest
from PIL import Image

from nbdtest import PYNBD, nbdsh, run, served
from pynbd.tools.heatmap import parse_log, read_log, touches
from pynbd.tools.picture import (
    ACCESS_READ,
    ACCESS_WRITE,
    ACCESS_ZERO,
    BACKGROUND,
    BOTH_COLOUR,
    HOLE,
    READ_COLOUR,
    WRITE_COLOUR,
    ZERO_COLOUR,
    HeatAnimation,
    HeatMap,
    heat_colour,
)

HEATMAP = [*PYNBD, "heatmap"]
MiB = 1 << 20

NBDKIT_LOG = """\
2020-08-06 02:07:23.080415 ListExports id=1 readonly=0 tls=0 ...
2020-08-06 02:07:23.080502 ...ListExports id=1 exports=("") return=0
2020-08-06 02:07:23.080712 connection=1 Connect export="" tls=0 size=0x400000 minsize=0x1 \
prefsize=0x200 maxsize=0xffffffff write=1 flush=1 rotational=0 trim=1 zero=2 fua=2 extents=1 \
cache=2 fast_zero=1
2020-08-06 02:07:23.080907 connection=1 Read id=1 offset=0x0 count=0x200 ...
2020-08-06 02:07:23.080927 connection=1 ...Read id=1 return=0
this line is not a log line at all
2020-08-06 02:07:24.080907 connection=1 Extents id=2 offset=0x0 count=0x10000 req_one=0 ...
2020-08-06 02:07:24.580907 connection=1 Write id=3 offset=0x100000 count=0x1000 fua=0 ...
2020-08-06 02:07:24.580999 connection=1 ...Write id=3 return=-1 error=ENOSPC
2020-08-06 02:07:25.080907 connection=1 Zero id=4 offset=0x200000 count=0x10000 trim=1 fua=0 fast=0 ...
2020-08-06 02:07:25.080907 connection=1 Trim id=5 offset=0x300000 count=0x10000 fua=0 ...
2020-08-06 02:07:25.080910 connection=1 Flush id=6 ...
2020-08-06 02:07:25.081255 connection=1 Disconnect transactions=6
"""


def test_parse_the_manual_example():
    log = parse_log(NBDKIT_LOG.splitlines())
    assert log.size == 0x400000
    assert [(a.time, a.kind, a.offset, a.count) for a in log.accesses] == [
        (0.0, ACCESS_READ, 0, 0x200), (1.5, ACCESS_WRITE, 0x100000, 0x1000),
        (2.0, ACCESS_ZERO, 0x200000, 0x10000), (2.0, ACCESS_ZERO, 0x300000, 0x10000)]
    assert touches(log, by_requests=False)[1][0] == 0.75
    assert [t[0] for t in touches(log, by_requests=True)] == [0, 1 / 3, 2 / 3, 1]
    # no Connect line: the size is where the furthest request ends
    assert parse_log(NBDKIT_LOG.splitlines()[3:]).size == 0x310000
    # parallel requests logged slightly out of time order: times count from the earliest
    swapped = parse_log(["2020-08-06 02:07:24.5 Write id=2 offset=0x0 count=0x200 ...",
                         "2020-08-06 02:07:24 Read id=1 offset=0x200 count=0x200 ..."])
    assert [a.time for a in swapped.accesses] == [0.5, 0.0] and swapped.duration == 0.5
    assert [t[0] for t in touches(swapped, by_requests=False)] == [1.0, 0.0]


# One client, run against each server: requests 0-4 are a write at 0, a read at
# 32M, a read and a write of one place (16M), a zero at 48M; 5-20 read the last 64K
# backwards. Drawn 10 cells across by request number, requests 2k and 2k+1 share
# column k (request 20 joins 18 and 19 in the last): column 1 holds the read and the
# write of 16M, the last column three reads in the last row (the busiest cell).
CLIENT = """
h.pwrite(b'w' * 4096, 0)
h.pread(65536, 32 << 20)
h.pread(4096, 16 << 20)
h.pwrite(b'v' * 4096, 16 << 20)
h.zero(1 << 20, 48 << 20)
for i in range(16):
    h.pread(4096, (64 << 20) - 4096 * (i + 1))
"""
REQUESTS = 21


def logged(tmp_path, server: str):
    log = tmp_path / server / "disk.log"
    log.parent.mkdir()
    with served("--filter=log", "memory", "64M", f"logfile={log}", server=server) as srv:
        nbdsh(srv.uri, CLIENT)
    return log


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("heat")
    return {server: logged(tmp, server) for server in ("pynbd", "nbdkit")}


def test_both_servers_logs_draw_the_same_picture(logs, tmp_path):
    pictures = {}
    for server, log in logs.items():
        out = tmp_path / f"{server}.png"
        run([*HEATMAP, "--time=requests", "--width=64", "--height=64", "--scale=3", str(log), str(out)])
        with Image.open(out) as img:
            pictures[server] = img.convert("RGB").tobytes()
    assert pictures["pynbd"] == pictures["nbdkit"]


def test_colours_where_the_requests_landed(logs, tmp_path):
    log = read_log(str(logs["pynbd"]))
    assert len(log.accesses) == REQUESTS and log.size == 64 * MiB
    out = tmp_path / "heat.png"
    run([*HEATMAP, "--time=requests", "--width=10", "--height=64", "--scale=4", str(logs["pynbd"]), str(out)])
    with Image.open(out) as img:
        img = img.convert("RGB")
    where = HeatMap(touches(log, True), log.size, None, "disk.log", 10, 64, 4)
    legend_room, margins = 480, 32
    assert img.size == where.image.size == (where.origin[0] + legend_room + margins,
                                            where.origin[1] + 64 * 4 + 4 * 18 + 16)
    assert img.tobytes() == where.image.tobytes()

    def at(request: int, offset: int):
        return img.getpixel(where.point(request / (REQUESTS - 1), offset))

    most = 3
    assert at(0, 0) == heat_colour([0, 1, 0], most)
    assert at(1, 32 * MiB) == heat_colour([1, 0, 0], most)
    assert at(2, 16 * MiB) == at(3, 16 * MiB) == heat_colour([1, 1, 0], most)  # one cell: both
    assert at(4, 48 * MiB + MiB // 2) == heat_colour([0, 0, 1], most)
    assert at(20, 64 * MiB - 1) == READ_COLOUR  # the busiest cell: full strength
    assert at(5, 64 * MiB - 1) == heat_colour([1, 0, 0], most)
    assert at(0, 16 * MiB) == at(2, 0) == at(REQUESTS - 1, 0) == BACKGROUND
    red, _, blue = heat_colour([0, 1, 0], most)
    assert red > blue  # writes look red, reads blue
    red, _, blue = heat_colour([1, 0, 0], most)
    assert blue > red
    assert heat_colour([1, 1, 0], 2) == BOTH_COLOUR and heat_colour([0, 0, 1], 1) == ZERO_COLOUR
    assert heat_colour([0, 5, 0], 2) == WRITE_COLOUR  # never stronger than full


def test_clock_time_is_the_default(logs, tmp_path):
    out = tmp_path / "clock.png"
    run([*HEATMAP, str(logs["nbdkit"]), str(out)])
    with Image.open(out) as img:
        assert img.size == HeatMap(touches(read_log(str(logs["nbdkit"])), False), 64 * MiB, 1.0).image.size


def test_gif_frames_show_each_slice(logs, tmp_path):
    out = tmp_path / "heat.gif"
    run([*HEATMAP, "--gif", "--frames=3", "--time=requests", str(logs["pynbd"]), str(out)])
    log = read_log(str(logs["pynbd"]))
    anim = HeatAnimation(touches(log, True), log.size, None, frames=3)
    with Image.open(out) as gif:
        assert gif.format == "GIF" and gif.n_frames == 3 and gif.info["loop"] == 0
        frames = []
        for n in range(3):
            gif.seek(n)
            frames.append(gif.convert("RGB"))
    assert frames[0].size == anim.frames[0].size

    def near(a, b):
        return max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 8  # GIF's palette may round

    point = anim.layout.point
    # frame 1 (requests 0-6): the write at 0, the read at 32M, the zero at 48M, both at 16M
    assert near(frames[0].getpixel(point(0)), WRITE_COLOUR)
    assert near(frames[0].getpixel(point(32 * MiB)), READ_COLOUR)
    assert near(frames[0].getpixel(point(48 * MiB)), ZERO_COLOUR)
    assert near(frames[0].getpixel(point(16 * MiB)), BOTH_COLOUR)
    assert near(frames[0].getpixel(point(60 * MiB)), HOLE)
    # later frames: those places are pale (touched earlier), the end of the disk is read
    later = frames[2].getpixel(point(0))
    assert not near(later, WRITE_COLOUR) and later[0] > later[2] and sum(later) > sum(WRITE_COLOUR)
    assert near(frames[2].getpixel(point(64 * MiB - 64 * 1024)), READ_COLOUR)  # request 20


def test_apng_is_the_same_animation_in_full_colour(logs, tmp_path):
    out = tmp_path / "heat.png"
    run([*HEATMAP, "--apng", "--frames=2", "--time=requests", str(logs["pynbd"]), str(out)])
    log = read_log(str(logs["pynbd"]))
    anim = HeatAnimation(touches(log, True), log.size, None, "disk.log", frames=2)
    with Image.open(out) as png:
        assert png.format == "PNG" and png.n_frames == 2
        for n in range(2):
            png.seek(n)
            assert png.convert("RGB").tobytes() == anim.frames[n].tobytes()
    result = run([*HEATMAP, "--apng", "--gif", str(logs["pynbd"]), str(out)], check=False)
    assert result.returncode == 2 and "not allowed with argument" in result.stderr.decode()


def test_bad_input_is_one_line(tmp_path):
    missing = tmp_path / "missing.log"
    result = run([*HEATMAP, str(missing), str(tmp_path / "x.png")], check=False)
    assert (result.returncode, result.stderr.decode()) == (
        1, f"pynbd heatmap: cannot read {missing}: No such file or directory\n")
    empty = tmp_path / "empty.log"
    empty.write_text("2020-08-06 02:07:23.080415 ListExports id=1 readonly=0 tls=0 ...\n\x00\xff garbage\n")
    result = run([*HEATMAP, str(empty), str(tmp_path / "x.png")], check=False)
    assert (result.returncode, result.stderr.decode()) == (
        1, f"pynbd heatmap: {empty}: no reads or writes in the log\n")
    good = tmp_path / "good.log"
    good.write_text(NBDKIT_LOG)
    for options in ([], ["--gif"]):
        bad = tmp_path / "no" / "dir.png"
        result = run([*HEATMAP, *options, str(good), str(bad)], check=False)
        assert (result.returncode, result.stderr.decode()) == (
            1, f"pynbd heatmap: cannot write {bad}: No such file or directory\n")
    result = run([*HEATMAP, "--width=1", str(good), str(tmp_path / "x.png")], check=False)
    assert result.returncode == 2
    assert "expected a whole number of at least 2, got '1'" in result.stderr.decode()
    assert not os.path.exists(tmp_path / "x.png")
