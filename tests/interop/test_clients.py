"""pynbd serve driven by clients nobody here wrote: nbdinfo, nbdsh (libnbd),
nbdcopy, qemu-img, qemu-io and fio, with nbdkit as the oracle where it has
the same plugin."""

from __future__ import annotations

import json
import shutil
import textwrap

import pytest

from nbdtest import nbdsh, run, served

COMPARED = ("is_rotational", "is_read_only", "can_cache", "can_df", "can_fast_zero", "can_flush",
            "can_fua", "can_multi_conn", "can_trim", "can_zero", "export-size", "contexts")


def info(uri: str) -> dict:
    return json.loads(run(["nbdinfo", "--json", uri]).stdout)["exports"][0]


@pytest.mark.parametrize("options", [[], ["-r"]])
def test_nbdinfo_json_matches_nbdkit(options):
    got = {}
    for server in ("pynbd", "nbdkit"):
        with served("memory", "5M", server=server, options=options) as srv:
            got[server] = {k: info(srv.uri)[k] for k in COMPARED}
    assert got["pynbd"] == got["nbdkit"]


def test_nbdinfo_map_matches_nbdkit():
    maps = {}
    for server in ("pynbd", "nbdkit"):
        with served("memory", "4M", server=server) as srv:
            run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 64k", "-c", "write -P 1 3M 128k",
                 srv.uri])
            maps[server] = json.loads(run(["nbdinfo", "--map", "--json", srv.uri]).stdout)
    assert maps["pynbd"] == maps["nbdkit"]
    assert [e["type"] for e in maps["pynbd"]] == [3, 0, 3, 0, 3]


LIBNBD_SCRIPT = textwrap.dedent("""
    import nbd
    size = h.get_size()
    # plain and FUA writes, read back
    h.pwrite(b"\\x11" * 65536, 0)
    h.pwrite(b"\\x22" * 4096, 65536, nbd.CMD_FLAG_FUA)
    assert h.pread(4096, 65536) == b"\\x22" * 4096
    h.flush()
    # zero (with and without NO_HOLE / FAST_ZERO), trim, cache
    h.zero(4096, 0)
    h.zero(4096, 4096, nbd.CMD_FLAG_NO_HOLE)
    h.zero(4096, 8192, nbd.CMD_FLAG_FAST_ZERO)
    assert h.pread(12288, 0) == bytes(12288)
    h.trim(65536, 1 << 20)
    assert h.pread(4096, 1 << 20) == bytes(4096)
    h.cache(65536, 0)
    # structured read of a sparse range: holes come as OFFSET_HOLE chunks
    h.pwrite(b"\\x33" * 4096, 2 << 20)
    kinds = []
    def chunk(buf, offset, status, err):
        kinds.append((status, offset, bytes(buf)))
        return 0
    h.pread_structured(1 << 20, 2 << 20, chunk)
    data = [(o, b) for status, o, b in kinds if status == nbd.READ_DATA]
    assert data[0][0] == 2 << 20 and data[0][1].startswith(b"\x33" * 4096), kinds
    assert any(status == nbd.READ_HOLE for status, _, _ in kinds), kinds
    assert sum(len(b) for _, _, b in kinds) == 1 << 20
    # DF: one data chunk, no holes
    kinds.clear()
    h.pread_structured(1 << 20, 2 << 20, chunk, nbd.CMD_FLAG_DF)
    assert [k[0] for k in kinds] == [nbd.READ_DATA], kinds
    # block status, whole and REQ_ONE
    seen = []
    def extents(context, offset, entries, err):
        seen.append((context, offset, list(entries)))
        return 0
    h.block_status(4 << 20, 0, extents)
    context, offset, entries = seen[-1]
    assert context == "base:allocation" and offset == 0
    assert sum(entries[0::2]) <= 4 << 20 and entries[0] > 0
    h.block_status(4 << 20, 0, extents, nbd.CMD_FLAG_REQ_ONE)
    assert len(seen[-1][2]) == 2
    # many requests in flight at once
    N = 64
    bufs = [nbd.Buffer.from_bytearray(bytearray([i]) * 8192) for i in range(N)]
    cookies = [h.aio_pwrite(bufs[i], (3 << 20) + i * 8192) for i in range(N)]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        assert h.aio_command_completed(c)
    reads = [nbd.Buffer(8192) for _ in range(N)]
    cookies = [h.aio_pread(reads[i], (3 << 20) + i * 8192) for i in range(N)]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for i, c in enumerate(cookies):
        assert h.aio_command_completed(c)
        assert reads[i].to_bytearray() == bytearray([i]) * 8192, i
    # errors: past the end
    try:
        h.pread(512, size)
        raise SystemExit("read past the end succeeded")
    except nbd.Error as e:
        assert e.errnum == 22, e
    print("ok")
""")


@pytest.mark.parametrize("stack", [["memory", "8M"],
                                   ["--filter=delay", "memory", "8M", "cachedelay=1ms"]],
                         ids=["inline", "threaded"])
def test_libnbd_every_command(stack):
    connect = ("h.add_meta_context('base:allocation'); h.connect_uri('{uri}'); "
               "h.set_strict_mode(0)\n")
    with served(*stack) as srv:
        code = connect.format(uri=srv.uri) + LIBNBD_SCRIPT
        assert run(["nbdsh", "-c", code]).stdout.decode().strip() == "ok"


def test_readonly_refuses_writes_with_eperm():
    code = textwrap.dedent("""
        import nbd
        for call in (lambda: h.pwrite(b"x" * 512, 0), lambda: h.zero(512, 0), lambda: h.trim(512, 0)):
            try:
                call()
                raise SystemExit("a write succeeded")
            except nbd.Error as e:
                assert e.errnum == 1, e
        print("ok")
    """)
    with served("memory", "1M", options=["-r"]) as srv:
        h_code = "h.set_strict_mode(0); " + code
        assert nbdsh(srv.uri, h_code).strip() == "ok"


def test_nbdcopy_both_directions_with_four_connections(tmp_path):
    source = tmp_path / "source.img"
    source.write_bytes(bytes(range(256)) * 4096 * 8 + bytes(4 << 20))  # 8M data, 4M zero
    back = tmp_path / "back.img"
    with served("memory", "12M") as srv:
        run(["nbdcopy", "--connections=4", str(source), srv.uri])
        run(["nbdcopy", "--connections=4", srv.uri, str(back)])
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), srv.uri])
    assert back.read_bytes() == source.read_bytes()


def test_qemu_img_convert_and_compare(tmp_path):
    qcow = tmp_path / "disk.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", str(qcow), "16M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x7e 1M 3M", "-c", "write -P 0x01 9M 64k", str(qcow)])
    with served("memory", "16M") as srv:
        run(["qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", str(qcow), srv.uri])
        run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(qcow), srv.uri])
        out = tmp_path / "out.qcow2"
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", srv.uri, str(out)])
        run(["qemu-img", "compare", str(qcow), str(out)])
        run(["qemu-io", "-f", "raw", "-c", "discard 1M 1M", "-c", "write -z 2M 1M", srv.uri])
        read = run(["qemu-io", "-f", "raw", "-c", "read -P 0 1M 2M", "-c", "read -P 0x7e 3M 1M",
                    srv.uri]).stdout
        assert read.count(b"read ") == 2 and b"Pattern verification failed" not in read


@pytest.mark.skipif(shutil.which("fio") is None, reason="needs fio")
def test_fio_nbd_engine_with_crc32c_verify(tmp_path):
    with served("memory", "16M") as srv:
        job = [
            "fio", "--name=verify", "--ioengine=nbd", f"--uri={srv.uri}", "--rw=randwrite",
            "--bs=4k", "--size=8M", "--iodepth=16", "--verify=crc32c", "--do_verify=1",
            "--verify_fatal=1", "--verify_state_save=0", "--output-format=json",
        ]
        result = run(job, timeout=120)
    report = json.loads(result.stdout[result.stdout.index(b"{"):])
    assert report["jobs"][0]["error"] == 0
    assert report["jobs"][0]["write"]["io_bytes"] == 8 << 20
