"""zstd filter: the seekable format's seek table, plain .zst files read sequentially, bad files."""

from __future__ import annotations

import pytest
from compressed_images import compress, mixed_image
from stack_helpers import nbdsh_outcomes, tmpfile

from nbdtest import PYNBD, nbdsh, run, served
from pynbd.formats.zstd_seekable import write_seekable

MiB = 1 << 20
DATA = mixed_image(5 * MiB + 777, seed=21)


def seekable(tmp_path, data: bytes, name: str = "seek.zst", frame_size: int = MiB) -> str:
    out = bytearray()

    def write(offset: int, piece: bytes) -> None:
        out[offset:offset + len(piece)] = piece
    write_seekable(lambda o, n: data[o:o + n], len(data), write, frame_size)
    return tmpfile(tmp_path, name, bytes(out))


def whole(uri: str) -> bytes:
    return run(["nbdcopy", uri, "-"]).stdout


def small_reads(uri: str, data: bytes, places) -> None:
    script = "\n".join(f"print(h.pread({n}, {o}).hex())" for o, n in places)
    got = nbdsh(uri, script).split()
    assert [bytes.fromhex(h) for h in got] == [data[o:o + n] for o, n in places]


def test_seekable_file(tmp_path):
    path = seekable(tmp_path, DATA)
    assert run(["zstd", "-dc", path]).stdout == DATA  # a standard zstd file
    with served("--filter=zstd", "file", path, "zstd-max-depth=2") as srv:
        assert whole(srv.uri) == DATA
        small_reads(srv.uri, DATA, [(len(DATA) - 5, 5), (MiB - 3, 10), (17, 3 * MiB), (4 * MiB + 1, 1)])
    assert "not in the seekable format" not in srv.stderr()


def test_plain_files_with_a_warning(tmp_path):
    piped = compress(tmp_path, DATA, "zstd", "piped")  # from a pipe: no content size in the header
    two = tmpfile(tmp_path, "two.zst", open(piped, "rb").read() * 2)
    for path, data in [(piped, DATA), (two, DATA * 2)]:
        with served("--filter=zstd", "file", path) as srv:
            assert whole(srv.uri) == data
            small_reads(srv.uri, data, [(len(data) - 1000, 1000), (5, 70000)])
        assert "not in the seekable format" in srv.stderr()


def test_large_single_frame_read_sequentially(tmp_path):
    data = mixed_image(40 * MiB, seed=2)
    path = compress(tmp_path, data, "zstd", "big")
    with served("--filter=zstd", "file", path) as srv:
        assert whole(srv.uri) == data
        small_reads(srv.uri, data, [(39 * MiB, 4096), (1000, 100), (20 * MiB - 7, 2 * MiB), (3, 4)])


def bad_files(tmp_path) -> list[tuple[str, str]]:
    good = open(seekable(tmp_path, DATA), "rb").read()
    plain = open(compress(tmp_path, DATA, "zstd"), "rb").read()
    table = bytearray(good)
    table[-15] ^= 0x40  # a frame size in the seek table
    return [
        (tmpfile(tmp_path, "trunc.zst", plain[:len(plain) // 2]), "truncated zstd file"),
        (tmpfile(tmp_path, "table.zst", bytes(table)), "damaged zstd seek table"),
        (tmpfile(tmp_path, "not.zst", DATA[:10000]), "not a zstd file"),
        (tmpfile(tmp_path, "garbage.zst", plain + b"garbage!"), "garbage after the zstd frames"),
        (tmpfile(tmp_path, "empty.zst", b""), "not a zstd file"),
    ]


@pytest.mark.parametrize("case", range(5))
def test_bad_files_refused_clearly(tmp_path, case):
    path, words = bad_files(tmp_path)[case]
    with served("--filter=zstd", "file", path) as srv:
        for _ in range(2):
            assert run(["nbdinfo", srv.uri], check=False).returncode != 0
        assert srv.proc.poll() is None
    log = srv.stderr()
    assert words in log and "Traceback" not in log


def test_damaged_frame_fails_its_reads_only(tmp_path):
    good = bytearray(open(seekable(tmp_path, DATA), "rb").read())
    good[len(good) // 2] ^= 0xFF
    path = tmpfile(tmp_path, "bad.zst", bytes(good))
    with served("--filter=zstd", "file", path) as srv:
        outcomes = nbdsh_outcomes(srv.uri, [f"h.pread(4096, {n * MiB})" for n in range(5)])
        assert "EIO" in outcomes and "ok" in outcomes
    log = srv.stderr()
    assert "zstd: damaged zstd frame" in log and "Traceback" not in log


def test_max_depth_must_be_positive(tmp_path):
    result = run([*PYNBD, "serve", "--filter=zstd", "memory", "1M", "zstd-max-depth=0"], check=False)
    assert result.returncode == 1 and "zstd-max-depth=0: must be at least 1" in result.stderr.decode()


def test_pynbd_zstd_create(tmp_path):
    src = tmpfile(tmp_path, "disk.img", DATA)
    out = str(tmp_path / "disk.zst")
    run([*PYNBD, "zstd", "create", src, out, "--frame-size=256K", "--level=5"])
    assert run(["zstd", "-dc", out]).stdout == DATA
    with served("--filter=zstd", "file", out) as srv:
        small_reads(srv.uri, DATA, [(len(DATA) - 300000, 300000), (262144 - 1, 2)])
    assert "not in the seekable format" not in srv.stderr()
    for args, words in [(["--frame-size=0"], "must be between"), ([], "No such file")]:
        source = src if args else str(tmp_path / "missing")
        result = run([*PYNBD, "zstd", "create", source, out, *args], check=False)
        err = result.stderr.decode()
        assert result.returncode == 1 and words in err and len(err.splitlines()) == 1
