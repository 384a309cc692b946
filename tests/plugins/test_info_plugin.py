"""info: the disk reflects the export name, the address, or clocks."""

from __future__ import annotations

import base64
import socket
import time
from urllib.parse import quote

import pytest

from nbdtest import PYNBD, nbdsh, run, served

READ_ALL = "print(h.get_size(), h.pread(h.get_size(), 0).hex() if h.get_size() else '-')"


def uri_for(srv, name: str) -> str:
    """The server's URI asking for export ``name``."""
    return srv.uri.replace("nbd+unix:///", "nbd+unix:///" + quote(name, safe=""), 1)


@pytest.mark.parametrize(("mode", "name", "expected"), [
    ("exportname", "hello", b"hello"),
    ("exportname", "wéird name/+", "wéird name/+".encode()),
    ("base64exportname", "aGVsbG8gd29ybGQ=", b"hello world"),
    ("base64exportname", base64.b64encode(b"\0\1binary\xff").decode(), b"\0\1binary\xff"),
])
def test_export_name_reflected_as_nbdkit(mode, name, expected):
    for server in ("pynbd", "nbdkit"):
        with served("info", mode, server=server) as srv:
            out = nbdsh(uri_for(srv, name), READ_ALL)
        assert out.split() == [str(len(expected)), expected.hex()], server


def test_default_export_is_empty():
    with served("info") as srv:
        assert nbdsh(srv.uri, READ_ALL).split() == ["0", "-"]


def test_bad_base64_is_refused():
    with served("info", "base64exportname") as srv:
        result = run(["nbdinfo", uri_for(srv, "aGVsbG8")], check=False)
    assert result.returncode != 0


def test_address_over_tcp_and_unix():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc_out = run([*PYNBD, "serve", "-p", str(port), "-i", "127.0.0.1",
                    "info", "address", "--run", f"nbdsh -u nbd://127.0.0.1:{port}/ -c "
                    "'print(h.pread(h.get_size(), 0).decode())'"]).stdout.decode().strip()
    host, _, client_port = proc_out.rpartition(":")
    assert host == "127.0.0.1" and int(client_port) > 0
    with served("info", "address") as srv:
        assert nbdsh(srv.uri, "print(h.pread(h.get_size(), 0).decode())").strip() == "unix"


def read_clock(srv) -> tuple[int, int]:
    out = nbdsh(srv.uri, "b = h.pread(12, 0); print(h.get_size(), int.from_bytes(b[:8], 'big'), "
                         "int.from_bytes(b[8:], 'big'))").split()
    assert out[0] == "12"
    return int(out[1]), int(out[2])


def test_time_is_wall_clock():
    with served("info", "time") as srv:
        seconds, micros = read_clock(srv)
    assert abs(seconds - time.time()) < 60 and micros < 1_000_000


def test_uptime_grows_conntime_starts_near_zero():
    with served("info", "uptime") as srv:
        first = read_clock(srv)
        time.sleep(1.1)
        second = read_clock(srv)
    assert second[0] * 10**6 + second[1] > first[0] * 10**6 + first[1] + 10**6
    with served("info", "conntime") as srv:
        seconds, _ = read_clock(srv)
    assert seconds < 30


def test_unknown_mode_is_refused():
    result = run([*PYNBD, "serve", "-U", "-", "info", "mode=bogus", "--run", "true"],
                 check=False)
    assert result.returncode == 1 and len(result.stderr.decode().splitlines()) == 1
