"""pynbd ctl — talk to a running server's control socket.

Usage:
    pynbd ctl [--json] [--timeout=SECONDS] PATH COMMAND [ARG ...]

A server started with ``pynbd serve --control=PATH …`` listens for control
commands on the Unix socket PATH. The commands come from the server itself
and from its plugin and filters (the snapshot filter adds ``snapshot create
NAME``, ``snapshot list``, …); ``pynbd ctl PATH help`` lists them all.

    $ pynbd serve --control=/tmp/ctl -U /tmp/nbd memory 1G
    $ pynbd ctl /tmp/ctl status
    pid: 4242
    uptime: 12.5
    connections: 1
    exports: [{"name":"","description":""}]
    layers: ["memory"]
    $ pynbd ctl /tmp/ctl help
    COMMAND          HELP
    status           the server's pid, uptime, connections and exports
    help [WORDS...]  the commands (those starting with WORDS), their arguments and what they do

The result is printed readably: a list of objects as an aligned table with
a header, an object as ``key: value`` lines, a list one item per line, a
string as it is. ``--json`` prints the result as JSON instead, for scripts.
A refused command prints the server's message on stderr and exits 1; so
does a socket nobody listens on. ``--`` ends the options: later words are
sent as they are, even if they start with ``-``.

Built-in commands (every server has them):

    help [WORDS...]  a list of {"command": USAGE, "help": TEXT}, one per
                     command (``help snapshot``: those starting with snapshot)
    status           {"pid", "uptime" (seconds), "connections" (clients now),
                     "exports" (a list of {"name", "description"}), "layers"
                     (filter and plugin names, outermost first)}

The protocol (for scripts in any language)
------------------------------------------
One JSON object per line, UTF-8, at most 64 KiB a line, in both directions.
A request names the command's words, then its arguments, all strings; an
``id`` (any JSON value) is optional and comes back in the reply::

    {"command": ["snapshot", "create", "monday"], "id": 1}

Each request gets exactly one reply line, in the order the requests were
sent: ``{"ok": RESULT}`` (RESULT any JSON value, null when there is
nothing to say) or ``{"error": "MESSAGE"}``, with ``"id"`` echoed when the
request had one. Invalid JSON, a request without a ``command`` list of
strings, a line over 64 KiB, bytes that are not UTF-8, an unknown command
or a wrong number of arguments all get an error reply and the connection
stays open; blank lines are ignored. Nothing sent here affects the
exports' data path. Many clients may be connected at once; each one's
requests run in order, concurrently with other clients' and with I/O.

With socat::

    $ echo '{"command": ["status"]}' | socat - UNIX-CONNECT:/tmp/ctl
    {"ok":{"pid":4242,"uptime":12.5,"connections":1,...}}
    $ socat READLINE UNIX-CONNECT:/tmp/ctl        # type requests by hand
    {"command": ["help"], "id": "h"}
    {"ok":[{"command":"status","help":"..."},...],"id":"h"}
    nonsense
    {"error":"invalid JSON: Expecting value"}

Writing a command for a plugin or filter: see ``pynbd.backend.control``.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Sequence

from ..control.protocol import ControlProtocolError, Reply, parse_reply, request_line

PROG = "pynbd ctl"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, usage="%(prog)s [--json] PATH COMMAND [ARG ...]",
                                description=__doc__.split("\n\n", 1)[1],  # the manual, after its title
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="give up waiting for the reply after this long (default: wait)")
    p.add_argument("path", help="the control socket")
    p.add_argument("words", nargs="+", metavar="COMMAND", help="the command's words and arguments")
    return p


def call(path: str, words: Sequence[str], timeout: float | None = None) -> Reply:
    """Send one request to the control socket at ``path`` and return its reply.

    OSError if the socket cannot be reached, ControlProtocolError if the
    server's answer is not a reply.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(request_line(words))
        with sock.makefile("rb") as replies:
            line = replies.readline()
    if not line.endswith(b"\n"):
        raise ControlProtocolError("the server closed the control socket without replying")
    return parse_reply(line)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        reply = call(args.path, args.words, args.timeout)
    except TimeoutError:
        print(f"{PROG}: no reply from {args.path} within {args.timeout:g} s", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{PROG}: cannot talk to {args.path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except ControlProtocolError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    if not reply.ok:
        print(f"{PROG}: {reply.result}", file=sys.stderr)
        return 1
    text = json.dumps(reply.result, indent=2, ensure_ascii=False) if args.json else readable(reply.result)
    if text:
        print(text)
    return 0


def readable(result: object) -> str:
    """A result as people read it (see the module's docstring)."""
    if isinstance(result, list) and result and all(isinstance(row, dict) for row in result):
        return _table(result)
    if isinstance(result, list):
        return "\n".join(_scalar(item) for item in result)
    if isinstance(result, dict):
        return "\n".join(f"{key}: {_scalar(value)}" for key, value in result.items())
    return "" if result is None else _scalar(result)


def _scalar(value: object) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _table(rows: list[dict[str, object]]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[column.upper() for column in columns]]
    cells += [[_scalar(row[c]) if c in row else "" for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
                     .rstrip() for line in cells)
