"""pynbd fuse — an NBD export as a file in the local file system (libnbd's nbdfuse).

Usage:
    pynbd fuse [-C N] [-L] [-o FUSE-OPTION] [-P PIDFILE] [-r] [-s] [-v]
               [--readahead=SIZE] MOUNTPOINT[/FILENAME] URI
    pynbd fuse [OPTIONS] MOUNTPOINT[/FILENAME] [ CMD ARGS ... ]
    pynbd fuse [OPTIONS] MOUNTPOINT[/FILENAME] --socket-activation CMD ARGS ...
    fusermount3 -u MOUNTPOINT                 to unmount

Reads and writes of the file become reads and writes of the export. The
mountpoint decides what the file is:

- an existing regular file: the file itself is mounted over ("naked"),
  ``touch disk.raw; pynbd fuse disk.raw URI`` makes ``disk.raw`` the export;
- an existing directory: the export is ``MOUNTPOINT/nbd``;
- ``DIR/NAME`` where ``DIR`` exists and ``NAME`` does not: the export is
  ``DIR/NAME``;
- with ``-L``, a directory: one file per export the server lists
  (NBD_OPT_LIST), named after the export (the default export ``""`` is
  ``nbd``; names with a ``/`` are left out).

The server is an NBD URI (``nbd://host/export``, ``nbd+unix:///?socket=S``,
``nbds://`` with TLS) or a server run for the mount, written between
brackets or after ``--socket-activation`` (it is handed a listening socket
by systemd socket activation: qemu-nbd, nbdkit and pynbd serve understand
it). That server is stopped when the file system is unmounted.

pynbd fuse runs in the foreground; put it in the background with ``&``. It
unmounts and exits with status 0 on ``fusermount3 -u MOUNTPOINT``, SIGTERM,
SIGINT or SIGHUP (the server, if it started one, is stopped first).

Examples:
    touch disk.raw
    pynbd fuse disk.raw [ qemu-nbd -f qcow2 disk.qcow2 ] &
    sfdisk disk.raw < layout; mkfs.ext4 -E offset=1048576 disk.raw ...
    mount -o loop disk.raw /mnt          (or losetup -P)
    fusermount3 -u disk.raw              qemu-nbd stops, disk.qcow2 is whole

    mkdir mnt; pynbd fuse -L mnt nbd://server &    one file per export
    pynbd fuse -r mnt/disk.iso nbd://server/iso &

What reaches the server:
    read, write          READ, WRITE (of the size the kernel asks, up to 1 MiB)
    fsync, fdatasync     FLUSH
    fallocate --punch-hole   TRIM (WRITE_ZEROES if the server cannot trim)
    fallocate --zero-range   WRITE_ZEROES with NO_HOLE
Closing the file sends nothing: as with a disk, only fsync makes writes
durable. The file's size is the export's and cannot change (truncating to
another size is EINVAL); writes past the end are ENOSPC.

Options:
    -C, --connections=N  connections per export when the server allows more
                       than one (NBD multi-conn); default 4. A server run
                       for the mount gets one.
    -L, --list         directory mode: one file per export (see above)
    -o, --fuse-option=OPT  a FUSE mount option (``allow_other``,
                       ``kernel_cache``, ``uid=N`` ...); repeatable, or
                       several separated by commas. ``-o direct_io`` bypasses
                       the page cache: each read or write is one request of
                       the size the program asked for (up to 1 MiB), with no
                       read-ahead (and no shared mmap of the file)
    -P, --pidfile=FILE write the process id to FILE once the file system is
                       mounted and its read-ahead set (scripts wait for it)
    --readahead=SIZE   the mount's read-ahead (``4M``, ``1024K``; 0 keeps the
                       kernel's 128 KiB); default 4M. Sequential reads through
                       the page cache then reach the server as requests of up
                       to 1 MiB, several in flight, instead of 128 KiB ones.
                       Only root may change it (it is the mount's
                       /sys/class/bdi/0:N/read_ahead_kb); for other users the
                       kernel's stays
    -r, --readonly     read-only: the file is mode 0444 and writes fail with
                       EROFS (also when the server is read-only)
    -s                 one FUSE thread (requests one at a time)
    -v, --verbose, -d  libfuse's debug output: every request, on stderr
    -V, --version      print the version

Threads: FUSE's threads (libfuse's multi-threaded loop) call in directly,
each waiting for its reply; every connection has many commands in flight,
and the requests are spread over the connections in turn.

Errors: a bad URI, an unreachable server, an unknown export, a mountpoint
that is neither a file nor a directory, or a failing mount print one line
``pynbd fuse: WHAT`` on stderr and exit with status 1. A request the server
fails returns its errno to the program that made it.

Limits: nbdfuse's --command, --fd, --tcp, --unix and --vsock modes are not
there (write the URI: ``nbd://host:port``, ``nbd+unix:///?socket=PATH``). A
server run for the mount gets one connection, as with nbdfuse. Debian 12's
libfuse 3.14.0 prints "Ignoring invalid max threads value 4294967295" when
it starts (its bug, harmless). A pidfile inside the mount itself cannot be
written (an error line; the mount goes on).

Needs libfuse 3 (Debian: fuse3) and mfusepy (``pip install 'pynbd[fuse]'``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn

from ..backend.params import parse_size
from ..client.captive import Captive, spawn_activated
from ..client.errors import NBDError
from ..client.sync import NBD
from ..client.target import UsageError, add_version, report, split_target, usage_error
from ..client.uri import NBDURI, format_uri
from .fusing.files import ExportFile
from .fusing.mount import MountError, mount

PROG = "pynbd fuse"
DEFAULT_FILE = "nbd"  # nbdfuse's name for the file in a mounted directory
DEFAULT_READAHEAD = 4 * 1024 * 1024


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, add_help=False)
    parser.add_argument("-h", "--help", action="store_true")
    add_version(parser)
    parser.add_argument("-C", "--connections", type=int, default=4)
    parser.add_argument("-L", "--list", action="store_true")
    parser.add_argument("-o", "--fuse-option", action="append", default=[])
    parser.add_argument("-P", "--pidfile")
    parser.add_argument("--readahead", type=_size, default=DEFAULT_READAHEAD)
    parser.add_argument("-r", "--readonly", action="store_true")
    parser.add_argument("-s", dest="single", action="store_true")
    parser.add_argument("-v", "-d", "--verbose", action="store_true")
    parser.add_argument("mountpoint", nargs="?")
    parser.add_argument("uri", nargs="?")
    return parser


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str] | None]:
    """(options, captive command or None); ``--socket-activation`` ends the options."""
    args = list(argv)
    captive: list[str] | None = None
    if "--socket-activation" in args and ("[" not in args or
                                          args.index("--socket-activation") < args.index("[")):
        at = args.index("--socket-activation")
        args, captive = args[:at], args[at + 1:]
        if not captive:
            raise UsageError("--socket-activation: no command")
    else:
        try:
            args, captive = split_target(args)
        except NBDError as exc:
            raise UsageError(str(exc)) from None
    parser = build_parser()
    parser.error = _usage  # type: ignore[method-assign]
    return parser.parse_intermixed_args(args), captive


def _usage(message: str) -> NoReturn:
    raise UsageError(message)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise UsageError(f"--readahead: {exc}") from None


@dataclass
class Place:
    """Where the mount goes and what the file (in directory mode, files) is called."""

    mountpoint: str
    naked: bool
    filename: str = DEFAULT_FILE


def place(path: str, listing: bool) -> Place:
    """nbdfuse's rules: a file is mounted over, a directory holds ``nbd``, ``DIR/NAME``."""
    if os.path.isfile(path):
        if listing:
            raise UsageError(f"{path}: -L needs a directory")
        return Place(path, naked=True)
    if os.path.isdir(path):
        return Place(path, naked=False)
    parent, name = os.path.split(path.rstrip("/"))
    if not listing and name and os.path.isdir(parent or "."):
        return Place(parent or ".", naked=False, filename=name)
    raise UsageError(f"{path}: no such file or directory")


@dataclass
class Session:
    """What a mount holds open: the exports' connections and a server run for it."""

    captive: Captive | None = None
    handles: list[NBD] = field(default_factory=list)
    files: list[ExportFile] = field(default_factory=list)

    def connect(self, uri: str, export: str | None) -> NBD:
        """One connection to ``uri`` (to ``export`` instead of the URI's, if given)."""
        h = NBD()
        self.handles.append(h)
        h.set_opt_mode(True)
        h.connect_uri(uri)
        if export is not None:
            h.set_export_name(export)
        h.opt_go()
        return h

    def close(self) -> None:
        """Disconnect, then stop the server run for the mount."""
        for f in self.files:
            f.close()
        for h in self.handles:
            h.close()
        if self.captive is not None:
            self.captive.close()


def open_exports(session: Session, uri: str, args: argparse.Namespace, where: Place) -> None:
    """Connect to each export to be shown (with ``-C`` connections where allowed)."""
    wanted: list[tuple[str, str | None]] = [(where.filename, None)]
    first: NBD | None = None
    if args.list:
        first = NBD()
        session.handles.append(first)
        first.set_opt_mode(True)
        first.connect_uri(uri)
        wanted = [(name or DEFAULT_FILE, name) for name, _ in first.opt_list() if "/" not in name]
        if not wanted:
            raise UsageError("the server lists no exports")
    connections = 1 if session.captive is not None else max(1, args.connections)
    for filename, export in wanted:
        if first is not None:  # the listing connection serves the first export
            h, first = first, None
            h.set_export_name(export or "")
            h.opt_go()
        else:
            h = session.connect(uri, export)
        handles = [h]
        if h.can_multi_conn():
            handles += [session.connect(uri, export) for _ in range(connections - 1)]
        session.files.append(ExportFile(filename, handles, args.readonly))


def pidfile_writer(path: str | None) -> Callable[[], None]:
    """Write our pid to ``path`` (all at once: a reader never sees half of it).

    ``mount`` calls it on a thread of its own once the mount answers, so a
    pidfile inside the mount itself does not wait for us forever.
    """
    def write() -> None:
        if path is None:
            return
        temporary = f"{path}.{os.getpid()}.tmp"
        try:
            with open(temporary, "w", encoding="ascii") as out:
                out.write(f"{os.getpid()}\n")
            os.replace(temporary, path)
        except OSError as exc:
            print(f"{PROG}: pidfile {path}: {exc.strerror}", file=sys.stderr)

    return write


def fuse_options(values: list[str]) -> dict[str, str | bool]:
    """``-o a,b=c -o d`` as {"a": True, "b": "c", "d": True}."""
    options: dict[str, str | bool] = {}
    for value in values:
        for item in filter(None, value.split(",")):
            key, eq, setting = item.partition("=")
            options[key] = setting if eq else True
    return options


def run(args: argparse.Namespace, captive: list[str] | None) -> int:
    # libfuse changes directory to / once mounted: make the paths absolute first.
    where = place(os.path.abspath(args.mountpoint), args.list)
    pidfile = os.path.abspath(args.pidfile) if args.pidfile else None
    session = Session()
    try:
        if captive is not None:
            path, session.captive = spawn_activated(captive)
            uri = format_uri(NBDURI(transport="unix", tls=False, socket=path))
        else:
            uri = args.uri
        open_exports(session, uri, args, where)
        mount(session.files, where.mountpoint, naked=where.naked, single_thread=args.single,
              debug=args.verbose, options=fuse_options(args.fuse_option),
              readahead=args.readahead, on_ready=pidfile_writer(pidfile))
    finally:
        session.close()
    return 0


def main(argv: list[str]) -> int:
    try:
        args, captive = parse_args(argv)
        if args.help:
            print(__doc__.strip())
            return 0
        if args.mountpoint is None or (captive is None) == (args.uri is None):
            raise UsageError("give MOUNTPOINT and one NBD URI or [ CMD ... ]; see --help")
        return report(PROG, lambda: run(args, captive))
    except UsageError as exc:
        return usage_error(PROG, exc)
    except MountError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
