"""Reads answered later (``server.async_requests``), with a plugin that answers them from its own
thread in reverse order (``later_plugin.py``): data, errors, writes and flushes among them,
NBD_CMD_DISC and a vanishing client with reads in flight, and which stacks take the path."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from nbdtest import nbdsh, run, served, wait_idle
from pynbd.backend import OpenContext
from pynbd.backend.stack import Stack
from pynbd.client import NBD
from pynbd.client.sync import Pipeline
from pynbd.server.async_requests import async_plugin

LATER = str(Path(__file__).with_name("later_plugin.py"))


def test_reads_out_of_order_with_errors():
    code = """
import errno
bufs = {off: nbd.Buffer(4096) for off in range(0, 1 << 20, 4096 * 7)}
cookies = {off: h.aio_pread(buf, off) for off, buf in bufs.items()}
bad = {off: h.aio_pread(nbd.Buffer(4096), off) for off in (4096, 8192)}
while h.aio_in_flight() > 0:
    h.poll(-1)
for off, cookie in cookies.items():
    assert h.aio_command_completed(cookie)
    data = bufs[off].to_bytearray()
    assert data[:8] == off.to_bytes(8, "big") and data[-8:] == (off + 4088).to_bytes(8, "big"), off
for off, cookie in bad.items():
    try:
        h.aio_command_completed(cookie)
    except nbd.Error as exc:
        assert exc.errno == "EIO", exc
    else:
        raise AssertionError(f"read at {off} did not fail")
print(len(cookies))
"""
    with served(LATER) as srv:
        assert nbdsh(srv.uri, code).strip() == str(len(range(0, 1 << 20, 4096 * 7)))
        half = nbdsh(srv.uri, "print(h.pread(8, 1 << 19).hex())").strip()
        assert half == (1 << 19).to_bytes(8, "big").hex()
    log = srv.stderr()
    assert "RuntimeError: plugin bug at 8192" in log  # the bug is logged with its traceback
    assert "reads answered later" in log


def test_writes_flushes_and_reads_verify_at_depth_16():
    with served(LATER) as srv:
        run(["fio", "--name=v", "--ioengine=nbd", f"--uri={srv.uri}", "--rw=randrw", "--bs=4k",
             "--iodepth=16", "--offset=1M", "--size=1M", "--verify=crc32c", "--verify_fatal=1", "--fsync=8",
             "--verify_state_save=0", "--do_verify=1", "--loops=2"])
    answered = [int(line.split("later: ")[1].split()[0]) for line in srv.stderr().splitlines()
                if "reads answered later" in line]
    assert sum(answered) > 100


def test_disc_answers_the_reads_in_flight_first():
    code = """
bufs = [nbd.Buffer(512) for _ in range(32)]
cookies = [h.aio_pread(buf, (1 << 20) + 512 * i) for i, buf in enumerate(bufs)]
h.shutdown()
assert all(h.aio_command_completed(c) for c in cookies)
assert bufs[5].to_bytearray()[:8] == ((1 << 20) + 2560).to_bytes(8, "big")
print("ok")
"""
    with served(LATER) as srv:
        assert nbdsh(srv.uri, code).strip() == "ok"


def test_client_gone_with_reads_in_flight():
    with served(LATER) as srv:
        h = NBD()
        h.connect_uri(srv.uri)
        p = Pipeline(h)
        outcomes: list[object] = []
        for _ in range(4):  # held by the plugin until the connection closes
            p.submit(0, 12288, 4096, 0, memoryview(bytearray(4096)), lambda c, e: outcomes.append(e))
        p.submit(0, 0, 4096, 0, memoryview(bytearray(4096)), lambda c, e: outcomes.append(e))
        p.close()  # gone without NBD_CMD_DISC, four reads unanswered
        assert nbdsh(srv.uri, "print(h.pread(8, 16).hex())").strip() == (16).to_bytes(8, "big").hex()
        wait_idle(srv)
    log = srv.stderr()
    assert "Traceback" not in log and "reads answered later" in log


def opened(*filters: str, args: tuple[str, ...] = ()) -> object:
    """The layer whose reads the server would start (``async_plugin``) for this stack, or None."""
    stack = Stack.from_args(LATER, list(args), list(filters))
    stack.get_ready()
    top = stack.open(OpenContext())
    try:
        return async_plugin(stack, top)[0]
    finally:
        top.close()


@pytest.mark.parametrize("filters, args, answered_later", [
    ((), (), True),
    (("nozero", "noextents"), (), True),  # filters that pass reads through
    (("offset",), ("offset=4096",), False),  # changes reads (and the size)
    (("noparallel",), (), False),  # serializes requests
])
def test_which_stacks_answer_reads_later(filters, args, answered_later):
    assert (opened(*filters, args=args) is not None) == answered_later


def test_logged_calls_keep_the_synchronous_path():
    layer_log = logging.getLogger("pynbd.layer")
    level = layer_log.level
    layer_log.setLevel(logging.DEBUG)
    try:
        assert opened() is None  # -v logs each call of each layer: no shortcut past them
    finally:
        layer_log.setLevel(level)
