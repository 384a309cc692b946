"""Workloads of the plugins whose disk is elsewhere: curl from nginx, the nbd proxy.

``remote_workloads`` is called by ``run.py``'s ``build()``. nginx is the one
the curl plugin's tests start (``tests/plugins/webserver.py``), here with two
worker processes, started for each measurement and stopped after it. The
proxy's upstream is nbdkit memory on a Unix socket, filled first; the proxy
is measured against that server reached directly, and against nbdkit's own
nbd plugin in front of it.

On a shared machine wall-clock ratios are noise; CPU cost is not. Run this
file to print the measured server's CPU time (user + system, from /proc)
per request, for pynbd and nbdkit side by side:

    python bench/remote.py [RUNTIME]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable

import workloads as w
from servers import Running, ServerSpec, nbdkit, pynbd, running

sys.path[:0] = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", p)
                for p in ("", "plugins")]
from webserver import nginx  # noqa: E402

Client = Callable[[Running], float]


def curl_measure(spec: ServerSpec, root: str, client: Client) -> Callable[[], float]:
    """Serve ``{url}`` in ``spec`` from a fresh nginx over ``root``, measure ``client``."""
    def measure() -> float:
        with nginx(root, workers=2) as web:
            url = web.http("disk.img")
            served = ServerSpec(spec.label, tuple(a.replace("{url}", url) for a in spec.argv), spec.kind)
            with running(served, "unix") as srv:
                return client(srv)
    return measure


def proxy_measure(spec: ServerSpec | None, data256: str, client: Client) -> Callable[[], float]:
    """``client`` on ``spec`` (``{up}`` is the upstream's socket) or, if None, on the upstream."""
    def measure() -> float:
        with running(nbdkit("upstream", "memory", "1G"), "unix") as up:
            w.fill(up.uri, data256)
            if spec is None:
                return client(up)
            sock = up.uri.partition("socket=")[2]
            proxy = ServerSpec(spec.label, tuple(a.replace("{up}", sock) for a in spec.argv), spec.kind)
            with running(proxy, "unix") as srv:
                return client(srv)
    return measure


def remote_workloads(tmp: str, data256: str, runtime: float,
                     workload: Callable[..., object], variant: Callable[..., object]) -> list[object]:
    """curl: sequential 256 KiB reads and 4 KiB random reads at depth 16 against nbdkit's curl;
    the nbd proxy: 4 KiB random reads at depth 16 against no proxy, and nbdkit's."""
    root = os.path.join(tmp, "www")
    os.makedirs(root, exist_ok=True)
    disk = os.path.join(root, "disk.img")
    if not os.path.exists(disk):
        os.link(data256, disk)
    specs = [pynbd("pynbd curl", "-r", "curl", "{url}"), nbdkit("nbdkit curl", "-r", "curl", "{url}")]
    jobs = (("curl fio read 256k qd16 [nginx]", "MiB/s", "read", "256k"),
            ("curl fio randread 4k qd16 [nginx]", "IOPS", "randread", "4k"))
    out = []
    for name, unit, rw, bs in jobs:
        client = (lambda r, b: lambda srv: w.fio(srv.uri, r, b, 16, 1, runtime))(rw, bs)
        out.append(workload(name, unit, [variant(s.label, curl_measure(s, root, client))
                                         for s in specs], 1.0))

    def randread(srv: Running) -> float:
        return w.fio(srv.uri, "randread", "4k", 16, 1, runtime)

    mine = pynbd("pynbd nbd proxy", "nbd", "socket={up}")
    out.append(workload("nbd proxy cost: fio randread 4k qd16 [over nbdkit memory]", "IOPS", [
        variant(mine.label, proxy_measure(mine, data256, randread)),
        variant("nbdkit memory direct", proxy_measure(None, data256, randread))], 0.8))
    theirs = nbdkit("nbdkit nbd proxy", "nbd", "socket={up}")
    out.append(workload("nbd proxy fio randread 4k qd16 [over nbdkit memory]", "IOPS", [
        variant(s.label, proxy_measure(s, data256, randread)) for s in (mine, theirs)], 1.0))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_cost(rw: str, bs: str, runtime: float) -> Client:
    """A client printing the server's CPU µs per fio request (and returning it)."""
    def client(srv: Running) -> float:
        before = cpu_seconds(srv.proc.pid)
        rate = w.fio(srv.uri, rw, bs, 16, 1, runtime)
        spent = cpu_seconds(srv.proc.pid) - before
        block = int(bs.rstrip("k")) * 1024  # fio's rate: IOPS for 4k, else MiB/s
        requests = rate * runtime if bs == "4k" else rate * runtime * w.MiB / block
        return 1e6 * spent / requests
    return client


def main() -> None:
    runtime = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    tmp = tempfile.mkdtemp(prefix="nbdbench")
    data256 = w.random_file(tmp, 256 * w.MiB, "data256")
    root = os.path.join(tmp, "www")
    os.makedirs(root)
    os.link(data256, os.path.join(root, "disk.img"))
    rows = [(f"nbd proxy over nbdkit memory, randread 4k qd16: {s.label}",
             proxy_measure(s, data256, cpu_cost("randread", "4k", runtime)))
            for s in (pynbd("pynbd", "nbd", "socket={up}"), nbdkit("nbdkit", "nbd", "socket={up}"))]
    rows.append(("(the upstream, nbdkit memory, reached directly)",
                 proxy_measure(None, data256, cpu_cost("randread", "4k", runtime))))
    rows += [(f"curl from nginx, {rw} {bs} qd16: {s.label}", curl_measure(s, root, cpu_cost(rw, bs, runtime)))
             for rw, bs in (("randread", "4k"), ("read", "256k"))
             for s in (pynbd("pynbd", "-r", "curl", "{url}"), nbdkit("nbdkit", "-r", "curl", "{url}"))]
    for label, measure in rows:
        print(f"{measure():8.1f} µs of server CPU per request  {label}", flush=True)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
