"""The blocking pipeline under ``pynbd copy``: many commands in flight, from threads,
against nbdkit (the server nobody here wrote); errors, a dying server, TLS."""

from __future__ import annotations

import array
import errno
import os
import sys
import threading

import pytest

from client.nbdpeers import make_pki
from nbdtest import served
from pynbd.client.errors import NBDError
from pynbd.client.sync import Pipeline, connect
from pynbd.proto.client_transmission import Command
from pynbd.proto.constants import Cmd
from pynbd.proto.errors import ProtocolError

K = 1024
WAIT = 30  # seconds a test waits for completions before calling it a hang


def pattern(offset: int, length: int) -> bytes:
    """What nbdkit's pattern plugin reads at ``offset`` (8-aligned): each offset, big-endian."""
    words = array.array("Q", range(offset, offset + length, 8))
    if sys.byteorder == "little":
        words.byteswap()
    return words.tobytes()


class Results:
    """Collects ``done(command, error)`` calls from any thread."""

    def __init__(self, expected: int) -> None:
        self.calls: list[tuple[Command, BaseException | None]] = []
        self.expected = expected
        self._lock = threading.Lock()
        self.all_in = threading.Event()

    def done(self, command: Command, error: BaseException | None) -> None:
        with self._lock:
            self.calls.append((command, error))
            if len(self.calls) >= self.expected:
                self.all_in.set()

    def wait(self) -> list[tuple[Command, BaseException | None]]:
        assert self.all_in.wait(WAIT), f"only {len(self.calls)} of {self.expected} finished"
        return self.calls


def test_reads_from_several_threads_land_in_their_buffers():
    with served("pattern", "64M", server="nbdkit") as srv:
        p = Pipeline(connect(srv.uri))
        offsets = [(i * 997 * 4 * K) % (60 * 1024 * K) for i in range(64)]
        buffers = {off: bytearray(256 * K) for off in offsets}
        results = Results(len(offsets))

        def submit(part: list[int]) -> None:
            for off in part:
                p.submit(Cmd.READ, off, 256 * K, 0, memoryview(buffers[off]), results.done)

        threads = [threading.Thread(target=submit, args=(offsets[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        calls = results.wait()
        p.close()
    assert all(error is None for _, error in calls)
    assert {c.offset for c, _ in calls} == set(offsets)
    for off, buf in buffers.items():
        assert buf == pattern(off, 256 * K), off


def test_writes_then_call_reads_them_back():
    data = os.urandom(1024 * K)
    with served("memory", "4M", server="nbdkit") as srv:
        p = Pipeline(connect(srv.uri))
        results = Results(4)
        for i in range(4):
            p.submit(Cmd.WRITE, i * 256 * K, 256 * K, 0,
                     memoryview(data)[i * 256 * K:(i + 1) * 256 * K], results.done)
        assert all(error is None for _, error in results.wait())
        back = bytearray(1024 * K)
        p.call(Cmd.READ, 0, len(back), 0, memoryview(back))
        p.call(Cmd.FLUSH)
        p.close()
    assert back == data


def test_a_server_error_fails_that_command_only():
    with served("memory", "1M", "--filter=error", "error-pwrite-rate=1", "error=ENOSPC",
                server="nbdkit") as srv:
        p = Pipeline(connect(srv.uri))
        with pytest.raises(NBDError) as failed:
            p.call(Cmd.WRITE, 0, 4 * K, 0, memoryview(bytes(4 * K)))
        assert failed.value.errno == errno.ENOSPC
        assert p.call(Cmd.READ, 0, 4 * K, 0, memoryview(bytearray(4 * K))).error == 0
        p.close()


def test_a_server_that_dies_fails_every_command_in_flight():
    with served("memory", "1M", "--filter=delay", "rdelay=20", server="nbdkit") as srv:
        p = Pipeline(connect(srv.uri))
        results = Results(8)
        for i in range(8):
            p.submit(Cmd.READ, i * 4 * K, 4 * K, 0, memoryview(bytearray(4 * K)), results.done)
        srv.proc.kill()
        calls = results.wait()
        assert all(isinstance(error, (NBDError, ProtocolError)) for _, error in calls)
        with pytest.raises((NBDError, ProtocolError)):
            p.submit(Cmd.READ, 0, 4 * K, 0, memoryview(bytearray(4 * K)), results.done)
        p.close()


def test_over_tls_each_command_is_done_before_submit_returns(tmp_path):
    pki = make_pki(tmp_path)
    with served("pattern", "1M", server="nbdkit",
                options=["--tls=require", f"--tls-certificates={pki}"]) as srv:
        p = Pipeline(connect(f"nbds+unix:///?socket={srv.socket}&tls-certificates={pki}"))
        results = Results(3)
        bufs = [bytearray(64 * K) for _ in range(3)]
        for i, buf in enumerate(bufs):
            p.submit(Cmd.READ, i * 64 * K, 64 * K, 0, memoryview(buf), results.done)
            assert len(results.calls) == i + 1
        p.close()
    assert all(buf == pattern(i * 64 * K, 64 * K) for i, buf in enumerate(bufs))
