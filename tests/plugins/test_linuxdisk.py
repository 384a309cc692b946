"""linuxdisk plugin: ext2/3/4 from a directory in a GPT, read back with e2fsprogs, against nbdkit."""

from __future__ import annotations

import filecmp
import os

import pytest
from plugin_helpers import config_error, export_info
from test_tmpdisk import ext_summary

from filters.stack_helpers import BOTH
from nbdtest import run, served
from pynbd.formats.partition_table import list_partitions


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "hello.txt").write_text("hello from linuxdisk\n")
    (src / "sub" / "random.bin").write_bytes(os.urandom(300_000))
    (src / "sub" / "deeper" / "empty").touch()
    os.symlink("hello.txt", src / "link")
    os.link(src / "hello.txt", src / "hard.txt")
    return src


def served_fs(tmp_path, server: str, *args: str) -> str:
    """Copy the served disk, check it is one GPT partition, and return that partition as a file."""
    with served("linuxdisk", *args, server=server) as srv:
        info = export_info(srv.uri)
        disk = tmp_path / f"{server}.disk"
        run(["nbdcopy", srv.uri, str(disk)])
    assert info["is_read_only"] is True
    data = disk.read_bytes()
    (part,) = list_partitions(lambda off, n: data[off:off + n], len(data))
    assert part.scheme == "gpt" and part.start == 1 << 20
    fs = tmp_path / f"{server}.fs"
    fs.write_bytes(data[part.start:part.end])
    run(["e2fsck", "-fn", str(fs)])
    return str(fs)


def extract(fs: str, where) -> None:
    where.mkdir()
    run(["debugfs", "-R", f"rdump / {where}", fs])


def test_same_files_as_nbdkit(tmp_path, tree):
    summaries = []
    for server in BOTH:
        fs = served_fs(tmp_path, server, str(tree), "label=ROOTFS", "type=ext4")
        out = tmp_path / f"{server}.out"
        extract(fs, out)
        root = out / ""
        compare = filecmp.dircmp(tree, root, ignore=["lost+found"])
        assert not compare.left_only and not compare.right_only and not compare.diff_files
        assert filecmp.cmp(tree / "sub" / "random.bin", root / "sub" / "random.bin", shallow=False)
        assert os.readlink(root / "link") == "hello.txt"
        summary = ext_summary(fs)
        summaries.append((summary["Filesystem volume name"], "extent" in
                          summary["Filesystem features"]))
    assert summaries[0] == summaries[1] == ("ROOTFS", True)  # ext4's extents


def test_free_space_and_exact_size(tmp_path, tree):
    fs = served_fs(tmp_path, "pynbd", str(tree), "size=+20M")
    summary = ext_summary(fs)
    free_bytes = int(summary["Block count"]) * int(summary["Block size"])
    assert free_bytes >= 20 << 20
    fs = served_fs(tmp_path, "pynbd", f"dir={tree}", "size=16M", "type=ext3")
    assert os.path.getsize(fs) == 16 << 20
    assert "has_journal" in ext_summary(fs)["Filesystem features"]


@pytest.mark.parametrize("args, message", [
    (["DIR/nope"], "dir: DIR/nope: not a directory"),
    ([], "missing required parameter 'dir'"),
    (["DIR", "size=64K"], "mke2fs failed with exit status"),
    (["DIR", "size=lots"], "linuxdisk: size:"),
    (["DIR", "type=xfs"], "'xfs' is not one of ext2, ext3, ext4"),
])
def test_bad_input(tree, args, message):
    line = config_error("linuxdisk", *[a.replace("DIR", str(tree)) for a in args])
    assert message.replace("DIR", str(tree)) in line
