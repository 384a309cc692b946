"""fua, nozero, noextents and noparallel: what reaches the layer below, compared with nbdkit.

Each test puts the log filter under the filter being tested and runs the same
client against pynbd and nbdkit: the logs must match line for line.
"""

from __future__ import annotations

import json

import pytest
from stack_helpers import BOTH, log_lines, nbdsh_outcomes

from nbdtest import run, served

FUA_SCRIPT = """
fua = nbd.CMD_FLAG_FUA if h.can_fua() else 0
h.pwrite(b"a" * 512, 0, fua)
h.pwrite(b"b" * 512, 512)
h.zero(4096, 4096, fua)
h.trim(4096, 65536, fua)
if h.can_flush():
    h.flush()
print(h.can_fua(), h.can_flush())
"""

ZERO_SCRIPT = """
h.pwrite(b"a" * 8192, 0)
for flags in (0, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FAST_ZERO):
    if not h.can_zero() or (flags & nbd.CMD_FLAG_FAST_ZERO and not h.can_fast_zero()):
        continue
    try:
        h.zero(4096, 0, flags)
    except nbd.Error as e:
        print("zero failed", e.errno)
print(h.can_zero(), h.can_fast_zero(), h.pread(4, 0))
"""


def run_both(tmp_path, script: str, *stack: str, nbdsh_options=()) -> list[tuple[str, list[str]]]:
    """(client output, log below the filter) for pynbd then nbdkit."""
    results = []
    for server in BOTH:
        logfile = tmp_path / f"{server}.log"
        with served(*stack, f"logfile={logfile}", server=server) as srv:
            out = run(["nbdsh", *nbdsh_options, "-u", srv.uri, "-c", script]).stdout.decode()
        results.append((out, log_lines(str(logfile))))
    return results


@pytest.mark.parametrize("mode", ["none", "emulate", "native", "force", "pass", "discard"])
def test_fua_modes_match_nbdkit(tmp_path, mode):
    param = [] if mode == "none" else [f"fuamode={mode}"]  # nbdkit 1.32 only knows "none" as the default
    ours, theirs = run_both(tmp_path, FUA_SCRIPT, "--filter=fua", "--filter=log", "memory", "1M", *param)
    assert ours == theirs
    writes = [line for line in ours[1] if " Write " in line]
    if mode == "force":
        assert all("fua=1" in line for line in writes)
    if mode in ("none", "discard", "emulate"):
        assert all("fua=0" in line for line in writes)
    flushes = sum(" Flush " in line for line in ours[1])
    assert flushes == {"none": 1, "emulate": 4, "native": 1, "force": 0, "pass": 1, "discard": 0}[mode]


@pytest.mark.parametrize("server", BOTH)
def test_fua_native_needs_fua_below(server):
    with served("--filter=fua", "pattern", "1M", "fuamode=native", server=server) as srv:
        assert run(["nbdinfo", srv.uri], check=False).returncode != 0


@pytest.mark.parametrize("params", [
    ["zeromode=none"], ["zeromode=emulate"], ["zeromode=notrim"], ["zeromode=plugin"],
    ["zeromode=emulate", "fastzeromode=ignore"], ["zeromode=plugin", "fastzeromode=slow"],
    ["zeromode=plugin", "fastzeromode=none"],
])
def test_nozero_modes_match_nbdkit(tmp_path, params):
    ours, theirs = run_both(tmp_path, ZERO_SCRIPT, "--filter=nozero", "--filter=log", "memory",
                            "1M", *params)
    assert ours == theirs
    if params == ["zeromode=emulate"]:
        assert not any(" Zero " in line for line in ours[1])
        assert "zero failed ENOTSUP" in ours[0]
    if params == ["zeromode=notrim"]:
        assert all("trim=0" in line for line in ours[1] if " Zero " in line)


def test_noextents_reports_all_data():
    maps = []
    for server in BOTH:
        with served("--filter=noextents", "memory", "1M", server=server) as srv:
            maps.append(run(["nbdinfo", "--map", srv.uri]).stdout)
    assert maps[0] == maps[1] == b"         0     1048576    0  data\n"
    with served("memory", "1M") as srv:  # without the filter the disk is one hole
        assert b"hole" in run(["nbdinfo", "--map", srv.uri]).stdout


PARALLEL_READS = """
for i in range(6):
    h.aio_pread(nbd.Buffer(512), i * 512)
while h.aio_in_flight() > 0:
    h.poll(-1)
"""


def max_in_flight(logfile) -> int:
    """The most requests that were between their two log lines at once."""
    busy = peak = 0
    for line in log_lines(str(logfile)):
        action = line.split()[1] if line.startswith("connection=") else ""
        if action == "Read":
            busy += 1
            peak = max(peak, busy)
        elif action == "...Read":
            busy -= 1
    return peak


@pytest.mark.parametrize("stack, serial", [
    (["--filter=noparallel"], True),
    (["--filter=noparallel", "serialize=all-requests"], True),
    ([], False),
])
def test_noparallel_serializes_requests(tmp_path, stack, serial):
    logfile = tmp_path / "log"
    filters = [s for s in stack if s.startswith("--")]
    params = [s for s in stack if not s.startswith("--")]
    # unserialized, the six reads overlap unless the client sends each one more
    # than a whole delay after the last: make that delay long for a busy machine
    with served(*filters, "--filter=log", "--filter=delay", "memory", "1M", *params,
                f"logfile={logfile}", "rdelay=250ms") as srv:
        run(["nbdsh", "-u", srv.uri, "-c", PARALLEL_READS])
    assert (max_in_flight(logfile) == 1) == serial


def test_noparallel_connections_drops_multi_conn():
    for params, multi in ((["serialize=connections"], False), ([], True)):
        with served("--filter=noparallel", "memory", "1M", *params) as srv:
            info = json.loads(run(["nbdinfo", "--json", srv.uri]).stdout)["exports"][0]
            assert info["can_multi_conn"] is multi
            assert nbdsh_outcomes(srv.uri, ["h.pread(1, 0)"]) == ["ok"]
