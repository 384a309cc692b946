"""``make fuzz``: run every fuzz target and print the report.

    python tests/fuzz/fuzz_main.py                  # >= 1,000,000 inputs (a few minutes)
    python tests/fuzz/fuzz_main.py --scale 0.01     # a quick look
    python tests/fuzz/fuzz_main.py --seed 7 --crashes /tmp/crashes

Targets (see fuzz_cores.py and fuzz_live.py): the server handshake, the
server transmission core, the client reply parser and the client handshake
(pure, fast: most of the inputs); a live server over a Unix socket with the memory, cow and file
stacks; ``pynbd info`` (plain and ``--map``) and ``pynbd copy`` against a
malicious server. The report gives, per target, inputs, distinct outcomes,
crashes and hangs (over 1 s), then the peak RSS, the RSS growth over the
run, and the file descriptors and threads before and after. It exits 1 on
any crash or hang, on a leaked fd or thread, or on RSS growing by more than
``--max-rss-growth`` MiB; the inputs that found something are saved under
``--crashes`` (default $TMPDIR/pynbd-fuzz-crashes) with their tracebacks.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _path in (HERE, HERE.parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from fuzz_cores import (  # noqa: E402
    ClientHandshakeTarget,
    ClientTarget,
    HandshakeTarget,
    TransmissionTarget,
)
from fuzz_engine import (  # noqa: E402
    HANG_SECONDS,
    Stats,
    Target,
    fuzz,
    max_rss_mib,
    open_fds,
    save_findings,
    settle,
    threads,
)
from fuzz_live import LiveServerTarget, ToolTarget  # noqa: E402

# (factory, inputs at scale 1): 1,020,000 in all
PLAN: list[tuple[Callable[[], Target], int]] = [
    (HandshakeTarget, 240_000),
    (TransmissionTarget, 240_000),
    (ClientTarget, 240_000),
    (ClientHandshakeTarget, 240_000),
    (lambda: LiveServerTarget("memory"), 15_000),
    (lambda: LiveServerTarget("cow"), 15_000),
    (lambda: LiveServerTarget("file"), 15_000),
    (lambda: ToolTarget("info"), 5_000),
    (lambda: ToolTarget("info-map"), 5_000),
    (lambda: ToolTarget("copy"), 5_000),
]


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


@dataclass
class Report:
    stats: list[Stats] = field(default_factory=list)
    fds: tuple[int, int] = (0, 0)
    threads: tuple[int, int] = (0, 0)
    rss_start: float = 0.0
    rss_end: float = 0.0
    peak_rss: float = 0.0
    max_rss_growth: float = 256.0

    @property
    def inputs(self) -> int:
        return sum(s.inputs for s in self.stats)

    @property
    def crashes(self) -> int:
        return sum(s.crashes for s in self.stats)

    @property
    def hangs(self) -> int:
        return sum(s.hangs for s in self.stats)

    @property
    def ok(self) -> bool:
        return (not self.crashes and not self.hangs and self.fds[0] == self.fds[1]
                and self.threads[0] == self.threads[1]
                and self.rss_end - self.rss_start <= self.max_rss_growth)

    def lines(self) -> list[str]:
        out = [f"{'target':22} {'inputs':>9} {'per s':>7} {'outcomes':>8} {'crashes':>7} "
               f"{'hangs':>5} {'slowest':>8} {'RSS after':>9}"]
        for s in self.stats:
            out.append(f"{s.name:22} {s.inputs:9,} {s.inputs / max(s.seconds, 1e-9):7.0f} "
                       f"{s.signatures:8,} {s.crashes:7} {s.hangs:5} {s.slowest:7.3f}s "
                       f"{s.rss_mib:6.0f} MiB")
            out.extend(f"    {key}" for key in s.findings)
        seconds = sum(s.seconds for s in self.stats)
        out.append(f"{'total':22} {self.inputs:9,} {self.inputs / max(seconds, 1e-9):7.0f} "
                   f"{'':8} {self.crashes:7} {self.hangs:5}   {seconds:.0f}s")
        out.append(f"inputs {self.inputs:,}, crashes {self.crashes}, hangs {self.hangs}, "
                   f"max RSS {self.peak_rss:.0f} MiB (RSS {self.rss_start:.0f} -> "
                   f"{self.rss_end:.0f} MiB), fds {self.fds[0]} -> {self.fds[1]}, "
                   f"threads {self.threads[0]} -> {self.threads[1]}: "
                   f"{'OK' if self.ok else 'FAILED'}")
        return out


def campaign(plan: Sequence[tuple[Callable[[], Target], int]], *, scale: float = 1.0,
             seconds: float = float("inf"), seed: int = 1, hang_seconds: float = HANG_SECONDS,
             crashes: Path | None = None, progress: Callable[[str], None] | None = None) -> Report:
    """Run each target of ``plan`` for its share of inputs (times ``scale``) or ``seconds``."""
    report = Report()
    report.fds, report.threads = (open_fds(), 0), (threads(), 0)
    report.rss_start = current_rss_mib()
    for factory, inputs in plan:
        target = factory()
        try:
            stats = fuzz(target, inputs=max(1, int(inputs * scale)), seconds=seconds, seed=seed,
                         hang_seconds=hang_seconds)
        finally:
            target.close()
        stats.rss_mib = current_rss_mib()
        report.stats.append(stats)
        if crashes is not None and stats.findings:
            save_findings(stats, crashes)
        if progress is not None:
            progress(report.lines()[len(report.stats)])
    after = settle(report.fds[0], report.threads[0])
    report.fds, report.threads = (report.fds[0], after[0]), (report.threads[0], after[1])
    report.rss_end = current_rss_mib()
    report.peak_rss = max_rss_mib()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="times the planned inputs")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--crashes", type=Path,
                        default=Path(tempfile.gettempdir()) / "pynbd-fuzz-crashes")
    parser.add_argument("--max-rss-growth", type=float, default=256.0, metavar="MIB")
    args = parser.parse_args(argv)
    print(f"fuzzing with seed {args.seed}, {int(sum(n for _, n in PLAN) * args.scale):,} inputs planned",
          flush=True)
    report = campaign(PLAN, scale=args.scale, seed=args.seed, crashes=args.crashes,
                      progress=lambda line: print(line, flush=True))
    report.max_rss_growth = args.max_rss_growth
    print("\n".join(report.lines()))
    if report.crashes or report.hangs:
        print(f"inputs and tracebacks saved under {args.crashes}/")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
