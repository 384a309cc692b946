"""ssh plugin: against OpenSSH's sshd on 127.0.0.1, compared with nbdkit's ssh plugin."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest
from plugin_helpers import config_error, export_info
from sshserver import sshd

from filters.stack_helpers import BOTH, nbdsh_outcomes
from nbdtest import nbdsh, run, served

SIZE = (1 << 20) + 4097


@pytest.fixture(scope="module")
def ssh(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ssh")
    with sshd(directory) as server:
        yield server


def login(ssh, *more: str, known_hosts: str | None = None) -> list[str]:
    return ["ssh", "host=127.0.0.1", f"port={ssh.port}", f"identity={ssh.identity}",
            f"known-hosts={known_hosts or ssh.known_hosts}", *more]


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(SIZE))
    return path


def test_bytes_and_size_match_nbdkit(ssh, image, tmp_path):
    results = []
    for server in BOTH:
        with served(*login(ssh, f"path={image}"), server=server, options=["-r"]) as srv:
            out = tmp_path / f"{server}.out"
            run(["nbdcopy", srv.uri, str(out)])
            digest = hashlib.sha256(out.read_bytes()).hexdigest()
            results.append((export_info(srv.uri)["export-size"], digest))
    assert results[0] == results[1] == (SIZE, hashlib.sha256(image.read_bytes()).hexdigest())


def test_writes_reach_the_file_and_clients_are_separate_sessions(ssh, image):
    with served(*login(ssh, f"path={image}")) as srv:
        code = "h.pwrite(b'over ssh', 1000); h.zero(4096, 8192)\nprint(bytes(h.pread(8, 1000)))"
        outputs = [nbdsh(srv.uri, code) for _ in range(2)]
        assert outputs == ["b'over ssh'\n"] * 2
        assert not export_info(srv.uri)["can_flush"]
    data = image.read_bytes()
    assert data[1000:1008] == b"over ssh" and data[8192:12288] == bytes(4096)


def test_read_only_file_and_option(ssh, image):
    with served(*login(ssh, f"path={image}"), options=["-r"]) as srv:
        assert nbdsh_outcomes(srv.uri, ["h.pwrite(b'x', 0)"]) == ["EPERM"]
    image.chmod(0o444)
    # root may write anyway; the plugin serves read-only only when the server says no
    with served(*login(ssh, f"path={image}")) as srv:
        assert export_info(srv.uri)["export-size"] == SIZE


def test_create(ssh, tmp_path):
    target = tmp_path / "new.img"
    target.write_bytes(b"old content")
    with served(*login(ssh, f"path={target}", "create=true", "create-size=2M", "create-mode=0640")) as srv:
        assert export_info(srv.uri)["export-size"] == 2 << 20
        nbdsh(srv.uri, "h.pwrite(b'fresh', 0)")
    assert target.stat().st_size == 2 << 20 and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert target.read_bytes()[:12] == b"fresh" + bytes(7)


def test_missing_file_refuses_the_client_and_keeps_serving(ssh, tmp_path):
    missing = tmp_path / "later.img"
    with served(*login(ssh, f"path={missing}")) as srv:
        assert run(["nbdinfo", srv.uri], check=False).returncode != 0
        missing.write_bytes(bytes(4096))
        assert export_info(srv.uri)["export-size"] == 4096
    log = srv.stderr()
    assert "No such file" in log and "Traceback" not in log, log


def test_host_key_checks(ssh, image, tmp_path):
    line = config_error(*login(ssh, f"path={image}", known_hosts=ssh.wrong_known_hosts))
    assert "host key does not match" in line, line
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    line = config_error(*login(ssh, f"path={image}", known_hosts=str(empty)))
    assert "not found in known_hosts" in line, line
    with served(*login(ssh, f"path={image}", "verify-remote-host=false", known_hosts=str(empty))) as srv:
        assert export_info(srv.uri)["export-size"] == SIZE


def test_login_and_connection_errors(ssh, image, tmp_path):
    stranger = tmp_path / "stranger"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)])
    line = config_error("ssh", "host=127.0.0.1", f"port={ssh.port}", f"identity={stranger}",
                        f"known-hosts={ssh.known_hosts}", f"path={image}")
    assert "login refused" in line, line
    line = config_error("ssh", "host=127.0.0.1", "port=1", f"identity={ssh.identity}", f"path={image}")
    assert line.startswith("pynbd: error: ssh:") and "127.0.0.1:1" in line, line


@pytest.mark.parametrize("params, message", [
    (["host=x", "path=y", "create=true"], "create=true needs create-size="),
    (["host=x", "path=y", "create-mode=rw"], "not an octal mode"),
    (["host=x", "path=y", "identity=/nonexistent/key"], "does not exist"),
    (["path=y"], "missing required parameter 'host'"),
])
def test_bad_parameters(params, message):
    assert message in config_error("ssh", *params)
