"""Stacks of three and more filters with real clients, compared with the same stack in nbdkit."""

from __future__ import annotations

import json
import random
import shutil

import pytest
from stack_helpers import BOTH, make_mbr, nbdsh_outcomes

from nbdtest import nbdsh, run, served

MiB = 1 << 20


@pytest.fixture(scope="module")
def partitioned(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("stack") / "disk.img")
    make_mbr(path, 6 * MiB, [(0x83, 2048, 2048), (5, 4096, 8192)], logicals=[(4000, 1)])
    with open(path, "r+b") as f:  # random data in the logical partition, past its stamp
        f.seek(4097 * 512 + 4096)
        f.write(random.Random(1).randbytes(1_000_000))
    return path


def test_qemu_img_convert_through_four_filters(partitioned, tmp_path):
    stack = ("--filter=readahead", "--filter=cache", "--filter=partition", "--filter=noextents",
             "file", partitioned, "partition=5", "cache-on-read=true")
    outputs = []
    for server in BOTH:
        out = tmp_path / f"{server}.qcow2"
        with served(*stack, server=server) as srv:
            run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", srv.uri, str(out)])
        raw = tmp_path / f"{server}.raw"
        run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(out), str(raw)])
        outputs.append(raw.read_bytes())
    assert outputs[0] == outputs[1] and len(outputs[0]) == 4000 * 512


def test_nbdcopy_into_a_stack_and_back(tmp_path):
    source = tmp_path / "source"
    source.write_bytes(random.Random(2).randbytes(3 * MiB + 1234))
    stats = tmp_path / "stats"
    stack = ("--filter=stats", "--filter=blocksize", "--filter=truncate", "--filter=cache",
             "memory", "4M", f"statsfile={stats}", "minblock=4k", "maxdata=256k",
             "truncate=3146962", "round-up=4k", "cache=writethrough")
    with served(*stack) as srv:
        run(["nbdcopy", "--flush", str(source), srv.uri])
        run(["nbdcopy", srv.uri, str(tmp_path / "back")])
    back = (tmp_path / "back").read_bytes()
    assert len(back) == 3149824  # 3 MiB + 1234 rounded up to 4 KiB by truncate
    assert back == source.read_bytes() + bytes(len(back) - source.stat().st_size)
    assert stats.read_text().startswith("total:")


@pytest.mark.parametrize("order, size", [
    (["--filter=blocksize", "--filter=truncate"], 12288),  # rounded up below, so it stays
    (["--filter=truncate", "--filter=blocksize"], 8192),   # blocksize below rounds down first
])
def test_blocksize_truncate_order(order, size):
    sizes = []
    for server in BOTH:
        with served(*order, "pattern", "10000", "minblock=4k", "round-up=4k", server=server) as srv:
            sizes.append(int(nbdsh(srv.uri, "print(h.get_size())")))
    assert sizes == [size, size]


@pytest.mark.parametrize("order, expected", [
    (["--filter=protect", "--filter=offset"], ["EPERM", "ok"]),  # ranges in the client's offsets
    (["--filter=offset", "--filter=protect"], ["ok", "ok"]),     # ranges of the disk below the slice
])
def test_protect_offset_order(order, expected):
    calls = ["h.pwrite(b'x' * 16, 0)", "h.pwrite(b'x' * 16, 1024)"]
    results = []
    for server in BOTH:
        with served(*order, "memory", "1M", "protect=0-511", "offset=1024", server=server) as srv:
            results.append(nbdsh_outcomes(srv.uri, calls))
    assert results == [expected, expected]


def test_nbdinfo_of_a_five_filter_stack_matches_nbdkit():
    stack = ("--filter=noextents", "--filter=truncate", "--filter=fua", "--filter=nozero",
             "--filter=noparallel", "memory", "1M", "truncate=777777", "fuamode=emulate",
             "zeromode=emulate", "serialize=connections")
    infos = []
    for server in BOTH:
        with served(*stack, server=server) as srv:
            export = json.loads(run(["nbdinfo", "--json", srv.uri]).stdout)["exports"][0]
            export["map"] = run(["nbdinfo", "--map", srv.uri]).stdout.decode()
        infos.append({k: v for k, v in export.items() if not k.startswith("block_size") and k != "uri"})
    assert infos[0] == infos[1]
    assert infos[0]["export-size"] == 777777 and infos[0]["can_multi_conn"] is False


@pytest.mark.skipif(shutil.which("fio") is None, reason="needs fio")
def test_fio_verify_through_cache_blocksize_and_stats(tmp_path):
    """Parallel odd-sized writes: read-modify-write in blocksize, eviction in a tiny cache."""
    stack = ("--filter=stats", "--filter=blocksize", "--filter=cache", "memory", "8M",
             f"statsfile={tmp_path / 'stats'}", "minblock=4k", "cache-max-size=256k",
             "cache-min-block-size=64k")
    with served(*stack) as srv:
        job = ["fio", "--name=verify", "--ioengine=nbd", f"--uri={srv.uri}", "--rw=randwrite",
               "--bsrange=512-24k", "--bs_unaligned=1", "--size=4M", "--iodepth=16",
               "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
               "--output-format=json"]
        result = run(job, timeout=120)
    report = json.loads(result.stdout[result.stdout.index(b"{"):])["jobs"][0]
    assert report["error"] == 0
    assert report["write"]["io_bytes"] > 3 << 20 and report["read"]["io_bytes"] > 3 << 20
