"""One blocking handle shared by many threads: each command gets its own reply, data verified."""

import errno
import random
import threading

import pytest

from nbdtest import served, wait_for
from pynbd.client import NBDError
from pynbd.client.sync import Pipeline, connect
from pynbd.proto.constants import Cmd

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
