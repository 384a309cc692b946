"""Soak test: many clients at once against a model of what the disk must hold.

    python bench/soak.py --minutes 3 --stack memory
    python bench/soak.py --minutes 10 --stack all          # memory, then file, then cow
    python bench/soak.py --minutes 1 --clients 20 --depth 2 --size 32M

A pynbd server runs in a child process (this script's ``--serve`` mode),
listening on a Unix socket and on a TCP port at once; half the clients
connect over each. The clients are pynbd's own asyncio client
(``pynbd.client.aio``), all in this process, each with ``--depth`` commands
in flight: random reads, writes (some FUA), zeroes, trims, flushes and
block-status queries. Every command runs on a range no other command in
flight touches (all clients share one event loop, so that is exact), which
makes the model exact: a read must return what the model says, byte for
byte; a range that was trimmed reads as its old data or as zeroes; an
extent reported as zero must be zero in the model. Completed writes must be
visible on every connection (the stacks advertise multi-conn).

``--server nbdkit`` runs the same clients against Debian's nbdkit (on the
Unix socket only: nbdkit listens on one kind of socket at a time), for
comparison.

Stacks: ``memory`` (memory SIZE), ``file`` (a temporary file holding a
pattern) and ``cow`` (the same file read-only under --filter=cow). The
result is one line per stack: requests served, bytes verified, mismatches
(must be 0), the server's peak RSS, its file descriptors and threads before
the clients came and after they left (must be equal). Exit status 1 if a
mismatch, a failed command or a leak was seen.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from pynbd.client import CMD_FLAG_FUA, STATE_ZERO
from pynbd.client.aio import AsyncNBD

BLOCK = 4096
MAX_OP_BLOCKS = 64  # requests up to 256 KiB
STACKS = ("memory", "file", "cow")


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1:].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def pattern(size: int) -> bytes:
    """The initial content of the file stacks: every 4 KiB block names its number."""
    return b"".join(f"block {i:>10}".encode().ljust(BLOCK, b".") for i in range(size // BLOCK))


# -------------------------------------------------------------- the server

def serve(stack: str, unix_path: str, image: str, size: int) -> None:
    """``--serve``: run the stack on a Unix socket and a TCP port; print the port."""
    from pynbd.backend.stack import Stack
    from pynbd.server.dispatch import plan_for
    from pynbd.server.server import Listener, Server
    from pynbd.server.session import SessionConfig

    plugin, words, filters = {
        "memory": ("memory", [str(size)], []),
        "file": ("file", [image], []),
        "cow": ("file", [image], ["cow"]),
    }[stack]
    layers = Stack.from_args(plugin, words, filters)
    layers.get_ready()
    unix = Listener.unix(unix_path)
    tcp = Listener.tcp("127.0.0.1", 0)
    listener = Listener(unix.sockets + tcp.sockets, port=tcp.port, unix_path=unix.unix_path)
    layers.after_fork()
    server = Server(SessionConfig(stack=layers, dispatch=plan_for(layers)), listener)
    signal.signal(signal.SIGTERM, lambda *_: server.shutdown())
    print(tcp.port, flush=True)
    server.serve_forever()


def proc_count(pid: int, what: str) -> int:
    return len(os.listdir(f"/proc/{pid}/{what}"))


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def settled(pid: int, fds: int, threads: int, timeout: float = 30.0) -> tuple[int, int]:
    """The server's fds and threads once they are back to ``fds`` and ``threads`` (-1: any
    number), or at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        now = proc_count(pid, "fd"), proc_count(pid, "task")
        if (fds in (-1, now[0]) and threads in (-1, now[1])) or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


# -------------------------------------------------------------- the model

@dataclass
class Model:
    """What the disk holds, and which blocks a command in flight is using."""

    data: bytearray
    busy: bytearray = field(init=False)
    trimmed: set[int] = field(default_factory=set)  # blocks reading as old data or zeroes
    requests: int = 0
    verified: int = 0
    mismatches: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.busy = bytearray(len(self.data) // BLOCK)

    def claim(self, rng: random.Random, most: int) -> tuple[int, int] | None:
        """A free range of blocks (first, count), now busy; None if none was found quickly."""
        blocks = len(self.busy)
        for _ in range(8):
            count = rng.randint(1, min(most, blocks))
            first = rng.randrange(blocks - count + 1)
            if not any(self.busy[first:first + count]):
                self.busy[first:first + count] = b"\1" * count
                return first, count
        return None

    def release(self, first: int, count: int) -> None:
        self.busy[first:first + count] = bytes(count)

    def check_read(self, got: bytes, first: int, count: int, where: str) -> None:
        start = first * BLOCK
        expected = self.data[start:start + count * BLOCK]
        self.verified += len(got)
        if got == expected:
            return
        for i in range(count):  # a trimmed block may read as zeroes instead
            block = got[i * BLOCK:(i + 1) * BLOCK]
            old = expected[i * BLOCK:(i + 1) * BLOCK]
            if block != old and not (first + i in self.trimmed and block.count(0) == BLOCK):
                self.mismatches.append(f"{where}: block {first + i} differs from the model")
                return

    def written(self, first: int, data: bytes | None, count: int) -> None:
        start = first * BLOCK
        self.data[start:start + count * BLOCK] = data if data is not None else bytes(count * BLOCK)
        self.trimmed.difference_update(range(first, first + count))

    def check_extents(self, entries: list[int], first: int, count: int, where: str) -> None:
        """Every extent marked zero inside the range is zero in the model (or trimmed)."""
        pos, end = first * BLOCK, (first + count) * BLOCK
        for length, flags in zip(entries[::2], entries[1::2], strict=True):
            stop = min(pos + length, end)
            if flags & STATE_ZERO and pos < stop:
                lo, hi = pos // BLOCK, -(-stop // BLOCK)
                for b in range(lo, hi):
                    a, z = max(pos, b * BLOCK), min(stop, (b + 1) * BLOCK)
                    if b not in self.trimmed and self.data[a:z].count(0) != z - a:
                        self.mismatches.append(f"{where}: extent at {pos} says zero, block {b} is not")
                        return
                self.verified += stop - pos
            pos += length
            if pos >= end:
                return


# -------------------------------------------------------------- the clients

async def worker(h: AsyncNBD, model: Model, rng: random.Random, deadline: float, where: str) -> None:
    ops = ("read",) * 4 + ("write",) * 3 + ("zero", "trim", "flush", "status")
    while time.monotonic() < deadline and not model.failures:
        op = rng.choice(ops)
        if op == "flush":
            await h.flush()
            model.requests += 1
            continue
        claimed = model.claim(rng, MAX_OP_BLOCKS)
        if claimed is None:
            await asyncio.sleep(0)
            continue
        first, count = claimed
        offset, length = first * BLOCK, count * BLOCK
        try:
            if op == "read":
                model.check_read(await h.pread(length, offset), first, count, where)
            elif op == "write":
                data = rng.randbytes(length)
                await h.pwrite(data, offset, CMD_FLAG_FUA if rng.random() < 0.1 else 0)
                model.written(first, data, count)
            elif op == "zero":
                await h.zero(length, offset)
                model.written(first, None, count)
            elif op == "trim":
                await h.trim(length, offset)
                model.trimmed.update(range(first, first + count))
            else:
                extents = await h.block_status(length, offset)
                model.check_extents(extents["base:allocation"], first, count, where)
            model.requests += 1
        finally:
            model.release(first, count)


async def client(uri_unix: str, tcp_port: int | None, index: int, model: Model, depth: int,
                 deadline: float, seed: int) -> None:
    h = AsyncNBD()
    h.add_meta_context("base:allocation")
    unix = index % 2 == 0 or tcp_port is None
    where = f"client {index} ({'unix' if unix else 'tcp'})"
    try:
        if unix:
            await h.connect_unix(uri_unix)
        else:
            await h.connect_tcp("127.0.0.1", tcp_port)
        if not h.can_multi_conn():
            model.failures.append(f"{where}: the export does not advertise multi-conn")
            return
        rng = random.Random(f"{seed}:{index}")
        await asyncio.gather(*(worker(h, model, random.Random(rng.random()), deadline, where)
                               for _ in range(depth)))
        await h.shutdown()
    except Exception as exc:  # noqa: BLE001 (reported as a failure of the run)
        model.failures.append(f"{where}: {type(exc).__name__}: {exc}")
    finally:
        await h.close()


async def warm_up(sock: str) -> None:
    """One client first, so what a stack opens once and keeps (a cow overlay that holds a
    block: an empty one is dropped with its last client) is counted before the soak."""
    h = AsyncNBD()
    await h.connect_unix(sock)
    await h.pwrite(await h.pread(BLOCK, 0), 0)  # the same bytes back: the model is unchanged
    await h.shutdown()
    await h.close()


def start_server(server: str, stack: str, sock: str, image: str, size: int
                 ) -> tuple[subprocess.Popen[bytes], int | None]:
    """The server process and its TCP port (nbdkit: Unix socket only, no port)."""
    if server == "pynbd":
        proc = subprocess.Popen([sys.executable, __file__, "--serve", stack, sock, image, str(size)],
                                stdout=subprocess.PIPE)
        assert proc.stdout is not None
        return proc, int(proc.stdout.readline())
    args = {"memory": ["memory", str(size)], "file": ["file", image],
            "cow": ["--filter=cow", "file", image]}[stack]
    proc = subprocess.Popen(["nbdkit", "-f", "-U", sock, *args])
    deadline = time.monotonic() + 30
    while not os.path.exists(sock) and time.monotonic() < deadline:
        time.sleep(0.02)
    return proc, None


def soak(stack: str, minutes: float, clients: int, depth: int, size: int, seed: int,
         server: str = "pynbd") -> tuple[str, bool]:
    with tempfile.TemporaryDirectory(prefix="soak") as tmp:
        image = os.path.join(tmp, "disk.img")
        initial = bytes(size) if stack == "memory" else pattern(size)
        if stack != "memory":
            with open(image, "wb") as f:
                f.write(initial)
        sock = os.path.join(tmp, "sock")
        proc, port = start_server(server, stack, sock, image, size)
        try:
            pid = proc.pid
            # One client first: a layer may open what it keeps for the export's life at its
            # first client (cow's overlay); the counts before and after are taken without one.
            asyncio.run(warm_up(sock))
            if server == "nbdkit":
                time.sleep(0.5)  # its threads per connection: let the warm-up's end
            fds, threads = settled(pid, -1, 1 if server == "pynbd" else -1, timeout=2.0)
            model = Model(bytearray(initial))
            deadline = time.monotonic() + minutes * 60

            async def run_all() -> None:
                await asyncio.gather(*(client(sock, port, i, model, depth, deadline, seed)
                                       for i in range(clients)))

            started = time.monotonic()
            asyncio.run(run_all())
            elapsed = time.monotonic() - started
            fds_after, threads_after = settled(pid, fds, threads)
            rss = peak_rss_mib(pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    ok = (not model.mismatches and not model.failures and (fds, threads) == (fds_after, threads_after))
    over = "Unix and TCP" if port else "Unix"
    line = (f"soak {server} {stack}: {clients} clients over {over} x {depth} deep, {elapsed / 60:.1f} min: "
            f"requests {model.requests:,} ({model.requests / elapsed:,.0f}/s), "
            f"bytes verified {model.verified:,}, mismatches {len(model.mismatches)}, "
            f"peak RSS {rss:.0f} MiB, fds {fds} -> {fds_after}, threads {threads} -> {threads_after}"
            f"{'' if ok else ' FAILED'}")
    for problem in (model.mismatches + model.failures)[:10]:
        line += f"\n    {problem}"
    return line, ok


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        serve(argv[1], argv[2], argv[3], int(argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--stack", choices=(*STACKS, "all"), default="all")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--depth", type=int, default=4, help="commands in flight per client")
    parser.add_argument("--size", type=parse_size, default=parse_size("64M"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--server", choices=("pynbd", "nbdkit"), default="pynbd",
                        help="nbdkit for comparison (it listens on a Unix socket only)")
    args = parser.parse_args(argv)
    ok = True
    for stack in STACKS if args.stack == "all" else (args.stack,):
        line, passed = soak(stack, args.minutes, args.clients, args.depth, args.size, args.seed,
                            args.server)
        print(line, flush=True)
        ok = ok and passed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
