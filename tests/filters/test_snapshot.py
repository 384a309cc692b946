"""snapshot filter: point-in-time views of a live origin, managed over the control socket."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from crashtest import kill_during_storm
from nbdtest import PYNBD, nbdsh, run, served
from pynbd.client import connect
from pynbd.client.sync import connect as sync_connect

MiB = 1 << 20
CHUNK = 64 * 1024


def ctl(path: Path, *words: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([*PYNBD, "ctl", str(path), *words], check=check)


def ctl_json(path: Path, *words: str) -> object:
    return json.loads(ctl(path, "--json", *words).stdout)


def export_uri(srv, name: str) -> str:
    return f"nbd+unix:///{name}?socket={srv.socket}"


@contextmanager
def origin(tmp_path: Path, *params: str, image: Path | None = None):
    """A 4 MiB origin file full of recognisable bytes, served with the snapshot filter."""
    if image is None:
        image = tmp_path / "disk.img"
        image.write_bytes(bytes(range(256)) * (4 * MiB // 256))
    control = tmp_path / "ctl"
    with served("--filter=snapshot", "file", str(image), f"store={tmp_path / 'store'}", *params,
                options=("--control", str(control))) as srv:
        srv.control = control
        srv.image = image
        yield srv


def test_a_snapshot_keeps_the_origin_as_it_was(tmp_path):
    with origin(tmp_path) as srv:
        before = srv.image.read_bytes()
        (tmp_path / "before.img").write_bytes(before)
        assert ctl_json(srv.control, "snapshot", "create", "s1")["state"] == "valid"
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x41 8k 4k", "-c", "write -P 0x42 1000k 200k",
             "-c", "write -z 3M 64k", srv.uri])
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(tmp_path / "before.img"),
             export_uri(srv, "s1")])
        assert nbdsh(srv.uri, "print(bytes(h.pread(8, 8192)))").strip() == "b'AAAAAAAA'"
        table = ctl_json(srv.control, "snapshot", "exceptions", "s1")
        # 8k lands in chunk 0; 1000k..1200k covers chunks 15-18; 3M is chunk 48.
        assert [e["chunk"] for e in table] == [0, 15, 16, 17, 18, 48]
        assert all(e["state"] == "data" and e["length"] == CHUNK for e in table)
        listed = run(["nbdinfo", "--list", "--json", srv.uri]).stdout
        assert [e["export-name"] for e in json.loads(listed)["exports"]] == ["", "s1"]


def test_writes_to_a_snapshot_stay_in_it(tmp_path):
    with origin(tmp_path) as srv:
        ctl(srv.control, "snapshot", "create", "s1")
        nbdsh(export_uri(srv, "s1"), f"h.pwrite(b'S' * 100, 70000); h.zero({CHUNK}, {5 * CHUNK})")
        out = nbdsh(export_uri(srv, "s1"), "print(h.pread(100, 70000) == b'S' * 100, "
                    f"h.pread({CHUNK}, {5 * CHUNK}) == bytes({CHUNK}))")
        assert out.split() == ["True", "True"]
        with open(srv.image, "rb") as f:
            f.seek(70000)
            assert f.read(100) != b"S" * 100
        chunks = [(e["chunk"], e["state"]) for e in ctl_json(srv.control, "snapshot", "exceptions", "s1")]
        assert chunks == [(1, "data"), (5, "zero")]
        depth = json.loads(run(["nbdinfo", "--json", "--map=qemu:allocation-depth",
                                export_uri(srv, "s1")]).stdout)
        assert [(e["offset"], e["type"]) for e in depth] == [(0, 2), (CHUNK, 1), (2 * CHUNK, 2),
                                                             (5 * CHUNK, 1), (6 * CHUNK, 2)]


def test_merge_rolls_the_origin_back_and_keeps_other_snapshots(tmp_path):
    with origin(tmp_path) as srv:
        original = srv.image.read_bytes()
        ctl(srv.control, "snapshot", "create", "old")
        nbdsh(srv.uri, "h.pwrite(b'N' * 200000, 100000); h.flush()")
        ctl(srv.control, "snapshot", "create", "new")
        nbdsh(export_uri(srv, "old"), "h.pwrite(b'o' * 10, 3000000)")
        assert ctl_json(srv.control, "snapshot", "merge", "old") == {"merged": "old", "chunks": 5}
        expected = bytearray(original)
        expected[3000000:3000010] = b"o" * 10
        assert srv.image.read_bytes() == expected
        # "new" still shows the origin as it was when it was taken.
        out = nbdsh(export_uri(srv, "new"), "print(h.pread(200000, 100000) == b'N' * 200000, "
                    "h.pread(10, 3000000).hex())")
        assert out.split() == ["True", original[3000000:3000010].hex()]
        assert [s["name"] for s in ctl_json(srv.control, "snapshot", "list")] == ["new"]


def test_snapshots_survive_a_kill_after_flush(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 * MiB))
    with origin(tmp_path, image=image) as srv:
        ctl(srv.control, "snapshot", "create", "s1")
        nbdsh(srv.uri, "h.pwrite(b'A' * 300000, 50000); h.flush()")
        nbdsh(export_uri(srv, "s1"), "h.pwrite(b'B' * 1000, 2000000, nbd.CMD_FLAG_FUA)")
        os.kill(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait()
    with origin(tmp_path, image=image) as srv:
        assert [s["name"] for s in ctl_json(srv.control, "snapshot", "list")] == ["s1"]
        out = nbdsh(export_uri(srv, "s1"), "print(h.pread(300000, 50000) == bytes(300000), "
                    "h.pread(1000, 2000000) == b'B' * 1000)")
        assert out.split() == ["True", "True"]
        assert nbdsh(srv.uri, "print(h.pread(300000, 50000) == b'A' * 300000)").strip() == "True"


def test_a_full_store_invalidates_only_that_snapshot(tmp_path):
    with origin(tmp_path, "store-size=512K") as srv:
        ctl(srv.control, "snapshot", "create", "small")
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x33 0 2M", srv.uri])  # 32 chunks: more than fit
        assert srv.image.read_bytes()[:2 * MiB] == b"\x33" * (2 * MiB)  # the origin is unaffected
        (snap,) = ctl_json(srv.control, "snapshot", "list")
        assert snap["state"] == "invalid" and "full" in snap["reason"]
        result = run(["nbdsh", "-u", export_uri(srv, "small"), "-c", "h.pread(512, 0)"], check=False)
        assert result.returncode != 0
    log = srv.stderr()
    assert "'small' is now invalid: its store is full" in log and "the origin is unaffected" in log


def test_names_are_checked(tmp_path):
    with origin(tmp_path) as srv:
        ctl(srv.control, "snapshot", "create", "a.b-c_1")
        for words, message in ((("create", "a.b-c_1"), "already exists"),
                               (("create", "../x"), "invalid snapshot name"),
                               (("create", ".hidden"), "invalid snapshot name"),
                               (("create", "x" * 65), "invalid snapshot name"),
                               (("delete", "nope"), "no snapshot named 'nope'"),
                               (("merge", "nope"), "no snapshot named"),
                               (("exceptions", "nope"), "no snapshot named")):
            result = ctl(srv.control, "snapshot", *words, check=False)
            assert result.returncode == 1 and message in result.stderr.decode(), words
        assert sorted(os.listdir(tmp_path / "store")) == ["a.b-c_1.snap", "snapshots.json"]


def test_deleting_a_snapshot_in_use_fails_its_client_only(tmp_path):
    with origin(tmp_path) as srv:
        ctl(srv.control, "snapshot", "create", "s1")
        with sync_connect(export_uri(srv, "s1")) as snap, sync_connect(srv.uri) as main:
            assert snap.pread(16, 0) == bytes(range(16))
            ctl(srv.control, "snapshot", "delete", "s1")
            with pytest.raises(Exception, match="deleted|Input/output"):
                snap.pread(16, 0)
            main.pwrite(b"still fine", 0)
            assert main.pread(10, 0) == b"still fine"
        assert os.listdir(tmp_path / "store") == ["snapshots.json"]


def test_creation_is_atomic_with_respect_to_writes_in_flight(tmp_path):
    """192 KiB writes (each spanning four chunks) keep eight in flight while snapshots are taken:
    in every snapshot each region holds one write's bytes, never parts of two."""
    image = tmp_path / "disk.img"
    region, regions = 192 * 1024, 20
    image.write_bytes(bytes(region * regions))
    with origin(tmp_path, image=image) as srv:
        running, done = threading.Event(), threading.Event()
        counts = []

        async def storm() -> None:
            async with await connect(srv.uri) as h:
                pending: set[asyncio.Future] = set()
                n = 0
                while not done.is_set():
                    if len(pending) >= 8:
                        _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    value = bytes([n % 251 + 1]) * region
                    pending.add(asyncio.ensure_future(h.pwrite(value, (n % regions) * region)))
                    n += 1
                    running.set()
                await asyncio.gather(*pending)
                counts.append(n)

        writer = threading.Thread(target=asyncio.run, args=(storm(),))
        writer.start()
        running.wait(10)
        for i in range(3):
            ctl(srv.control, "snapshot", "create", f"mid{i}")
        done.set()
        writer.join()
        assert counts[0] > 3 * regions  # the snapshots were taken while writes went on
        for i in range(3):
            with sync_connect(export_uri(srv, f"mid{i}")) as h:
                seen = h.pread(region * regions, 0)
            for r in range(regions):
                piece = seen[r * region:(r + 1) * region]
                assert piece == piece[:1] * region, f"snapshot mid{i}: region {r} is torn"


def test_refuses_a_store_made_for_another_origin(tmp_path):
    with origin(tmp_path) as srv:
        ctl(srv.control, "snapshot", "create", "s1")
    bigger = tmp_path / "bigger.img"
    bigger.write_bytes(bytes(8 * MiB))
    result = run([*PYNBD, "serve", "-f", "-U", str(tmp_path / "s2"), "--filter=snapshot", "file", str(bigger),
                  f"store={tmp_path / 'store'}"], check=False)
    assert result.returncode == 1
    assert "holds snapshots made with origin size 4194304, but this disk has 8388608" in \
        result.stderr.decode()
    (tmp_path / "store" / "snapshots.json").write_text("{not json")
    result = run([*PYNBD, "serve", "-f", "-U", str(tmp_path / "s2"), "--filter=snapshot", "file",
                  str(tmp_path / "disk.img"), f"store={tmp_path / 'store'}"], check=False)
    assert result.returncode == 1 and "not a list of snapshots" in result.stderr.decode()


def test_sigkill_during_write_storms_on_the_origin_and_on_a_snapshot(tmp_path):
    """The crash harness twice: writes to the origin must leave the snapshot intact (its copies
    were made durable with the origin's flushes), and writes to the snapshot itself survive."""
    image = tmp_path / "disk.img"
    original = os.urandom(2 * MiB)
    image.write_bytes(original)
    with origin(tmp_path, image=image) as srv:
        ctl(srv.control, "snapshot", "create", "s1")
    kill_during_storm(tmp_path, lambda: origin(tmp_path, image=image), lambda srv: srv.uri, original,
                      rounds=2, seed=5)
    with origin(tmp_path, image=image) as srv:
        run(["nbdcopy", export_uri(srv, "s1"), str(tmp_path / "s1.raw")])
        assert (tmp_path / "s1.raw").read_bytes() == original  # the snapshot never moved
        ctl(srv.control, "snapshot", "create", "s2")
    storm_dir = tmp_path / "s2-storm"
    storm_dir.mkdir()
    before_s2 = image.read_bytes()
    kill_during_storm(storm_dir, lambda: origin(tmp_path, image=image), lambda srv: export_uri(srv, "s2"),
                      before_s2, rounds=2, seed=6)
    assert image.read_bytes() == before_s2  # writes to a snapshot never touch the origin
