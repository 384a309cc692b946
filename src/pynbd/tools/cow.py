"""pynbd cow — commit a persistent cow overlay into its base, or export it as qcow2.

Usage:
    pynbd cow show PATH
    pynbd cow commit PATH TARGET [--force]
    pynbd cow export PATH OUT.qcow2 --backing BASE [--backing-format FMT] [--force]

PATH is the overlay a server kept with ``pynbd serve --filter=cow ...
cow-file=PATH``. Stop that server first: these commands read the overlay
while nothing else writes it.

``show`` prints the overlay's disk size, block size, the base it was made
for and how many blocks it holds (data, zeroes).

``commit`` writes every block of the overlay into TARGET — the base, as a
file or block device, or an NBD URI (``nbd://host/export``,
``nbd+unix:///?socket=/tmp/sock``) serving it — flushes TARGET, and then
empties the overlay, which is made anew for the committed base, so the same
server command line starts again. TARGET must have the overlay's size and be
the base it was made for (the fingerprint the server records); ``--force``
skips the fingerprint check, for instance to finish a commit that was
interrupted (writing the same blocks twice does no harm; the overlay is
emptied only once all of them are flushed).

``export`` writes the overlay as a qcow2 image whose backing file is BASE
(format raw unless ``--backing-format`` says otherwise), so qemu can use it:
``qemu-img info``, ``qemu-img check``, ``qemu-img compare`` against the
served export, ``qemu-img commit`` into BASE. Zeroed blocks are zero
clusters (qcow2 version 3); clusters are the overlay's blocks, or 2 MiB
pieces of larger ones. A relative BASE is stored relative to OUT.qcow2's
directory, as qemu reads it. The image is written next to OUT.qcow2 and
renamed into place when complete. BASE must match the overlay (size and
fingerprint) unless ``--force``.

Errors are one line on stderr, exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

from ..backend import ConfigError, Connection, OpenContext
from ..backend.chunkstore import ChunkState, ChunkStore
from ..backend.overlay import fingerprint
from ..backend.stack import Stack
from ..client.blocking import NBD, connect
from ..client.errors import NBDError
from ..formats.qcow2 import MAX_CLUSTER_BITS, Qcow2Error, write_image

PROG = "pynbd cow"
PIECE = 4 << 20  # the most bytes sent to a target in one request


class NbdDisk(Connection):
    """An NBD export as a Connection, for ``fingerprint`` and the commit."""

    def __init__(self, handle: NBD) -> None:
        self.handle = handle

    def get_size(self) -> int:
        return self.handle.get_size()

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self.handle.pread_into(buf, offset)

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        self.handle.pwrite(buf, offset)

    def zero(self, count: int, offset: int, flags: int) -> None:
        if self.handle.can_zero():
            self.handle.zero(count, offset)
        else:
            Connection.zero(self, count, offset, flags)

    def flush(self, flags: int) -> None:
        if self.handle.can_flush():
            self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def open_disk(target: str, readonly: bool) -> Connection:
    """A file, block device or NBD URI, opened through pynbd's file plugin or client."""
    if "://" in target:
        return NbdDisk(connect(target))
    stack = Stack.from_args("file", [target])
    return stack.open(OpenContext(readonly=readonly))


def check_base(store: ChunkStore, disk: Connection, name: str, force: bool) -> None:
    """Refuse a disk that is not the overlay's base (size always, fingerprint unless forced)."""
    size = disk.get_size()
    if size != store.size:
        raise ConfigError(f"{name} is {size} bytes; the overlay {store.path} is for a "
                          f"{store.size}-byte disk")
    if not force and fingerprint(disk) != store.identity:
        raise ConfigError(f"{name} is not the base the overlay {store.path} was made for "
                          f"(its contents differ); --force to use it anyway")


def show(path: str) -> int:
    with ChunkStore.open_existing(path, writable=False) as store:
        chunks = store.chunks()
        zeroes = sum(1 for _, state in chunks if state == ChunkState.ZERO)
        print(f"size: {store.size}\nblock size: {store.chunk_size}\nbase: {store.identity}\n"
              f"blocks: {len(chunks)} ({len(chunks) - zeroes} data, {zeroes} zero)")
    return 0


def commit(path: str, target: str, force: bool) -> int:
    store = ChunkStore.open_existing(path)
    try:
        disk = open_disk(target, readonly=False)
        try:
            check_base(store, disk, target, force)
            size, block = store.size, store.chunk_size
            buf = memoryview(bytearray(min(block, PIECE)))
            for chunk, state in store.chunks():
                start = chunk * block
                end = min(start + block, size)
                for offset in range(start, end, PIECE):
                    n = min(PIECE, end - offset)
                    if state == ChunkState.ZERO:
                        disk.zero(n, offset, 0)
                    else:
                        store.read(chunk, buf[:n], offset - start)
                        disk.pwrite(buf[:n], offset, 0)
            disk.flush(0)
            identity = fingerprint(disk)
        finally:
            disk.close()
    finally:
        store.close()
    renew(path, store, identity)
    return 0


def renew(path: str, old: ChunkStore, identity: str) -> None:
    """Replace the overlay at ``path`` by an empty one for the committed base (atomically)."""
    temporary = f"{path}.new"
    if os.path.exists(temporary):
        os.unlink(temporary)
    ChunkStore.open(temporary, chunk_size=old.chunk_size, size=old.size, identity=identity).close()
    os.rename(temporary, path)
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def clusters(store: ChunkStore, cluster: int) -> Iterator[tuple[int, memoryview | None]]:
    """(guest offset, bytes or None for zeroes) of every cluster the overlay holds, in order."""
    buf = memoryview(bytearray(cluster))
    for chunk, state in store.chunks():
        start = chunk * store.chunk_size
        for offset in range(start, min(start + store.chunk_size, store.size), cluster):
            if state == ChunkState.ZERO:
                yield offset, None
            else:
                n = min(cluster, store.size - offset)
                store.read(chunk, buf[:n], offset - start)
                yield offset, buf[:n]


def export(path: str, out: str, backing: str, backing_format: str, force: bool) -> int:
    with ChunkStore.open_existing(path, writable=False) as store:
        if backing_format == "raw":
            base = open_disk(backing, readonly=True)
            try:
                check_base(store, base, backing, force)
            finally:
                base.close()
        stored = backing if os.path.isabs(backing) else \
            os.path.relpath(os.path.abspath(backing), os.path.dirname(os.path.abspath(out)))
        cluster = min(store.chunk_size, 1 << MAX_CLUSTER_BITS)
        temporary = f"{out}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            def write(offset: int, data: bytes | bytearray | memoryview) -> None:
                done, view = 0, memoryview(data)
                while done < len(view):
                    done += os.pwrite(fd, view[done:], offset + done)

            length = write_image(write, store.size, clusters(store, cluster), cluster_size=cluster,
                                 backing_file=stored, backing_format=backing_format)
            os.ftruncate(fd, length)
            os.fsync(fd)
        except BaseException:
            os.unlink(temporary)
            raise
        finally:
            os.close(fd)
        os.rename(temporary, out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Persistent cow overlays (cow-file=PATH).")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("show", help="what the overlay holds")
    s.add_argument("path", metavar="PATH")
    c = sub.add_parser("commit", help="write the overlay into its base, then empty it")
    c.add_argument("path", metavar="PATH")
    c.add_argument("target", metavar="TARGET", help="the base: a file, a block device or an NBD URI")
    c.add_argument("--force", action="store_true", help="skip the check that TARGET is the base")
    e = sub.add_parser("export", help="write the overlay as a qcow2 image backed by the base")
    e.add_argument("path", metavar="PATH")
    e.add_argument("out", metavar="OUT.qcow2")
    e.add_argument("--backing", required=True, metavar="BASE")
    e.add_argument("--backing-format", default="raw", metavar="FMT")
    e.add_argument("--force", action="store_true", help="skip the check that BASE is the base")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv in ([], ["-h"], ["--help"]):
        print(__doc__.strip())
        return 0 if argv else 1
    args = build_parser().parse_args(argv)
    try:
        if args.command == "show":
            return show(args.path)
        if args.command == "commit":
            return commit(args.path, args.target, args.force)
        return export(args.path, args.out, args.backing, args.backing_format, args.force)
    except (ConfigError, Qcow2Error, NBDError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
    except OSError as exc:
        name = f"{exc.filename}: " if exc.filename else ""
        print(f"{PROG}: {name}{exc.strerror or exc}", file=sys.stderr)
    return 1
