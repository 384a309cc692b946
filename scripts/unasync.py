#!/usr/bin/env python3
"""Write the blocking face of the NBD client from its asyncio source.

    python3 scripts/unasync.py           # rewrite the generated files
    python3 scripts/unasync.py --check   # exit 1, showing a diff, if one is stale

The client handle is written once, for asyncio, in ``src/pynbd/client/aio.py``.
This script writes ``src/pynbd/client/blocking.py`` from it, line by line,
with the substitutions in ``RULES``: ``async def`` becomes ``def``, ``await x``
becomes ``x``, ``AsyncNBD`` becomes ``NBD``, ``stream_async`` (the asyncio
transport) becomes ``stream_sync`` (the blocking one, which offers the same
names). Nothing else differs between the two faces, so they cannot drift
apart: tests/client runs ``--check``, and CI fails when someone edited one
file without the other. (The idea is httpcore's ``scripts/unasync.py``.)
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIENT = Path("src/pynbd/client")
GENERATED = [(CLIENT / "aio.py", CLIENT / "blocking.py")]

RULES = [
    (r"\basync def\b", "def"),
    (r"\basync with\b", "with"),
    (r"\basync for\b", "for"),
    (r"\bawait ", ""),
    (r"\b__aenter__\b", "__enter__"),
    (r"\b__aexit__\b", "__exit__"),
    (r"\bAsync(?=[A-Z])", ""),
    (r"\bstream_async\b", "stream_sync"),
]
_COMPILED = [(re.compile(pattern), replacement) for pattern, replacement in RULES]


def unasync(source: str, name: str) -> str:
    """The blocking twin of the asyncio module ``source`` (read from file ``name``)."""
    header = (f"# Generated from {name} by scripts/unasync.py. Do not edit: edit {name},\n"
              f"# then run python3 scripts/unasync.py.\n")
    lines = []
    for line in source.splitlines(keepends=True):
        for pattern, replacement in _COMPILED:
            line = pattern.sub(replacement, line)
        lines.append(line)
    return header + "".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if a generated file is out of date")
    args = parser.parse_args(argv)
    stale = 0
    for source, target in GENERATED:
        expected = unasync((ROOT / source).read_text(), source.name)
        path = ROOT / target
        actual = path.read_text() if path.exists() else ""
        if actual == expected:
            continue
        if args.check:
            stale += 1
            sys.stdout.writelines(difflib.unified_diff(
                actual.splitlines(keepends=True), expected.splitlines(keepends=True),
                f"{target} (as it is)", f"{target} (as {source} says)"))
            print(f"{target} is out of date: run python3 scripts/unasync.py", file=sys.stderr)
        else:
            path.write_text(expected)
            print(f"wrote {target}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
