"""Commands a plugin or filter offers on the server's control socket.

A layer that has state to manage (snapshots, checkpoints, overlays) returns
its commands from ``control_commands()``; ``pynbd serve --control=PATH``
serves them (see ``pynbd.control`` for the wire protocol) and ``pynbd ctl``
calls them::

    from pynbd.backend import Command, ControlError

    class SnapshotFilter(Filter):
        def control_commands(self) -> Sequence[Command]:
            return (
                Command(("snapshot", "create"), ("NAME",), "take a snapshot", self.create),
                Command(("snapshot", "list"), (), "list the snapshots", self.list),
            )

        def create(self, name: str) -> object:
            if name in self.snapshots:
                raise ControlError(f"snapshot {name!r} already exists")
            ...
            return {"name": name}

The server asks ``control_commands()`` once, after ``get_ready()``.
``run`` is called with the request's arguments as strings, one per name in
``args``; a trailing ``*REST`` name takes any number of them (possibly
none). It returns a JSON-able result (None, bool, int, float, str, lists and
dicts of them). Raise ``ControlError`` to refuse: its message is the reply's
error. Any other exception is a bug: the caller gets an error reply, the
server logs the traceback and carries on. ``run`` is called from the control
thread, concurrently with I/O on the exports, so it takes whatever locks the
layer's data path takes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

_WORD = re.compile(r"[a-z][a-z0-9-]*\Z")
_ARG = re.compile(r"\*?[A-Z][A-Z0-9_-]*\Z")


class ControlError(Exception):
    """A command's refusal; its message (one line) becomes ``{"error": ...}``."""


@dataclass(frozen=True)
class Command:
    """One control command: ``words`` name it, ``args`` name its arguments."""

    words: tuple[str, ...]
    args: tuple[str, ...]
    help: str
    run: Callable[..., object]

    def __post_init__(self) -> None:
        if not self.words or not all(_WORD.match(w) for w in self.words):
            raise ValueError(f"control command words must be lower-case words: {self.words!r}")
        if not all(_ARG.match(a) for a in self.args) or any(a.startswith("*") for a in self.args[:-1]):
            raise ValueError(f"control command arguments must be upper-case names, only the last "
                             f"may be *REST: {self.args!r}")

    @property
    def name(self) -> str:
        """The command's words joined by spaces: ``snapshot create``."""
        return " ".join(self.words)

    @property
    def usage(self) -> str:
        """``snapshot create NAME`` (a rest argument shows as ``[REST...]``)."""
        shown = [f"[{a[1:]}...]" if a.startswith("*") else a for a in self.args]
        return " ".join((*self.words, *shown))

    def accepts(self, count: int) -> bool:
        """Whether ``count`` arguments fit ``args``."""
        if self.args and self.args[-1].startswith("*"):
            return count >= len(self.args) - 1
        return count == len(self.args)

    def invoke(self, arguments: Sequence[str]) -> object:
        """Run the command; a wrong number of arguments is a ControlError."""
        if not self.accepts(len(arguments)):
            raise ControlError(f"usage: {self.usage}")
        return self.run(*arguments)
