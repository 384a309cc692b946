"""pynbd fuse mounted for real: the qcow2 pipeline (sfdisk, mkfs.ext4 on a loop device,
files copied in, qemu-img check), e2fsck, FLUSH/TRIM/WRITE_ZEROES seen by the log
filter, directory mode, reads compared with libnbd's nbdfuse, signals, bad input."""

from __future__ import annotations

import array
import errno
import mmap
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from nbdtest import PYNBD, exited, run, served, wait_for

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                                reason="needs /dev/fuse and root (loop devices, mount)")

K, M = 1024, 1024 * 1024


def is_mounted(path: Path) -> bool:
    with open("/proc/mounts") as mounts:
        return any(line.split()[1] == str(path) for line in mounts)


@contextmanager
def fuse(mountpoint: Path, *args: str, tool: str = "pynbd") -> Iterator[subprocess.Popen[bytes]]:
    """Mount with ``pynbd fuse`` (or nbdfuse) in the background; unmount with
    fusermount3 on the way out and insist that the tool exits 0."""
    where = mountpoint if mountpoint.exists() else mountpoint.parent  # DIR/NAME mounts DIR
    pidfile = where.parent / f".{where.name}.pid"
    pidfile.unlink(missing_ok=True)
    base = [*PYNBD, "fuse"] if tool == "pynbd" else ["nbdfuse"]
    proc = subprocess.Popen([*base, "-P", str(pidfile), str(mountpoint), *args],
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"fuse exited {proc.returncode}: {proc.stderr.read().decode()}")
            return pidfile.exists() and is_mounted(where)
        wait_for(ready, message=f"{where} not mounted")
        yield proc
    finally:
        if is_mounted(where):
            unmounted = run(["fusermount3", "-u", str(where)], check=False).returncode == 0
            if not unmounted:  # a dead or stuck mount must not outlive the test
                run(["fusermount3", "-u", "-z", str(where)], check=False)
                proc.kill()
        assert proc.wait(30) == 0, proc.stderr.read().decode()
        assert not is_mounted(where)


@contextmanager
def loop(image: Path, offset: int = 0, readonly: bool = False) -> Iterator[str]:
    """A loop device over ``image`` from ``offset``."""
    flags = ["-r"] if readonly else []
    device = run(["losetup", "--find", "--show", *flags, "-o", str(offset), str(image)]
                 ).stdout.decode().strip()
    try:
        yield device
    finally:
        run(["losetup", "-d", device])


@contextmanager
def mounted_fs(device: str, where: Path, readonly: bool = False) -> Iterator[Path]:
    where.mkdir(exist_ok=True)
    run(["mount", *(["-o", "ro"] if readonly else []), device, str(where)])
    try:
        yield where
    finally:
        run(["umount", str(where)])


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def pattern(offset: int, length: int) -> bytes:
    """What nbdkit's pattern plugin reads at ``offset`` (8-aligned)."""
    words = array.array("Q", range(offset, offset + length, 8))
    if sys.byteorder == "little":
        words.byteswap()
    return words.tobytes()


def test_qcow2_pipeline_partition_mkfs_copy_then_qemu_img_check(tmp_path):
    qcow2, raw = tmp_path / "disk.qcow2", tmp_path / "disk.raw"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "64M"])
    raw.touch()
    payload = os.urandom(3 * M + 123)
    (tmp_path / "payload").write_bytes(payload)
    with fuse(raw, "[", "qemu-nbd", "-f", "qcow2", str(qcow2), "]") as proc:
        assert raw.stat().st_size == 64 * M
        run(["sfdisk", "-q", str(raw)], input=b"label: dos\nstart=2048, type=83\n")
        with loop(raw, offset=M) as device:
            run(["mkfs.ext4", "-q", "-F", device])
            with mounted_fs(device, tmp_path / "fs") as fs:
                run(["cp", str(tmp_path / "payload"), str(fs / "payload")])
                (fs / "hello.txt").write_text("hello from pynbd fuse\n")
            run(["e2fsck", "-f", "-n", device])
        qemu_nbd = children(proc.pid)
        assert qemu_nbd, "qemu-nbd is not running under pynbd fuse"
    # Unmounted: the captive qemu-nbd was stopped, the qcow2 is consistent.
    wait_for(lambda: all(exited(pid) for pid in qemu_nbd), message="qemu-nbd still runs")
    run(["qemu-img", "check", "-q", str(qcow2)])
    # The files are there: mounted again read-only, through the loop device.
    with fuse(raw, "-r", "[", "qemu-nbd", "-r", "-f", "qcow2", str(qcow2), "]"):
        assert raw.stat().st_mode & 0o777 == 0o444
        with loop(raw, offset=M, readonly=True) as device, \
                mounted_fs(device, tmp_path / "fs", readonly=True) as fs:
            assert (fs / "payload").read_bytes() == payload
            assert (fs / "hello.txt").read_text() == "hello from pynbd fuse\n"


def test_ext4_on_a_loop_device_then_e2fsck_clean(tmp_path):
    with served("memory", "48M") as srv, fuse(tmp_path, srv.uri):
        image = tmp_path / "nbd"
        with loop(image) as device:
            run(["mkfs.ext4", "-q", "-F", "-E", "discard", device])
            with mounted_fs(device, Path(str(tmp_path) + ".fs")) as fs:
                for i in range(20):
                    (fs / f"f{i}").write_bytes(bytes([i]) * (i * 37 * K + 1))
                os.unlink(fs / "f3")
                run(["fstrim", str(fs)])
            run(["e2fsck", "-f", "-n", device])


def log_lines(log: Path, action: str) -> list[str]:
    return [line for line in log.read_text().splitlines() if f" {action} id=" in line]


def test_fsync_flush_punch_hole_trim_zero_range_write_zeroes(tmp_path):
    log = tmp_path / "requests.log"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with served("memory", "4M", "--filter=log", f"logfile={log}") as srv, fuse(mnt, srv.uri):
        disk = mnt / "nbd"
        fd = os.open(disk, os.O_RDWR)
        try:
            os.pwrite(fd, b"\xaa" * (256 * K), 0)
            assert not log_lines(log, "Flush")
            os.fsync(fd)
            wait_for(lambda: log_lines(log, "Flush"), message="no FLUSH after fsync")
        finally:
            os.close(fd)
        run(["fallocate", "--punch-hole", "--offset", "65536", "--length", "65536", str(disk)])
        trims = wait_for(lambda: log_lines(log, "Trim"), message="no TRIM after punch-hole")
        assert "offset=0x10000 count=0x10000" in trims[0]
        run(["fallocate", "--zero-range", "--offset", "131072", "--length", "65536", str(disk)])
        zeroes = wait_for(lambda: log_lines(log, "Zero"), message="no WRITE_ZEROES")
        assert "offset=0x20000 count=0x10000" in zeroes[0] and "trim=0" in zeroes[0]
        with open(disk, "rb") as f:
            data = f.read(256 * K)
        assert data == b"\xaa" * (64 * K) + bytes(128 * K) + b"\xaa" * (64 * K)


def test_fuse_options_reach_libfuse_direct_io_sends_whole_reads(tmp_path):
    log = tmp_path / "requests.log"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with served("memory", "4M", "--filter=log", f"logfile={log}") as srv, \
            fuse(mnt, "-o", "direct_io", "--fuse-option=fsname=mydisk", srv.uri):
        with open("/proc/mounts") as mounts:
            assert f"mydisk {mnt} " in mounts.read()
        fd = os.open(mnt / "nbd", os.O_RDONLY)
        try:
            with mmap.mmap(-1, M) as page_aligned:  # or the kernel splits at its pages
                assert os.preadv(fd, [page_aligned], M) == M
        finally:
            os.close(fd)
        assert any("offset=0x100000 count=0x100000" in line for line in log_lines(log, "Read"))


def readahead_kib(path: Path) -> int:
    device = path.stat().st_dev
    return int(Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
               .read_text())


def test_readahead_raised_so_page_cache_reads_are_1m_requests(tmp_path):
    log = tmp_path / "requests.log"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with served("memory", "8M", "--filter=log", f"logfile={log}") as srv:
        with fuse(mnt, srv.uri):  # the default: 4 MiB, set before the pidfile appears
            assert readahead_kib(mnt / "nbd") == 4096
            with open(mnt / "nbd", "rb") as f:  # 64 KiB reads: the kernel reads ahead
                while f.read(64 * K):
                    continue
            reads = log_lines(log, "Read")
            assert any("count=0x100000" in line for line in reads), reads
            assert len(reads) <= 16, reads  # not 64 reads of 128 KiB
        with fuse(mnt, "--readahead=2M", srv.uri):
            assert readahead_kib(mnt / "nbd") == 2048
        with fuse(mnt, "--readahead=0", srv.uri):  # the kernel's own
            assert readahead_kib(mnt / "nbd") == 128


def test_requests_from_many_threads_match_the_server_and_nbdfuse(tmp_path):
    """The same pattern export through pynbd fuse and nbdfuse: the same bytes,
    including reads racing on eight threads."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    with served("pattern", "16M", server="nbdkit") as srv, fuse(ours, srv.uri), \
            fuse(theirs, srv.uri, tool="nbdfuse"):
        assert (ours / "nbd").read_bytes() == (theirs / "nbd").read_bytes() == pattern(0, 16 * M)
        failures: list[str] = []

        def reader(seed: int) -> None:
            fd = os.open(ours / "nbd", os.O_RDONLY)
            try:
                for i in range(40):
                    offset = ((seed * 7919 + i * 104729) * 4 * K) % (15 * M)
                    if os.pread(fd, 96 * K, offset) != pattern(offset, 96 * K):
                        failures.append(f"thread {seed} offset {offset}")
            finally:
                os.close(fd)

        threads = [threading.Thread(target=reader, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures


def test_directory_mode_one_file_per_export(tmp_path):
    exports = tmp_path / "exports"
    exports.mkdir()
    (exports / "a.img").write_bytes(b"a" * M)
    (exports / "b.img").write_bytes(b"b" * (2 * M))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with served("file", f"dir={exports}", server="nbdkit") as srv, fuse(mnt, "-L", srv.uri):
        assert sorted(os.listdir(mnt)) == ["a.img", "b.img"]
        assert (mnt / "a.img").read_bytes() == b"a" * M
        assert (mnt / "b.img").stat().st_size == 2 * M
        with open(mnt / "b.img", "r+b") as f:
            f.seek(M)
            f.write(b"written through fuse")
        assert (exports / "b.img").read_bytes()[M:M + 20] == b"written through fuse"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_unmounts_stops_the_captive_server_and_exits_0(tmp_path, sig):
    disk = tmp_path / "disk"
    disk.touch()
    with fuse(disk, "--socket-activation", *PYNBD, "serve", "memory", "1M") as proc:
        servers = children(proc.pid)
        assert servers
        proc.send_signal(sig)
        assert proc.wait(30) == 0
        assert not is_mounted(disk)
        wait_for(lambda: all(exited(pid) for pid in servers), message="server left running")


def test_what_a_block_device_refuses(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with served("memory", "1M") as srv, fuse(mnt / "disk", srv.uri):
        disk = mnt / "disk"
        fd = os.open(disk, os.O_RDWR)
        try:
            assert os.pwrite(fd, b"x" * 4096, M - 2048) == 2048  # short, as a disk's
            with pytest.raises(OSError) as past_end:
                os.pwrite(fd, b"x" * 4096, M)
            assert past_end.value.errno == errno.ENOSPC
            with pytest.raises(OSError) as truncate:
                os.ftruncate(fd, 4096)
            assert truncate.value.errno == errno.EINVAL
            os.pwrite(fd, b"still serving", 0)  # the mount goes on after a refusal
            assert os.pread(fd, 13, 0) == b"still serving"
        finally:
            os.close(fd)
    with served("memory", "1M") as srv, fuse(mnt, "-r", srv.uri):
        with pytest.raises(OSError) as readonly:
            open(mnt / "nbd", "r+b")
        assert readonly.value.errno == errno.EROFS
        assert (mnt / "nbd").read_bytes() == bytes(M)


@pytest.mark.parametrize("args, message", [
    (["MNT", "nbd+unix:///?socket=/nonexistent"], "connect: /nonexistent"),
    (["MNT", "[", "nbdkit", "memory", "1M"], "'[' without a matching ']'"),
    (["MNT", "notauri://x"], "notauri://x"),
    (["MNT/no/such/dir", "nbd://localhost"], "no such file or directory"),
    (["MNT"], "give MOUNTPOINT and one NBD URI"),
    (["--bogus", "MNT", "nbd://localhost"], "unrecognized arguments: --bogus"),
    (["MNT", "--socket-activation"], "--socket-activation: no command"),
    (["MNT", "[", "/nonexistent/server", "]"], "cannot run /nonexistent/server"),
    (["--readahead=lots", "MNT", "nbd://localhost"], "--readahead: could not parse size"),
])
def test_bad_input_is_one_line_and_status_1(tmp_path, args, message):
    argv = [a.replace("MNT", str(tmp_path)) for a in args]
    result = run([*PYNBD, "fuse", *argv], check=False, timeout=60)
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert "Traceback" not in err and message in err, err
    assert err.splitlines()[-1].startswith("pynbd fuse: "), err
    assert not is_mounted(tmp_path)
