"""The reading loop's polling: it pays for a busy synchronous client, and an
idle client costs no CPU."""

from __future__ import annotations

import os
import time

from nbdtest import served
from pynbd.client import NBD


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time process ``pid`` has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_idle_client_costs_no_cpu():
    with served("memory", "1M") as srv, NBD() as h:
        h.connect_uri(srv.uri)
        for offset in range(0, 1 << 20, 4096):  # back to back: the reader starts polling
            h.pread(4096, offset)
        before = cpu_seconds(srv.proc.pid)
        time.sleep(1.0)  # connected, silent
        used = cpu_seconds(srv.proc.pid) - before
        assert h.pread(4, 0) == bytes(4)
    assert used < 0.2  # polling forever would have used the whole second
