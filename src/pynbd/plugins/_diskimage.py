"""Disks built once from a directory by a program (linuxdisk, floppy, iso).

    class IsoPlugin(BuiltImagePlugin):
        def config_complete(self):
            with ImageBuilder("iso") as build:
                build.run(["xorriso", "-as", "mkisofs", "-o", build.image, self.dir])
                self.keep(build)                 # served read-only from now on

The image is made in a new private directory under $TMPDIR (/var/tmp when
TMPDIR is not set), opened, and unlinked with its directory at once, so
nothing is left behind even if the server is killed. A program that fails
becomes a one-line ConfigError carrying the last line it wrote on stderr.
``BuiltImagePlugin`` serves the image read-only to every client, optionally
inside a partition table (a ``partitioning`` Layout of one partition).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from types import TracebackType

from ..backend import ConfigError, Connection, OpenContext, Plugin
from .file import FileConnection
from .partitioning import DEFAULT_TYPE_GUID, Layout, PartFile, TablePiece, parse_guid
from .split import ConcatDisk


def temp_directory(owner: str) -> str:
    """$TMPDIR or /var/tmp, checked to exist."""
    directory = os.environ.get("TMPDIR") or "/var/tmp"
    if not os.path.isdir(directory):
        raise ConfigError(f"{owner}: the directory for temporary files {directory!r} does not "
                          "exist (set TMPDIR)")
    return directory


def check_directory(owner: str, path: str) -> None:
    if not os.path.isdir(path):
        raise ConfigError(f"{owner}: dir: {path}: not a directory")


class ImageBuilder:
    """A private temporary directory holding ``image``; removed on exit."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.private = tempfile.mkdtemp(prefix=owner, dir=temp_directory(owner))
        self.image = os.path.join(self.private, "image")

    def __enter__(self) -> ImageBuilder:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        shutil.rmtree(self.private, ignore_errors=True)

    def run(self, argv: Sequence[str], what: str | None = None, shell: bool = False) -> str:
        """Run a program (ConfigError if it fails or is missing); its stdout."""
        name = what or argv[0]
        try:
            result = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True,
                                    shell=shell, cwd=self.private)
        except FileNotFoundError:
            raise ConfigError(f"{self.owner}: {name}: program not found (install it or "
                              "check $PATH)") from None
        if result.returncode != 0:
            lines = result.stderr.decode(errors="replace").strip().splitlines() or ["(no message)"]
            raise ConfigError(f"{self.owner}: {name} failed with exit status "
                              f"{result.returncode}: {lines[-1].strip()}")
        return result.stdout.decode(errors="replace")

    def open(self) -> int:
        """The image opened read-only (it is unlinked when the builder exits)."""
        return os.open(self.image, os.O_RDONLY | os.O_CLOEXEC)


class BuiltImagePlugin(Plugin):
    """Serves one built image read-only, bare or as the partition of a table."""

    short_requests = True
    image_fd = -1
    layout: Layout | None = None

    def keep(self, build: ImageBuilder, table: str | None = None, mbr_id: int = 0x83) -> None:
        """Keep the image open; with ``table`` ("mbr"/"gpt") wrap it in one partition."""
        self.image_fd = build.open()
        if table is not None:
            size = os.fstat(self.image_fd).st_size
            part = PartFile("", build.image, 2048 * 512, mbr_id,
                            parse_guid(DEFAULT_TYPE_GUID), os.urandom(16), size)
            self.layout = Layout([part], table == "gpt")

    def open(self, ctx: OpenContext) -> Connection:
        image = FileConnection(os.dup(self.image_fd), writable=False)
        if self.layout is None:
            return image
        return ConcatDisk([image if isinstance(what, int) else TablePiece(size, what)
                           for size, what in self.layout.pieces])

    def unload(self) -> None:
        if self.image_fd >= 0:
            os.close(self.image_fd)
