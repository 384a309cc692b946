"""The small JSON lists that persistent filters keep beside their data.

The snapshot filter lists its snapshots in ``snapshots.json``, the cbt filter
its checkpoints in ``checkpoints.json``: an object with the facts every entry
depends on (a chunk size, a disk size) and a list of named entries. This
module reads such a list with one clear error when it is damaged, checks
the facts against the running disk, checks entry names, and replaces files
atomically (write a new file, fsync it, rename it over the old one, fsync
the directory), so that a crash leaves the old list or the new one.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

from .control import ControlError
from .errors import ConfigError

NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}\Z")
NAME_RULE = "letters, digits, '.', '_' and '-' (up to 64, not starting with '.')"


def check_name(kind: str, name: str) -> None:
    """Refuse a snapshot or checkpoint name that could not be a file or an export name."""
    if not NAME.match(name):
        raise ControlError(f"invalid {kind} name {name!r}: use {NAME_RULE}")


def replace_file(path: str, data: bytes) -> None:
    """Write ``path`` atomically: the old contents or the new, never a mix."""
    new = path + ".new"
    with open(new, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(new, path)
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(path: str, key: str, flag: str, owner: str) -> dict[str, Any]:
    """The list at ``path`` ({} if there is none). Each entry of ``manifest[key]`` has a
    valid ``name``, a number ``created`` and a boolean ``flag``; anything else is a
    ConfigError naming the file (``owner`` prefixes the message)."""
    try:
        with open(path) as f:
            manifest: dict[str, Any] = json.load(f)
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{owner}: {path}: not a list of {key} ({exc})") from None
    entries = manifest.get(key, []) if isinstance(manifest, dict) else None
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("name"), str) and NAME.match(e["name"])
            and isinstance(e.get("created"), (int, float)) and isinstance(e.get(flag), bool)
            for e in entries):
        raise ConfigError(f"{owner}: {path}: not a list of {key}")
    return manifest


def write_manifest(path: str, facts: Mapping[str, object], key: str,
                   entries: list[dict[str, object]]) -> None:
    """Replace the list at ``path``: the facts, then the entries under ``key``."""
    replace_file(path, json.dumps({"version": 1, **facts, key: entries}, indent=1).encode())


def check_facts(manifest: Mapping[str, Any], facts: Mapping[str, object], key: str, where: str,
                owner: str) -> None:
    """Refuse a list whose entries were made under other facts (another size, another unit)."""
    if not manifest.get(key):
        return
    for name, mine in facts.items():
        if manifest.get(name) != mine:
            raise ConfigError(f"{owner}: {where} holds {key} made with {name.replace('_', ' ')} "
                              f"{manifest.get(name)}, but this disk has {mine}; refusing to use them")
