"""retry filter: failed requests reopen the plugin and succeed; limits; read-only reopen."""

from __future__ import annotations

import os

import pytest
from stack_helpers import actions, nbdsh_outcomes

from nbdtest import PYNBD, nbdsh, run, served

PLUGIN = os.path.join(os.path.dirname(__file__), "failing_plugin.py")
FAST = ["retry-delay=10ms"]


def test_read_succeeds_after_reopens():
    with served("--filter=retry", PLUGIN, "failures=2", *FAST) as srv:
        # the third open served the read, and wrote its number into byte 0
        assert nbdsh(srv.uri, "print(h.pread(1, 0)[0])").strip() == "3"


def test_gives_up_after_retries():
    with served("--filter=retry", PLUGIN, "failures=3", "retries=2", *FAST) as srv:
        assert nbdsh_outcomes(srv.uri, ["h.pread(1, 0)", "h.pread(1, 0)"]) == ["EIO", "ok"]


def test_retry_readonly_turns_writes_away():
    with served("--filter=retry", PLUGIN, "failures=1", "retry-readonly=yes", *FAST) as srv:
        assert nbdsh_outcomes(srv.uri, ["h.pread(1, 0)", "h.pwrite(b'x', 1)"]) == ["ok", "EPERM"]
        # a new client starts read-write again
        assert nbdsh_outcomes(srv.uri, ["h.pwrite(b'x', 1)"]) == ["ok"]


@pytest.mark.parametrize("order, connects", [
    (["--filter=retry", "--filter=log"], 3),   # log below retry sees every reopen
    (["--filter=log", "--filter=retry"], 1),   # log above sees one client, one read
])
def test_order_decides_what_the_log_sees(tmp_path, order, connects):
    logfile = tmp_path / "log"
    with served(*order, PLUGIN, "failures=2", *FAST, f"logfile={logfile}") as srv:
        nbdsh(srv.uri, "h.pread(1, 0)")
    seen = actions(str(logfile))
    assert seen.count("Connect") == connects
    assert seen.count("Read") == connects


def test_qemu_img_copy_survives_failures(tmp_path):
    out = tmp_path / "copy.img"
    with served("--filter=retry", PLUGIN, "failures=2", *FAST) as srv:
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri, str(out)])
    assert out.stat().st_size == 64 * 1024


def test_negative_retries_is_refused():
    result = run([*PYNBD, "serve", "--filter=retry", "memory", "1M", "retries=-1"], check=False)
    assert result.returncode == 1 and "retries=-1" in result.stderr.decode()
