"""pynbd info names a compressed image served as it is, and the filter that serves it."""

import subprocess

import pytest

from nbdtest import PYNBD, run, served

DATA = b"".join(b"line %d of a disk image\n" % i for i in range(20000))
TOOLS = {"gzip": (["gzip", "-c"], "gzip compressed data"), "xz": (["xz", "-c"], "XZ compressed data"),
         "zstd": (["zstd", "-q", "-c"], "Zstandard compressed data")}


@pytest.mark.parametrize("kind", TOOLS)
def test_info_names_compressed_images(tmp_path, kind):
    command, words = TOOLS[kind]
    path = tmp_path / f"disk.{kind}"
    path.write_bytes(subprocess.run(command, input=DATA, capture_output=True, check=True).stdout)
    with served("-r", "file", str(path)) as srv:
        content = run([*PYNBD, "info", "--content", srv.uri]).stdout.decode()
    line = next(line for line in content.splitlines() if "content:" in line)
    assert words in line and f"serve it with --filter={kind}" in line, line
    with served("-r", f"--filter={kind}", "file", str(path)) as srv:  # served uncompressed: no hint
        content = run([*PYNBD, "info", "--content", srv.uri]).stdout.decode()
    assert "--filter=" not in content
