"""tar filter: entries of GNU tar's archives served as nbdkit's tar filter serves them (bytes,
size, writes in place, stacked on gzip), and the entries it refuses, with one line each."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import tarfile

import pytest
from stack_helpers import BOTH, nbdsh_outcomes

from nbdtest import PYNBD, nbdsh, run, served

LONG = "dir/" + "n" * 120 + "/disk.img"
DISK = bytes(range(256)) * 5000 + b"odd tail"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tartree")
    (root / "readme.txt").write_bytes(b"read me\n")
    (root / "disk.img").write_bytes(DISK)
    (root / LONG).parent.mkdir(parents=True)
    (root / LONG).write_bytes(DISK[::-1])
    with open(root / "sparse.img", "wb") as f:
        f.truncate(1 << 20)
        f.seek(1 << 19)
        f.write(b"island")
    return root


def archive(tree, tmp_path, fmt: str, *options: str) -> str:
    out = str(tmp_path / f"{fmt}.tar")
    run(["tar", "-C", str(tree), f"--format={fmt}", *options, "-cf", out, "readme.txt",
         "disk.img", *([] if fmt == "ustar" else ["dir"])])
    return out


def served_bytes(*args: str, server: str) -> tuple[int, bytes]:
    with served(*args, server=server) as srv:
        out = nbdsh(srv.uri, "import sys; sys.stdout.write(h.pread(h.get_size(), 0).hex())")
    data = bytes.fromhex(out)
    return len(data), data


@pytest.mark.parametrize("fmt", ["gnu", "ustar", "pax"])
def test_entries_match_nbdkit(tree, tmp_path, fmt):
    tar = archive(tree, tmp_path, fmt)
    for entry in ["disk.img", "readme.txt"]:
        results = [served_bytes("-r", "file", tar, "--filter=tar", f"tar-entry={entry}",
                                server=server) for server in BOTH]
        assert results[0] == results[1]
        assert results[0][1] == (tree / entry).read_bytes()


@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_long_names_match_gnu_tar(tree, tmp_path, fmt):
    # (nbdkit 1.32 serves such an entry from the block after its *first* header, i.e. the
    # long name itself: GNU tar's extraction is the oracle here.)
    tar = archive(tree, tmp_path, fmt)
    size, data = served_bytes("-r", "file", tar, "--filter=tar", f"tar-entry={LONG}",
                              server="pynbd")
    assert data == run(["tar", "-xOf", tar, LONG]).stdout == DISK[::-1]


def test_writes_in_place_like_nbdkit(tree, tmp_path):
    tars = []
    calls = ["h.pwrite(b'W' * 1000, 100)", "h.pwrite(b'end', h.get_size() - 3)",
             "h.zero(4096, 5000)", "h.pwrite(b'x', h.get_size())"]
    for server in BOTH:
        tar = archive(tree, tmp_path, "gnu")
        copy = shutil.copy(tar, str(tmp_path / f"{server}.tar"))
        with served("file", copy, "--filter=tar", "tar-entry=disk.img", server=server) as srv:
            outcomes = nbdsh_outcomes(srv.uri, calls)
        tars.append(open(copy, "rb").read())
        assert outcomes[:3] == ["ok", "ok", "ok"] and outcomes[3] != "ok"
    assert tars[0] == tars[1]
    expected = bytearray(DISK)
    expected[100:1100] = b"W" * 1000
    expected[-3:] = b"end"
    expected[5000:9096] = bytes(4096)
    extracted = subprocess.run(["tar", "-xOf", "-", "disk.img"], input=tars[0],
                               capture_output=True, check=True).stdout
    assert extracted == bytes(expected)
    assert run(["tar", "-xOf", "-", "readme.txt"], input=tars[0]).stdout == b"read me\n"


@pytest.mark.parametrize("compressor", ["gzip", "xz"])
def test_stacked_on_a_decompressing_filter_like_nbdkit(tree, tmp_path, compressor):
    tar = archive(tree, tmp_path, "pax")
    if compressor == "gzip":
        with open(tar, "rb") as src, gzip.open(tar + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    else:
        run(["xz", "-k", "--block-size=65536", tar])
    packed = f"{tar}.{'gz' if compressor == 'gzip' else 'xz'}"
    results = [served_bytes("-r", "file", packed, "--filter=tar", f"--filter={compressor}",
                            "tar-entry=disk.img", server=server) for server in BOTH]
    assert results[0] == results[1] and results[0][1] == DISK
    size, data = served_bytes("-r", "file", packed, "--filter=tar", f"--filter={compressor}",
                              f"tar-entry={LONG}", server="pynbd")
    assert data == DISK[::-1]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
def test_entry_over_8_gib_like_nbdkit(tmp_path, fmt):
    # A sparse archive file: the header, then 9 GiB (+3) of data that costs no disk space.
    info = tarfile.TarInfo("huge.img")
    info.size = (9 << 30) + 3
    header = info.tobuf(fmt)
    path = tmp_path / "huge.tar"
    with open(path, "wb") as f:
        f.write(header)
        f.seek(len(header) + info.size - 5)
        f.write(b"LAST!")
        f.truncate(len(header) + info.size + 509 + 1024)
    script = "import sys; sys.stdout.write(str(h.get_size()) + ' ' + h.pread(5, h.get_size() - 5).hex())"
    outputs = []
    for server in BOTH:
        with served("-r", "file", str(path), "--filter=tar", "tar-entry=huge.img",
                    server=server) as srv:
            outputs.append(nbdsh(srv.uri, script))
    assert outputs[0] == outputs[1] == f"{info.size} {b'LAST!'.hex()}"


def test_qcow2_inside_a_tar(tree, tmp_path):
    (tmp_path / "raw.img").write_bytes(DISK + bytes(65536 - len(DISK) % 65536))
    run(["qemu-img", "convert", "-c", "-O", "qcow2", str(tmp_path / "raw.img"),
         str(tmp_path / "vm.qcow2")])
    run(["tar", "-C", str(tmp_path), "-cf", str(tmp_path / "vm.ova"), "raw.img", "vm.qcow2"])
    size, data = served_bytes("-r", "--filter=qcow2", "--filter=tar", "file",
                              str(tmp_path / "vm.ova"), "tar-entry=vm.qcow2", server="pynbd")
    assert data == (tmp_path / "raw.img").read_bytes()


@pytest.mark.parametrize("make, entry, message", [
    (lambda tree, tmp: archive(tree, tmp, "gnu"), "missing.img", "'missing.img' not found"),
    (lambda tree, tmp: archive(tree, tmp, "gnu"), "dir/", "'dir/' is a directory"),
    (lambda tree, tmp: archive(tree, tmp, "gnu"), LONG, "not found in the first 1024 bytes"),
    (lambda tree, tmp: sparse_archive(tree, tmp), "sparse.img", "'sparse.img' is a sparse file"),
    (lambda tree, tmp: gzipped(archive(tree, tmp, "gnu")), "disk.img",
     "gzip-compressed: put --filter=gzip"),
    (lambda tree, tmp: truncated(archive(tree, tmp, "gnu"), 4000), "disk.img",
     "runs past the end of the archive"),
    (lambda tree, tmp: corrupted(archive(tree, tmp, "gnu"), 1024 + 5), "disk.img",
     "bad header checksum at offset 1024"),
], ids=["missing", "directory", "limit", "sparse", "compressed", "truncated", "corrupt"])
def test_refused_with_one_clear_message(tree, tmp_path, make, entry, message):
    tar = make(tree, tmp_path)
    limit = 1024 if entry == LONG else 0
    with served("file", tar, "--filter=tar", f"tar-entry={entry}", f"tar-limit={limit}") as srv:
        for _ in range(2):  # refused each time; the server keeps running
            assert run(["nbdinfo", "--size", srv.uri], check=False).returncode != 0
        assert srv.proc.poll() is None
    log = srv.stderr()
    assert message in log and "Traceback" not in log, log


def sparse_archive(tree, tmp_path) -> str:
    out = str(tmp_path / "sparse.tar")
    run(["tar", "-C", str(tree), "--sparse", "-cf", out, "readme.txt", "sparse.img"])
    return out


def gzipped(path: str) -> str:
    with open(path, "rb") as src, gzip.open(path + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    return path + ".gz"


def truncated(path: str, size: int) -> str:
    with open(path, "r+b") as f:
        f.truncate(size)
    return path


def corrupted(path: str, offset: int) -> str:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff")
    return path


def test_tar_entry_is_required():
    result = run([*PYNBD, "serve", "--filter=tar", "memory", "1M"], check=False)
    err = result.stderr.decode()
    assert result.returncode == 1 and "tar-entry" in err and "Traceback" not in err, err
