"""pynbd gzip create/repair and writes in place through the gzip filter: gzip -t, zcat, kill -9."""

from __future__ import annotations

import os
import random
import signal
import subprocess

import pytest

from crashtest import kill_during_storm
from filters.compressed_images import mixed_image
from filters.stack_helpers import BOTH, nbdsh_outcomes, tmpfile
from nbdtest import PYNBD, SERVE, nbdsh, run, served, wait_for, wait_for_socket

MiB = 1 << 20
DATA = mixed_image(6 * MiB, seed=5)
RANGES = "1M-2M,2M-2560K,4M-6M"  # adjacent ranges, and one running to the end of the input
STORED = [(MiB, 2 * MiB), (2 * MiB, 2560 * 1024), (4 * MiB, 6 * MiB)]


def make(tmp_path, stored: str = RANGES) -> str:
    src = tmpfile(tmp_path, "disk.img", DATA)
    out = str(tmp_path / "disk.img.gz")
    run([*PYNBD, "gzip", "create", src, out, f"--stored={stored}"])
    return out


def gzip_ok(path: str) -> bool:
    return run(["gzip", "-t", path], check=False).returncode == 0


def zcat(path: str) -> bytes:
    return run(["zcat", path]).stdout


def test_create_makes_a_standard_gzip_file_nbdkit_reads(tmp_path):
    path = make(tmp_path)
    assert gzip_ok(path) and zcat(path) == DATA
    for server in BOTH:
        with served("-r", "--filter=gzip", "file", path, server=server) as srv:
            assert run(["nbdcopy", srv.uri, "-"]).stdout == DATA, server
    shown = run([*PYNBD, "gzip", "show", path]).stdout.decode()
    assert "stored ranges: 1048576-2097152, 2097152-2621440, 4194304-6291456" in shown
    # the stored ranges are in the file as they are
    raw = open(path, "rb").read()
    assert DATA[MiB:MiB + 32768] in raw and DATA[4 * MiB + 5000:4 * MiB + 30000] in raw


def test_writes_inside_stored_ranges_land_in_place(tmp_path):
    path = make(tmp_path)
    size = os.path.getsize(path)
    expected = bytearray(DATA)
    rng = random.Random(7)
    writes = [(MiB, 512), (2 * MiB - 4096, 8192), (2 * MiB + 30000, 70000), (4 * MiB, 2 * MiB),
              (6 * MiB - 100, 100)]
    with served("--filter=gzip", "file", path) as srv:
        calls = []
        for n, (offset, length) in enumerate(writes):
            chunk = tmpfile(tmp_path, f"chunk{n}", rng.randbytes(length))
            expected[offset:offset + length] = open(chunk, "rb").read()
            calls.append(f"h.pwrite(open({chunk!r}, 'rb').read(), {offset})")
        assert nbdsh_outcomes(srv.uri, [*calls, "h.flush()"]) == ["ok"] * (len(writes) + 1)
        assert run(["nbdcopy", srv.uri, "-"]).stdout == expected
        assert gzip_ok(path)  # the trailer is right while the server runs
    assert os.path.getsize(path) == size
    assert gzip_ok(path) and zcat(path) == expected


def test_writes_outside_stored_ranges_are_refused(tmp_path):
    path = make(tmp_path)
    with served("--filter=gzip", "file", path) as srv:
        assert nbdsh_outcomes(srv.uri, [
            "h.pwrite(b'x' * 512, 0)",  # compressed
            "h.pwrite(b'x' * 1024, 1048576 - 512)",  # straddles the start of a stored range
            "h.pwrite(b'x' * 512, 2621440)",  # just after the adjacent ranges
            "h.zero(512, 3 << 20)",
            "h.pwrite(b'y' * 1024, 2621440 - 1024)",  # the last KiB of the second range: fine
        ]) == ["EPERM", "EPERM", "EPERM", "EPERM", "ok"]
    log = srv.stderr()
    assert "outside the stored ranges (1048576-2097152, 2097152-2621440, 4194304-6291456)" in log
    assert "Traceback" not in log
    expected = bytearray(DATA)
    expected[2621440 - 1024:2621440] = b"y" * 1024
    assert gzip_ok(path) and zcat(path) == expected


def test_stale_trailer_is_repaired_on_open_and_by_the_tool(tmp_path):
    """A crash between the data write and the trailer update: new data, old trailer."""
    for how in ("open", "tool"):
        path = make(tmp_path)
        with open(path, "r+b") as f:  # what the data write did before the crash
            raw = f.read()
            at = raw.index(DATA[MiB:MiB + 4096])
            f.seek(at)
            f.write(b"z" * 4096)
        assert not gzip_ok(path)
        if how == "tool":
            assert "repaired" in run([*PYNBD, "gzip", "repair", path]).stdout.decode()
        else:
            with served("--filter=gzip", "file", path) as srv:
                nbdsh(srv.uri, "h.pread(512, 0)")
            assert "rewrote it" in srv.stderr()
        assert gzip_ok(path)
        assert zcat(path)[MiB:MiB + 4097] == b"z" * 4096 + DATA[MiB + 4096:MiB + 4097]
        assert "trailer is correct" in run([*PYNBD, "gzip", "repair", path]).stdout.decode()


def test_kill_9_while_writing(tmp_path):
    """kill -9 at a random moment of a write loop; after the next open gzip -t passes."""
    path = make(tmp_path)
    sock = str(tmp_path / "sock")
    proc = subprocess.Popen([*SERVE, "-f", "-U", sock, "--filter=gzip", "file", path],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_socket(sock, proc)
    loop = ("import os\nfor i in range(100000):\n"
            "    h.pwrite(os.urandom(65536), (4 << 20) + (i * 65536) % (2 << 20))\n")
    writer = subprocess.Popen(["nbdsh", "-u", f"nbd+unix:///?socket={sock}", "-c", loop],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        original = open(path, "rb").read()
        wait_for(lambda: open(path, "rb").read() != original, message="no write reached the file")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        writer.kill()
        writer.wait()
        proc.stderr.close()
    os.unlink(sock)
    with served("--filter=gzip", "file", path) as srv:
        served_data = run(["nbdcopy", srv.uri, "-"]).stdout
    assert gzip_ok(path) and zcat(path) == served_data
    assert served_data[:4 * MiB] == DATA[:4 * MiB]


@pytest.mark.parametrize(("stored", "words"), [
    ("1M-2M,1536K-3M", "overlap"),
    ("1000-4096", "multiples of 512"),
    ("0-1001", "multiples of 512"),
    ("2M-1M", "END must be larger"),
    ("0-7M", "past the end"),
    ("1M", "START-END"),
])
def test_bad_stored_ranges(tmp_path, stored, words):
    src = tmpfile(tmp_path, "disk.img", DATA)
    result = run([*PYNBD, "gzip", "create", src, str(tmp_path / "o.gz"), f"--stored={stored}"], check=False)
    err = result.stderr.decode()
    assert result.returncode == 1 and words in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_repair_refuses_other_files(tmp_path):
    plain = tmpfile(tmp_path, "plain.gz", run(["gzip", "-c"], input=DATA[:MiB]).stdout)
    for path, words in [(plain, "without stored ranges"), (str(tmp_path / "missing.gz"), "No such file"),
                        (tmpfile(tmp_path, "x.gz", b"not gzip at all"), "no gzip header")]:
        result = run([*PYNBD, "gzip", "repair", path], check=False)
        err = result.stderr.decode()
        assert result.returncode == 1 and words in err and len(err.splitlines()) == 1


def test_crash_harness_on_a_modifiable_gzip(tmp_path):
    """SIGKILL during write storms into a gzip image stored whole: every durable write survives,
    and after the next open the trailer is right again (gzip -t passes, zcat gives the data).
    A piece may span a stored block's header, so a write the kill interrupts can land in part
    (as on a disk without atomic writes): the harness checks it with ``atomic=False``."""
    original = os.urandom(2 << 20)
    plain = tmp_path / "in.img"
    plain.write_bytes(original)
    image = tmp_path / "out.gz"
    run([*PYNBD, "gzip", "create", str(plain), str(image), f"--stored=0-{len(original)}"])
    kill_during_storm(tmp_path, lambda: served("--filter=gzip", "file", str(image)), lambda srv: srv.uri,
                      original, rounds=2, seed=8, atomic=False)
    assert gzip_ok(str(image))
    with served("--filter=gzip", "file", str(image)) as srv:
        run(["nbdcopy", srv.uri, str(tmp_path / "now.raw")])
    assert zcat(str(image)) == (tmp_path / "now.raw").read_bytes()
