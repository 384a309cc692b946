"""random: seeded, stable across reads, writes checked against the disk."""

from __future__ import annotations

import hashlib

from nbdtest import PYNBD, nbdsh, run, served


def digest(*args: str) -> str:
    with served("random", *args) as srv:
        return hashlib.sha256(run(["nbdcopy", srv.uri, "-"]).stdout).hexdigest()


def test_same_seed_same_bytes():
    assert digest("4M", "seed=11") == digest("4M", "seed=11") != digest("4M", "seed=12")


def test_reads_are_stable_and_random_looking():
    with served("random", "8M", "seed=1") as srv:
        out = nbdsh(srv.uri, (
            "a = h.pread(1 << 20, 12345)\n"
            "b = h.pread(100, 12345 + 500)\n"
            "print(a[500:600] == b, len(set(a)) == 256, a.count(0) < 8000)\n"))
    assert out.split() == ["True", "True", "True"]


def test_copy_onto_itself_succeeds():
    for tool in ('nbdcopy "$uri" "$uri"', 'qemu-img convert -n "$uri" "$uri"'):
        run([*PYNBD, "serve", "-U", "-", "random", "64M", "--run", tool])


def test_other_data_fails_with_eio():
    with served("random", "1M", "seed=4") as srv:
        out = nbdsh(srv.uri, (
            "good = h.pread(4096, 4096)\n"
            "h.pwrite(good, 4096)\n"
            "try:\n"
            "    h.pwrite(good[:-1] + bytes([good[-1] ^ 0x80]), 4096)\n"
            "except nbd.Error as e:\n"
            "    print(e.errno)\n"))
    assert out.split() == ["EIO"]
    result = run([*PYNBD, "serve", "-U", "-", "random", "16M", "seed=4", "--run",
                  'nbdkit -U - random 16M seed=5 --run \'nbdcopy "$uri" "$0"\' "$uri"'], check=False)
    assert result.returncode != 0
