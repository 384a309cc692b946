"""pynbd side by side with nbdkit, qemu-nbd and nbdcopy on this machine.

    make bench                              # everything: about 25 minutes
    python bench/run.py --quick             # fewer, shorter runs
    python bench/run.py --only memory       # workloads whose name contains "memory"

Each workload runs pynbd and its peer(s) alternately (A B A B …) after one
warm-up run each, ``--runs`` times, and reports medians and the ratio
pynbd / best peer (for "lower is better" workloads, peer / pynbd, so above 1
always means pynbd is ahead). Results go to stdout as a table, to
``bench/results/results.json`` and to ``bench/results/chart.png``. Absolute
numbers on a shared machine are noise; the ratios from one run are the result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import assembled  # noqa: E402
import backup  # noqa: E402
import behaviour  # noqa: E402
import blkio  # noqa: E402
import cbt  # noqa: E402
import cc  # noqa: E402
import compressed  # noqa: E402
import controlplane  # noqa: E402
import fuse  # noqa: E402
import images  # noqa: E402
import luks  # noqa: E402
import nbdkit_filters  # noqa: E402
import remote  # noqa: E402
import snapshot  # noqa: E402
import torrent  # noqa: E402
import workloads as w  # noqa: E402
from servers import ServerSpec, nbdkit, pynbd, qemu_nbd, running  # noqa: E402

GiB = 1 << 30


@dataclass
class Variant:
    """One contender of a workload: measure() returns the number."""

    label: str
    measure: Callable[[], float]


@dataclass
class Workload:
    name: str
    unit: str
    variants: list[Variant]  # pynbd first, then the peers
    target: float | None = None  # ratio to reach
    lower_is_better: bool = False
    results: dict[str, list[float]] = field(default_factory=dict)

    def ratio(self) -> float:
        mine = statistics.median(self.results[self.variants[0].label])
        peers = [statistics.median(self.results[v.label]) for v in self.variants[1:]]
        if not peers:
            return float("nan")
        if self.lower_is_better:
            return min(peers) / mine if mine else float("inf")
        best = max(peers)
        return mine / best if best else float("inf")


def served_measure(spec: ServerSpec, transport: str, client: Callable[[str], float],
                   prepare: Callable[[str], None] | None = None) -> Callable[[], float]:
    def measure() -> float:
        with running(spec, transport) as srv:
            if prepare:
                prepare(srv.uri)
            return client(srv.uri)
    return measure


def server_workload(name: str, unit: str, specs: list[ServerSpec], transport: str,
                    client: Callable[[str], float], target: float | None,
                    prepare: Callable[[str], None] | None = None) -> Workload:
    return Workload(f"{name} [{transport}]", unit,
                    [Variant(s.label, served_measure(s, transport, client, prepare)) for s in specs],
                    target)


def build(args: argparse.Namespace, tmp: str) -> list[Workload]:
    rt = args.runtime
    data256 = w.random_file(tmp, 256 << 20, "random256M")
    data1g = w.random_file(tmp, GiB, "random1G")
    raw = os.path.join(tmp, "disk.raw")
    shutil.copyfile(data1g, raw)

    def prefill(uri: str) -> None:
        w.fill(uri, data256)

    memory = [pynbd("pynbd memory", "memory", "1G"), nbdkit("nbdkit memory", "memory", "1G"),
              nbdkit("nbdkit memory malloc", "memory", "1G", "allocator=malloc")]
    file_ = [pynbd("pynbd file", "file", raw), nbdkit("nbdkit file", "file", raw),
             qemu_nbd("qemu-nbd", "-f", "raw", "-t", "-e", "8", raw)]
    null = [pynbd("pynbd null", "null", "1G"), nbdkit("nbdkit null", "null", "1G")]
    out: list[Workload] = []
    fio_jobs = [("randread", "4k", 1, 1), ("randread", "4k", 16, 1), ("randwrite", "4k", 1, 1),
                ("randwrite", "4k", 16, 1), ("randread", "4k", 16, 4), ("randwrite", "4k", 16, 4),
                ("read", "256k", 16, 1), ("write", "256k", 16, 1)]
    tcp_jobs = [job for job in fio_jobs if job[2] == 16 and job[3] == 1]
    for transport, jobs_here in (("unix", fio_jobs), ("tcp", tcp_jobs)):
        for rw, bs, depth, jobs in jobs_here:
            unit = "IOPS" if bs == "4k" else "MiB/s"
            label = f"fio {rw} {bs} qd{depth} j{jobs}"
            client = (lambda r, b, d, j: lambda uri: w.fio(uri, r, b, d, j, rt))(rw, bs, depth, jobs)
            is_read = "read" in rw
            mem_target = 1.2 if bs == "4k" and depth == 16 else None
            out.append(server_workload(f"memory {label}", unit, memory, transport, client,
                                       mem_target, prefill if is_read else None))
            out.append(server_workload(f"file {label}", unit, file_, transport, client, 1.0))
        out.append(server_workload("null fio randread 4k qd16 j1", "IOPS", null, transport,
                                   lambda uri: w.fio(uri, "randread", "4k", 16, 1, rt), None))
        out.append(server_workload(
            "memory nbdcopy 1G to null:", "MiB/s", memory[:2], transport,
            lambda uri: w.nbdcopy(uri, "null:", GiB), 1.3, lambda uri: w.fill(uri, data1g)))
        out.append(server_workload(
            "memory nbdcopy 1G from file", "MiB/s", memory[:2], transport,
            lambda uri: w.nbdcopy(data1g, uri, GiB), None))
    # The cost of a stack of pass-through filters, pynbd against itself.
    bare = pynbd("memory", "memory", "1G")
    for n in (1, 2, 4):
        stacked = pynbd(f"memory + {n} filters", *[f"--filter={f}" for f in (["offset", "delay"] * 2)[:n]],
                        "memory", "1G")
        out.append(Workload(f"filter cost: {n} pass-through [unix]", "IOPS", [
            Variant(stacked.label, served_measure(stacked, "unix", lambda uri: w.fio(
                uri, "randread", "4k", 16, 1, rt), prefill)),
            Variant(bare.label, served_measure(bare, "unix", lambda uri: w.fio(
                uri, "randread", "4k", 16, 1, rt), prefill))], 0.95))
    # The cow filter over memory and over a file: writes go to an overlay in TMPDIR.
    for base_name, base_args in (("memory", ("memory", "1G")), ("file", ("file", raw))):
        cow = [pynbd(f"pynbd cow {base_name}", "--filter=cow", *base_args),
               nbdkit(f"nbdkit cow {base_name}", "--filter=cow", *base_args)]
        for rw in ("randread", "randwrite"):
            out.append(server_workload(f"cow {base_name} fio {rw} 4k qd16 j1", "IOPS", cow, "unix",
                                       (lambda r: lambda uri: w.fio(uri, r, "4k", 16, 1, rt))(rw), 1.0))
    out += copy_workloads(tmp, data1g)
    out += resource_workloads(data1g)
    out += remote.remote_workloads(tmp, data256, rt, Workload, Variant)
    out += torrent.torrent_workloads(tmp, data256, rt, Workload, Variant)
    out += snapshot.snapshot_workloads(tmp, raw, rt, Workload, Variant)
    out += cbt.cbt_workloads(tmp, rt, Workload, Variant)
    out += controlplane.control_workloads(tmp, data256, rt, Workload, Variant)
    out += cc.cc_workloads(rt, Workload, Variant)
    out += blkio.blkio_workloads(tmp, raw, rt, Workload, Variant)
    out += backup.backup_workloads(tmp, Workload, Variant)
    out += luks.luks_workloads(tmp, data1g, rt, Workload, Variant)
    out += images.image_workloads(tmp, data256, rt, Workload, Variant)
    out += compressed.compressed_workloads(tmp, rt, Workload, Variant)
    out += nbdkit_filters.nbdkit_filter_workloads(tmp, data256, rt, Workload, Variant)
    out += behaviour.behaviour_workloads(data256, rt, Workload, Variant)
    out += fuse.fuse_workloads(tmp, data1g, Workload, Variant)
    out += assembled.assembled_workloads(tmp, data256, rt, Workload, Variant)
    if args.only:
        out = [wl for wl in out if any(o in wl.name for o in args.only)]
    return out


def copy_workloads(tmp: str, data1g: str) -> list[Workload]:
    """pynbd copy against nbdcopy between nbdkit servers and files."""
    if subprocess.run([sys.executable, "-m", "pynbd", "copy", "--help"],
                      capture_output=True).returncode != 0:
        print("pynbd copy is not available: copy workloads skipped", file=sys.stderr)
        return []
    src = {"pynbd": pynbd("src", "memory", "1G")}  # "pynbd": pynbd serve, else nbdkit
    dst = {"pynbd": pynbd("dst", "memory", "1G")}
    target_file = os.path.join(tmp, "copy-target.raw")
    out = []
    for conns, target in (("4", 1.0), ("1", 1.0)):
        opts = (f"--connections={conns}",)
        for pair in ("nbdkit->nbdkit", "file->nbdkit", "nbdkit->file", "pynbd->nbdkit",
                     "nbdkit->pynbd"):
            def tool_measure(tool: Callable[..., float], pair: str = pair,
                             opts: tuple[str, ...] = opts) -> Callable[[], float]:
                def measure() -> float:
                    first, second = pair.split("->")
                    with running(src.get(first, nbdkit("src", "memory", "1G"))) as s, \
                            running(dst.get(second, nbdkit("dst", "memory", "1G"))) as d:
                        backup.settle()  # the last run's writes on disk, memory free: runs alike
                        w.fill(s.uri, data1g)
                        w.warm_copy_tools()
                        a = data1g if first == "file" else s.uri
                        b = target_file if second == "file" else d.uri
                        return tool(a, b, GiB, *opts)
                return measure
            out.append(Workload(f"copy {pair} connections={conns}", "MiB/s", [
                Variant("pynbd copy", tool_measure(w.pynbd_copy)),
                Variant("nbdcopy", tool_measure(w.nbdcopy))], target))
    return out


def resource_workloads(data1g: str) -> list[Workload]:
    def rss_idle(spec: ServerSpec) -> Callable[[], float]:
        def measure() -> float:
            with running(spec) as srv:
                time.sleep(0.3)
                return srv.rss_kib() / 1024
        return measure

    def rss_written(spec: ServerSpec) -> Callable[[], float]:
        def measure() -> float:
            with running(spec) as srv:
                w.fill(srv.uri, data1g)
                return srv.rss_kib() / 1024
        return measure

    def startup(spec: ServerSpec) -> Callable[[], float]:
        def measure() -> float:
            with running(spec) as srv:
                return srv.startup * 1000
        return measure

    mine, peer = pynbd("pynbd", "memory", "1G"), nbdkit("nbdkit", "memory", "1G")
    return [
        Workload("resident set idle", "MiB", [Variant("pynbd", rss_idle(mine)),
                                              Variant("nbdkit", rss_idle(peer))], None, True),
        Workload("resident set after 1 GiB written", "MiB",
                 [Variant("pynbd", rss_written(mine)), Variant("nbdkit", rss_written(peer))], None, True),
        Workload("start to first accepted connection", "ms",
                 [Variant("pynbd", startup(mine)), Variant("nbdkit", startup(peer))], None, True),
    ]


ABSOLUTE_LIMITS = {"resident set idle": 40.0, "resident set after 1 GiB written": 1126.4,
                   "start to first accepted connection": 250.0}


def measure_all(wls: list[Workload], runs: int) -> None:
    for index, wl in enumerate(wls, 1):
        print(f"[{index}/{len(wls)}] {wl.name}", file=sys.stderr, flush=True)
        for v in wl.variants:  # warm-up
            v.measure()
        for _ in range(runs):
            for v in wl.variants:
                wl.results.setdefault(v.label, []).append(v.measure())


def verdict(wl: Workload) -> str:
    limit = ABSOLUTE_LIMITS.get(wl.name)
    if limit is not None:
        return "met" if statistics.median(wl.results[wl.variants[0].label]) <= limit else "MISSED"
    if wl.target is None:
        return ""
    return "met" if wl.ratio() >= wl.target else "MISSED"


def report(wls: list[Workload]) -> tuple[str, list[dict]]:
    rows = []
    lines = [f"{'workload':52} {'unit':6} {'pynbd':>10} {'peer':>10} {'ratio':>6} {'target':>8}  verdict",
             "-" * 108]
    for wl in wls:
        mine = statistics.median(wl.results[wl.variants[0].label])
        peers = {v.label: statistics.median(wl.results[v.label]) for v in wl.variants[1:]}
        best = (min if wl.lower_is_better else max)(peers.values()) if peers else float("nan")
        limit = ABSOLUTE_LIMITS.get(wl.name)
        target = f"<={limit:g}" if limit is not None else (f">={wl.target:g}x" if wl.target else "")
        lines.append(f"{wl.name:52} {wl.unit:6} {mine:10.1f} {best:10.1f} {wl.ratio():6.2f} "
                     f"{target:>8}  {verdict(wl)}")
        rows.append({"workload": wl.name, "unit": wl.unit, "pynbd": mine, "peers": peers,
                     "ratio": wl.ratio(), "target": wl.target, "limit": limit,
                     "verdict": verdict(wl), "samples": wl.results})
    return "\n".join(lines), rows


def chart(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["ratio"] == r["ratio"]]
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(rows) + 1.5))
    # Rows with an absolute limit (memory, start-up time) plot limit / pynbd,
    # so that for them too, above 1 means the number is met.
    names = [f"{r['workload']} (limit {r['limit']:g} {r['unit']})" if r["limit"] else r["workload"]
             for r in rows]
    ratios = [r["limit"] / r["pynbd"] if r["limit"] else r["ratio"] for r in rows]
    colors = ["#2a9d8f" if r["verdict"] != "MISSED" else "#e76f51" for r in rows]
    ax.barh(names, ratios, color=colors)
    ax.axvline(1.0, color="black", linewidth=1)
    for y, r in enumerate(rows):
        if r["target"]:
            ax.plot([r["target"]] * 2, [y - 0.4, y + 0.4], color="#264653", linewidth=2)
    ax.invert_yaxis()
    ax.set_xlabel("pynbd / best peer, or limit / pynbd for limits (above 1: pynbd ahead; tick: target)")
    ax.set_title(f"pynbd against nbdkit, qemu-nbd and nbdcopy — {platform.node()}, {os.cpu_count()} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--runtime", type=float, default=1.5, help="seconds per fio run")
    p.add_argument("--quick", action="store_true", help="3 runs of 1 s")
    p.add_argument("--only", action="append", help="run workloads whose name contains this")
    p.add_argument("--replot", metavar="JSON", help="only redraw the chart from a results.json")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args()
    if args.quick:
        args.runs, args.runtime = 3, 1.0
    os.makedirs(args.out, exist_ok=True)
    if args.replot:
        with open(args.replot) as f:
            chart(json.load(f)["results"], os.path.join(args.out, "chart.png"))
        return 0
    with tempfile.TemporaryDirectory(prefix="pynbd-bench", dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        wls = build(args, tmp)
        measure_all(wls, args.runs)
    table, rows = report(wls)
    print(table)
    meta = {"machine": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "runs": args.runs, "runtime": args.runtime}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    with open(os.path.join(args.out, "table.txt"), "w") as f:
        f.write(table + "\n")
    chart(rows, os.path.join(args.out, "chart.png"))
    print(f"\nwrote {args.out}/results.json, table.txt and chart.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
