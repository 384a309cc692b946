"""The event loop under ``pynbd copy``: many non-blocking connections driven from one
thread, against nbdkit; writes larger than a socket's buffer, a dying server, work
handed back from other threads, and a whole copy over four connections in one thread."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest
from test_copy_pipeline import pattern

from nbdtest import PYNBD, served
from pynbd.client.errors import NBDError
from pynbd.client.sync import connect
from pynbd.proto.client_transmission import Command
from pynbd.proto.constants import Cmd
from pynbd.proto.errors import ProtocolError
from pynbd.tools.copying.loop import Channel, Loop

K, MiB = 1024, 1024 * 1024


class Results:
    def __init__(self) -> None:
        self.calls: list[tuple[Command, BaseException | None]] = []

    def done(self, command: Command, error: BaseException | None) -> None:
        self.calls.append((command, error))


def test_reads_on_four_connections_land_in_their_buffers():
    with served("pattern", "64M", server="nbdkit") as srv:
        loop = Loop()
        channels = [Channel(connect(srv.uri), loop) for _ in range(4)]
        offsets = [(i * 997 * 4 * K) % (60 * MiB) for i in range(64)]
        buffers = {off: bytearray(256 * K) for off in offsets}
        results = Results()
        for i, off in enumerate(offsets):
            channels[i % 4].submit(Cmd.READ, off, 256 * K, 0, memoryview(buffers[off]),
                                   results.done)
        loop.run_until(lambda: len(results.calls) == len(offsets))
        for channel in channels:
            channel.close()
        loop.close()
    assert all(error is None for _, error in results.calls)
    for off, buf in buffers.items():
        assert buf == pattern(off, 256 * K), off


def test_writes_larger_than_the_send_buffer_then_call_reads_them_back():
    data = os.urandom(32 * MiB)  # one round queues all of it: sent as the server reads
    with served("memory", "32M", server="nbdkit") as srv:
        loop = Loop()
        channel = Channel(connect(srv.uri), loop)
        results = Results()
        for i in range(32):
            channel.submit(Cmd.WRITE, i * MiB, MiB, 0, memoryview(data)[i * MiB:(i + 1) * MiB],
                           results.done)
        loop.run_until(lambda: len(results.calls) == 32)
        assert all(error is None for _, error in results.calls)
        back = bytearray(len(data))
        channel.call(Cmd.READ, 0, len(back), 0, memoryview(back))
        channel.call(Cmd.FLUSH)
        channel.close()
        loop.close()
    assert back == data


def test_a_server_that_dies_fails_every_command_in_flight():
    with served("memory", "1M", "--filter=delay", "rdelay=20", server="nbdkit") as srv:
        loop = Loop()
        channel = Channel(connect(srv.uri), loop)
        results = Results()
        for i in range(8):
            channel.submit(Cmd.READ, i * 4 * K, 4 * K, 0, memoryview(bytearray(4 * K)),
                           results.done)
        srv.proc.kill()
        loop.run_until(lambda: len(results.calls) == 8)
        assert all(isinstance(error, (NBDError, ProtocolError)) for _, error in results.calls)
        with pytest.raises((NBDError, ProtocolError)):
            channel.submit(Cmd.READ, 0, 4 * K, 0, memoryview(bytearray(4 * K)), results.done)
        channel.close()
        loop.close()


def test_a_send_that_fails_ends_the_wait_for_its_commands():
    """The server is gone before the requests leave: the send fails, the commands finish
    with its error, and the loop returns instead of waiting for events that never come."""
    with served("memory", "1M") as srv:
        loop = Loop()
        channel = Channel(connect(srv.uri), loop)
        srv.proc.kill()
        srv.proc.wait()
        results = Results()
        for i in range(4):
            channel.submit(Cmd.READ, i * 4 * K, 4 * K, 0, memoryview(bytearray(4 * K)),
                           results.done)
        waiter = threading.Thread(target=loop.run_until, args=(lambda: len(results.calls) == 4,),
                                  daemon=True)
        waiter.start()
        waiter.join(30)
        assert not waiter.is_alive(), "the loop waits for a connection that is over"
        assert all(isinstance(error, (NBDError, ProtocolError)) for _, error in results.calls)
        channel.close()
        loop.close()


def test_work_from_another_thread_runs_in_the_loops_thread():
    loop = Loop()
    ran: list[threading.Thread] = []
    worker = threading.Thread(target=loop.call_soon_threadsafe,
                              args=(lambda: ran.append(threading.current_thread()),))
    worker.start()
    loop.run_until(lambda: bool(ran))
    worker.join()
    loop.close()
    assert ran == [threading.main_thread()]


def test_a_four_connection_copy_runs_in_one_thread(tmp_path):
    """-C 4 -T 4: four connections to each server, no thread but the main one."""
    data = os.urandom(64 * MiB)
    (tmp_path / "src.raw").write_bytes(data)
    with served("--filter=delay", "memory", "64M", "wdelay=10ms", server="nbdkit",
                options=["-t", "1"]) as dst:
        copy = subprocess.Popen([*PYNBD, "copy", "-C", "4", "-T", "4", "-v",
                                 str(tmp_path / "src.raw"), dst.uri],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        threads = []
        while copy.poll() is None:
            try:
                threads.append(len(os.listdir(f"/proc/{copy.pid}/task")))
            except FileNotFoundError:
                break
            time.sleep(0.02)
        assert copy.wait(60) == 0, copy.stderr.read() if copy.stderr else ""
        verbose = copy.stderr.read().decode() if copy.stderr else ""
        back = tmp_path / "back.raw"
        subprocess.run(["nbdcopy", dst.uri, str(back)], check=True)
    assert "4 connection(s)" in verbose
    assert max(threads) == 1, threads
    assert back.read_bytes() == data


def test_a_destination_that_dies_mid_copy_fails_the_copy_in_one_line(tmp_path):
    (tmp_path / "src.raw").write_bytes(os.urandom(64 * MiB))
    with served("--filter=delay", "memory", "64M", "wdelay=200ms", server="nbdkit",
                options=["-t", "1"]) as dst:  # one write at a time: 13 s in all
        copy = subprocess.Popen([*PYNBD, "copy", "-C", "4", "-T", "4",
                                 str(tmp_path / "src.raw"), dst.uri],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)
        dst.proc.kill()
        assert copy.wait(30) == 1
        lines = copy.stderr.read().decode().splitlines() if copy.stderr else []
    assert len(lines) == 1 and lines[0].startswith("pynbd copy: "), lines


def test_connections_that_help_are_all_used():
    """A destination serving each connection one write at a time, 50 ms each: every lane
    the ramp adds doubles, then triples... the rate, so all four end up in use. (At 10 ms,
    four lanes copy 400 MiB/s, and at 25 ms a machine loaded by other work still starved
    the copy once: the CPU, not the destination, was then the limit, and a lane added
    less than the ramp's 10%.)"""
    with served("pattern", "320M", server="nbdkit") as src, \
            served("--filter=delay", "memory", "320M", "wdelay=50ms", server="nbdkit",
                   options=["-t", "1"]) as dst:
        result = subprocess.run([*PYNBD, "copy", "-v", "-C", "4", "-T", "4", src.uri, dst.uri],
                                capture_output=True, check=True, timeout=60)
    assert "; 4 of 4 connection(s) in use" in result.stderr.decode()
