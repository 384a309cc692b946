"""tmpdisk: a fresh, formatted disk for each client, deleted when it disconnects.

    pynbd serve tmpdisk 16G                        # ext4 for every client
    pynbd serve tmpdisk 1G type=xfs label=scratch
    pynbd serve tmpdisk 1G command='truncate -s $size "$disk"'      # a blank disk
    pynbd serve tmpdisk 1G dir=$PWD/skel command='
        truncate -s $size "$disk"; mke2fs -q -F -t ext4 -d "$dir" "$disk"'
    pynbd serve tmpdisk size=0 base=$PWD/base.img command='cp --sparse=always "$base" "$disk"'

The "remote tmpfs" for thin clients: each client that connects gets its own
disk, made when it connects and gone when it disconnects; concurrent clients
never see each other's. (For one disk all clients share, see ``memory``.)

Parameters (nbdkit's names)
    size=SIZE         the size of the disk (the magic parameter). With
                      command=, only a request: the disk is whatever file the
                      command makes.
    type=FS           the file system mkfs makes (default ext4; xfs, vfat,
                      btrfs, ... whatever ``mkfs -t`` knows here)
    label=LABEL       its label (default none)
    command=SCRIPT    a shell script that makes the disk instead of mkfs: it
                      must create the file ``$disk``; ``$size`` (bytes), ``$type``
                      and ``$label`` are set, and every other KEY=VALUE given
                      after the plugin name becomes the shell variable ``$KEY``

Behaviour
    - The disk is a sparse file in a new private directory under $TMPDIR
      (/var/tmp when TMPDIR is not set). It is unlinked, with its directory,
      as soon as it is open, so nothing is left behind even if pynbd is
      killed; its blocks are freed when the client disconnects.
    - If mkfs or the command fails (or makes no file), that client is
      refused (the server goes on serving others) and the command's exit
      status and stderr are logged.
    - Once made, the disk is served as the ``file`` plugin serves a file:
      reads and writes in place, trim punches holes, extents from the holes
      of the file. Multi-conn is not advertised: a second connection is a
      different disk.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from ..backend import ConfigError, Connection, OpenContext, Param, Plugin
from ..backend.params import UNKNOWN_PAIRS
from .file import FileConnection

log = logging.getLogger("pynbd.plugins.tmpdisk")

# What runs when no command= is given: nbdkit's default, with mkfs's options
# for file systems that need them to write to a plain file without asking.
MKFS_SCRIPT = r"""
labelopt=-L
case "$type" in
    ext?) extra=-F ;;
    *fat|msdos) extra=-I; labelopt=-n ;;
    ntfs) extra='-Q -F'; labelopt=-L ;;
    xfs|btrfs) extra=-f ;;
    *) extra= ;;
esac
truncate -s "$size" "$disk"
if [ -z "$label" ]; then
    mkfs -t "$type" $extra "$disk"
else
    mkfs -t "$type" $extra $labelopt "$label" "$disk"
fi
"""


class TmpDiskConnection(FileConnection):
    """One client's own disk (a file served as the file plugin serves one)."""

    def can_multi_conn(self) -> bool:
        return False


class TmpDiskPlugin(Plugin):
    name = "tmpdisk"
    magic_param = "size"
    short_requests = True
    accept_unknown_params = True
    params: ClassVar[Sequence[Param]] = (
        Param("size", "size", "size of each disk (with command=, a request)", required=True),
        Param("type", "str", "file system type for mkfs", default="ext4"),
        Param("label", "str", "file system label", default=""),
        Param("command", "str", "shell script that makes $disk instead of mkfs"),
    )
    size: int
    type: str
    label: str
    command: str | None

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        super().__init__(values)
        self.variables: dict[str, str] = dict((values or {}).get(UNKNOWN_PAIRS, []))

    def config_complete(self) -> None:
        for key in self.variables:
            if not key.isidentifier() or key in ("disk", "size"):
                raise ConfigError(f"tmpdisk: {key}: not a parameter, and not a name a shell "
                                  "variable may have")
            if hasattr(TmpDiskPlugin, key):
                raise ConfigError(f"tmpdisk: {key}: a name the plugin uses itself; choose another "
                                  "variable name")
        if self.variables and self.command is None:
            raise ConfigError(f"tmpdisk: unknown parameter {next(iter(self.variables))!r} (extra "
                              "KEY=VALUE parameters are variables for command=)")
        self.directory = os.environ.get("TMPDIR") or "/var/tmp"
        if not os.path.isdir(self.directory):
            raise ConfigError(f"tmpdisk: the directory for disks {self.directory!r} does not exist "
                              "(set TMPDIR)")

    def open(self, ctx: OpenContext) -> Connection:
        private = tempfile.mkdtemp(prefix="tmpdisk", dir=self.directory)
        disk = os.path.join(private, "disk")
        try:
            self.make(disk)
            try:
                fd = os.open(disk, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise OSError(errno.EIO, f"tmpdisk: the command made no disk: {exc.strerror}") from None
        finally:
            shutil.rmtree(private, ignore_errors=True)  # unlinked now; gone when closed
        try:
            return TmpDiskConnection(fd, writable=not ctx.readonly)
        except BaseException:
            os.close(fd)
            raise

    def make(self, disk: str) -> None:
        """Run mkfs or the command to make ``disk``; OSError (logged) if it fails."""
        env = {**os.environ, **self.variables, "disk": disk, "size": str(self.size),
               "type": self.type, "label": self.label}
        script = self.command if self.command is not None else MKFS_SCRIPT
        result = subprocess.run(["/bin/sh", "-c", script], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                cwd=os.path.dirname(disk))
        if result.returncode != 0:
            what = "command" if self.command is not None else f"mkfs -t {self.type}"
            stderr = result.stderr.decode(errors="replace").strip()
            log.error("tmpdisk: %s failed with exit status %d: %s", what, result.returncode,
                      stderr or "(nothing on stderr)")
            raise OSError(errno.EIO, f"tmpdisk: {what} failed with exit status {result.returncode}")
