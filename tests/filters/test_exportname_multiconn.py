"""exportname (listings and strictness) and multi-conn (what is advertised and
which flushes reach the plugin), compared with nbdkit."""

from __future__ import annotations

import json

import pytest
from stack_helpers import BOTH, log_lines

from nbdtest import PYNBD, nbdsh, run, served


@pytest.fixture
def disks(tmp_path):
    directory = tmp_path / "disks"
    directory.mkdir()
    for name in ("file1", "file2", "file3"):
        (directory / name).write_bytes(name.encode().ljust(512, b"\0"))
    return directory


def listing(uri: str) -> list[tuple[str, str]]:
    result = run(["nbdinfo", "--list", "--json", uri], check=False)
    if result.returncode:
        return [("error", "")]
    return sorted((e["export-name"], e.get("description", ""))
                  for e in json.loads(result.stdout)["exports"])


@pytest.mark.parametrize("params", [
    ["exportname-list=empty"], ["exportname-list=error"],
    ["exportname-list=explicit", "exportname=file1", "exportname=file3"],
    ["exportname-list=defaultonly", "default-export=file2"],
    ["exportname-list=explicit", "exportname=a", "exportdesc=fixed:hello"],
    ["exportname-list=explicit", "exportname=a", "exportdesc=script:echo d-$name"],
])
def test_listing_matches_nbdkit(disks, params):
    lists = []
    for server in BOTH:
        with served("--filter=exportname", "file", f"dir={disks}", *params, server=server) as srv:
            lists.append(listing(srv.uri))
    assert lists[0] == lists[1]


def test_default_export_and_strictness_match_nbdkit(disks):
    outcomes = []
    for server in BOTH:
        with served("--filter=exportname", "file", f"dir={disks}", "default-export=file2",
                    "exportname-strict=true", "exportname=file2", "exportname=file3",
                    server=server) as srv:
            seen = []
            for name in ("", "file3", "file1"):
                result = run(["nbdsh", "-c", f"h.set_export_name({name!r}); h.connect_unix("
                              f"{srv.socket!r}); print(bytes(h.pread(5, 0)))"], check=False)
                seen.append(result.stdout.decode().strip() if result.returncode == 0 else "refused")
            outcomes.append(seen)
    assert outcomes[0] == outcomes[1] == ["refused", "b'file3'", "refused"]


def test_bad_exportdesc_is_one_line():
    result = run([*PYNBD, "serve", "--filter=exportname", "memory", "1M", "exportdesc=bogus"],
                 check=False)
    err = result.stderr.decode()
    assert result.returncode == 1 and "exportdesc=bogus" in err and "Traceback" not in err


FLUSHES = """
import nbd
h2 = nbd.NBD(); h2.connect_uri(h.get_uri())
print(h.can_multi_conn(), h.can_flush())
h.pwrite(b"a" * 512, 0)
h2.pread(512, 0)
if h.can_flush():
    h.flush()
    h2.flush()
    h.flush()
"""


@pytest.mark.parametrize("params", [
    [], ["multi-conn-mode=emulate"], ["multi-conn-mode=disable"], ["multi-conn-mode=plugin"],
    ["multi-conn-mode=unsafe"], ["multi-conn-mode=emulate", "multi-conn-track-dirty=fast"],
    ["multi-conn-mode=emulate", "multi-conn-track-dirty=off"],
    ["multi-conn-mode=plugin", "multi-conn-track-dirty=fast"],
])
def test_flushes_below_match_nbdkit(tmp_path, params):
    results = []
    for server in BOTH:
        logfile = tmp_path / f"{server}.log"
        with served("--filter=multi-conn", "--filter=log", "file", str(tmp_path / "disk"),
                    f"logfile={logfile}", *params, server=server) as srv:
            out = nbdsh(srv.uri, FLUSHES)
        flushes = sum(1 for line in log_lines(str(logfile)) if " Flush " in line)
        results.append((out, flushes))
    assert results[0] == results[1]


@pytest.fixture(autouse=True)
def disk_file(tmp_path):
    (tmp_path / "disk").write_bytes(bytes(1 << 20))


def test_default_export_without_strictness(disks):
    with served("--filter=exportname", "file", f"dir={disks}", "default-export=file2") as srv:
        assert nbdsh(srv.uri, "print(bytes(h.pread(5, 0)))").strip() == "b'file2'"


def test_emulate_needs_flush_and_the_server_keeps_serving():
    with served("--filter=multi-conn", "pattern", "1M", "multi-conn-mode=emulate") as srv:
        refused = run(["nbdinfo", srv.uri], check=False)
        assert refused.returncode != 0
        again = run(["nbdinfo", srv.uri], check=False)  # still serving, still refusing
        assert "server replied with error" in again.stderr.decode() and srv.proc.poll() is None
    with served("--filter=multi-conn", "pattern", "1M", "multi-conn-mode=disable") as srv:
        assert json.loads(run(["nbdinfo", "--json", srv.uri]).stdout)["exports"][0]["can_multi_conn"] is False
