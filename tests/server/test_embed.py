"""pynbd.serve(): a server embedded in this process or run as a subprocess."""

from __future__ import annotations

import json
import os
import threading

import pytest

import pynbd
from nbdtest import exited, run
from pynbd.backend import ConfigError


def open_files() -> set[tuple[int, str]]:
    """This process's open descriptors with what each refers to (a socket's inode, a path)."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            found.add((int(name), os.readlink(f"/proc/self/fd/{name}")))
        except FileNotFoundError:  # the descriptor listdir itself used
            pass
    return found


def leaks(threads_before: set[threading.Thread], files_before: set[tuple[int, str]]) -> str:
    """Threads and descriptors opened since ``before`` and still there ("" if none).

    Compared as sets, not counts: what an earlier test left to be collected or
    joined may go away meanwhile without hiding, or faking, a leak of this one.
    """
    threads = set(threading.enumerate()) - threads_before
    files = open_files() - files_before
    return f"threads {sorted(t.name for t in threads)}, descriptors {sorted(files)}" \
        if threads or files else ""


@pytest.mark.parametrize("subprocess", [False, True], ids=["in-process", "subprocess"])
def test_serve_works_with_qemu_img_and_cleans_up(subprocess):
    threads_before, files_before = set(threading.enumerate()), open_files()
    with pynbd.serve("memory", size="1G", filters=["delay"], subprocess=subprocess) as srv:
        assert srv.uri == f"nbd+unix:///?socket={srv.socket}"
        info = json.loads(run(["qemu-img", "info", "--output=json", srv.uri]).stdout)
        assert info["virtual-size"] == 1 << 30
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x42 1M 64k", srv.uri])
        out = run(["qemu-io", "-f", "raw", "-c", "read -P 0x42 1M 64k", srv.uri]).stdout
        assert b"read 65536/65536" in out
        private_dir = os.path.dirname(srv.socket)
        pid = srv.pid
    assert not os.path.exists(private_dir)
    # no waiting: leaving serve() joins the server's threads and closes its sockets
    assert not leaks(threads_before, files_before)
    if subprocess:
        assert exited(pid)  # stopped (and reaped) before close() returned
    else:
        assert pid == os.getpid()


def test_magic_parameter_filters_and_keywords():
    with pynbd.serve("memory", "2M", filters=["offset", "delay"], offset="1M",
                     delay_open="1ms", rdelay=0) as srv:
        assert run(["nbdinfo", "--size", srv.uri]).stdout.strip() == b"1048576"


def test_readonly():
    with pynbd.serve("memory", size="1M", readonly=True) as srv:
        info = json.loads(run(["nbdinfo", "--json", srv.uri]).stdout)
    assert info["exports"][0]["is_read_only"]


@pytest.mark.parametrize("subprocess", [False, True], ids=["in-process", "subprocess"])
def test_configuration_errors_raise(subprocess):
    with pytest.raises(ConfigError, match="size"):
        with pynbd.serve("memory", size="1Q", subprocess=subprocess):
            pass
    with pytest.raises(ConfigError, match="nosuch"):
        with pynbd.serve("nosuch", subprocess=subprocess):
            pass


def test_clients_still_connected_are_disconnected_at_exit():
    import socket

    with pynbd.serve("memory", size="1M") as srv:
        client = socket.socket(socket.AF_UNIX)
        client.connect(srv.socket)
        assert client.recv(8) == b"NBDMAGIC"
    client.settimeout(10)
    rest = client.recv(4096)
    while rest:
        rest = client.recv(4096)  # the server closed it: recv returns b""
    client.close()
