"""pattern: each 8-byte big-endian word holds its offset; same bytes as nbdkit."""

from __future__ import annotations

import pytest

from nbdtest import PYNBD, nbdsh, run, served


@pytest.mark.parametrize("size", ["1000", "65536", "200003", "3M"])
def test_same_bytes_as_nbdkit(size):
    with served("pattern", size) as ours, served("pattern", size, server="nbdkit") as theirs:
        mine = run(["nbdcopy", ours.uri, "-"]).stdout
        oracle = run(["nbdcopy", theirs.uri, "-"]).stdout
    assert mine == oracle and len(mine) > 0


def reference(offset: int, count: int) -> bytes:
    """The pattern written out word by word (the slow, obvious way)."""
    first = offset // 8
    words = b"".join((8 * w).to_bytes(8, "big") for w in range(first, (offset + count + 7) // 8))
    return words[offset - 8 * first:offset - 8 * first + count]


def test_words_hold_offsets_at_odd_places():
    end = 2**63 - 1
    places = [(0, 16), (0x12345677, 5), (65530, 20), ((1 << 40) - 3, 70000), (end - 16, 16)]
    code = "; ".join(f"print(h.pread({n}, {off}).hex())" for off, n in places)
    with served("pattern", str(end)) as srv:
        out = nbdsh(srv.uri, code).split()
    assert out == [reference(off, n).hex() for off, n in places]
    assert out[0] == "0000000000000000" "0000000000000008"


def test_qemu_io_reads_pattern_and_disk_is_read_only():
    with served("pattern", "1M") as srv:
        out = run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0 0 7", srv.uri]).stdout
        assert b"read 7/7" in out
        failed = run(["qemu-io", "-f", "raw", "-c", "write 0 512", srv.uri], check=False)
    assert failed.returncode != 0 or b"failed" in failed.stdout + failed.stderr


def test_size_is_required():
    result = run([*PYNBD, "serve", "-U", "-", "pattern", "--run", "true"],
                 check=False)
    assert result.returncode == 1 and "size" in result.stderr.decode()
