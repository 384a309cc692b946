"""cow: a copy-on-write overlay: make any disk writable without changing it.

    pynbd serve --filter=cow file base.img
    pynbd serve --filter=cow data "1 2 3 @4096 4 5 6" size=1M
    pynbd serve --filter=cow --filter=xz file disk.xz cow-on-read=true
    pynbd serve --filter=cow file base.img cow-block-size=4k cow-on-read=/run/cor
    pynbd serve --filter=cow file base.img cow-file=changes.cow

Parameters
    cow-block-size=SIZE   the overlay's block size: a power of 2 from 4k to
                          2G (default 64k). A write smaller than a block
                          copies the rest of the block from below first.
    cow-on-read=BOOL      also copy blocks the client reads into the overlay,
                          so later reads need not ask the layer below
                          (default false)
    cow-on-read=/PATH     do so only while /PATH exists
    cow-on-cache=BOOL     NBD_CMD_CACHE copies blocks into the overlay
                          (default false: the request is passed below)
    cow-file=PATH         keep the overlay in PATH, so that it survives
                          restarts (created if missing; see below)

The layer below is opened read-only and never modified, even when it is
writable: writes, zeroes and trims go to the overlay, reads take each block
from the overlay when it holds the block and from below otherwise. Any
plugin works, read-only ones included (data, pattern, sparse-random, ...).
The overlay is a sparse temporary file in ``$TMPDIR`` (or the system temp
directory), unlinked as soon as it is created, plus a map of the blocks it
holds in memory (one byte per block); everything written is thrown away when
the server exits, and flush and FUA do nothing, as with nbdkit — unless the
overlay is persistent (cow-file=).

Persistent overlay (cow-file=PATH)
    The overlay and its block map live in PATH, a pynbd chunk store
    (``pynbd.backend.chunkstore``): each changed block is written to a free
    place in the file, then a checksummed journal record points the block at
    it, so a crash at any moment leaves every block old or new, never torn.
    FLUSH and FUA writes make everything written so far durable: what a
    client was told is flushed survives SIGKILL or power loss. PATH records
    the block size, the base's size and a fingerprint of its contents (a
    hash of its first MiB and 64 pieces spread over the rest): the server
    refuses to start, with one line and PATH untouched, when the base no
    longer matches, and likewise when PATH is corrupt. ``pynbd cow commit``
    writes the overlay into the base, ``pynbd cow export`` makes a qcow2
    image of it. Only the default export has a persistent overlay.

There is one overlay per export name, shared by every connection to that
export, so clients see each other's writes (multi-conn is offered). An
overlay that holds nothing is dropped when its last client leaves, and at
most 256 export names hold overlays at once (more are refused), so asking
for many names cannot exhaust the server's file descriptors. Zeroing
or trimming whole blocks stores nothing: the blocks read as zeroes and
extents report them as holes; parts of blocks are zeroed in the overlay.
Extents merge the overlay's blocks with the extents of the layer below.

Requests run in parallel: requests on different blocks never wait for each
other, and a write that covers part of a block holds that block's lock for
its read-modify-write, so two partial writes to the same block never lose
each other.

Differences from nbdkit's cow filter: NBD_CMD_WRITE_ZEROES is offered, and
fast zero too (nbdkit 1.32 offers neither over a plugin it opened
read-only), zeroed whole blocks are holes in extents, and each export name
has its own overlay (nbdkit's one overlay serves every export).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

from ..backend import (
    ALLOCATION_DEPTH,
    CACHE_NATIVE,
    CACHE_NONE,
    FLAG_FUA,
    FLAG_REQ_ONE,
    FUA_NATIVE,
    ZERO_BUFFER,
    Buffer,
    ConfigError,
    Connection,
    ContextExtent,
    Extent,
    Filter,
    FilterConnection,
    OpenContext,
    Param,
    clip_extents,
    fill_zero,
)
from ..backend.chunkstore import ChunkStore, StoreError
from ..backend.overlay import (
    ABSENT,
    DATA,
    ZERO,
    Overlay,
    StoreOverlay,
    TempOverlay,
    fingerprint,
    state_runs,
    switch_rule,
)

E = TypeVar("E", Extent, ContextExtent)
DEFAULT_BLOCK = 64 * 1024
MAX_OVERLAYS = 256  # export names with an overlay at once (each holds an open file)
MAX_BLOCK = 1 << 31
_ZEROES = memoryview(ZERO_BUFFER)


def zeroes(count: int) -> memoryview:
    """A read-only view of ``count`` zero bytes."""
    return _ZEROES[:count] if count <= len(_ZEROES) else memoryview(bytes(count))


class CowConnection(FilterConnection["CowFilter"]):
    def __init__(self, next: Connection, filter: CowFilter, ctx: OpenContext) -> None:
        super().__init__(next, filter, ctx)
        self.size = next.get_size()
        self.overlay = filter.overlay_for(next, ctx.export_name)
        self.bs = self.overlay.block_size
        self.map = self.overlay.map
        self.locks = self.overlay.locks
        self.on_read = filter.on_read

    def close(self) -> None:
        self.filter.release(self.ctx.export_name)
        super().close()

    # ------------------------------------------------------------ answers
    def can_write(self) -> bool:
        return True

    def can_flush(self) -> bool:
        return True

    def can_trim(self) -> bool:
        return True

    def can_zero(self) -> bool:
        return True

    def can_fast_zero(self) -> bool:
        return True

    def can_fua(self) -> int:
        return FUA_NATIVE

    def can_multi_conn(self) -> bool:
        return True  # one overlay per export: every client sees every write

    def can_cache(self) -> int:
        return CACHE_NATIVE

    def can_extents(self) -> bool:
        return True

    def block_size(self) -> tuple[int, int, int]:
        minimum, preferred, maximum = self.next.block_size()
        if minimum == 0:
            return 1, self.bs, 0xFFFFFFFF
        return minimum, max(preferred, self.bs) if maximum >= self.bs else preferred, maximum

    # ------------------------------------------------------------ reads
    def _block_span(self, count: int, offset: int) -> tuple[int, int]:
        """First block and end block (exclusive) of a range."""
        return offset // self.bs, (offset + count - 1) // self.bs + 1

    def pread_buffers(self, count: int, offset: int, flags: int) -> Sequence[Buffer] | None:
        """Zero-copy reads of the layer below where the overlay holds none of the range."""
        bs = self.bs
        first, last = offset // bs, (offset + count - 1) // bs
        if first == last:
            absent = self.map[first] == ABSENT
        else:
            states = self.map[first:last + 1]
            absent = states.count(ABSENT) == len(states)
        if absent and not self.on_read():
            return self.next.pread_buffers(count, offset, flags)
        return None

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        if not buf:
            return
        first, end = self._block_span(len(buf), offset)
        if end - first == 1:
            state = self.map[first]
            if state == ABSENT and self.on_read():
                self.copy_up(first, end)
                state = self.map[first]
            if state == ABSENT:
                self.next.pread(buf, offset, 0)
            elif state == DATA:
                self.overlay.read(buf, offset)
            else:
                fill_zero(buf)
            return
        if self.on_read():
            self.copy_up(first, end)
        stop = offset + len(buf)
        for state, lo, hi in state_runs(self.map[first:end], first):
            start, finish = max(offset, lo * self.bs), min(stop, hi * self.bs)
            view = buf[start - offset:finish - offset]
            if state == ABSENT:
                self.next.pread(view, start, 0)
            elif state == DATA:
                self.overlay.read(view, start)
            else:
                fill_zero(view)

    def _current(self, block: int, view: memoryview) -> None:
        """Fill ``view`` with what block ``block`` holds now (its lock held)."""
        state = self.map[block]
        offset = block * self.bs
        if state == ABSENT:
            self.next.pread(view, offset, 0)
        elif state == DATA:
            self.overlay.read(view, offset)
        else:
            fill_zero(view)

    def copy_up(self, first: int, end: int) -> None:
        """Copy the ABSENT blocks of [first, end) from below into the overlay."""
        with self.locks.hold(first, end):
            for state, lo, hi in state_runs(self.map[first:end], first):
                if state != ABSENT:
                    continue
                start, finish = lo * self.bs, min(hi * self.bs, self.size)
                bounce = memoryview(bytearray(finish - start))
                self.next.pread(bounce, start, 0)
                self.overlay.write_blocks(lo, bounce)

    # ------------------------------------------------------------ writes
    def _bounds(self, block: int) -> tuple[int, int]:
        start = block * self.bs
        return start, min(start + self.bs, self.size)

    def _write_piece(self, block: int, piece: memoryview | None, count: int, offset: int) -> None:
        """Write ``piece`` (zeroes if None) over part or all of one block (its lock held)."""
        start, finish = self._bounds(block)
        state = self.map[block]
        if offset == start and count == finish - start:
            if piece is None:
                self.overlay.zero_blocks(block, block + 1)
            else:
                self.overlay.write_blocks(block, piece)
        elif piece is None and state == ZERO:
            return
        elif state == DATA:
            self.overlay.patch(zeroes(count) if piece is None else piece, offset)
        else:
            whole = self.filter.scratch(finish - start)
            self._current(block, whole)
            inner = offset - start
            whole[inner:inner + count] = zeroes(count) if piece is None else piece
            self.overlay.write_blocks(block, whole)

    def _write(self, buf: memoryview | None, count: int, offset: int) -> None:
        """Write ``buf`` (zeroes if None) at ``offset``, block by block under the locks."""
        first, end = self._block_span(count, offset)
        if end - first == 1:
            with self.locks.one(first):
                self._write_piece(first, buf, count, offset)
            return
        stop = offset + count
        with self.locks.hold(first, end):
            # Whole blocks in the middle go down in one call; a partial head and tail alone.
            body_first = first if offset % self.bs == 0 else first + 1
            body_end = end if stop == self._bounds(end - 1)[1] else end - 1
            if body_first > first:
                n = (first + 1) * self.bs - offset
                self._write_piece(first, None if buf is None else buf[:n], n, offset)
            if body_end > body_first:
                lo, hi = body_first * self.bs, min(body_end * self.bs, stop)
                if buf is None:
                    self.overlay.zero_blocks(body_first, body_end)
                else:
                    self.overlay.write_blocks(body_first, buf[lo - offset:hi - offset])
            if body_end < end:
                lo = (end - 1) * self.bs
                self._write_piece(end - 1, None if buf is None else buf[lo - offset:], stop - lo, lo)

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        if buf:
            self._write(buf, len(buf), offset)
        if flags & FLAG_FUA:
            self.overlay.sync()

    def zero(self, count: int, offset: int, flags: int) -> None:
        # Never slower than writing the zeroes: a fast zero is done too.
        if count:
            self._write(None, count, offset)
        if flags & FLAG_FUA:
            self.overlay.sync()

    def trim(self, count: int, offset: int, flags: int) -> None:
        """As nbdkit: trimmed whole blocks read as zeroes, parts of blocks are zeroed."""
        self.zero(count, offset, flags)

    def flush(self, flags: int) -> None:
        self.overlay.sync()

    def cache(self, count: int, offset: int, flags: int) -> None:
        if not count:
            return
        first, end = self._block_span(count, offset)
        if self.filter.cow_on_cache:
            self.copy_up(first, end)
            return
        if self.next.can_cache() == CACHE_NONE:
            return
        for state, lo, hi in state_runs(self.map[first:end], first):
            if state == ABSENT:
                start, finish = lo * self.bs, min(hi * self.bs, self.size)
                self.next.cache(finish - start, start, 0)

    # ------------------------------------------------------------ extents
    def extents(self, count: int, offset: int, flags: int) -> Iterator[Extent]:
        first, end = self._block_span(count, offset)
        stop = offset + count
        for state, lo, hi in state_runs(self.map[first:end], first):
            start, finish = max(offset, lo * self.bs), min(stop, hi * self.bs)
            if state == DATA:
                yield Extent(start, finish - start)
            elif state == ZERO:
                yield Extent(start, finish - start, hole=True, zero=True)
            else:
                yield from self._extents_below(start, finish, flags)
            if flags & FLAG_REQ_ONE:
                return

    def _extents_below(self, start: int, finish: int, flags: int) -> Iterator[Extent]:
        """Extents of the layer below covering [start, finish)."""
        return covering(self.next.extents, start, finish, flags, lambda pos, n: Extent(pos, n))

    def block_status(self, context: str, count: int, offset: int, flags: int) -> Iterator[ContextExtent]:
        if context != ALLOCATION_DEPTH:
            yield from self.next.block_status(context, count, offset, flags)
            return
        first, end = self._block_span(count, offset)
        stop = offset + count
        for state, lo, hi in state_runs(self.map[first:end], first):
            start, finish = max(offset, lo * self.bs), min(stop, hi * self.bs)
            if state != ABSENT:
                yield ContextExtent(start, finish - start, 1)
            else:
                yield from self._depth_below(start, finish, flags)
            if flags & FLAG_REQ_ONE:
                return

    def _depth_below(self, start: int, finish: int, flags: int) -> Iterator[ContextExtent]:
        """The layer below's allocation depth plus one where it answers the context;
        else 2 for everything (it holds all it serves, as qemu reports a raw backing file)."""
        if not self.filter.depth_below.get(self.ctx.export_name, False):
            yield ContextExtent(start, finish - start, 2)
            return

        def ask(count: int, offset: int, flags: int) -> Iterable[ContextExtent]:
            return self.next.block_status(ALLOCATION_DEPTH, count, offset, flags)

        for ext in covering(ask, start, finish, flags, lambda pos, n: ContextExtent(pos, n, 0)):
            yield ext._replace(flags=ext.flags + 1 if ext.flags else 0)


def covering(ask: Callable[[int, int, int], Iterable[E]], start: int, finish: int, flags: int,
             rest: Callable[[int, int], E]) -> Iterator[E]:
    """What ``ask(count, offset, flags)`` says about [start, finish), asking again after a
    short answer; ``rest(offset, count)`` stands for a range it says nothing about."""
    pos = start
    while pos < finish:
        asked = pos
        for ext in clip_extents(ask(finish - pos, pos, flags & FLAG_REQ_ONE), pos, finish - pos):
            yield ext
            pos = ext.offset + ext.length
        if flags & FLAG_REQ_ONE:
            return
        if pos == asked:
            yield rest(pos, finish - pos)
            return


class CowFilter(Filter):
    name = "cow"
    short_requests = True
    params = (
        Param("cow-block-size", "size", "block size of the overlay (a power of 2, 4k to 2G)",
              default=DEFAULT_BLOCK),
        Param("cow-on-read", "str", "true, false or /PATH: copy blocks that are read into "
              "the overlay", default="false"),
        Param("cow-on-cache", "bool", "copy blocks of cache requests into the overlay",
              default=False),
        Param("cow-file", "path", "keep the overlay in this file, across restarts"),
    )
    cow_block_size: int
    cow_on_read: str
    cow_on_cache: bool
    cow_file: str | None
    connection = CowConnection

    def config_complete(self) -> None:
        block = self.cow_block_size
        if block < 4096 or block > MAX_BLOCK or block & (block - 1):
            raise ConfigError(f"cow: cow-block-size={block}: must be a power of 2 from 4096 to 2G")
        self.on_read: Callable[[], bool] = switch_rule("cow: cow-on-read", self.cow_on_read)
        self._overlays: dict[str, Overlay] = {}
        self._users: dict[str, int] = {}  # export → its connections now open
        self._lock = threading.Lock()
        self._local = threading.local()
        self.depth_below: dict[str, bool] = {}  # export → the layer below answers allocation depth

    def get_ready(self) -> None:
        """With cow-file=, open the overlay now: a wrong base or a corrupt map stops the server."""
        if self.cow_file is None:
            return
        below = self.open_below(OpenContext(readonly=True))
        try:
            self.overlay_for(below, "")
        finally:
            below.close()

    def list_meta_contexts(self, next_list: Callable[[OpenContext], list[str]],
                           ctx: OpenContext) -> list[str]:
        """The layer below's contexts, and qemu:allocation-depth (the overlay is depth 1)."""
        below = next_list(ctx)
        self.depth_below[ctx.export_name] = ALLOCATION_DEPTH in below
        return below if ALLOCATION_DEPTH in below else [*below, ALLOCATION_DEPTH]

    def open(self, next_open: Callable[[OpenContext], Connection],
             ctx: OpenContext) -> Connection:
        """Open the layer below read-only, whatever the client asked."""
        return super().open(lambda c: next_open(dataclasses.replace(c, readonly=True)), ctx)

    def overlay_for(self, below: Connection, export: str) -> Overlay:
        """The overlay of ``export``, created when its first client connects."""
        size = below.get_size()
        with self._lock:
            overlay = self._overlays.get(export)
            if overlay is None:
                if len(self._overlays) >= MAX_OVERLAYS:
                    raise ConfigError(f"cow: {MAX_OVERLAYS} export names already have overlays; "
                                      f"refusing export {export!r}")
                overlay = self._overlays[export] = self._new_overlay(below, export)
            elif overlay.size != size:
                raise ConfigError(f"cow: the size of export {export!r} below changed from "
                                  f"{overlay.size} to {size} bytes")
            self._users[export] = self._users.get(export, 0) + 1
            return overlay

    def release(self, export: str) -> None:
        """A connection to ``export`` closed. A temporary overlay that holds nothing and has
        no client left is dropped, so that asking for many export names costs nothing."""
        with self._lock:
            users = self._users.get(export, 0) - 1
            if users > 0:
                self._users[export] = users
                return
            self._users.pop(export, None)
            overlay = self._overlays.get(export)
            if isinstance(overlay, TempOverlay) and overlay.map.count(ABSENT) == len(overlay.map):
                del self._overlays[export]
                overlay.close()

    def _new_overlay(self, below: Connection, export: str) -> Overlay:
        if self.cow_file is None:
            return TempOverlay(below.get_size(), self.cow_block_size)
        if export != "":
            raise ConfigError(f"cow: cow-file={self.cow_file} keeps the overlay of the default "
                              f"export only; export {export!r} has none")
        try:
            store = ChunkStore.open(self.cow_file, chunk_size=self.cow_block_size,
                                    size=below.get_size(), identity=fingerprint(below))
        except StoreError as exc:
            raise StoreError(f"cow: {exc}") from None
        return StoreOverlay(store)

    def scratch(self, count: int) -> memoryview:
        """A buffer of ``count`` bytes (at most a block) owned by the calling thread."""
        buf: memoryview | None = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = memoryview(bytearray(self.cow_block_size))
        return buf[:count]

    def unload(self) -> None:
        for overlay in self._overlays.values():
            overlay.close()
