"""The qcow2 reader on its own: many threads over tiny caches, a backing reader, round trips."""

from __future__ import annotations

import os
import random
import threading

import pytest

from nbdtest import PYNBD, run, served
from pynbd.formats.qcow2 import Qcow2Error, Qcow2Reader, describe, is_qcow2, write_image

MiB = 1 << 20


def open_reader(path, **kw) -> Qcow2Reader:
    data = open(path, "rb").read()

    def pread(buf: memoryview, offset: int) -> None:
        buf[:] = data[offset:offset + len(buf)]

    return Qcow2Reader(pread, len(data), **kw)


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_threads_over_tiny_caches(tmp_path, compression):
    rng = random.Random(3)
    raw = bytearray(4 * MiB)
    for _ in range(200):
        pos = rng.randrange(len(raw) - 5000)
        raw[pos:pos + 5000] = rng.choice([rng.randbytes(5000), b"abc" * 1666 + b"ab"])
    (tmp_path / "src.raw").write_bytes(raw)
    image = tmp_path / "img.qcow2"
    run(["qemu-img", "convert", "-c", "-O", "qcow2", "-o",
         f"cluster_size=1024,compression_type={compression}", str(tmp_path / "src.raw"),
         str(image)])
    reader = open_reader(image, l2_cache=2, cluster_cache=2)
    errors = []

    def worker(seed: int) -> None:
        local = random.Random(seed)
        for _ in range(300):
            offset, count = local.randrange(len(raw)), local.randrange(1, 20000)
            buf = bytearray(count)
            reader.pread(memoryview(buf), offset)
            expected = bytes(raw[offset:offset + count]).ljust(count, b"\0")
            if buf != expected:
                errors.append((offset, count))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(reader.l2_cache.items) <= 2 and len(reader.cluster_cache.items) <= 2


def test_round_trip_with_a_backing_reader(tmp_path):
    cs, size = 4096, MiB
    path = tmp_path / "top.qcow2"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    write_image(lambda offset, data: os.pwrite(fd, data, offset), size,
                [(0, b"x" * cs), (cs, None), (10 * cs, b"y" * 7)], cluster_size=cs,
                backing_file="base.raw", backing_format="raw")
    os.close(fd)
    with pytest.raises(Qcow2Error, match="backing file 'base.raw' \\(format raw\\)"):
        open_reader(path)
    base = b"\x07" * (size // 2)  # shorter than the image: zeroes past its end

    def backing(buf: memoryview, offset: int) -> None:
        piece = base[offset:offset + len(buf)]
        buf[:] = piece.ljust(len(buf), b"\0")

    opened = []

    def open_backing(name, fmt):
        opened.append((name, fmt))
        return backing

    reader = open_reader(path, open_backing=open_backing)
    assert opened == [("base.raw", "raw")]
    out = bytearray(size)
    reader.pread(memoryview(out), 0)
    expected = bytearray(base.ljust(size, b"\0"))
    expected[0:cs] = b"x" * cs
    expected[cs:2 * cs] = bytes(cs)
    expected[10 * cs:11 * cs] = b"y" * 7 + bytes(cs - 7)
    assert out == expected
    assert list(reader.extents(0, 3 * cs)) == [(0, cs, False, False), (cs, cs, True, True),
                                              (2 * cs, cs, False, False)]
    assert is_qcow2(open(path, "rb").read(4)) and not is_qcow2(b"\0" * 4)


def test_describe_for_pynbd_info(tmp_path):
    path = tmp_path / "d.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compression_type=zstd,cluster_size=4096",
         "-u", "-b", "base.raw", "-F", "raw", str(path), "3M"])
    text = describe(path.read_bytes()[:8192], path.stat().st_size)
    assert text == ("QEMU QCOW2 image (v3), virtual size 3145728 bytes, cluster size 4096, "
                    "zstd compression, backing file 'base.raw' (raw)")
    assert describe(b"\0" * 512, 512) is None
    assert "damaged" in describe(b"QFI\xfb" + bytes(100), 104)
    with served("-r", "file", str(path)) as srv:
        out = run([*PYNBD, "info", srv.uri]).stdout.decode()
    assert f"content: {text}" in out
