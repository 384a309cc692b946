"""Putting a copy together: open both ends, check them, connect, copy, close.

The source is opened first, then the destination, which is prepared for the
source's length (a regular file is truncated to it) and must be at least
that large. Connections: one when either end is a stream or with
``--synchronous``; otherwise up to ``--connections`` when both ends allow
more than one (NBD multi-conn; files always do), opened by the copy's lanes. A destination NBD export
whose ``base:allocation`` map says it is all zeroes is treated as
``--destination-is-zero``. Everything opened is closed, captive servers
stopped, whether the copy succeeded or not.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from typing import TextIO

from ...client.errors import NBDError
from ...proto.errors import ProtocolError
from .endpoint import CopyError, Endpoint, NullEndpoint
from .engine import Copier, Layout, plan_layout
from .local import open_local
from .loop import Loop
from .nbd import NBDEndpoint
from .options import CopyOptions, Spec
from .progress import Progress


def open_endpoint(spec: Spec, writing: bool, loop: Loop, bitmaps: Sequence[str] = ()) -> Endpoint:
    """The endpoint for ``spec``, connected or opened (an NBD server's connections
    driven by ``loop``); ``bitmaps`` (dirty bitmaps to read changed ranges from)
    need an NBD server."""
    if spec.kind in ("nbd", "captive"):
        endpoint = NBDEndpoint(spec, writing, bitmaps, loop)
        try:
            endpoint.open()
        except BaseException:
            endpoint.close()
            raise
        return endpoint
    if bitmaps:
        raise CopyError(spec.label, "--dirty-bitmap needs an NBD source")
    if spec.kind == "null":
        return NullEndpoint(spec.text)
    return open_local(spec, writing)


def check_sizes(src: Endpoint, dst: Endpoint) -> None:
    if src.size is not None and dst.size is not None and dst.size < src.size:
        raise CopyError(dst.label, f"destination size ({dst.size}) is smaller than "
                                   f"source size ({src.size})")


def destination_is_zero(opts: CopyOptions, dst: Endpoint) -> bool:
    if opts.destination_is_zero or dst.reads_as_zero:
        return True
    if opts.allocated or not isinstance(dst, NBDEndpoint):
        return False
    try:
        return dst.probe_zero()
    except (NBDError, ProtocolError, CopyError):
        return False


def _verbose(err: TextIO, opts: CopyOptions, src: Endpoint, dst: Endpoint, layout: Layout) -> None:
    for role, endpoint in (("source", src), ("destination", dst)):
        facts = endpoint.facts()
        print(f"pynbd copy: {role}: {endpoint.label}: {facts.kind}, size "
              f"{endpoint.size if endpoint.size is not None else 'unknown'}, "
              f"zeroing by {facts.zero_method}", file=err)
    print(f"pynbd copy: {layout.describe()}; extents {'on' if opts.extents else 'off'}, "
          f"destination {'reads as zero' if dst.reads_as_zero else 'may hold data'}", file=err)


def run_copy(opts: CopyOptions, err: TextIO = sys.stderr, source: Endpoint | None = None) -> int:
    """Run the copy ``opts`` describes; return the bytes copied or raise CopyError.

    ``source``, if given, is an opened endpoint to copy from instead of
    ``opts.source`` (``pynbd backup restore`` reads a qcow2 chain); it is closed too.
    """
    assert opts.destination is not None
    opened: list[Endpoint] = []
    loop = Loop()
    try:
        if source is None:
            assert opts.source is not None
            bitmaps = [opts.dirty_bitmap] if opts.dirty_bitmap is not None else []
            source = open_endpoint(opts.source, False, loop, bitmaps)
        src = source
        opened.append(src)
        dst = open_endpoint(opts.destination, True, loop)
        opened.append(dst)
        dst.prepare(src.size, src, keep=opts.dirty_bitmap is not None)
        check_sizes(src, dst)
        dst.reads_as_zero = destination_is_zero(opts, dst)
        layout = plan_layout(opts, src, dst)
        if opts.verbose:
            _verbose(err, opts, src, dst, layout)
        progress = Progress(src.size, bar=opts.progress and opts.progress_fd is None,
                            fd=opts.progress_fd, stream=err)
        copier = Copier(opts, src, dst, layout, progress, loop)
        length = copier.run()
        if copier.blkhash is not None:
            write_blkhash(opts, copier.blkhash.hexdigest(length))
        if opts.verbose and copier.extents_failed:
            print(f"pynbd copy: extents unavailable, read everything: {copier.extents_failed}",
                  file=err)
        if opts.verbose:
            c = copier.counters
            print(f"pynbd copy: {length} bytes in {copier.elapsed:.3f}s: {c.written} written, "
                  f"{c.zeroed} zeroed, {c.skipped} skipped, {c.unchanged} unchanged; "
                  f"{copier.ramp.active} of {layout.connections} connection(s) in use", file=err)
        return length
    finally:
        for endpoint in reversed(opened):
            _quiet_close(endpoint)
        loop.close()


def write_blkhash(opts: CopyOptions, digest: str) -> None:
    """Print the ``--blkhash`` result to stdout or ``--blkhash-file``."""
    if opts.blkhash_file is None:
        print(digest, flush=True)
        return
    try:
        with open(opts.blkhash_file, "w", encoding="ascii") as f:
            f.write(digest + "\n")
    except OSError as exc:
        raise CopyError(opts.blkhash_file, exc.strerror or exc) from None


def _quiet_close(endpoint: Endpoint) -> None:
    # A failure to close must not hide the copy's own outcome.
    with contextlib.suppress(OSError, ProtocolError):
        endpoint.close()
