"""readahead filter: each read prefetches what follows, in nbdkit's window."""

from __future__ import annotations

import re

from stack_helpers import log_lines

from nbdtest import nbdsh, run, served

SEQUENTIAL = "for i in range(8):\n    h.pread(4096, i * 4096)"


def cache_requests(logfile) -> list[tuple[int, int]]:
    found = []
    for line in log_lines(str(logfile)):
        match = re.search(r" Cache id=\d+ offset=0x([0-9a-f]+) count=0x([0-9a-f]+)", line)
        if match:
            found.append((int(match.group(1), 16), int(match.group(2), 16)))
    return found


def test_sequential_reads_prefetch_ahead(tmp_path):
    logfile = tmp_path / "log"
    with served("--filter=readahead", "--filter=log", "pattern", "1M", f"logfile={logfile}") as srv:
        nbdsh(srv.uri, SEQUENTIAL)
    prefetched = cache_requests(logfile)
    assert prefetched[0] == (4096, 32768)  # nbdkit's smallest window
    assert all(count == 32768 for _, count in prefetched)  # each read inside the last prefetch
    assert [offset for offset, _ in prefetched] == [4096 * (i + 1) for i in range(8)]


def test_jumps_forward_grow_the_window_and_back_shrink_it(tmp_path):
    logfile = tmp_path / "log"
    script = "for off in (900000, 12288, 500000, 40960):\n    h.pread(4096, off)"
    with served("--filter=readahead", "--filter=log", "pattern", "1M", f"logfile={logfile}") as srv:
        nbdsh(srv.uri, script)
    assert [count for _, count in cache_requests(logfile)] == [32768, 65536, 32768, 65536]


def test_readahead_over_cache_gives_the_same_bytes(tmp_path):
    copies = []
    for stack in (["--filter=readahead", "--filter=cache"], []):
        out = tmp_path / f"copy{len(copies)}"
        with served(*stack, "pattern", "3M") as srv:
            run(["nbdcopy", "--request-size=65536", srv.uri, str(out)])
        copies.append(out.read_bytes())
    assert copies[0] == copies[1] and len(copies[0]) == 3 << 20
