"""full: reads zeroes, every change fails with ENOSPC (as nbdkit's)."""

from __future__ import annotations

import os

import pytest

from nbdtest import nbdsh, run, served

PROBE = (
    "print(h.pread(8, 100) == bytes(8))\n"
    "for op in (lambda: h.pwrite(b'x' * 512, 0), lambda: h.zero(512, 0), lambda: h.trim(512, 0)):\n"
    "    try:\n"
    "        op()\n"
    "        print('ok')\n"
    "    except nbd.Error as e:\n"
    "        print(e.errno)\n"
)


@pytest.mark.parametrize("server", ["pynbd", "nbdkit"])
def test_writes_fail_with_enospc(server):
    with served("full", "1M", server=server) as srv:
        assert nbdsh(srv.uri, PROBE).split() == ["True", "ENOSPC", "ENOSPC", "ENOSPC"]


def test_copy_onto_full_disk_fails(tmp_path):
    source = tmp_path / "source"
    source.write_bytes(os.urandom(1 << 20))
    with served("full", "1M") as srv:
        result = run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), srv.uri],
                     check=False)
        copy = run(["nbdcopy", "--", "[", "nbdkit", "-s", "pattern", "1M", "]", srv.uri], check=False)
    assert result.returncode != 0 and copy.returncode != 0
