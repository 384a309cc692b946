"""The file plugin, driven by qemu-img, qemu-io, nbdcopy, nbdinfo, nbdsh and fio,
and compared with nbdkit's file plugin on the same files."""

from __future__ import annotations

import ast
import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from plugin_helpers import (
    config_error,
    export_info,
    extent_map,
    kind_at,
    nbd_script,
    qemu_io,
)

from nbdtest import SERVE, nbdsh, run, served
from pynbd.backend import FLAG_FAST_ZERO, FLAG_FUA, FLAG_MAY_TRIM, FLAG_REQ_ONE, Extent
from pynbd.plugins.file import FileConnection, open_file

MiB = 1 << 20


def make_file(path: Path, size: int, data: dict[int, bytes] | None = None) -> Path:
    """A sparse file of ``size`` bytes with ``data`` written at the given offsets."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, chunk in (data or {}).items():
            f.seek(offset)
            f.write(chunk)
    return path


def allocated(path: Path) -> int:
    """Bytes the file system has allocated for ``path``."""
    return os.stat(path).st_blocks * 512


def same_bytes(a: Path | str, b: Path | str) -> None:
    run(["cmp", str(a), str(b)])


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    """10 MiB + 1000 bytes: random data at a few places, holes elsewhere."""
    return make_file(tmp_path / "sample.img", 10 * MiB + 1000, {
        3_000_000: b"abc", 100 * 65536: os.urandom(3 * 65536), 8 * MiB: os.urandom(MiB)})


# ---------------------------------------------------------------- data paths
def test_qemu_io_round_trip(tmp_path):
    disk = tmp_path / "disk.img"
    run(["qemu-img", "create", "-f", "raw", str(disk), "64M"])
    qemu_io(str(disk), "write -P 0x3c 1M 256k")
    with served("file", str(disk)) as srv:
        assert export_info(srv.uri)["export-size"] == 64 * MiB
        qemu_io(srv.uri, "read -P 0x3c 1M 256k", "write -P 0x9d 10M 100000", "write -P 0x42 4095 2")
    qemu_io(str(disk), "read -P 0x9d 10M 100000", "read -P 0x42 4095 2", "read -P 0 4097 4000")


def test_qemu_img_convert_both_ways_and_compare(tmp_path, sample):
    os.truncate(sample, 10 * MiB)  # qemu rounds an export up to whole sectors
    target = make_file(tmp_path / "target.img", 10 * MiB)
    with served("file", str(target)) as srv:
        run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(sample), srv.uri])
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(sample), srv.uri])
    same_bytes(sample, target)
    out = tmp_path / "out.img"
    with served("file", str(sample)) as srv:
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri, str(out)])
    same_bytes(sample, out)


def test_nbdcopy_in_and_out_with_four_connections(tmp_path, sample):
    target = make_file(tmp_path / "target.img", sample.stat().st_size, {0: os.urandom(2 * MiB)})
    with served("file", str(target)) as srv:
        run(["nbdcopy", "--connections=4", str(sample), srv.uri])
    same_bytes(sample, target)
    out = make_file(tmp_path / "out.img", 0)
    with served("file", str(sample)) as srv:
        run(["nbdcopy", "--connections=4", srv.uri, str(out)])
    same_bytes(sample, out)


def test_fio_verify(tmp_path):
    disk = make_file(tmp_path / "fio.img", 16 * MiB)
    with served("file", str(disk)) as srv:
        run(["fio", "--name=t", "--ioengine=nbd", f"--uri={srv.uri}", "--rw=randrw", "--bs=4k",
             "--size=16M", "--verify=crc32c", "--verify_state_save=0", "--iodepth=8",
             "--output-format=terse"])


# ---------------------------------------------------------------- sparseness
def test_sparse_copy_stays_sparse(tmp_path):
    size = 1 << 30
    pieces = {0: os.urandom(MiB), 300 * MiB: os.urandom(MiB), size - MiB: os.urandom(MiB)}
    source = make_file(tmp_path / "source.img", size, pieces)
    # Old data where the source has a hole must end up zeroed, and as a hole.
    target = make_file(tmp_path / "target.img", size, {600 * MiB: os.urandom(4 * MiB)})
    with served("file", str(target)) as srv:
        run(["nbdcopy", "--connections=4", str(source), srv.uri])
        rows = extent_map(srv.uri)
    assert allocated(target) <= 3 * MiB + 256 * 1024
    # Holes read as zeroes, so the data extents and their bytes say it all
    # (and cost far less than comparing 1 GiB).
    assert [(offset, length) for offset, length, kind in rows if kind == 0] == \
        [(offset, MiB) for offset in pieces]
    with open(target, "rb") as f:
        for offset, chunk in pieces.items():
            assert os.pread(f.fileno(), MiB, offset) == chunk


def test_zero_and_trim_punch_holes(tmp_path):
    disk = tmp_path / "full.img"
    disk.write_bytes(os.urandom(8 * MiB))
    os.sync()
    assert allocated(disk) >= 8 * MiB
    with served("file", str(disk)) as srv:
        nbdsh(srv.uri, f"""
h.zero({2 * MiB}, 0)
h.trim({2 * MiB}, {2 * MiB})
h.zero({2 * MiB}, {4 * MiB}, nbd.CMD_FLAG_NO_HOLE)
h.zero({MiB}, {6 * MiB}, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_FUA)
h.flush()
""")
        rows = extent_map(srv.uri)
    punched = 5 * MiB  # 0-4M and 6-7M; NO_HOLE keeps 4-6M allocated
    assert 3 * MiB <= allocated(disk) <= 8 * MiB - punched + 64 * 1024
    assert kind_at(rows, 0) == 3 and kind_at(rows, 6 * MiB) == 3 and kind_at(rows, 7 * MiB) == 0
    assert disk.read_bytes()[:7 * MiB] == bytes(7 * MiB)


def test_map_matches_nbdkit(sample):
    maps = []
    for server in ("pynbd", "nbdkit"):
        with served("file", str(sample), server=server) as srv:
            maps.append(extent_map(srv.uri))
    assert maps[0] == maps[1]
    assert kind_at(maps[0], 0) == 3 and kind_at(maps[0], 8 * MiB) == 0


# The same requests on two copies of a file, one served by pynbd, one by nbdkit.
OPERATIONS = ("write -P 0xa1 0 1M", "write -P 0xb2 3000 5000", "write -z 256k 256k",
              "write -z -u 512k 128k", "discard 2M 1M", "write -P 0xc3 9M 64k", "discard 9M 4k",
              "write -P 0xd4 10M 1000", "flush")
COMPARED_FLAGS = ("export-size", "is_read_only", "is_rotational", "can_flush", "can_fua",
                  "can_multi_conn", "can_trim", "can_zero", "can_cache", "can_df", "contexts")


def test_same_requests_same_bytes_as_nbdkit(tmp_path, sample):
    results = []
    for server in ("pynbd", "nbdkit"):
        copy = tmp_path / f"{server}.img"
        shutil.copyfile(sample, copy)
        with served("file", str(copy), server=server) as srv:
            qemu_io(srv.uri, *OPERATIONS)
            info = export_info(srv.uri)
            results.append(({k: info.get(k) for k in COMPARED_FLAGS}, extent_map(srv.uri)))
    assert results[0] == results[1]
    same_bytes(tmp_path / "pynbd.img", tmp_path / "nbdkit.img")


# ---------------------------------------------------------------- dir=
@pytest.fixture
def export_dir(tmp_path: Path) -> Path:
    root = tmp_path / "exports"
    root.mkdir()
    make_file(root / "a.img", MiB, {0: b"A" * 512})
    make_file(root / "b.img", 2 * MiB, {0: b"B" * 512})
    (root / "c.img").symlink_to("a.img")
    (root / "evil").symlink_to("/etc/passwd")
    (root / "up").symlink_to(tmp_path / "outside.img")
    make_file(tmp_path / "outside.img", MiB)
    (root / "sub").mkdir()
    os.mkfifo(root / "fifo")
    return root


def test_dir_lists_its_files(export_dir):
    with served("file", f"dir={export_dir}") as srv:
        out = run(["nbdinfo", "--list", "--json", srv.uri]).stdout
        exports = {e["export-name"]: e["export-size"] for e in json.loads(out)["exports"]}
    assert exports == {"a.img": MiB, "b.img": 2 * MiB, "c.img": MiB}


OPEN_EXPORT = """
for name in sys.argv[2:]:
    h = nbd.NBD()
    h.set_export_name(name)
    try:
        h.connect_unix(sys.argv[1])
        print(repr(name), "opened", h.get_size(), h.pread(1, 0).decode(), sep="\t")
    except nbd.Error as exc:
        print(repr(name), "refused", exc.errno, sep="\t")
"""


def test_dir_refuses_names_outside_and_unknown(export_dir):
    """Unknown and escaping names get NBD_REP_ERR_UNKNOWN (ENOENT in libnbd)."""
    refused = ["../etc/passwd", "evil", "up", "sub", "fifo", "nope", ".", "..", "a.img/",
               "sub/../a.img", "/etc/passwd", ""]
    with served("file", f"dir={export_dir}") as srv:
        out = nbd_script(OPEN_EXPORT, srv.socket, "a.img", "c.img", *refused)
    results = {ast.literal_eval(name): rest for name, rest in
               (line.split("\t", 1) for line in out.splitlines())}
    assert results == {"a.img": f"opened\t{MiB}\tA", "c.img": f"opened\t{MiB}\tA",
                       **{name: "refused\tENOENT" for name in refused}}


def test_dir_writes_reach_the_named_file(export_dir):
    with served("file", f"dir={export_dir}") as srv:
        nbd_script("""
h = nbd.NBD()
h.set_export_name("b.img")
h.connect_unix(sys.argv[1])
h.pwrite(b"written", 4096)
h.flush()
""", srv.socket)
    assert (export_dir / "b.img").read_bytes()[4096:4103] == b"written"
    assert (export_dir / "a.img").read_bytes()[4096:4103] == bytes(7)


# ---------------------------------------------------------------- read-only
WRITE_ATTEMPTS = """
h = nbd.NBD()
h.set_strict_mode(0)          # send the requests; let the server refuse them
h.connect_uri(sys.argv[1])
print(h.is_read_only())
for attempt in (lambda: h.pwrite(b"x" * 512, 0), lambda: h.trim(512, 0), lambda: h.zero(512, 0)):
    try:
        attempt()
        print("accepted")
    except nbd.Error as exc:
        print(exc.errno)
print(h.pread(4, 0).decode())
"""


def check_read_only(uri: str, disk: Path) -> None:
    out = nbd_script(WRITE_ATTEMPTS, uri).split()
    assert out == ["True", "EPERM", "EPERM", "EPERM", "keep"]
    assert disk.read_bytes()[:4] == b"keep"


def test_unwritable_file_is_served_read_only(tmp_path):
    disk = make_file(tmp_path / "ro.img", MiB, {0: b"keep"})
    disk.chmod(0o444)
    script = tmp_path / "attempt.py"
    script.write_text("import nbd, sys\n" + WRITE_ATTEMPTS)
    # The tests may run as root, who may write anything: drop that power.
    no_override = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                   "--inh-caps=-dac_override,-dac_read_search"]
    result = run([*no_override, *SERVE, "-U", "-", "file", str(disk),
                  "--run", f'/usr/bin/python3 {script} "$uri"'])
    assert result.stdout.decode().split() == ["True", "EPERM", "EPERM", "EPERM", "keep"]


def test_readonly_option_opens_read_only(tmp_path):
    disk = make_file(tmp_path / "rw.img", MiB, {0: b"keep"})
    with served("file", str(disk), options=["-r"]) as srv:
        check_read_only(srv.uri, disk)


# ---------------------------------------------------------------- cache=none
def resident(path: Path) -> int:
    out = run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)]).stdout
    return int(out.decode().strip() or 0)


@pytest.mark.parametrize("cache, kept", [("none", False), ("default", True)])
def test_cache_none_keeps_pages_out_of_the_page_cache(tmp_path, cache, kept):
    disk = tmp_path / "cached.img"
    original = os.urandom(8 * MiB)
    disk.write_bytes(original)
    with open(disk, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
    assert resident(disk) > 0
    with served("file", str(disk), f"cache={cache}", "fadvise=sequential") as srv:
        out = tmp_path / "copy.img"
        out.touch()
        run(["nbdcopy", srv.uri, str(out)])
        after_read = resident(disk)
        qemu_io(srv.uri, "write -P 0x6e 1M 4M", "flush")
        after_write = resident(disk)
        qemu_io(srv.uri, "read -P 0x6e 1M 4M")
    assert out.read_bytes() == original
    if kept:
        assert (after_read, after_write) == (8 * MiB, 8 * MiB)
    else:  # at most the large folio at a range's end may stay
        assert after_read <= 2 * MiB and after_write <= 2 * MiB, (after_read, after_write)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("args, word", [
    (("/nonexistent/disk.img",), "/nonexistent/disk.img"),
    ((), "file="),
    (("disk.img", "dir=/tmp"), "dir="),
    (("dir=/nonexistent",), "/nonexistent"),
    (("/tmp",), "regular file"),
    (("/etc/hostname", "cache=never"), "cache"),
    (("/etc/hostname", "fadvise=often"), "fadvise"),
])
def test_bad_command_lines_are_one_line(args, word):
    line = config_error("file", *args)
    assert line.startswith("pynbd: error: file") and word in line, line


# ---------------------------------------------------------------- block devices
@pytest.fixture
def loop_device(tmp_path):
    backing = make_file(tmp_path / "backing.img", 8 * MiB)
    try:
        device = run(["losetup", "-f", "--show", str(backing)]).stdout.decode().strip()
    except (AssertionError, FileNotFoundError) as exc:
        pytest.skip(f"no loop device: {exc}")
    try:
        yield device, backing
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def test_block_device(loop_device):
    device, backing = loop_device
    with served("file", device) as srv:
        assert export_info(srv.uri)["export-size"] == 8 * MiB
        qemu_io(srv.uri, "write -P 0x5b 0 2M", "write -z 512k 512k", "discard 1M 512k",
                "write -P 0x5c 3000001 999", "flush")
        qemu_io(srv.uri, "read -P 0x5b 0 512k", "read -P 0 512k 1M", "read -P 0x5c 3000001 999")
        out = nbdsh(srv.uri, """
try:
    h.zero(4096, 4 << 20, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO)
    print("fast")
except nbd.Error as exc:
    print(exc.errno)
""")
    assert errno.errorcode[errno.ENOTSUP] == out.strip()  # BLKZEROOUT may be slow: refused
    data = backing.read_bytes()
    assert data[:512 * 1024] == b"\x5b" * (512 * 1024) and data[512 * 1024:1536 * 1024] == bytes(MiB)


# ---------------------------------------------------------------- other file systems
def test_no_hole_zero_on_tmpfs_stays_allocated(shm_dir):
    disk = make_file(shm_dir / "disk.img", 4 * MiB, {0: os.urandom(MiB)})
    with served("file", str(disk)) as srv:
        nbdsh(srv.uri, f"""
h.zero({2 * MiB}, {512 * 1024}, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO)
h.zero({512 * 1024}, {3 * MiB})
""")
        rows = extent_map(srv.uri)
    assert disk.read_bytes()[512 * 1024:] == bytes(4 * MiB - 512 * 1024)
    # tmpfs reports fallocated pages as holes; st_blocks shows they are there.
    assert kind_at(rows, 0) == 0 and kind_at(rows, 3 * MiB) == 3
    assert allocated(disk) == 2 * MiB + 512 * 1024


def test_without_fallocate_zeroes_are_written_and_fast_zero_refused(ramfs):
    disk = make_file(ramfs / "disk.img", 4 * MiB, {0: b"\xff" * 4 * MiB})
    with served("file", str(disk)) as srv:
        out = nbdsh(srv.uri, f"""
try:
    h.zero({MiB}, 0, nbd.CMD_FLAG_FAST_ZERO)
    print("fast")
except nbd.Error as exc:
    print(exc.errno)
h.zero({MiB}, {MiB})
h.trim({MiB}, {2 * MiB})
h.zero({MiB}, {3 * MiB}, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
h.flush()
""")
    assert out.split() == [errno.errorcode[errno.ENOTSUP]]
    data = disk.read_bytes()
    assert data[:MiB] == b"\xff" * MiB  # the refused fast zero changed nothing
    assert data[MiB:2 * MiB] == bytes(MiB) and data[3 * MiB:] == bytes(MiB)


def test_zero_on_a_full_file_system_is_enospc(small_tmpfs):
    disk = make_file(small_tmpfs / "disk.img", 4 * MiB)
    with served("file", str(disk)) as srv:
        out = nbdsh(srv.uri, f"""
for flags in (nbd.CMD_FLAG_NO_HOLE, 0):
    try:
        h.zero({2 * MiB}, 0, flags)
        print("zeroed")
    except nbd.Error as exc:
        print(exc.errno)
""")
    # No hole allowed: tmpfs has no ZERO_RANGE, so the hole is allocated again,
    # which the full file system refuses. A hole needs no space.
    assert out.split() == ["ENOSPC", "zeroed"]


# ---------------------------------------------------------------- in process
def open_connection(path: Path) -> FileConnection:
    fd, writable = open_file(str(path), readonly=False)
    return FileConnection(fd, writable)


def test_without_fallocate_zero_writes_zeroes_or_refuses_a_fast_zero(tmp_path):
    disk = make_file(tmp_path / "disk.img", MiB, {0: b"\xff" * MiB})
    conn = open_connection(disk)
    try:
        # What a file system without fallocate leaves the plugin with.
        conn.zeroer.can_punch = conn.zeroer.can_zero_range = conn.zeroer.can_allocate = False
        with pytest.raises(OSError) as refused:
            conn.zero(65536, 0, FLAG_FAST_ZERO | FLAG_MAY_TRIM)
        assert refused.value.errno == errno.ENOTSUP
        assert disk.read_bytes()[:65536] == b"\xff" * 65536
        conn.zero(65536, 4096, FLAG_MAY_TRIM | FLAG_FUA)
    finally:
        conn.close()
    assert disk.read_bytes() == b"\xff" * 4096 + bytes(65536) + b"\xff" * (MiB - 69632)


def test_read_past_a_shrunk_file_is_eio(tmp_path):
    disk = make_file(tmp_path / "disk.img", MiB, {0: b"data"})
    conn = open_connection(disk)
    try:
        os.truncate(disk, 4096)
        buf = memoryview(bytearray(8192))
        with pytest.raises(OSError) as failed:
            conn.pread(buf, 0, 0)
        assert failed.value.errno == errno.EIO and bytes(buf[:4]) == b"data"
    finally:
        conn.close()


def test_extents_req_one_and_ranges(sample):
    conn = open_connection(sample)
    try:
        assert list(conn.extents(MiB, 0, FLAG_REQ_ONE)) == [Extent(0, MiB, hole=True, zero=True)]
        assert list(conn.extents(2 * MiB, 7 * MiB, 0)) == [
            Extent(7 * MiB, MiB, hole=True, zero=True), Extent(8 * MiB, MiB)]
        assert list(conn.extents(1000, 10 * MiB, 0)) == [Extent(10 * MiB, 1000, hole=True, zero=True)]
    finally:
        conn.close()
