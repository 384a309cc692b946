"""checkwrite (copies onto themselves pass, wrong writes fail) and extentlist
(the map nbdinfo shows) — compared with nbdkit."""

from __future__ import annotations

import pytest
from stack_helpers import BOTH, nbdsh_outcomes

from nbdtest import PYNBD, run, served

CALLS = ["h.pwrite(b'\\x01', 32768)", "h.pwrite(b'\\x02', 32768)", "h.zero(4096, 0)",
         "h.zero(4096, 32768)", "h.trim(512, 65536)", "h.flush()",
         "h.zero(4096, 32768, nbd.CMD_FLAG_FAST_ZERO)", "h.pwrite(bytes(512), 0, nbd.CMD_FLAG_FUA)"]


@pytest.mark.parametrize("server", BOTH)
def test_checkwrite_copy_onto_itself(server):
    with served("--filter=checkwrite", "data", '@32768 1 @65536 "hello" @1048575 0', server=server) as srv:
        run(["nbdcopy", srv.uri, srv.uri])
        run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", srv.uri, srv.uri])


def test_checkwrite_outcomes_match_nbdkit():
    outcomes = []
    for server in BOTH:
        with served("--filter=checkwrite", "data", "@32768 1 @1048575 0", server=server) as srv:
            outcomes.append(nbdsh_outcomes(srv.uri, CALLS))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0] == ["ok", "EIO", "ok", "EIO", "ok", "ok", "ENOTSUP", "ok"]


def test_checkwrite_never_writes_below(tmp_path):
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(65536))
    with served("--filter=checkwrite", "file", str(disk)) as srv:
        assert nbdsh_outcomes(srv.uri, ["h.pwrite(b'x', 0)", "h.pwrite(bytes(8), 0)"]) == ["EIO", "ok"]
    assert disk.read_bytes() == bytes(65536)


LIST = "0 1M\n3M 1M hole,zero\n2M 512K 2\n"


def test_extentlist_map_matches_nbdkit(tmp_path):
    listing = tmp_path / "extents"
    listing.write_text(LIST)
    maps = []
    for server in BOTH:
        with served("--filter=extentlist", "memory", "6M", f"extentlist={listing}", server=server) as srv:
            maps.append(run(["nbdinfo", "--map", srv.uri]).stdout)
    assert maps[0] == maps[1]
    assert maps[0].split(b"\n")[0].split()[:3] == [b"0", b"1048576", b"0"]


@pytest.mark.parametrize("text, message", [
    ("0 1M\n512K 1M\n", "overlap"), ("0 1M bogus\n", "unknown extent type"), ("zero\n", "OFFSET LENGTH"),
])
def test_extentlist_bad_files_are_one_line(tmp_path, text, message):
    listing = tmp_path / "extents"
    listing.write_text(text)
    result = run([*PYNBD, "serve", "--filter=extentlist", "memory", "1M", f"extentlist={listing}"],
                 check=False)
    err = result.stderr.decode()
    assert result.returncode == 1 and message in err and "Traceback" not in err and err.count("\n") == 1


def test_extentlist_is_required():
    result = run([*PYNBD, "serve", "--filter=extentlist", "memory", "1M"], check=False)
    assert result.returncode == 1 and "extentlist" in result.stderr.decode()
