"""scan (prefetches seen below, compared with nbdkit), ddrescue (reads of
unrescued blocks fail, compared with nbdkit) and evil (corruption that is
repeatable for a seed, and writes untouched)."""

from __future__ import annotations

import pytest
from stack_helpers import BOTH, log_lines, nbdsh_outcomes

from nbdtest import PYNBD, nbdsh, run, served


def caches(logfile) -> list[str]:
    return sorted(" ".join(w for w in line.split() if w.startswith(("offset=", "count=")))
                  for line in log_lines(str(logfile)) if " Cache " in line)


def test_scan_prefetches_the_disk_like_nbdkit(tmp_path):
    seen = []
    for server in BOTH:
        logfile = tmp_path / f"{server}.log"
        with served("--filter=scan", "--filter=log", "file", str(tmp_path / "disk"),
                    f"logfile={logfile}", "scan-size=1M", server=server) as srv:
            code = ("import time\n"
                    "deadline = time.monotonic() + 30\n"
                    f"log = {str(logfile)!r}\n"
                    "while open(log).read().count(' Cache ') < 8 and time.monotonic() < deadline:\n"
                    "    time.sleep(0.02)\n")
            nbdsh(srv.uri, code)
        seen.append(caches(logfile))
    assert seen[0] == seen[1] and len(seen[0]) == 8


@pytest.fixture(autouse=True)
def disk(tmp_path):
    (tmp_path / "disk").write_bytes(bytes(range(256)) * 4096 * 8)  # 8 MiB


def test_scan_bad_size_is_one_line():
    result = run([*PYNBD, "serve", "--filter=scan", "memory", "1M", "scan-size=1000"], check=False)
    err = result.stderr.decode()
    assert result.returncode == 1 and "scan-size=1000" in err and "Traceback" not in err


MAPFILE = """# Mapfile. Created by GNU ddrescue version 1.27
# current_pos  current_status  current_pass
0x00100000     +               1
#      pos        size  status
0x00000000  0x00010000  +
0x00010000  0x00001000  -
0x00011000  0x000EF000  +
"""


def test_ddrescue_matches_nbdkit(tmp_path):
    mapfile = tmp_path / "disk.map"
    mapfile.write_text(MAPFILE)
    calls = ["h.pread(4096, 0)", "h.pread(4096, 0x10000)", "h.pread(8192, 0xF000)",
             "h.pread(4096, 0x11000)", "h.pread(4096, 0x100000)", "h.pwrite(b'x', 0)"]
    outcomes = []
    for server in BOTH:
        with served("--filter=ddrescue", "file", str(tmp_path / "disk"), f"ddrescue-mapfile={mapfile}",
                    server=server) as srv:
            outcomes.append(nbdsh_outcomes(srv.uri, calls))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][:5] == ["ok", "EIO", "EIO", "ok", "EIO"] and outcomes[0][5] != "ok"


def test_ddrescue_missing_mapfile_is_one_line(tmp_path):
    result = run([*PYNBD, "serve", "--filter=ddrescue", "memory", "1M",
                  f"ddrescue-mapfile={tmp_path}/none"], check=False)
    err = result.stderr.decode()
    assert result.returncode == 1 and "ddrescue" in err and "Traceback" not in err


READ_ALL = "import sys, hashlib; print(hashlib.sha256(h.pread(h.get_size(), 0)).hexdigest())"


@pytest.mark.parametrize("mode", ["stuck-bits", "stuck-wires"])
def test_evil_stuck_is_repeatable_for_a_seed(tmp_path, mode):
    with served("file", str(tmp_path / "disk")) as srv:
        clean = nbdsh(srv.uri, READ_ALL)
    digests = []
    for seed in ("1", "1", "2"):
        with served("--filter=evil", "file", str(tmp_path / "disk"), f"evil={mode}",
                    "evil-probability=1e-5", f"evil-seed={seed}") as srv:
            digests.append(nbdsh(srv.uri, READ_ALL))
    assert digests[0] == digests[1] != digests[2] and clean not in digests


def test_evil_cosmic_rays_differ_each_read_and_writes_are_clean(tmp_path):
    with served("--filter=evil", "file", str(tmp_path / "disk"), "evil=cosmic-rays",
                "evil-probability=1:1000") as srv:
        out = nbdsh(srv.uri, "a = h.pread(65536, 0); b = h.pread(65536, 0); print(a != b)\n"
                             "h.pwrite(bytes(4096), 0)")
    assert out.strip() == "True"
    assert (tmp_path / "disk").read_bytes()[:4096] == bytes(4096)


@pytest.mark.parametrize("param", ["evil-probability=2", "evil-stuck-probability=x", "evil=gamma-rays"])
def test_evil_bad_values_are_one_line(param):
    result = run([*PYNBD, "serve", "--filter=evil", "memory", "1M", param], check=False)
    err = result.stderr.decode()
    assert result.returncode == 1 and "evil" in err and "Traceback" not in err
