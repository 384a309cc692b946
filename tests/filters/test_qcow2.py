"""qcow2 filter: images from qemu-img (plain, zlib, zstd, v2, cluster sizes) read back byte
for byte and mapped as qemu-nbd maps them; what it refuses, with one clear line each."""

from __future__ import annotations

import os
import shutil
import struct

import pytest
from stack_helpers import nbdsh_errno

from nbdtest import run, served
from pynbd.formats.qcow2 import write_image

MiB = 1 << 20
SIZE = 6 * MiB


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    """A raw disk with random (incompressible) data, text, zeroes and a partial cluster."""
    path = str(tmp_path_factory.mktemp("qcow2") / "src.raw")
    rng = __import__("random").Random(7)
    with open(path, "wb") as f:
        f.write(rng.randbytes(MiB + 4096))
        f.write(b"qcow2 text " * 100000)
        f.truncate(4 * MiB)
        f.seek(4 * MiB + 12345)
        f.write(rng.randbytes(300000))
        f.truncate(SIZE)
    return path


def convert(source: str, tmp_path, *options: str) -> str:
    out = str(tmp_path / "img.qcow2")
    run(["qemu-img", "convert", "-O", "qcow2", *options, source, out])
    return out


def merged_map(text: str) -> list[tuple[int, int, str]]:
    """nbdinfo --map lines as (offset, length, type), neighbours of one type merged."""
    extents: list[tuple[int, int, str]] = []
    for line in text.splitlines():
        offset, length, _, kind = line.split(None, 3)
        if extents and extents[-1][2] == kind and sum(extents[-1][:2]) == int(offset):
            extents[-1] = (extents[-1][0], extents[-1][1] + int(length), kind)
        else:
            extents.append((int(offset), int(length), kind))
    return extents


def qemu_nbd_map(image: str) -> list[tuple[int, int, str]]:
    return merged_map(run(["nbdinfo", "--map", "--", "[", "qemu-nbd", "-r", "-f", "qcow2",
                           image, "]"]).stdout.decode())


@pytest.mark.parametrize("options", [
    [], ["-c"], ["-c", "-o", "compression_type=zstd"], ["-o", "compat=0.10"],
    ["-c", "-o", "compat=0.10"], ["-o", "cluster_size=512"], ["-c", "-o", "cluster_size=2M"],
], ids=["plain", "zlib", "zstd", "v2", "v2-zlib", "512", "2M-zlib"])
def test_images_from_qemu_img(source, tmp_path, options):
    image = convert(source, tmp_path, *options)
    out = tmp_path / "out.raw"
    with served("-r", "--filter=qcow2", "file", image) as srv:
        run(["nbdcopy", srv.uri, str(out)])
        ours = merged_map(run(["nbdinfo", "--map", srv.uri]).stdout.decode())
        size = int(run(["nbdinfo", "--size", srv.uri]).stdout)
    assert size == SIZE
    assert out.read_bytes() == open(source, "rb").read()
    assert ours == qemu_nbd_map(image)


def test_zero_clusters_and_partial_reads(tmp_path):
    cs = 65536
    image = str(tmp_path / "w.qcow2")
    fd = os.open(image, os.O_RDWR | os.O_CREAT)
    write_image(lambda offset, data: os.pwrite(fd, data, offset), 2 * MiB,
                [(0, b"a" * cs), (cs, None), (2 * cs, b"b" * cs), (5 * cs, None), (6 * cs, b"c")])
    os.close(fd)
    with served("--filter=qcow2", "file", image) as srv:
        ours = merged_map(run(["nbdinfo", "--map", srv.uri]).stdout.decode())
        script = "import sys; sys.stdout.write(h.pread(100, 65500).hex() + ' ' + h.pread(3, 6 * 65536).hex())"
        first, second = run(["nbdsh", "-u", srv.uri, "-c", script]).stdout.decode().split()
        assert nbdsh_errno(srv.uri, "h.pwrite(b'x', 0)") == "EPERM"
    assert ours == qemu_nbd_map(image)
    assert ours[:3] == [(0, cs, "data"), (cs, cs, "hole,zero"), (2 * cs, cs, "data")]
    assert bytes.fromhex(first) == b"a" * 36 + bytes(64)
    assert bytes.fromhex(second) == b"c\0\0"


# ---------------------------------------------------------------- refusals

def patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def header_field(path: str, offset: int, fmt: str) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def small(tmp_path, *options: str) -> str:
    path = str(tmp_path / "small.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", *options, path, "1M"])
    return path


def with_backing(tmp_path):
    (tmp_path / "base.raw").write_bytes(bytes(MiB))
    return small(tmp_path, "-b", "base.raw", "-F", "raw")


def with_snapshots(tmp_path):
    path = small(tmp_path)
    run(["qemu-img", "snapshot", "-c", "before", path])
    run(["qemu-img", "snapshot", "-c", "after upgrade", path])
    return path


def encrypted(tmp_path):
    # (qemu-img create -o encrypt.format=luks fails now and then on a busy machine:
    # "Unable to get accurate CPU usage" while timing PBKDF iterations; set the field.)
    path = small(tmp_path)
    patch(path, 32, struct.pack(">I", 2))
    return path


def unknown_feature(tmp_path):
    path = small(tmp_path)
    patch(path, 72, struct.pack(">Q", header_field(path, 72, ">Q") | 1 << 20))
    return path


def bad_version(tmp_path):
    path = small(tmp_path)
    patch(path, 4, struct.pack(">I", 4))
    return path


def not_qcow2(tmp_path):
    path = str(tmp_path / "raw.img")
    open(path, "wb").write(bytes(MiB))
    return path


def truncated_header(tmp_path):
    path = small(tmp_path)
    os.truncate(path, 50)
    return path


def truncated_l1(tmp_path):
    path = small(tmp_path)
    os.truncate(path, header_field(path, 40, ">Q") + 4)
    return path


def l1_past_eof(tmp_path):
    path = small(tmp_path)
    patch(path, header_field(path, 40, ">Q"), struct.pack(">Q", 1 << 40 | 1 << 63))
    return path


@pytest.mark.parametrize("make, message", [
    (with_backing, "backing file 'base.raw' (format raw)"),
    (with_snapshots, "internal snapshots (1 'before', 2 'after upgrade')"),
    (encrypted, "encrypted (LUKS)"),
    (lambda tmp: small(tmp, "-o", f"data_file={tmp / 'data.raw'}"), "external data file '/"),
    (lambda tmp: small(tmp, "-o", "extended_l2=on"), "extended L2 entries"),
    (unknown_feature, "unknown incompatible features: bit 20"),
    (bad_version, "version 4 is not supported"),
    (not_qcow2, "bad magic"),
    (truncated_header, "too short for a qcow2 header"),
    (truncated_l1, "L1 table at offset"),
    (l1_past_eof, "L1 entry 0 points to an L2 table at offset 1099511627776, past the end"),
], ids=["backing", "snapshots", "encrypted", "data-file", "extended-l2", "unknown-feature",
        "version", "magic", "truncated-header", "truncated-l1", "l1-past-eof"])
def test_refused_with_one_clear_message(tmp_path, make, message):
    image = make(tmp_path)
    with served("--filter=qcow2", "file", image) as srv:
        for _ in range(2):  # refused each time; the server keeps running
            result = run(["nbdinfo", "--size", srv.uri], check=False)
            assert result.returncode != 0
        assert srv.proc.poll() is None
    log = srv.stderr()
    assert message in log and "Traceback" not in log, log


def test_corrupt_l2_and_compressed_clusters_fail_reads_only(source, tmp_path):
    cs = 4096
    image = convert(source, tmp_path, "-c", "-o", f"cluster_size={cs}")
    l1 = header_field(image, 40, ">Q")
    first_l2, second_l2 = (header_field(image, l1 + 8 * i, ">Q") & ~(1 << 63) for i in (0, 1))
    patch(image, second_l2 + 8, struct.pack(">Q", 1 << 45 | 1 << 63))  # data past EOF
    text = (MiB + 2 * cs) // cs  # a compressible (text) cluster the first L2 table maps
    entry = header_field(image, first_l2 + 8 * text, ">Q")
    assert entry & 1 << 62
    patch(image, entry & ((1 << 58) - 1), b"\xff" * 64)  # garbage in a compressed cluster
    per_l2 = cs * cs // 8  # guest bytes one L2 table maps
    with served("--filter=qcow2", "file", image) as srv:
        assert nbdsh_errno(srv.uri, f"h.pread(4096, {per_l2})") == "EIO"
        assert nbdsh_errno(srv.uri, f"h.pread(4096, {text * cs})") == "EIO"
        assert nbdsh_errno(srv.uri, f"h.pread(4096, {text * cs + 3 * cs})") == "ok"
        assert nbdsh_errno(srv.uri, f"h.pread(4096, {per_l2 - cs})") == "ok"
    log = srv.stderr()
    assert "points to offset 35184372088832, past the end of the file" in log, log
    assert "compressed cluster at offset" in log and "Traceback" not in log, log


# ---------------------------------------------------------------- backing chains

def test_follows_a_backing_chain_like_qemu(source, tmp_path):
    base = tmp_path / "base.raw"
    shutil.copy(source, base)
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
         str(tmp_path / "mid.qcow2")])
    run(["qemu-io", "-c", "write -P 0x41 64k 200k", str(tmp_path / "mid.qcow2")])
    # top names its backing file without a format, relative to its directory
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
         str(tmp_path / "top.qcow2"), "8M"])
    run(["qemu-io", "-c", "write -z 100k 64k", "-c", "write -P 0x42 5M 10k",
         str(tmp_path / "top.qcow2")])
    expected = tmp_path / "expected.raw"
    run(["qemu-img", "convert", "-O", "raw", str(tmp_path / "top.qcow2"), str(expected)])
    out = tmp_path / "out.raw"
    with served("-r", "--filter=qcow2", "file", str(tmp_path / "top.qcow2"), "follow-backing=true",
                f"backing-dir={tmp_path}") as srv:
        run(["nbdcopy", srv.uri, str(out)])
    assert out.read_bytes() == expected.read_bytes()
    assert len(out.read_bytes()) == 8 * MiB  # larger than the 6 MiB base: zeroes past it


def loop(tmp_path):
    path = small(tmp_path)
    run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "small.qcow2", "-F", "qcow2", path])
    return path


@pytest.mark.parametrize("make, message", [
    (lambda tmp: small(tmp, "-u", "-b", "gone.raw", "-F", "raw"), "cannot open backing file"),
    (lambda tmp: small(tmp, "-u", "-b", "/dev/null", "-F", "vmdk"), "has format 'vmdk'"),
    (loop, "backing chain deeper than 16"),
], ids=["missing", "vmdk", "loop"])
def test_backing_chain_refusals(tmp_path, make, message):
    image = make(tmp_path)
    with served("--filter=qcow2", "file", image, "follow-backing=true",
                f"backing-dir={tmp_path}") as srv:
        assert run(["nbdinfo", "--size", srv.uri], check=False).returncode != 0
        assert srv.proc.poll() is None
    log = srv.stderr()
    assert message in log and "Traceback" not in log, log
