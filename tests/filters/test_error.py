"""error filter: chosen errno per operation, rates, the trigger file, bad rates."""

from __future__ import annotations

import pytest
from stack_helpers import BOTH, nbdsh_errno, nbdsh_outcomes

from nbdtest import PYNBD, nbdsh, run, served

ALL_OPS = ("h.pread(512, 0)", "h.pwrite(b'x' * 512, 0)", "h.zero(512, 0)", "h.trim(512, 0)",
           "h.cache(512, 0)", "h.flush()")


def outcomes(uri: str) -> list[str]:
    return nbdsh_outcomes(uri, ALL_OPS)


def test_per_operation_errors_match_nbdkit():
    params = ["error=ENOSPC", "error-pwrite-rate=100%", "error-zero-rate=1", "error-cache-rate=1",
              "error-cache=EPERM"]
    results = []
    for server in BOTH:
        with served("--filter=error", "memory", "1M", *params, server=server) as srv:
            results.append(outcomes(srv.uri))
    assert results[0] == results[1] == ["ok", "ENOSPC", "ENOSPC", "ok", "EPERM", "ok"]


def test_error_rate_one_fails_everything_but_flush():
    with served("--filter=error", "memory", "1M", "error-rate=1") as srv:
        assert outcomes(srv.uri) == ["EIO"] * 5 + ["ok"]


def test_extents_errors():
    with served("--filter=error", "memory", "1M", "error-extents-rate=100%", "error-extents=ENOMEM") as srv:
        code = "h.block_status(4096, 0, lambda *a: 0)"
        result = run(["nbdsh", "--base-allocation", "-u", srv.uri, "-c", code], check=False)
        assert result.returncode != 0 and b"Cannot allocate memory" in result.stderr


def test_half_rate_fails_some_requests():
    with served("--filter=error", "memory", "1M", "error-pread-rate=50%") as srv:
        code = ("bad = 0\nfor i in range(200):\n    try: h.pread(1, 0)\n"
                "    except nbd.Error: bad += 1\nprint(bad)")
        failed = int(nbdsh(srv.uri, code))
    assert 20 < failed < 180  # 200 fair coin flips: anything else is astronomically unlikely


def test_error_file_turns_errors_on_and_off(tmp_path):
    trigger = tmp_path / "inject"
    with served("--filter=error", "memory", "1M", "error-rate=100%", f"error-file={trigger}") as srv:
        assert nbdsh_errno(srv.uri, "h.pread(512, 0)") == "ok"
        trigger.touch()
        assert nbdsh_errno(srv.uri, "h.pread(512, 0)") == "EIO"
        trigger.unlink()
        assert nbdsh_errno(srv.uri, "h.pread(512, 0)") == "ok"


@pytest.mark.parametrize("param", ["error-rate=1.5", "error-rate=150%", "error-rate=-0.1",
                                   "error-pwrite-rate=2"])
def test_rate_outside_zero_to_one_is_refused(param):
    result = run([*PYNBD, "serve", "--filter=error", "memory", "1M", param], check=False)
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1
    assert lines[0].endswith(f"error: {param}: the rate must be between 0 and 1 (or 0% and 100%)")


def test_unknown_errno_is_refused():
    result = run([*PYNBD, "serve", "--filter=error", "memory", "1M", "error=EFOO"], check=False)
    assert result.returncode == 1 and "EFOO" in result.stderr.decode()
