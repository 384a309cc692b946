"""blkio virtio-blk-vhost-user in front of qemu-storage-daemon (raw and qcow2 images):
the bytes checked with nbdcopy and qemu-img compare against the image."""

from __future__ import annotations

import os
import random
import select
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from nbdtest import SERVE, nbdsh, run, served, wait_for
from pynbd.plugins import _vhost_user
from pynbd.process import stop_process

MiB = 1 << 20

pytestmark = pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None,
                                reason="qemu-storage-daemon (qemu-system-common) is not installed")


@contextmanager
def storage_daemon(tmp_path, image: str, fmt: str = "raw", *options: str) -> Iterator[subprocess.Popen]:
    """qemu-storage-daemon exporting ``image`` as vhost-user-blk on tmp_path/vhost.sock."""
    sock = str(tmp_path / "vhost.sock")
    blockdevs = [f"driver=file,node-name=file,filename={image}"]
    node = "file"
    if fmt != "raw":
        blockdevs.append(f"driver={fmt},node-name=fmt,file=file")
        node = "fmt"
    export = ",".join(["type=vhost-user-blk", "id=exp", f"node-name={node}", "addr.type=unix",
                       f"addr.path={sock}", *options])
    cmd = ["qemu-storage-daemon"]
    for blockdev in blockdevs:
        cmd += ["--blockdev", blockdev]
    proc = subprocess.Popen([*cmd, "--export", export], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: os.path.exists(sock) or proc.poll() is not None,
                 message="qemu-storage-daemon did not create its socket")
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        yield proc
    finally:
        stop_process(proc)


def random_image(path: str, size: int = 16 * MiB) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for where in (0, 3 * MiB + 4096, size - MiB):
            f.seek(where)
            f.write(os.urandom(MiB))


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_copy_through_vhost_user_and_compare(tmp_path, fmt):
    source = str(tmp_path / "source.img")
    random_image(source)
    image = str(tmp_path / f"disk.{fmt}")
    run(["qemu-img", "create", "-f", fmt, image, "16M"])
    with storage_daemon(tmp_path, image, fmt, "writable=on", "num-queues=2"):
        run([*SERVE, "-U", "-", "blkio", "virtio-blk-vhost-user", f"path={tmp_path}/vhost.sock",
             "num-queues=2", "--run",
             f"nbdcopy --requests=16 {source} \"$uri\" && "
             f"qemu-img compare -f raw -F raw {source} \"$uri\""])
    run(["qemu-img", "compare", "-f", "raw", "-F", fmt, source, image])


def test_seed_one_liner_zero_trim_and_flush(tmp_path):
    image = str(tmp_path / "disk.img")
    with open(image, "wb") as f:
        f.write(b"\x5a" * (4 * MiB))
    with storage_daemon(tmp_path, image, "raw", "writable=on"):
        out = subprocess.run([*SERVE, "-U", "-", "blkio", "virtio-blk-vhost-user", "path=vhost.sock",
                              "--run", 'nbdsh -u "$uri" -c "print(h.pread(512, 0)[:4])"'],
                             cwd=str(tmp_path), capture_output=True, check=True, timeout=120
                             ).stdout.decode()
        assert out.strip() == "bytearray(b'ZZZZ')"
        with served("blkio", "virtio-blk-vhost-user", f"path={tmp_path}/vhost.sock") as srv:
            nbdsh(srv.uri, (
                "h.zero(65536, 0)\n"
                "h.zero(65536, 65536, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_FUA)\n"
                "h.trim(65536, MiB := 1048576)\n"
                "h.pwrite(b'\\x11' * 4096, 2 * MiB, nbd.CMD_FLAG_FUA)\n"
                "h.flush()\n"))
    with open(image, "rb") as f:
        data = f.read()
    assert data[:131072] == bytes(131072)
    assert data[2 * MiB:2 * MiB + 4096] == b"\x11" * 4096
    assert data[131072:MiB] == b"\x5a" * (MiB - 131072)


@pytest.mark.parametrize("threads", ["1", "16"])
def test_many_requests_in_flight(tmp_path, threads):
    """fio reads and writes at depth 16 for a few seconds, verifying what it wrote: tens
    of thousands of requests, the ring indexes wrapping many times while the backend
    reads them (it panics on a torn index). Reads are started ahead (answered later,
    from the queue's completion thread) among writes run one at a time on the reading
    thread (the default) or by 16 threads handing each other their completions."""
    image = str(tmp_path / "disk.img")
    random_image(image, 64 * MiB)
    with storage_daemon(tmp_path, image, "raw", "writable=on") as daemon:
        run([*SERVE, "-U", "-", "-t", threads, "blkio", "virtio-blk-vhost-user",
             f"path={tmp_path}/vhost.sock",
             "--run", "fio --name=t --ioengine=nbd --uri=\"$uri\" --rw=randrw --bs=4k "
                      "--iodepth=16 --size=64M --time_based --runtime=3 --verify=crc32c "
                      "--do_verify=1 --verify_state_save=0"])
        assert daemon.poll() is None


def test_read_only_device(tmp_path):
    image = str(tmp_path / "disk.img")
    random_image(image, 4 * MiB)
    with storage_daemon(tmp_path, image, "raw", "writable=off"):
        with served("blkio", "virtio-blk-vhost-user", f"path={tmp_path}/vhost.sock") as srv:
            out = nbdsh(srv.uri, (
                "print(h.is_read_only())\n"
                "try:\n"
                "    h.pwrite(b'x' * 512, 0)\n"
                "except nbd.Error as e:\n"
                "    print('refused')\n"))
    assert out.split() == ["True", "refused"]


def test_nobody_listening(tmp_path):
    path = str(tmp_path / "dead.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)  # a socket file nobody listens on
    result = run([*SERVE, "-U", "-", "blkio", "virtio-blk-vhost-user", f"path={path}", "--run", "true"],
                 check=False)
    stderr = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in stderr
    assert "cannot connect to" in stderr.strip().splitlines()[-1]


def test_daemon_dies_requests_fail_and_server_exits(tmp_path):
    image = str(tmp_path / "disk.img")
    random_image(image, 4 * MiB)
    with storage_daemon(tmp_path, image, "raw", "writable=on") as daemon:
        with served("blkio", "virtio-blk-vhost-user", f"path={tmp_path}/vhost.sock") as srv:
            nbdsh(srv.uri, "h.pread(4096, 0)\n")
            stop_process(daemon)
            result = run(["nbdsh", "-u", srv.uri, "-c", "h.pread(4096, 0)"], check=False)
            assert result.returncode != 0  # EIO, or the server already went away
            wait_for(lambda: srv.proc.poll() is not None, message="the server did not exit")
            assert "has gone away: shutting down" in srv.stderr()


@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "no-event-idx"])
def test_started_requests_across_the_index_wrap(tmp_path, monkeypatch, event_idx):
    """Reads and writes started 32 at a time (every slot of the queue), kicked once and
    reaped by polling the call eventfd as the server's reader does, with the rings'
    16-bit indexes starting just below the wrap; with VIRTIO_RING_F_EVENT_IDX (the
    backend calls once per round of reaping) and without (a call per completion).
    Every byte read is checked, and the image at the end."""
    if not event_idx:
        monkeypatch.setattr(_vhost_user, "F_EVENT_IDX", 0)
    image = str(tmp_path / "disk.img")
    random_image(image, 4 * MiB)
    with open(image, "rb") as f:
        expected = bytearray(f.read())
    rng = random.Random(17)
    outcomes: dict[int, OSError | None] = {}
    with storage_daemon(tmp_path, image, "raw", "writable=on"):
        device = _vhost_user.VhostUserBlk(str(tmp_path / "vhost.sock"), first_index=0xFFFF - 100)
        try:
            device.start()
            assert bool(device.features & (1 << 29)) == event_idx
            poller = select.poll()
            poller.register(device.completion_fd(), select.POLLIN)
            for _ in range(12):  # 384 requests: the indexes wrap in the fourth round
                blocks = rng.sample(range(len(expected) // 4096), 32)
                writes = {b: os.urandom(4096) for b in blocks[:16]}
                reads = {b: memoryview(bytearray(4096)) for b in blocks[16:]}
                outcomes.clear()
                for block, data in writes.items():
                    device.start_request(_vhost_user.T_OUT, block * 4096, memoryview(data),
                                         outcomes.__setitem__, block)
                for block, buf in reads.items():
                    device.start_request(_vhost_user.T_IN, block * 4096, buf,
                                         outcomes.__setitem__, block)
                device.kick_started(reaper=False)
                while len(outcomes) < 32:
                    assert poller.poll(20_000), f"no call after {len(outcomes)} of 32 completions"
                    device.reap_started()
                assert set(outcomes.values()) == {None}
                for block, buf in reads.items():
                    assert buf == expected[block * 4096:(block + 1) * 4096]
                for block, data in writes.items():
                    expected[block * 4096:(block + 1) * 4096] = data
            assert device.queues[0].used_idx < 0xFFFF - 100  # it wrapped
        finally:
            device.close()
    with open(image, "rb") as f:
        assert f.read() == expected
