"""pynbd backup — full and incremental backups of an NBD export, on dirty bitmaps.

Usage:
    pynbd backup full URI DIR [--control=SOCKET] [--checkpoint=NAME] [-C N] [-p]
    pynbd backup inc URI DIR --control=SOCKET [--checkpoint=NAME] [-C N] [-p]
    pynbd backup inc URI DIR --checkpoint=NAME [-C N] [-p]
    pynbd backup restore DIR TARGET [--at=CHECKPOINT] [-C N] [-p]
    pynbd backup list DIR [--json]

A server that tracks changed blocks (``pynbd serve --filter=cbt …
--control=SOCKET``, or qemu-nbd ``-B NAME``) tells which blocks changed
since a checkpoint through the meta context ``qemu:dirty-bitmap:NAME``. An
incremental backup copies only those blocks (those that hold data; changed
blocks that now read as zeroes are recorded as zeroes):

    $ pynbd serve -U /tmp/nbd --control=/tmp/ctl --filter=cbt file disk.img bitmap-dir=/var/cbt
    $ pynbd backup full "nbd+unix:///?socket=/tmp/nbd" /backups/disk --control=/tmp/ctl
    ... the disk is written ...
    $ pynbd backup inc "nbd+unix:///?socket=/tmp/nbd" /backups/disk --control=/tmp/ctl -p
    $ pynbd backup list /backups/disk
    $ pynbd backup restore /backups/disk restored.img --at backup-3f2a9c1e-0001

``full`` copies every allocated block; with ``--control`` it first has the
server take a checkpoint (``checkpoint create``), from which the next
``inc`` continues. ``inc`` checks that the previous backup's checkpoint is
on the server and consistent, has the server take the next checkpoint,
then copies what changed since the previous one (the union of its bitmap
and those of any checkpoint taken since, say by a backup that failed),
over up to ``-C`` connections (4 by default) when the server allows
several (multi-conn) and there is enough to read (one per 256 MiB). A
backup that fails or is killed leaves DIR as it was. Checkpoints are named
``backup-ID-NNNN`` unless ``--checkpoint`` says otherwise. Without a
control socket (qemu-nbd), you start the bitmaps yourself (``qemu-img
bitmap --add disk.qcow2 NAME``) and name with ``--checkpoint=NAME`` the
one that starts with this backup; ``inc`` reads the previous backup's
bitmap, which the server must export (``-B NAME``).

For a backup of one instant, write nothing while it runs, or back up a
snapshot export: writes that land during a backup are in the next
checkpoint's bitmap, so the next incremental copies them again.

Storage (DIR): one qcow2 image per backup, ``0000.qcow2`` a full one,
each incremental holding only the clusters that changed and naming the
previous image as its backing file, plus ``manifest.json`` (the export's
name and size, each backup's checkpoint, the bitmaps it read, its times and
sizes). qcow2 because anyone can restore without pynbd::

    qemu-img convert -O raw /backups/disk/0003.qcow2 disk.img

``restore`` writes the disk as it was at a checkpoint (default: the last
backup; ``--at`` takes a checkpoint name or a backup number) to TARGET,
which is anything ``pynbd copy`` writes to: a file, a block device, an NBD
URI, ``-``. ``list`` prints the backups (``--json``: the manifest's list).

Options:
    --control=SOCKET   the server's control socket (``pynbd serve --control``)
    --checkpoint=NAME  the checkpoint this backup starts (see above)
    -C, --connections=N  at most N connections to read with (default 4; one per
                       256 MiB to read; 1 unless the server offers multi-conn)
    -p, --progress     a progress bar on stderr
    --at=CHECKPOINT    restore the disk as it was at this checkpoint (or backup number)
    --json             list as JSON

Refusals (one line on stderr, exit status 1, nothing written): a DIR that
holds backups of another export (its name or size differ) or that is not
empty and holds no backup; ``inc`` without a previous backup, or whose
previous checkpoint the server does not know; a checkpoint the server
marks inconsistent (it stopped uncleanly and may have missed writes): take
a full backup; a checkpoint name that exists; ``restore --at`` a checkpoint
that has no backup. Another backup running in DIR is refused too.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from ..client.errors import NBDError
from ..proto.errors import ProtocolError
from .backups.manifest import BackupError, Directory, Manifest
from .backups.take import TakeOptions, take_backup
from .copying.endpoint import CopyError

PROG = "pynbd backup"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{PROG}: {message}; see --help", file=sys.stderr)
        raise SystemExit(1)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, add_help=False)
    p.add_argument("-h", "--help", action="store_true")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    for name in ("full", "inc"):
        take = sub.add_parser(name, add_help=False)
        take.add_argument("uri")
        take.add_argument("directory")
        take.add_argument("--control")
        take.add_argument("--checkpoint")
        _common(take)
    restore = sub.add_parser("restore", add_help=False)
    restore.add_argument("directory")
    restore.add_argument("target")
    restore.add_argument("--at")
    _common(restore)
    listing = sub.add_parser("list", add_help=False)
    listing.add_argument("directory")
    listing.add_argument("--json", action="store_true")
    return p


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-C", "--connections", type=connections, default=4)
    p.add_argument("-p", "--progress", action="store_true")


def connections(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or "-h" in argv or "--help" in argv:
        print(__doc__.strip())
        return 0 if argv else 1
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("full", "inc"):
            backup = take_backup(TakeOptions(args.uri, args.directory, args.command == "inc",
                                             args.control, args.checkpoint, args.connections,
                                             args.progress), sys.stderr)
            print(f"{backup.file}: {backup.kind}, checkpoint {backup.checkpoint or '-'}, "
                  f"{backup.data} bytes of data, {backup.zero} bytes of zeroes")
        elif args.command == "restore":
            restore(args.directory, args.target, args.at, args.connections, args.progress)
        else:
            print(listing(Directory(args.directory).load(), args.json))
    except (BackupError, CopyError, NBDError, ProtocolError, OSError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def restore(directory: str, target: str, at: str | None, connections: int, progress: bool) -> None:
    # Imported here, not at start-up: a backup (timed against its peers) needs none of them.
    from .backups.chain import ChainEndpoint
    from .copying.options import CopyOptions, spec_for
    from .copying.run import run_copy

    where = Directory(directory)
    manifest = where.load()
    top = manifest.find(at)
    chain = [where.path / b.file for b in manifest.chain(top)]
    source = ChainEndpoint(f"{directory} at {top.checkpoint or top.number}", chain)
    opts = CopyOptions(destination=spec_for(target), connections=connections, progress=progress,
                       flush=True)
    run_copy(opts, source=source)


def listing(manifest: Manifest, as_json: bool) -> str:
    from .ctl import readable
    if as_json:
        return json.dumps({"export": manifest.export,
                           "backups": [asdict(b) for b in manifest.backups]}, indent=2)
    return readable([{"number": b.number, "file": b.file, "kind": b.kind,
                      "checkpoint": b.checkpoint or "-", "since": ",".join(b.since) or "-",
                      "finished": b.finished, "data": b.data, "file_size": b.file_size}
                     for b in manifest.backups])
