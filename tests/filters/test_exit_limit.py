"""exitlast, exitwhen and limit: the server exits, or refuses clients, when
nbdkit's would — the same client run against both."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest
from stack_helpers import BOTH

from nbdtest import PYNBD, exited, nbdsh, run, served, wait_for, wait_for_socket
from pynbd.process import stop_process


def hold(uri: str) -> subprocess.Popen:
    """A client that stays connected until its stdin closes (returned once connected)."""
    code = "print(1, flush=True); import sys; sys.stdin.read()"
    client = subprocess.Popen(["nbdsh", "-u", uri, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
    assert client.stdout is not None and client.stdout.readline() == b"1\n"
    return client



@pytest.mark.parametrize("server", BOTH)
def test_exitlast_exits_after_the_last_client(server):
    with served("--filter=exitlast", "memory", "1M", server=server) as srv:
        h1 = hold(srv.uri)
        assert nbdsh(srv.uri, "print(h.get_size())").strip() == "1048576"
        assert srv.proc.poll() is None  # the first client is still connected
        h1.communicate(b"", timeout=30)
        wait_for(lambda: exited(srv.proc.pid), message=f"{server} still running")
        assert srv.proc.wait() == 0


@pytest.mark.parametrize("server", BOTH)
def test_exitwhen_file_created_waits_for_clients(tmp_path, server):
    stop = tmp_path / "stop"
    with served("--filter=exitwhen", "memory", "1M", f"exit-when-file-created={stop}",
                "exit-when-poll=1", server=server) as srv:
        client = hold(srv.uri)
        stop.touch()
        refused = run(["nbdinfo", srv.uri], check=False)
        assert refused.returncode != 0 and srv.proc.poll() is None
        client.communicate(b"", timeout=30)
        wait_for(lambda: exited(srv.proc.pid), message=f"{server} still running")


@pytest.mark.parametrize("server", BOTH)
def test_exitwhen_polls_while_idle(tmp_path, server):
    keep = tmp_path / "keep"
    keep.touch()
    sock = str(tmp_path / "sock")
    r, w = os.pipe()
    base = [*PYNBD, "serve"] if server == "pynbd" else ["nbdkit"]
    proc = subprocess.Popen([*base, "-f", "-U", sock, "--filter=exitwhen", "memory", "1M",
                             f"exit-when-file-deleted={keep}", f"exit-when-pipe-closed={r}",
                             "exit-when-poll=1"], pass_fds=(r,), stderr=subprocess.PIPE)
    os.close(r)
    try:
        wait_for_socket(sock, proc)
        assert proc.poll() is None
        os.close(w)
        assert proc.wait(timeout=30) == 0
    finally:
        stop_process(proc)


@pytest.mark.parametrize("server", BOTH)
@pytest.mark.parametrize("trigger", ["script", "process"])
def test_exitwhen_script_and_process(tmp_path, server, trigger):
    flag = tmp_path / "flag"
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with served("--filter=exitwhen", "memory", "1M",
                    f"exit-when-script=test -e {flag} && exit 88; exit 0",
                    f"exit-when-process-exits={sleeper.pid}", "exit-when-poll=1",
                    server=server) as srv:
            assert nbdsh(srv.uri, "print(h.get_size())").strip() == "1048576"
            assert srv.proc.poll() is None
            if trigger == "script":
                flag.touch()
            else:
                sleeper.kill()
                sleeper.wait()  # reaped: a zombie still counts as running
            wait_for(lambda: exited(srv.proc.pid), message=f"{server} still running")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_exitwhen_bad_fd_is_one_line():
    result = run([*PYNBD, "serve", "--filter=exitwhen", "memory", "1M", "exit-when-pipe-closed=999"],
                 check=False)
    err = result.stderr.decode()
    assert result.returncode == 1 and "exit-when-pipe-closed=999" in err and "Traceback" not in err


@pytest.mark.parametrize("server", BOTH)
def test_limit_refuses_the_extra_client(server):
    with served("--filter=limit", "memory", "1M", "limit=1", server=server) as srv:
        first = hold(srv.uri)
        assert run(["nbdinfo", srv.uri], check=False).returncode != 0
        first.communicate(b"", timeout=30)
        wait_for(lambda: run(["nbdinfo", srv.uri], check=False).returncode == 0,
                 message="a client after the first left is still refused")


def test_limit_zero_is_unlimited():
    with served("--filter=limit", "memory", "1M", "limit=0") as srv:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(srv.socket)
            assert nbdsh(srv.uri, "print(h.get_size())").strip() == "1048576"
