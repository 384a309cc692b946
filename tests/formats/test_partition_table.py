"""MBR/GPT parsing through a read callable: tables built with struct and with sfdisk."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess

import pytest

from filters.stack_helpers import make_gpt, make_mbr
from pynbd.formats.partition_table import (
    PartitionError,
    detect,
    find_partition,
    list_partitions,
)

MiB = 1 << 20


def reader(path: str):
    data = open(path, "rb").read()
    return (lambda offset, count: data[offset:offset + count]), len(data)


def table(path: str) -> list[tuple[int, int, int]]:
    read, size = reader(path)
    return [(p.number, p.start, p.length) for p in list_partitions(read, size)]


def test_mbr_primaries_and_logical_chain(tmp_path):
    path = str(tmp_path / "d.img")
    make_mbr(path, 16 * MiB, [(0x83, 2048, 2048), (0x0C, 4096, 4096), (5, 8192, 16384)],
             logicals=[(2048, 1), (1024, 63), (512, 2048)])
    assert table(path) == [
        (1, 2048 * 512, 2048 * 512), (2, 4096 * 512, 4096 * 512),
        (5, 8193 * 512, 2048 * 512), (6, (8192 + 2049 + 63) * 512, 1024 * 512),
        (7, (8192 + 2049 + 1087 + 2048) * 512, 512 * 512),
    ]
    read, size = reader(path)
    part = find_partition(read, size, 6)
    assert part.type == "0x83" and part.scheme == "mbr"
    assert read(part.start, 1) == b"\x06" and read(part.end - 1, 1) == b"\xff"


def test_gpt_entries_numbered_by_slot(tmp_path):
    path = str(tmp_path / "g.img")
    make_gpt(path, 8 * MiB, [(2048, 4095), None, (6144, 8191)])
    read, size = reader(path)
    assert detect(read, size) == "gpt"
    assert table(path) == [(1, 2048 * 512, 2048 * 512), (3, 6144 * 512, 2048 * 512)]
    assert find_partition(read, size, 3).name == "part3"
    with pytest.raises(PartitionError, match="GPT partition 2 not found"):
        find_partition(read, size, 2)


@pytest.mark.parametrize("number, message", [
    (3, "MBR partition 3 not found"),
    (5, "MBR partition 5 not found"),
    (0, "counts? from 1"),
])
def test_missing_partition(tmp_path, number, message):
    path = str(tmp_path / "d.img")
    make_mbr(path, 4 * MiB, [(0x83, 2048, 2048)])
    read, size = reader(path)
    with pytest.raises(PartitionError, match=message):
        find_partition(read, size, number)


def test_no_signature_and_too_small():
    blank = bytes(4096)
    with pytest.raises(PartitionError, match="does not contain MBR or GPT"):
        detect(lambda o, n: blank[o:o + n], len(blank))
    with pytest.raises(PartitionError, match="too small"):
        detect(lambda o, n: blank[o:o + n], 512)


def test_partition_past_end_of_disk(tmp_path):
    path = str(tmp_path / "d.img")
    make_mbr(path, 2 * MiB, [(0x83, 2048, 4096)])
    os.truncate(path, 2 * MiB)  # the stamp wrote past the end; cut the disk back
    read, size = reader(path)
    with pytest.raises(PartitionError, match="beyond the end of the disk"):
        find_partition(read, size, 1)


def test_ebr_chain_loop_is_refused(tmp_path):
    path = str(tmp_path / "d.img")
    make_mbr(path, 8 * MiB, [(5, 2048, 8192)], logicals=[(100, 1), (100, 1)])
    with open(path, "r+b") as f:  # point the second EBR's link back at the first
        f.seek((2048 + 101) * 512 + 446 + 16)
        f.write(struct.pack("<B3sB3sII", 0, bytes(3), 5, bytes(3), 0, 101))
    read, size = reader(path)
    with pytest.raises(PartitionError, match="loops"):
        list_partitions(read, size)


@pytest.mark.skipif(shutil.which("sfdisk") is None, reason="sfdisk (fdisk package) not installed")
@pytest.mark.parametrize("label", ["dos", "gpt"])
def test_agrees_with_sfdisk(tmp_path, label):
    path = str(tmp_path / "s.img")
    with open(path, "wb") as f:
        f.truncate(16 * MiB)
    script = f"label: {label}\n,1M\n,2M\n" + (",,5\n,1M\n,2M\n,\n" if label == "dos" else ",3M\n,\n")
    subprocess.run(["sfdisk", "-q", path], input=script.encode(), check=True, capture_output=True)
    dump = json.loads(subprocess.run(["sfdisk", "-J", path], check=True, capture_output=True).stdout)
    expected = []
    for entry in dump["partitiontable"]["partitions"]:
        number = int(entry["node"][len(path):])
        if label == "dos" and entry["type"] == "5":
            continue
        expected.append((number, entry["start"] * 512, entry["size"] * 512))
    assert table(path) == expected
    assert os.path.getsize(path) == 16 * MiB
