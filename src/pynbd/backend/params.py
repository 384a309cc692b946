"""Declared ``key=value`` parameters of plugins and filters.

A plugin lists its parameters as ``Param`` objects; ``parse_params`` turns
the user's strings into typed values, refusing unknown keys, malformed
values and missing required ones with a ``ConfigError`` that names the
plugin and the key. The value types are:

``size``
    bytes, with an optional suffix: ``512``, ``64k``, ``1M``, ``10G``,
    ``2T``, ``1P``, ``1E`` (powers of 1024, case-insensitive, ``b`` allowed).
``bool``
    ``1/true/yes/on`` or ``0/false/no/off``.
``int``, ``float``, ``str``
    as they say.
``path``
    a file name, made absolute when parsed (so it survives daemonizing).
``secret``
    a password: the value itself, ``-`` to read it from the terminal or
    stdin, ``+FILE`` to read it from a file, or ``-FD`` for a file descriptor.
``duration``
    seconds, fractional allowed, or with an ``ms`` suffix.
"""

from __future__ import annotations

import getpass
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgtpe]?)(i?b)?\s*$", re.IGNORECASE)
_SHIFTS = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
MAX_SIZE = 2**63 - 1
# With accept_unknown, every undeclared (key, text) pair in command-line order
# (repeats kept) is also listed under this key of parse_params' result.
UNKNOWN_PAIRS = "_unknown_pairs"


def parse_size(text: str) -> int:
    """Parse a size such as ``1G`` into bytes; ValueError if it is not one."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"could not parse size {text!r}")
    number = int(match.group(1)) << _SHIFTS[match.group(2).lower()]
    if number > MAX_SIZE:
        raise ValueError(f"size {text!r} is larger than 2^63-1 bytes")
    return number


def parse_bool(text: str) -> bool:
    """Parse a boolean the way nbdkit does."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"could not parse boolean {text!r}")


def parse_duration(text: str) -> float:
    """Seconds as a float; ``10ms`` means 0.01."""
    text = text.strip()
    scale = 1.0
    if text.endswith("ms"):
        text, scale = text[:-2], 0.001
    elif text.endswith("s"):
        text = text[:-1]
    seconds = float(text) * scale
    if seconds < 0:
        raise ValueError(f"duration {text!r} is negative")
    return seconds


def read_secret(text: str) -> str:
    """Resolve a secret parameter (``-``, ``+FILE``, ``-FD`` or literal)."""
    if text == "-":
        if sys.stdin.isatty():
            return getpass.getpass("password: ")
        return sys.stdin.readline().rstrip("\n")
    if text.startswith("+"):
        with open(text[1:], encoding="utf-8") as f:
            return f.read().rstrip("\n")
    if text.startswith("-") and text[1:].isdigit():
        with os.fdopen(int(text[1:]), encoding="utf-8", closefd=False) as f:
            return f.read().rstrip("\n")
    return text


CONVERTERS: dict[str, Callable[[str], Any]] = {
    "size": parse_size,
    "bool": parse_bool,
    "int": int,
    "float": float,
    "str": str,
    "path": os.path.abspath,
    "secret": read_secret,
    "duration": parse_duration,
}


@dataclass(frozen=True)
class Param:
    """One parameter a plugin or filter accepts.

    ``choices`` restricts a ``str`` to a set of words; ``repeat`` collects
    every occurrence into a list instead of refusing a second one.
    """

    name: str
    type: str = "str"
    help: str = ""
    default: Any = None
    required: bool = False
    choices: tuple[str, ...] = ()
    repeat: bool = False

    def __post_init__(self) -> None:
        if self.type not in CONVERTERS:
            raise ValueError(f"unknown parameter type {self.type!r}")

    @property
    def attribute(self) -> str:
        """The Python attribute the value is stored in (``-`` becomes ``_``)."""
        return self.name.replace("-", "_")

    def convert(self, owner: str, text: str) -> Any:
        try:
            value = CONVERTERS[self.type](text)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"{owner}: {self.name}: {exc}") from None
        if self.choices and value not in self.choices:
            raise ConfigError(f"{owner}: {self.name}: {text!r} is not one of "
                              f"{', '.join(self.choices)}")
        return value

    def describe(self) -> str:
        """One line for --help and --dump-plugin."""
        default = "" if self.default is None else f" (default: {self.default})"
        need = " (required)" if self.required else ""
        return f"{self.name}=<{self.type}>{need}{default}  {self.help}"


def split_key_value(arg: str) -> tuple[str | None, str]:
    """``key=value`` → (key, value); a bare word → (None, word)."""
    key, sep, value = arg.partition("=")
    if sep and key and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", key):
        return key, value
    return None, arg


def parse_params(owner: str, declared: Sequence[Param],
                 pairs: Iterable[tuple[str, str]], accept_unknown: bool = False
                 ) -> dict[str, Any]:
    """Typed values for ``declared`` from (key, text) pairs.

    The result maps each parameter's attribute name to its value (the default
    when not given). Unknown keys are refused unless ``accept_unknown``; they
    are then returned as strings under their own names, and in order, repeats
    included, as a list of pairs under ``UNKNOWN_PAIRS``.
    """
    by_name = {p.name: p for p in declared}
    values: dict[str, Any] = {}
    for key, text in pairs:
        param = by_name.get(key)
        if param is None:
            if accept_unknown:
                values[key] = text
                values.setdefault(UNKNOWN_PAIRS, []).append((key, text))
                continue
            known = ", ".join(by_name) or "none"
            raise ConfigError(f"{owner}: unknown parameter {key!r} (known: {known})")
        value = param.convert(owner, text)
        if param.repeat:
            values.setdefault(param.attribute, []).append(value)
        elif param.attribute in values:
            raise ConfigError(f"{owner}: parameter {key!r} given more than once")
        else:
            values[param.attribute] = value
    for param in declared:
        if param.attribute not in values:
            if param.required:
                raise ConfigError(f"{owner}: missing required parameter {param.name!r}")
            values[param.attribute] = [] if param.repeat else param.default
    return values


def apply_params(target: object, values: Mapping[str, Any]) -> None:
    """Store parsed values as attributes of a plugin or filter."""
    for name, value in values.items():
        setattr(target, name.replace("-", "_").replace(".", "_"), value)
