"""tar header parsing: GNU tar's archives in each format, base-256 and pax sizes over 8 GiB,
sparse members, damaged archives."""

from __future__ import annotations

import io
import tarfile

import pytest

from nbdtest import run
from pynbd.formats.tar import TarError, find_entry, iter_entries

GiB = 1 << 30
LONG = "dir/" + "n" * 120 + "/disk.img"


def reader(data: bytes):
    return lambda offset, count: data[offset:offset + count]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    (root / "small.txt").write_bytes(b"hello\n")
    (root / "disk.img").write_bytes(bytes(range(256)) * 4000 + b"tail")
    (root / LONG).parent.mkdir(parents=True)
    (root / LONG).write_bytes(b"long name data" * 1000)
    with open(root / "sparse.img", "wb") as f:
        f.truncate(4 << 20)
        f.seek(2 << 20)
        f.write(b"island")
    return root


def gnu_tar(tree, fmt: str, *members: str, options=()) -> bytes:
    out = tree / f"{fmt}.tar"
    run(["tar", "-C", str(tree), f"--format={fmt}", *options, "-cf", str(out), *members])
    return out.read_bytes()


@pytest.mark.parametrize("fmt", ["gnu", "ustar", "pax", "v7", "oldgnu", "posix"])
def test_members_match_gnu_tar_listing(tree, fmt):
    members = ["small.txt", "disk.img"] + ([] if fmt in ("ustar", "v7") else ["dir"])
    data = gnu_tar(tree, fmt, *members)
    listed = run(["tar", "-tf", "-"], input=data).stdout.decode().splitlines()
    entries = list(iter_entries(reader(data), len(data)))
    assert [e.name for e in entries] == listed
    for entry in entries:
        if entry.is_regular:
            expected = (tree / entry.name).read_bytes()
            assert data[entry.data_offset:entry.data_offset + entry.size] == expected
    if fmt not in ("ustar", "v7"):
        entry = find_entry(reader(data), len(data), LONG)
        assert entry.size == len(b"long name data" * 1000)


def test_ustar_prefix_joins_long_paths(tree):
    path = "dir/" + "n" * 120  # fits in prefix + name
    (tree / path / "u.img").write_bytes(b"u" * 700)
    data = gnu_tar(tree, "ustar", f"{path}/u.img")
    entry = find_entry(reader(data), len(data), f"{path}/u.img")
    assert data[entry.data_offset:entry.data_offset + entry.size] == b"u" * 700


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_sizes_over_8_gib(fmt):
    info = tarfile.TarInfo("huge.img")
    info.size = 9 * GiB + 3
    header = info.tobuf(fmt)
    if fmt == tarfile.GNU_FORMAT:
        assert header[124] & 0x80  # base-256
    else:
        assert b"size=" in header
    archive_size = len(header) + 9 * GiB + 512 + 1024

    def read(offset, count):
        return header[offset:offset + count].ljust(count, b"\0")

    entry = find_entry(read, archive_size, "huge.img")
    assert entry.size == 9 * GiB + 3 and entry.data_offset == len(header)


@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_sparse_members_are_refused(tree, fmt):
    data = gnu_tar(tree, fmt, "sparse.img", "small.txt", options=["--sparse"])
    with pytest.raises(TarError, match="'sparse.img' is a sparse file"):
        find_entry(reader(data), len(data), "sparse.img")
    assert find_entry(reader(data), len(data), "small.txt").size == 6


def test_what_cannot_be_served(tree):
    data = gnu_tar(tree, "gnu", "small.txt", "dir")
    with pytest.raises(TarError, match="'dir/' is a directory, not a regular file"):
        find_entry(reader(data), len(data), "dir/")
    with pytest.raises(TarError, match="'missing' not found in the archive"):
        find_entry(reader(data), len(data), "missing")
    with pytest.raises(TarError, match="not found in the first 512 bytes"):
        find_entry(reader(data), len(data), LONG, limit=512)
    assert find_entry(reader(data), len(data), "small.txt", limit=512).size == 6


def test_damaged_archives(tree):
    data = gnu_tar(tree, "gnu", "small.txt", "disk.img")
    second = find_entry(reader(data), len(data), "disk.img")
    corrupt = bytearray(data)
    corrupt[second.header_offset + 10] ^= 0xFF
    with pytest.raises(TarError, match=f"bad header checksum at offset {second.header_offset}"):
        find_entry(reader(bytes(corrupt)), len(data), "disk.img")
    cut = second.data_offset + 1000
    with pytest.raises(TarError, match="runs past the end of the archive"):
        find_entry(reader(data[:cut]), cut, "disk.img")
    with pytest.raises(TarError, match="truncated: header at offset"):
        find_entry(reader(data[:700]), 700, "disk.img")
    with pytest.raises(TarError, match="not a tar archive"):
        find_entry(reader(bytes(range(256)) * 4), 1024, "x")
    gz = io.BytesIO()
    with tarfile.open(fileobj=gz, mode="w:gz") as t:
        t.addfile(tarfile.TarInfo("x"))
    with pytest.raises(TarError, match="gzip-compressed: put --filter=gzip"):
        find_entry(reader(gz.getvalue()), len(gz.getvalue()), "x")
