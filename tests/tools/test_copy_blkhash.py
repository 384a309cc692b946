"""pynbd copy --blkhash[=ALGO[/BLOCKSIZE]] and --blkhash-file.

Debian's nbdcopy (libnbd 1.14) predates --blkhash, so the oracle is the
algorithm of libnbd 1.24's copy/blkhash.c written out plainly below: ALGO
over the ALGO digest of every BLOCKSIZE block (the last one shorter), then
the length as 8 bytes little-endian. Every path the copy can take must give
that same value: files (SEEK_HOLE extents, unaligned), NBD servers (extents
skipped, several connections), streams, --synchronous, --no-extents, and a
qcow2 served by qemu-nbd (the same disk in another format: the same hash).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from test_copy import IMAGE_SIZE, make_image, pynbd_copy
from test_copy_errors import fails

from nbdtest import run, served

KiB = 1024
ODD = 7 * 1024 * 1024 + 12345  # not a multiple of any block size


def blkhash(data: bytes, algorithm: str = "sha256", block: int = 64 * KiB) -> str:
    final = hashlib.new(algorithm)
    for at in range(0, len(data), block):
        final.update(hashlib.new(algorithm, data[at:at + block]).digest())
    final.update(len(data).to_bytes(8, "little"))
    return final.hexdigest()


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    return make_image(tmp_path_factory.mktemp("blkhash") / "image.raw")


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> Path:
    """Data and holes at offsets that are not block aligned, and an odd length."""
    path = tmp_path_factory.mktemp("blkhash") / "odd.raw"
    with open(path, "wb") as f:
        f.truncate(ODD)
        f.seek(100_001)
        f.write(hashlib.sha512(b"a").digest() * 5000)
        f.seek(3 * 1024 * 1024 + 7)
        f.write(b"\x01" * 70_000)
        f.seek(ODD - 99)
        f.write(b"z" * 99)
    return path


def printed(*args: str, input: bytes | None = None) -> str:
    out = pynbd_copy(*args, input=input).stdout.decode()
    assert out.endswith("\n") and out.count("\n") == 1, out
    return out.strip()


@pytest.mark.parametrize("spec,algorithm,block", [
    ("--blkhash", "sha256", 64 * KiB),
    ("--blkhash=md5", "md5", 64 * KiB),
    ("--blkhash=sha1/4k", "sha1", 4 * KiB),
    ("--blkhash=sha512/1M", "sha512", 1024 * KiB),
    ("--blkhash=sha256/512", "sha256", 512),
])
def test_file_to_null_matches_the_algorithm(odd, spec, algorithm, block):
    assert printed(spec, str(odd), "null:") == blkhash(odd.read_bytes(), algorithm, block)


@pytest.mark.parametrize("options", [[], ["-C", "4", "-T", "4", "--request-size=64k"],
                                     ["--synchronous"], ["--no-extents"]])
def test_nbd_source_with_zero_extents(odd, tmp_path, options):
    """nbdkit's file plugin reports the holes: they are zeroed, not read, and still hashed."""
    target = tmp_path / "copy.raw"
    with served("file", str(odd), server="nbdkit") as srv:
        assert printed("--blkhash", *options, srv.uri, str(target)) == blkhash(odd.read_bytes())
    assert target.read_bytes() == odd.read_bytes()


def test_nbd_to_nbd_and_blkhash_file(image, tmp_path):
    out = tmp_path / "hash"
    with served("memory", str(IMAGE_SIZE), server="nbdkit") as src, \
            served("memory", str(IMAGE_SIZE), server="nbdkit") as dst:
        pynbd_copy(str(image), src.uri)
        result = pynbd_copy("--blkhash-file", str(out), "--blkhash=md5/16k", src.uri, dst.uri)
    assert result.stdout == b""
    assert out.read_text() == blkhash(image.read_bytes(), "md5", 16 * KiB) + "\n"


def test_blkhash_file_alone_means_sha256_64k(image, tmp_path):
    out = tmp_path / "hash"
    pynbd_copy(f"--blkhash-file={out}", str(image), "null:")
    assert out.read_text() == blkhash(image.read_bytes()) + "\n"


def test_stream_source_of_unknown_length(odd):
    assert printed("--blkhash=sha1", "-", "null:", input=odd.read_bytes()) == \
        blkhash(odd.read_bytes(), "sha1")


@pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="qemu-nbd missing")
def test_qcow2_has_the_hash_of_its_raw_disk(image, tmp_path):
    qcow2 = tmp_path / "image.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(image), str(qcow2)])
    captive = printed("--blkhash", "--", "[", "qemu-nbd", "-f", "qcow2", str(qcow2), "]", "null:")
    assert captive == printed("--blkhash", str(image), "null:") == blkhash(image.read_bytes())


@pytest.mark.parametrize("args,message", [
    (["--blkhash=crc32", "a", "null:"], "--blkhash: unknown digest 'crc32'"),
    (["--blkhash=sha256/1000", "a", "null:"], "--blkhash: block size must be a power of 2"),
    (["--blkhash=sha256/64M", "a", "null:"], "--blkhash: block size must be a power of 2"),
    (["--blkhash=sha256/lots", "a", "null:"], "--blkhash: could not parse block size"),
    (["--blkhash", "--dirty-bitmap=b", "nbd://x", "y"], "cannot go with --dirty-bitmap"),
    (["--blkhash-file"], "option '--blkhash-file' requires an argument"),
    (["--blkhash", "a", "-"], "use --blkhash-file"),
])
def test_bad_blkhash_options(args, message):
    assert message in fails(*args)


def test_stream_destination_with_blkhash_file(odd, tmp_path):
    out = tmp_path / "hash"
    result = pynbd_copy(f"--blkhash-file={out}", str(odd), "-")
    assert result.stdout == odd.read_bytes()
    assert out.read_text() == blkhash(odd.read_bytes()) + "\n"


def test_unwritable_blkhash_file(image, tmp_path):
    line = fails(f"--blkhash-file={tmp_path}/no/such/dir/hash", str(image), "null:")
    assert "No such file or directory" in line
