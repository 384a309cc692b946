"""``--blkhash``: the blkhash of the image, computed while it is copied.

The same algorithm and output as libnbd 1.24's ``nbdcopy --blkhash``
(after Nir Soffer's blkhash): the image is cut into blocks of BLOCKSIZE
bytes (the last one may be shorter), each block is hashed with ALGO, and
the blkhash is ALGO over those digests in order followed by the image's
length as 8 bytes little-endian, printed as lowercase hex and a newline.
Ranges that read as zero (from the source's extents) are not read: their
blocks take the digest of a zero block, computed once. Blocks read are
hashed by a ``Hasher``'s worker threads (``hashlib`` lets go of the
interpreter lock on large buffers) while their writes are in flight: the
copy's own thread goes on sending and receiving meanwhile.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Protocol

ALGORITHMS = ("md5", "sha1", "sha256", "sha512")
DEFAULT_ALGORITHM, DEFAULT_BLOCK = "sha256", 64 * 1024
_ZERO = b""  # a block that reads as zero: its digest is filled in at the end


class _Digest(Protocol):
    def digest(self) -> bytes: ...


class BlockHash:
    """Collects the digests of an image's blocks, in any order, from any thread."""

    def __init__(self, algorithm: str, block: int, length: int | None) -> None:
        import hashlib  # here: every copy imports this module, few hash (OpenSSL loads in ~2 ms)

        self.algorithm, self.block = algorithm, block
        self._new: Callable[[bytes | bytearray | memoryview], _Digest] = getattr(hashlib, algorithm)
        blocks = 0 if length is None else -(-length // block)
        self._digests: list[bytes | None] = [None] * blocks
        self._partial: dict[int, tuple[bytearray, int]] = {}  # block -> (data, bytes seen)
        self._lock = threading.Lock()

    def data(self, offset: int, view: memoryview) -> None:
        """Bytes read from ``offset``."""
        self._cover(offset, len(view), view)

    def zero(self, offset: int, length: int) -> None:
        """``length`` bytes from ``offset`` that read as zero."""
        self._cover(offset, length, None)

    def _cover(self, offset: int, length: int, view: memoryview | None) -> None:
        block, end, pos = self.block, offset + length, offset
        if pos % block:  # the head, inside a block begun elsewhere
            n = min(block - pos % block, length)
            self._add_partial(pos // block, pos % block, n, view[:n] if view is not None else None)
            pos += n
        first, whole = pos // block, (end - pos) // block
        if whole:
            if view is None:
                self._store(first, [_ZERO] * whole)
            else:
                base = pos - offset
                self._store(first, [self._new(view[base + i * block:base + (i + 1) * block]).digest()
                                    for i in range(whole)])
            pos += whole * block
        if pos < end:  # the tail, a block finished elsewhere (or the image's last)
            self._add_partial(pos // block, 0, end - pos,
                              view[pos - offset:] if view is not None else None)

    def _store(self, first: int, digests: list[bytes | None]) -> None:
        with self._lock:
            self._grow(first + len(digests))
            self._digests[first:first + len(digests)] = digests

    def _grow(self, blocks: int) -> None:
        if len(self._digests) < blocks:  # a stream: the length was not known
            self._digests.extend([None] * (blocks - len(self._digests)))

    def _add_partial(self, index: int, at: int, n: int, view: memoryview | None) -> None:
        with self._lock:
            buf, seen = self._partial.get(index) or (bytearray(self.block), 0)
            if view is not None:
                buf[at:at + n] = view
            seen += n
            if seen < self.block:
                self._partial[index] = buf, seen
                return
            self._partial.pop(index, None)
            self._grow(index + 1)
            self._digests[index] = self._new(buf).digest()

    def hexdigest(self, length: int) -> str:
        """The blkhash of an image of ``length`` bytes, every byte of it seen."""
        with self._lock:
            for index, (buf, seen) in self._partial.items():  # the last, shorter block
                self._grow(index + 1)
                self._digests[index] = self._new(memoryview(buf)[:seen]).digest()
            self._partial.clear()
            blocks = self._digests[:-(-length // self.block)]
        zero = self._new(bytes(self.block)).digest()
        import hashlib  # (loaded by __init__ already)

        final = hashlib.new(self.algorithm)
        for digest in blocks:
            if digest is None:
                raise ValueError("blkhash: part of the image was never seen")
            final.update(digest or zero)
        final.update(length.to_bytes(8, "little"))
        return final.hexdigest()


class Hasher:
    """Worker threads that hash read buffers into a ``BlockHash``.

    ``data(offset, view, done)`` queues the buffer; once hashed,
    ``deliver(done)`` is called from the worker (the copy's loop then calls
    ``done`` from its own thread).
    """

    def __init__(self, blkhash: BlockHash, workers: int,
                 deliver: Callable[[Callable[[], None]], None]) -> None:
        self.blkhash, self.deliver = blkhash, deliver
        self._jobs: queue.SimpleQueue[tuple[int, memoryview, Callable[[], None]] | None] = \
            queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"blkhash-{i}", daemon=True)
                         for i in range(max(1, workers))]
        for thread in self._threads:
            thread.start()

    def data(self, offset: int, view: memoryview, done: Callable[[], None]) -> None:
        self._jobs.put((offset, view, done))

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            offset, view, done = job
            self.blkhash.data(offset, view)
            self.deliver(done)

    def close(self) -> None:
        """Stop the workers once the jobs queued are done."""
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()
