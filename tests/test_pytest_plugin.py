"""The nbd_server fixture, as another project's test suite would use it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPTS = os.path.join(os.path.dirname(__file__), "plugins", "scripts")

USER_TESTS = """
import subprocess

import pytest
from pynbd.backend import ConfigError


def nbdinfo_size(uri):
    return int(subprocess.run(["nbdinfo", "--size", uri], check=True,
                              capture_output=True).stdout)


def test_one_line_disk(nbd_server):
    assert nbdinfo_size(nbd_server("memory", "1M")) == 1 << 20


def test_filters_and_params(nbd_server):
    uri = nbd_server("memory", size="4M", filters=["offset"], offset="1M")
    assert nbdinfo_size(uri) == 3 << 20


def test_nbdkit_script_in_a_subprocess(nbd_server):
    uri = nbd_server(SCRIPT, "size=64k", subprocess=True)
    assert nbdinfo_size(uri) == 65536
    assert len(nbd_server.servers) == 1


def test_bad_plugin_raises(nbd_server):
    with pytest.raises(ConfigError):
        nbd_server("no-such-plugin")


def test_servers_are_stopped_after_each_test(nbd_server):
    uri = nbd_server("memory", "1M")
    pytest.shared_uri = uri


def test_previous_server_is_gone():
    result = subprocess.run(["nbdinfo", "--size", pytest.shared_uri], capture_output=True)
    assert result.returncode != 0
"""


def test_fixture_in_a_fresh_pytest_run(tmp_path):
    test_file = tmp_path / "test_user.py"
    script = os.path.join(SCRIPTS, "executable_v2.py")
    test_file.write_text(f"SCRIPT = {script!r}\n" + textwrap.dedent(USER_TESTS))
    env = {key: value for key, value in os.environ.items() if key != "PYTEST_ADDOPTS"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(test_file)], cwd=tmp_path, capture_output=True, timeout=100,
                            env=env)
    output = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, output
    assert "6 passed" in output
