"""ones plugin: every byte 0xff (or byte=N), writes discarded, all data (nbdkit 1.32 lacks it)."""

from __future__ import annotations

import pytest
from plugin_helpers import config_error, export_info, extent_map

from nbdtest import nbdsh, run, served


def test_reads_ones_all_data_writes_forgotten():
    with served("ones", "3M") as srv:
        assert run(["nbdcopy", srv.uri, "-"]).stdout == b"\xff" * (3 << 20)
        assert extent_map(srv.uri) == [(0, 3 << 20, 0)]
        out = nbdsh(srv.uri, "h.pwrite(b'abc', 10); h.zero(4096, 0); h.trim(4096, 8192); h.flush()\n"
                             "print(h.pread(8, 8).hex())")
        assert out.strip() == "ff" * 8


@pytest.mark.parametrize("byte, value", [("0x55", 0x55), ("0", 0), ("0377", 0xff), ("7", 7)])
def test_byte(byte, value):
    with served("ones", "size=100000", f"byte={byte}") as srv:
        assert run(["nbdcopy", srv.uri, "-"]).stdout == bytes([value]) * 100000


def test_default_is_empty():
    with served("ones") as srv:
        assert export_info(srv.uri)["export-size"] == 0


@pytest.mark.parametrize("byte", ["256", "-1", "0xfff", "ff", "1.5"])
def test_bad_byte(byte):
    assert "ones: byte:" in config_error("ones", "1M", f"byte={byte}")
