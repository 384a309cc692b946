"""stats filter: counts, bytes and the size histogram, written when the server exits."""

from __future__ import annotations

import re

from stack_helpers import BOTH

from nbdtest import PYNBD, run, served

SCRIPT = """
for i in range(8):
    h.pwrite(b"x" * 4096, i * 4096)
h.pwrite(b"y" * 512, 1 << 16)
for i in range(3):
    h.pread(4096, 0)
h.zero(65536, 1 << 17)
h.trim(4096, 1 << 18)
h.flush()
"""


def stats_of(server: str, tmp_path, *params: str) -> str:
    statsfile = tmp_path / f"{server}.txt"
    with served("--filter=stats", "memory", "1M", f"statsfile={statsfile}", *params,
                server=server) as srv:
        run(["nbdsh", "-u", srv.uri, "-c", SCRIPT])
    return statsfile.read_text()


def summary(text: str) -> list[str]:
    """'op: N ops, ..., BYTES' per line, without the times and rates."""
    found = re.findall(r"^(\w+): (\d+) ops, [\d.]+ s, ([\d.]+ \w+)", text, re.M)
    return [" ".join(f) for f in found]


def test_counts_and_bytes_match_nbdkit(tmp_path):
    ours, theirs = (stats_of(server, tmp_path) for server in BOTH)
    assert summary(ours) == summary(theirs)
    assert summary(ours) == ["total 15 112.50 KiB", "read 3 12.00 KiB", "write 9 32.50 KiB",
                             "trim 1 4.00 KiB", "zero 1 64.00 KiB", "flush 1 0 bytes"]


def test_histogram(tmp_path):
    text = stats_of("pynbd", tmp_path, "statsthreshold=100")
    write = text[text.index("write:"):text.index("trim:")]
    assert "Request size and alignment breakdown:" in write
    assert re.search(r"12 bits:\s+88\.9% \(8 reqs, 32\.00 KiB total\)", write)
    assert re.search(r"9 bits:\s+11\.1% \(1 reqs, 512 bytes total\)", write)
    assert re.search(r"12 bit aligned: 100\.0% \(8\)", write)
    assert re.search(r"13 bit aligned:\s+50\.0% \(4\)", write)


def test_statsappend_keeps_old_contents(tmp_path):
    statsfile = tmp_path / "pynbd.txt"
    statsfile.write_text("previous run\n")
    stats_of("pynbd", tmp_path, "statsappend=true")
    text = statsfile.read_text()
    assert text.startswith("previous run\n") and "\ntotal: 15 ops" in text


def test_missing_statsfile_is_refused():
    result = run([*PYNBD, "serve", "--filter=stats", "memory", "1M"], check=False)
    assert result.returncode == 1 and "statsfile" in result.stderr.decode()
