"""nbdkit's debug flags: ``-D NAME.FLAG=N`` on the command line.

A plugin or filter reads its own with ``debug_flag(self.name, "FLAG")``
(0 when not given); the data plugin's ``-D data.AST=1`` prints its parsed
disk. Flags of the server itself are named ``nbdkit.FLAG`` or
``pynbd.FLAG`` (``-D nbdkit.backend.datapath=0``: ``-v`` does not log each
request); unknown ones are accepted and ignored, as in nbdkit.
"""

from __future__ import annotations

import re

from .errors import ConfigError

_flags: dict[tuple[str, str], int] = {}


def set_debug_flag(spec: str) -> None:
    """Record ``NAME.FLAG=N`` (``N`` an integer; ``-`` in NAME read as ``_``)."""
    match = re.fullmatch(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_.]+)=(.*)", spec)
    if match is None:
        raise ConfigError(f"-D: expected NAME.FLAG=N, got {spec!r}")
    name, flag, text = match.groups()
    try:
        value = int(text, 0)
    except ValueError:
        raise ConfigError(f"-D {name}.{flag}: expected an integer, got {text!r}") from None
    _flags[(name.replace("-", "_"), flag)] = value


def debug_flag(name: str, flag: str, default: int = 0) -> int:
    """The value of ``-D NAME.FLAG=N``, ``default`` when not given."""
    return _flags.get((name.replace("-", "_"), flag), default)


def server_flag(flag: str, default: int) -> int:
    """A flag of the server itself: ``-D nbdkit.FLAG=N`` or ``-D pynbd.FLAG=N``
    (``nbdkit.backend.datapath=0``: ``-v`` does not log each request)."""
    return debug_flag("pynbd", flag, debug_flag("nbdkit", flag, default))
