"""The null plugin: zeroes out, writes discarded, all one hole — as nbdkit's."""

from plugin_helpers import config_error, export_info, extent_map, qemu_io

from nbdtest import nbdsh, served

COMPARED = ("export-size", "is_read_only", "can_flush", "can_fua", "can_multi_conn",
            "can_trim", "can_zero", "can_cache", "can_df")


def test_writes_are_discarded_and_reads_are_zero():
    with served("null", "1G") as srv:
        qemu_io(srv.uri, "write -P 0x77 1M 64k", "write -z 2M 1M", "discard 4M 1M", "flush")
        qemu_io(srv.uri, "read -P 0 1M 64k")
        out = nbdsh(srv.uri, "h.pwrite(b'x' * 512, 0, nbd.CMD_FLAG_FUA)\n"
                             "print(h.pread(512, 0) == bytes(512))")
    assert out.strip() == "True"


def test_flags_size_and_map_match_nbdkit():
    seen = []
    for server in ("pynbd", "nbdkit"):
        with served("null", "size=10T", server=server) as srv:
            info = export_info(srv.uri)
            seen.append(({key: info.get(key) for key in COMPARED}, extent_map(srv.uri)))
    assert seen[0] == seen[1]
    assert seen[0][1] == [(0, 10 << 40, 3)]


def test_default_size_is_zero():
    with served("null") as srv:
        assert export_info(srv.uri)["export-size"] == 0


def test_bad_size_is_one_line():
    line = config_error("null", "size=ten")
    assert "null" in line and "size" in line
