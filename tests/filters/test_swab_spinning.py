"""swab (bytes compared with nbdkit's), spinning (seek delays), count (totals in the log)."""

from __future__ import annotations

import json

import pytest
from stack_helpers import BOTH, nbdsh_outcomes

from nbdtest import PYNBD, nbdsh, run, served

READ = "import sys; sys.stdout.write(h.pread(4096, 8192).hex())"


@pytest.mark.parametrize("bits", ["16", "32", "64"])
def test_swab_reads_and_writes_match_nbdkit(bits):
    outputs = []
    script = ("h.pwrite(bytes(range(256)) * 16, 8192)\n"
              "print(h.pread(4096, 8192).hex(), h.get_size(), h.pread(64, 0).hex())")
    for server in BOTH:
        with served("--filter=swab", "--filter=cow", "pattern", "1000001", f"swab-bits={bits}",
                    server=server) as srv:
            outputs.append(nbdsh(srv.uri, script))
    assert outputs[0] == outputs[1]
    data, size, head = outputs[0].split()
    assert bytes.fromhex(data) == bytes(range(256)) * 16 and int(size) % (int(bits) // 8) == 0
    word = int(bits) // 8
    eight = (8).to_bytes(8, "big")  # the pattern plugin's bytes at offset 8, swapped per word
    assert bytes.fromhex(head)[8:16] == b"".join(eight[i:i + word][::-1] for i in range(0, 8, word))


@pytest.mark.parametrize("bits", ["16", "32", "64"])
def test_swab_extents_aligned_like_nbdkit(tmp_path, bits):
    listing = tmp_path / "extents"
    listing.write_text("0 5\n5 7 hole,zero\n12 21 hole,zero\n33 3\n36 4060 zero\n")
    maps = []
    for server in BOTH:
        with served("--filter=swab", "--filter=extentlist", "memory", "64K", f"swab-bits={bits}",
                    f"extentlist={listing}", server=server) as srv:
            maps.append(run(["nbdinfo", "--map", srv.uri]).stdout)
    assert maps[0] == maps[1]


def test_swab_bits_8_changes_nothing():
    # (not compared: nbdkit 1.32 writes an uninitialised buffer with swab-bits=8)
    with served("--filter=swab", "memory", "1M", "swab-bits=8") as srv:
        out = nbdsh(srv.uri, "h.pwrite(b'abcd', 4); print(bytes(h.pread(4, 4)))")
    assert out.strip() == "b'abcd'"


def test_swab_refuses_unaligned_requests_like_nbdkit():
    outcomes = []
    for server in BOTH:
        with served("--filter=swab", "memory", "1M", "swab-bits=32", server=server) as srv:
            outcomes.append(nbdsh_outcomes(srv.uri, ["h.pread(3, 0)", "h.pwrite(b'ab', 4)",
                                                     "h.zero(4, 2)", "h.pread(8, 4)"]))
    assert outcomes[0] == outcomes[1] == ["EINVAL", "EINVAL", "EINVAL", "ok"]


def test_swab_bad_bits_is_one_line():
    result = run([*PYNBD, "serve", "--filter=swab", "memory", "1M", "swab-bits=24"], check=False)
    err = result.stderr.decode()
    assert result.returncode == 1 and "swab-bits=24" in err and "Traceback" not in err


def test_spinning_delays_long_seeks_only():
    with served("--filter=spinning", "memory", "64M", "min-seek-time=0", "half-seek-time=0.25",
                "max-seek-time=0.5") as srv:
        info = json.loads(run(["nbdinfo", "--json", srv.uri]).stdout)["exports"][0]
        assert info["is_rotational"] is True and info["can_multi_conn"] is False
        out = nbdsh(srv.uri, """
import time
t = time.monotonic(); [h.pread(4096, i * 4096) for i in range(16)]; near = time.monotonic() - t
t = time.monotonic(); h.pread(4096, 64 * 1024 * 1024 - 4096); far = time.monotonic() - t
print(near, far)
""")
    near, far = map(float, out.split())
    assert far >= 0.45 and near < far


def test_spinning_heads_out_of_range():
    result = run([*PYNBD, "serve", "--filter=spinning", "memory", "1M", "heads=65"], check=False)
    err = result.stderr.decode()
    assert result.returncode == 1 and "heads must be in the range" in err and "Traceback" not in err


def test_count_logs_totals_at_exit():
    with served("--filter=count", "memory", "1M", options=["-v"]) as srv:
        nbdsh(srv.uri, "h.pwrite(b'x' * 4096, 0); h.pread(8192, 0); h.zero(512, 0); h.trim(1024, 0)")
        nbdsh(srv.uri, "h.pread(100, 0)")
        proc = srv.proc
    proc.wait(timeout=30)
    assert "count: bytes read: 8292 written: 4096 zeroed: 512 trimmed: 1024" in proc.stderr.read().decode()
