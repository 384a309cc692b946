"""blkio io_uring: a file served through io_uring, checked with nbdcopy, qemu-img and qemu-io."""

from __future__ import annotations

import errno
import os
import time

import pytest

from nbdtest import SERVE, nbdsh, run, served
from pynbd.plugins._io_uring import OP_READ, Ring, address_of

MiB = 1 << 20


def image(tmp_path, size: int = 32 * MiB) -> str:
    path = str(tmp_path / "disk.img")
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def serve_run(*args: str, command: str, check: bool = True, options: tuple[str, ...] = ()):
    return run([*SERVE, "-U", "-", *options, "blkio", "io_uring", *args, "--run", command],
               check=check)


@pytest.mark.parametrize("direct", ["false", "true"])
def test_copy_in_and_compare(tmp_path, direct):
    """nbdcopy writes a random image through the ring (16 worker threads sharing a ring
    of 8 entries: requests wait for room); qemu-img compare reads it back through the
    ring and from the file."""
    source = str(tmp_path / "source.img")
    with open(source, "wb") as f:
        f.truncate(32 * MiB)
        for where in (0, 5 * MiB + 4096, 31 * MiB):
            f.seek(where)
            f.write(os.urandom(MiB))
    disk = image(tmp_path)
    serve_run(f"path={disk}", f"direct={direct}", "num-entries=8", options=("-t", "16"), command=(
        f"nbdcopy --requests=16 {source} \"$uri\" && qemu-img compare -f raw -F raw {source} \"$uri\""))
    with open(source, "rb") as a, open(disk, "rb") as b:
        assert a.read() == b.read()


@pytest.mark.parametrize("threads", ["1", "16"])
def test_many_requests_in_flight(tmp_path, threads):
    """fio reads and writes at depth 16 for a few seconds, verifying what it wrote: the
    rings wrap many times. Reads are started ahead (answered later) among writes run one
    at a time (the default) or by 16 threads at once (-t 16) on the same ring."""
    disk = image(tmp_path, 64 * MiB)
    serve_run(f"path={disk}", "num-entries=16", options=("-t", threads), command=(
        "fio --name=t --ioengine=nbd --uri=\"$uri\" --rw=randrw --bs=4k --iodepth=16 "
        "--size=64M --time_based --runtime=3 --verify=crc32c --do_verify=1 --verify_state_save=0"))


def test_zero_trim_flush_and_fua(tmp_path):
    disk = image(tmp_path)
    with open(disk, "r+b") as f:
        f.write(b"\x77" * (8 * MiB))
        os.fsync(f.fileno())
    serve_run(f"path={disk}", command=(
        "qemu-io -f raw -c 'write -z 0 1M' -c 'discard 2M 1M' -c 'write -P 0x11 -f 4M 64k' "
        "-c 'write -z -u 6M 1M' -c flush \"$uri\""))
    with open(disk, "rb") as f:
        data = f.read(8 * MiB)
    assert data[:MiB] == bytes(MiB) and data[2 * MiB:3 * MiB] == bytes(MiB)
    assert data[MiB:2 * MiB] == b"\x77" * MiB and data[4 * MiB:4 * MiB + 65536] == b"\x11" * 65536
    assert data[6 * MiB:7 * MiB] == bytes(MiB)
    holes = os.lseek(os.open(disk, os.O_RDONLY), 2 * MiB, os.SEEK_HOLE)
    assert holes <= 2 * MiB  # discard punched a hole; the file stays sparse


def test_fast_zero_and_block_size(tmp_path):
    disk = image(tmp_path, MiB)
    with served("blkio", "io_uring", f"path={disk}", "direct=true") as srv:
        out = nbdsh(srv.uri, (
            "h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO)\n"
            "print(h.get_block_size(nbd.SIZE_MINIMUM), h.can_fua(), h.can_multi_conn())\n"
            "h.pwrite(b'\\x42' * 8192, 4096, nbd.CMD_FLAG_FUA)\n"
            "print(bytes(h.pread(4096, 8192)[:2]), h.get_size())\n"))
    assert out.split() == ["4096", "True", "True", "b'BB'", str(MiB)]


def test_read_past_a_shrunken_end_is_zeroes_and_read_only(tmp_path):
    disk = image(tmp_path, MiB)
    os.chmod(disk, 0o444)
    if os.access(disk, os.W_OK):  # root writes anyway: ask for read-only explicitly
        extra = ["read-only=true"]
    else:
        extra = []
    with served("blkio", "io_uring", f"path={disk}", *extra) as srv:
        out = nbdsh(srv.uri, (
            "print(h.is_read_only())\n"
            "try:\n"
            "    h.pwrite(b'x' * 512, 0)\n"
            "except nbd.Error as e:\n"
            "    print(e.errnum)\n"))
    assert out.split()[0] == "True" and int(out.split()[1]) in (errno.EPERM, errno.EROFS)


@pytest.mark.parametrize("direct", ["false", "true"])
def test_reads_across_a_shrunken_end(tmp_path, direct):
    """The file shrinks under a connected client: what lies past its new end reads as
    zeroes (a short read completed, whether started ahead or run at once)."""
    disk = image(tmp_path, MiB)
    with open(disk, "r+b") as f:
        f.write(b"\x5a" * MiB)
    with served("blkio", "io_uring", f"path={disk}", f"direct={direct}") as srv:
        out = nbdsh(srv.uri, (
            "import os\n"
            f"os.truncate({disk!r}, 512 * 1024 - 2048)\n"
            "data = h.pread(8192, 512 * 1024 - 4096)\n"
            "print(data[:2048] == b'\\x5a' * 2048, data[2048:] == bytes(6144))\n"))
    assert out.split() == ["True", "True"]


@pytest.mark.parametrize("args, message", [
    (("io_uring", "path=/nonexistent/disk.img"), "No such file or directory"),
    (("virtio-vhost-vdpa", "path=/tmp/sock"), "is not one of io_uring, virtio-blk-vhost-user"),
    (("io_uring",), "missing required parameter 'path'"),
    (("io_uring", "path=/dev/null", "num-entries=0"), "num-entries=0: expected 1 to 32768"),
])
def test_bad_parameters(args, message):
    result = run([*SERVE, "-U", "-", "blkio", *args, "--run", "true"], check=False)
    stderr = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in stderr
    assert message in stderr.strip().splitlines()[-1]


def test_the_completion_thread_sleeps_while_it_waits():
    """A started operation that completes only later (a read from an empty pipe): the
    ring's completion thread waits in io_uring_enter, using no CPU, and hands the result
    over when it comes. (It spun when its batch wait had no timeout: the kernel then ends
    the wait once min_wait_usec has passed, events or not.) While the test sleeps, that
    thread is the only one of this process that could use CPU."""
    done: list[tuple[object, int]] = []
    ring = Ring(8, done.extend)
    r, w = os.pipe()
    try:
        buf = bytearray(5)
        address, keep = address_of(buf)
        entry = ("the read", keep)
        ring.start(OP_READ, r, 0, address, len(buf), 0, entry)
        ring.submit_started()
        time.sleep(0.2)
        before = time.process_time()
        time.sleep(1)
        used = time.process_time() - before
        os.write(w, b"hello")
        deadline = time.monotonic() + 10
        while not done and time.monotonic() < deadline:
            time.sleep(0.01)
        assert done == [(entry, 5)] and buf == b"hello"
        assert used <= 0.05, f"the process used {used:.3f} s of CPU while the read waited"
    finally:
        ring.close()
        os.close(r)
        os.close(w)
