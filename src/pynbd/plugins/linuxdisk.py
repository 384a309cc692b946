"""linuxdisk: an ext2/ext3/ext4 disk made from a directory, served read-only.

    pynbd serve linuxdisk /path/to/directory label=ROOTFS
    pynbd serve linuxdisk /path/to/directory type=ext4 size=+1G --filter=cow
    pynbd serve linuxdisk root --filter=partition partition=1     # the bare file system
    pynbd serve -U - linuxdisk dir --run 'nbdcopy "$uri" disk.img'

The files, subdirectories, symbolic links, hard links, device nodes, owners
and modes of DIR are copied into a new file system (``mke2fs -d``, from
e2fsprogs) when the server starts; the disk is a GPT with that file system as
its one partition (aligned to 1 MiB, marked bootable, Linux type), so it can
be a VM's root disk (``root=/dev/sda1``).

Parameters (nbdkit's names)
    [dir=]DIR     the directory to copy (the magic parameter; required)
    label=LABEL   the file system's label (default none)
    size=SIZE     the size of the file system, free space included; too
                  small for DIR is refused at start
    size=+SIZE    at least SIZE of free space beyond what DIR needs
                  (default: just enough room for DIR)
    type=ext2|ext3|ext4   the file system (default ext2)

Behaviour
    - The file system is built in a private file under $TMPDIR (/var/tmp
      by default), unlinked at once; it is a copy, so DIR may change while
      served without affecting the disk.
    - Clients cannot write (put ``--filter=cow`` on top for a throw-away
      writable disk, one client at a time); every client sees the same disk.
    - Extents show the unused parts of the file system as holes.
"""

from __future__ import annotations

import os

from ..backend import ConfigError, Param, parse_size
from ._diskimage import BuiltImagePlugin, ImageBuilder, check_directory

_BLOCK = 4096
_ATTEMPTS = 6  # automatic sizes grow by half until mke2fs fits DIR


def tree_bytes(root: str, block: int = _BLOCK) -> int:
    """What the entries under ``root`` take in ``block``-sized blocks (one each at least)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        total += block * (1 + len(dirnames))
        for name in filenames:
            try:
                size = os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
            total += max(block, -(-size // block) * block)
    return total


class LinuxDiskPlugin(BuiltImagePlugin):
    name = "linuxdisk"
    magic_param = "dir"
    params = (
        Param("dir", "path", "the directory to copy into the file system", required=True),
        Param("label", "str", "file system label"),
        Param("size", "str", "SIZE (total) or +SIZE (free space); default just enough"),
        Param("type", "str", "file system type", default="ext2", choices=("ext2", "ext3", "ext4")),
    )
    dir: str
    label: str | None
    size: str | None
    type: str

    def config_complete(self) -> None:
        check_directory("linuxdisk", self.dir)
        exact, extra = self.requested_size()
        with ImageBuilder("linuxdisk") as build:
            size = exact or self.estimate(extra)
            for attempt in range(1 if exact else _ATTEMPTS):
                try:
                    self.make(build, size)
                    break
                except ConfigError:
                    if exact or attempt == _ATTEMPTS - 1:
                        raise
                    size = -(-size * 3 // 2 // (1 << 20)) << 20
            self.keep(build, table="gpt")

    def requested_size(self) -> tuple[int, int]:
        """(exact size or 0, extra free space) from size=."""
        text = self.size or "+0"
        try:
            value = parse_size(text.lstrip("+"))
        except ValueError as exc:
            raise ConfigError(f"linuxdisk: size: {exc}") from None
        return (0, value) if text.startswith("+") else (value, 0)

    def estimate(self, extra: int) -> int:
        """Room for DIR: its blocks, inode tables and (ext3/4) a journal, with a margin."""
        data = tree_bytes(self.dir)
        journal = 0 if self.type == "ext2" else 4 << 20
        size = data + data // 8 + journal + extra + (1 << 20)
        return -(-size // (1 << 20)) << 20

    def make(self, build: ImageBuilder, size: int) -> None:
        with open(build.image, "wb") as f:
            f.truncate(size)
        label = ["-L", self.label] if self.label else []
        build.run(["mke2fs", "-q", "-F", "-t", self.type, "-b", str(_BLOCK), *label,
                   "-d", self.dir, build.image])
