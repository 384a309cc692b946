"""blocksize filter: aligned, bounded requests below; right bytes above, even in parallel."""

from __future__ import annotations

import json
import random

import pytest
from stack_helpers import BOTH, log_lines

from nbdtest import PYNBD, nbdsh, run, served

WRITES = [(1, 3), (4095, 2), (5000, 9000), (12288, 4096), (40000, 70000), (123, 1)]


def unaligned_script() -> str:
    """Writes and zeroes at odd places, then a print of the whole disk as hex."""
    lines = []
    for index, (offset, length) in enumerate(WRITES):
        lines.append(f"h.pwrite(bytes([{index + 1}]) * {length}, {offset})")
    lines += ["h.zero(777, 6001)", "h.trim(10000, 50001)",
              "import sys; sys.stdout.write(h.pread(h.get_size(), 0).hex())"]
    return "\n".join(lines)


def expected_disk(size: int) -> bytes:
    disk = bytearray(size)
    for index, (offset, length) in enumerate(WRITES):
        disk[offset:offset + length] = bytes([index + 1]) * length
    disk[6001:6001 + 777] = bytes(777)
    return bytes(disk)


def test_size_and_limits_match_nbdkit():
    infos = []
    for server in BOTH:
        with served("--filter=blocksize", "pattern", "1000000", "minblock=4096", server=server) as srv:
            infos.append(json.loads(run(["nbdinfo", "--json", srv.uri]).stdout)["exports"][0])
    assert infos[0]["export-size"] == infos[1]["export-size"] == 999424
    assert infos[0]["block_size_minimum"] == 1


def test_unaligned_requests_are_aligned_below(tmp_path):
    logfile = tmp_path / "below.log"
    with served("--filter=blocksize", "--filter=log", "memory", "256K", "minblock=4k",
                "maxdata=8k", "maxlen=16k", f"logfile={logfile}") as srv:
        data = bytes.fromhex(nbdsh(srv.uri, unaligned_script()))
    trimmed = data[:50001] + data[60001:]
    assert trimmed == (expected_disk(256 * 1024)[:50001] + expected_disk(256 * 1024)[60001:])
    for line in log_lines(str(logfile)):
        words = dict(w.split("=", 1) for w in line.split() if "=" in w)
        if "offset" in words:
            offset, count = int(words["offset"], 16), int(words["count"], 16)
            assert offset % 4096 == 0 and count % 4096 == 0, line
            limit = 8192 if (" Read " in line or " Write " in line) else 16384
            assert count <= limit, line


def test_same_bytes_as_nbdkit():
    results = []
    for server in BOTH:
        with served("--filter=blocksize", "memory", "128K", "minblock=512", "maxdata=4k",
                    server=server) as srv:
            results.append(nbdsh(srv.uri, unaligned_script()))
    assert results[0] == results[1]


def test_parallel_read_modify_write_loses_nothing():
    """64 one-byte writes into the same two blocks at once, over a slow layer."""
    offsets = random.Random(7).sample(range(8192), 64)
    script = "\n".join([
        f"offsets = {offsets}",
        "for i, off in enumerate(offsets):",
        "    h.aio_pwrite(bytes([i + 1]), off)",
        "while h.aio_in_flight() > 0:",
        "    h.poll(-1)",
        "data = h.pread(8192, 0)",
        "print(sum(1 for i, off in enumerate(offsets) if data[off] == i + 1))",
    ])
    with served("--filter=blocksize", "--filter=delay", "memory", "1M", "minblock=4k",
                "rdelay=5ms", "wdelay=5ms") as srv:
        assert nbdsh(srv.uri, script).strip() == "64"


def test_qemu_img_through_blocksize(tmp_path):
    source = tmp_path / "src.img"
    source.write_bytes(random.Random(3).randbytes(300_000))
    with served("--filter=blocksize", "memory", "300000", "minblock=4k", "maxdata=64k") as srv:
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 4097 6000", srv.uri])
        out = run(["qemu-io", "-f", "raw", "-c", "read -P 0x5a 4097 6000", srv.uri]).stdout
        assert b"read 6000/6000" in out
        assert nbdsh(srv.uri, "print(h.get_size())").strip() == str(300_000 // 4096 * 4096)


@pytest.mark.parametrize("params, message", [
    (["minblock=3000"], "minblock=3000: must be a power of 2"),
    (["minblock=128k"], "minblock=131072: must be a power of 2 no larger than 64k"),
    (["minblock=4k", "maxdata=6000"], "maxdata=6000: must be a multiple of minblock"),
])
def test_bad_sizes_are_refused(params, message):
    result = run([*PYNBD, "serve", "--filter=blocksize", "memory", "1M", *params], check=False)
    assert result.returncode == 1 and message in result.stderr.decode()
