"""blkio: writes started and answered later (the server's ``AsyncWrites``), io_uring and
vhost-user alike: a flush covers every write sent before it (the server killed with
SIGKILL right after it loses none), FUA, a failed write's errno at the client, a client
vanishing with writes in flight, and stacks whose filters change writes (the path is not
taken: the filter sees every write)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_blkio_vhost import storage_daemon

from nbdtest import NBDSH_OUTCOMES, nbdsh, run, served
from pynbd.backend import OpenContext
from pynbd.backend.stack import Stack
from pynbd.server.async_requests import async_plugin

MiB = 1 << 20
DRIVERS = ["io_uring", "vhost-user"]


@contextmanager
def blkio(driver: str, tmp_path: Path, image: str) -> Iterator[tuple[str, ...]]:
    """The arguments serving ``image`` through ``driver`` (vhost-user: a qemu-storage-daemon
    exporting it, for the block)."""
    if driver == "io_uring":
        yield ("blkio", "io_uring", f"path={image}")
        return
    if shutil.which("qemu-storage-daemon") is None:
        pytest.skip("qemu-storage-daemon (qemu-system-common) is not installed")
    with storage_daemon(tmp_path, image, "raw", "writable=on"):
        yield ("blkio", "virtio-blk-vhost-user", f"path={tmp_path}/vhost.sock")


def blank(path: Path, size: int = 8 * MiB) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


@pytest.mark.parametrize("driver", DRIVERS)
def test_flush_covers_every_write_before_it_and_a_kill_loses_none(tmp_path, driver):
    """256 writes and a FUA write in flight, then a flush: once the flush is answered every
    one of them is in the file (the client never waited for the writes themselves); the
    server is then killed with SIGKILL, and the reopened file still holds them all."""
    image = blank(tmp_path / "disk.img")
    code = f"""
blocks = [bytes([i % 251 + 1]) * 4096 for i in range(256)]
for i, block in enumerate(blocks):
    h.aio_pwrite(block, 4096 * i)
h.aio_pwrite(b'\\xee' * 4096, {2 * MiB}, flags=nbd.CMD_FLAG_FUA)
flush = h.aio_flush()
while not h.aio_command_completed(flush):
    h.poll(-1)
with open({image!r}, 'rb') as f:
    data = f.read({2 * MiB + 4096})
print(data[:4096 * 256] == b''.join(blocks), data[{2 * MiB}:] == b'\\xee' * 4096)
"""
    with blkio(driver, tmp_path, image) as args, served(*args) as srv:
        assert nbdsh(srv.uri, code).split() == ["True", "True"]
        srv.proc.kill()
        srv.proc.wait()
    with open(image, "rb") as f:
        data = f.read(2 * MiB + 4096)
    assert data[:4096 * 256] == b"".join(bytes([i % 251 + 1]) * 4096 for i in range(256))
    assert data[2 * MiB:] == b"\xee" * 4096


@pytest.mark.parametrize("driver, errno_name", [("io_uring", "ENOSPC"), ("vhost-user", "EIO")])
def test_a_failed_write_reaches_the_client(tmp_path, small_tmpfs, driver, errno_name):
    """A 4 MiB sparse file on a 1 MiB file system: of 64 KiB writes started together some
    land (each reads back) and the rest fail with the kernel's ENOSPC (io_uring), or the
    EIO a virtio-blk device reports (vhost-user); the connection and the server go on."""
    image = blank(small_tmpfs / "disk.img", 4 * MiB)
    code = NBDSH_OUTCOMES + """
done = outcomes([h.aio_pwrite(b'\\x33' * 65536, 65536 * i) for i in range(64)])
landed = [i for i, outcome in enumerate(done) if outcome == 'ok']
print(' '.join(sorted(set(done))),
      all(h.pread(512, 65536 * i)[:2] == b'\\x33\\x33' for i in landed))
"""
    with blkio(driver, tmp_path, image) as args, served(*args) as srv:
        assert nbdsh(srv.uri, code).split() == [errno_name, "ok", "True"]
        assert nbdsh(srv.uri, "h.flush()\nprint(len(h.pread(512, 0)))").strip() == "512"
    assert "Traceback" not in srv.stderr()


@pytest.mark.parametrize("driver", DRIVERS)
def test_client_vanishing_with_writes_in_flight(tmp_path, driver):
    """A client writes one block and is answered, sends 256 more and is killed without
    waiting: the server keeps serving, and the answered block is there."""
    image = blank(tmp_path / "disk.img")
    vanish = f"""
import os
h.pwrite(b'\\xaa' * 4096, {4 * MiB})
for i in range(256):
    h.aio_pwrite(b'\\x55' * 4096, 4096 * i)
os.kill(os.getpid(), 9)
"""
    with blkio(driver, tmp_path, image) as args, served(*args) as srv:
        assert run(["nbdsh", "-u", srv.uri, "-c", vanish], check=False).returncode != 0
        out = nbdsh(srv.uri, f"print(bytes(h.pread(4096, {4 * MiB})) == b'\\xaa' * 4096)\n"
                             "h.pwrite(b'\\x77' * 512, 0)\nh.flush()\n")
        assert out.strip() == "True"
    assert "Traceback" not in srv.stderr()
    with open(image, "rb") as f:
        assert f.read(512) == b"\x77" * 512


@pytest.mark.parametrize("filters, expected", [
    ((), (True, True)),
    (("nozero",), (True, True)),  # passes reads and writes through
    (("fua", "fuamode=force"), (True, False)),  # changes writes' flags only
    (("cow",), (False, False)),
    (("log", "logfile=/dev/null"), (False, False)),
])
def test_which_stacks_start_writes(tmp_path, filters, expected):
    image = blank(tmp_path / "disk.img", MiB)
    names = [f for f in filters if "=" not in f]
    params = [f for f in filters if "=" in f]
    stack = Stack.from_args("blkio", ["io_uring", f"path={image}", *params], names)
    stack.get_ready()
    top = stack.open(OpenContext())
    try:
        reads, writes = async_plugin(stack, top)
        assert (reads is not None, writes is not None) == expected
    finally:
        top.close()


@pytest.mark.parametrize("driver", DRIVERS)
def test_writes_go_through_a_filter_that_changes_them(tmp_path, driver):
    """With the cow filter on top writes land in its overlay, never in the image; with the
    log filter each one is logged."""
    image = blank(tmp_path / "disk.img")
    log = tmp_path / "writes.log"
    code = ("for i in range(32):\n"
            "    h.aio_pwrite(b'\\x99' * 4096, 4096 * i)\n"
            "while h.aio_in_flight() > 0:\n"
            "    h.poll(-1)\n"
            "h.flush()\n"
            "print(bytes(h.pread(4096, 4096 * 31)) == b'\\x99' * 4096)\n")
    with blkio(driver, tmp_path, image) as args:
        with served("--filter=cow", *args) as srv:
            assert nbdsh(srv.uri, code).strip() == "True"
        with open(image, "rb") as f:
            assert f.read(4096 * 32) == bytes(4096 * 32)  # in cow's overlay only
        with served("--filter=log", *args, f"logfile={log}") as srv:
            assert nbdsh(srv.uri, code).strip() == "True"
    with open(image, "rb") as f:
        assert f.read(4096 * 32) == b"\x99" * (4096 * 32)
    assert log.read_text().count("Write ") >= 32
