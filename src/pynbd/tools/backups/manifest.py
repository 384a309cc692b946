"""A backup directory: its qcow2 files and ``manifest.json``.

Layout of DIR::

    manifest.json     what follows, rewritten whole (new file, fsync, rename)
    0000.qcow2        a full backup: a qcow2 image with no backing file
    0001.qcow2        an incremental: changed clusters only, backing file 0000.qcow2
    0002.qcow2        ... backing file 0001.qcow2

The manifest::

    {"format": "pynbd-backup", "version": 1, "id": "<hex>",
     "export": {"name": "", "size": 1073741824},
     "backups": [{"number": 0, "file": "0000.qcow2", "kind": "full" | "inc",
                  "checkpoint": "NAME" | null,      # the disk at this checkpoint
                  "since": ["NAME", ...],           # inc: the bitmaps read
                  "started": "2026-11-30T18:00:00Z", "finished": "...",
                  "data": BYTES, "zero": BYTES, "file_size": BYTES}, ...]}

A backup is written to ``NNNN.qcow2.part``, synced and renamed, and only
then listed in the manifest: a backup that failed or was interrupted leaves
nothing behind but that ``.part`` file (removed by the next backup). The
export's name and size are its identity: a backup of another export into
DIR is refused before anything is written.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "pynbd-backup"
VERSION = 1
MANIFEST = "manifest.json"


class BackupError(Exception):
    """A refusal or failure the user sees as one line."""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Backup:
    """One image of the chain."""

    number: int
    file: str
    kind: str  # "full" or "inc"
    checkpoint: str | None
    since: list[str] = field(default_factory=list)
    started: str = ""
    finished: str = ""
    data: int = 0
    zero: int = 0
    file_size: int = 0


@dataclass
class Manifest:
    """The whole directory's record."""

    id: str
    export: dict[str, Any]
    backups: list[Backup] = field(default_factory=list)

    @property
    def size(self) -> int:
        return int(self.export["size"])

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "id": self.id, "export": self.export,
                "backups": [asdict(b) for b in self.backups]}

    @classmethod
    def from_json(cls, data: Any, where: Path) -> Manifest:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise BackupError(f"{where}: not a pynbd backup manifest")
        if data.get("version") != VERSION:
            raise BackupError(f"{where}: manifest version {data.get('version')!r} is not {VERSION}")
        try:
            backups = [Backup(**b) for b in data["backups"]]
            export = dict(data["export"])
            int(export["size"])
            return cls(str(data["id"]), export, backups)
        except (KeyError, TypeError, ValueError) as exc:
            raise BackupError(f"{where}: damaged manifest ({exc})") from None

    def next_file(self) -> tuple[int, str]:
        number = self.backups[-1].number + 1 if self.backups else 0
        return number, f"{number:04d}.qcow2"

    def find(self, at: str | None) -> Backup:
        """The backup at checkpoint (or number) ``at``; the newest if None."""
        if not self.backups:
            raise BackupError("the directory holds no backup yet")
        if at is None:
            return self.backups[-1]
        for backup in reversed(self.backups):
            if backup.checkpoint == at or (at.isdigit() and int(at) == backup.number):
                return backup
        known = ", ".join(b.checkpoint or str(b.number) for b in self.backups)
        raise BackupError(f"no backup at checkpoint {at!r} (there are: {known})")

    def chain(self, top: Backup) -> list[Backup]:
        """The images that make ``top`` up: its full backup first, ``top`` last."""
        chain: list[Backup] = []
        for backup in reversed(self.backups[:self.backups.index(top) + 1]):
            chain.append(backup)
            if backup.kind == "full":
                return chain[::-1]
        raise BackupError(f"backup {top.number} has no full backup below it: damaged manifest")


class Directory:
    """DIR, locked while a tool works in it (one backup at a time)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.manifest_path = self.path / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def load(self) -> Manifest:
        try:
            text = self.manifest_path.read_text()
        except FileNotFoundError:
            raise BackupError(f"{self.path}: no backup here (no {MANIFEST})") from None
        except OSError as exc:
            raise BackupError(f"{self.manifest_path}: {exc.strerror}") from None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise BackupError(f"{self.manifest_path}: damaged manifest ({exc})") from None
        return Manifest.from_json(data, self.manifest_path)

    def check_usable(self) -> None:
        """A new chain may start here: DIR is missing, empty, or a backup directory."""
        if self.path.exists() and not self.path.is_dir():
            raise BackupError(f"{self.path}: not a directory")
        if self.path.is_dir() and not self.exists() and any(
                not _leftover(entry.name) for entry in self.path.iterdir()):
            raise BackupError(f"{self.path}: not empty and not a backup directory "
                              f"(no {MANIFEST}); use an empty or new directory")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Create DIR if needed and hold its lock (another backup into DIR is refused)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise BackupError(f"{self.path}: {exc.strerror}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BackupError(f"{self.path}: another backup is running here") from None
            yield
        finally:
            os.close(fd)

    def save(self, manifest: Manifest) -> None:
        """Replace the manifest atomically."""
        tmp = self.path / (MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(manifest.to_json(), f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.manifest_path)
        self.sync()

    def sync(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove_leftovers(self) -> None:
        """What backups that did not finish left behind."""
        for entry in self.path.iterdir():
            if _leftover(entry.name):
                entry.unlink(missing_ok=True)


def _leftover(name: str) -> bool:
    """A file a backup writes before it renames it into place."""
    return name.endswith(".qcow2.part") or name == MANIFEST + ".tmp"
