"""ondemand: a persistent file system per export name, made on first use.

    mkdir /var/tmp/exports
    pynbd serve ondemand dir=/var/tmp/exports 1G
    nbdinfo 'nbd+unix:///export1?socket=...'       # creates /var/tmp/exports/export1
    pynbd serve ondemand dir=/srv/fs 10G type=xfs label=data wait=true
    pynbd serve ondemand dir=/srv/fs 1G command='truncate -s $size "$disk"'

A client asks for any export name; if ``DIR/NAME`` does not exist yet, a
sparse file of ``size`` bytes is made there and formatted with mkfs. The
file stays: the client (or any later one, after a server restart too) finds
the same file system under the same name. The admin deletes them.

Parameters (nbdkit's names)
    dir=DIR           where the file systems are kept (required; must exist)
    [size=]SIZE       the size of each new file system (the magic parameter,
                      required; with command=, only a suggestion)
    type=FS           the file system mkfs makes (default ext4)
    label=LABEL       its label (default none)
    command=SCRIPT    a shell script that makes ``$disk`` instead of mkfs, as
                      for ``tmpdisk``: ``$size``, ``$type``, ``$label`` and any
                      other KEY=VALUE given after the plugin name are set
    wait=true         a second client asking for an export in use waits for
                      the first to disconnect (default: it is refused with
                      "filesystem is locked by another client")

Behaviour
    - Export names are at most 255 bytes and may not contain ``.``, ``/``
      or ``:``; others are refused. The default export "" is the file
      ``default``. ``nbdinfo --list`` lists the file systems made so far.
    - A new file system is made under a temporary name in DIR and linked
      into place only when mkfs succeeded, so a failed or interrupted mkfs
      never leaves a half-made export behind, and two clients creating the
      same name at once end up sharing one file system.
    - Each file system is locked (flock) while a client uses it. It is
      served as the ``file`` plugin serves a file (trim punches holes,
      extents from the file's holes); multi-conn is not advertised.
    - Clients can fill the server's disk by making many exports: limit who
      connects (``--filter=ip``, TLS).
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from collections.abc import Sequence
from typing import ClassVar

from ..backend import ConfigError, Connection, Export, OpenContext, Param
from .tmpdisk import TmpDiskConnection, TmpDiskPlugin

NAME_MAX = 255
_FORBIDDEN = frozenset("./:\0")


class OndemandPlugin(TmpDiskPlugin):
    name = "ondemand"
    short_requests = False  # wait=true blocks in open; mkfs runs in open
    params: ClassVar[Sequence[Param]] = (
        Param("dir", "path", "the directory of the file systems", required=True),
        *TmpDiskPlugin.params,
        Param("wait", "bool", "wait for an export in use instead of refusing", default=False),
    )
    dir: str
    wait: bool

    def config_complete(self) -> None:
        super().config_complete()
        if not os.path.isdir(self.dir):
            raise ConfigError(f"ondemand: dir: {self.dir}: not a directory")

    def list_exports(self, ctx: OpenContext) -> list[Export]:
        return [Export(name) for name in sorted(os.listdir(self.dir))
                if valid_name(name) and os.path.isfile(os.path.join(self.dir, name))]

    def open(self, ctx: OpenContext) -> Connection:
        name = ctx.export_name or "default"
        if not valid_name(name):
            raise LookupError(f"ondemand: invalid export name {name!r} rejected")
        path = os.path.join(self.dir, name)
        if not os.path.exists(path):
            self.create(path)
        fd = os.open(path, (os.O_RDONLY if ctx.readonly else os.O_RDWR) | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise OSError(errno.EBUSY, f"ondemand: {name}: filesystem is locked by another "
                              "client") from None
            return TmpDiskConnection(fd, writable=not ctx.readonly)
        except BaseException:
            os.close(fd)  # closing drops the lock
            raise

    def create(self, path: str) -> None:
        """Make the file system under a temporary name, then link it to ``path``."""
        private = tempfile.mkdtemp(prefix=".ondemand", dir=self.dir)
        disk = os.path.join(private, "disk")
        try:
            self.make(disk)
            try:
                os.link(disk, path)
            except FileExistsError:
                return  # another client made it first: use theirs
            except FileNotFoundError:
                raise OSError(errno.EIO, "ondemand: the command made no disk") from None
        finally:
            for leftover in os.listdir(private):
                os.unlink(os.path.join(private, leftover))
            os.rmdir(private)


def valid_name(name: str) -> bool:
    """Whether ``name`` may be an export (and so a file name in DIR)."""
    return 0 < len(name.encode()) <= NAME_MAX and not _FORBIDDEN.intersection(name)


PLUGIN = OndemandPlugin
