"""floppy plugin: a FAT disk from a directory, checked with dosfstools and mtools, against nbdkit."""

from __future__ import annotations

import os
import re

import pytest
from plugin_helpers import config_error, export_info

from filters.stack_helpers import BOTH
from nbdtest import run, served
from pynbd.formats.partition_table import list_partitions

MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    (src / "Sub Dir").mkdir(parents=True)
    (src / "hello.txt").write_text("hello from floppy\n")
    (src / "A Long File Name.data").write_bytes(os.urandom(70_000))
    (src / "Sub Dir" / "inner.bin").write_bytes(b"\x01" * 5000)
    os.symlink("hello.txt", src / "link")  # skipped, as nbdkit does
    return src


def served_fat(tmp_path, server: str, *args: str):
    """(disk file, partition) of the served disk, its FAT checked by fsck.fat."""
    with served("floppy", *args, server=server) as srv:
        assert export_info(srv.uri)["is_read_only"] is True
        disk = tmp_path / f"{server}.disk"
        run(["nbdcopy", srv.uri, str(disk)])
    data = disk.read_bytes()
    (part,) = list_partitions(lambda off, n: data[off:off + n], len(data))
    fs = tmp_path / f"{server}.fat"
    fs.write_bytes(data[part.start:part.end])
    return disk, part, fsck_files(fs, strict=server == "pynbd")


def fsck_files(fs, strict: bool) -> set[str]:
    """The paths fsck.fat -l checks, long names where there are, lower-cased.

    (nbdkit 1.32's FAT32 of a few clusters has a bad '..' in subdirectories:
    fsck.fat -n exits 1 on it, so only pynbd's is held to a clean check.)"""
    out = run(["fsck.fat", "-n", "-l", str(fs)], check=strict).stdout.decode()
    return {name.lower() for name in re.findall(r"^Checking file (/\S.*?)(?: \(.*\))?$", out, re.M)}


def test_same_files_as_nbdkit(tmp_path, tree):
    found = [served_fat(tmp_path, server, str(tree))[2] for server in BOTH]
    assert found[0] == found[1]
    assert {"/hello.txt", "/a long file name.data", "/sub dir/inner.bin"} <= found[0]
    assert not any("link" in name for name in found[0])


def test_files_read_back_with_mtools(tmp_path, tree):
    disk, part, _ = served_fat(tmp_path, "pynbd", str(tree), "label=DRIVERS")
    image = f"{disk}@@{part.start}"
    out = tmp_path / "out"
    out.mkdir()
    run(["mcopy", "-s", "-i", image, "::/*", str(out)], env=MTOOLS_ENV)
    assert (out / "hello.txt").read_text() == "hello from floppy\n"
    assert (out / "A Long File Name.data").read_bytes() == (tree / "A Long File Name.data").read_bytes()
    assert (out / "Sub Dir" / "inner.bin").read_bytes() == b"\x01" * 5000
    label = run(["mlabel", "-s", "-i", image], env=MTOOLS_ENV).stdout.decode()
    assert "DRIVERS" in label
    assert part.type == "0x01"  # FAT12 for a small disk


def test_size_and_fat32(tmp_path, tree):
    disk, part, _ = served_fat(tmp_path, "pynbd", str(tree), "size=300M")
    assert part.length == 300 << 20 and part.type == "0x0c"


@pytest.mark.parametrize("args, message", [
    (["DIR/nope"], "not a directory"),
    ([], "missing required parameter 'dir'"),
    (["DIR", "label=TWELVECHARSX"], "is not 1 to 11 ASCII characters"),
    (["DIR", "size=64K"], "failed with exit status"),
    (["DIR", "size=huge"], "floppy: size:"),
])
def test_bad_input(tree, args, message):
    assert message in config_error("floppy", *[a.replace("DIR", str(tree)) for a in args])
