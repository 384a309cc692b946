"""xz filter: block index, LRU, bad files — compared with nbdkit's xz filter."""

from __future__ import annotations

import pytest
from compressed_images import compress, mixed_image
from stack_helpers import BOTH, nbdsh_outcomes, tmpfile

from nbdtest import PYNBD, nbdsh, run, served

MiB = 1 << 20
DATA = mixed_image(5 * MiB + 12345, seed=9)


def whole(uri: str) -> bytes:
    return run(["nbdcopy", uri, "-"]).stdout


@pytest.mark.parametrize("how", ["xz-blocks", "xz-threads", "xz"])
def test_same_bytes_and_size_as_nbdkit(tmp_path, how):
    path = compress(tmp_path, DATA, how)
    for server in BOTH:
        with served("--filter=xz", "file", path, "xz-max-depth=2", server=server) as srv:
            assert whole(srv.uri) == DATA, server
            size = nbdsh(srv.uri, "print(h.get_size(), h.is_read_only())").split()
            assert size == [str(len(DATA)), "True"]


def test_small_reads_across_blocks_and_single_block_warning(tmp_path):
    path = compress(tmp_path, DATA, "xz-blocks")
    places = [(0, 1), (MiB - 10, 20), (3 * MiB - 5000, 2 * MiB + 3), (len(DATA) - 7, 7), (123457, 65536)]
    script = "\n".join(f"print(h.pread({n}, {o}).hex())" for o, n in places)
    with served("--filter=xz", "file", path, "xz-max-depth=1") as srv:
        got = nbdsh(srv.uri, script).split()
    assert [bytes.fromhex(h) for h in got] == [DATA[o:o + n] for o, n in places]
    single = compress(tmp_path, DATA, "xz", "single")
    with served("--filter=xz", "file", single) as srv:
        assert whole(srv.uri) == DATA
    assert "only one block: random access will be slow" in srv.stderr()


def test_streams_and_padding(tmp_path):
    a = open(compress(tmp_path, DATA[:2 * MiB], "xz-blocks", "a"), "rb").read()
    b = open(compress(tmp_path, DATA[2 * MiB:], "xz", "b"), "rb").read()
    path = tmpfile(tmp_path, "ab.xz", a + bytes(8) + b + bytes(4))
    assert run(["xz", "-dc", path]).stdout == DATA
    with served("--filter=xz", "file", path) as srv:
        assert whole(srv.uri) == DATA


def test_max_block_and_depth(tmp_path):
    path = compress(tmp_path, DATA, "xz-blocks")
    with served("--filter=xz", "file", path, "xz-max-block=512K") as srv:
        assert run(["nbdinfo", srv.uri], check=False).returncode != 0
    assert "larger than xz-max-block=524288" in srv.stderr()
    result = run([*PYNBD, "serve", "--filter=xz", "file", path, "xz-max-depth=0"], check=False)
    assert result.returncode == 1 and "xz-max-depth=0: must be at least 1" in result.stderr.decode()


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> bytes:
    """DATA in 1 MiB blocks, compressed once for the bad-file tests."""
    return open(compress(tmp_path_factory.mktemp("xz"), DATA, "xz-blocks"), "rb").read()


def bad_files(tmp_path, good: bytes) -> list[tuple[str, str]]:
    index_flip = bytearray(good)
    index_flip[-20] ^= 0x55  # inside the index
    return [
        (tmpfile(tmp_path, "trunc.xz", good[:len(good) // 2]), "no stream footer"),
        (tmpfile(tmp_path, "index.xz", bytes(index_flip)), "damaged xz"),
        (tmpfile(tmp_path, "plain.xz", DATA[:50000]), "not an xz file"),
        (tmpfile(tmp_path, "zeros.xz", bytes(4096)), "only zero bytes"),
        (tmpfile(tmp_path, "tiny.xz", b"\xfd7zXZ"), "not an xz file"),
    ]


@pytest.mark.parametrize("case", range(5))
def test_bad_files_refused_clearly(tmp_path, good, case):
    path, words = bad_files(tmp_path, good)[case]
    with served("--filter=xz", "file", path) as srv:
        for _ in range(2):
            assert run(["nbdinfo", srv.uri], check=False).returncode != 0
        assert srv.proc.poll() is None
    log = srv.stderr()
    assert words in log and "Traceback" not in log


def test_damaged_block_fails_its_reads_only(tmp_path, good):
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0xFF  # inside some block's compressed data
    path = tmpfile(tmp_path, "block.xz", bytes(damaged))
    with served("--filter=xz", "file", path) as srv:
        outcomes = nbdsh_outcomes(srv.uri, [f"h.pread(4096, {n * MiB})" for n in range(5)])
        assert "EIO" in outcomes and "ok" in outcomes
        assert nbdsh_outcomes(srv.uri, ["h.pread(512, 0)"]) == ["ok"]
    log = srv.stderr()
    assert "xz: damaged xz block at offset" in log and "Traceback" not in log
