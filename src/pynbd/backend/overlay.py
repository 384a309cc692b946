"""Copy-on-write overlays: which blocks of a disk changed, and their new bytes.

    from pynbd.backend.overlay import ABSENT, DATA, ZERO, BlockLocks, TempOverlay, state_runs

    overlay = TempOverlay(size, 65536)           # a sparse, unlinked file in $TMPDIR
    locks = BlockLocks()
    with locks.one(block):                       # read-modify-write of one block
        ...
        overlay.write_blocks(block, whole_block)

An overlay covers a disk of ``size`` bytes cut into blocks of ``block_size``
bytes (the last one may be short). Each block is in one of three states:

    ABSENT   the overlay has nothing: read the layer below
    DATA     the overlay holds the block's bytes
    ZERO     the block reads as zeroes (written as zeroes or trimmed);
             no bytes are stored

The states live in memory, one byte per block (``Overlay.map``: 16 MiB per
TiB of disk at 64 KiB blocks), so a request finds the states of its blocks
with one slice and never asks the file system where its holes are
(``SEEK_HOLE`` is unreliable or quadratic on some file systems, tmpfs among
them). The values are those of ``pynbd.backend.chunkstore.ChunkState``.

Two overlays share one interface, so a filter uses either:

``TempOverlay(size, block_size)``
    A sparse temporary file in ``$TMPDIR`` (or the system temp directory),
    unlinked as soon as it is created, each block at its own offset. Blocks
    that become ZERO are punched out of it. It is gone when the process
    exits; ``sync`` does nothing. ``patch`` writes part of a DATA block in
    place, without reading the rest of it.
``StoreOverlay(store)``
    A persistent ``ChunkStore`` (``cow-file=``): every put is crash-safe
    and ``sync`` makes all of them durable. A block is always stored whole,
    so ``patch`` reads it, changes it and puts it back.

The interface (block numbers are ``first``/``end``, half-open):

    map                        the states, a bytearray indexed by block
    read(buf, offset)          fill buf from DATA blocks
    write_blocks(first, data)  store whole blocks from ``first`` (the disk's
                               last block may be short); they become DATA
    patch(buf, offset)         rewrite part of one DATA block
    zero_blocks(first, end)    the blocks become ZERO
    sync(), close()

An overlay is safe for concurrent calls on different blocks. A caller that
changes a block holds that block's lock from a ``BlockLocks`` for the whole
read-modify-write, so two partial writes to one block never lose each other;
readers of a temporary overlay take no lock (a block's bytes are written
before its state says DATA); a store overlay's ``read`` takes the block's
lock itself (its stripes are reentrant), as a ``ChunkStore`` may reuse the
place of a block's old bytes once a put has moved it. ``state_runs`` splits
a slice of states into runs of one state, in C (``bytearray.find``), not
byte by byte.

Errors are ``OSError`` with the kernel's errno (ENOSPC when the overlay's
file system is full); the state of a block changes only after its bytes were
written, so a failed write leaves the map as it was.
"""

from __future__ import annotations

import abc
import hashlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Protocol

from . import linux
from .blocks import block_runs
from .chunkstore import ChunkState, ChunkStore
from .connection import Buffer, Connection
from .errors import ConfigError
from .params import parse_bool

ABSENT, DATA, ZERO = int(ChunkState.ABSENT), int(ChunkState.DATA), int(ChunkState.ZERO)
STATES = (ABSENT, DATA, ZERO)
STRIPES = 1024


def pread_all(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from the file at ``offset`` (zeroes past its end)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            view[done:] = bytes(len(view) - done)
            return
        done += n


def pwrite_all(fd: int, view: Buffer, offset: int) -> None:
    """Write all of ``view`` at ``offset``; a full file system raises ENOSPC."""
    done = os.pwrite(fd, view, offset)
    if done < len(view):
        data = memoryview(view)
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)


def state_runs(states: bytes | bytearray, first: int = 0) -> Iterator[tuple[int, int, int]]:
    """(state, start, end) of each run of equal states; blocks numbered from ``first``."""
    n = len(states)
    upcoming = dict.fromkeys(STATES, -1)  # state -> its next index at or after i
    i = 0
    while i < n:
        state = states[i]
        end = n
        for other in STATES:
            if other == state:
                continue
            at = upcoming[other]
            if at < i:
                at = states.find(other, i)
                at = n if at < 0 else at
                upcoming[other] = at
            end = min(end, at)
        yield state, first + i, first + end
        i = end


def fingerprint(conn: Connection, samples: int = 64, head: int = 1 << 20) -> str:
    """An identity for a disk read through ``conn``: a hash of its size, its first
    ``head`` bytes and ``samples`` 4 KiB pieces spread evenly over the rest.

    A persistent overlay records it and refuses a base whose fingerprint
    differs. Reading about 1.3 MiB, it catches a replaced or resized disk and
    most rewritten ones, not a change that misses every sampled piece.
    """
    size = conn.get_size()
    digest = hashlib.sha256(str(size).encode())
    pieces = [(0, min(head, size))]
    piece = 4096
    if size > head + piece:
        step = (size - head - piece) // samples
        pieces += [(head + i * step, piece) for i in range(1, samples)] + [(size - piece, piece)]
    buf = memoryview(bytearray(max(n for _, n in pieces)))
    for offset, n in pieces:
        conn.pread(buf[:n], offset, 0)
        digest.update(buf[:n])
    return f"sampled-sha256:{digest.hexdigest()[:32]}"


def switch_rule(owner: str, text: str) -> Callable[[], bool]:
    """``true``/``false``, or ``/PATH``: on while that file exists (nbdkit's cow-on-read)."""
    if text.startswith("/"):
        return lambda: os.path.exists(text)
    try:
        value = parse_bool(text)
    except ValueError:
        raise ConfigError(f"{owner}={text}: expected true, false or /PATH") from None
    return lambda: value


class Lock(Protocol):
    """What a stripe is: a ``threading.Lock`` or ``threading.RLock``."""

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool: ...
    def release(self) -> None: ...
    def __enter__(self) -> bool: ...
    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...


class _Held:
    """The stripes of a range of blocks, taken in stripe order (no deadlock)."""

    def __init__(self, locks: list[Lock]) -> None:
        self.locks = locks

    def __enter__(self) -> None:
        for lock in self.locks:
            lock.acquire()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for lock in reversed(self.locks):
            lock.release()


class BlockLocks:
    """Striped per-block locks: block b is guarded by stripe b % stripes.

    Requests on different blocks wait for each other only when their blocks
    share a stripe, for as long as one block's update takes. ``reentrant``
    stripes may be taken again by the thread that holds them.
    """

    def __init__(self, stripes: int = STRIPES, reentrant: bool = False) -> None:
        make: Callable[[], Lock] = threading.RLock if reentrant else threading.Lock
        self.stripes = [make() for _ in range(stripes)]

    def one(self, block: int) -> Lock:
        return self.stripes[block % len(self.stripes)]

    def hold(self, first: int, end: int) -> _Held:
        """The locks of blocks [first, end), as one context manager."""
        count = len(self.stripes)
        if end - first >= count:
            return _Held(self.stripes)
        return _Held([self.stripes[s] for s in sorted({b % count for b in range(first, end)})])


class Overlay(abc.ABC):
    """The states of a disk's blocks; the subclasses keep the bytes."""

    def __init__(self, size: int, block_size: int, locks: BlockLocks | None = None) -> None:
        self.size = size
        self.block_size = block_size
        self.blocks = -(-size // block_size)
        self.map = bytearray(self.blocks)
        self.locks = locks or BlockLocks()

    @abc.abstractmethod
    def read(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` with the bytes at ``offset``, all in DATA blocks."""

    @abc.abstractmethod
    def write_blocks(self, first: int, data: memoryview) -> None:
        """Store whole blocks from ``first``; they become DATA."""

    @abc.abstractmethod
    def patch(self, buf: memoryview, offset: int) -> None:
        """Write ``buf`` at ``offset``, inside one DATA block (the caller holds its lock)."""

    @abc.abstractmethod
    def zero_blocks(self, first: int, end: int) -> None:
        """Blocks [first, end) become ZERO."""

    @abc.abstractmethod
    def sync(self) -> None:
        """Make every change so far durable."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the overlay's file."""

    def count_blocks(self, data: memoryview) -> int:
        return -(-len(data) // self.block_size)


class TempOverlay(Overlay):
    """A sparse temporary file, unlinked at once, with the block map in memory."""

    def __init__(self, size: int, block_size: int) -> None:
        super().__init__(size, block_size)
        self.file = tempfile.TemporaryFile(prefix="pynbd-cow-")
        self.fd = self.file.fileno()
        os.ftruncate(self.fd, self.blocks * block_size)

    def read(self, buf: memoryview, offset: int) -> None:
        pread_all(self.fd, buf, offset)

    def write_blocks(self, first: int, data: memoryview) -> None:
        pwrite_all(self.fd, data, first * self.block_size)
        n = self.count_blocks(data)
        if n == 1:
            self.map[first] = DATA
        else:
            self.map[first:first + n] = bytes((DATA,)) * n

    def patch(self, buf: memoryview, offset: int) -> None:
        pwrite_all(self.fd, buf, offset)

    def zero_blocks(self, first: int, end: int) -> None:
        # Only to give the space back: ZERO blocks are never read from the file.
        linux.try_punch_hole(self.fd, first * self.block_size, (end - first) * self.block_size)
        self.map[first:end] = bytes((ZERO,)) * (end - first)

    def sync(self) -> None:
        """Nothing to make durable: the overlay is thrown away when the process exits."""

    def close(self) -> None:
        self.file.close()


class StoreOverlay(Overlay):
    """A persistent ``ChunkStore`` seen as an overlay (its map mirrored in memory)."""

    def __init__(self, store: ChunkStore) -> None:
        # Reentrant: a read takes its block's lock, also inside a writer's read-modify-write.
        super().__init__(store.size, store.chunk_size, BlockLocks(reentrant=True))
        self.store = store
        for chunk, state in store.chunks():
            self.map[chunk] = state

    def read(self, buf: memoryview, offset: int) -> None:
        """Under each block's lock: a put may free the slot a read was about to use."""
        for chunk, inner, take, pos in block_runs(offset, len(buf), self.block_size):
            with self.locks.one(chunk):
                self.store.read(chunk, buf[pos:pos + take], inner)

    def write_blocks(self, first: int, data: memoryview) -> None:
        size = self.block_size
        for i in range(self.count_blocks(data)):
            piece = data[i * size:(i + 1) * size]
            if len(piece) < size:  # the disk's last block, padded as the store wants
                piece = memoryview(bytes(piece) + bytes(size - len(piece)))
            self.store.put(first + i, piece)
            self.map[first + i] = DATA

    def patch(self, buf: memoryview, offset: int) -> None:
        """Read the whole block, change it, put it back: a store never updates in place."""
        chunk, inner = divmod(offset, self.block_size)
        block = memoryview(bytearray(self.block_size))
        self.store.read(chunk, block, 0)
        block[inner:inner + len(buf)] = buf
        self.store.put(chunk, block)

    def zero_blocks(self, first: int, end: int) -> None:
        for chunk in range(first, end):
            self.store.put_zero(chunk)
            self.map[chunk] = ZERO

    def sync(self) -> None:
        self.store.sync()

    def close(self) -> None:
        self.store.close()
