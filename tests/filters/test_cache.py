"""cache filter: when data reaches the plugin in each mode, cache-on-read, eviction, extents."""

from __future__ import annotations

import random

import pytest
from stack_helpers import file_bytes

from nbdtest import PYNBD, nbdsh, run, served

MiB = 1 << 20


@pytest.fixture
def disk(tmp_path) -> str:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.write(b"\x11" * MiB)
        f.truncate(2 * MiB)  # the second MiB is a hole
    return str(path)


def peek(disk: str, offset: int, length: int) -> str:
    """nbdsh code printing what the file itself holds at offset."""
    return f"f = open({disk!r}, 'rb'); f.seek({offset}); print(f.read({length}).hex()); f.close()"


def test_writeback_keeps_writes_until_flush(disk):
    script = "\n".join([
        "h.pwrite(b'\\x22' * 100, 1000)",
        peek(disk, 1000, 2),                          # file untouched
        "print(h.pread(2, 1000).hex())",              # but the client sees its write
        "h.zero(4096, 8192)",
        "print(h.pread(2, 8192).hex())",
        "h.pwrite(b'\\x33' * 10, MiB + 5)".replace("MiB", str(MiB)),
        "e = []; h.block_status(65536, " + str(MiB) + ", lambda m, o, ents, err: e.extend(ents))",
        "print(e[1] & 1)",                            # the dirty block shows as data
        "h.flush()",
        peek(disk, 1000, 2), peek(disk, 8192, 2), peek(disk, MiB + 5, 2),
    ])
    with served("--filter=cache", "file", disk) as srv:
        out = run(["nbdsh", "--base-allocation", "-u", srv.uri, "-c", script]).stdout.decode().split()
    assert out == ["1111", "2222", "0000", "0", "2222", "0000", "3333"]


def test_writethrough_writes_at_once(disk):
    script = "\n".join(["h.pread(4096, 0)", "h.pwrite(b'\\x44' * 10, 0)", peek(disk, 0, 2)])
    with served("--filter=cache", "file", disk, "cache=writethrough", "cache-on-read=true") as srv:
        assert nbdsh(srv.uri, script).split() == ["4444"]


def test_unsafe_ignores_flush(disk):
    script = "\n".join(["h.pwrite(b'\\x55' * 10, 0)", "h.flush()", peek(disk, 0, 2),
                        "print(h.pread(2, 0).hex())"])
    with served("--filter=cache", "file", disk, "cache=unsafe") as srv:
        assert nbdsh(srv.uri, script).split() == ["1111", "5555"]


@pytest.mark.parametrize("on_read, expected", [("true", "1111"), ("false", "6666")])
def test_cache_on_read(disk, on_read, expected):
    script = "\n".join([
        "h.pread(4096, 0)",
        f"f = open({disk!r}, 'r+b'); f.write(b'\\x66' * 4096); f.close()",  # change it underneath
        "print(h.pread(2, 0).hex())",
    ])
    with served("--filter=cache", "file", disk, f"cache-on-read={on_read}") as srv:
        assert nbdsh(srv.uri, script).split() == [expected]


def test_cache_on_read_path_switch(disk, tmp_path):
    switch = tmp_path / "switch"
    script = "\n".join([
        "h.pread(4096, 0)",
        f"f = open({disk!r}, 'r+b'); f.write(b'\\x77' * 4096); f.close()",
        "print(h.pread(2, 0).hex())",
        f"open({str(switch)!r}, 'w').close()",
        "h.pread(4096, 65536)",
        f"f = open({disk!r}, 'r+b'); f.seek(65536); f.write(b'\\x78' * 4096); f.close()",
        "print(h.pread(2, 65536).hex())",
    ])
    with served("--filter=cache", "file", disk, f"cache-on-read={switch}") as srv:
        assert nbdsh(srv.uri, script).split() == ["7777", "1111"]


def test_small_cache_evicts_without_losing_data(disk, tmp_path):
    source = tmp_path / "source.img"
    source.write_bytes(random.Random(5).randbytes(2 * MiB))
    with served("--filter=cache", "file", disk, "cache-max-size=256k",
                "cache-min-block-size=64k") as srv:
        run(["nbdcopy", "--flush", str(source), srv.uri])
        run(["nbdcopy", srv.uri, str(tmp_path / "back.img")])
    assert (tmp_path / "back.img").read_bytes() == source.read_bytes()
    assert file_bytes(disk) == source.read_bytes()


def test_clients_share_the_cache(disk):
    with served("--filter=cache", "file", disk) as srv:
        nbdsh(srv.uri, "h.pwrite(b'\\x88' * 4, 300)")
        assert nbdsh(srv.uri, "print(h.pread(4, 300).hex())").strip() == "88888888"
    assert file_bytes(disk, 300, 4) == b"\x11" * 4  # never flushed


@pytest.mark.parametrize("params, message", [
    (["cache=fast"], "is not one of"),
    (["cache-min-block-size=1000"], "must be a power of 2"),
    (["cache-low-threshold=90", "cache-high-threshold=80"], "thresholds"),
    (["cache-on-read=maybe"], "expected true, false or /PATH"),
])
def test_bad_parameters_are_refused(params, message):
    result = run([*PYNBD, "serve", "--filter=cache", "memory", "1M", *params], check=False)
    assert result.returncode == 1 and message in result.stderr.decode()
