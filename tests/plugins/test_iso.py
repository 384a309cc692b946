"""iso plugin: an ISO 9660 image from directories, read back with isoinfo, against nbdkit's iso."""

from __future__ import annotations

import os

import pytest
from plugin_helpers import config_error, export_info

from filters.stack_helpers import BOTH
from nbdtest import SERVE, run, served


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "hello.txt").write_text("hello from iso\n")
    (src / "a rather long file name.txt").write_text("long\n")
    (src / "sub" / "random.bin").write_bytes(os.urandom(200_000))
    return src


def served_iso(tmp_path, server: str, *args: str):
    with served("iso", *args, server=server) as srv:
        assert export_info(srv.uri)["is_read_only"] is True
        image = tmp_path / f"{server}.iso"
        run(["nbdcopy", srv.uri, str(image)])
    return str(image)


def iso_files(image: str) -> list[str]:
    return sorted(run(["isoinfo", "-f", "-R", "-i", image]).stdout.decode().split("\n"))


def test_same_files_as_nbdkit(tmp_path, tree):
    images = [served_iso(tmp_path, server, str(tree), "params=-JrT -V TESTVOL") for server in BOTH]
    assert iso_files(images[0]) == iso_files(images[1])
    assert "/a rather long file name.txt" in iso_files(images[0])
    for image in images:
        assert "Volume id: TESTVOL" in run(["isoinfo", "-d", "-i", image]).stdout.decode()
    read = run(["isoinfo", "-R", "-x", "/sub/random.bin", "-i", images[1]]).stdout
    assert read == (tree / "sub" / "random.bin").read_bytes()


def test_directories_merged_and_prog(tmp_path, tree):
    other = tmp_path / "other"
    other.mkdir()
    (other / "extra.txt").write_text("extra\n")
    image = served_iso(tmp_path, "pynbd", f"dir={tree}", f"dir={other}", "params=-r",
                       "prog=genisoimage")
    files = iso_files(image)
    assert "/extra.txt" in files and "/hello.txt" in files
    assert run(["isoinfo", "-R", "-x", "/extra.txt", "-i", image]).stdout == b"extra\n"


@pytest.mark.parametrize("args, message", [
    (["DIR/nope"], "not a directory"),
    ([], "give at least one directory"),
    (["DIR", "prog=no-such-mkisofs"], "no-such-mkisofs failed with exit status 127"),
    (["DIR", "params=--no-such-option"], "xorriso failed with exit status"),
])
def test_bad_input(tree, args, message):
    assert message in config_error("iso", *[a.replace("DIR", str(tree)) for a in args])


def no_programs_env(tmp_path, hide_pycdlib: bool = False) -> dict[str, str]:
    """An environment whose PATH has no xorriso, genisoimage or mkisofs (and maybe no pycdlib)."""
    empty = tmp_path / "empty-path"
    empty.mkdir(exist_ok=True)
    env = {**os.environ, "PATH": str(empty)}
    if hide_pycdlib:
        shadow = tmp_path / "shadow"
        shadow.mkdir()
        (shadow / "pycdlib.py").write_text("raise ImportError('hidden for the test')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(shadow), env.get("PYTHONPATH", "")])
    return env


def test_pycdlib_without_programs(tmp_path, tree):
    with served("iso", str(tree), "params=-J -r -V PYCD", env=no_programs_env(tmp_path)) as srv:
        image = tmp_path / "py.iso"
        run(["nbdcopy", srv.uri, str(image)])
    assert iso_files(str(image)) == iso_files(served_iso(tmp_path, "nbdkit", str(tree), "params=-Jr"))
    info = run(["isoinfo", "-d", "-i", str(image)]).stdout.decode()
    assert "Volume id: PYCD" in info and "Joliet" in info and "Rock Ridge" in info
    read = run(["isoinfo", "-R", "-x", "/sub/random.bin", "-i", str(image)]).stdout
    assert read == (tree / "sub" / "random.bin").read_bytes()


@pytest.mark.parametrize("hide, params, message", [
    (False, "params=-T", "'-T' is not understood without xorriso"),
    (True, "params=", "pycdlib is not installed"),
])
def test_pycdlib_refusals(tmp_path, tree, hide, params, message):
    result = run([*SERVE, "-f", "-U", str(tmp_path / "s"), "iso", str(tree), params], check=False,
                 env=no_programs_env(tmp_path, hide))
    err = result.stderr.decode()
    assert result.returncode == 1 and message in err and len(err.strip().splitlines()) == 1, err
