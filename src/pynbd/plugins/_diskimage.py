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
from collections.abc import Callable, Sequence
from types import TracebackType

from ..backend import ConfigError, Connection, OpenContext, Plugin, parse_size
from .file import FileConnection
from .partitioning import DEFAULT_TYPE_GUID, Layout, PartFile, TablePiece, parse_guid
from .split import ConcatDisk

_ATTEMPTS = 6  # how many times an automatic size grows until the directory fits


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

    def fit(self, exact: int, estimate: int, make: Callable[[int], None]) -> None:
        """Run ``make(size)`` on an image of ``exact`` bytes, or if 0, of ``estimate``
        bytes grown by half (whole MiB) while ``make`` fails, a few times."""
        size = exact or estimate
        for attempt in range(1 if exact else _ATTEMPTS):
            with open(self.image, "wb") as f:
                f.truncate(size)
            try:
                make(size)
                return
            except ConfigError:
                if exact or attempt == _ATTEMPTS - 1:
                    raise
                size = -(-size * 3 // 2 // (1 << 20)) << 20


def tree_bytes(root: str, block: int = 4096) -> int:
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


def parse_size_request(owner: str, text: str | None) -> tuple[int, int]:
    """size=SIZE or size=+SIZE: (exact size or 0, extra free space)."""
    text = text or "+0"
    try:
        value = parse_size(text.lstrip("+"))
    except ValueError as exc:
        raise ConfigError(f"{owner}: size: {exc}") from None
    return (0, value) if text.startswith("+") else (value, 0)


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
