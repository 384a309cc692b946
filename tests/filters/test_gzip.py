"""gzip filter: random access through a zran index, compared with nbdkit's gzip filter."""

from __future__ import annotations

import os
import random

import pytest
from compressed_images import compress, mixed_image
from stack_helpers import BOTH, tmpfile

from nbdtest import nbdsh, run, served

MiB = 1 << 20
DATA = mixed_image(5 * MiB)


def whole(uri: str) -> bytes:
    return run(["nbdcopy", uri, "-"]).stdout


def small_reads(uri: str, count: int = 40, seed: int = 3) -> list[tuple[int, int, str]]:
    """Unaligned reads at random places, as (offset, length, hex)."""
    rng = random.Random(seed)
    script = "\n".join(f"print(h.pread({n}, {o}).hex())" for o, n in
                       [(rng.randrange(len(DATA) - 70000), rng.randrange(1, 70000)) for _ in range(count)])
    rng = random.Random(seed)
    places = [(rng.randrange(len(DATA) - 70000), rng.randrange(1, 70000)) for _ in range(count)]
    return [(o, n, h) for (o, n), h in zip(places, nbdsh(uri, script).split(), strict=True)]


def test_same_bytes_and_size_as_nbdkit(tmp_path):
    path = compress(tmp_path, DATA, "gzip")
    for server in BOTH:
        with served("-r", "--filter=gzip", "file", path, server=server) as srv:
            assert whole(srv.uri) == DATA, server
    with served("-r", "--filter=gzip", "file", path) as srv:
        for offset, length, hexdata in small_reads(srv.uri):
            assert bytes.fromhex(hexdata) == DATA[offset:offset + length]


def test_multi_member_and_zero_padding(tmp_path):
    first = compress(tmp_path, DATA[:3 * MiB], "gzip", "a")
    second = compress(tmp_path, DATA[3 * MiB:], "gzip", "b")
    joined = tmpfile(tmp_path, "joined.gz", open(first, "rb").read() + open(second, "rb").read()
                     + bytes(1000))
    with served("-r", "--filter=gzip", "file", joined) as srv:
        assert whole(srv.uri) == DATA
        for offset, length, hexdata in small_reads(srv.uri, 10):
            assert bytes.fromhex(hexdata) == DATA[offset:offset + length]


def test_index_is_saved_and_reused(tmp_path):
    path = compress(tmp_path, DATA, "gzip")
    index = str(tmp_path / "disk.idx")
    with served("-r", "--filter=gzip", "file", path, f"index={index}") as srv:
        assert whole(srv.uri) == DATA
    saved = os.stat(index)
    with served("-r", "--filter=gzip", "file", path, f"index={index}") as srv:
        assert whole(srv.uri) == DATA
    assert os.stat(index).st_mtime_ns == saved.st_mtime_ns  # reused, not rebuilt
    with served("-r", "--filter=gzip", "file", path, "index=/proc/nowhere/idx") as srv:
        assert whole(srv.uri) == DATA  # an index that cannot be saved: served anyway, with a warning
    assert "cannot save the index in /proc/nowhere/idx" in srv.stderr()
    other = compress(tmp_path, DATA[::-1], "gzip", "other")  # another file: the index is rebuilt
    with served("-r", "--filter=gzip", "file", other, f"index={index}") as srv:
        assert whole(srv.uri) == DATA[::-1]


def damaged(tmp_path) -> list[tuple[str, str, str]]:
    good = open(compress(tmp_path, DATA, "gzip"), "rb").read()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    wrong_crc = bytearray(good)
    wrong_crc[-8] ^= 1
    return [
        ("truncated", tmpfile(tmp_path, "t.gz", good[:len(good) // 2]), "truncated"),
        ("corrupt", tmpfile(tmp_path, "c.gz", bytes(flipped)), "gzip"),
        ("bad crc", tmpfile(tmp_path, "crc.gz", bytes(wrong_crc)), "CRC-32"),
        ("not gzip", tmpfile(tmp_path, "n.gz", DATA[:100000]), "no gzip header"),
        ("garbage after", tmpfile(tmp_path, "g.gz", good + b"garbage"), "trailing garbage"),
    ]


@pytest.mark.parametrize("case", range(5))
def test_damaged_files_are_refused_clearly(tmp_path, case):
    _name, path, words = damaged(tmp_path)[case]
    with served("-r", "--filter=gzip", "file", path) as srv:
        for _ in range(2):  # the server refuses each client the same way and keeps running
            result = run(["nbdinfo", srv.uri], check=False)
            assert result.returncode != 0  # (libnbd does not show the server's message)
        assert srv.proc.poll() is None
    log = srv.stderr()
    assert "Traceback" not in log and "gzip:" in log and words in log


def test_plain_gzip_is_read_only(tmp_path):
    path = compress(tmp_path, DATA, "gzip")
    with served("--filter=gzip", "file", path) as srv:
        assert "False" in nbdsh(srv.uri, "print(h.can_write() if not h.is_read_only() else False)")
