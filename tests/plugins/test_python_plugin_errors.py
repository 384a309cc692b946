"""Plugin files that cannot be served are refused at start-up with file, line and reason;
native Plugin files and executable scripts are served directly."""

from __future__ import annotations

import os
import shutil
import textwrap

import pytest

from nbdtest import SERVE, nbdsh, run, served

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")
REQUIRED_V2 = ("def open(readonly):\n    return None\n"
               "def get_size(h):\n    return 512\n")


def refused(*args: str) -> str:
    """Run pynbd serve expecting a configuration error; its one stderr line."""
    result = run([*SERVE, "-f", "-U", "-", *args, "--run", "true"], check=False, timeout=60)
    assert result.returncode == 1, result
    lines = result.stderr.decode().strip().splitlines()
    assert lines[-1].startswith("pynbd: error: ")
    return lines[-1]


def plugin_file(tmp_path, text: str, name: str = "plugin.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_missing_file_is_named():
    assert "does not exist" in refused("python", "script=/nonexistent/plugin.py")
    assert "does not exist" in refused("/nonexistent/plugin.py")


def test_syntax_error_shows_its_line(tmp_path):
    path = plugin_file(tmp_path, "API_VERSION = 2\n\ndef open(readonly)\n    return 1\n")
    message = refused("python", path)
    assert f"{path}:3: syntax error" in message


def test_import_failure_shows_its_line(tmp_path):
    path = plugin_file(tmp_path, "import nbdkit\nimport no_such_module_here\n")
    message = refused(path)
    assert f"{path}:2:" in message and "no_such_module_here" in message


def test_wrong_signature_is_refused_with_a_hint(tmp_path):
    path = plugin_file(tmp_path, "API_VERSION = 2\n" + REQUIRED_V2 +
                       "def pread(h, count, offset):\n    return bytes(count)\n")
    message = refused(path)
    assert f"{path}:6: pread(h, count, offset)" in message
    assert "API_VERSION 2" in message and "set API_VERSION = 1" in message


def test_wrong_signature_without_hint(tmp_path):
    path = plugin_file(tmp_path, REQUIRED_V2 + "def pread(h, count, offset):\n    pass\n"
                       "def zero(h):\n    pass\n")
    assert f"{path}:7: zero(h) does not fit the call zero(h, count, offset, may_trim)" \
        in refused(path)


def test_missing_required_callbacks(tmp_path):
    path = plugin_file(tmp_path, "API_VERSION = 2\ndef open(readonly):\n    return 1\n")
    assert "missing: get_size, pread" in refused(path)


def test_unknown_api_version(tmp_path):
    path = plugin_file(tmp_path, "API_VERSION = 7\n" + REQUIRED_V2 +
                       "def pread(h, buf, offset, flags):\n    pass\n")
    assert "API_VERSION = 7 is not supported" in refused(path)


def test_parameters_without_config_and_config_errors(tmp_path):
    plain = plugin_file(tmp_path, "API_VERSION = 2\n" + REQUIRED_V2 +
                        "def pread(h, buf, offset, flags):\n    pass\n")
    assert "takes no parameters" in refused(plain, "size=1M")
    assert "expected key=value" in refused(plain, "word")
    strict = plugin_file(tmp_path, "API_VERSION = 2\n" + REQUIRED_V2 +
                         "def pread(h, buf, offset, flags):\n    pass\n"
                         "def config(key, value):\n    raise ValueError(f'bad {key}')\n", "strict.py")
    assert f"{strict}:9: config: ValueError: bad size" in refused(strict, "size=1M")


def test_bad_thread_model(tmp_path):
    path = plugin_file(tmp_path, "API_VERSION = 2\n" + REQUIRED_V2 +
                       "def pread(h, buf, offset, flags):\n    pass\n"
                       "def thread_model():\n    return 42\n")
    assert "thread_model returned 42" in refused(path)


def test_server_keeps_serving_after_a_failing_open(tmp_path):
    path = plugin_file(tmp_path, """\
        API_VERSION = 2
        import nbdkit
        def open(readonly):
            if nbdkit.export_name() == "bad":
                raise RuntimeError("no such disk")
            return None
        def get_size(h):
            return 4096
        def pread(h, buf, offset, flags):
            buf[:] = b"k" * len(buf)
        """)
    with served(path) as srv:
        bad = run(["nbdinfo", srv.uri.replace(":///", ":///bad")], check=False)
        assert bad.returncode != 0
        assert nbdsh(srv.uri, "print(bytes(h.pread(2, 0)))").strip() == "b'kk'"


def test_native_plugin_file_gets_its_parameters_parsed():
    path = os.path.join(SCRIPTS, "native_disk.py")
    with served(path, "letter=Z", "size=8k") as srv:
        assert nbdsh(srv.uri, "print(h.get_size(), bytes(h.pread(3, 100)))").strip() == "8192 b'ZZZ'"
    assert "unknown parameter 'colour'" in refused(path, "colour=red")
    assert "size: could not parse size" in refused(path, "size=lots")
    assert "defines a pynbd Plugin class" in refused("python", f"script={path}")


@pytest.mark.skipif(shutil.which("pynbd") is None, reason="pynbd is not on PATH")
def test_executable_scripts_with_shebang(tmp_path):
    cases = (("native_disk.py", ["letter=Q"], "QQQQ"), ("executable_v2.py", [], "\x07" * 4))
    for name, extra, expected in cases:
        path = os.path.join(SCRIPTS, name)
        assert os.access(path, os.X_OK)
        out = run([path, "-U", "-", *extra, "size=64k", "--run", 'nbdcopy "$uri" - | head -c 4'],
                  timeout=60).stdout.decode()
        assert out == expected


def test_help_prints_the_plugin_docstring():
    out = run([*SERVE, os.path.join(SCRIPTS, "ramdisk_v2.py"), "--help"]).stdout.decode()
    assert "A RAM disk written for nbdkit's Python plugin" in out
    out = run([*SERVE, "python", "--help"]).stdout.decode()
    assert "API_VERSION" in out and "script=<path>" in out
