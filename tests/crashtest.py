"""One crash test for everything pynbd keeps on disk: write, kill -9, restart, verify.

    from crashtest import kill_during_storm

    kill_during_storm(tmp_path, serve=lambda: served(...), uri=lambda srv: srv.uri,
                      original=bytes_before, rounds=3, seed=1)

Each round starts the server (``serve()`` is a context manager yielding a
``nbdtest.Served``), runs a write storm against ``uri(srv)`` in libnbd's
nbdsh — 4 KiB pieces, each stamped with its sequence number (unique to the
seed and round, so different storms never stamp alike) and piece number, a
FUA write now and then and a flush every 40 writes, every acknowledged step
logged by the client — and kills the server with SIGKILL
after a random number of flushes. The next round restarts it on the same
files. After each round a fresh server is read back whole and every piece
must be either its ``original`` bytes (only if no durable write reached it)
or exactly one write's stamp (never torn), no older than the newest write the
client was told is durable (flushed, or FUA), and a write that was really
made.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from nbdtest import Served, run, wait_for

PIECE = 4096
ROUND = 1_000_000  # round r of seed s numbers its writes from (s * 100_000 + r) * ROUND: never shared

STORM = """
import os, random, struct
log = os.open({log!r}, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
rng = random.Random({seed})
seq = {start}
os.write(log, b'S %d\\n' % seq)
while True:
    seq += 1
    piece = rng.randrange({pieces})
    fua = seq % 13 == 0
    h.pwrite(struct.pack('<QQ', seq, piece) * 256, piece * 4096, nbd.CMD_FLAG_FUA if fua else 0)
    os.write(log, b'W %d %d %d\\n' % (seq, piece, fua))
    if seq % 40 == 0:
        h.flush()
        os.write(log, b'F %d\\n' % seq)
"""


def durable_floor(logs: list[Path]) -> dict[int, int]:
    """For each piece, the newest write the client was told is durable (flushed or FUA)."""
    floor: dict[int, int] = {}
    for path in logs:
        lines = path.read_text().splitlines()
        flushed = max((int(x.split()[1]) for x in lines if x.startswith("F ")), default=0)
        for line in lines:
            if line.startswith("W "):
                seq, piece, fua = map(int, line.split()[1:])
                if seq <= flushed or fua:
                    floor[piece] = max(floor.get(piece, 0), seq)
    return floor


def made_writes(logs: list[Path]) -> set[int]:
    """Every write a client logged, and the one each round had in flight when it died."""
    written: set[int] = set()
    for path in logs:
        lines = path.read_text().splitlines()
        start = int(lines[0].split()[1])
        ours = [int(x.split()[1]) for x in lines if x.startswith("W ")]
        written.update(ours)
        written.add(max(ours, default=start) + 1)
    return written


def check(data: bytes, original: bytes, logs: list[Path], atomic: bool = True) -> None:
    """Every piece: original (if nothing durable reached it) or one whole, new-enough write.

    With ``atomic`` False (a format that does not promise that a write interrupted by the
    kill lands whole), a piece may mix the bytes of two writes, or a write and the original,
    as long as every 16-byte stamp in it is a real write no older than the durable one.
    """
    floor, written = durable_floor(logs), made_writes(logs)
    for piece in range(len(original) // PIECE):
        got = data[piece * PIECE:(piece + 1) * PIECE]
        before = original[piece * PIECE:(piece + 1) * PIECE]
        if got == before:
            assert piece not in floor, f"piece {piece}: durable write {floor[piece]} lost"
            continue
        seq, where = struct.unpack_from("<QQ", got)
        whole = got == struct.pack("<QQ", seq, where) * 256 and where == piece
        assert whole or not atomic, f"piece {piece} is torn"
        units = [(seq, where)] if whole else [
            struct.unpack_from("<QQ", got, i) for i in range(0, PIECE, 16)
            if got[i:i + 16] != before[i:i + 16] or piece in floor]
        for seq, where in units:
            assert where == piece, f"piece {piece} holds bytes of piece {where}"
            assert seq >= floor.get(piece, 0), \
                f"piece {piece}: write {seq} is older than durable {floor[piece]}"
            assert seq in written, f"piece {piece}: write {seq} was never made"


def kill_during_storm(tmp_path: Path, serve: Callable[[], AbstractContextManager[Served]],
                      uri: Callable[[Served], str], original: bytes, rounds: int = 3, seed: int = 0,
                      flushes: tuple[int, int] = (2, 8), atomic: bool = True) -> None:
    """Run ``rounds`` rounds of storm, SIGKILL and check (see the module docstring and
    ``check`` for ``atomic``).
    ``PYNBD_CRASH_ROUNDS`` in the environment overrides ``rounds`` (``make crash`` runs 200)."""
    rounds = int(os.environ.get("PYNBD_CRASH_ROUNDS", rounds))
    rng = random.Random(seed)
    logs: list[Path] = []
    for round_ in range(rounds):
        log = tmp_path / f"storm{round_}.log"
        logs.append(log)
        with serve() as srv:
            storm = subprocess.Popen(["nbdsh", "-u", uri(srv), "-c", STORM.format(
                log=str(log), seed=seed * 100_000 + round_, start=(seed * 100_000 + round_) * ROUND,
                pieces=len(original) // PIECE)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wanted = rng.randrange(*flushes)

                def flushed(log: Path = log, wanted: int = wanted) -> bool:
                    return log.exists() and log.read_text().count("F ") >= wanted
                wait_for(flushed)
                os.kill(srv.proc.pid, signal.SIGKILL)
                srv.proc.wait()
            finally:
                storm.kill()
                storm.wait()
        after = tmp_path / "after.raw"
        with serve() as srv:
            run(["nbdcopy", uri(srv), str(after)])
        check(after.read_bytes(), original, logs, atomic)
        after.unlink()
