"""The server answers real clients: nbdinfo, qemu-io, nbdsh."""

import json

from nbdtest import nbdsh, run, served


def test_nbdinfo_sees_memory_disk():
    with served("memory", "1M") as srv:
        info = json.loads(run(["nbdinfo", "--json", srv.uri]).stdout)
    export = info["exports"][0]
    assert export["export-size"] == 1 << 20
    assert export["can_trim"] and export["can_zero"] and not export["is_read_only"]


def test_qemu_io_write_read_back():
    with served("memory", "1M") as srv:
        run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 4096 64k", srv.uri])
        out = run(["qemu-io", "-f", "raw", "-c", "read -P 0xab 4096 64k", srv.uri]).stdout
        assert b"read 65536/65536" in out
        data = nbdsh(srv.uri, "print(h.pread(4, 4094).hex())")
    assert data.strip() == "0000abab"
