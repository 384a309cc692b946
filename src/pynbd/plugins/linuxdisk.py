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

from ..backend import Param
from ._diskimage import BuiltImagePlugin, ImageBuilder, check_directory, parse_size_request, tree_bytes

_BLOCK = 4096


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
        exact, extra = parse_size_request("linuxdisk", self.size)
        with ImageBuilder("linuxdisk") as build:
            build.fit(exact, self.estimate(extra), lambda size: self.make(build))
            self.keep(build, table="gpt")

    def estimate(self, extra: int) -> int:
        """Room for DIR: its blocks, inode tables and (ext3/4) a journal, with a margin."""
        data = tree_bytes(self.dir)
        journal = 0 if self.type == "ext2" else 4 << 20
        size = data + data // 8 + journal + extra + (1 << 20)
        return -(-size // (1 << 20)) << 20

    def make(self, build: ImageBuilder) -> None:
        label = ["-L", self.label] if self.label else []
        build.run(["mke2fs", "-q", "-F", "-t", self.type, "-b", str(_BLOCK), *label,
                   "-d", self.dir, build.image])
