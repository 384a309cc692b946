"""The qcow2 writer: images pass qemu-img check and read back (qemu-img convert/compare) as expected."""

from __future__ import annotations

import json
import os

import pytest

from nbdtest import run
from pynbd.formats.qcow2 import Qcow2Error, write_image

KiB = 1 << 10
MiB = 1 << 20


def write_file(path, size, clusters, **kw) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        return write_image(lambda offset, data: os.pwrite(fd, data, offset), size, clusters, **kw)
    finally:
        os.close(fd)


def check(path) -> dict:
    result = run(["qemu-img", "check", "--output=json", str(path)], check=False)
    report = json.loads(result.stdout)
    assert result.returncode == 0, report
    assert report.get("leaks", 0) == 0 and report.get("corruptions", 0) == 0, report
    return report


def info(path) -> dict:
    return json.loads(run(["qemu-img", "info", "--output=json", str(path)]).stdout)


def as_raw(tmp_path, path) -> bytes:
    out = tmp_path / "out.raw"
    run(["qemu-img", "convert", "-O", "raw", str(path), str(out)])
    return out.read_bytes()


def expected_image(size, clusters, cluster_size, base: bytes | None = None) -> bytes:
    image = bytearray(base[:size].ljust(size, b"\0") if base is not None else bytes(size))
    for guest, data in clusters:
        piece = bytes(cluster_size) if data is None else bytes(data).ljust(cluster_size, b"\0")
        image[guest:guest + cluster_size] = piece[:size - guest]
    return bytes(image)


def pattern_clusters(cluster_size, guests):
    return [(g, None if i % 3 == 2 else bytes([i % 251 + 1]) * (cluster_size - (i % 2) * 100))
            for i, g in enumerate(guests)]


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("cluster_size", [512, 4 * KiB, 64 * KiB, 2 * MiB])
def test_image_without_backing(tmp_path, version, cluster_size):
    size = 8 * MiB + cluster_size + max(512, cluster_size // 2)  # a partial last cluster
    guests = [0, cluster_size, 5 * cluster_size, (size - 1) // cluster_size * cluster_size]
    guests += [g for g in range(7 * cluster_size, 6 * MiB, cluster_size * 37)]
    guests = sorted(set(guests))
    clusters = pattern_clusters(cluster_size, guests)
    path = tmp_path / "img.qcow2"
    length = write_file(path, size, clusters, cluster_size=cluster_size, version=version)
    assert length == path.stat().st_size
    check(path)
    meta = info(path)
    assert meta["virtual-size"] == size and meta["cluster-size"] == cluster_size
    assert meta["format-specific"]["data"]["compat"] == ("0.10" if version == 2 else "1.1")
    assert "backing-filename" not in meta
    assert as_raw(tmp_path, path) == expected_image(size, clusters, cluster_size)


@pytest.mark.parametrize("version", [2, 3])
def test_absent_clusters_fall_through_to_the_backing_file(tmp_path, version):
    size, cs = 4 * MiB, 64 * KiB
    base = bytes(range(256)) * (size // 256)
    (tmp_path / "base.raw").write_bytes(base)
    clusters = [(0, b"A" * cs), (2 * cs, None), (3 * cs, b"B" * 10), (40 * cs, None)]
    path = tmp_path / "top.qcow2"
    write_file(path, size, clusters, version=version, backing_file="base.raw",
               backing_format="raw")
    check(path)
    meta = info(path)
    assert meta["backing-filename"] == "base.raw" and meta["backing-filename-format"] == "raw"
    expected = expected_image(size, clusters, cs, base)
    assert as_raw(tmp_path, path) == expected
    (tmp_path / "expected.raw").write_bytes(expected)
    run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(path),
         str(tmp_path / "expected.raw")])


def test_many_l2_tables_and_refcount_blocks(tmp_path):
    # 512-byte clusters: 64 entries per L2 table, 256 refcounts per block, 64 blocks per
    # refcount table cluster: many of each, and a refcount table of several clusters.
    cs, size = 512, 64 * MiB
    clusters = [(g, bytes([g // cs % 200 + 1]) * cs) for g in range(0, 20 * MiB, cs)
                if g // cs % 7 != 3]
    path = tmp_path / "many.qcow2"
    write_file(path, size, clusters, cluster_size=cs)
    with open(path, "rb") as f:
        assert int.from_bytes(f.read(60)[56:60], "big") > 1  # refcount_table_clusters
    report = check(path)
    assert report["allocated-clusters"] == len(clusters)
    assert as_raw(tmp_path, path) == expected_image(size, clusters, cs)


def test_empty_and_zero_sized_images(tmp_path):
    for size in (0, 512, MiB):
        path = tmp_path / f"e{size}.qcow2"
        write_file(path, size, [])
        check(path)
        assert info(path)["virtual-size"] == size
        assert as_raw(tmp_path, path) == bytes(size)


@pytest.mark.parametrize("clusters, message", [
    ([(100, b"x")], "unaligned"),
    ([(65536, b"x"), (0, b"x")], "out of order"),
    ([(MiB, b"x")], "past the end"),
    ([(0, b"x" * (65536 + 1))], "bytes of data"),
])
def test_bad_cluster_lists(tmp_path, clusters, message):
    with pytest.raises(Qcow2Error, match=message):
        write_file(tmp_path / "bad.qcow2", MiB, clusters)


def test_bad_parameters(tmp_path):
    with pytest.raises(Qcow2Error, match="power of 2"):
        write_file(tmp_path / "x", MiB, [], cluster_size=3000)
    with pytest.raises(Qcow2Error, match="version"):
        write_file(tmp_path / "x", MiB, [], version=4)
    with pytest.raises(Qcow2Error, match="1023"):
        write_file(tmp_path / "x", MiB, [], backing_file="b" * 1024)
