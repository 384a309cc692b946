"""truncate filter: sizes, the zero tail, writes past the real end — compared with nbdkit."""

from __future__ import annotations

import json

import pytest
from stack_helpers import BOTH, nbdsh_outcomes

from nbdtest import PYNBD, nbdsh, run, served


@pytest.mark.parametrize("params", [
    ["truncate=1000"], ["truncate=5000"], ["round-up=512"], ["round-down=512"],
    ["truncate=3000", "round-up=1024"], ["truncate=0"],
])
def test_size_matches_nbdkit(params):
    sizes = []
    for server in BOTH:
        with served("--filter=truncate", "pattern", "3333", *params, server=server) as srv:
            sizes.append(json.loads(run(["nbdinfo", "--json", srv.uri]).stdout)["exports"][0]["export-size"])
    assert sizes[0] == sizes[1]


def test_bytes_and_map_match_nbdkit_when_grown():
    outputs = []
    script = "import sys; sys.stdout.write(h.pread(h.get_size(), 0).hex())"
    for server in BOTH:
        with served("--filter=truncate", "pattern", "3000", "truncate=8192", server=server) as srv:
            outputs.append((nbdsh(srv.uri, script), run(["nbdinfo", "--map", srv.uri]).stdout))
    assert outputs[0] == outputs[1]
    data = bytes.fromhex(outputs[0][0])
    assert len(data) == 8192 and data[3000:] == bytes(5192) and data[:8] == bytes(8)


def test_writes_past_the_real_end():
    for server in BOTH:
        with served("--filter=truncate", "memory", "1000", "truncate=2000", server=server) as srv:
            assert nbdsh_outcomes(srv.uri, [
                "h.pwrite(b'x' * 100, 1500)", "h.pwrite(b'x' * 100, 950)", "h.pwrite(bytes(100), 1500)",
                "h.zero(1000, 900)", "h.pwrite(b'y' * 50, 950)",
            ]) == ["ENOSPC", "ENOSPC", "ok", "ok", "ok"]
            assert nbdsh(srv.uri, "print(h.pread(60, 960).hex())").strip() == (b"y" * 40 + bytes(20)).hex()


@pytest.mark.parametrize("param", ["round-up=0", "round-down=1000"])
def test_rounding_must_be_a_power_of_two(param):
    result = run([*PYNBD, "serve", "--filter=truncate", "memory", "1M", param], check=False)
    assert result.returncode == 1 and "must be a power of 2" in result.stderr.decode()
