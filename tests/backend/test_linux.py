"""backend.linux on real files: holes, zeroed ranges, the page cache, block devices,
and file systems that cannot do some of it (ramfs: no fallocate; tmpfs: no ZERO_RANGE)."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdtest import wait_for
from pynbd.backend import linux

MiB = 1 << 20
METADATA = 64 * 1024
"""Slack for file-system metadata in st_blocks: a hole or zeroed range that splits
an extent can make ext4 allocate an extent-tree block (whether it must depends on
how fragmented the file's data landed on the disk)."""


def make_data(path: Path, size: int) -> int:
    """A file of ``size`` random bytes, on disk (fsynced); returns an O_RDWR fd."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    os.pwrite(fd, os.urandom(size), 0)
    os.fsync(fd)
    return fd


def blocks(fd: int) -> int:
    """Bytes allocated to the file."""
    return os.fstat(fd).st_blocks * 512


def resident(path: Path) -> int:
    """Bytes of the file in the page cache."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, check=True).stdout
    return int(out.decode().strip() or 0)


@pytest.fixture
def fd_file(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """8 MiB of data in a file on the test's own file system."""
    path = tmp_path / "data.img"
    fd = make_data(path, 8 * MiB)
    try:
        yield fd, path
    finally:
        os.close(fd)


# ---------------------------------------------------------------- errnos
@pytest.mark.parametrize("code", [errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.ENODEV,
                                  errno.ENOTTY, errno.EINVAL])
def test_not_supported_errnos(code):
    assert code in linux.NOT_SUPPORTED_ERRNOS
    assert linux.is_not_supported(OSError(code, os.strerror(code)))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.EBADF, errno.EPERM, errno.EROFS,
                                  errno.EFBIG, errno.EDQUOT, errno.ENOENT])
def test_real_errors_are_not_not_supported(code):
    assert not linux.is_not_supported(OSError(code, os.strerror(code)))


def test_not_supported_errnos_is_frozen():
    assert isinstance(linux.NOT_SUPPORTED_ERRNOS, frozenset)


# ---------------------------------------------------------------- fallocate
def test_punch_hole_frees_blocks_and_seek_hole_finds_it(fd_file):
    fd, _ = fd_file
    before = blocks(fd)
    assert before >= 8 * MiB
    linux.punch_hole(fd, 2 * MiB, 3 * MiB)
    assert blocks(fd) <= before - 3 * MiB + METADATA
    assert os.lseek(fd, 0, os.SEEK_HOLE) == 2 * MiB
    assert os.lseek(fd, 2 * MiB, os.SEEK_DATA) == 5 * MiB
    assert os.pread(fd, 3 * MiB, 2 * MiB) == bytes(3 * MiB)
    assert os.fstat(fd).st_size == 8 * MiB


def test_punch_hole_past_the_end_keeps_the_size(fd_file):
    fd, _ = fd_file
    linux.punch_hole(fd, 7 * MiB, 4 * MiB)
    assert os.fstat(fd).st_size == 8 * MiB
    assert os.pread(fd, MiB, 7 * MiB) == bytes(MiB)


def test_punch_hole_partial_blocks_are_zeroed(fd_file):
    fd, _ = fd_file
    before = os.pread(fd, 10000, 0)
    linux.punch_hole(fd, 1000, 5000)
    assert os.pread(fd, 10000, 0) == before[:1000] + bytes(5000) + before[6000:]


def test_zero_range_reads_zeroes_and_stays_allocated(fd_file):
    fd, _ = fd_file
    before = blocks(fd)
    try:
        linux.zero_range(fd, MiB + 100, 2 * MiB)
    except OSError as exc:
        assert linux.is_not_supported(exc)
        pytest.skip(f"no ZERO_RANGE on this file system: {exc}")
    data = os.pread(fd, 4 * MiB, 0)
    assert data[MiB + 100:3 * MiB + 100] == bytes(2 * MiB)
    assert data[:MiB + 100].count(0) < MiB  # the rest is still the random data
    assert blocks(fd) >= before - METADATA
    assert os.fstat(fd).st_size == 8 * MiB


def test_zero_range_keep_size_or_extend(fd_file):
    fd, _ = fd_file
    try:
        linux.zero_range(fd, 8 * MiB, MiB)
    except OSError as exc:
        pytest.skip(f"no ZERO_RANGE on this file system: {exc}")
    assert os.fstat(fd).st_size == 8 * MiB
    linux.zero_range(fd, 8 * MiB, MiB, keep_size=False)
    assert os.fstat(fd).st_size == 9 * MiB
    assert os.pread(fd, MiB, 8 * MiB) == bytes(MiB)


def test_allocate_fills_a_hole_without_changing_data(tmp_path):
    path = tmp_path / "sparse.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, 4 * MiB)
        os.pwrite(fd, b"keep", 0)
        linux.allocate(fd, 0, 4 * MiB)
        assert blocks(fd) >= 4 * MiB
        assert os.pread(fd, 8, 0) == b"keep" + bytes(4)
        assert os.fstat(fd).st_size == 4 * MiB
    finally:
        os.close(fd)


def test_write_zeroes_over_data_leaves_the_rest(fd_file):
    fd, _ = fd_file
    before = os.pread(fd, 8 * MiB, 0)
    offset, count = 12345, 5 * MiB + 777  # several mebibytes and a partial one
    linux.write_zeroes(fd, offset, count)
    after = os.pread(fd, 8 * MiB, 0)
    assert after[offset:offset + count] == bytes(count)
    assert after[:offset] == before[:offset] and after[offset + count:] == before[offset + count:]


def test_write_zeroes_past_the_end_extends_the_file(tmp_path):
    fd = os.open(tmp_path / "grow.img", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        linux.write_zeroes(fd, 100, 40 * MiB)  # more than one pwritev of 16 buffers
        assert os.fstat(fd).st_size == 40 * MiB + 100
        assert blocks(fd) >= 40 * MiB  # written, not a hole
    finally:
        os.close(fd)


def test_empty_ranges_do_nothing_and_negative_ones_are_bugs(tmp_path):
    path = tmp_path / "ro.img"
    path.write_bytes(b"x" * 8192)
    fd = os.open(path, os.O_RDONLY)
    try:
        for call in (linux.punch_hole, linux.zero_range, linux.allocate, linux.write_zeroes,
                     linux.blkzeroout, linux.blkdiscard, linux.will_need, linux.drop_cache,
                     linux.start_writeback, linux.evict):
            call(fd, 0, 0)  # no system call: a read-only fd would fail it
        for call in (linux.punch_hole, linux.zero_range, linux.write_zeroes):
            with pytest.raises(ValueError):
                call(fd, -1, 10)
            with pytest.raises(ValueError):
                call(fd, 0, -10)
    finally:
        os.close(fd)


def test_a_real_error_is_not_not_supported(tmp_path):
    path = tmp_path / "ro.img"
    path.write_bytes(b"x" * 8192)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as failed:
            linux.punch_hole(fd, 0, 4096)
        assert failed.value.errno == errno.EBADF and not linux.is_not_supported(failed.value)
        with pytest.raises(OSError) as failed:
            linux.try_punch_hole(fd, 0, 4096)  # raised, not turned into False
        assert failed.value.errno == errno.EBADF
    finally:
        os.close(fd)
    assert path.read_bytes() == b"x" * 8192


def test_fallocate_raw_mode_errors(fd_file):
    fd, _ = fd_file
    with pytest.raises(OSError) as refused:  # PUNCH_HOLE needs KEEP_SIZE
        linux.fallocate(fd, linux.FALLOC_FL_PUNCH_HOLE, 0, 4096)
    assert refused.value.errno == errno.EOPNOTSUPP and linux.is_not_supported(refused.value)


def test_fallocate_on_a_pipe_is_not_supported():
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(OSError) as refused:
            linux.punch_hole(write_end, 0, 4096)
        # ESPIPE: not a file at all, which no fallback can help.
        assert refused.value.errno == errno.ESPIPE and not linux.is_not_supported(refused.value)
    finally:
        os.close(read_end)
        os.close(write_end)


# ---------------------------------------------------------------- file systems without fallocate
def test_ramfs_cannot_punch_and_zeroes_are_written(ramfs):
    path = ramfs / "disk.img"
    fd = make_data(path, 2 * MiB)
    try:
        with pytest.raises(OSError) as refused:
            linux.punch_hole(fd, 0, MiB)
        assert linux.is_not_supported(refused.value)
        with pytest.raises(OSError) as refused:
            linux.zero_range(fd, 0, MiB)
        assert linux.is_not_supported(refused.value)
        assert linux.try_punch_hole(fd, 0, MiB) is False
        zeroer = linux.Zeroer(fd)
        assert zeroer.zero(0, MiB, may_punch=True) is False
        assert (zeroer.can_punch, zeroer.can_zero_range) == (False, False)
        assert zeroer.discard(0, MiB) is False
        linux.write_zeroes(fd, 0, MiB)
        assert os.pread(fd, MiB, 0) == bytes(MiB)
        assert os.pread(fd, MiB, MiB).count(0) < MiB // 2
    finally:
        os.close(fd)


def test_tmpfs_has_holes_but_no_zero_range(shm_dir):
    fd = make_data(shm_dir / "disk.img", 4 * MiB)
    try:
        with pytest.raises(OSError) as refused:
            linux.zero_range(fd, 0, MiB)
        assert refused.value.errno == errno.EOPNOTSUPP
        zeroer = linux.Zeroer(fd)
        # No ZERO_RANGE: punched and allocated again instead, so still allocated.
        assert zeroer.zero(0, MiB) is True
        assert (zeroer.can_zero_range, zeroer.can_punch, zeroer.can_allocate) == (False, True, True)
        assert os.pread(fd, MiB, 0) == bytes(MiB)
        assert blocks(fd) == 4 * MiB
        assert zeroer.zero(MiB, MiB, may_punch=True) is True  # a plain hole
        assert blocks(fd) == 3 * MiB
    finally:
        os.close(fd)


def test_a_full_file_system_is_a_real_error(small_tmpfs):
    fd = os.open(small_tmpfs / "big.img", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, 4 * MiB)
        with pytest.raises(OSError) as full:
            linux.allocate(fd, 0, 4 * MiB)
        assert full.value.errno == errno.ENOSPC and not linux.is_not_supported(full.value)
        # The zeroer gets as far as the hole and then reports ENOSPC, not "unsupported".
        zeroer = linux.Zeroer(fd)
        with pytest.raises(OSError) as full:
            zeroer.zero(0, 4 * MiB)
        assert full.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as full:
            linux.write_zeroes(fd, 0, 4 * MiB)
        assert full.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


# ---------------------------------------------------------------- Zeroer
def test_zeroer_holes_or_allocated_zeroes(fd_file):
    fd, _ = fd_file
    zeroer = linux.Zeroer(fd)
    before = blocks(fd)
    assert zeroer.zero(0, MiB, may_punch=True) is True
    assert blocks(fd) <= before - MiB + METADATA and os.lseek(fd, 0, os.SEEK_HOLE) == 0
    assert zeroer.zero(2 * MiB, MiB) is True  # no hole allowed: stays allocated
    assert blocks(fd) >= before - MiB - METADATA
    assert os.pread(fd, 3 * MiB, 0) == bytes(MiB) + os.pread(fd, MiB, MiB) + bytes(MiB)
    assert zeroer.discard(4 * MiB, MiB) is True
    assert blocks(fd) <= before - 2 * MiB + METADATA


def test_zeroer_sectors_only_where_asked(fd_file):
    fd, _ = fd_file
    zeroer = linux.Zeroer(fd, sector=4096)
    assert zeroer.zero(512, 4096) is False and zeroer.discard(0, 1000) is False
    assert zeroer.can_punch and zeroer.can_zero_range  # not a refusal: nothing was tried
    assert os.pread(fd, 8192, 0).count(0) < 4096


def test_zeroer_einval_skips_a_method_only_once(fd_file, monkeypatch):
    fd, _ = fd_file
    tried = []

    def unaligned(fd: int, offset: int, count: int) -> None:
        tried.append(offset)
        raise OSError(errno.EINVAL, "this file system wants aligned ranges")

    monkeypatch.setattr(linux, "zero_range", unaligned)
    zeroer = linux.Zeroer(fd)
    assert zeroer.zero(100, 5000) is True  # fell through to punch + allocate
    assert zeroer.zero(8192, 5000) is True
    assert tried == [100, 8192] and zeroer.can_zero_range
    assert os.pread(fd, 5000, 100) == bytes(5000)


def test_zeroer_not_supported_is_remembered(fd_file, monkeypatch):
    fd, _ = fd_file
    tried = []

    def refuse(fd: int, offset: int, count: int) -> None:
        tried.append(offset)
        raise OSError(errno.EOPNOTSUPP, "no")

    monkeypatch.setattr(linux, "zero_range", refuse)
    zeroer = linux.Zeroer(fd)
    assert zeroer.zero(0, 4096) and zeroer.zero(4096, 4096)
    assert tried == [0] and not zeroer.can_zero_range


def test_zeroer_passes_real_errors_on(fd_file, monkeypatch):
    fd, _ = fd_file

    def broken(fd: int, offset: int, count: int) -> None:
        raise OSError(errno.EIO, "disk on fire")

    monkeypatch.setattr(linux, "zero_range", broken)
    zeroer = linux.Zeroer(fd)
    with pytest.raises(OSError) as failed:
        zeroer.zero(0, 4096)
    assert failed.value.errno == errno.EIO and zeroer.can_zero_range


# ---------------------------------------------------------------- page cache
def test_fadvise_calls_succeed(fd_file):
    fd, _ = fd_file
    for pattern in linux.ACCESS_PATTERNS:
        linux.advise_access(fd, pattern)
    linux.will_need(fd, 0, 8 * MiB)
    linux.drop_cache(fd, 0, 8 * MiB)
    with pytest.raises(KeyError):
        linux.advise_access(fd, "often")


def test_will_need_reads_ahead_and_drop_cache_drops(fd_file):
    fd, path = fd_file
    linux.drop_cache(fd, 0, 8 * MiB)
    assert resident(path) == 0
    linux.will_need(fd, 0, 4 * MiB)  # the reads go on in the background
    wait_for(lambda: resident(path) >= 4 * MiB,
             message=lambda: f"WILLNEED read {resident(path)} bytes of 4 MiB in")
    os.pread(fd, 8 * MiB, 0)
    assert resident(path) == 8 * MiB
    linux.drop_cache(fd, 3 * MiB, 5 * MiB)  # stretched back to 2 MiB, the folio boundary
    assert resident(path) <= 3 * MiB
    linux.drop_cache(fd, 0, 8 * MiB)
    assert resident(path) == 0


def test_evict_writes_back_and_drops_dirty_pages(tmp_path):
    path = tmp_path / "dirty.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        data = os.urandom(4 * MiB)
        os.pwrite(fd, data, 0)
        # Dirty pages cannot be dropped: DONTNEED only starts their writeback.
        # How many are clean by the time it looks depends on the disk and the
        # load, so the page cache is not sampled here, only the data checked.
        linux.drop_cache(fd, 0, 4 * MiB)
        assert os.pread(fd, 4 * MiB, 0) == data
        data = os.urandom(4 * MiB)
        os.pwrite(fd, data, 0)  # all dirty again
        linux.start_writeback(fd, 0, 4 * MiB)
        linux.evict(fd, 0, 4 * MiB)  # waits for that writeback: nothing is left to keep
        assert resident(path) == 0
        assert os.pread(fd, 4 * MiB, 0) == data  # read back from the disk
    finally:
        os.close(fd)


@pytest.mark.parametrize("limits", [{"max_ranges": 2}, {"max_bytes": 2 * MiB}])
def test_write_behind_keeps_only_the_last_writes_cached(tmp_path, limits):
    path = tmp_path / "written.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        behind = linux.WriteBehind(fd, **limits)
        for i in range(8):
            os.pwrite(fd, os.urandom(MiB), i * MiB)
            behind.written(i * MiB, MiB)
        assert len(behind.pending) == 2 and behind.queued == 2 * MiB
        assert resident(path) <= 2 * MiB
        behind.drain()
        assert resident(path) == 0 and behind.queued == 0 and not behind.pending
    finally:
        os.close(fd)


def test_write_behind_without_limits_only_evicts_on_drain(tmp_path):
    path = tmp_path / "written.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        behind = linux.WriteBehind(fd)
        for i in range(4):
            os.pwrite(fd, bytes([i + 1]) * MiB, i * MiB)
            behind.written(i * MiB, MiB)
        assert len(behind.pending) == 4 and behind.queued == 4 * MiB
        # Writeback (started by written) cleans pages but never drops them.
        assert resident(path) == 4 * MiB
        behind.drain()
        assert resident(path) == 0
        assert os.pread(fd, 1, 3 * MiB) == b"\x04"
    finally:
        os.close(fd)


# ---------------------------------------------------------------- block devices
@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    backing = tmp_path / "backing.img"
    os.close(make_data(backing, 8 * MiB))
    result = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"no loop device: {result.stderr.decode().strip()}")
    device = result.stdout.decode().strip()
    fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    try:
        yield fd, backing
    finally:
        os.close(fd)
        subprocess.run(["losetup", "-d", device], check=False)


def test_block_device_ioctls(loop_device):
    fd, backing = loop_device
    assert linux.logical_sector_size(fd) == 512
    assert linux.is_rotational(fd) in (False, True)
    linux.blkzeroout(fd, 0, MiB)
    linux.blkdiscard(fd, 2 * MiB, MiB)  # loop devices discard by punching the backing file
    os.fsync(fd)
    data = backing.read_bytes()
    assert data[:MiB] == bytes(MiB)
    assert data[MiB:2 * MiB].count(0) < MiB // 2
    with pytest.raises(OSError) as unaligned:
        linux.blkzeroout(fd, 100, 4096)
    assert unaligned.value.errno == errno.EINVAL and linux.is_not_supported(unaligned.value)


def test_zeroer_on_a_block_device(loop_device):
    fd, backing = loop_device
    zeroer = linux.Zeroer(fd, block_device=True, sector=linux.logical_sector_size(fd))
    assert zeroer.zero(0, MiB, fast_only=True) is False  # the kernel might write: not fast
    assert zeroer.zero(0, MiB) is True
    assert zeroer.zero(MiB, MiB, may_punch=True, fast_only=True) is True
    assert zeroer.zero(4 * MiB + 100, 512) is False  # not whole sectors: the caller writes
    assert zeroer.discard(3 * MiB, MiB) is True
    os.fsync(fd)
    assert backing.read_bytes()[:2 * MiB] == bytes(2 * MiB)


def test_not_a_block_device(fd_file):
    fd, _ = fd_file
    with pytest.raises(OSError) as refused:
        linux.blkzeroout(fd, 0, 4096)
    assert refused.value.errno == errno.ENOTTY and linux.is_not_supported(refused.value)
    assert linux.is_rotational(fd) is False
