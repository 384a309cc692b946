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

Without any of the programs (and no prog=), the image is made in Python with
pycdlib (``pip install pynbd[iso]``); params= may then hold only -J (Joliet),
-r/-R (Rock Ridge) and -V NAME (volume id). ISO 9660 names are then upper
case, with characters outside A-Z 0-9 _ turned into _.

Behaviour
    - The whole image is made before the server listens; the directories
      may change afterwards without affecting it. Every client sees the same
      read-only image (``--filter=cow`` to let clients write, throw-away).
    - A program that fails (or is missing) stops the server at start with
      the last line it printed.
"""

from __future__ import annotations

import os
import re
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
        prog = self.prog or next((p for p in PROGRAMS if shutil.which(p)), None)
        with ImageBuilder("iso") as build:
            if prog is None:
                build_with_pycdlib(build.image, self.dir, self.extra)
                self.keep(build)
                return
            mkisofs = "-as mkisofs " if prog.rsplit("/", 1)[-1] == "xorriso" else ""
            command = (f"{shlex.quote(prog)} {mkisofs}-quiet -o {shlex.quote(build.image)} "
                       f"{self.extra} {' '.join(shlex.quote(d) for d in self.dir)}")
            build.run([command], what=prog, shell=True)
            self.keep(build)


def build_with_pycdlib(image: str, directories: list[str], params: str) -> None:
    """Write an ISO of ``directories`` (merged) to ``image`` with pycdlib."""
    try:
        import pycdlib  # noqa: PLC0415 (an optional dependency, only needed here)
    except ImportError:
        raise ConfigError("iso: none of xorriso, genisoimage, mkisofs is on $PATH and pycdlib "
                          "is not installed (apt install xorriso, or pip install pycdlib)") from None
    joliet, rock_ridge, volume = _pycdlib_options(params)
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=4, vol_ident=volume, joliet=3 if joliet else None,
            rock_ridge="1.09" if rock_ridge else None)
    taken: dict[str, set[str]] = {"/": set()}  # ISO directory -> names used in it
    made: dict[str, str] = {"": "/"}  # relative path -> ISO path

    def add(relative: str, source: str, is_dir: bool) -> None:
        parent_rel, name = os.path.split(relative)
        parent = made[parent_rel]
        iso_name = _iso_name(name, taken[parent], is_dir)
        iso_path = parent.rstrip("/") + "/" + iso_name
        rr_name = name if rock_ridge else None
        joliet_path = "/" + "/".join(part[:64] for part in relative.split("/")) if joliet else None
        if is_dir:
            iso.add_directory(iso_path, rr_name=rr_name, joliet_path=joliet_path)
            made[relative] = iso_path
            taken[iso_path] = set()
        else:
            iso.add_file(source, iso_path + ";1", rr_name=rr_name, joliet_path=joliet_path)

    for top in directories:
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            base = os.path.relpath(dirpath, top)
            base = "" if base == "." else base
            for name in dirnames:
                relative = os.path.join(base, name)
                if relative not in made:
                    add(relative, os.path.join(dirpath, name), True)
            for name in sorted(filenames):
                source = os.path.join(dirpath, name)
                if os.path.isfile(source) and not os.path.islink(source):
                    add(os.path.join(base, name), source, False)
    iso.write(image)
    iso.close()


def _pycdlib_options(params: str) -> tuple[bool, bool, str]:
    """(joliet, rock ridge, volume id) from params= (what pycdlib can do)."""
    words = shlex.split(params)
    joliet = rock_ridge = False
    volume = ""
    while words:
        word = words.pop(0)
        if word == "-V" and words:
            volume = words.pop(0)
        elif re.fullmatch(r"-[JrR]+", word):
            joliet = joliet or "J" in word
            rock_ridge = rock_ridge or "r" in word or "R" in word
        else:
            raise ConfigError(f"iso: params: {word!r} is not understood without xorriso, "
                              "genisoimage or mkisofs (pycdlib takes -J, -r, -R, -V NAME)")
    return joliet, rock_ridge, volume


def _iso_name(name: str, taken: set[str], is_dir: bool) -> str:
    """A unique ISO 9660 name for ``name`` (level 4: long, upper case, A-Z 0-9 _ .)."""
    base = re.sub(r"[^A-Z0-9_.]" if not is_dir else r"[^A-Z0-9_]", "_", name.upper())[:30] or "_"
    candidate, number = base, 1
    while candidate in taken:
        number += 1
        candidate = f"{base[:26]}~{number}"
    taken.add(candidate)
    return candidate
