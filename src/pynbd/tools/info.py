"""pynbd info — what an NBD server offers (nbdinfo's options and output).

Usage:
    pynbd info [--json] [--content | --no-content] URI
    pynbd info --size URI
    pynbd info --map[=CONTEXT] [--totals] [--json] URI
    pynbd info --map[=CONTEXT] --png FILE URI
    pynbd info --list [--json] [--content] URI
    pynbd info --can FLAG URI | --is FLAG URI
    pynbd info [OPTIONS] -- [ CMD ARGS ... ]       a captive server (socket activation)

Without options it prints the protocol (and whether TLS and structured or
extended replies are in use), then for the export: its name, description,
size, content (``file -b`` on the first 8 KiB, plus which filter serves a
gzip, xz or zstd image uncompressed; ``--no-content`` skips it), URI, meta
contexts, flags and block sizes. ``--json`` prints the same as JSON
with nbdinfo's field names.

``--map`` prints the export's extents from the ``base:allocation`` context or
the one named (``--map=qemu:allocation-depth``, ``--map=qemu:dirty-bitmap:B``)
as ``offset length type description`` lines, adjacent extents of one type
merged; ``--totals`` sums them per type with a percentage of the size.
``--png FILE`` draws the map instead (needs Pillow: ``pip install
'pynbd[pictures]'``): a square along a Hilbert curve (offset 0 top left;
nearby offsets stay nearby, so a 10 MiB and a 1 TiB disk both read well),
a strip from offset 0 to the end, and a legend with each kind's share; see
``pynbd.tools.picture``.

``--can`` FLAG (connect, read, write, cache, df, fast-zero, flush, fua,
multi-conn, structured-reply, extended-headers, trim, zero) and ``--is`` FLAG
(read-only, rotational, tls) print nothing and exit 0 when true, 2 when
false, 1 on error.

``--list`` shows every export of the server (the export name of the URI is
ignored); content probing is off unless ``--content`` is given.

Examples:
    pynbd info nbd://localhost
    pynbd info --map --totals "nbd+unix:///?socket=/tmp/sock"
    pynbd info --json -- [ qemu-nbd -r -f qcow2 disk.qcow2 ]

Errors (bad URI, no server, unknown export, TLS required) are one line on
stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from ..client import NBD, NBDError
from ..client.common import SIZE_MAXIMUM, SIZE_MINIMUM, SIZE_PREFERRED
from ..client.sync import connect
from ..client.target import (
    Target,
    UsageError,
    add_version,
    one_target,
    parse_command_line,
    report,
    usage_error,
)
from ..client.uri import format_uri, parse_uri
from ..formats import qcow2
from ..proto.constants import BASE_ALLOCATION

PROG = "pynbd info"
CONTENT_BYTES = 8192
# Compressed images the filters serve uncompressed: the content line says which filter.
COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))
MAP_REQUEST = 1 << 30

FLAG_NAMES = ["is_rotational", "is_read_only", "can_cache", "can_df", "can_fast_zero",
              "can_flush", "can_fua", "can_multi_conn", "can_trim", "can_zero"]
BLOCK_SIZES = [("block_size_minimum", SIZE_MINIMUM), ("block_size_preferred", SIZE_PREFERRED),
               ("block_size_maximum", SIZE_MAXIMUM)]

CAN: dict[str, Callable[[NBD], bool]] = {
    "connect": lambda h: True, "read": lambda h: True, "write": NBD.can_write,
    "cache": NBD.can_cache, "df": NBD.can_df, "fast-zero": NBD.can_fast_zero,
    "flush": NBD.can_flush, "fua": NBD.can_fua, "multi-conn": NBD.can_multi_conn,
    "structured-reply": NBD.get_structured_replies_negotiated,
    "extended-headers": NBD.get_extended_headers_negotiated,
    "trim": NBD.can_trim, "zero": NBD.can_zero,
}
IS: dict[str, Callable[[NBD], bool]] = {
    "read-only": NBD.is_read_only, "rotational": NBD.is_rotational, "tls": NBD.get_tls_negotiated,
}


# ------------------------------------------------------------------- parsing

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Show what an NBD server offers.",
                                usage="%(prog)s [OPTIONS] URI | [OPTIONS] -- [ CMD ARGS ... ]")
    a = p.add_argument
    a("--json", action="store_true", help="print JSON")
    a("--size", action="store_true", help="print only the size in bytes")
    a("--map", metavar="CONTEXT", help="print the extent map (default base:allocation)")
    a("--totals", action="store_true", help="with --map: sum extents per type")
    a("--png", metavar="FILE", help="with --map: draw the map into FILE (a PNG picture)")
    a("-L", "--list", action="store_true", help="list every export of the server")
    a("--can", metavar="FLAG", help="exit 0 if the server can FLAG, 2 if not")
    a("--is", dest="is_", metavar="FLAG", help="exit 0 if the export is FLAG, 2 if not")
    a("--content", dest="content", action="store_true", default=None, help="probe the content")
    a("--no-content", dest="content", action="store_false", help="do not probe the content")
    a("--color", "--colour", "--no-color", "--no-colour", dest="color", action="store_true",
      help="accepted for nbdinfo compatibility (no colours are used)")
    add_version(p)
    a("uri", nargs="?", help="NBD URI")
    return p


def _normalize(options: list[str]) -> list[str]:
    """nbdinfo's ``--map`` takes its value only as ``--map=CONTEXT``."""
    return [f"--map={BASE_ALLOCATION}" if o == "--map" else o for o in options]


def main(argv: list[str]) -> int:
    try:
        args, captive = parse_command_line(build_parser(), argv, _normalize)
        target = one_target(args.uri, captive)
        if args.totals and not args.map:
            raise UsageError("--totals needs --map")
        if args.png and (not args.map or args.totals or args.json):
            raise UsageError("--png needs --map (and draws instead of --totals or --json)")
        if args.png and importlib.util.find_spec("PIL") is None:
            raise UsageError("--png needs Pillow: pip install 'pynbd[pictures]'")
        flag = _flag_test(args)
    except UsageError as exc:
        return usage_error(PROG, exc)
    if flag is not None:
        return _test_flag(target, flag, args.can == "connect")
    return report(PROG, lambda: _run(args, target))


def _flag_test(args: argparse.Namespace) -> Callable[[NBD], bool] | None:
    """The test ``--can FLAG`` or ``--is FLAG`` asks for, if any."""
    for option, value, tests in (("--can", args.can, CAN), ("--is", args.is_, IS)):
        if value is None:
            continue
        if value not in tests:
            raise UsageError(f"unknown {option} flag {value!r}; one of {', '.join(tests)}")
        return tests[value]
    return None


def _test_flag(target: Target, test: Callable[[NBD], bool], connect_only: bool) -> int:
    try:
        with connect(target) as h:
            return 0 if test(h) else 2
    except (NBDError, OSError) as exc:
        if connect_only:
            return 2
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, target: Target) -> int:
    if args.size:
        with connect(target) as h:
            print(h.get_size())
        return 0
    if args.map:
        return _map(args, target)
    if args.list:
        return _list(args, target)
    return _show_one(args, target)


# ---------------------------------------------------------------- one export

@dataclass
class ExportReport:
    """Everything printed about one export."""

    name: str
    uri: str
    size: int
    description: str | None = None
    content: str | None = None
    contexts: list[str] = field(default_factory=list)
    flags: dict[str, bool] = field(default_factory=dict)
    block_sizes: dict[str, int] = field(default_factory=dict)


def _uri_for(target: Target, name: str) -> str:
    if isinstance(target, str):
        return format_uri(replace(parse_uri(target), export_name=name))
    return "nbd+unix:///" + name  # captive: no address outside this process


def _report(h: NBD, target: Target, name: str, contexts: list[str]) -> ExportReport:
    sizes = {key: h.get_block_size(which) for key, which in BLOCK_SIZES}
    return ExportReport(
        name=name, uri=_uri_for(target, name), size=h.get_size(),
        description=h.get_export_description() or None, contexts=contexts,
        flags={key: bool(getattr(h, key)()) for key in FLAG_NAMES},
        block_sizes=sizes if any(sizes.values()) else {})


def _contexts(h: NBD) -> list[str]:
    if h.is_ready():
        return h.get_meta_contexts()
    try:
        return h.opt_list_meta_context()
    except NBDError:
        return []


def _show_one(args: argparse.Namespace, target: Target) -> int:
    with connect(target, opt_mode=True) as h:
        name = h.get_export_name()
        contexts = _contexts(h)
        if not h.is_ready():
            h.opt_go()
        exports = [_report(h, target, name, contexts)]
        if args.content is not False:
            exports[0].content = _probe_content(h)
        _print(h, exports, args.json)
    return 0


def _list(args: argparse.Namespace, target: Target) -> int:
    with connect(target, opt_mode=True) as h:
        if h.is_ready():
            raise NBDError(errno.ENOTSUP, "--list: the server cannot list exports (oldstyle)")
        exports = []
        for name, _description in h.opt_list():
            h.set_export_name(name)
            contexts = _contexts(h)
            h.opt_info()
            exports.append(_report(h, target, name, contexts))
        if args.content:
            for export in exports:
                export.content = _content_of(target, export.name)
        _print(h, exports, args.json)
    return 0


def _content_of(target: Target, name: str) -> str | None:
    if not isinstance(target, str):
        return None
    with connect(target, export_name=name) as h:
        return _probe_content(h)


def _probe_content(h: NBD) -> str | None:
    count = min(h.get_size(), CONTENT_BYTES)
    if count == 0:
        return None
    data = h.pread(count, 0)
    described = qcow2.describe(data, h.get_size())  # file(1) misreads qcow2 v3 headers
    if described:
        return described
    try:
        result = subprocess.run(["file", "-b", "-"], input=data, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = result.stdout.decode(errors="replace").strip()
    if result.returncode != 0 or not text:
        return None
    hint = next((name for magic, name in COMPRESSED if data.startswith(magic)), None)
    return f"{text} (serve it with --filter={hint})" if hint else text


# ----------------------------------------------------------------- printing

def human_size(size: int) -> str:
    """nbdinfo's short size: the largest unit that divides the size exactly."""
    units = ["", "K", "M", "G", "T", "P", "E"]
    i = 0
    while size and size % 1024 == 0 and i < len(units) - 1:
        size //= 1024
        i += 1
    return f"{size}{units[i]}"


def _protocol_line(h: NBD) -> str:
    tls = "with TLS" if h.get_tls_negotiated() else "without TLS"
    packets = ("extended" if h.get_extended_headers_negotiated() else
               "structured" if h.get_structured_replies_negotiated() else "simple")
    return f"protocol: {h.get_protocol()} {tls}, using {packets} packets"


def _print(h: NBD, exports: list[ExportReport], as_json: bool) -> None:
    if as_json:
        print(json.dumps(_json_document(h, exports), indent="\t"))
        return
    lines = [_protocol_line(h)]
    for export in exports:
        lines.extend(_text_export(export))
    print("\n".join(lines))


def _text_export(e: ExportReport) -> Iterator[str]:
    yield f'export="{e.name}":'
    if e.description:
        yield f"\tdescription: {e.description}"
    yield f"\texport-size: {e.size}" + (f" ({human_size(e.size)})" if e.size else "")
    if e.content:
        yield f"\tcontent: {e.content}"
    yield f"\turi: {e.uri}"
    if e.contexts:
        yield "\tcontexts:"
        yield from (f"\t\t{c}" for c in e.contexts)
    yield from (f"\t{key}: {str(value).lower()}" for key, value in e.flags.items())
    yield from (f"\t{key}: {value}" for key, value in e.block_sizes.items())


def _json_document(h: NBD, exports: list[ExportReport]) -> dict[str, object]:
    return {"protocol": h.get_protocol(), "TLS": h.get_tls_negotiated(),
            "structured": h.get_structured_replies_negotiated(),
            "extended": h.get_extended_headers_negotiated(),
            "exports": [_json_export(e) for e in exports]}


def _json_export(e: ExportReport) -> dict[str, object]:
    out: dict[str, object] = {"export-name": e.name}
    if e.description:
        out["description"] = e.description
    if e.content:
        out["content"] = e.content
    out["uri"] = e.uri
    if e.contexts:
        out["contexts"] = e.contexts
    out.update(e.flags)
    out.update(e.block_sizes)
    out["export-size"] = e.size
    out["export-size-str"] = human_size(e.size)
    return out


# ---------------------------------------------------------------------- map

def describe_extent(context: str, kind: int) -> str | None:
    """nbdinfo's words for an extent type in the well-known contexts."""
    if context == BASE_ALLOCATION:
        return {0: "data", 1: "hole", 2: "zero", 3: "hole,zero"}.get(kind)
    if context.startswith("qemu:dirty-bitmap:"):
        return {0: "clean", 1: "dirty"}.get(kind)
    if context == "qemu:allocation-depth":
        return {0: "absent", 1: "local"}.get(kind, f"backing depth {kind}")
    return None


def extents(h: NBD, context: str) -> Iterator[tuple[int, int, int]]:
    """(offset, length, type) over the whole export, adjacent equal types merged."""
    size, offset = h.get_size(), 0
    current: list[int] | None = None
    while offset < size:
        entries = h.block_status(min(size - offset, MAP_REQUEST), offset).get(context, [])
        if not entries:
            raise NBDError(errno.EPROTO, f"--map: server sent no extents for {context} at {offset}")
        for i in range(0, len(entries), 2):
            length, kind = min(entries[i], size - offset), entries[i + 1]
            if length <= 0:
                break
            if current is not None and current[2] == kind:
                current[1] += length
            else:
                if current is not None:
                    yield current[0], current[1], current[2]
                current = [offset, length, kind]
            offset += length
    if current is not None:
        yield current[0], current[1], current[2]


def _map(args: argparse.Namespace, target: Target) -> int:
    context = args.map
    with connect(target, meta_contexts=[context]) as h:
        if not h.can_meta_context(context):
            raise NBDError(errno.ENOTSUP,
                           f'--map: server does not support metadata context "{context}"')
        found = list(extents(h, context))
        if args.png:
            _draw_map(args.png, context, found, h.get_size(), _uri_for(target, h.get_export_name()))
        elif args.totals:
            _print_totals(context, found, h.get_size(), args.json)
        else:
            _print_map(context, found, args.json)
    return 0


def _draw_map(path: str, context: str, found: list[tuple[int, int, int]], size: int,
              title: str) -> None:
    from .picture import AllocationPicture  # Pillow is optional: imported only to draw

    if size == 0:
        raise NBDError(errno.EINVAL, "--png: the export is empty, there is nothing to draw")
    try:
        AllocationPicture(size, found, context, title).image.save(path, format="PNG")
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None


def _print_map(context: str, found: list[tuple[int, int, int]], as_json: bool) -> None:
    if as_json:
        rows = [f'{{ "offset": {o}, "length": {n}, "type": {t}{_json_words(context, t)}}}'
                for o, n, t in found]
        print("[\n" + ",\n".join(rows) + "\n]")
        return
    for offset, length, kind in found:
        words = describe_extent(context, kind)
        print(f"{offset:10d}  {length:10d}  {kind:3d}" + (f"  {words}" if words else ""))


def _print_totals(context: str, found: list[tuple[int, int, int]], size: int,
                  as_json: bool) -> None:
    totals: dict[int, int] = {}
    for _offset, length, kind in found:
        totals[kind] = totals.get(kind, 0) + length
    rows = sorted(totals.items())
    if as_json:
        lines = [f'{{ "size": {n}, "percent": {100.0 * n / size:g}, "type": {t}'
                 f'{_json_words(context, t)} }}' for t, n in rows]
        print("[\n" + ",\n".join(lines) + "\n]")
        return
    for kind, total in rows:
        words = describe_extent(context, kind)
        print(f"{total:10d} {100.0 * total / size:5.1f}% {kind:3d}" + (f" {words}" if words else ""))


def _json_words(context: str, kind: int) -> str:
    words = describe_extent(context, kind)
    return f', "description": {json.dumps(words)}' if words else ""
