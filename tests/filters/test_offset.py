"""offset filter: real clients, and the same commands under nbdkit's offset filter."""

from __future__ import annotations

import hashlib
import json

import pytest

from nbdtest import run, served

BOTH = ("pynbd", "nbdkit")


def content_hash(uri: str) -> str:
    data = run(["nbdcopy", uri, "-"]).stdout
    return hashlib.sha256(data).hexdigest()


def nbd_map(uri: str) -> list[dict]:
    return json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout)


def size_of(uri: str) -> int:
    return json.loads(run(["nbdinfo", "--json", uri]).stdout)["exports"][0]["export-size"]


@pytest.mark.parametrize("params", [["offset=12345", "range=100000"], ["offset=1M"], ["range=3000"]])
def test_pattern_bytes_match_nbdkit(params):
    seen = {}
    for server in BOTH:
        with served("--filter=offset", "pattern", "2M", *params, server=server) as srv:
            seen[server] = (size_of(srv.uri), content_hash(srv.uri))
    assert seen["pynbd"] == seen["nbdkit"]


def test_writes_land_shifted_and_extents_match_nbdkit():
    seen = {}
    for server in BOTH:
        with served("--filter=offset", "memory", "8M", "offset=1M", "range=4M", server=server) as srv:
            run(["qemu-io", "-f", "raw", "-c", "write -P 0x61 0 64k", "-c", "write -P 0x62 1M 128k",
                 "-c", "write -P 0x63 4032k 64k", srv.uri])
            seen[server] = (nbd_map(srv.uri), content_hash(srv.uri))
    assert seen["pynbd"] == seen["nbdkit"]
    extents = seen["pynbd"][0]
    assert [(e["offset"], e["length"]) for e in extents if e["type"] == 0] == [
        (0, 65536), (1 << 20, 131072), (4032 << 10, 65536)]


def test_the_layer_below_sees_shifted_offsets():
    # the log filter under offset records what reaches the plugin
    with served("--filter=offset", "memory", "4M", "offset=512k", "range=1M") as srv:
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x7a 0 4k", srv.uri])
        out = run(["nbdsh", "-u", srv.uri, "-c",
                   "h.zero(4096, 4096); h.trim(4096, 8192); h.cache(4096, 0); h.flush(); "
                   "print(h.pread(8, 0).hex(), h.pread(8, 4096).hex(), h.get_size())"]).stdout
    assert out.decode().split() == ["7a" * 8, "00" * 8, str(1 << 20)]


def test_range_beyond_the_disk_is_refused_at_connect():
    with served("--filter=offset", "memory", "1M", "offset=512k", "range=1M") as srv:
        result = run(["nbdinfo", srv.uri], check=False)
        assert result.returncode != 0
        assert srv.proc.poll() is None
    log = srv.stderr()
    assert "offset" in log and "beyond the end" in log


def test_reads_past_the_range_fail():
    with served("--filter=offset", "memory", "4M", "offset=1M", "range=1M") as srv:
        result = run(["qemu-io", "-f", "raw", "-c", "read 1020k 8k", srv.uri], check=False)
        assert b"read 8192/8192" not in result.stdout
