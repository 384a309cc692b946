"""pynbd backup against qemu-nbd -B (qemu's persistent dirty bitmaps are the oracle).

Rounds of: start a bitmap (qemu-img bitmap --add), write with qemu-io
(data, zeroes, discards), keep a raw copy of the disk, take an incremental
backup reading the previous round's bitmap. Every point restores byte for
byte, with pynbd and with qemu-img alone; qemu-img check finds the chain
clean. The refusals come last; a fake control socket stands in for a server
whose checkpoint is inconsistent or unknown.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from nbdtest import PYNBD, run, wait_for_socket
from pynbd.process import stop_process

pytestmark = pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="qemu-nbd missing")

MiB = 1024 * 1024
SIZE = 64 * MiB


def pynbd(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([*PYNBD, "backup", *args], check=check)


def qemu_io(image: Path, *commands: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    run([*args, str(image)])


def to_raw(image: Path, raw: Path) -> None:
    run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)])


@contextmanager
def qemu_nbd(image: Path, *bitmaps: str, export: str = "") -> Iterator[str]:
    sock = image.parent / "nbd.sock"
    options = [a for b in bitmaps for a in ("-B", b)] + (["-x", export] if export else [])
    proc = subprocess.Popen(["qemu-nbd", "-r", "-t", "-e", "4", "-f", "qcow2", *options,
                             "-k", str(sock), str(image)], stderr=subprocess.PIPE)
    try:
        wait_for_socket(str(sock), proc)
        yield f"nbd+unix:///{export}?socket={sock}"
    finally:
        stop_process(proc)


def random_changes(rng: random.Random) -> list[str]:
    """qemu-io commands: data, zeroes and discards at random places, some unaligned."""
    commands = []
    for _ in range(12):
        offset = rng.randrange(0, SIZE - MiB) // 512 * 512
        length = rng.choice([512, 4096, 65536, 300 * 1024, MiB])
        kind = rng.random()
        if kind < 0.7:
            commands.append(f"write -P {rng.randrange(1, 255)} {offset} {length}")
        elif kind < 0.85:
            commands.append(f"write -z {offset} {length}")
        else:
            commands.append(f"discard {offset} {length}")
    return commands


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())} if directory.exists() else {}


@pytest.fixture
def image(tmp_path: Path) -> Path:
    image = tmp_path / "disk.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", str(image), str(SIZE)])
    qemu_io(image, "write -P 7 0 8M", "write -P 9 40M 2M", "write -P 5 63M 1M")
    return image


def test_rounds_restore_every_point(image, tmp_path):
    rng = random.Random(11)
    backups = tmp_path / "backups"
    states = []
    touched = [0]  # per round: at most this many bytes of whole clusters changed
    run(["qemu-img", "bitmap", "--add", str(image), "b0"])
    with qemu_nbd(image, "b0") as uri:
        pynbd("full", uri, str(backups), "--checkpoint=b0")
    states.append(tmp_path / "s0.raw")
    to_raw(image, states[-1])
    for i in range(1, 4):
        run(["qemu-img", "bitmap", "--add", str(image), f"b{i}"])
        changes = random_changes(rng)
        qemu_io(image, *changes)
        touched.append(sum(int(c.split()[-1]) + 2 * 65536 for c in changes))
        states.append(tmp_path / f"s{i}.raw")
        to_raw(image, states[-1])
        with qemu_nbd(image, f"b{i - 1}", f"b{i}") as uri:
            out = pynbd("inc", uri, str(backups), f"--checkpoint=b{i}", "-C", "4", "-p").stdout
        assert out.decode().startswith(f"{i:04d}.qcow2: inc, checkpoint b{i}")

    listed = json.loads(pynbd("list", str(backups), "--json").stdout)
    assert listed["export"] == {"name": "", "size": SIZE}
    rows = listed["backups"]
    assert [(b["kind"], b["checkpoint"], b["since"]) for b in rows] == [
        ("full", "b0", []), ("inc", "b1", ["b0"]), ("inc", "b2", ["b1"]), ("inc", "b3", ["b2"])]
    # qemu's bitmap b(i-1) holds the writes of rounds i-1 and i (it keeps counting)
    assert all(0 < b["data"] <= touched[i - 1] + touched[i] for i, b in enumerate(rows) if i)
    table = pynbd("list", str(backups)).stdout.decode().splitlines()
    assert table[0].split()[:4] == ["NUMBER", "FILE", "KIND", "CHECKPOINT"] and len(table) == 5

    for i, state in enumerate(states):
        restored = tmp_path / f"r{i}.raw"
        pynbd("restore", str(backups), str(restored), "--at", f"b{i}")
        assert restored.read_bytes() == state.read_bytes(), f"restore at b{i}"
        qcow2 = backups / f"{i:04d}.qcow2"
        run(["qemu-img", "check", str(qcow2)])
        converted = tmp_path / f"q{i}.raw"
        to_raw(qcow2, converted)  # qemu-img follows the backing chain on its own
        assert converted.read_bytes() == state.read_bytes(), f"qemu-img convert at b{i}"
    # the default is the newest; a number works as well as a checkpoint
    latest = tmp_path / "latest.raw"
    pynbd("restore", str(backups), str(latest))
    assert latest.read_bytes() == states[-1].read_bytes()
    by_number = tmp_path / "one.raw"
    pynbd("restore", "-p", str(backups), str(by_number), "--at", "1")
    assert by_number.read_bytes() == states[1].read_bytes()


@contextmanager
def fake_control(path: Path, checkpoints: list[dict[str, object]]) -> Iterator[list[list[str]]]:
    """A control socket that answers ``checkpoint list`` and accepts ``create``."""
    seen: list[list[str]] = []
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn, conn.makefile("rwb") as f:
                for line in f:
                    words = json.loads(line)["command"]
                    seen.append(words)
                    result = checkpoints if words[1] == "list" else {"name": words[-1]}
                    f.write(json.dumps({"ok": result}).encode() + b"\n")
                    f.flush()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        listener.close()
        os.unlink(path)


def test_refusals(image, tmp_path):
    backups = tmp_path / "backups"
    run(["qemu-img", "bitmap", "--add", str(image), "b0"])
    with qemu_nbd(image) as uri:  # b0 is not exported
        one_line_error(pynbd("inc", uri, str(backups), "--checkpoint=b1", check=False),
                       "no backup to continue from", "full backup")
        assert not backups.exists()
        one_line_error(pynbd("full", uri, str(backups), "--checkpoint=nope", check=False),
                       "qemu:dirty-bitmap:nope")
        assert not backups.exists()
    with qemu_nbd(image, "b0") as uri:
        pynbd("full", uri, str(backups), "--checkpoint=b0")
        one_line_error(pynbd("inc", uri, str(backups), check=False), "--control", "--checkpoint")
        before = snapshot(backups)

        control = tmp_path / "ctl"
        with fake_control(control, [{"name": "b0", "state": "inconsistent"}]) as seen:
            one_line_error(pynbd("inc", uri, str(backups), f"--control={control}", check=False),
                           "checkpoint b0 is inconsistent (the server stopped uncleanly); "
                           "take a full backup")
            assert seen == [["checkpoint", "list"]]  # nothing created
        with fake_control(control, [{"name": "other", "state": "consistent"}]):
            one_line_error(pynbd("inc", uri, str(backups), f"--control={control}", check=False),
                           "checkpoint b0", "not on this server")
        assert snapshot(backups) == before
    with qemu_nbd(image) as uri:  # b0 is not exported
        one_line_error(pynbd("inc", uri, str(backups), "--checkpoint=b1", check=False),
                       "qemu:dirty-bitmap:b0", "take a full backup")
        assert snapshot(backups) == before
    with qemu_nbd(image, "b0", export="another") as uri:  # same size, another export name
        one_line_error(pynbd("full", uri, str(backups), check=False),
                       "holds backups of another export", "'another'")
        assert snapshot(backups) == before

    other = tmp_path / "small.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", str(other), str(SIZE // 2)])
    with qemu_nbd(other) as uri:
        one_line_error(pynbd("full", uri, str(backups), check=False),
                       "holds backups of another export", str(SIZE // 2))
        assert snapshot(backups) == before
        stranger = tmp_path / "stranger"
        stranger.mkdir()
        (stranger / "notes.txt").write_text("mine")
        one_line_error(pynbd("full", uri, str(stranger), check=False), "not a backup directory")
        assert os.listdir(stranger) == ["notes.txt"]

    one_line_error(pynbd("restore", str(backups), str(tmp_path / "x.raw"), "--at", "b9",
                         check=False), "no backup at checkpoint 'b9'")
    one_line_error(pynbd("list", str(tmp_path / "nothing"), check=False), "no backup here")
    assert not (tmp_path / "x.raw").exists()
    one_line_error(pynbd("frobnicate", check=False))
