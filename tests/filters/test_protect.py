"""protect filter: EPERM for changes to protected bytes, identical writes allowed, like nbdkit."""

from __future__ import annotations

import pytest
from stack_helpers import BOTH, nbdsh_errno, nbdsh_outcomes

from nbdtest import PYNBD, nbdsh, run, served

CALLS = [
    "h.pwrite(b'a' * 100, 0)",            # inside 0-0x1ff: changes data
    "h.pwrite(bytes(100), 0)",            # same data as there: allowed
    "h.pwrite(b'b' * 100, 0x1c0)",        # straddles the end of the range
    "h.pwrite(b'c' * 100, 0x200)",        # just after: allowed
    "h.zero(512, 0)",                     # protected bytes already zero
    "h.trim(1024, 0)",                    # protected part is zero, the rest is free
    "h.pwrite(b'd' * 10, 0x10000)",       # second range 0x10000-0x1ffff (octal/hex parsing)
    "h.pwrite(b'e' * 10, 0x30000)",       # ~ complement keeps 0x30000.. protected
    "h.pwrite(b'f' * 10, 0x20000)",       # free gap
]
PARAMS = ["protect=0-0x1ff", "protect=0200000-0x1ffff", "protect=~0-0x2ffff"]


def test_results_match_nbdkit():
    results = []
    for server in BOTH:
        with served("--filter=protect", "memory", "1M", *PARAMS, server=server) as srv:
            results.append(nbdsh_outcomes(srv.uri, CALLS))
    assert results[0] == results[1]
    assert results[0] == ["EPERM", "ok", "EPERM", "ok", "ok", "ok", "EPERM", "EPERM", "ok"]


def test_refused_write_changes_nothing():
    with served("--filter=protect", "memory", "64K", "protect=4096-8191") as srv:
        assert nbdsh_errno(srv.uri, "h.pwrite(b'q' * 100, 4000)") == "EPERM"
        # the straddling write was refused as a whole: not even its unprotected head landed
        out = nbdsh(srv.uri, "print(h.pread(200, 3990).count(b'q'))")
        assert out.strip() == "0"
        assert nbdsh_errno(srv.uri, "h.zero(100, 4090)") == "ok"
        assert nbdsh_errno(srv.uri, "h.pwrite(b'q' * 96, 4000)") == "ok"


def test_qemu_io_write_to_protected_range_fails():
    with served("--filter=protect", "memory", "1M", "protect=0-65535") as srv:
        result = run(["qemu-io", "-f", "raw", "-c", "write -P 0x55 0 4k", srv.uri], check=False)
        assert b"Operation not permitted" in result.stdout + result.stderr
        ok = run(["qemu-io", "-f", "raw", "-c", "write -P 0x55 64k 4k", srv.uri]).stdout
        assert b"wrote 4096/4096" in ok


@pytest.mark.parametrize("param", ["protect=10", "protect=20-10", "protect=0x-5", "protect=abc-def"])
def test_bad_ranges_are_refused(param):
    result = run([*PYNBD, "serve", "--filter=protect", "memory", "1M", param], check=False)
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and f"protect: {param}:" in lines[0]
