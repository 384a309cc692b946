"""zero: an empty disk by default (as nbdkit's), read-only zeroes with a size."""

from __future__ import annotations

import json

from nbdtest import run, served


def test_zero_length_like_nbdkit():
    for server in ("pynbd", "nbdkit"):
        with served("zero", server=server) as srv:
            info = json.loads(run(["nbdinfo", "--json", srv.uri]).stdout)["exports"][0]
        assert info["export-size"] == 0 and info["is_read_only"]


def test_sized_disk_reads_zeroes_and_is_a_hole():
    with served("zero", "3M") as srv:
        data = run(["nbdcopy", srv.uri, "-"]).stdout
        entries = json.loads(run(["nbdinfo", "--map", "--json", srv.uri]).stdout)
        write = run(["qemu-io", "-f", "raw", "-c", "write 0 512", srv.uri], check=False)
    assert data == bytes(3 << 20)
    assert [(e["offset"], e["length"], e["type"]) for e in entries] == [(0, 3 << 20, 3)]
    assert write.returncode != 0 or b"failed" in write.stdout + write.stderr
