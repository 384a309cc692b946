"""Where requests run (server.dispatch) and what they reach: the rule's table,
-t honoured for every kind of stack, and every read reaching the top layer."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from filters.stack_helpers import log_lines
from nbdtest import nbdsh, served, threads, wait_for, wait_idle
from pynbd.backend import ThreadModel
from pynbd.server.dispatch import DEFAULT_THREADS, plan

OVERLAP = str(Path(__file__).with_name("overlap_plugin.py"))


@pytest.mark.parametrize("model, short, given, workers", [
    (ThreadModel.PARALLEL, True, None, 0),
    (ThreadModel.PARALLEL, True, 4, 4),
    (ThreadModel.PARALLEL, True, 1, 0),
    (ThreadModel.PARALLEL, False, None, DEFAULT_THREADS),
    (ThreadModel.PARALLEL, False, 3, 3),
    (ThreadModel.PARALLEL, False, 1, 0),
    (ThreadModel.SERIALIZE_REQUESTS, False, 8, 0),
    (ThreadModel.SERIALIZE_ALL_REQUESTS, False, 8, 0),
    (ThreadModel.SERIALIZE_CONNECTIONS, True, None, 0),
])
def test_the_rule(model, short, given, workers):
    dispatch = plan(model, short, given)
    assert dispatch.workers == workers and dispatch.inline == (workers == 0)
    assert (dispatch.request_lock is not None) == (model == ThreadModel.SERIALIZE_ALL_REQUESTS)
    assert (dispatch.one_connection is not None) == (model == ThreadModel.SERIALIZE_CONNECTIONS)


@pytest.mark.parametrize("options, extra", [([], 0), (["-t", "3"], 3)])
def test_threads_given_for_a_short_request_stack_start_a_pool(options, extra):
    # memory's requests are short: by default they run on the reading thread;
    # -t 3 asks for three requests at a time, and gets a pool of three.
    with served("memory", "1M", options=options) as srv:
        pid = srv.proc.pid
        wait_idle(srv)
        idle = threads(pid)
        script = "import time; h.pread(512, 0); time.sleep(30)"
        client = threading.Thread(target=nbdsh, args=(srv.uri, script), kwargs={"check": False},
                                  daemon=True)
        client.start()
        wait_for(lambda: threads(pid) == idle + 1 + extra,
                 message=lambda: f"{options}: {threads(pid)} threads, expected {idle + 1 + extra}")


@pytest.mark.parametrize("count, peak", [(1, 1), (2, 2), (4, 4)])
def test_threads_bound_how_many_requests_run_at_once(count, peak):
    # four reads issued together on a stack whose requests may wait: -t N runs
    # N of them at once. Each read waits (up to a second) for N + 1 reads to run
    # at once, which only a server running more than N can give it; the plugin
    # reports the most it saw.
    script = """
for i in range(1, 5):
    h.aio_pread(nbd.Buffer(512), i * 4096)
while h.aio_in_flight() > 0:
    h.poll(-1)
print(h.pread(1, 0)[0])
"""
    with served(OVERLAP, f"together={count + 1}", options=["-t", str(count)]) as srv:
        assert int(nbdsh(srv.uri, script)) == peak


def test_every_read_reaches_the_top_layer(tmp_path):
    # A read over an unwritten (sparse) area still reaches the log filter's
    # pread: the server never skips it by asking extents behind its back.
    image, logfile = tmp_path / "sparse.img", tmp_path / "log"
    with open(image, "wb") as f:
        f.truncate(4 << 20)
    with served("--filter=log", "file", str(image), f"logfile={logfile}") as srv:
        nbdsh(srv.uri, "assert h.pread(1 << 20, 0) == bytes(1 << 20)")
        wait_for(lambda: any(" Read " in line for line in log_lines(str(logfile))),
                 message=lambda: f"no Read in {log_lines(str(logfile))}")
    reads = [line for line in log_lines(str(logfile)) if " Read " in line]
    assert len(reads) == 1 and "count=0x100000 " in reads[0]


def test_holes_still_come_from_the_plugins_zero_buffers():
    # memory's unwritten pages are views of ZERO_BUFFER: sent as OFFSET_HOLE chunks
    script = """
chunks = []
def chunk(subbuf, offset, status, error):
    chunks.append((status, offset, len(subbuf)))
    return 0
h.pwrite(b"x" * 4096, 65536)
h.pread_structured(256 * 1024, 0, chunk)
print(sorted(chunks))
"""
    with served("memory", "1M") as srv:
        out = nbdsh(srv.uri, script).strip()
    hole, data = 2, 1  # nbd.READ_HOLE, nbd.READ_DATA
    page = 32 * 1024  # the memory plugin's page
    assert out == str([(data, 65536, page), (hole, 0, 65536), (hole, 65536 + page, 196608 - page)])
