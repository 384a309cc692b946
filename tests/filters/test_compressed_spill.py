"""The gzip and xz filters keep what they decode in an unlinked temporary file.

Each gzip span / xz block is decoded once (also by concurrent readers), later
reads are preads of the file, the file is never visible in $TMPDIR, and a
full $TMPDIR falls back to decoding on each read with the right bytes.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import pytest
from compressed_images import compress, mixed_image

from nbdtest import nbdsh, run, served
from pynbd.filters.gzip import DecodedCache, SpillCache, Step

MiB = 1 << 20
DATA = mixed_image(5 * MiB)
KINDS = {"gzip": "gzip", "xz": "xz-blocks"}
NO_PREFETCH = {"gzip": ["gzip-prefetch=false"], "xz": []}


def env_with_tmpdir(path: str) -> dict[str, str]:
    return {**os.environ, "TMPDIR": path}


def counting_decoder(data: bytes, calls: list[int]) -> Callable[[], Step]:
    """A piece's decoder over ``data`` that counts how often it is started (and is slow)."""
    def start() -> Step:
        calls.append(1)
        done = 0

        def step(view: memoryview) -> int:
            nonlocal done
            time.sleep(0.01)
            n = min(len(view), len(data) - done)
            view[:n] = data[done:done + n]
            done += n
            return n
        return step
    return start


def test_a_piece_is_decoded_once_by_concurrent_readers():
    pieces = [DATA[:MiB], DATA[MiB:3 * MiB]]
    cache = SpillCache("test", 3 * MiB, 2, DecodedCache("test", 1))
    calls: list[list[int]] = [[], []]
    results: dict[tuple[int, int], bytes] = {}

    def reader(key: int, inner: int) -> None:
        buf = memoryview(bytearray(4096))
        cache.copy(key, key * MiB, len(pieces[key]), counting_decoder(pieces[key], calls[key]), buf, inner)
        results[key, inner] = bytes(buf)

    threads = [threading.Thread(target=reader, args=(key, inner))
               for key in (0, 1) for inner in range(0, 8 * 65536, 65536)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [len(c) for c in calls] == [1, 1]  # each piece decoded once
    for (key, inner), got in results.items():
        assert got == pieces[key][inner:inner + 4096]


@pytest.mark.parametrize("kind", KINDS)
def test_decoded_once_kept_in_an_unlinked_file(tmp_path, kind):
    path = compress(tmp_path, DATA, KINDS[kind])
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    reads = "\n".join(f"h.pread(4096, {o})" for o in (0, 4096, 100000, 2 * MiB, 2 * MiB + 512, 0))
    env = env_with_tmpdir(str(tmpdir))
    with served("-r", f"--filter={kind}", "file", path, *NO_PREFETCH[kind], options=["-v"], env=env) as srv:
        # several clients at once, all reading the same pieces
        clients = [threading.Thread(target=nbdsh, args=(srv.uri, reads)) for _ in range(4)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        assert run(["nbdcopy", srv.uri, "-"]).stdout == DATA
        assert os.listdir(tmpdir) == []  # unlinked at once
        fds = [os.readlink(f"/proc/{srv.proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{srv.proc.pid}/fd")]
        assert any(link.startswith(str(tmpdir)) and link.endswith("(deleted)") for link in fds), fds
    log = srv.stderr()
    kept = [line.split("piece ")[1].split(" ")[0] for line in log.splitlines()
            if "decoded into the temporary file" in line]
    assert kept and len(kept) == len(set(kept)), kept  # every piece decoded once
    assert "Traceback" not in log


def test_gzip_prefetch_keeps_what_indexing_decodes(tmp_path):
    path = compress(tmp_path, DATA, "gzip")
    with served("-r", "--filter=gzip", "file", path, options=["-v"]) as srv:
        for _ in range(2):
            assert run(["nbdcopy", srv.uri, "-"]).stdout == DATA
    log = srv.stderr()
    assert f"the whole image ({len(DATA)} bytes) is in the temporary file" in log
    assert "decoded into the temporary file" not in log  # no read decoded anything


@pytest.mark.parametrize("kind, params", [("gzip", []), ("gzip", ["gzip-prefetch=false"]), ("xz", [])])
def test_full_tmpdir_decodes_on_each_read(tmp_path, small_tmpfs, kind, params):
    path = compress(tmp_path, DATA, KINDS[kind])
    env = env_with_tmpdir(str(small_tmpfs))
    with served("-r", f"--filter={kind}", "file", path, *params, env=env) as srv:
        for _ in range(2):
            assert run(["nbdcopy", srv.uri, "-"]).stdout == DATA
        tail = nbdsh(srv.uri, f"print(h.pread(70000, {len(DATA) - 70000}).hex())")
        assert bytes.fromhex(tail) == DATA[-70000:]
    log = srv.stderr()
    assert "cannot keep decoded data in a temporary file" in log and "Traceback" not in log
    assert log.count("cannot keep decoded data") == 1



def test_a_failed_read_below_fails_that_read_only(tmp_path):
    path = compress(tmp_path, DATA, "gzip")
    trigger = tmp_path / "inject"
    with served("-r", "--filter=gzip", "--filter=error", "file", path, "gzip-prefetch=false",
                "error-pread-rate=100%", f"error-file={trigger}") as srv:
        assert nbdsh(srv.uri, "print(len(h.pread(4096, 0)))").strip() == "4096"  # opened, indexed
        trigger.touch()
        failed = run(["nbdsh", "-u", srv.uri, "-c", f"h.pread(4096, {3 * MiB})"], check=False)
        assert failed.returncode != 0
        trigger.unlink()
        assert run(["nbdcopy", srv.uri, "-"]).stdout == DATA
    log = srv.stderr()
    assert "cannot keep decoded data" not in log and "Traceback" not in log
