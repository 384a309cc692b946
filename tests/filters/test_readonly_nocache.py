"""readonly, nofilter, nocache and rotational: what the client is told and what
reaches the layer below — compared with nbdkit where Debian's ships the filter
(nofilter, nocache; readonly and rotational are newer than nbdkit 1.32)."""

from __future__ import annotations

import json

import pytest
from stack_helpers import BOTH, log_lines, nbdsh_outcomes

from nbdtest import PYNBD, nbdsh, run, served


def flags(uri: str) -> dict:
    return json.loads(run(["nbdinfo", "--json", uri]).stdout)["exports"][0]


@pytest.mark.parametrize("mode", ["none", "emulate", "nop"])
def test_nocache_modes_match_nbdkit(tmp_path, mode):
    results = []
    script = "h.cache(8192, 0) if h.can_cache() else None; print(h.can_cache())"
    for server in BOTH:
        logfile = tmp_path / f"{server}.log"
        with served("--filter=nocache", "--filter=log", "memory", "1M", f"cachemode={mode}",
                    f"logfile={logfile}", server=server) as srv:
            out = nbdsh(srv.uri, script)
        results.append((out, [line.split()[1] for line in log_lines(str(logfile))
                              if line.startswith("connection=")]))
    assert results[0] == results[1]
    assert results[0][0].strip() == str(mode != "none")
    assert ("Read" in results[0][1]) == (mode == "emulate")


def test_nofilter_matches_nbdkit():
    answers = []
    for server in BOTH:
        with served("--filter=nofilter", "pattern", "1M", server=server) as srv:
            info = flags(srv.uri)
            answers.append((info["export-size"], info["can_cache"], info["is_read_only"],
                            nbdsh(srv.uri, "print(h.pread(16, 4096).hex())")))
    assert answers[0] == answers[1]


def test_readonly_without_file_is_read_only():
    with served("--filter=readonly", "memory", "1M") as srv:
        assert flags(srv.uri)["is_read_only"] is True
        assert nbdsh_outcomes(srv.uri, ["h.pwrite(b'x', 0)", "h.pread(1, 0)"]) == ["EPERM", "ok"]


def test_readonly_file_switches_at_run_time(tmp_path):
    marker = tmp_path / "ro"
    with served("--filter=readonly", "memory", "1M", f"readonly-file={marker}") as srv:
        assert flags(srv.uri)["is_read_only"] is False
        calls = ["h.pwrite(b'x' * 512, 0)", "h.zero(512, 512)", "h.trim(512, 1024)"]
        assert nbdsh_outcomes(srv.uri, calls) == ["ok", "ok", "ok"]
        marker.touch()
        assert nbdsh_outcomes(srv.uri, [*calls, "h.pread(1, 0)"]) == ["EPERM"] * 3 + ["ok"]
        marker.unlink()
        assert nbdsh_outcomes(srv.uri, calls[:1]) == ["ok"]


@pytest.mark.parametrize("params, expected", [([], True), (["rotational=false"], False),
                                              (["rotational=true"], True)])
def test_rotational(params, expected):
    with served("--filter=rotational", "memory", "1M", *params) as srv:
        assert flags(srv.uri)["is_rotational"] is expected


def test_bad_values_are_refused_in_one_line():
    for flt, param in (("nocache", "cachemode=bogus"), ("rotational", "rotational=maybe")):
        result = run([*PYNBD, "serve", f"--filter={flt}", "memory", "1M", param], check=False)
        err = result.stderr.decode()
        assert result.returncode == 1 and "Traceback" not in err and err.count("\n") == 1, err
