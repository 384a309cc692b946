"""A small mutation fuzzer: structure-aware seeds, byte mutations, outcome feedback.

atheris has no wheel for this Python in the package index we can reach, so
the engine is plain Python (hypothesis drives the structure-aware property
tests in ``test_fuzz_smoke.py``). Each ``Target`` knows how to

- ``generate(rng)``: build a valid-ish input (a plausible option sequence,
  request stream, reply stream…) — the structure-aware half;
- ``run(data)``: feed one input to the code under test and return an
  *outcome signature* (a short hashable summary: which events, refusals,
  errors happened). An exception it raises is a finding.

The engine mutates generated inputs and inputs already in the corpus (bit
flips, interesting integers, inserted/deleted/duplicated ranges, splices),
and keeps an input in the corpus when its signature was never seen: cheap
feedback without coverage instrumentation. Every input is bounded in time
(``HANG_SECONDS`` through SIGALRM for the pure cores; socket timeouts for the
live ones). Findings are deduplicated by exception type and first line and
saved, with the input that found them, under ``--crashes``.
"""

from __future__ import annotations

import os
import random
import re
import resource
import signal
import threading
import time
import traceback
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

HANG_SECONDS = 1.0
CORPUS_LIMIT = 4096
INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x1000, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
               0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 63, (1 << 64) - 1)


class Hang(Exception):
    """An input ran longer than HANG_SECONDS."""


class Finding(Exception):
    """An invariant of the target does not hold (raised by a target's ``run``)."""


class Target(Protocol):
    name: str

    def generate(self, rng: random.Random) -> bytes: ...

    def run(self, data: bytes) -> Hashable: ...

    def close(self) -> None: ...


def mutate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    """One to four random byte-level mutations of ``data``."""
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        kind = rng.randrange(9)
        pos = rng.randrange(len(buf) + 1)
        if kind == 0 and buf:  # flip a bit
            pos = min(pos, len(buf) - 1)
            buf[pos] ^= 1 << rng.randrange(8)
        elif kind == 1 and buf:  # a random byte
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        elif kind == 2:  # an interesting big-endian integer over what was there
            width = rng.choice((1, 2, 4, 8))
            value = rng.choice(INTERESTING) & ((1 << (8 * width)) - 1)
            buf[pos:pos + width] = value.to_bytes(width, "big")
        elif kind == 3:  # insert random bytes
            buf[pos:pos] = rng.randbytes(rng.choice((1, 2, 4, 8, 16, 64)))
        elif kind == 4 and buf:  # delete a range
            del buf[pos:pos + rng.choice((1, 2, 4, 8, 16, 64))]
        elif kind == 5 and buf:  # duplicate a range
            start = rng.randrange(len(buf))
            buf[pos:pos] = buf[start:start + rng.choice((4, 16, 28, 64))]
        elif kind == 6:  # truncate
            del buf[pos:]
        elif kind == 7 and corpus:  # splice with another input
            other = rng.choice(corpus)
            cut = rng.randrange(len(other) + 1)
            buf[pos:] = other[cut:]
        else:  # add or subtract a little from a byte
            if buf:
                p = min(pos, len(buf) - 1)
                buf[p] = (buf[p] + rng.choice((-2, -1, 1, 2))) & 0xFF
    return bytes(buf)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def settle(expected_fds: int, expected_threads: int, timeout: float = 10.0) -> tuple[int, int]:
    """Wait (with a deadline) until fds and threads are back to the expected counts."""
    deadline = time.monotonic() + timeout
    while True:
        now = open_fds(), threads()
        if now == (expected_fds, expected_threads) or time.monotonic() >= deadline:
            return now
        time.sleep(0.02)


@dataclass
class Stats:
    name: str
    inputs: int = 0
    seconds: float = 0.0
    corpus: int = 0
    signatures: int = 0
    findings: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # key → (input, traceback)
    hangs: int = 0
    crashes: int = 0
    slowest: float = 0.0
    rss_mib: float = 0.0  # this process's RSS when the target was done


def _alarm(signum: int, frame: object) -> None:
    raise Hang("input ran over the time bound")


def fuzz(target: Target, *, inputs: int, seconds: float, seed: int,
         hang_seconds: float = HANG_SECONDS) -> Stats:
    """Run ``target`` on up to ``inputs`` inputs or for ``seconds``, whichever ends first."""
    rng = random.Random(f"{target.name}:{seed}")
    stats = Stats(target.name)
    corpus: list[bytes] = []
    seen: set[int] = set()
    use_alarm = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGALRM, _alarm) if use_alarm else None
    start = time.monotonic()
    try:
        while stats.inputs < inputs and time.monotonic() - start < seconds:
            if not corpus or rng.random() < 0.3:
                data = target.generate(rng)
                if rng.random() < 0.7:
                    data = mutate(rng, data, corpus)
            else:
                data = mutate(rng, rng.choice(corpus), corpus)
            stats.inputs += 1
            began = time.monotonic()
            try:
                if use_alarm:
                    signal.setitimer(signal.ITIMER_REAL, hang_seconds)
                try:
                    signature = target.run(data)
                finally:
                    if use_alarm:
                        signal.setitimer(signal.ITIMER_REAL, 0)
            except Exception as exc:  # noqa: BLE001 (every exception is a finding)
                _record(stats, data, exc)
                continue
            took = time.monotonic() - began
            stats.slowest = max(stats.slowest, took)
            if took > hang_seconds:
                _record(stats, data, Hang(f"input took {took:.2f} s"))
            key = hash(signature)  # a number: the set stays small however long the run
            if key not in seen:
                seen.add(key)
                if len(corpus) < CORPUS_LIMIT:
                    corpus.append(data)
                else:
                    corpus[rng.randrange(CORPUS_LIMIT)] = data
    finally:
        if old is not None:
            signal.signal(signal.SIGALRM, old)
        stats.seconds = time.monotonic() - start
        stats.corpus = len(corpus)
        stats.signatures = len(seen)
    return stats


def _record(stats: Stats, data: bytes, exc: BaseException) -> None:
    if isinstance(exc, Hang):
        stats.hangs += 1
    else:
        stats.crashes += 1
    first = (str(exc).splitlines() or [""])[0][:120]
    key = f"{type(exc).__name__}: {re.sub(r'[0-9]+', 'N', first)}"  # one finding, whatever the numbers
    if key not in stats.findings:
        text = "".join(traceback.format_exception(exc))
        stats.findings[key] = (data, text)


def save_findings(stats: Stats, directory: Path) -> list[Path]:
    """Write each finding's input (``.bin``) and traceback (``.txt``); their paths."""
    paths = []
    directory.mkdir(parents=True, exist_ok=True)
    for index, (key, (data, text)) in enumerate(stats.findings.items()):
        base = directory / f"{stats.name}-{index}"
        base.with_suffix(".bin").write_bytes(data)
        base.with_suffix(".txt").write_text(f"{key}\n\n{text}")
        paths.append(base.with_suffix(".bin"))
    return paths
