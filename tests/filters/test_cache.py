"""cache filter: when data reaches the plugin in each mode, cache-on-read, eviction, extents."""

from __future__ import annotations

import errno
import os
import random

import pytest
from stack_helpers import file_bytes

from nbdtest import PYNBD, nbdsh, run, served
from pynbd.backend import OpenContext, linux
from pynbd.backend.stack import Stack

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


# ---------------------------------------------------------------- zeroing the cache file
# In process, through the Connection interface, so the Linux calls can be replaced.
BLOCK = 65536


@pytest.fixture
def cached(disk):
    """A writeback cache with 64k blocks over the file plugin."""
    stack = Stack.from_args("file", [disk, "cache-min-block-size=64k"], ["cache"])
    conn = stack.open(OpenContext())
    try:
        yield conn
    finally:
        conn.close()
        stack.unload()


def read(conn, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    conn.pread(memoryview(buf), offset, 0)
    return bytes(buf)


def refusing(code: int, calls: list):
    def punch_hole(fd: int, offset: int, count: int) -> None:
        calls.append((offset, count))
        raise OSError(code, os.strerror(code))
    return punch_hole


def test_zero_without_holes_writes_zeroes(cached, disk, monkeypatch):
    cached.pwrite(memoryview(b"\x99" * 3 * BLOCK), BLOCK, 0)  # cached, dirty
    calls: list = []
    monkeypatch.setattr(linux, "punch_hole", refusing(errno.EOPNOTSUPP, calls))
    cached.zero(2 * BLOCK, BLOCK, 0)
    assert calls == [(BLOCK, BLOCK), (2 * BLOCK, BLOCK)]  # the whole blocks: punch first
    assert read(cached, 0, 5 * BLOCK) == (b"\x11" * BLOCK + bytes(2 * BLOCK) + b"\x99" * BLOCK
                                          + b"\x11" * BLOCK)
    cached.flush(0)
    assert file_bytes(disk, BLOCK, 3 * BLOCK) == bytes(2 * BLOCK) + b"\x99" * BLOCK


def test_zero_with_a_real_error_fails(cached, disk, monkeypatch):
    cached.pwrite(memoryview(b"\x99" * BLOCK), BLOCK, 0)
    calls: list = []
    monkeypatch.setattr(linux, "punch_hole", refusing(errno.ENOSPC, calls))
    with pytest.raises(OSError) as failed:
        cached.zero(BLOCK, BLOCK, 0)
    assert failed.value.errno == errno.ENOSPC and calls == [(BLOCK, BLOCK)]
    assert read(cached, BLOCK, 4) == b"\x99" * 4  # no zeroes written behind the error's back
    monkeypatch.setattr(linux, "punch_hole", refusing(errno.EIO, calls))
    with pytest.raises(OSError) as failed:
        cached.zero(BLOCK, BLOCK, 0)
    assert failed.value.errno == errno.EIO


def test_evicting_without_holes_keeps_data_right(disk, monkeypatch, tmp_path):
    """Forgotten blocks need no zeroes: nothing reads them before they are written whole."""
    calls: list = []
    monkeypatch.setattr(linux, "punch_hole", refusing(errno.EOPNOTSUPP, calls))
    source = random.Random(9).randbytes(2 * MiB)
    stack = Stack.from_args("file", [disk, "cache-min-block-size=64k", "cache-max-size=256k"],
                            ["cache"])
    conn = stack.open(OpenContext())
    try:
        for offset in range(0, 2 * MiB, 3 * BLOCK // 2):  # unaligned: partial blocks too
            piece = source[offset:offset + 3 * BLOCK // 2]
            conn.pwrite(memoryview(piece), offset, 0)
        assert calls  # eviction tried to give space back
        assert read(conn, 0, 2 * MiB) == source
        conn.flush(0)
    finally:
        conn.close()
        stack.unload()
    assert file_bytes(disk) == source


def test_partial_block_zero_never_punches(cached, monkeypatch):
    cached.pwrite(memoryview(b"\x99" * BLOCK), 0, 0)
    calls: list = []
    monkeypatch.setattr(linux, "punch_hole", refusing(errno.EIO, calls))
    cached.zero(1000, 100, 0)  # inside one block: zero bytes, whatever punching would say
    assert calls == [] and read(cached, 0, 1200) == b"\x99" * 100 + bytes(1000) + b"\x99" * 100


def open_files(pid: int) -> list[str]:
    """What a running process has open; an fd closed while we look (a socket) is skipped."""
    fds = f"/proc/{pid}/fd"
    paths = []
    for fd in os.listdir(fds):
        try:
            paths.append(os.readlink(os.path.join(fds, fd)))
        except FileNotFoundError:
            continue  # closed between listing the directory and reading the link
    return paths


def test_cache_file_on_a_file_system_without_holes(disk, ramfs):
    """TMPDIR on ramfs: zeroed and trimmed blocks work, with zeroes written instead of holes."""
    script = "\n".join([
        "h.pwrite(b'\\x22' * 262144, 0)",
        "h.zero(131072, 65536)",                # whole blocks 1, 2: no hole, zeroes written
        "h.zero(10, 5)",                        # part of block 0
        "h.trim(65536, 196608)",                # block 3 forgotten (no hole: bytes left)
        "print(h.pread(20, 0).hex(), h.pread(131072, 65536) == bytes(131072))",
        "h.pwrite(b'\\x33' * 4, 196608)",    # block 3 is loaded again before the write
        "print(h.pread(8, 196608).hex())",
        "h.flush()",
    ])
    env = {**os.environ, "TMPDIR": str(ramfs)}
    with served("--filter=cache", "file", disk, "cache-min-block-size=64k", env=env) as srv:
        out = nbdsh(srv.uri, script).split()
        assert any(path.startswith(str(ramfs)) for path in open_files(srv.proc.pid))
    assert out == ["22" * 5 + "00" * 10 + "22" * 5, "True", "33" * 4 + "00" * 4]
    assert file_bytes(disk, 0, 262144) == (b"\x22" * 5 + bytes(10) + b"\x22" * (65536 - 15)
                                           + bytes(131072) + b"\x33" * 4 + bytes(65532))
