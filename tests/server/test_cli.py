"""``pynbd serve`` command-line options, each driven the way a user would."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from rawnbd import RawClient

from nbdtest import (
    PYNBD,
    SERVE,
    exited,
    nbdsh,
    run,
    served,
    threads,
    wait_for,
    wait_for_socket,
    wait_idle,
)

FLAKY = str(Path(__file__).with_name("flaky_plugin.py"))


# ---------------------------------------------------------------- --run

def test_run_sets_the_environment_and_returns_the_status(tmp_path):
    out = tmp_path / "env"
    script = f'printf "%s\\n" "$uri" "$nbd" "$unixsocket" "x$port" "x$exportname" > {out}; ' \
             'nbdinfo --size "$uri"; exit 7'
    result = run([*SERVE, "-U", "-", "memory", "1M", "--run", script], check=False)
    assert result.returncode == 7
    assert result.stdout.decode().strip() == str(1 << 20)
    uri, nbd, sock, port, export = out.read_text().splitlines()
    assert uri == nbd == f"nbd+unix:///?socket={sock}"
    assert (port, export) == ("x", "x")
    assert not os.path.exists(os.path.dirname(sock))  # -U -: the private dir is gone


def test_run_over_tcp_sets_port():
    script = 'test -n "$port" && test -z "$unixsocket" && nbdinfo --size "$uri"'
    result = run([*SERVE, "-i", "127.0.0.1", "-p", "0", "memory", "1M", "--run", script])
    assert result.stdout.decode().strip() == str(1 << 20)


def test_run_with_qemu_img_image_opts():
    script = ("qemu-img info --output=json --image-opts "
              "driver=nbd,server.type=unix,server.path=$unixsocket")
    info = json.loads(run([*SERVE, "-U", "-", "memory", "2M", "--run", script]).stdout)
    assert info["virtual-size"] == 2 << 20


def test_run_shuts_the_server_down_on_signal_status():
    result = run([*SERVE, "-U", "-", "memory", "1M", "--run", "kill -TERM $$"], check=False)
    assert result.returncode == 128 + signal.SIGTERM


def test_exportname_goes_into_uri_and_other_names_are_refused():
    script = ('case "$uri" in nbd+unix:///disk1\\?socket=*) ;; *) exit 9;; esac; '
              'nbdinfo --size "$uri" && ! nbdinfo --size "nbd+unix:///other?socket=$unixsocket"')
    result = run([*SERVE, "-U", "-", "-e", "disk1", "memory", "1M", "--run", script], check=False)
    assert result.returncode == 0, result.stderr.decode()


# ---------------------------------------------------------------- -s, -r, -t

def test_single_connection_on_stdin_with_nbdsh():
    code = ('h.connect_command(["pynbd", "serve", "-s", "memory", "1M"]); '
            'h.pwrite(b"abc", 100); print(h.get_size(), h.pread(3, 100).decode())')
    out = run(["nbdsh", "-c", code]).stdout.decode().split()
    assert out == [str(1 << 20), "abc"]


def test_socket_activation_by_libnbd_with_nbdcopy(tmp_path):
    target = tmp_path / "out"
    run(["nbdcopy", "--", "[", "pynbd", "serve", "memory", "3M", "]", str(target)])
    assert target.stat().st_size == 3 << 20


def test_readonly():
    with served("memory", "1M", options=["-r"]) as srv:
        info = json.loads(run(["nbdinfo", "--json", srv.uri]).stdout)
        assert info["exports"][0]["is_read_only"]
        result = run(["qemu-io", "-f", "raw", "-c", "write 0 512", srv.uri], check=False)
        assert result.returncode != 0 or b"failed" in result.stdout + result.stderr


@pytest.mark.parametrize("count, expected", [(1, 1 + 1), (5, 1 + 1 + 5)])
def test_threads_sets_the_workers_per_connection(count, expected):
    # a plugin that may block gets its reading thread plus a crew of -t worker
    # threads per connection; -t 1 runs requests on the reading thread itself.
    # The idle server runs its main thread only. Once the read is answered the
    # client's threads have all started, and any other client's (the probe that
    # found the socket) can only end: so the count settles on exactly ``expected``.
    with served(FLAKY, options=["-t", str(count)]) as srv:
        pid = srv.proc.pid
        wait_idle(srv)
        with RawClient.connect(srv.socket) as client:
            client.handshake()
            assert client.pread(0, 512) == b"\x07" * 512
            wait_for(lambda: threads(pid) == expected,
                     message=lambda: f"-t {count} with one client: {threads(pid)} threads")


# ---------------------------------------------------------------- daemon, parent

def test_daemonizes_and_writes_pidfile(tmp_path):
    sock, pidfile = tmp_path / "sock", tmp_path / "pid"
    result = run([*SERVE, "-U", str(sock), "-P", str(pidfile), "memory", "1M"], timeout=30)
    assert result.returncode == 0
    pid = int(pidfile.read_text())
    try:
        assert pid != os.getpid() and os.path.exists(f"/proc/{pid}")
        assert run(["nbdinfo", "--size", f"nbd+unix:///?socket={sock}"]).stdout.strip() == b"1048576"
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: exited(pid), message=f"daemon {pid} still running after SIGTERM")
    assert not sock.exists()  # removed before the daemon exited


def test_exit_with_parent(tmp_path):
    sock = tmp_path / "sock"
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, sys, time\n"
         f"p = subprocess.Popen({[*SERVE, '--exit-with-parent', '-U', str(sock), 'memory', '1M']!r})\n"
         "print(p.pid, flush=True)\n"
         "time.sleep(60)\n"],
        stdout=subprocess.PIPE)
    child = int(parent.stdout.readline())
    try:
        wait_for(sock.exists, message=f"no socket {sock}")
    finally:
        parent.kill()
        parent.wait()
    wait_for(lambda: exited(child), message="the server outlived its parent")


def test_systemd_socket_activation(tmp_path):
    path = str(tmp_path / "activated.sock")
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(path)
    listening.listen(8)
    fd = listening.fileno()
    wrapper = f'exec 3<&{fd} {fd}<&-; LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"'
    proc = subprocess.Popen(["bash", "-c", wrapper, "bash", *SERVE, "memory", "2M"],
                            pass_fds=[fd], stderr=subprocess.PIPE)
    listening.close()
    try:
        wait_for_socket(path, proc)
        assert nbdsh(f"nbd+unix:///?socket={path}", "print(h.get_size())").strip() == str(2 << 20)
        assert proc.poll() is None  # it did not fork away
    finally:
        proc.terminate()
        proc.wait(10)
    assert os.path.exists(path)  # the socket belongs to whoever made it


# ---------------------------------------------------------------- logging

def test_plugin_traceback_goes_to_stderr_by_default():
    with served(FLAKY) as srv:
        assert run(["nbdsh", "-u", srv.uri, "-c", "h.pread(512, 4096)"], check=False).returncode != 0
    log = srv.stderr()
    assert "Traceback" in log and "RuntimeError: plugin bug at 4096" in log


def test_log_null_silences_it():
    with served(FLAKY, options=["--log=null"]) as srv:
        assert run(["nbdsh", "-u", srv.uri, "-c", "h.pread(512, 4096)"], check=False).returncode != 0
    assert srv.stderr() == ""


def test_verbose_adds_debug_messages():
    with served("memory", "1M", options=["-v"]) as srv:
        run(["nbdinfo", srv.uri])
    with served("memory", "1M") as quiet:
        run(["nbdinfo", quiet.uri])
    assert "serving export" in srv.stderr()
    assert "serving export" not in quiet.stderr()


# ---------------------------------------------------------------- information

def test_version():
    import pynbd

    assert run([*SERVE, "--version"]).stdout.decode().strip() == f"pynbd {pynbd.__version__}"
    assert run([*SERVE, "memory", "--version"]).stdout.decode().split()[0] == "memory"


def test_help_lists_options_plugins_and_filters():
    out = run([*SERVE, "--help"]).stdout.decode()
    for word in ("--run", "--tls", "--exit-with-parent", "memory", "offset", "delay"):
        assert word in out


def test_plugin_help_prints_its_manual():
    import pynbd.plugins.memory as memory

    out = run([*SERVE, "memory", "--help"]).stdout.decode()
    assert memory.__doc__.strip().splitlines()[0] in out
    assert "Parameters of memory" in out and "allocator" in out
    with_filter = run([*SERVE, "--filter=delay", "memory", "--help"]).stdout.decode()
    assert "rdelay" in with_filter


def test_dump_plugin():
    lines = run([*SERVE, "memory", "--dump-plugin"]).stdout.decode().splitlines()
    assert "name=memory" in lines and "magic_config_key=size" in lines
    assert any(line.startswith("thread_model=") for line in lines)


def test_dump_config():
    lines = run([*SERVE, "--dump-config"]).stdout.decode().splitlines()
    assert "name=pynbd" in lines and any(line.startswith("version=") for line in lines)


def test_pynbd_module_entry_point():
    assert run([*PYNBD, "serve", "--version"]).returncode == 0


# ---------------------------------------------------------------- mistakes

@pytest.mark.parametrize("args, words", [
    (["nosuchplugin"], ["plugin", "nosuchplugin"]),
    (["--filter=nosuchfilter", "memory", "1M"], ["filter", "nosuchfilter"]),
    (["memory", "size=1Q"], ["memory", "size", "1Q"]),
    (["memory", "1M", "colour=blue"], ["memory", "colour"]),
    (["--filter=offset", "memory", "1M", "offset=lots"], ["offset", "lots"]),
    (["--filter=delay", "memory", "1M", "rdelay=soon"], ["delay", "rdelay"]),
    (["/nonexistent/plugin.py"], ["/nonexistent/plugin.py"]),
    (["--tls=on", "memory", "1M"], ["--tls-certificates"]),
    (["--tls=on", "--tls-certificates=/nonexistent", "memory", "1M"], ["/nonexistent"]),
])
def test_configuration_errors_are_one_line(args, words):
    result = run([*SERVE, "-f", "-U", "-", *args], check=False)
    err = result.stderr.decode()
    assert result.returncode == 1
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err


def test_missing_file_is_one_line(tmp_path):
    missing = tmp_path / "missing.img"
    result = run([*SERVE, "-f", "-U", "-", "file", str(missing)], check=False)
    err = result.stderr.decode()
    if "unknown plugin 'file'" in err:
        pytest.skip("the file plugin is not written yet")
    assert result.returncode == 1 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and str(missing) in err


def test_port_in_use_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run([*SERVE, "-f", "-i", "127.0.0.1", "-p", str(port), "memory", "1M"], check=False)
    err = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and str(port) in err and "in use" in err
