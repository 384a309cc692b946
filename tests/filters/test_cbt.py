"""cbt filter: changed-block tracking served as qemu:dirty-bitmap contexts, checked against qemu-nbd."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import struct
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from pynbd.backend import FLAG_FUA, OpenContext
from pynbd.backend.stack import Stack

sys.path.insert(0, str(Path(__file__).parent.parent / "server"))
from rawnbd import (  # noqa: E402
    CMD_BLOCK_STATUS,
    F_PAYLOAD_LEN,
    REP_ACK,
    TYPE_BLOCK_STATUS_EXT,
    TYPE_ERROR,
    RawClient,
)

from crashtest import kill_during_storm  # noqa: E402
from nbdtest import PYNBD, nbdsh, run, served, wait_for_socket  # noqa: E402

MiB = 1 << 20
# The same writes for pynbd and for qemu: (qemu-io command) — unaligned ones included.
WRITES = ["write -P 1 1M 64k", "write -P 2 10M 1k", "write -z 3000k 100k", "discard 20M 192k",
          "write -P 3 63M 1M", "write -P 4 5000 3"]


def ctl(path: Path, *words: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([*PYNBD, "ctl", str(path), *words], check=check)


def ctl_json(path: Path, *words: str) -> object:
    return json.loads(ctl(path, "--json", *words).stdout)


@contextmanager
def tracked(tmp_path: Path, *params: str):
    image = tmp_path / "disk.img"
    if not image.exists():
        image.write_bytes(b"")
        os.truncate(image, 64 * MiB)
    control = tmp_path / "ctl"
    with served("--filter=cbt", "file", str(image), f"bitmap-dir={tmp_path / 'bitmaps'}", *params,
                options=("--control", str(control))) as srv:
        srv.control = control
        yield srv


def nbdinfo_map(uri: str, context: str) -> list[tuple[int, int, int]]:
    out = json.loads(run(["nbdinfo", "--json", f"--map={context}", uri]).stdout)
    return [(e["offset"], e["length"], e["type"]) for e in out]


def qemu_dirty_map(tmp_path: Path, granularity: str) -> list[tuple[int, int, int]]:
    """The same writes applied to a qcow2 with a persistent bitmap, as qemu-nbd -B serves it."""
    image = tmp_path / "oracle.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", str(image), "64M"])
    run(["qemu-img", "bitmap", "--add", "--granularity", granularity, str(image), "b0"])
    run(["qemu-io", "-f", "qcow2", *sum((["-c", w] for w in WRITES), []), str(image)])
    sock = tmp_path / "qemu.sock"
    proc = subprocess.Popen(["qemu-nbd", "-r", "-f", "qcow2", "-B", "b0", "-k", str(sock), str(image)],
                            stderr=subprocess.PIPE)
    try:
        wait_for_socket(str(sock), proc)
        return nbdinfo_map(f"nbd+unix:///?socket={sock}", "qemu:dirty-bitmap:b0")
    finally:
        proc.terminate()
        proc.wait()


@pytest.mark.parametrize("granularity", ["64K", "4K"])
def test_dirty_map_matches_qemu_nbd(tmp_path, granularity):
    with tracked(tmp_path, f"granularity={granularity}") as srv:
        ctl(srv.control, "checkpoint", "create", "b0")
        run(["qemu-io", "-f", "raw", *sum((["-c", w] for w in WRITES), []), srv.uri])
        mine = nbdinfo_map(srv.uri, "qemu:dirty-bitmap:b0")
    assert mine == qemu_dirty_map(tmp_path, granularity)
    assert any(kind == 1 for _, _, kind in mine)


def test_checkpoints_split_periods_and_libnbd_reads_several_contexts(tmp_path):
    with tracked(tmp_path) as srv:
        ctl(srv.control, "checkpoint", "create", "c1")
        nbdsh(srv.uri, "h.pwrite(b'a' * 4096, 1 << 20)")
        ctl(srv.control, "checkpoint", "create", "c2")
        nbdsh(srv.uri, "h.pwrite(b'b' * 4096, 8 << 20)")
        assert nbdinfo_map(srv.uri, "qemu:dirty-bitmap:c2") == [
            (0, 8 * MiB, 0), (8 * MiB, 65536, 1), (8 * MiB + 65536, 56 * MiB - 65536, 0)]
        code = """
import json
h = nbd.NBD()
for c in ("base:allocation", "qemu:dirty-bitmap:c1", "qemu:dirty-bitmap:c2", "qemu:dirty-bitmap:nope"):
    h.add_meta_context(c)
h.connect_uri(URI)
seen = {}
def got(context, offset, entries, err):
    seen[context] = entries
h.block_status(16 << 20, 0, got)
print(json.dumps([h.can_meta_context("qemu:dirty-bitmap:nope"), seen]))
""".replace("URI", repr(srv.uri))
        can_nope, seen = json.loads(run(["nbdsh", "-c", code]).stdout)
        assert can_nope is False  # unknown bitmaps are not selected; the rest is
        assert seen["qemu:dirty-bitmap:c1"] == [MiB, 0, 65536, 1, 7 * MiB - 65536, 0, 65536, 1,
                                                8 * MiB - 65536, 0]
        assert seen["qemu:dirty-bitmap:c2"][:4] == [8 * MiB, 0, 65536, 1]
        assert "base:allocation" in seen
        listed = run(["nbdinfo", "--json", "--list", srv.uri]).stdout
        assert json.loads(listed)["exports"][0]["contexts"] == [
            "base:allocation", "qemu:dirty-bitmap:c1", "qemu:dirty-bitmap:c2"]
        # qemu reads a bitmap the way its own tests do: x-dirty-bitmap with qemu-img map.
        socket = srv.uri.split("socket=")[1]
        mapped = json.loads(run(["qemu-img", "map", "--output=json", "--image-opts",
                                 f"driver=nbd,server.type=unix,server.path={socket},"
                                 f"x-dirty-bitmap=qemu:dirty-bitmap:c2"]).stdout)
        # with x-dirty-bitmap, qemu reports dirty granules as not-data ("data": false)
        dirty = [(m["start"], m["length"]) for m in mapped if not m["data"]]
        assert dirty == [(8 * MiB, 65536)]
        assert [c["name"] for c in ctl_json(srv.control, "checkpoint", "list")] == ["c1", "c2"]


def test_extended_headers_and_the_payload_that_selects_contexts(tmp_path):
    with tracked(tmp_path) as srv:
        ctl(srv.control, "checkpoint", "create", "c1")
        nbdsh(srv.uri, "h.pwrite(b'a' * 512, 65536)")
        with RawClient.connect(srv.socket) as c:
            c.greet()
            assert c.option(11)[-1][0] == REP_ACK
            c.extended = True
            c.set_meta_context("", ("base:allocation", "qemu:dirty-bitmap:c1"))
            c.go()
            assert c.flags & (1 << 12)  # NBD_FLAG_BLOCK_STAT_PAYLOAD
            # every negotiated context: two BLOCK_STATUS_EXT chunks
            c.send_request(CMD_BLOCK_STATUS, 0, 4 * 65536)
            chunks = c.read_chunks()
            assert [ch.type for ch in chunks] == [TYPE_BLOCK_STATUS_EXT] * 2
            # only context 2 (the bitmap), selected by the payload; the effect length is in it
            c.send_request(CMD_BLOCK_STATUS, 0, 12, F_PAYLOAD_LEN, payload=struct.pack(">QI", 4 * 65536, 2))
            (chunk,) = c.read_chunks()
            context_id, count = struct.unpack_from(">II", chunk.payload)
            descriptors = [struct.unpack_from(">QQ", chunk.payload, 8 + 16 * i) for i in range(count)]
            assert context_id == 2 and descriptors == [(65536, 0), (65536, 1), (2 * 65536, 0)]
            # an unknown id: EINVAL, and the connection goes on
            c.send_request(CMD_BLOCK_STATUS, 0, 12, F_PAYLOAD_LEN, payload=struct.pack(">QI", 4096, 9))
            (chunk,) = c.read_chunks()
            assert chunk.type == TYPE_ERROR and chunk.chunk_error == 22
            assert c.pread(65536, 4) == b"aaaa"


def test_bitmaps_survive_a_clean_restart_and_not_a_kill(tmp_path):
    with tracked(tmp_path) as srv:
        ctl(srv.control, "checkpoint", "create", "c1")
        nbdsh(srv.uri, "h.pwrite(b'a' * 4096, 1 << 20)")
    with tracked(tmp_path) as srv:  # stopped with SIGTERM: a clean stop
        assert nbdinfo_map(srv.uri, "qemu:dirty-bitmap:c1")[1] == (MiB, 65536, 1)
        nbdsh(srv.uri, "h.pwrite(b'b' * 4096, 2 << 20); h.flush()")
        os.kill(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait()
    with tracked(tmp_path) as srv:
        (c1,) = ctl_json(srv.control, "checkpoint", "list")
        assert c1["state"] == "inconsistent" and c1["dirty_bytes"] is None
        result = run(["nbdinfo", "--map=qemu:dirty-bitmap:c1", srv.uri], check=False)
        assert result.returncode != 0  # never served as if it were complete
        ctl(srv.control, "checkpoint", "create", "c2")  # new checkpoints are fine
        assert nbdinfo_map(srv.uri, "qemu:dirty-bitmap:c2") == [(0, 64 * MiB, 0)]
    assert "may have missed writes and are now inconsistent" in srv.stderr()


def test_merge_and_delete(tmp_path):
    with tracked(tmp_path) as srv:
        ctl(srv.control, "checkpoint", "create", "a")
        nbdsh(srv.uri, "h.pwrite(b'a' * 10, 0)")
        ctl(srv.control, "checkpoint", "create", "b")
        nbdsh(srv.uri, "h.pwrite(b'b' * 10, 1 << 20)")
        ctl(srv.control, "checkpoint", "create", "c")
        assert ctl_json(srv.control, "checkpoint", "merge", "a", "c")["dirty_bytes"] == 2 * 65536
        assert [e[2] for e in nbdinfo_map(srv.uri, "qemu:dirty-bitmap:c")] == [1, 0, 1, 0]
        ctl(srv.control, "checkpoint", "delete", "b")
        assert [c["name"] for c in ctl_json(srv.control, "checkpoint", "list")] == ["a", "c"]
    # a clean stop saved the bitmaps (creating a checkpoint writes only the list)
    assert sorted(os.listdir(tmp_path / "bitmaps")) == ["a.bitmap", "c.bitmap", "checkpoints.json"]


@pytest.mark.parametrize("verbose", [False, True])
def test_writes_reach_the_layer_below_unchanged(tmp_path, caplog, verbose):
    """cbt hands each write, FUA flag included, to the layer below as it came and marks its
    granules; with -v the layer below's boundary logs it."""
    if verbose:
        caplog.set_level(logging.DEBUG, logger="pynbd.layer")
    stack = Stack.from_args("memory", ["1M", f"bitmap-dir={tmp_path}"], ["cbt"])
    stack.get_ready()
    stack.filters[0].create("c1")
    top = stack.open(OpenContext())
    try:
        top.pwrite(memoryview(b"x" * 100), 70000, 0)
        top.pwrite(memoryview(b"y" * 70000), 200000, FLAG_FUA)
        got = bytearray(3)
        top.pread(memoryview(got), 70099, 0)
        assert got == b"x\0\0"
        assert list(top.block_status("qemu:dirty-bitmap:c1", 1 << 20, 0, 0)) == [
            (0, 65536, 0), (65536, 65536, 1), (131072, 65536, 0), (196608, 131072, 1),
            (327680, 720896, 0)]
    finally:
        top.close()
        stack.unload()
    below = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory: pwrite")]
    assert below == (["memory: pwrite count=100 offset=70000 flags=0",
                      f"memory: pwrite count=70000 offset=200000 flags={FLAG_FUA:#x}"] if verbose else [])


def test_many_periods_match_a_model_across_deletes_merges_and_a_clean_restart(tmp_path):
    """Writes mark only the current period; every checkpoint still answers everything written
    since it was created (its own bitmap OR'ed with the periods after it), through deletes,
    a merge and a clean restart (the files then hold the whole answer)."""
    rng = random.Random(7)
    g, size = 65536, 4 << 20
    granules = size // g
    model: dict[str, set[int]] = {}

    def stack_up() -> tuple[Stack, object]:
        stack = Stack.from_args("memory", [str(size), f"bitmap-dir={tmp_path}"], ["cbt"])
        stack.get_ready()
        return stack, stack.open(OpenContext())

    def write(top, n: int) -> None:
        for _ in range(n):
            offset = rng.randrange(size - 200000)
            count = rng.choice([1, 512, 4096, g, 3 * g + 5])
            top.pwrite(memoryview(b"w" * count), offset, 0)
            for dirty in model.values():
                dirty.update(range(offset // g, (offset + count - 1) // g + 1))

    def check(top) -> None:
        for name, dirty in model.items():
            got = {i for lo, length, flags in top.block_status(f"qemu:dirty-bitmap:{name}", size, 0, 0)
                   if flags for i in range(lo // g, (lo + length) // g)}
            assert got == dirty, name
            assert got <= set(range(granules))

    stack, top = stack_up()
    cbt = stack.filters[0]
    write(top, 5)  # before any checkpoint: tracked by none
    for round in range(6):
        cbt.create(f"c{round}")
        model[f"c{round}"] = set()
        write(top, 8)
        check(top)
    cbt.delete("c2")
    del model["c2"]
    cbt.delete("c5")  # the newest: its period still counts for the older ones
    del model["c5"]
    write(top, 6)
    check(top)
    cbt.merge("c0", "c4")
    model["c4"] |= model["c0"]
    check(top)
    top.close()
    stack.unload()
    stack, top = stack_up()
    try:
        check(top)
        cbt = stack.filters[0]
        write(top, 6)
        cbt.create("after")
        model["after"] = set()
        write(top, 4)
        check(top)
    finally:
        top.close()
        stack.unload()


def test_bad_input(tmp_path):
    with tracked(tmp_path) as srv:
        ctl(srv.control, "checkpoint", "create", "c1")
        for words, message in ((("create", "c1"), "already exists"),
                               (("create", "a/b"), "invalid checkpoint name"),
                               (("delete", "x"), "no checkpoint named 'x'"),
                               (("merge", "c1", "x"), "no checkpoint named 'x'")):
            result = ctl(srv.control, "checkpoint", *words, check=False)
            assert result.returncode == 1 and message in result.stderr.decode(), words
    for granularity in ("256", "3000"):
        result = run([*PYNBD, "serve", "--filter=cbt", "memory", "1M", f"bitmap-dir={tmp_path / 'x'}",
                      f"granularity={granularity}"], check=False)
        assert result.returncode == 1 and "must be a power of 2, at least 512" in result.stderr.decode()
    result = run([*PYNBD, "serve", "-f", "-U", str(tmp_path / "s"), "--filter=cbt", "memory", "128M",
                  f"bitmap-dir={tmp_path / 'bitmaps'}"], check=False)
    assert result.returncode == 1 and "holds checkpoints made with size 67108864" in result.stderr.decode()


def test_sigkill_during_a_write_storm_keeps_the_data_and_marks_the_bitmaps_inconsistent(tmp_path):
    """The crash harness over a tracked file: every durable write survives, and after each kill
    the checkpoint that may have missed writes is inconsistent, never served as complete."""
    image = tmp_path / "disk.img"
    original = os.urandom(2 * MiB)
    image.write_bytes(original)
    with tracked(tmp_path) as srv:
        ctl(srv.control, "checkpoint", "create", "c1")
    kill_during_storm(tmp_path, lambda: tracked(tmp_path), lambda srv: srv.uri, original, rounds=2, seed=7)
    with tracked(tmp_path) as srv:
        assert [(c["name"], c["state"]) for c in ctl_json(srv.control, "checkpoint", "list")] == [
            ("c1", "inconsistent")]
        contexts = json.loads(run(["nbdinfo", "--json", srv.uri]).stdout)["exports"][0]["contexts"]
        assert "qemu:dirty-bitmap:c1" not in contexts
