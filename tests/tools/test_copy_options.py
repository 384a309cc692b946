"""nbdcopy's tuning options, pynbd copy side by side with nbdcopy.

Each option is given to both tools over the same source, into an nbdkit
whose log filter records what reached it; the requests each tool sent
must agree on what the option promises (request sizes, requests in flight,
flushes, extents asked for, zero ranges left alone) and the copies must
be equal. Debian's nbdcopy (1.14) takes plain numbers only, so human
sizes are checked against the same copy given in bytes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_copy import IMAGE_SIZE, log_actions, log_counts, make_image, nbdcopy, pynbd_copy

from nbdtest import run, served

KiB, MiB = 1024, 1024 * 1024
TOOLS = {"pynbd": pynbd_copy, "nbdcopy": nbdcopy}


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    return make_image(tmp_path_factory.mktemp("copyopts") / "image.raw")


def logged_copy(tool: str, tmp_path: Path, *args: str, source: str,
                prefill: bytes | None = None) -> tuple[Path, bytes]:
    """Copy ``source`` with ``args`` into a logged nbdkit; its log and final contents."""
    log = tmp_path / f"{tool}.log"
    with served("--filter=log", "memory", str(IMAGE_SIZE), f"logfile={log}",
                server="nbdkit") as dst:
        if prefill is not None:
            run(["nbdcopy", "-", dst.uri], input=prefill)
            log.write_text("")
        TOOLS[tool](*args, source, dst.uri)
        data = run(["nbdcopy", dst.uri, "-"]).stdout
    return log, data


def max_in_flight(log: Path) -> int:
    """The most requests one connection had started and not yet finished."""
    open_: dict[str, set[str]] = {}
    most = 0
    for line in log.read_text().splitlines():
        call = re.search(r"connection=(\d+) (\w+) id=(\d+) .*\.\.\.$", line)
        done = re.search(r"connection=(\d+) \.\.\.(\w+) id=(\d+)", line)
        if call:
            open_.setdefault(call[1], set()).add(call[3])
            most = max(most, len(open_[call[1]]))
        elif done:
            open_.get(done[1], set()).discard(done[3])
    return most


@pytest.mark.parametrize("tool", TOOLS)
def test_request_size(image, tmp_path, tool):
    log, data = logged_copy(tool, tmp_path, "--request-size=65536", "--no-extents", "-S", "0",
                            source=str(image))
    assert data == image.read_bytes()
    assert max(log_counts(log, "Write")) == 64 * KiB


@pytest.mark.parametrize("option", [["--synchronous"], ["-R", "1", "-C", "1"]])
def test_one_request_in_flight(image, tmp_path, option):
    """pynbd copy keeps to one request at a time. (nbdcopy 1.14 was seen with two and three in
    flight on the destination under the same options, so it is no oracle for this.)"""
    log, data = logged_copy("pynbd", tmp_path, *option, source=str(image))
    assert data == image.read_bytes()
    assert max_in_flight(log) == 1


@pytest.mark.parametrize("tool", TOOLS)
def test_queue_size_bounds_requests_in_flight(image, tmp_path, tool):
    log, data = logged_copy(tool, tmp_path, "--queue-size=131072", "--request-size=65536",
                            "-C", "1", "--no-extents", "-S", "0", source=str(image))
    assert data == image.read_bytes()
    assert max_in_flight(log) <= 2


@pytest.mark.parametrize("tool", TOOLS)
def test_flush(image, tmp_path, tool):
    log, _ = logged_copy(tool, tmp_path, "--flush", source=str(image))
    assert log_actions(log)["Flush"] >= 1
    log, _ = logged_copy(tool, tmp_path, source=str(image))
    assert log_actions(log)["Flush"] == 0


@pytest.mark.parametrize("tool", TOOLS)
def test_no_extents_reads_everything(image, tmp_path, tool):
    """The source's extents are never asked for."""
    log = tmp_path / f"src-{tool}.log"
    with served("--filter=log", "file", str(image), f"logfile={log}", server="nbdkit") as src:
        TOOLS[tool]("--no-extents", src.uri, "null:")
    actions = log_actions(log)
    assert actions["Extents"] == 0
    assert sum(log_counts(log, "Read")) == IMAGE_SIZE


@pytest.mark.parametrize("flag", ["--destination-is-zero", "--target-is-zero"])
def test_destination_is_zero_leaves_zero_ranges_alone(image, tmp_path, flag):
    """Trusted blindly by both tools: a destination that is not zero keeps its garbage
    where the source reads as zero, the same garbage with either tool."""
    garbage = b"\xa5" * IMAGE_SIZE
    results = {tool: logged_copy(tool, tmp_path, flag, source=str(image), prefill=garbage)
               for tool in TOOLS}
    (ours_log, ours), (theirs_log, theirs) = results["pynbd"], results["nbdcopy"]
    assert log_actions(ours_log)["Zero"] == log_actions(theirs_log)["Zero"] == 0
    assert b"\xa5" * 4096 in ours
    assert ours == theirs


def test_human_sizes_mean_bytes(image, tmp_path):
    """1m, 64K, 128k: the same requests as the numbers nbdcopy 1.14 insists on."""
    human, _ = logged_copy("pynbd", tmp_path, "--request-size=64k", "--queue-size=128K",
                           "-C", "1", "-S", "4k", source=str(image))
    (tmp_path / "h.log").write_text(human.read_text())
    plain, _ = logged_copy("pynbd", tmp_path, "--request-size=65536", "--queue-size=131072",
                           "-C", "1", "-S", "4096", source=str(image))
    assert sorted(log_counts(tmp_path / "h.log", "Write")) == sorted(log_counts(plain, "Write"))
    assert max_in_flight(tmp_path / "h.log") <= 2
