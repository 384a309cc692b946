"""iso: a CD/DVD (ISO 9660) image made from directories, served read-only.

    pynbd serve iso /path/to/directory params='-JrT'
    pynbd serve iso dir=/srv/a dir=/srv/b params='-r -V "My Disk"'
    pynbd serve iso /srv/cd prog=genisoimage params=-r

The image is made when the server starts by xorriso (as ``xorriso -as
mkisofs``), genisoimage or mkisofs, whichever is found first on $PATH, into a
private file under $TMPDIR (/var/tmp by default) that is unlinked at once.
Without an extension (``-J`` Joliet, ``-r`` Rock Ridge, ``-T`` TRANS.TBL),
names are cut to ISO 9660's 8.3 upper case.

Parameters (nbdkit's names)
    [dir=]DIR         a directory whose contents are the root of the ISO (the
                      magic parameter; required; repeat it to merge several)
    params='ARGS'     more arguments for the program, split by the shell as
                      nbdkit does: quote them, and do not pass untrusted text
    prog=PROGRAM      the program to run instead of the first of xorriso,
                      genisoimage, mkisofs found

Behaviour
    - The whole image is made before the server listens; the directories
      may change afterwards without affecting it. Every client sees the same
      read-only image (``--filter=cow`` to let clients write, throw-away).
    - A program that fails (or is missing) stops the server at start with
      the last line it printed.
"""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Mapping
from typing import Any

from ..backend import ConfigError, Param
from ._diskimage import BuiltImagePlugin, ImageBuilder, check_directory

PROGRAMS = ("xorriso", "genisoimage", "mkisofs")


class IsoPlugin(BuiltImagePlugin):
    name = "iso"
    magic_param = "dir"
    params = (
        Param("dir", "path", "a directory to put in the ISO (repeat to merge)", repeat=True),
        Param("params", "str", "more arguments for the program (shell words)", default=""),
        Param("prog", "str", "xorriso, genisoimage or mkisofs (default: the first found)"),
    )
    dir: list[str]
    prog: str | None

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        super().__init__(values)
        # params= arrived as the attribute "params", over the class's declarations: move it.
        self.extra: str = self.__dict__.pop("params")

    def config_complete(self) -> None:
        if not self.dir:
            raise ConfigError("iso: give at least one directory (dir=DIR)")
        for path in self.dir:
            check_directory("iso", path)
        prog = self.prog or next((p for p in PROGRAMS if shutil.which(p)), PROGRAMS[0])
        with ImageBuilder("iso") as build:
            mkisofs = "-as mkisofs " if prog.rsplit("/", 1)[-1] == "xorriso" else ""
            command = (f"{shlex.quote(prog)} {mkisofs}-quiet -o {shlex.quote(build.image)} "
                       f"{self.extra} {' '.join(shlex.quote(d) for d in self.dir)}")
            build.run([command], what=prog, shell=True)
            self.keep(build)
