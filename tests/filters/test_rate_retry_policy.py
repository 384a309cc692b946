"""rate (bandwidth), retry-request (a failing request retried) and
blocksize-policy (sizes advertised, requests refused) — compared with nbdkit."""

from __future__ import annotations

import json
import time

import pytest
from stack_helpers import BOTH, nbdsh_outcomes

from nbdtest import PYNBD, nbdsh, run, served
from pynbd.proto.constants import DEFAULT_MAX_PAYLOAD

COPY = "h.pread(1 << 20, 0)\nh.pread(1 << 20, 1 << 20)"


@pytest.mark.parametrize("server", BOTH)
def test_rate_limits_reads(server):
    # 8 Mbit/s with a 1 s burst: 2 MiB take about 1 s after the burst's 1 MiB.
    with served("--filter=rate", "memory", "4M", "rate=8M", "burstiness=1", server=server) as srv:
        start = time.monotonic()
        nbdsh(srv.uri, COPY)
        elapsed = time.monotonic() - start
    assert elapsed >= 0.9


def test_rate_file_changes_the_rate(tmp_path):
    rate_file = tmp_path / "rate"
    rate_file.write_text("1G\n")
    with served("--filter=rate", "memory", "4M", f"connection-rate-file={rate_file}",
                "burstiness=1") as srv:
        start = time.monotonic()
        nbdsh(srv.uri, COPY)
        assert time.monotonic() - start < 0.9  # 1 Gbit/s: no wait worth the name
        rate_file.write_text("8M\n")
        start = time.monotonic()
        nbdsh(srv.uri, COPY)
        assert time.monotonic() - start >= 0.9


FAILS_TWICE = """#!/bin/sh
case "$1" in
  get_size) echo 1048576 ;;
  pread)
    n=$(cat {counter} 2>/dev/null || echo 0)
    echo $((n + 1)) > {counter}
    if [ "$n" -lt 2 ]; then echo EIO injected >&2; exit 1; fi
    head -c "$3" /dev/zero ;;
  *) exit 2 ;;
esac
"""


@pytest.mark.parametrize("server", BOTH)
def test_retry_request_retries_a_failing_read(tmp_path, server):
    counter = tmp_path / "count"
    script = tmp_path / "flaky.sh"
    script.write_text(FAILS_TWICE.format(counter=counter))
    script.chmod(0o755)
    with served("--filter=retry-request", "sh", str(script), "retry-request-delay=1",
                server=server) as srv:
        assert nbdsh(srv.uri, "print(len(h.pread(512, 0)))").strip() == "512"
    assert counter.read_text().strip() == "3"
    counter.unlink()
    with served("--filter=retry-request", "sh", str(script), "retry-request-retries=1",
                "retry-request-delay=1", server=server) as srv:
        assert nbdsh_outcomes(srv.uri, ["h.pread(512, 0)"]) == ["EIO"]


@pytest.mark.parametrize("params", [
    ["blocksize-preferred=32K"], ["blocksize-minimum=4K"],
    ["blocksize-minimum=512", "blocksize-preferred=4K", "blocksize-maximum=1M"],
])
def test_policy_sizes_match_nbdkit(params):
    # (not without parameters: pynbd's server advertises sizes of its own where nbdkit advertises none)
    sizes = []
    for server in BOTH:
        with served("--filter=blocksize-policy", "memory", "1M", *params, server=server) as srv:
            info = json.loads(run(["nbdinfo", "--json", srv.uri]).stdout)["exports"][0]
            sizes.append([info.get(k) for k in ("block_size_minimum", "block_size_preferred",
                                                 "block_size_maximum")])
    ours, theirs = sizes
    assert ours == [*theirs[:2], min(theirs[2], DEFAULT_MAX_PAYLOAD)]


def test_policy_errors_match_nbdkit():
    calls = ["h.pread(512, 0)", "h.pread(4096, 512)", "h.pread(8192, 0)", "h.pwrite(bytes(1024), 0)",
             "h.zero(4096, 0)", "h.trim(4096, 4096)", "h.pread(4096, 4096)"]
    outcomes = []
    for server in BOTH:
        with served("--filter=blocksize-policy", "memory", "1M", "blocksize-minimum=4K",
                    "blocksize-maximum=4K", "blocksize-error-policy=error", server=server) as srv:
            outcomes.append(nbdsh_outcomes(srv.uri, calls))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0] == ["EINVAL", "EINVAL", "EINVAL", "EINVAL", "ok", "ok", "ok"]


def test_policy_write_disconnect():
    with served("--filter=blocksize-policy", "memory", "1M", "blocksize-write-disconnect=64K") as srv:
        assert nbdsh_outcomes(srv.uri, ["h.pwrite(bytes(65536), 0)"]) == ["ok"]
        result = run(["nbdsh", "-u", srv.uri, "-c", "h.pwrite(bytes(131072), 0)"], check=False)
        assert result.returncode != 0
        assert nbdsh_outcomes(srv.uri, ["h.pread(512, 0)"]) == ["ok"]  # others still served


@pytest.mark.parametrize("param, message", [
    ("blocksize-minimum=3", "power of 2"), ("blocksize-preferred=128", "between 512 and 32M"),
    ("blocksize-error-policy=maybe", "not one of"),
])
def test_policy_bad_values_are_one_line(param, message):
    result = run([*PYNBD, "serve", "--filter=blocksize-policy", "memory", "1M", param], check=False)
    err = result.stderr.decode()
    assert result.returncode == 1 and message in err and "Traceback" not in err


@pytest.mark.parametrize("flt, param, message", [
    ("rate", "rate=fast", "rate"), ("rate", "burstiness=soon", "burstiness"),
    ("retry-request", "retry-request-retries=-1", "retry-request-retries"),
    ("retry-request", "retry-request-delay=-2", "retry-request-delay"),
    ("time-limit", "time-limit=0", "time-limit"), ("limit", "limit=-1", "limit"),
    ("exitwhen", "exit-when-poll=0", "exit-when-poll"),
])
def test_more_bad_values_are_one_line(flt, param, message):
    result = run([*PYNBD, "serve", f"--filter={flt}", "memory", "1M", param], check=False)
    err = result.stderr.decode()
    assert result.returncode == 1 and message in err and "Traceback" not in err, err
