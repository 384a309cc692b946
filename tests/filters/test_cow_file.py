"""cow filter, persistent overlay (cow-file=): restarts, a changed base, a corrupt store, and
SIGKILL during a write storm losing nothing that was flushed or written with FUA."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from stack_helpers import file_bytes

from crashtest import kill_during_storm
from nbdtest import PYNBD, nbdsh, run, served

KiB, MiB = 1 << 10, 1 << 20
PIECE = 4096
BLOCKS = 1024  # 4 MiB of 4 KiB pieces, inside 64 KiB overlay blocks: every write is partial


@pytest.fixture
def base(tmp_path: Path) -> str:
    path = tmp_path / "base.img"
    path.write_bytes(os.urandom(BLOCKS * PIECE))
    return str(path)


def digest(path: str) -> str:
    return hashlib.sha256(file_bytes(path)).hexdigest()


def test_restart_serves_the_same_data(base, tmp_path):
    overlay = str(tmp_path / "changes.cow")
    edits = "h.pwrite(b'a' * 100, 70000); h.zero(3 * 65536, 4 * 65536); h.trim(65536, 0); " \
            "h.pwrite(b'b' * 200000, 1000000); h.flush()"
    with served("--filter=cow", "file", base, f"cow-file={overlay}") as srv:
        nbdsh(srv.uri, edits)
        run(["nbdcopy", srv.uri, str(tmp_path / "first")])
        first_map = run(["nbdinfo", "--map", srv.uri]).stdout
    with served("--filter=cow", "file", base, f"cow-file={overlay}") as srv:
        run(["nbdcopy", srv.uri, str(tmp_path / "second")])
        assert run(["nbdinfo", "--map", srv.uri]).stdout == first_map
    assert digest(str(tmp_path / "first")) == digest(str(tmp_path / "second"))
    data = file_bytes(str(tmp_path / "second"))
    assert data[70000:70100] == b"a" * 100 and data[:65536] == bytes(65536)
    assert data[1000000:1200000] == b"b" * 200000


def refused(args: list[str]) -> str:
    """Start a server that must refuse to start; its one line of error."""
    result = run([*PYNBD, "serve", "-f", "-U", "/nonexistent/sock", *args], check=False)
    err = result.stderr.decode().strip()
    assert result.returncode == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_changed_base_is_refused_and_the_overlay_untouched(base, tmp_path):
    overlay = str(tmp_path / "changes.cow")
    with served("--filter=cow", "file", base, f"cow-file={overlay}") as srv:
        nbdsh(srv.uri, "h.pwrite(b'a' * 100, 70000); h.flush()")
    before = digest(overlay)
    with open(base, "r+b") as f:  # rewritten at the start
        f.write(os.urandom(4096))
    assert "made for another disk" in refused(["--filter=cow", "file", base, f"cow-file={overlay}"])
    assert digest(overlay) == before
    other = tmp_path / "bigger.img"
    other.write_bytes(file_bytes(base) + bytes(65536))  # resized
    err = refused(["--filter=cow", "file", str(other), f"cow-file={overlay}"])
    assert "size" in err and err.startswith("pynbd: error: cow:")
    assert "cow-block-size" not in err
    err = refused(["--filter=cow", "file", base, f"cow-file={overlay}", "cow-block-size=4k"])
    assert "chunk size 65536" in err
    assert digest(overlay) == before


def test_a_corrupt_store_is_refused(base, tmp_path):
    overlay = tmp_path / "changes.cow"
    with served("--filter=cow", "file", base, f"cow-file={overlay}") as srv:
        nbdsh(srv.uri, "h.pwrite(b'a' * 100, 70000); h.flush()")
    with open(overlay, "r+b") as f:
        f.write(os.urandom(8192))  # both copies of the header
    assert "corrupt" in refused(["--filter=cow", "file", base, f"cow-file={overlay}"])
    overlay.write_bytes(b"this is not a chunk store" * 1000)
    assert "not a pynbd chunk store" in refused(["--filter=cow", "file", base, f"cow-file={overlay}"])


def test_only_the_default_export_is_persistent(tmp_path):
    with served("--filter=cow", "pattern", "4M", f"cow-file={tmp_path / 'c.cow'}") as srv:
        result = run(["nbdinfo", f"nbd+unix:///other?socket={srv.socket}"], check=False)
        assert result.returncode != 0 and b"for export: other" in result.stderr  # refused
        assert nbdsh(srv.uri, "print(h.get_size())").strip() == str(BLOCKS * PIECE)


def test_full_file_system_gives_enospc(base, small_tmpfs):
    overlay = small_tmpfs / "changes.cow"
    with served("--filter=cow", "file", base, f"cow-file={overlay}") as srv:
        code = "\n".join([
            "import errno",
            "h.pwrite(b'k' * 4096, 0); h.flush()",
            "try:",
            "    for i in range(1, 64): h.pwrite(bytes([i]) * 65536, i * 65536)",
            "    print('no error')",
            "except nbd.Error as e:",
            "    print(errno.errorcode.get(e.errno, e.errno))",
            "h.flush()",
            "print(h.pread(2, 0).hex())",
        ])
        assert nbdsh(srv.uri, code).split() == ["ENOSPC", "6b6b"]
    # what was flushed is there after a restart
    with served("--filter=cow", "file", base, f"cow-file={overlay}") as srv:
        assert nbdsh(srv.uri, "print(h.pread(4096, 0) == b'k' * 4096)").strip() == "True"


# ---------------------------------------------------------------- SIGKILL during a write storm

def test_sigkill_during_a_write_storm_loses_nothing_durable(base, tmp_path):
    overlay = str(tmp_path / "changes.cow")
    original = file_bytes(base)
    kill_during_storm(tmp_path, lambda: served("--filter=cow", "file", base, f"cow-file={overlay}"),
                      lambda srv: srv.uri, original, rounds=3, seed=1234)
    assert file_bytes(base) == original


@pytest.mark.skipif(shutil.which("fio") is None, reason="needs fio")
def test_fio_verify_on_a_persistent_overlay(tmp_path):
    """Four connections at depth 32 with partial blocks, through the chunk store."""
    with served("--filter=cow", "pattern", "8M", f"cow-file={tmp_path / 'c.cow'}") as srv:
        job = ["fio", "--name=verify", "--ioengine=nbd", f"--uri={srv.uri}", "--rw=randwrite",
               "--bsrange=512-24k", "--bs_unaligned=1", "--size=2000k", "--offset_increment=2000k",
               "--numjobs=4", "--iodepth=32", "--verify=crc32c", "--do_verify=1", "--fsync=16",
               "--verify_fatal=1", "--verify_state_save=0", "--group_reporting",
               "--output-format=json"]
        result = run(job, timeout=120)
    report = json.loads(result.stdout[result.stdout.index(b"{"):])["jobs"][0]
    assert report["error"] == 0 and report["read"]["io_bytes"] > 3 * 2000 * KiB
