"""log filter: the same client run gives the same log lines as nbdkit's; placement matters."""

from __future__ import annotations

from stack_helpers import BOTH, actions, log_lines

from nbdtest import PYNBD, nbdsh, run, served

SCRIPT = """
h.pwrite(b"x" * 4096, 0)
h.pread(512, 0)
h.zero(4096, 8192)
h.zero(4096, 8192, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO)
h.trim(4096, 65536)
h.flush()
h.cache(4096, 0)
h.pwrite(b"y" * 512, 512, nbd.CMD_FLAG_FUA)
h.block_status(131072, 0, lambda *a: 0)
h.block_status(131072, 0, lambda *a: 0, nbd.CMD_FLAG_REQ_ONE)
try:
    h.pread(512, 1 << 30)
except nbd.Error:
    pass
"""


def logged(server: str, tmp_path, *stack: str) -> list[str]:
    logfile = tmp_path / f"{server}.log"
    with served(*stack, f"logfile={logfile}", server=server) as srv:
        run(["nbdsh", "--base-allocation", "-u", srv.uri, "-c", SCRIPT])
    return log_lines(str(logfile))


def test_log_lines_match_nbdkit(tmp_path):
    ours, theirs = (logged(server, tmp_path, "--filter=log", "memory", "1M") for server in BOTH)
    assert ours == theirs
    assert ours[0].startswith('connection=1 Connect export="" tls=0 size=0x100000 ')
    assert ours[-1] == "connection=1 Disconnect transactions=10"


def test_failed_requests_are_logged_with_errno(tmp_path):
    stack = ("--filter=log", "--filter=error", "memory", "1M", "error-pwrite-rate=1", "error=ENOSPC")
    for server in BOTH:
        logfile = tmp_path / f"{server}.log"
        with served(*stack, f"logfile={logfile}", server=server) as srv:
            run(["nbdsh", "-u", srv.uri, "-c", "try: h.pwrite(b'a', 0)\nexcept nbd.Error: pass"])
        assert "connection=1 ...Write id=1 return=-1 error=ENOSPC" in log_lines(str(logfile))


def test_logappend_and_two_connections(tmp_path):
    logfile = tmp_path / "log"
    logfile.write_text("old line\n")
    with served("--filter=log", "memory", "1M", f"logfile={logfile}", "logappend=true") as srv:
        nbdsh(srv.uri, "h.pread(1, 0)")
        nbdsh(srv.uri, "h.flush()")
    text = logfile.read_text().splitlines()
    assert text[0] == "old line"
    assert any("connection=2 Flush id=1" in line for line in text)
    with served("--filter=log", "memory", "1M", f"logfile={logfile}"):
        pass
    assert "old line" not in logfile.read_text()


def test_placement_shows_the_filters_between(tmp_path):
    """Above blocksize the client's one 64 KiB read; below it, sixteen 4 KiB reads."""
    above, below = tmp_path / "above", tmp_path / "below"
    script = "h.pread(65536, 0)"
    with served("--filter=log", "--filter=blocksize", "pattern", "1M", f"logfile={above}",
                "maxdata=4k") as srv:
        nbdsh(srv.uri, script)
    with served("--filter=blocksize", "--filter=log", "pattern", "1M", f"logfile={below}",
                "maxdata=4k") as srv:
        nbdsh(srv.uri, script)
    assert actions(str(above)).count("Read") == 1
    assert actions(str(below)).count("Read") == 16


def test_unwritable_logfile_is_a_startup_error(tmp_path):
    result = run([*PYNBD, "serve", "--filter=log", "memory", "1M",
                  f"logfile={tmp_path}/missing/dir/log"], check=False)
    assert result.returncode == 1 and "log: cannot open logfile" in result.stderr.decode()
