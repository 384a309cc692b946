"""pynbd xz create/repair and writes in place through the xz filter: xz -t, xz -d, nbdkit."""

from __future__ import annotations

import os
import random

from filters.compressed_images import mixed_image
from filters.stack_helpers import BOTH, nbdsh_outcomes, tmpfile
from nbdtest import PYNBD, nbdsh, run, served

MiB = 1 << 20
DATA = mixed_image(4 * MiB + 1000, seed=8)
RANGES = "1M-2M,2M-2100K,3M-4195304"  # adjacent ranges, one ending with the input (unaligned)


def make(tmp_path) -> str:
    src = tmpfile(tmp_path, "disk.img", DATA)
    out = str(tmp_path / "disk.img.xz")
    run([*PYNBD, "xz", "create", src, out, f"--stored={RANGES}"])
    return out


def xz_ok(path: str) -> bool:
    return run(["xz", "-t", path], check=False).returncode == 0


def unxz(path: str) -> bytes:
    return run(["xz", "-dc", path]).stdout


def test_create_makes_a_standard_xz_file_nbdkit_reads(tmp_path):
    path = make(tmp_path)
    assert xz_ok(path) and unxz(path) == DATA
    for server in BOTH:
        with served("-r", "--filter=xz", "file", path, server=server) as srv:
            assert run(["nbdcopy", srv.uri, "-"]).stdout == DATA, server


def test_writes_in_place_and_outside(tmp_path):
    path = make(tmp_path)
    size = os.path.getsize(path)
    expected = bytearray(DATA)
    rng = random.Random(4)
    writes = [(MiB, 512), (MiB + 65536 - 100, 300), (2 * MiB - 4096, 8192), (3 * MiB, len(DATA) - 3 * MiB)]
    calls = []
    for n, (offset, length) in enumerate(writes):
        chunk = tmpfile(tmp_path, f"chunk{n}", rng.randbytes(length))
        expected[offset:offset + length] = open(chunk, "rb").read()
        calls.append(f"h.pwrite(open({chunk!r}, 'rb').read(), {offset})")
    with served("--filter=xz", "file", path) as srv:
        assert nbdsh_outcomes(srv.uri, [*calls, "h.flush()"]) == ["ok"] * (len(writes) + 1)
        assert nbdsh_outcomes(srv.uri, ["h.pwrite(b'x' * 512, 0)", "h.pwrite(b'x' * 1024, 2150400 - 512)",
                                        "h.zero(4096, 2 * 1048576 + 200000)"]) == ["EPERM"] * 3
        assert run(["nbdcopy", srv.uri, "-"]).stdout == expected
    log = srv.stderr()
    assert "outside the stored ranges (1048576-2150400, 3145728-4195304)" in log and "Traceback" not in log
    assert os.path.getsize(path) == size
    assert xz_ok(path) and unxz(path) == expected


def test_stale_checks_are_repaired_on_open_and_by_the_tool(tmp_path):
    for how in ("open", "tool"):
        path = make(tmp_path)
        with open(path, "r+b") as f:  # the data write landed, the check update did not
            raw = f.read()
            f.seek(raw.index(DATA[MiB + 70000:MiB + 70100]))
            f.write(b"z" * 100)
        assert not xz_ok(path)
        if how == "tool":
            assert "1 block check(s) repaired" in run([*PYNBD, "xz", "repair", path]).stdout.decode()
        else:
            with served("--filter=xz", "file", path) as srv:
                nbdsh(srv.uri, "h.pread(512, 0)")
            assert "rewrote them" in srv.stderr()
        assert xz_ok(path) and unxz(path)[MiB + 70000:MiB + 70100] == b"z" * 100
        assert "checks are correct" in run([*PYNBD, "xz", "repair", path]).stdout.decode()


def test_bad_input(tmp_path):
    src = tmpfile(tmp_path, "disk.img", DATA)
    plain = tmpfile(tmp_path, "plain.xz", run(["xz", "-c"], input=DATA[:MiB]).stdout)
    for args, words in [(["create", src, str(tmp_path / "o.xz"), "--stored=1M-2M,1536K-3M"], "overlap"),
                        (["create", src, str(tmp_path / "o.xz"), "--stored=100-2048"], "multiples of 512"),
                        (["repair", plain], "no stored blocks"),
                        (["repair", src], "not an xz file")]:
        result = run([*PYNBD, "xz", *args], check=False)
        err = result.stderr.decode()
        assert result.returncode == 1 and words in err and len(err.splitlines()) == 1, (args, err)
