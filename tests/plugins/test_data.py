"""The data plugin against nbdkit's: same expression, same bytes, same extents.

The corpus is evaluated in-process (pynbd's DataDisk) and served by nbdkit
(the oracle, read back with nbdcopy and nbdinfo --map); the examples users
type are also served end to end by ``pynbd serve`` and read by real clients.
"""

from __future__ import annotations

import json
import os

import pytest

from nbdtest import nbdsh, run, served
from pynbd.backend import OpenContext, clip_extents
from pynbd.backend.stack import Stack

CORPUS = [
    "0 1 2 3 @0x1fe 0x55 0xaa",
    "( 0x55 0xAA )*2048",
    "0 1 2 3 @^0x200 @-2 le16:0xaa55",
    "@32768 1",
    "0 0 0 @32768 1",
    "1 @100000 1",
    "(@65536 1)*3",
    "1 2 3 4 @0 ( @2 9 )",
    "1 2 3 @1",
    "@100",
    "@+10 @-3 5 @+2",
    '"ab"[1:] 5',
    "(1 2 3)[1:2]*3",
    "(1 2 3)[:0]*5 9",
    "1*0 2",
    "1 @0 (@40000) 1",
    "(0)*40000 1",
    "(0 0)*40000 1",
    "(1 @+40000)*2",
    "(1 @40000)[40000:] @80000 2",
    "( 0x55 0xAA ) -> \\b ( @0x1fe \\b ) -> \\s \\s \\s",
    "(1 2)->\\a \\a \\a",
    "0x10 020 16 0",
    "le16:0x1234 be16:0x1234 le32:0x12345678 be32:0x12345678",
    "le64:0x0102030405060708 be64:0x0102030405060708 le64:0",
    '"Hello, world" @^16 "!"',
    '( "Hello" )*2000',
    "( ( 1 2 )*3 @+5 )*4000",
    "( @^4096 0xff )*40",
    "( 1 @65535 )*5 @+70000",
    "# a comment\n 1 2 # another\n 3",
    "@0x1be 0 0 2 0 0x83 0x20 0x20 0 le32:1 le32:0x7ff @0x1fe 0x55 0xaa",
    " <(i=0; while :; do printf '%04d' $i; i=$((i+1)); done)[:32768] ",
    " <(printf 'abc') *3 @^8 ",
    "</dev/zero[:40000] @65536 1",
    "( 0xff*100000 )[50000:60000] @200000 ( 0xee )*3",
]


def nbdkit_disk(args: list[str]) -> tuple[bytes, list[tuple[int, int, int]]]:
    """What nbdkit's data plugin serves for ``args``: (bytes, merged map)."""
    with served("data", *args, server="nbdkit") as srv:
        data = run(["nbdcopy", srv.uri, "-"]).stdout
        entries = json.loads(run(["nbdinfo", "--map", "--json", srv.uri]).stdout)
    return data, merge([(e["offset"], e["length"], e["type"]) for e in entries])


def pynbd_disk(args: list[str]) -> tuple[bytes, list[tuple[int, int, int]]]:
    """What pynbd's data plugin serves for ``args``, read in-process."""
    disk = Stack.from_args("data", args).open(OpenContext())
    size = disk.get_size()
    buf = bytearray(size)
    disk.pread(memoryview(buf), 0, 0)
    extents = clip_extents(disk.extents(size, 0, 0), 0, size) if size else []
    return bytes(buf), merge([(e.offset, e.length, e.state) for e in extents])


def merge(extents: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for offset, length, state in extents:
        if out and out[-1][2] == state and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length, state)
        else:
            out.append((offset, length, state))
    return out


@pytest.mark.parametrize("expr", CORPUS)
def test_same_bytes_and_extents_as_nbdkit(expr, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    theirs, ours = nbdkit_disk([expr]), pynbd_disk([expr])
    assert ours[0] == theirs[0]
    assert ours[1] == theirs[1]


@pytest.mark.parametrize("args", [
    ["( \"Hello\" )*2000", "size=8192"],
    ["1 2 3", "size=1M"],
    ["$pattern*16", "pattern=0x55 0xAA"],
    ["$outer $outer", "outer=( $inner )*2", "inner=7 8"],
    ["raw=Hello, world!"],
    ["base64=MTIz", "size=1M"],
    ["data=@^512 1", "size=100"],
])
def test_other_forms_as_nbdkit(args):
    assert pynbd_disk(args) == nbdkit_disk(args)


def test_files_are_aligned_as_nbdkit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, size in (("file1", 100), ("file2", 513), ("file3", 40000)):
        (tmp_path / name).write_bytes(os.urandom(size))
    expr = " <file1 @^512 <file2 @^512 <file3 @^512 "
    assert pynbd_disk([expr]) == nbdkit_disk([expr])
    assert len(pynbd_disk([expr])[0]) == 512 + 1024 + 40448


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("DATA_TEST_SIG", "0x55 0xaa")
    assert pynbd_disk(["@0x1fe $DATA_TEST_SIG"]) == nbdkit_disk(["@0x1fe $DATA_TEST_SIG"])


def test_string_escapes():
    data, _ = pynbd_disk(['"a\\x41\\101\\n\\"\\\\\\0"'])
    assert data == b'aAA\n"\\\x00'


def test_hole_map_with_nbdinfo():
    with served("data", " @32768 1 ") as srv:
        out = run(["nbdinfo", "--map", srv.uri]).stdout.decode().split("\n")
    assert out[0].split() == ["0", "32768", "3", "hole,zero"]
    assert out[1].split() == ["32768", "1", "0", "data"]


def test_run_hello_world():
    out = run([*SERVE, "-U", "-", "data", "raw=Hello, world!", "--run", 'nbdcopy "$uri" - | cat'])
    assert out.stdout == b"Hello, world!"


def test_boot_sector_with_qemu_img(tmp_path):
    expr = "@0x1be 0 0 2 0 0x83 0x20 0x20 0 le32:1 le32:0x7ff @0x1fe 0x55 0xaa"
    with served("data", expr, "size=1M") as srv:
        out = run(["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri, str(tmp_path / "out")])
        assert out.returncode == 0
        info = json.loads(run(["nbdinfo", "--json", srv.uri]).stdout)["exports"][0]
    image = (tmp_path / "out").read_bytes()
    assert len(image) == 1 << 20 == info["export-size"]
    assert image[0x1fe:0x200] == b"\x55\xaa" and image[0x1c6:0x1ca] == (1).to_bytes(4, "little")
    assert not any(image[0x200:])


def test_random_sectors_repeat():
    with served("data", " </dev/urandom[:512]*16 ") as srv:
        data = run(["nbdcopy", srv.uri, "-"]).stdout
    assert len(data) == 8192 and data == data[:512] * 16 and any(data)


def test_endless_command_is_cut():
    script = ' <(while :; do printf "%04x" $i; i=$((i+1)); done) [:2048] '
    with served("data", script) as srv:
        data = run(["nbdcopy", srv.uri, "-"]).stdout
    assert data == "".join(f"{i:04x}" for i in range(512)).encode()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_huge_repetition_is_lazy():
    """2 GB of ( 0x55 0xAA ): served, read at both ends, with little memory."""
    with served("data", "( 0x55 0xAA )*1000000000") as srv:
        out = nbdsh(srv.uri, "print(h.get_size(), h.pread(4, 0).hex(), h.pread(6, h.get_size() - 6).hex(), "
                             "len(h.pread(32 << 20, 1 << 30)))")
        rss = rss_kib(srv.proc.pid)
    assert out.split() == ["2000000000", "55aa55aa", "55aa55aa55aa", str(32 << 20)]
    assert rss < 300 * 1024  # far below the 2 GB the disk holds


def test_writes_stay_and_holes_follow():
    with served("data", "( 1 2 3 4 )*32768 @+98304") as srv:
        nbdsh(srv.uri, "h.pwrite(b'\\xee' * 10, 131070); h.zero(32768, 32768); "
                       "h.trim(32768, 163840); h.pwrite(b'\\0' * 32768, 196608)")
        data = run(["nbdcopy", srv.uri, "-"]).stdout
        entries = json.loads(run(["nbdinfo", "--map", "--json", srv.uri]).stdout)
    expected = bytearray(b"\1\2\3\4" * 32768 + bytes(98304))
    expected[131070:131080] = b"\xee" * 10
    expected[32768:65536] = bytes(32768)
    assert data == bytes(expected)
    states = merge([(e["offset"], e["length"], e["type"]) for e in entries])
    assert states == [(0, 32768, 0), (32768, 32768, 3), (65536, 98304, 0), (163840, 32768, 3),
                      (196608, 32768, 2)]


PYTHON = __import__("sys").executable
SERVE = [PYTHON, "-m", "pynbd", "serve"]
