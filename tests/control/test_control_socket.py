"""The control socket in-process: the client limit, close() and whose socket file it removes."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from nbdtest import wait_for
from pynbd.backend import Command
from pynbd.control import server as control_server
from pynbd.control.server import CommandTable, ControlSocket


def table() -> CommandTable:
    return CommandTable([Command(("ping",), (), "pong", lambda: "pong")])


def connect(path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(30)
    sock.connect(str(path))
    return sock


def ask(sock: socket.socket, words: list[str]) -> dict:
    sock.sendall(json.dumps({"command": words}).encode() + b"\n")
    return json.loads(sock.makefile("rb").readline())


@pytest.fixture
def control(tmp_path):
    ctl = ControlSocket.bind(str(tmp_path / "ctl"), table())
    ctl.start()
    yield ctl
    ctl.close()


def test_clients_beyond_the_limit_are_told_and_dropped(control, monkeypatch):
    monkeypatch.setattr(control_server, "MAX_CLIENTS", 2)
    first, second = connect(control.path), connect(control.path)
    assert ask(first, ["ping"]) == ask(second, ["ping"]) == {"ok": "pong"}
    third = connect(control.path)
    assert third.makefile("rb").read() == b'{"error":"too many control clients (at most 2)"}\n'
    first.close()  # a place frees up once the server has seen the hang-up

    def served() -> bool:
        with connect(control.path) as another:
            another.sendall(b'{"command": ["ping"]}\n')
            return another.makefile("rb").readline() == b'{"ok":"pong"}\n'

    wait_for(served)
    second.close()


def test_close_disconnects_clients_and_removes_the_file(tmp_path):
    ctl = ControlSocket.bind(str(tmp_path / "ctl"), table())
    ctl.start()
    client = connect(ctl.path)
    assert ask(client, ["ping"]) == {"ok": "pong"}
    ctl.close()
    assert client.recv(1) == b""
    assert not os.path.exists(ctl.path)


def test_close_leaves_a_socket_file_that_another_server_put_there(tmp_path):
    ctl = ControlSocket.bind(str(tmp_path / "ctl"), table())
    os.unlink(ctl.path)
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(ctl.path)  # a newer server's socket at the same path
        ctl.close()
        assert os.path.exists(ctl.path)


def test_close_waits_for_a_running_command(tmp_path):
    started, finished = threading.Event(), threading.Event()

    def slow() -> None:
        started.set()
        time.sleep(0.3)
        finished.set()

    ctl = ControlSocket.bind(str(tmp_path / "ctl"), CommandTable([Command(("slow",), (), "", slow)]))
    ctl.start()
    with connect(ctl.path) as client:
        client.sendall(b'{"command": ["slow"]}\n')
        assert started.wait(30)
        ctl.close()
        assert finished.is_set()  # the layers may now be unloaded
