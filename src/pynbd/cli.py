"""The ``pynbd`` command: one program, a subcommand per tool.

    pynbd serve ...   an NBD server (nbdkit's command line)
    pynbd info URI    what a server offers (nbdinfo)
    pynbd copy A B    copy between servers, files and pipes (nbdcopy)
    pynbd sh          a Python shell with a connected handle (nbdsh)
    pynbd dump URI    a hex dump of an export (nbddump)
    pynbd fuse FILE URI   an export as a file, mounted with FUSE (nbdfuse)
    pynbd ctl PATH …  commands to a server's control socket (serve --control=PATH)
    pynbd heatmap LOG OUT   reads and writes over time, from the log filter's file
    pynbd backup …    full and incremental backups on dirty bitmaps, restore, list
    pynbd cow …       commit a persistent cow overlay, or export it as qcow2

``pynbd TOOL --help`` explains each.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable

SUBCOMMANDS = {"serve": "pynbd.server.cli"}


def _module_for(name: str) -> str | None:
    if name in SUBCOMMANDS:
        return SUBCOMMANDS[name]
    candidate = f"pynbd.tools.{name}"
    if name.isidentifier() and importlib.util.find_spec(candidate) is not None \
            and hasattr(importlib.import_module(candidate), "main"):
        return candidate
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    if argv[0] == "--version":
        from . import __version__
        print(f"pynbd {__version__}")
        return 0
    module_name = _module_for(argv[0])
    if module_name is None:
        print(f"pynbd: unknown command {argv[0]!r}; try 'pynbd --help'", file=sys.stderr)
        return 2
    # Every subcommand module has main(argv) -> exit status.
    command: Callable[[list[str]], int] = importlib.import_module(module_name).main
    try:
        return command(argv[1:])
    except BrokenPipeError:
        # The reader went away (`pynbd serve memory --help | head`): not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
