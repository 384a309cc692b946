"""Command-line plumbing the client tools share: where to connect, and one-line errors.

A tool's target is an NBD URI or a captive server written last on the
command line between brackets (``pynbd info --json -- [ qemu-nbd -f qcow2 x.qcow2 ]``).
``split_target`` separates the options from the captive command;
``parse_command_line`` does that and parses the options; ``one_target``
insists on exactly one URI or captive command. Command-line mistakes raise
``UsageError``, which ``usage_error`` prints as one line (status 1);
``report`` turns the library's exceptions into one line and an exit status.
``add_version`` gives a parser the tools' ``-V``/``--version``.

    def main(argv):
        try:
            args, captive = parse_command_line(build_parser(), argv)
            target = one_target(args.uri, captive)
        except UsageError as exc:
            return usage_error(PROG, exc)
        return report(PROG, lambda: run(args, target))
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable, Sequence

from ..proto.errors import ProtocolError
from .captive import split_captive
from .errors import NBDError

Target = str | list[str]


class UsageError(Exception):
    """A mistake on a tool's command line: one line on stderr, exit status 1."""


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


def parse_command_line(parser: argparse.ArgumentParser, argv: Sequence[str],
                       prepare: Callable[[list[str]], list[str]] = list,
                       ) -> tuple[argparse.Namespace, list[str] | None]:
    """(parsed options, captive command or None); ``prepare`` rewrites the options first."""
    try:
        options, captive = split_target(argv)
    except NBDError as exc:
        raise UsageError(str(exc)) from None
    return parser.parse_args(prepare(options)), captive


def one_target(uri: str | None, captive: list[str] | None) -> Target:
    """The URI or the captive command: exactly one of them must be given."""
    target = captive if captive is not None else uri
    if target is None or (captive is not None and uri):
        raise UsageError("give one NBD URI or one [ CMD ... ]; see --help")
    return target


def usage_error(prog: str, exc: UsageError) -> int:
    print(f"{prog}: {exc}", file=sys.stderr)
    return 1


def add_version(parser: argparse.ArgumentParser) -> None:
    """``-V``/``--version``: print ``pynbd VERSION`` and exit 0."""
    from .. import __version__

    parser.add_argument("-V", "--version", action="version", version=f"pynbd {__version__}",
                        help="print the version and exit")


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
