"""A persistent, crash-safe map "chunk number → chunk contents" in one file.

The persistent cow overlay (``cow-file=``) and the snapshot stores keep
their blocks here. What it promises:

- After ``sync()`` returns, every ``put`` / ``put_zero`` / ``drop`` made
  before it survives a crash (SIGKILL or power loss).
- A crash at any moment leaves every chunk either wholly old or wholly new:
  a ``put`` never overwrites the chunk's live copy. It writes the new
  contents to a free slot, then appends a journal record pointing the chunk
  at that slot; the old slot is reused only after the next ``sync()``, when
  the record that superseded it is durable.
- Opening replays the journal: records carry a sequence number and a CRC,
  so a torn tail is recognised and ignored. Records written after the last
  sync also carry the CRC of the chunk's data, checked at open, so a record
  that reached the disk before its data (power loss) is dropped with
  everything after it: the store comes back as it was at some moment after
  the last sync.

File layout (all integers little-endian)::

    0      superblock copy A (4 KiB)       two copies, written alternately;
    4096   superblock copy B (4 KiB)       the valid one with the higher
                                           generation wins
    BASE   slot 0, slot 1, …               BASE = max(8 KiB, chunk size);
                                           each slot is one chunk long and
                                           holds chunk data or journal records

    superblock: magic "PYNBDCS1", version u32, generation u64, chunk_size u64,
      size u64, limit u64 (0: none), journal_slot u64, journal_seq u64,
      identity (u32 length + UTF-8), CRC-32 of all that
    journal record (32 bytes): seq u64, chunk u64, slot i64, data_crc u32, crc u32
      slot ≥ 0: the chunk's data is in that slot; ZERO (-1): the chunk reads
      as zeroes; ABSENT (-2): forget the chunk; SYNC (-3): everything before
      is durable; NEXT (-4): the journal continues in slot ``chunk``

The journal is rewritten compactly (one record per live chunk, then the
other superblock copy is pointed at it) when it grows to several times the
number of live chunks.

Callers hold their own per-chunk lock around operations on one chunk (a
read of chunk C must not overlap a put of C); operations on different chunks
may run concurrently from any thread.
"""

from __future__ import annotations

import enum
import errno
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from .connection import Buffer
from .errors import ConfigError, io_error

MAGIC = b"PYNBDCS1"
VERSION = 1
SUPERBLOCK_SIZE = 4096
_SUPER = struct.Struct("<8sIQQQQQQI")
_RECORD = struct.Struct("<QQqI")  # the CRC follows
RECORD_SIZE = _RECORD.size + 4
ZERO, ABSENT, SYNC, NEXT = -1, -2, -3, -4
MAX_IDENTITY = 2048
# Free slots waiting for a sync before reuse; past this many, put() syncs by itself.
MAX_PENDING_FREE = 1024
# Compact the journal when it holds this many times more records than live chunks (and at least MIN).
COMPACT_FACTOR = 4
COMPACT_MIN_RECORDS = 65536


class StoreError(ConfigError):
    """A chunk store that cannot be used: wrong base, corrupt, unreadable. One line."""


class ChunkState(enum.IntEnum):
    ABSENT = 0
    DATA = 1
    ZERO = 2


@dataclass
class _Superblock:
    generation: int
    chunk_size: int
    size: int
    limit: int
    journal_slot: int
    journal_seq: int
    identity: str

    def pack(self) -> bytes:
        ident = self.identity.encode()
        body = _SUPER.pack(MAGIC, VERSION, self.generation, self.chunk_size, self.size, self.limit,
                           self.journal_slot, self.journal_seq, len(ident)) + ident
        return (body + struct.pack("<I", zlib.crc32(body))).ljust(SUPERBLOCK_SIZE, b"\0")

    @classmethod
    def unpack(cls, raw: bytes) -> _Superblock | None:
        if len(raw) < _SUPER.size + 4 or raw[:8] != MAGIC:
            return None
        magic, version, gen, chunk, size, limit, jslot, jseq, ilen = _SUPER.unpack_from(raw)
        end = _SUPER.size + ilen
        if version != VERSION or ilen > MAX_IDENTITY or end + 4 > len(raw):
            return None
        (crc,) = struct.unpack_from("<I", raw, end)
        if crc != zlib.crc32(raw[:end]):
            return None
        return cls(gen, chunk, size, limit, jslot, jseq, raw[_SUPER.size:end].decode(errors="replace"))


def _record(seq: int, chunk: int, slot: int, data_crc: int = 0) -> bytes:
    body = _RECORD.pack(seq, chunk, slot, data_crc)
    return body + struct.pack("<I", zlib.crc32(body))


def _records(raw: bytes) -> Iterator[tuple[int, int, int, int, bool]]:
    """(seq, chunk, slot, data_crc, valid) for each 32-byte record in ``raw``."""
    for offset in range(0, len(raw) - RECORD_SIZE + 1, RECORD_SIZE):
        seq, chunk, slot, data_crc = _RECORD.unpack_from(raw, offset)
        (crc,) = struct.unpack_from("<I", raw, offset + _RECORD.size)
        yield seq, chunk, slot, data_crc, crc == zlib.crc32(raw[offset:offset + _RECORD.size])


class ChunkStore:
    """See the module docstring. Build with ``open`` or ``open_existing``."""

    def __init__(self, path: str, fd: int, sb: _Superblock, sb_copy: int) -> None:
        self.path = path
        self.chunk_size = sb.chunk_size
        self.size = sb.size
        self.identity = sb.identity
        self.limit = sb.limit or None
        self._fd = fd
        self._sb = sb
        self._sb_copy = sb_copy  # which copy (0 or 1) holds the current superblock
        self._base = max(2 * SUPERBLOCK_SIZE, sb.chunk_size)
        self._per_journal_slot = sb.chunk_size // RECORD_SIZE
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._map: dict[int, int] = {}  # chunk → slot, or ZERO
        self._data_crc: dict[int, int] = {}
        self._journal_slots: list[int] = []
        self._free: list[int] = []
        self._pending_free: list[int] = []
        self._slots = 0  # slots in the file
        self._seq = sb.journal_seq  # the next record's sequence number
        self._records = 0  # records in the current journal
        self._jslot = sb.journal_slot  # the journal slot being appended to
        self._jpos = 0  # the next record's index in it
        self._dirty = False

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str, *, chunk_size: int, size: int, identity: str,
             create: bool = True, limit: int | None = None) -> ChunkStore:
        """Open the store at ``path``, creating it if missing (and ``create``).

        An existing store made for another chunk size, disk size or identity is
        refused with a StoreError and left untouched.
        """
        if chunk_size < 4096 or chunk_size & (chunk_size - 1):
            raise StoreError(f"{path}: chunk size {chunk_size} must be a power of 2, at least 4096")
        if len(identity.encode()) > MAX_IDENTITY:
            raise StoreError(f"{path}: identity longer than {MAX_IDENTITY} bytes")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0), 0o600)
        except OSError as exc:
            raise StoreError(f"{path}: {exc.strerror}") from None
        try:
            if os.fstat(fd).st_size == 0:
                return cls._create(path, fd, chunk_size, size, identity, limit or 0)
            store = cls._load(path, fd)
            if (store.chunk_size, store.size, store.identity) != (chunk_size, size, identity):
                raise StoreError(
                    f"{path}: made for another disk (chunk size {store.chunk_size}, size {store.size}, "
                    f"base {store.identity!r}); this one has chunk size {chunk_size}, size {size}, "
                    f"base {identity!r}; refusing to use it")
            if limit is not None and limit != store.limit:
                store.limit = limit
            return store
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def open_existing(cls, path: str, *, writable: bool = True) -> ChunkStore:
        """Open a store whose parameters are read from its superblock (for tools)."""
        try:
            fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError as exc:
            raise StoreError(f"{path}: {exc.strerror}") from None
        try:
            return cls._load(path, fd, writable=writable)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def _create(cls, path: str, fd: int, chunk_size: int, size: int, identity: str,
                limit: int) -> ChunkStore:
        sb = _Superblock(1, chunk_size, size, limit, 0, 1, identity)
        store = cls(path, fd, sb, 0)
        store._slots = 1
        store._journal_slots = [0]
        os.ftruncate(fd, store._slot_offset(1))
        os.pwrite(fd, sb.pack(), 0)
        os.pwrite(fd, bytes(SUPERBLOCK_SIZE), SUPERBLOCK_SIZE)
        os.fsync(fd)
        return store

    @classmethod
    def _load(cls, path: str, fd: int, writable: bool = True) -> ChunkStore:
        copies = [_Superblock.unpack(os.pread(fd, SUPERBLOCK_SIZE, i * SUPERBLOCK_SIZE)) for i in (0, 1)]
        valid = [(sb.generation, i, sb) for i, sb in enumerate(copies) if sb is not None]
        if not valid:
            raise StoreError(f"{path}: not a pynbd chunk store, or both copies of its header are corrupt")
        _, copy, sb = max(valid)
        store = cls(path, fd, sb, copy)
        store._slots = max(0, (os.fstat(fd).st_size - store._base) // sb.chunk_size)
        store._replay()
        if writable:
            store._seal_journal_tail()
        return store

    def _replay(self) -> None:
        """Rebuild the map from the journal (see the module docstring)."""
        entries: list[tuple[int, int, int, int]] = []  # seq, chunk, slot, data_crc
        last_sync = -1
        slot, seq = self._sb.journal_slot, self._sb.journal_seq
        self._journal_slots = [slot]
        pos = 0
        while True:
            if not 0 <= slot < self._slots:
                raise StoreError(f"{self.path}: corrupt chunk store: journal slot {slot} is outside the file")
            raw = os.pread(self._fd, self.chunk_size, self._slot_offset(slot))
            pos = 0
            next_slot = None
            for index, (rseq, chunk, target, data_crc, valid) in enumerate(_records(raw)):
                if not valid or rseq != seq:
                    self._check_tail(raw, index, seq)
                    break
                seq += 1
                pos += 1
                if target == NEXT:
                    next_slot = chunk
                    break
                if target == SYNC:
                    last_sync = len(entries)
                elif target >= ZERO or target == ABSENT:
                    entries.append((rseq, chunk, target, data_crc))
            if next_slot is None:
                break
            slot = next_slot
            self._journal_slots.append(slot)
        # Records after the last SYNC may have reached the disk before their data: check.
        keep = len(entries)
        for i in range(max(last_sync, 0), len(entries)):
            _, chunk, target, data_crc = entries[i]
            if target >= 0 and (target >= self._slots or zlib.crc32(
                    os.pread(self._fd, self.chunk_size, self._slot_offset(target))) != data_crc):
                keep = i
                break
        if keep < len(entries):
            # Resume appending right after the last record kept.
            self._rewind_journal_to(entries[keep][0])
            seq, slot, pos = self._seq, self._jslot, self._jpos
        self._seq, self._jslot, self._jpos = seq, slot, pos
        self._records = keep
        for _, chunk, target, data_crc in entries[:keep]:
            if target == ABSENT:
                self._map.pop(chunk, None)
                self._data_crc.pop(chunk, None)
            else:
                if not 0 <= chunk < self._chunks() or target >= self._slots:
                    raise StoreError(f"{self.path}: corrupt chunk store: record for chunk {chunk} "
                                     f"points outside the disk or the file")
                self._map[chunk] = target
                self._data_crc[chunk] = data_crc
        used = {s for s in self._map.values() if s >= 0} | set(self._journal_slots)
        self._free = sorted((s for s in range(self._slots) if s not in used), reverse=True)

    def _check_tail(self, raw: bytes, index: int, seq: int) -> None:
        """Where replay stopped at record ``index`` of a journal slot (expecting ``seq``),
        tell a torn tail from damage. A crash can lose the records written since the
        last sync, in any order; but a record written after a later SYNC record was
        written after that sync returned, so if one is intact, the damaged record had
        been durable: the store is corrupt."""
        synced = False
        for later, (rseq, _, target, _, valid) in enumerate(_records(raw)):
            if later <= index or not valid or not seq < rseq < seq + self._per_journal_slot:
                continue
            if target == SYNC:
                synced = True
            elif synced:
                raise StoreError(f"{self.path}: corrupt chunk store: journal record {seq} is damaged "
                                 f"but later ones are intact")

    def _rewind_journal_to(self, seq: int) -> None:
        """Set the append position to the record numbered ``seq`` (which is dropped)."""
        index = seq - self._sb.journal_seq
        per_slot = self._per_journal_slot  # each full slot ends with its NEXT record
        which, pos = divmod(index, per_slot)
        self._journal_slots = self._journal_slots[:which + 1]
        self._jslot, self._jpos, self._seq = self._journal_slots[which], pos, seq

    def _seal_journal_tail(self) -> None:
        """Zero what follows the last valid record, so stale records can never follow new ones."""
        start = self._slot_offset(self._jslot) + self._jpos * RECORD_SIZE
        end = self._slot_offset(self._jslot) + self.chunk_size
        if end > start:
            os.pwrite(self._fd, bytes(end - start), start)
            os.fdatasync(self._fd)

    # -- queries ---------------------------------------------------------------------------

    def _chunks(self) -> int:
        return -(-self.size // self.chunk_size)

    def _slot_offset(self, slot: int) -> int:
        return self._base + slot * self.chunk_size

    def state(self, chunk: int) -> ChunkState:
        slot = self._map.get(chunk)
        if slot is None:
            return ChunkState.ABSENT
        return ChunkState.ZERO if slot == ZERO else ChunkState.DATA

    def chunks(self) -> list[tuple[int, ChunkState]]:
        """Every chunk the store holds, in order: the exception table."""
        with self._lock:
            items = sorted(self._map.items())
        return [(c, ChunkState.ZERO if s == ZERO else ChunkState.DATA) for c, s in items]

    def table(self) -> list[tuple[int, int]]:
        """(chunk, slot) for every chunk held, in order; the slot of a ZERO chunk is -1."""
        with self._lock:
            return sorted(self._map.items())

    def used_bytes(self) -> int:
        """The file's size: what ``limit`` bounds."""
        return self._slot_offset(self._slots)

    def read(self, chunk: int, buf: memoryview, offset: int = 0) -> None:
        """Fill ``buf`` from the chunk's bytes at ``offset`` (zeroes for a ZERO chunk)."""
        slot = self._map.get(chunk)
        if slot is None:
            raise KeyError(f"chunk {chunk} is not in the store")
        if slot == ZERO:
            buf[:] = bytes(len(buf))
            return
        want = len(buf)
        got = os.preadv(self._fd, [buf], self._slot_offset(slot) + offset)
        if got != want:
            raise io_error(errno.EIO, f"{self.path}: short read of chunk {chunk}")

    # -- changes ---------------------------------------------------------------------------

    def put(self, chunk: int, data: Buffer) -> None:
        """Store the whole chunk ``data`` (chunk_size bytes)."""
        view = memoryview(data)
        if view.nbytes != self.chunk_size:
            raise ValueError(f"put needs {self.chunk_size} bytes, not {view.nbytes}")
        self._check_chunk(chunk)
        with self._lock:
            slot = self._allocate(may_sync=True)
        try:
            written = os.pwrite(self._fd, view, self._slot_offset(slot))
            if written != self.chunk_size:
                raise io_error(errno.ENOSPC, f"{self.path}: short write")
        except BaseException:
            with self._lock:
                self._free.append(slot)
            raise
        crc = zlib.crc32(view)
        with self._lock:
            self._change(chunk, slot, crc)

    def put_zero(self, chunk: int) -> None:
        """The chunk reads as zeroes from now on; no data is stored."""
        self._check_chunk(chunk)
        with self._lock:
            self._change(chunk, ZERO, 0)

    def drop(self, chunk: int) -> None:
        """Forget the chunk (it reads from below again)."""
        with self._lock:
            if chunk in self._map:
                self._change(chunk, ABSENT, 0)

    def sync(self) -> None:
        """Make every change so far durable."""
        with self._sync_lock:  # a second caller must wait for the first one's fdatasync
            self._sync()

    def _sync(self) -> None:
        with self._lock:
            if not self._dirty:
                return
            self._append(0, SYNC)
            self._dirty = False
            pending, self._pending_free = self._pending_free, []
        os.fdatasync(self._fd)
        with self._lock:
            self._free.extend(pending)
            if self._records > max(COMPACT_MIN_RECORDS, COMPACT_FACTOR * len(self._map)):
                self._compact()

    def clear(self) -> None:
        """Forget every chunk, durably."""
        with self._lock:
            for chunk in list(self._map):
                self._change(chunk, ABSENT, 0)
        self.sync()
        with self._lock:
            self._compact()

    def close(self) -> None:
        if self._fd >= 0:
            try:
                if self._dirty:
                    self.sync()
            finally:
                os.close(self._fd)
                self._fd = -1

    # -- internals (called with the lock held) ------------------------------------------------

    def _check_chunk(self, chunk: int) -> None:
        if not 0 <= chunk < self._chunks():
            raise io_error(errno.EINVAL, f"chunk {chunk} is past the end of a {self.size}-byte disk")

    def _allocate(self, may_sync: bool = False) -> int:
        """A free slot, growing the file (within ``limit``) when there is none.

        With ``may_sync``, too many slots waiting for a sync make it sync first,
        so that overwrites reuse space instead of growing the file for ever.
        """
        if self._free:
            return self._free.pop()
        if may_sync and len(self._pending_free) >= MAX_PENDING_FREE:
            self._lock.release()
            try:
                self.sync()
            finally:
                self._lock.acquire()
            if self._free:
                return self._free.pop()
        slot = self._slots
        end = self._slot_offset(slot + 1)
        if self.limit is not None and end > self.limit:
            raise io_error(errno.ENOSPC, f"{self.path}: the store is full ({self.limit} bytes)")
        try:
            os.posix_fallocate(self._fd, self._slot_offset(slot), self.chunk_size)
        except OSError as exc:
            raise io_error(exc.errno or errno.EIO, f"{self.path}: cannot grow the store") from None
        self._slots += 1
        return slot

    def _change(self, chunk: int, target: int, crc: int) -> None:
        self._append(chunk, target, crc)
        old = self._map.get(chunk)
        if old is not None and old >= 0:
            self._pending_free.append(old)
        if target == ABSENT:
            self._map.pop(chunk, None)
            self._data_crc.pop(chunk, None)
        else:
            self._map[chunk] = target
            self._data_crc[chunk] = crc
        self._dirty = True

    def _append(self, chunk: int, target: int, data_crc: int = 0) -> None:
        """Append one journal record, chaining a new journal slot when this one is full."""
        if self._jpos == self._per_journal_slot - 1:
            new = self._allocate()
            os.pwrite(self._fd, bytes(self.chunk_size), self._slot_offset(new))
            self._write_record(new, NEXT, 0)
            self._journal_slots.append(new)
            self._jslot, self._jpos = new, 0
        self._write_record(chunk, target, data_crc)

    def _write_record(self, chunk: int, target: int, data_crc: int) -> None:
        os.pwrite(self._fd, _record(self._seq, chunk, target, data_crc),
                  self._slot_offset(self._jslot) + self._jpos * RECORD_SIZE)
        self._jpos += 1
        self._seq += 1
        self._records += 1

    def _compact(self) -> None:
        """Rewrite the journal as one record per live chunk and switch the superblock to it."""
        old_slots = self._journal_slots
        first = self._allocate()
        os.pwrite(self._fd, bytes(self.chunk_size), self._slot_offset(first))
        start_seq = self._seq
        self._journal_slots, self._jslot, self._jpos, self._records = [first], first, 0, 0
        for chunk, slot in sorted(self._map.items()):
            self._append(chunk, slot, self._data_crc.get(chunk, 0))
        self._append(0, SYNC)
        os.fdatasync(self._fd)
        sb = _Superblock(self._sb.generation + 1, self.chunk_size, self.size, self.limit or 0,
                         first, start_seq, self.identity)
        copy = 1 - self._sb_copy
        os.pwrite(self._fd, sb.pack(), copy * SUPERBLOCK_SIZE)
        os.fdatasync(self._fd)
        self._sb, self._sb_copy = sb, copy
        self._free.extend(old_slots)
        self._dirty = False

    def __enter__(self) -> ChunkStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
