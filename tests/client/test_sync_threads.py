"""One blocking handle shared by many threads: each command gets its own reply, data verified."""

import errno
import random
import threading

import pytest

from nbdtest import served, wait_for
from pynbd.client import NBDError
from pynbd.client.sync import Pipeline, connect
from pynbd.proto.constants import Cmd
from pynbd.proto.errors import ProtocolError

K = 1024
THREADS = 8
REGION = 512 * K  # each thread owns one region of the export
ROUNDS = 60
WAIT = 60  # seconds before calling it a hang


def hammer(h, index: int, model: bytearray) -> None:
    """Write, read back and check random pieces of this thread's region, small and large."""
    rng = random.Random(index)
    base = index * REGION
    for _ in range(ROUNDS):
        length = rng.choice((512, 4 * K, 96 * K, 256 * K))  # large reads land in place
        offset = rng.randrange(0, REGION - length + 1, 512)
        if rng.random() < 0.6:
            data = rng.randbytes(length)
            h.pwrite(data, base + offset)
            model[offset:offset + length] = data
        elif rng.random() < 0.5:
            h.zero(length, base + offset)
            model[offset:offset + length] = bytes(length)
        assert h.pread(length, base + offset) == model[offset:offset + length]


@pytest.mark.parametrize("server", ["pynbd", "nbdkit"])
def test_threads_hammering_one_handle_each_get_their_own_replies(server):
    with served("memory", str(THREADS * REGION), server=server) as srv, connect(srv.uri) as h:
        models = [bytearray(REGION) for _ in range(THREADS)]
        failures: list[BaseException] = []

        def run(index: int) -> None:
            try:
                hammer(h, index, models[index])
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert not any(t.is_alive() for t in threads), "a thread hung"
        assert not failures, failures[0]
        assert h.in_flight() == 0
        assert h.pread(THREADS * REGION, 0) == b"".join(models)  # nothing landed elsewhere


def test_close_from_another_thread_waits_for_the_command_in_progress():
    with served("memory", "1M", "--filter=delay", "rdelay=0.3") as srv:
        h = connect(srv.uri)
        h.pwrite(b"kept", 0)
        got: list[object] = []
        reader = threading.Thread(target=lambda: got.append(h.pread(4, 0)))
        reader.start()
        wait_for(lambda: h.in_flight() == 1, WAIT, "the read is not in flight")
        h.close()  # takes the connection's lock: the read in flight is answered first
        reader.join(WAIT)
        assert got == [b"kept"]
        with pytest.raises(NBDError) as info:
            h.pread(1, 0)
        assert info.value.errno == errno.ENOTCONN


def test_a_pipeline_takes_the_connection_over():
    with served("memory", "1M") as srv:
        h = connect(srv.uri)
        h.pwrite(b"abc", 0)
        p = Pipeline(h)
        with pytest.raises(NBDError, match="Pipeline") as info:
            h.pread(3, 0)
        assert info.value.errno == errno.EBUSY
        buf = bytearray(3)
        p.call(Cmd.READ, 0, 3, 0, memoryview(buf))  # the connection is intact
        assert buf == b"abc"
        p.close()


def test_a_corked_pipeline_sends_its_requests_when_the_block_ends():
    with served("memory", "1M") as srv:
        p = Pipeline(connect(srv.uri))
        finished: list[BaseException | None] = []
        bufs = [bytearray(4 * K) for _ in range(8)]
        with p.corked():
            for i in range(8):
                p.submit(Cmd.WRITE, i * 4 * K, 4 * K, 0, memoryview(bytes([i + 1]) * 4 * K),
                         lambda c, e: finished.append(e))
            for i, buf in enumerate(bufs):
                p.submit(Cmd.READ, i * 4 * K, 4 * K, 0, memoryview(buf),
                         lambda c, e: finished.append(e))
            threading.Event().wait(0.2)
            assert finished == []  # held: the server has seen nothing yet
        wait_for(lambda: len(finished) == 16, timeout=WAIT)
        assert finished == [None] * 16
        assert [bytes(b) for b in bufs] == [bytes([i + 1]) * 4 * K for i in range(8)]
        p.close()


def test_a_corked_pipeline_sends_more_requests_than_one_sendmsg_takes():
    with served("memory", "8M") as srv:
        p = Pipeline(connect(srv.uri))
        finished = threading.Semaphore(0)
        count = 700  # 1,400 buffers: more than IOV_MAX
        with p.corked():
            for i in range(count):
                p.submit(Cmd.WRITE, i * 512, 512, 0, memoryview(i.to_bytes(2, "big") * 256),
                         lambda c, e: finished.release())
        for _ in range(count):
            assert finished.acquire(timeout=WAIT)
        data = bytearray(count * 512)
        p.call(Cmd.READ, 0, len(data), 0, memoryview(data))
        assert all(data[i * 512:(i + 1) * 512] == i.to_bytes(2, "big") * 256 for i in range(count))
        p.close()


def test_requests_held_when_the_server_goes_away_finish_with_an_error():
    with served("memory", "1M") as srv:
        p = Pipeline(connect(srv.uri))
        errors: list[BaseException | None] = []
        with p.corked():
            p.submit(Cmd.READ, 0, 512, 0, memoryview(bytearray(512)), lambda c, e: errors.append(e))
            srv.proc.kill()
            srv.proc.wait()
        wait_for(lambda: len(errors) == 1, timeout=WAIT)
        assert isinstance(errors[0], (NBDError, OSError, ProtocolError))  # whichever end saw it first
        p.close()
