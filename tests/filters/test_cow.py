"""cow filter: the same bytes, sizes and extents as nbdkit's cow filter; the base never changes;
parallel partial writes; real clients (qemu-img, qemu-io, nbdcopy, fio); a full overlay."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from contextlib import contextmanager

import pytest
from stack_helpers import BOTH, file_bytes, nbdsh_outcomes

from nbdtest import PYNBD, WAIT, nbdsh, run, served, wait_for_socket
from pynbd.backend import OpenContext, Plugin, ResidentDisk
from pynbd.backend.overlay import ABSENT, DATA, ZERO, BlockLocks, state_runs
from pynbd.backend.stack import Stack, configure
from pynbd.filters.cow import CowFilter

KiB, MiB = 1 << 10, 1 << 20
SIZE = 2 * MiB + 5000  # a partial last block


@pytest.fixture
def base(tmp_path) -> str:
    """A file with data, a hole in the middle and a short last block."""
    path = tmp_path / "base.img"
    with open(path, "wb") as f:
        f.write(os.urandom(MiB))
        f.seek(MiB + 512 * KiB)
        f.write(os.urandom(SIZE - MiB - 512 * KiB))
    return str(path)


# Writes and trims of every shape: inside one block, across blocks, whole blocks, the short
# last block. (nbdkit's cow filter offers no NBD_CMD_WRITE_ZEROES: zeroes are written as data.)
EDITS = "\n".join([
    "h.pwrite(b'A' * 100, 70000)",
    "h.pwrite(b'B' * 200000, 4000)",
    "h.pwrite(b'C' * 65536, 655360)",
    f"h.pwrite(b'D' * 3000, {SIZE - 3000})",
    "h.trim(3 * 65536, 16 * 65536)",
    "h.trim(1000, 20 * 65536 + 10)",
    "h.pwrite(bytes(5000), 24 * 65536 + 100)",
    f"h.pwrite(bytes(100), {SIZE - 200})",
    "h.flush()",
])
DUMP = "import sys, hashlib; sys.stdout.write(hashlib.sha256(h.pread(h.get_size(), 0)).hexdigest())"


def observe(uri: str) -> tuple[str, str, int]:
    """(sha256 of the disk, nbdinfo --map, size)."""
    digest = nbdsh(uri, DUMP)
    mapping = run(["nbdinfo", "--map", uri]).stdout.decode()
    size = json.loads(run(["nbdinfo", "--json", uri]).stdout)["exports"][0]["export-size"]
    return digest, mapping, size


@pytest.mark.parametrize("params", [[], ["cow-block-size=4k"], ["cow-block-size=256k"],
                                    ["cow-on-read=true"]])
def test_same_bytes_size_and_extents_as_nbdkit(base, params):
    before = file_bytes(base)
    seen = []
    for server in BOTH:
        with served("--filter=cow", "file", base, *params, server=server) as srv:
            nbdsh(srv.uri, "h.pread(300000, 10000)")  # copied up with cow-on-read
            nbdsh(srv.uri, EDITS)
            seen.append(observe(srv.uri))
    assert seen[0] == seen[1]
    assert file_bytes(base) == before


SMALL_EDITS = "h.pwrite(b'x' * 5000, 65000); h.trim(65536, 131072); h.pwrite(bytes(10), 3)"


@pytest.mark.parametrize("plugin", [["pattern", "3M"], ["data", "1 2 3 @65530 4 5 6 @1048576 7",
                                    "size=2M"]])
def test_read_only_plugins_become_writable(plugin):
    seen = []
    for server in BOTH:
        with served("--filter=cow", *plugin, server=server) as srv:
            nbdsh(srv.uri, SMALL_EDITS)
            seen.append(observe(srv.uri))
    assert seen[0] == seen[1]


def test_over_sparse_random(tmp_path):
    """(pynbd's sparse-random makes other bytes than nbdkit's: compared with itself)"""
    plugin = ("sparse-random", "4M", "seed=7")
    with served(*plugin) as srv:
        run(["nbdcopy", srv.uri, str(tmp_path / "base")])
    expected = bytearray(file_bytes(str(tmp_path / "base")))
    expected[65000:70000] = b"x" * 5000
    expected[131072:196608] = bytes(65536)
    expected[3:13] = bytes(10)
    with served("--filter=cow", *plugin) as srv:
        nbdsh(srv.uri, SMALL_EDITS)
        run(["nbdcopy", srv.uri, str(tmp_path / "out")])
    assert file_bytes(str(tmp_path / "out")) == expected


def test_zeroed_blocks_are_holes():
    """pynbd stores nothing for zeroed whole blocks and says so (nbdkit stores zero data)."""
    with served("--filter=cow", "pattern", "1M") as srv:
        nbdsh(srv.uri, "h.zero(3 * 65536, 65536 + 10)")
        assert nbdsh(srv.uri, "print(h.pread(2, 65546).hex(), h.pread(2, 262152).hex())"
                     ).split() == ["0000", "0000"]
        mapping = run(["nbdinfo", "--map", srv.uri]).stdout.decode().split("\n")
    assert mapping[:3] == [
        "         0      131072    0  data",
        "    131072      131072    3  hole,zero",
        "    262144      786432    0  data",
    ]


def test_base_is_opened_read_only_and_never_changes(base):
    before = file_bytes(base)
    with served("--filter=cow", "file", base) as srv:
        # While connected: every descriptor the server has on the base is O_RDONLY.
        flags = "\n".join([
            "import os",
            f"pid, base = {srv.proc.pid}, {base!r}",
            "for fd in os.listdir(f'/proc/{pid}/fd'):",
            "    if os.readlink(f'/proc/{pid}/fd/{fd}') != base: continue",
            "    line = next(x for x in open(f'/proc/{pid}/fdinfo/{fd}') if x.startswith('flags:'))",
            "    print(int(line.split()[1], 8) & os.O_ACCMODE == os.O_RDONLY)",
        ])
        assert nbdsh_outcomes(srv.uri, ["h.pwrite(b'z' * 100000, 1000)", f"h.zero({MiB}, 0)",
                                        "h.trim(65536, 0)", "h.flush()"]) == ["ok"] * 4
        assert set(nbdsh(srv.uri, flags).split()) == {"True"}
        assert nbdsh(srv.uri, f"print(h.pread(4, {MiB}).hex())").strip() == before[MiB:MiB + 4].hex()
    assert file_bytes(base) == before


def test_one_overlay_per_export_shared_by_its_clients():
    with served("--filter=cow", "pattern", "1M") as srv:
        sock = srv.socket
        nbdsh(f"nbd+unix:///a?socket={sock}", "h.pwrite(b'a' * 10, 100)")
        nbdsh(f"nbd+unix:///b?socket={sock}", "h.pwrite(b'b' * 10, 100)")
        for name in "ab":
            assert nbdsh(f"nbd+unix:///{name}?socket={sock}", "print(h.pread(3, 100).decode())"
                         ).strip() == name * 3
        assert nbdsh(f"nbd+unix:///?socket={sock}", "print(h.can_multi_conn(), h.pread(2, 100).hex())"
                     ).split() == ["True", "0000"]


@pytest.mark.parametrize("switch", [True, False])
def test_cow_on_read_path_switch(base, tmp_path, switch):
    flag = tmp_path / "cor"
    if switch:
        flag.touch()
    script = "\n".join([
        "h.pread(4096, 8192)",
        f"f = open({base!r}, 'r+b'); f.seek(8192); f.write(b'\\x77' * 4096); f.close()",
        "print(h.pread(2, 8192).hex())",
    ])
    before = file_bytes(base, 8192, 2).hex()
    with served("--filter=cow", "file", base, f"cow-on-read={flag}") as srv:
        assert nbdsh(srv.uri, script).strip() == (before if switch else "7777")


def test_cow_on_cache(base):
    script = "\n".join([
        "h.cache(4096, 8192)",
        f"f = open({base!r}, 'r+b'); f.seek(8192); f.write(b'\\x66' * 4096); f.close()",
        "print(h.pread(2, 8192).hex())",
    ])
    before = file_bytes(base, 8192, 2).hex()
    for on_cache, expected in (("true", before), ("false", "6666")):
        with served("--filter=cow", "file", base, f"cow-on-cache={on_cache}") as srv:
            assert nbdsh(srv.uri, script).strip() == expected


@pytest.mark.parametrize("params, message", [
    (["cow-block-size=1000"], "must be a power of 2 from 4096"),
    (["cow-block-size=2k"], "must be a power of 2 from 4096"),
    (["cow-block-size=4G"], "must be a power of 2 from 4096"),
    (["cow-on-read=maybe"], "expected true, false or /PATH"),
    (["cow-on-cache=perhaps"], "cow-on-cache"),
])
def test_bad_parameters_are_refused(params, message):
    result = run([*PYNBD, "serve", "--filter=cow", "memory", "1M", *params], check=False)
    err = result.stderr.decode()
    assert result.returncode == 1 and message in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


# ---------------------------------------------------------------- real clients

def test_qemu_img_convert_and_compare(base, tmp_path):
    out = tmp_path / "out.qcow2"
    with served("--filter=cow", "file", base) as srv:
        nbdsh(srv.uri, EDITS)
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", srv.uri, str(out)])
        run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", srv.uri, str(out)])
        assert run(["qemu-img", "compare", "-f", "raw", "-F", "raw", srv.uri, base],
                   check=False).returncode == 1


def test_qemu_io_writes_and_nbdcopy(base, tmp_path):
    copy = tmp_path / "copy.img"
    with served("--filter=cow", "file", base) as srv:
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1000 70000", "-c", "write -z 200000 300000",
             "-c", "discard 1048576 65536", "-c", "flush", srv.uri])
        run(["nbdcopy", srv.uri, str(copy)])
        run(["qemu-io", "-f", "raw", "-c", "read -P 0x5a 1000 70000", "-c", "read -P 0 200000 300000",
             "-c", "read -P 0 1048576 65536", srv.uri])
    data, original = file_bytes(str(copy)), file_bytes(base)
    assert data[1000:71000] == b"\x5a" * 70000 and data[200000:500000] == bytes(300000)
    assert data[:1000] == original[:1000] and data[500000:MiB] == original[500000:MiB]


@pytest.mark.skipif(shutil.which("fio") is None, reason="needs fio")
def test_fio_verify_four_connections_depth_32():
    """Four jobs on four connections; their regions meet inside blocks (2000k is not 64k-aligned)."""
    with served("--filter=cow", "pattern", "8M", "cow-block-size=64k") as srv:
        job = ["fio", "--name=verify", "--ioengine=nbd", f"--uri={srv.uri}", "--rw=randwrite",
               "--bsrange=512-24k", "--bs_unaligned=1", "--size=2000k", "--offset_increment=2000k",
               "--numjobs=4", "--iodepth=32", "--verify=crc32c", "--do_verify=1",
               "--verify_fatal=1", "--verify_state_save=0", "--group_reporting",
               "--output-format=json"]
        result = run(job, timeout=120)
    report = json.loads(result.stdout[result.stdout.index(b"{"):])["jobs"][0]
    assert report["error"] == 0
    assert report["write"]["io_bytes"] > 3 * 2000 * KiB and report["read"]["io_bytes"] > 3 * 2000 * KiB


# ---------------------------------------------------------------- parallel partial writes

def test_partial_writes_to_one_block_from_many_connections():
    """64 writers, each its own 1 KiB of the same two blocks, across 4 connections."""
    code = "\n".join([
        "import nbd",
        "hs = [nbd.NBD() for _ in range(4)]",
        "[x.connect_uri(h.get_uri()) for x in hs]",
        "cookies = [hs[i % 4].aio_pwrite(bytes([i + 1]) * 1024, 65536 + i * 1024) for i in range(64)]",
        "for x in hs:",
        "    while x.aio_in_flight() > 0: x.poll(-1)",
        "import sys; sys.stdout.write(h.pread(65536, 65536).hex())",
    ])
    with served("--filter=cow", "pattern", "1M", "cow-block-size=64k") as srv:
        data = bytes.fromhex(nbdsh(srv.uri, code))
    assert data == b"".join(bytes([i + 1]) * 1024 for i in range(64))


def test_partial_writes_in_process_threads():
    """Threads writing disjoint 512-byte pieces of the same blocks never lose one."""
    stack = Stack.from_args("pattern", ["256k"], ["cow"])
    conns = [stack.open(OpenContext()) for _ in range(4)]
    try:
        def writer(t: int) -> None:
            for i in range(t, 512, 8):
                conns[t % 4].pwrite(memoryview(bytes([i % 251 + 1]) * 512), i * 512, 0)
        threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        buf = bytearray(256 * KiB)
        conns[0].pread(memoryview(buf), 0, 0)
        assert bytes(buf) == b"".join(bytes([i % 251 + 1]) * 512 for i in range(512))
    finally:
        for conn in conns:
            conn.close()
        stack.unload()


def test_state_runs_and_block_locks():
    states = bytes([ABSENT, ABSENT, DATA, ZERO, ZERO, DATA, ABSENT])
    assert list(state_runs(states, 10)) == [(ABSENT, 10, 12), (DATA, 12, 13), (ZERO, 13, 15),
                                            (DATA, 15, 16), (ABSENT, 16, 17)]
    assert list(state_runs(b"")) == []
    locks = BlockLocks(4)
    assert locks.one(1) is locks.one(5) and locks.one(1) is not locks.one(2)
    with locks.hold(3, 6):  # stripes 3, 0, 1, taken in order
        assert locks.one(0).locked() and locks.one(3).locked() and not locks.one(2).locked()
    assert not any(lock.locked() for lock in locks.stripes)


# ---------------------------------------------------------------- a full overlay

def test_full_overlay_file_system_gives_enospc(small_tmpfs):
    env = {**os.environ, "TMPDIR": str(small_tmpfs)}
    with served("--filter=cow", "pattern", "8M", env=env) as srv:
        outcomes = nbdsh_outcomes(srv.uri, [
            "h.pwrite(b'k' * 65536, 0)",
            "h.pwrite(b'm' * (4 * 1024 * 1024), 1024 * 1024)",   # more than the tmpfs holds
            "h.pwrite(b'n' * 100, 7 * 1024 * 1024 + 5)",
        ])
        assert outcomes[0] == "ok" and outcomes[1] == "ENOSPC"
        # the server keeps serving, what was written is still there
        assert nbdsh(srv.uri, "print(h.pread(4, 0).hex(), h.pread(8, 7 * 1024 * 1024 + 8).hex())"
                     ).split()[0] == "6b6b6b6b"
        assert nbdsh_outcomes(srv.uri, ["h.zero(8 * 1024 * 1024, 0)", "h.pwrite(b'p' * 4096, 0)"]) \
            == ["ok", "ok"]
        assert nbdsh(srv.uri, "print(h.pread(2, 0).hex())").strip() == "7070"
    stderr = srv.stderr()
    assert "Traceback" not in stderr


def test_overlay_is_an_unlinked_file_in_tmpdir(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    with served("--filter=cow", "pattern", "1M", env=env) as srv:
        nbdsh(srv.uri, "h.pwrite(b'q' * 65536, 0)")
        pid = srv.proc.pid
        targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        assert any(t.startswith(str(tmp_path)) and t.endswith("(deleted)") for t in targets)
        assert os.listdir(tmp_path) == []


class GatedDisk(ResidentDisk):
    """Reads of the first 64 KiB wait until the gate opens."""

    def __init__(self, plugin: GatedPlugin) -> None:
        super().__init__(MiB)
        self.plugin = plugin

    def pread(self, buf, offset, flags):
        if offset < 65536:
            self.plugin.waiting.set()
            assert self.plugin.gate.wait(WAIT)
        buf[:] = bytes(len(buf))


class GatedPlugin(Plugin):
    name = "gated"

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.waiting = threading.Event(), threading.Event()

    def open(self, ctx):
        return GatedDisk(self)


def test_other_blocks_never_wait_for_a_read_modify_write():
    plugin = GatedPlugin()
    stack = Stack(plugin, [configure(CowFilter, [])])
    a, b = stack.open(OpenContext()), stack.open(OpenContext())
    try:
        rmw = threading.Thread(target=a.pwrite, args=(memoryview(b"x" * 100), 10, 0))
        rmw.start()
        assert plugin.waiting.wait(WAIT)  # block 0's read-modify-write is reading below
        b.pwrite(memoryview(b"y" * 65536), 65536, 0)  # block 1, whole
        b.pwrite(memoryview(b"z" * 10), 200000, 0)  # block 3, partial
        b.zero(65536, 5 * 65536, 0)
        buf = bytearray(10)
        b.pread(memoryview(buf), 200000, 0)
        assert bytes(buf) == b"z" * 10 and rmw.is_alive()
        plugin.gate.set()
        rmw.join(WAIT)
        b.pread(memoryview(buf), 8, 0)
        assert bytes(buf) == bytes(2) + b"x" * 8
    finally:
        plugin.gate.set()
        a.close()
        b.close()
        stack.unload()


def test_allocation_depth_matches_qemu_nbd_over_a_qcow2_with_a_raw_backing_file(tmp_path):
    """The same writes through --filter=cow and into a qcow2 overlay; qemu-nbd -A is the oracle."""
    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.truncate(4 << 20)
        f.seek(1 << 20)
        f.write(b"x" * 65536)
    top = tmp_path / "top.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top)])
    writes = ["-c", "write -P 1 2M 4k", "-c", "write -z 3M 64k", "-c", "write -P 2 100k 1k"]
    run(["qemu-io", "-f", "qcow2", *writes, str(top)])
    maps = []
    with served("--filter=cow", "file", str(base)) as srv:
        run(["qemu-io", "-f", "raw", *writes, srv.uri])
        maps.append(run(["nbdinfo", "--map=qemu:allocation-depth", srv.uri]).stdout.decode())
        contexts = json.loads(run(["nbdinfo", "--json", srv.uri]).stdout)["exports"][0]["contexts"]
        assert "qemu:allocation-depth" in contexts
    sock = tmp_path / "q.sock"
    with served_qemu(str(sock), str(top)):
        maps.append(run(["nbdinfo", "--map=qemu:allocation-depth", f"nbd+unix:///?socket={sock}"]).stdout.decode())
    assert maps[0] == maps[1]
    assert "local" in maps[0] and "backing depth 2" in maps[0]


@contextmanager
def served_qemu(sock: str, image: str):
    """qemu-nbd serving ``image`` read-only with qemu:allocation-depth (-A)."""
    proc = subprocess.Popen(["qemu-nbd", "-r", "-A", "-f", "qcow2", "-k", sock, image],
                            stderr=subprocess.PIPE)
    try:
        wait_for_socket(sock, proc)
        yield proc
    finally:
        proc.terminate()
        proc.wait()
