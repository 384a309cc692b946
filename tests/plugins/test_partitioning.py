"""partitioning plugin: MBR (with logical partitions) and GPT built like nbdkit's, byte for byte."""

from __future__ import annotations

import os
import re

import pytest
from plugin_helpers import config_error, extent_map

from filters.stack_helpers import BOTH
from nbdtest import nbdsh, run, served
from pynbd.formats.partition_table import list_partitions


@pytest.fixture
def parts(tmp_path, monkeypatch):
    """a.img (3 MiB sparse, data at 1 MiB), b.img (1000 random bytes), c.img (8 KiB of C)."""
    monkeypatch.chdir(tmp_path)
    with open("a.img", "wb") as f:
        f.truncate(3 << 20)
        f.seek(1 << 20)
        f.write(b"A" * 4096)
    with open("b.img", "wb") as f:
        f.write(os.urandom(1000))
    with open("c.img", "wb") as f:
        f.write(b"C" * 8192)
    return tmp_path


def copy_both(tmp_path, *args):
    """The disk as nbdkit and pynbd serve it (files written in tmp_path)."""
    images = []
    for server in BOTH:
        with served("partitioning", *args, server=server) as srv:
            image = tmp_path / f"{server}.out"
            run(["nbdcopy", srv.uri, str(image)])
            images.append(image.read_bytes())
    return images


def sfdisk_dump(data: bytes, tmp_path) -> str:
    """``sfdisk -d`` of an image without the random unique GUIDs (checks GPT's CRCs too)."""
    image = tmp_path / "dump.img"
    image.write_bytes(data)
    result = run(["sfdisk", "-d", str(image)])
    assert b"CRC" not in result.stderr and b"corrupt" not in result.stderr.lower(), result.stderr
    return re.sub(r"uuid=[0-9A-F-]+, ", "", result.stdout.decode())


@pytest.mark.parametrize("args", [
    ["a.img", "b.img"],
    ["partition-type=mbr", "alignment=512", "a.img", "mbr-id=0x82", "b.img", "c.img", "mbr-id=7",
     "a.img", "b.img", "mbr-id=default", "file=c.img"],
], ids=["primary", "logical"])
def test_mbr_same_bytes_as_nbdkit(parts, args):
    pynbd, nbdkit = copy_both(parts, *args)[::-1]
    assert pynbd == nbdkit
    found = list_partitions(lambda off, n: pynbd[off:off + n], len(pynbd))
    assert found[0].length == 3 << 20
    assert pynbd[found[0].start + (1 << 20):][:4096] == b"A" * 4096
    assert pynbd[found[1].start:][:1000] == open(parts / "b.img", "rb").read()


def test_gpt_like_nbdkit(parts):
    args = ["partition-type=gpt", "alignment=4K", "a.img",
            "type-guid=C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "b.img", "type-guid=default", "c.img"]
    nbdkit, pynbd = copy_both(parts, *args)
    assert len(pynbd) == len(nbdkit)
    assert sfdisk_dump(pynbd, parts) == sfdisk_dump(nbdkit, parts)
    assert "type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B" in sfdisk_dump(pynbd, parts)
    first = list_partitions(lambda off, n: pynbd[off:off + n], len(pynbd))[0]
    assert pynbd[first.start:first.start + (3 << 20)] == open(parts / "a.img", "rb").read()


def test_more_than_four_files_means_gpt(parts):
    with served("partitioning", *["c.img"] * 5) as srv:
        assert nbdsh(srv.uri, "print(bytes(h.pread(8, 512)))").strip() == "b'EFI PART'"


def test_writes_reach_the_files_table_is_protected(parts):
    with served("partitioning", "a.img", "b.img") as srv:
        extents = extent_map(srv.uri)
        out = nbdsh(srv.uri, """
import errno
h.pwrite(b'new data', 2048 * 512 + 100)
h.pwrite(h.pread(512, 0), 0)               # the same table bytes: accepted
h.pwrite(bytes(512), 1024)                 # zeroes into padding: accepted
for offset, what in ((0, b'x' * 512), (1024, b'x' * 512)):
    try:
        h.pwrite(what, offset)
    except nbd.Error as e:
        print(e.errno)
h.flush()
""")
    assert out.split() == ["EIO", "EIO"]
    assert open(parts / "a.img", "rb").read()[100:108] == b"new data"
    assert extents[:2] == [(0, 512, 0), (512, (2048 + 2048) * 512 - 512, 3)]  # padding + a.img hole


@pytest.mark.parametrize("args, message", [
    ([], "at least one file= parameter"),
    (["nope.img"], "nope.img: No such file or directory"),
    (["empty.img"], "zero length partitions are not allowed"),
    (["partition-type=apm", "a.img"], "unknown partition-type: apm"),
    (["alignment=100", "a.img"], "alignment: 100 should be a multiple"),
    (["alignment=2M", "a.img"], "alignment: 2097152 should be"),
    (["mbr-id=0x100", "a.img"], "mbr-id: '0x100' is out of range"),
    (["type-guid=xyz", "a.img"], "could not validate GUID: xyz"),
    (["foo=bar", "a.img"], "unknown parameter 'foo'"),
])
def test_bad_input(parts, args, message):
    (parts / "empty.img").touch()
    assert message in config_error("partitioning", *args)
