"""sparse-random: stable per seed, holes in extents, writes checked."""

from __future__ import annotations

import hashlib
import json

import pytest

from nbdtest import PYNBD, nbdsh, run, served
from pynbd.backend import ConfigError, OpenContext
from pynbd.backend.stack import Stack


def digest_and_map(*args: str) -> tuple[str, list]:
    with served("sparse-random", *args) as srv:
        digest = hashlib.sha256(run(["nbdcopy", srv.uri, "-"]).stdout).hexdigest()
        entries = json.loads(run(["nbdinfo", "--map", "--json", srv.uri]).stdout)
    return digest, [(e["offset"], e["length"], e["type"]) for e in entries]


def test_same_seed_same_disk_different_seed_other_disk():
    first = digest_and_map("64M", "seed=7", "runlength=1M")
    assert first == digest_and_map("64M", "seed=7", "runlength=1M")
    assert first[0] != digest_and_map("64M", "seed=8", "runlength=1M")[0]


def test_percent_and_holes_in_map():
    with served("sparse-random", "1G", "seed=1", "percent=25", "runlength=1M") as srv:
        entries = [(e["offset"], e["length"], e["type"])
                   for e in json.loads(run(["nbdinfo", "--map", "--json", srv.uri]).stdout)]
    data = sum(length for _, length, kind in entries if kind == 0)
    holes = sum(length for _, length, kind in entries if kind == 3)
    assert data + holes == 1 << 30
    assert 0.15 < data / (1 << 30) < 0.35
    assert all(offset % 4096 == 0 for offset, _, _ in entries)


def test_data_blocks_hold_nonzero_bytes_holes_zero():
    stack = Stack.from_args("sparse-random", ["256M", "seed=3", "percent=50", "runlength=64K"])
    disk = stack.open(OpenContext())
    extents = list(disk.extents(8 << 20, 0, 0))
    assert len(extents) > 4
    for ext in extents:
        buf = bytearray(ext.length)
        disk.pread(memoryview(buf), ext.offset, 0)
        assert buf.count(0) == (len(buf) if ext.hole else 0)


def test_percent_extremes():
    assert digest_and_map("8M", "seed=1", "percent=0")[1] == [(0, 8 << 20, 3)]
    assert digest_and_map("8M", "seed=1", "percent=100")[1] == [(0, 8 << 20, 0)]


@pytest.mark.parametrize("tool", [
    'nbdcopy "$uri" "$uri"',
    'qemu-img convert -n "$uri" "$uri"',
])
def test_copy_onto_itself(tool):
    result = run([*PYNBD, "serve", "-U", "-", "sparse-random", "16G", "seed=5", "--run", tool],
                 timeout=110)
    assert result.returncode == 0


def test_random_content_copy_onto_itself():
    run([*PYNBD, "serve", "-U", "-", "sparse-random", "1G", "seed=5", "random-content=true",
         "--run", 'nbdcopy "$uri" "$uri"'])


def test_corrupting_write_fails_with_eio():
    with served("sparse-random", "1G", "seed=2", "percent=100") as srv:
        out = nbdsh(srv.uri, (
            "buf = h.pread(4096, 8192)\n"
            "h.pwrite(buf, 8192)\n"
            "for bad in (bytes(4096), bytes([buf[0] ^ 1]) + buf[1:]):\n"
            "    try:\n"
            "        h.pwrite(bad, 8192)\n"
            "        print('accepted')\n"
            "    except nbd.Error as e:\n"
            "        print(e.errno)\n"
            "try:\n"
            "    h.zero(4096, 8192)\n"
            "except nbd.Error as e:\n"
            "    print(e.errno)\n"))
    assert out.split() == ["EIO", "EIO", "EIO"]


def test_copy_from_another_disk_fails():
    result = run([*PYNBD, "serve", "-U", "-", "sparse-random", "64M", "seed=9", "--run",
                  'nbdkit -U - pattern 64M --run \'nbdcopy "$uri" "$0"\' "$uri"'], check=False)
    assert result.returncode != 0


def test_terabyte_uses_little_memory():
    with served("sparse-random", "1T", "seed=1") as srv:
        out = nbdinfo_totals(srv.uri)
        with open(f"/proc/{srv.proc.pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    assert 0.05 < out < 0.15
    assert rss < 200 * 1024


def nbdinfo_totals(uri: str) -> float:
    entries = json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout)
    return sum(e["length"] for e in entries if e["type"] == 0) / (1 << 40)


@pytest.mark.parametrize("args", [["1G", "percent=101"], ["1G", "percent=-1"], ["1G", "runlength=0"],
                                  ["seed=1"], ["1G", "seed=x"]])
def test_bad_parameters(args):
    with pytest.raises(ConfigError, match="^sparse-random: "):
        Stack.from_args("sparse-random", args)
