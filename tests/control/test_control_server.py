"""A live server's control socket: pynbd ctl, socat, garbage and many clients during I/O.

The server runs tests/control/control_filter.py (the "counting" filter), whose
commands see the data path's state (reads and writes counted) and misbehave on
request (refusals, bugs, results that are not JSON, a command that blocks).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from nbdtest import PYNBD, SERVE, nbdsh, run, served, wait_for

FILTER = str(Path(__file__).with_name("control_filter.py"))
CTL = [*PYNBD, "ctl"]


def serve_with_control(ctl: Path, *args: str):
    return served("--filter", FILTER, "memory", "32M", *args, options=("--control", str(ctl)))


def ctl(path: Path, *words: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([*CTL, str(path), *words], check=check, timeout=30)


def ctl_json(path: Path, *words: str) -> object:
    return json.loads(ctl(path, "--json", *words).stdout)


class Client:
    """A raw control connection: send any bytes, read reply lines."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.lines = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> dict:
        line = self.lines.readline()
        assert line.endswith(b"\n"), f"no whole reply line: {line!r}"
        return json.loads(line)

    def ask(self, data: bytes) -> dict:
        self.send(data)
        return self.reply()

    def close(self) -> None:
        self.lines.close()
        self.sock.close()


def test_ctl_prints_results_readably_and_as_json(tmp_path):
    path = tmp_path / "ctl"
    with serve_with_control(path):
        status = ctl(path, "status").stdout.decode().splitlines()
        assert status[0].startswith("pid: ") and status[1].startswith("uptime: ")
        assert 'layers: ["counting","memory"]' in status
        assert ctl_json(path, "status")["exports"] == [{"name": "", "description": ""}]
        help_lines = ctl(path, "help").stdout.decode().splitlines()
        assert help_lines[0].split() == ["COMMAND", "HELP"]
        assert "note add TEXT" in help_lines[5] and help_lines[5].index("remember") \
            == help_lines[0].index("HELP")  # aligned
        usages = [c["command"] for c in ctl_json(path, "help")]
        assert usages[:4] == ["status", "help [WORDS...]", "counter show", "counter reset"]
        assert "echo [WORDS...]" in usages and "help [WORDS...]" in usages
        assert [c["command"] for c in ctl_json(path, "help", "note")] == ["note add TEXT", "note list"]
        assert ctl(path, "help", "nothing", check=False).stderr == \
            b"pynbd ctl: no command starts with 'nothing'\n"
        assert ctl(path, "note", "add", "first one").stdout == b"1\n"
        assert ctl(path, "note", "add", "second").stdout == b"2\n"
        assert ctl(path, "note", "list").stdout.decode().splitlines() == [
            "N  TEXT", "1  first one", "2  second"]
        assert ctl_json(path, "note", "list") == [{"n": 1, "text": "first one"}, {"n": 2, "text": "second"}]
        assert ctl(path, "echo", "--", "-x", "--json").stdout == b"-x\n--json\n"
        assert ctl(path, "counter", "reset").stdout == b""
        assert ctl(path, "--json", "counter", "reset").stdout == b"null\n"


def test_commands_see_the_data_path_and_the_connections(tmp_path):
    path = tmp_path / "ctl"
    with serve_with_control(path) as srv:
        ctl(path, "counter", "reset")
        nbdsh(srv.uri, "h.pwrite(b'x' * 4096, 0); h.pwrite(b'y' * 512, 8192); h.pread(4096, 0)")
        assert ctl_json(path, "counter", "show") == {"reads": 1, "writes": 2}
        with socket.socket(socket.AF_UNIX) as nbd:
            nbd.connect(srv.socket)
            assert nbd.recv(8) == b"NBDMAGIC"
            wait_for(lambda: ctl_json(path, "status")["connections"] == 1)
        wait_for(lambda: ctl_json(path, "status")["connections"] == 0)


@pytest.mark.parametrize("words, message", [
    (["frobnicate"], "unknown command 'frobnicate'; 'help' lists the commands"),
    (["counter"], "unknown command 'counter'; did you mean: counter reset, counter show"),
    (["note", "add"], "usage: note add TEXT"),
    (["status", "now"], "usage: status"),
    (["fail", "refuse"], "refused on purpose"),
    (["fail", "crash"], "internal error: RuntimeError: a bug on purpose"),
    (["fail", "unjsonable"], "internal error: TypeError: Object of type set is not JSON serializable"),
])
def test_a_refused_command_is_one_line_on_stderr_and_exit_1(tmp_path, words, message):
    path = tmp_path / "ctl"
    with serve_with_control(path) as srv:
        result = ctl(path, *words, check=False)
        assert (result.returncode, result.stdout) == (1, b"")
        assert result.stderr.decode() == f"pynbd ctl: {message}\n"
        run(["nbdinfo", "--size", srv.uri])  # the server carries on
        assert ctl_json(path, "echo", "still") == ["still"]
    if words[-1] in ("crash", "unjsonable"):
        log = srv.stderr()
        assert f"control command '{' '.join(words)}' raised" in log and "Traceback" in log


def test_ctl_timeout(tmp_path):
    path = tmp_path / "ctl"
    with serve_with_control(path):
        result = run([*CTL, "--timeout=0.3", str(path), "fail", "block"], check=False)
        assert result.returncode == 1
        assert result.stderr.decode() == f"pynbd ctl: no reply from {path} within 0.3 s\n"
        assert ctl_json(path, "fail", "release") is None
        assert ctl_json(path, "echo", "after") == ["after"]


def test_status_when_the_exports_cannot_be_listed(tmp_path):
    path = tmp_path / "ctl"
    with serve_with_control(path, "unlistable=true"):
        status = ctl_json(path, "status")
    assert status["exports"] == "cannot list them: [Errno 113] listing exports: No route to host"
    assert status["layers"] == ["counting", "memory"]


def test_ctl_without_a_server(tmp_path):
    result = ctl(tmp_path / "nothing", "status", check=False)
    assert result.returncode == 1
    assert result.stderr.decode() == f"pynbd ctl: cannot talk to {tmp_path / 'nothing'}: " \
                                     "No such file or directory\n"


@pytest.mark.skipif(shutil.which("fio") is None, reason="needs fio")
def test_garbage_and_fifty_clients_never_disturb_io(tmp_path):
    path = tmp_path / "ctl"
    with serve_with_control(path) as srv:
        ctl(path, "counter", "reset")
        fio = subprocess.Popen(
            ["fio", "--name=verify", "--ioengine=nbd", f"--uri={srv.uri}", "--rw=randwrite",
             "--bs=4k", "--size=16M", "--iodepth=16", "--verify=crc32c", "--do_verify=1",
             "--verify_fatal=1", "--verify_state_save=0", "--output-format=json",
             "--rate=6m"],  # writing takes ~3 s: the garbage below certainly meets it
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            before = wait_for(lambda: ctl_json(path, "counter", "show")["writes"])
            blocked = Client(path)
            blocked.send(b'{"command": ["fail", "block"], "id": "slow"}\n')
            errors: list[BaseException] = []
            threads = [threading.Thread(target=_misbehave, args=(path, n, errors)) for n in range(50)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
                assert not t.is_alive()
            assert not errors, errors[0]
            assert ctl_json(path, "counter", "show")["writes"] > before  # I/O went on meanwhile
            assert ctl_json(path, "fail", "release") is None
            assert blocked.reply() == {"ok": True, "id": "slow"}
            blocked.close()
            out, err = fio.communicate(timeout=120)
        finally:
            if fio.poll() is None:
                fio.kill()
        assert fio.returncode == 0, err.decode()
        report = json.loads(out[out.index(b"{"):])
        assert report["jobs"][0]["error"] == 0
        assert report["jobs"][0]["write"]["io_bytes"] == 16 << 20
        assert ctl_json(path, "counter", "show")["writes"] >= 4096
        assert ctl_json(path, "status")["pid"] == srv.proc.pid
    assert "Traceback" not in srv.stderr()


def _misbehave(path: Path, n: int, errors: list[BaseException]) -> None:
    """One of many clients at once, each sending a different kind of garbage around good requests."""
    try:
        client = Client(path)
        kind = n % 5
        if kind == 0:
            assert client.ask(b"this is not json\n")["error"].startswith("invalid JSON")
        elif kind == 1:
            assert client.ask(b'{"command": ["echo", "' + b"A" * 100_000 + b'"]}\n') == {
                "error": "line longer than 65536 bytes"}
        elif kind == 2:
            binary = bytes(range(128, 256)) + bytes(range(10))  # no newline but the last byte
            assert client.ask(binary + b"\n")["error"] == "the line is not UTF-8 (byte 0)"
        elif kind == 3:
            client.send(b'{"command": ["sta')  # half a line, then hang up
            client.close()
            return
        else:
            reply = client.ask(b'{"command": ["note", "add", "n%d"], "id": %d}\n' % (n, n))
            assert reply["id"] == n and 1 <= reply["ok"] <= 10  # ten clients add notes
        assert client.ask(b'{"command": ["echo", "%d"], "id": [%d]}\n' % (n, n)) == {
            "ok": [str(n)], "id": [n]}
        client.close()
    except BaseException as exc:  # noqa: BLE001 (reported by the test thread)
        errors.append(exc)


def test_socat_as_in_the_manual(tmp_path):
    path = tmp_path / "ctl"
    with serve_with_control(path) as srv:
        out = run(["socat", "-", f"UNIX-CONNECT:{path}"],
                  input=b'{"command": ["status"]}\nnonsense\n{"command": ["echo", "a"], "id": "h"}\n').stdout
        lines = [json.loads(line) for line in out.splitlines()]
        assert lines[0]["ok"]["pid"] == srv.proc.pid
        assert lines[1] == {"error": "invalid JSON: Expecting value"}
        assert lines[2] == {"ok": ["a"], "id": "h"}


# ---------------------------------------------------------------- the socket file

def test_the_socket_is_private_and_removed_on_exit(tmp_path):
    path = tmp_path / "ctl"
    with serve_with_control(path) as srv:
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        assert ctl_json(path, "echo", "up") == ["up"]
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(30)
    assert not path.exists()


def test_a_live_socket_is_refused(tmp_path):
    path = tmp_path / "ctl"
    with serve_with_control(path):
        nbd = tmp_path / "second.sock"
        result = run([*SERVE, "-f", "--control", str(path), "-U", str(nbd), "memory", "1M"], check=False)
        assert result.returncode == 1
        assert result.stderr.decode() == \
            f"pynbd: error: control socket {path} is in use by a running server\n"
        assert not nbd.exists()
        assert ctl_json(path, "echo", "first") == ["first"]  # the first server keeps it


def test_a_stale_socket_is_replaced(tmp_path):
    path = tmp_path / "ctl"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))  # bound, never listened: what a killed server leaves
    with serve_with_control(path):
        assert ctl_json(path, "echo", "new") == ["new"]


def test_a_file_that_is_not_a_socket_is_left_alone(tmp_path):
    path = tmp_path / "ctl"
    path.write_text("precious")
    result = run([*SERVE, "-f", "--control", str(path), "-U", str(tmp_path / "s"), "memory", "1M"],
                 check=False)
    assert result.returncode == 1
    assert result.stderr.decode() == \
        f"pynbd: error: control socket {path} exists and is not a socket; not replacing it\n"
    assert path.read_text() == "precious"
    missing = tmp_path / "no" / "such" / "dir" / "ctl"
    result = run([*SERVE, "-f", "--control", str(missing), "-U", str(tmp_path / "s"), "memory", "1M"],
                 check=False)
    assert result.stderr.decode() == \
        f"pynbd: error: cannot listen on control socket {missing}: No such file or directory\n"
    assert not (tmp_path / "s").exists()


def test_two_layers_with_the_same_command_refuse_to_start(tmp_path):
    result = run([*SERVE, "-f", "--control", str(tmp_path / "ctl"), "-U", str(tmp_path / "s"),
                  "--filter", FILTER, "memory", "1M", "clash=true"], check=False)
    assert result.returncode == 1
    assert result.stderr.decode() == "pynbd: error: two layers register the control command 'status'\n"
    assert os.listdir(tmp_path) == []


def test_control_in_a_daemon_and_with_run(tmp_path):
    path = tmp_path / "ctl"
    result = run([*SERVE, "--control", str(path), "-U", "-",
                  "--run", f"{' '.join(CTL)} {path} --json status", "memory", "1M"])
    assert json.loads(result.stdout)["layers"] == ["memory"]
    assert not path.exists()
    pidfile = tmp_path / "pid"
    run([*SERVE, "--control", str(path), "-U", str(tmp_path / "sock"), "-P", str(pidfile), "memory", "1M"])
    pid = int(pidfile.read_text())
    try:
        assert ctl_json(path, "status")["pid"] == pid
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not path.exists(), message="control socket left after the daemon exited")


def test_control_with_single(tmp_path):
    """-s serves one client on stdin; the control socket lives as long as that client."""
    path = tmp_path / "ctl"
    serve = [*SERVE, "-s", "--control", str(path), "memory", "1M"]
    code = f"""
import json, subprocess
h.connect_command({serve!r})
status = json.loads(subprocess.run({[*CTL, str(path), "--json", "status"]!r},
                                   capture_output=True, check=True).stdout)
print(status["connections"], status["layers"])
"""
    assert run(["nbdsh", "-c", code]).stdout == b"1 ['memory']\n"
    wait_for(lambda: not path.exists(), message="control socket left after -s ended")
