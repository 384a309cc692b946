"""split plugin: files concatenated, compared with nbdkit's split (bytes, size, extents)."""

from __future__ import annotations

import os

import pytest
from plugin_helpers import config_error, export_info, extent_map

from filters.stack_helpers import BOTH
from nbdtest import nbdsh, run, served


@pytest.fixture
def parts(tmp_path):
    """Three files: sparse with data in the middle, odd-sized, small and full.

    (nbdkit 1.32's split crashes on block status past a file whose size is not a
    multiple of 512, and under nbdcopy: the comparison uses 1024 and plain reads.)"""
    a, b, c = tmp_path / "a.img", tmp_path / "b.img", tmp_path / "c.img"
    with open(a, "wb") as f:
        f.truncate(3 << 20)
        f.seek(1 << 20)
        f.write(b"A" * 4096)
    b.write_bytes(os.urandom(1024))
    c.write_bytes(b"C" * 8192)
    return [str(a), str(b), str(c)]


def read_all(uri: str) -> bytes:
    """The whole disk through plain reads (no block status)."""
    code = ("import sys\nsize = h.get_size()\n"
            "for off in range(0, size, 1 << 20):\n"
            "    sys.stdout.buffer.write(h.pread(min(1 << 20, size - off), off))\n")
    return run(["nbdsh", "-u", uri, "-c", code]).stdout


def test_same_as_nbdkit(parts):
    expected = b"".join(open(p, "rb").read() for p in parts)
    seen = []
    for server in BOTH:
        with served("split", *parts, server=server) as srv:
            data = read_all(srv.uri)
            seen.append((export_info(srv.uri)["export-size"], extent_map(srv.uri), data))
    assert seen[0] == seen[1]
    assert seen[0][2] == expected


def test_odd_sizes(parts, tmp_path):
    odd = tmp_path / "odd.img"
    odd.write_bytes(os.urandom(1001))
    files = [parts[2], str(odd), parts[2], str(odd)]
    with served("split", *files) as srv:
        assert run(["nbdcopy", srv.uri, "-"]).stdout == b"".join(open(p, "rb").read() for p in files)
        assert sum(length for _, length, _ in extent_map(srv.uri)) == 2 * (8192 + 1001)


def test_writes_across_files_land_in_each(parts):
    a_size = os.path.getsize(parts[0])
    with served("split", *[f"file={p}" for p in parts]) as srv:
        nbdsh(srv.uri, f"h.pwrite(b'x' * 3000, {a_size - 1000}); h.flush()")
        out = nbdsh(srv.uri, f"print(h.pread(3000, {a_size - 1000}) == b'x' * 3000)")
    assert out.strip() == "True"
    assert open(parts[0], "rb").read()[-1000:] == b"x" * 1000
    assert open(parts[1], "rb").read() == b"x" * 1024
    assert open(parts[2], "rb").read()[:977] == b"x" * 976 + b"C"


def test_one_read_only_file_makes_the_disk_read_only(parts):
    """A file the server cannot open for writing (immutable for root, mode 0444 otherwise)."""
    locked = ["chattr", "+i", parts[1]] if os.geteuid() == 0 else ["chmod", "0444", parts[1]]
    run(locked)
    try:
        with served("split", *parts) as srv:
            assert export_info(srv.uri)["is_read_only"] is True
            assert read_all(srv.uri)[:16] == bytes(16)
    finally:
        if os.geteuid() == 0:
            run(["chattr", "-i", parts[1]])
    with served("split", *parts, options=["-r"]) as srv:
        assert export_info(srv.uri)["is_read_only"] is True


@pytest.mark.parametrize("case, message", [
    ("none", "give at least one file"),
    ("missing", "No such file or directory"),
    ("dir", "not a regular file"),
])
def test_bad_input(tmp_path, parts, case, message):
    args = {"none": [], "missing": [parts[0], str(tmp_path / "nope")], "dir": [str(tmp_path)]}[case]
    assert message in config_error("split", *args)
