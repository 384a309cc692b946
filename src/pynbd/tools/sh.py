"""pynbd sh — a Python shell with an NBD handle named ``h`` (nbdsh).

Usage:
    pynbd sh                                  interactive; h = NBD(), not connected
    pynbd sh -u URI                           h connected to URI (also --uri, --connect)
    pynbd sh -u URI -c CODE [-c CODE ...]     run each CODE in order, then exit
    pynbd sh [OPTIONS] -- [ CMD ARGS ... ]    h connected to a captive server
    pynbd sh -c - < script.py                 code read from stdin

Options:
    --base-allocation   ask for the base:allocation meta context before connecting
    --opt-mode          connect in option mode (call h.opt_list(), h.opt_go() ...)
    -n                  do not create the handle

The names ``h`` (a ``pynbd.client.NBD``) and ``nbd`` (the ``pynbd.client``
module, with ``nbd.NBD``, ``nbd.CMD_FLAG_FUA``, ``nbd.Error`` ...) are
predefined. The handle speaks libnbd's Python API, so nbdsh snippets work:

    pynbd sh -u nbd://localhost -c 'print(h.pread(512, 0))'
    pynbd sh --base-allocation -u "$uri" -c 'print(h.block_status(h.get_size(), 0))'

A failing ``-c`` command prints one line (the exception) and exits 1; so does
a failed connection.
"""

from __future__ import annotations

import argparse
import code
import sys
import traceback

from .. import client as nbd_module
from ..client import NBD, NBDError, ProtocolError
from ..client.target import UsageError, add_version, parse_command_line, usage_error

PROG = "pynbd sh"
BANNER = """Welcome to pynbd sh, the shell for interacting with Network Block Device (NBD) servers.

The pynbd.client module has been imported as 'nbd' and an instance of the handle
has been created as 'h'. Type h.pread(512, 0), h.get_size() ... ; help(h) for more.
Use ^D to exit."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="A Python shell for NBD.",
                                usage="%(prog)s [-u URI] [-c CODE ...] [--base-allocation] "
                                      "[--opt-mode] [-- [ CMD ARGS ... ]]")
    a = p.add_argument
    a("-u", "--uri", "--connect", dest="uri", metavar="URI", help="connect h to URI")
    a("-c", "--command", dest="commands", action="append", default=[], metavar="CODE",
      help="run CODE (repeatable; '-' reads stdin), then exit")
    a("--base-allocation", action="store_true", help="request the base:allocation context")
    a("--opt-mode", action="store_true", help="connect in option mode")
    a("-n", dest="no_handle", action="store_true", help="do not create a handle")
    add_version(p)
    return p


def main(argv: list[str]) -> int:
    try:
        args, captive = parse_command_line(build_parser(), argv)
        if args.no_handle and (args.uri or captive):
            raise UsageError("-n cannot be used with a URI or a captive server")
    except UsageError as exc:
        return usage_error(PROG, exc)
    namespace: dict[str, object] = {"nbd": nbd_module, "__name__": "__main__"}
    handle = None if args.no_handle else NBD()
    if handle is not None:
        namespace["h"] = handle
        if not _connect(handle, args, captive):
            return 1
    try:
        if args.commands:
            return _run_commands(args.commands, namespace)
        code.interact(banner=BANNER, local=namespace, exitmsg="")
        return 0
    finally:
        if handle is not None:
            handle.close()


def _connect(h: NBD, args: argparse.Namespace, captive: list[str] | None) -> bool:
    if args.base_allocation:
        h.add_meta_context(nbd_module.CONTEXT_BASE_ALLOCATION)
    if args.opt_mode:
        h.set_opt_mode(True)
    try:
        if captive is not None:
            h.connect_systemd_socket_activation(captive)
        elif args.uri:
            h.connect_uri(args.uri)
    except (NBDError, ProtocolError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        h.close()
        return False
    return True


def _run_commands(commands: list[str], namespace: dict[str, object]) -> int:
    for text in commands:
        source = sys.stdin.read() if text == "-" else text
        try:
            exec(compile(source, "<command line>", "exec"), namespace)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except (NBDError, ProtocolError) as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            return 1
        except Exception:
            traceback.print_exc()
            return 1
    return 0
