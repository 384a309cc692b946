"""pynbd cow show/commit/export: a persistent overlay into its base (file or NBD URI), and as a
qcow2 image that qemu-img info/check/compare/commit accept."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nbdtest import PYNBD, nbdsh, run, served

MiB = 1 << 20
SIZE = 3 * MiB + 4096  # a partial last block
EDITS = "; ".join([
    "h.pwrite(b'a' * 100, 70000)",
    "h.zero(3 * 65536, 4 * 65536)",
    "h.trim(65536, 20 * 65536)",
    f"h.pwrite(b'q' * 5000, {SIZE - 5000})",
    "h.pwrite(b'w' * 300000, 1000000)",
    "h.flush()",
])


@pytest.fixture
def edited(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(base, overlay, what the export served): a base and a persistent overlay with edits."""
    base, overlay, served_copy = tmp_path / "base.img", tmp_path / "changes.cow", tmp_path / "served.img"
    base.write_bytes(os.urandom(SIZE))
    with served("--filter=cow", "file", str(base), f"cow-file={overlay}") as srv:
        nbdsh(srv.uri, EDITS)
        run(["nbdcopy", srv.uri, str(served_copy)])
    return base, overlay, served_copy


def cow(*args: str, check: bool = True):
    return run([*PYNBD, "cow", *args], check=check)


def one_line_error(result) -> str:
    err = result.stderr.decode().strip()
    assert result.returncode == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_show(edited):
    _, overlay, _ = edited
    out = cow("show", str(overlay)).stdout.decode()
    assert f"size: {SIZE}" in out and "block size: 65536" in out
    assert "blocks: 12 (8 data, 4 zero)" in out and "base: sampled-sha256:" in out


def test_export_is_a_qcow2_image_backed_by_the_base(edited, tmp_path):
    base, overlay, served_copy = edited
    out = tmp_path / "out.qcow2"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        cow("export", overlay.name, out.name, "--backing", base.name)
    finally:
        os.chdir(cwd)
    info = run(["qemu-img", "info", "--output=json", str(out)]).stdout.decode()
    assert '"backing-filename": "base.img"' in info and '"backing-filename-format": "raw"' in info
    assert f'"virtual-size": {SIZE}' in info
    run(["qemu-img", "check", str(out)])
    run(["qemu-img", "compare", "-F", "raw", str(out), str(served_copy)])
    (tmp_path / "sub").mkdir()  # elsewhere, with an absolute backing file
    cow("export", str(overlay), str(tmp_path / "sub" / "x.qcow2"), "--backing", str(base))
    run(["qemu-img", "compare", "-F", "raw", str(tmp_path / "sub" / "x.qcow2"), str(served_copy)])
    # byte for byte through qemu-nbd, against the served export after a restart
    with served("--filter=cow", "file", str(base), f"cow-file={overlay}") as srv:
        run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", srv.uri, str(out)])
    run(["nbdcopy", "--", "[", "qemu-nbd", "-r", "-f", "qcow2", str(out), "]", str(tmp_path / "q.raw")])
    assert (tmp_path / "q.raw").read_bytes() == served_copy.read_bytes()
    original = base.read_bytes()
    run(["qemu-img", "commit", str(out)])
    assert base.read_bytes() == served_copy.read_bytes() != original


def test_commit_into_the_base_file(edited):
    base, overlay, served_copy = edited
    cow("commit", str(overlay), str(base))
    assert base.read_bytes() == served_copy.read_bytes()
    assert "blocks: 0 (0 data, 0 zero)" in cow("show", str(overlay)).stdout.decode()
    # the same server command line starts again and serves the committed base
    with served("--filter=cow", "file", str(base), f"cow-file={overlay}") as srv:
        assert nbdsh(srv.uri, "print(h.pread(100, 70000) == b'a' * 100)").strip() == "True"


@pytest.mark.parametrize("server", ["pynbd", "nbdkit"])
def test_commit_through_an_nbd_uri(edited, server):
    base, overlay, served_copy = edited
    with served("file", str(base), server=server) as srv:
        cow("commit", str(overlay), srv.uri)
    assert base.read_bytes() == served_copy.read_bytes()


def test_the_wrong_base_is_refused(edited, tmp_path):
    base, overlay, served_copy = edited
    other = tmp_path / "other.img"
    other.write_bytes(os.urandom(SIZE))
    before = overlay.read_bytes()
    assert "not the base" in one_line_error(cow("commit", str(overlay), str(other), check=False))
    assert "not the base" in one_line_error(
        cow("export", str(overlay), str(tmp_path / "o.qcow2"), "--backing", str(other), check=False))
    small = tmp_path / "small.img"
    small.write_bytes(bytes(4096))
    assert "4096 bytes" in one_line_error(cow("commit", str(overlay), str(small), check=False))
    assert overlay.read_bytes() == before and not (tmp_path / "o.qcow2").exists()
    cow("commit", "--force", str(overlay), str(other))  # as asked
    data = other.read_bytes()
    assert data[70000:70100] == b"a" * 100 and data[1000000:1300000] == b"w" * 300000


def test_bad_overlays(tmp_path, edited):
    base = edited[0]
    missing = one_line_error(cow("show", str(tmp_path / "nothing.cow"), check=False))
    assert "No such file" in missing
    junk = tmp_path / "junk.cow"
    junk.write_bytes(b"junk" * 5000)
    assert "not a pynbd chunk store" in one_line_error(cow("commit", str(junk), str(base), check=False))
    assert "not a pynbd chunk store" in one_line_error(
        cow("export", str(junk), str(tmp_path / "j.qcow2"), "--backing", str(base), check=False))
