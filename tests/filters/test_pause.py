"""pause: requests held while paused and released on resume, through nbdkit's
pause-control socket (compared with nbdkit) and pynbd's control socket."""

from __future__ import annotations

import socket
import subprocess

import pytest
from stack_helpers import BOTH

from nbdtest import PYNBD, run, served

READER = "h.pread(512, 0); print('done', flush=True)"


def reader(uri: str) -> subprocess.Popen:
    return subprocess.Popen(["nbdsh", "-u", uri, "-c", READER], stdout=subprocess.PIPE)


def held(client: subprocess.Popen) -> bool:
    """True if the client is still waiting half a second later (it would take milliseconds)."""
    try:
        client.wait(timeout=0.5)
    except subprocess.TimeoutExpired:
        return True
    return False


@pytest.mark.parametrize("server", BOTH)
def test_pause_control_socket(tmp_path, server):
    ctl = str(tmp_path / "pause.sock")
    with served("--filter=pause", "memory", "1M", f"pause-control={ctl}", server=server) as srv:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(ctl)
            s.sendall(b"p\n")
            assert s.recv(1) == b"P"
            client = reader(srv.uri)
            assert held(client)
            s.sendall(b"?r")
            assert s.recv(1) + s.recv(1) == b"XR"  # (one answer per command, maybe one per recv)
            out, _ = client.communicate(timeout=30)
            assert out == b"done\n"


def test_pause_and_resume_on_the_control_socket(tmp_path):
    ctl = str(tmp_path / "ctl")
    with served("--filter=pause", "memory", "1M", options=[f"--control={ctl}"]) as srv:
        run([*PYNBD, "ctl", ctl, "pause"])
        client = reader(srv.uri)
        assert held(client)
        run([*PYNBD, "ctl", ctl, "resume"])
        out, _ = client.communicate(timeout=30)
        assert out == b"done\n"


def test_pause_control_in_a_missing_directory_is_one_line(tmp_path):
    result = run([*PYNBD, "serve", "--filter=pause", "memory", "1M",
                  f"pause-control={tmp_path}/no/such/sock"], check=False)
    err = result.stderr.decode()
    assert result.returncode == 1 and "pause-control=" in err and "Traceback" not in err
