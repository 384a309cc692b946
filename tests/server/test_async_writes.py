"""Writes answered later (``server.async_requests``, ``AsyncWrites``), with the test plugin
that answers started requests from its own thread, in reverse order and a millisecond
late (``later_plugin.py``): it fails a flush, zero, trim or close that reaches it while a
started write is unanswered, so every test here checks that the server waits for them."""

from __future__ import annotations

from pathlib import Path

from nbdtest import NBDSH_OUTCOMES, nbdsh, run, served, wait_idle
from pynbd.client import NBD
from pynbd.client.sync import Pipeline
from pynbd.proto.constants import Cmd

LATER = str(Path(__file__).with_name("later_plugin.py"))


def test_flush_zero_and_trim_wait_for_the_writes_started_before_them():
    code = NBDSH_OUTCOMES + """
base = 1 << 20
cookies = [h.aio_pwrite(bytes([i]) * 512, base + 512 * i) for i in range(1, 65)]
cookies.append(h.aio_flush())
cookies += [h.aio_pwrite(b'\\x77' * 512, base + 65536 + 512 * i) for i in range(64)]
cookies.append(h.aio_zero(4096, base))
cookies += [h.aio_pwrite(b'\\x66' * 512, base + 131072 + 512 * i) for i in range(64)]
cookies.append(h.aio_trim(4096, base + 131072))
bad = h.aio_pwrite(b'x' * 512, 4096)
done = outcomes(cookies + [bad])
print(set(done[:-1]), done[-1])
print(bytes(h.pread(512, base + 4096))[:1].hex(), bytes(h.pread(512, base))[:1].hex(),
      bytes(h.pread(512, base + 65536))[:1].hex())
"""
    with served(LATER) as srv:
        out = nbdsh(srv.uri, code).splitlines()
    assert out == ["{'ok'} EIO", "08 00 77"]
    assert "unanswered" not in srv.stderr()


def test_writes_flushes_and_reads_verify_at_depth_16():
    with served(LATER) as srv:
        run(["fio", "--name=v", "--ioengine=nbd", f"--uri={srv.uri}", "--rw=randrw", "--bs=4k",
             "--iodepth=16", "--offset=1M", "--size=1M", "--verify=crc32c", "--verify_fatal=1",
             "--fsync=4", "--verify_state_save=0", "--do_verify=1", "--loops=2"])
    assert "unanswered" not in srv.stderr()


def test_client_gone_with_writes_in_flight():
    """Closing the stack waits for the started writes: each lands, none is reported late."""
    with served(LATER) as srv:
        h = NBD()
        h.connect_uri(srv.uri)
        p = Pipeline(h)
        for i in range(64):
            p.submit(Cmd.WRITE, (1 << 20) + 512 * i, 512, 0, memoryview(b"\x42" * 512),
                     lambda c, e: None)
        p.close()  # gone without NBD_CMD_DISC, the writes unanswered
        out = nbdsh(srv.uri, "print(bytes(h.pread(512, (1 << 20) + 512 * 63))[:2].hex())")
        assert out.strip() == "4242"
        wait_idle(srv)
    log = srv.stderr()
    assert "Traceback" not in log and "unanswered" not in log
