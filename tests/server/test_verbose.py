"""-v: one debug line per call at each layer boundary, as nbdkit's backend logs."""

from __future__ import annotations

from nbdtest import nbdsh, served


def test_verbose_logs_each_call_per_layer():
    with served("--filter=offset", "memory", "1M", "offset=4096", options=["-v"]) as srv:
        nbdsh(srv.uri, "h.pread(4096, 0); h.pwrite(b'x' * 512, 512)")
    lines = [line.removeprefix("pynbd: ") for line in srv.stderr().splitlines()]
    assert "offset: pread count=4096 offset=0 flags=0" in lines
    assert "memory: pread count=4096 offset=4096 flags=0" in lines
    assert lines.index("offset: pwrite count=512 offset=512 flags=0") \
        < lines.index("memory: pwrite count=512 offset=4608 flags=0")
