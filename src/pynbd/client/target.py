"""Command-line plumbing the client tools share: where to connect, and one-line errors.

A tool's target is an NBD URI or a captive server written last on the
command line between brackets (``pynbd info --json -- [ qemu-nbd -f qcow2 x.qcow2 ]``).
``split_target`` separates the options from the captive command;
``report`` turns the library's exceptions into one line and an exit status.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable, Sequence

from ..proto.errors import ProtocolError
from .captive import split_captive
from .errors import NBDError

Target = str | list[str]


def split_target(argv: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """(options, captive command or None); a ``--`` before ``[`` is dropped."""
    args = list(argv)
    if "[" not in args:
        return args, None
    at = args.index("[")
    options = args[:at]
    if options and options[-1] == "--":
        options.pop()
    command, rest = split_captive(args[at:])
    if rest:
        raise NBDError(errno.EINVAL, f"unexpected arguments after ']': {' '.join(rest)}")
    return options, command


def report(prog: str, body: Callable[[], int]) -> int:
    """Run a tool's body; NBD and protocol errors become one line on stderr and status 1."""
    try:
        return body()
    except NBDError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
    except ProtocolError as exc:
        print(f"{prog}: protocol error: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"{prog}: {exc.strerror or exc}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return 1
