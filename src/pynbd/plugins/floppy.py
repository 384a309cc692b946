"""floppy: a FAT disk made from a directory, served read-only.

    pynbd serve floppy /path/to/directory
    pynbd serve floppy dir=/srv/drivers label=DRIVERS size=64M

The files and subdirectories of DIR are copied into a new FAT file system
(``mkfs.fat`` and ``mcopy`` from Debian's dosfstools and mtools) when the
server starts; the disk is an MBR with that file system as its one partition
(at 1 MiB, marked bootable). Long file names are kept (VFAT).

Parameters (nbdkit's names)
    [dir=]DIR     the directory to copy (the magic parameter; required)
    label=LABEL   the volume label, at most 11 ASCII characters (default
                  NBDKITFLOPY)
    size=SIZE     the size of the file system (default: just enough for DIR
                  with a little free space); too small for DIR is refused

Behaviour
    - FAT12, FAT16 or FAT32 by the size (4 KiB clusters: FAT32 from about
      254 MiB up), and the partition type byte to match (0x01, 0x0e, 0x0c).
      (nbdkit always makes FAT32, which mtools refuses to read below 65525
      clusters; the standard choice is readable everywhere.)
    - Files are copied when the server starts (unlike nbdkit's floppy, which
      reads DIR while serving): DIR may change afterwards. Symbolic links,
      sockets and devices at the top of DIR are skipped (links deeper down
      are followed by mcopy). A file must be under 4 GiB (FAT's limit).
    - Clients cannot write (``--filter=cow`` makes a throw-away writable disk).
"""

from __future__ import annotations

import os

from ..backend import ConfigError, Param, parse_size
from ._diskimage import BuiltImagePlugin, ImageBuilder, check_directory, tree_bytes

_CLUSTER = 4096
_MBR_IDS = {12: 0x01, 16: 0x0E, 32: 0x0C}


def fat_bits(size: int) -> int:
    """12, 16 or 32: the FAT whose cluster count range holds ``size`` in 4 KiB clusters."""
    clusters = size // _CLUSTER
    return 12 if clusters < 4000 else 16 if clusters < 65000 else 32


class FloppyPlugin(BuiltImagePlugin):
    name = "floppy"
    magic_param = "dir"
    params = (
        Param("dir", "path", "the directory to copy into the file system", required=True),
        Param("label", "str", "volume label (11 ASCII characters at most)", default="NBDKITFLOPY"),
        Param("size", "str", "size of the file system (default: just enough)"),
    )
    dir: str
    label: str
    size: str | None

    def config_complete(self) -> None:
        check_directory("floppy", self.dir)
        if not self.label.isascii() or not 0 < len(self.label) <= 11:
            raise ConfigError(f"floppy: label: {self.label!r} is not 1 to 11 ASCII characters")
        try:
            exact = parse_size(self.size) if self.size else 0
        except ValueError as exc:
            raise ConfigError(f"floppy: size: {exc}") from None
        data = tree_bytes(self.dir, _CLUSTER)
        estimate = -(-(data + data // 16 + (512 << 10)) // (64 << 10)) << 16
        with ImageBuilder("floppy") as build:
            build.fit(exact, estimate, lambda size: self.make(build, size))
            size = os.path.getsize(build.image)
            self.keep(build, table="mbr", mbr_id=_MBR_IDS[fat_bits(size)])

    def make(self, build: ImageBuilder, size: int) -> None:
        build.run(["mkfs.fat", "-F", str(fat_bits(size)), "-s", str(_CLUSTER // 512), "-S", "512",
                   "-n", self.label, build.image])
        entries = [os.path.join(self.dir, name) for name in sorted(os.listdir(self.dir))]
        entries = [p for p in entries if not os.path.islink(p)
                   and (os.path.isfile(p) or os.path.isdir(p))]
        if entries:
            build.run(["env", "MTOOLS_SKIP_CHECK=1", "mcopy", "-s", "-p", "-m", "-Q", "-D", "o",
                       "-i", build.image, *entries, "::"], what="mcopy")
