"""partition filter: same bytes and extents as nbdkit's, refusals, writes, order."""

from __future__ import annotations

import pytest
from stack_helpers import BOTH, file_bytes, make_gpt, make_mbr

from nbdtest import PYNBD, nbdsh, run, served

MiB = 1 << 20


@pytest.fixture(scope="module")
def mbr(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("mbr") / "mbr.img")
    make_mbr(path, 8 * MiB, [(0x83, 2048, 2048), (0x0C, 4096, 2048), (5, 6144, 8192)],
             logicals=[(1024, 1), (2048, 63)])
    return path


@pytest.fixture(scope="module")
def gpt(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("gpt") / "gpt.img")
    make_gpt(path, 8 * MiB, [(2048, 4095), None, (6144, 10239)])
    return path


def copy_out(server: str, image: str, number: int, tmp_path) -> bytes:
    out = tmp_path / f"{server}-{number}.bin"
    with served("--filter=partition", "file", image, f"partition={number}", server=server) as srv:
        run(["nbdcopy", srv.uri, str(out)])
    return out.read_bytes()


@pytest.mark.parametrize("number", [1, 2, 5, 6])
def test_mbr_partition_bytes_match_nbdkit(mbr, number, tmp_path):
    ours = copy_out("pynbd", mbr, number, tmp_path)
    assert ours == copy_out("nbdkit", mbr, number, tmp_path)
    assert ours[:1] == bytes([number]) and ours[-1:] == b"\xff"


@pytest.mark.parametrize("number", [1, 3])
def test_gpt_partition_bytes_and_map_match_nbdkit(gpt, number, tmp_path):
    ours = copy_out("pynbd", gpt, number, tmp_path)
    assert ours == copy_out("nbdkit", gpt, number, tmp_path)
    assert len(ours) == {1: 1 * MiB, 3: 2 * MiB}[number]
    maps = []
    for server in BOTH:
        with served("--filter=partition", "file", gpt, f"partition={number}", server=server) as srv:
            maps.append(run(["nbdinfo", "--map", srv.uri]).stdout)
    assert maps[0] == maps[1]


def test_missing_partition_refuses_the_client(mbr):
    with served("--filter=partition", "file", mbr, "partition=3") as srv:
        result = run(["nbdinfo", srv.uri], check=False)
        srv.proc.terminate()
        srv.proc.wait()
        assert result.returncode != 0
        assert "partition: MBR partition 3 not found" in srv.stderr()


def test_disk_without_table_refuses_the_client():
    with served("--filter=partition", "memory", "1M", "partition=1") as srv:
        assert run(["nbdinfo", srv.uri], check=False).returncode != 0
        srv.proc.terminate()
        srv.proc.wait()
        assert "does not contain MBR or GPT partition table signature" in srv.stderr()


def test_partition_zero_is_a_startup_error(mbr):
    result = run([*PYNBD, "serve", "--filter=partition", "file", mbr, "partition=0"], check=False)
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith("partition: partition=0: partitions count from 1")


def test_writes_land_inside_the_partition(mbr, tmp_path):
    image = tmp_path / "w.img"
    image.write_bytes(open(mbr, "rb").read())
    with served("--filter=partition", "file", str(image), "partition=6") as srv:
        nbdsh(srv.uri, "h.pwrite(b'PART6' * 100, 4096)")
    start = (6144 + 1 + 1024 + 63) * 512
    assert file_bytes(str(image), start + 4096, 500) == b"PART6" * 100
    assert file_bytes(str(image), start + 4095, 1) == b"\x06"


def test_order_matters_with_offset(mbr):
    # offset above partition: a 1 KiB slice of partition 2, starting 512 bytes into it.
    with served("--filter=offset", "--filter=partition", "file", mbr, "partition=2",
                "offset=512", "range=1024") as srv:
        out = nbdsh(srv.uri, "print(h.get_size(), h.pread(1, 0)[0])").split()
    assert out == ["1024", "2"]
    # offset below partition shifts the whole disk, so the table is not where it belongs.
    with served("--filter=partition", "--filter=offset", "file", mbr, "partition=2",
                "offset=512") as srv:
        assert run(["nbdinfo", srv.uri], check=False).returncode != 0
