"""snapshot: point-in-time snapshots of a live disk, as LVM takes them.

    pynbd serve --filter=snapshot --control=/run/disk.ctl file disk.img store=/var/lib/snaps
    pynbd ctl /run/disk.ctl snapshot create before-upgrade
    nbdinfo --list nbd://localhost                    # "" (the origin) and before-upgrade
    qemu-img convert nbd://localhost/before-upgrade backup.raw
    pynbd ctl /run/disk.ctl snapshot exceptions before-upgrade --json
    pynbd ctl /run/disk.ctl snapshot merge before-upgrade   # roll the origin back

Parameters
    store=DIR          where the snapshots live (required; created if missing)
    chunk-size=SIZE    the unit of copy-on-write, a power of 2 from 4k
                       (default 64k); fixed once DIR holds snapshots
    store-size=SIZE    the most one snapshot's store may grow to (default:
                       unbounded); a snapshot whose store fills up is
                       invalidated, as LVM does

The default export is the origin: the plugin's default export, read and
written as usual. Each snapshot is served as an export of its own name
(listed by NBD_OPT_LIST), readable and writable, showing the origin as it
was when the snapshot was taken plus whatever was written to the snapshot
since. As in LVM's snapshot-origin target, the first write to a chunk of
the origin after a snapshot was taken copies the chunk's old contents into
that snapshot's exception store; a write to a snapshot goes into its own
store. The exception table (origin chunk → store slot) is therefore the
list of chunks that differ between the snapshot and the origin.

Control commands (``pynbd ctl SOCKET …``, ``--json`` for scripts)
    snapshot create NAME      take a snapshot now. Atomic with respect to
                              writes in flight: each lands wholly before or
                              wholly after it. Names: letters, digits, ``.``,
                              ``_``, ``-``, up to 64, not starting with ``.``
    snapshot list             name, state, exceptions, store bytes, created
    snapshot delete NAME      forget it; its clients get EIO from then on
    snapshot merge NAME       write the snapshot back into the origin (LVM's
                              ``lvconvert --merge``) and delete it; I/O to
                              every export waits while the merge runs
    snapshot exceptions NAME  the exception table: chunk, offset, state
                              (data or zero), store slot

Persistence: DIR holds ``snapshots.json`` (the list, replaced atomically)
and one crash-safe chunk store per snapshot (``NAME.snap``,
``pynbd.backend.chunkstore``). Snapshots survive restarts. A FLUSH on any
export makes every store durable before the origin below is flushed, and a
FUA write to the origin makes the copies it caused durable first, so after
an acknowledged flush a SIGKILL loses nothing. (Between flushes the origin's
own writes may reach its disk before the copies they caused, as with any
volatile cache: a power loss there can leave a snapshot inconsistent.)

A full store (``store-size=``, or ENOSPC from the file system) invalidates
its snapshot: the write to the origin still succeeds, the snapshot's reads
and writes fail with EIO from then on, the log says why, and ``snapshot
list`` shows it as invalid. The origin is never affected. Restarting with an
origin of another size than the one the snapshots were taken of is refused.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

from ..backend import (
    ALLOCATION_DEPTH,
    FLAG_FUA,
    Command,
    ConfigError,
    Connection,
    ControlError,
    Export,
    Extent,
    Filter,
    FilterConnection,
    OpenContext,
    Param,
    io_error,
)
from ..backend.chunkstore import ChunkStore, StoreError
from ..backend.manifest import check_facts, check_name, read_manifest, write_manifest
from ..backend.overlay import ABSENT, DATA, BlockLocks, StoreOverlay, state_runs
from .cow import CowConnection, CowFilter

log = logging.getLogger("pynbd.filters.snapshot")

MANIFEST = "snapshots.json"


class Snapshot:
    """One snapshot: its store seen as an overlay over the origin."""

    def __init__(self, name: str, store: ChunkStore, locks: BlockLocks, created: float,
                 valid: bool = True, reason: str = "") -> None:
        self.name = name
        self.store = store
        self.overlay = StoreOverlay(store)
        self.overlay.locks = locks  # one set of chunk locks for the origin and every snapshot
        self.created = created
        self.valid = valid
        self.reason = reason
        self.deleted = False
        # A snapshot export is the cow filter over the origin, with this overlay.
        self.cow = SnapshotCow(self)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "state": "valid" if self.valid else "invalid",
                "exceptions": len(self.store.table()), "store_bytes": self.store.used_bytes(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)),
                "reason": self.reason}

    def check(self) -> None:
        """Refuse I/O to a snapshot that is gone or invalid."""
        if self.deleted:
            raise io_error(errno.EIO, f"snapshot {self.name!r} was deleted")
        if not self.valid:
            raise io_error(errno.EIO, f"snapshot {self.name!r} is invalid: {self.reason}")


class SnapshotCow(CowFilter):
    """The cow filter whose only overlay is one snapshot's store."""

    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__({"cow-block-size": snapshot.store.chunk_size, "cow-on-read": "false",
                          "cow-on-cache": False})
        self.config_complete()
        self.snapshot = snapshot

    def overlay_for(self, below: Connection, export: str) -> StoreOverlay:
        return self.snapshot.overlay


class SnapshotView(CowConnection):
    """A snapshot's export: its store over the origin, refused once the snapshot is gone.

    Reads hold the chunks' locks: a chunk the store lacks is read from the
    origin, and the origin's writer copies it out under the same lock first.
    """

    def __init__(self, next: Connection, snapshot: Snapshot, ctx: OpenContext, owner: SnapshotFilter) -> None:
        super().__init__(next, snapshot.cow, ctx)
        self.snapshot = snapshot
        self.owner = owner
        self.told = False

    def _check(self) -> None:
        try:
            self.snapshot.check()
        except OSError as exc:
            if not self.told:  # once per connection, not once per request
                log.error("snapshot: %s", exc.strerror)
                self.told = True
            raise

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        self._check()
        if buf:
            first, end = self._block_span(len(buf), offset)
            with self.locks.hold(first, end):
                super().pread(buf, offset, flags)

    def pread_buffers(self, count: int, offset: int, flags: int) -> None:
        return None  # every read goes through pread, under the locks

    def _write(self, buf: memoryview | None, count: int, offset: int) -> None:
        self._check()
        try:
            super()._write(buf, count, offset)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self.owner.invalidate(self.snapshot, f"its store is full ({exc.strerror})")
            self._check()

    def flush(self, flags: int) -> None:
        self._check()
        super().flush(flags)

    def extents(self, count: int, offset: int, flags: int) -> Iterator[Extent]:
        self._check()
        return super().extents(count, offset, flags)


class OriginConnection(FilterConnection["SnapshotFilter"]):
    """The origin: writes copy the chunks' old contents out to every live snapshot first."""

    def __init__(self, next: Connection, filter: SnapshotFilter, ctx: OpenContext) -> None:
        super().__init__(next, filter, ctx)
        self.chunk = filter.chunk_size

    def _span(self, count: int, offset: int) -> tuple[int, int, AbstractContextManager[object]]:
        """The chunks a change touches and their locks (one lock for one chunk: the common case)."""
        first, end = offset // self.chunk, (offset + count - 1) // self.chunk + 1
        locks = self.filter.locks
        return first, end, locks.one(first) if end - first == 1 else locks.hold(first, end)

    def _copy_out(self, first: int, end: int, flags: int) -> None:
        """Before a change (its chunks' locks held): the old contents to every live snapshot,
        durable first when the change is FUA."""
        if self.filter.live:
            for snap in self.filter.copy_out(self.next, first, end):
                if flags & FLAG_FUA:
                    snap.store.sync()

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        first, end, held = self._span(len(buf), offset)
        with held:
            self._copy_out(first, end, flags)
            self.next.pwrite(buf, offset, flags)

    def zero(self, count: int, offset: int, flags: int) -> None:
        first, end, held = self._span(count, offset)
        with held:
            self._copy_out(first, end, flags)
            self.next.zero(count, offset, flags)

    def trim(self, count: int, offset: int, flags: int) -> None:
        first, end, held = self._span(count, offset)
        with held:
            self._copy_out(first, end, flags)
            self.next.trim(count, offset, flags)

    def flush(self, flags: int) -> None:
        self.filter.sync_stores()
        self.next.flush(flags)


class SnapshotFilter(Filter):
    name = "snapshot"
    short_requests = True
    params = (
        Param("store", "str", "directory of the snapshot stores", required=True),
        Param("chunk-size", "size", "copy-on-write unit (a power of 2, at least 4k)",
              default=64 * 1024),
        Param("store-size", "size", "the most one snapshot's store may grow to"),
    )
    store: str
    chunk_size: int
    store_size: int | None
    connection = OriginConnection

    def config_complete(self) -> None:
        if self.chunk_size < 4096 or self.chunk_size & (self.chunk_size - 1):
            raise ConfigError(f"snapshot: chunk-size={self.chunk_size}: must be a power of 2, at least 4096")
        self.locks = BlockLocks(reentrant=True)  # a snapshot read takes them, and so does its store
        self.snapshots: dict[str, Snapshot] = {}
        # Lock order: ``lock`` (create, delete, merge), then the chunk locks, then
        # ``manifest_lock`` (an origin write that invalidates a snapshot holds chunk locks).
        self.lock = threading.Lock()
        self.manifest_lock = threading.Lock()
        self.origin_size = -1
        self.live: tuple[Snapshot, ...] = ()

    # -- start and stop ---------------------------------------------------------------------

    def get_ready(self) -> None:
        self.origin_size = self.size_below()
        try:
            os.makedirs(self.store, exist_ok=True)
            manifest = self._read_manifest()
        except OSError as exc:
            raise ConfigError(f"snapshot: store={self.store}: {exc.strerror}") from None
        check_facts(manifest, self._facts(), "snapshots", f"store={self.store}", "snapshot")
        for entry in manifest.get("snapshots", []):
            try:
                store = self._open_store(entry["name"], create=False)
            except StoreError as exc:
                raise ConfigError(f"snapshot: {exc}") from None
            self.snapshots[entry["name"]] = Snapshot(entry["name"], store, self.locks, entry["created"],
                                                     entry["valid"], entry.get("reason", ""))
        self._refresh()

    def unload(self) -> None:
        for snap in self.snapshots.values():
            snap.store.close()

    def _store_path(self, name: str) -> str:
        return os.path.join(self.store, f"{name}.snap")

    def _open_store(self, name: str, create: bool) -> ChunkStore:
        return ChunkStore.open(self._store_path(name), chunk_size=self.chunk_size, size=self.origin_size,
                               identity=f"snapshot {name} of a {self.origin_size}-byte origin",
                               create=create, limit=self.store_size)

    def _facts(self) -> dict[str, object]:
        """What every snapshot in the store depends on."""
        return {"chunk_size": self.chunk_size, "origin_size": self.origin_size}

    def _read_manifest(self) -> dict[str, Any]:
        return read_manifest(os.path.join(self.store, MANIFEST), "snapshots", "valid", "snapshot")

    def _write_manifest(self) -> None:
        """Replace the list atomically (one writer at a time)."""
        with self.manifest_lock:
            write_manifest(os.path.join(self.store, MANIFEST), self._facts(), "snapshots",
                           [{"name": s.name, "created": s.created, "valid": s.valid, "reason": s.reason}
                            for s in self.snapshots.values()])

    # -- the data path ----------------------------------------------------------------------

    def _refresh(self) -> None:
        """After the list or a snapshot's state changed: the snapshots origin writes copy to."""
        self.live = tuple(s for s in self.snapshots.values() if s.valid)

    def copy_out(self, origin: Connection, first: int, end: int) -> list[Snapshot]:
        """Copy chunks [first, end) of the origin into every live snapshot that lacks them
        (the chunks' locks held). Returns the snapshots that received copies."""
        receivers: list[Snapshot] = []
        for snap in self.live:
            if end - first == 1 and snap.overlay.map[first] != ABSENT:
                continue  # copied before: the common case, without a slice
            states = snap.overlay.map[first:end]
            if states.count(ABSENT) == 0:
                continue
            receivers.append(snap)
            for state, lo, hi in state_runs(states, first):
                if state != ABSENT:
                    continue
                start, finish = lo * self.chunk_size, min(hi * self.chunk_size, self.origin_size)
                old = memoryview(bytearray(finish - start))
                origin.pread(old, start, 0)
                try:
                    snap.overlay.write_blocks(lo, old)
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    self.invalidate(snap, f"its store is full ({exc.strerror})")
                    break
        return receivers

    def invalidate(self, snap: Snapshot, reason: str) -> None:
        """A snapshot whose store is full: no more copies to it, its I/O fails, the list says why."""
        snap.valid, snap.reason = False, reason
        self._refresh()
        log.error("snapshot: %r is now invalid: %s; the origin is unaffected", snap.name, reason)
        self._write_manifest()

    def sync_stores(self) -> None:
        for snap in self.live:
            snap.store.sync()

    # -- exports ----------------------------------------------------------------------------

    def list_exports(self, next_list: Callable[[OpenContext], list[Export]],
                     ctx: OpenContext) -> list[Export]:
        return [*next_list(ctx), *(Export(name, "snapshot") for name in self.snapshots)]

    def list_meta_contexts(self, next_list: Callable[[OpenContext], list[str]],
                           ctx: OpenContext) -> list[str]:
        """A snapshot export also answers qemu:allocation-depth (1: in its store, 2: the origin's)."""
        below = next_list(ctx)
        if ctx.export_name in self.snapshots and ALLOCATION_DEPTH not in below:
            return [*below, ALLOCATION_DEPTH]
        return below

    def open(self, next_open: Callable[[OpenContext], Connection],
             ctx: OpenContext) -> Connection:
        snap = self.snapshots.get(ctx.export_name)
        if snap is None:
            return super().open(next_open, ctx)
        snap.check()
        below = next_open(dataclasses.replace(ctx, export_name="", readonly=True))
        try:
            return SnapshotView(below, snap, ctx, self)
        except BaseException:
            below.close()
            raise

    # -- control commands -------------------------------------------------------------------

    def control_commands(self) -> Sequence[Command]:
        return (
            Command(("snapshot", "create"), ("NAME",), "take a snapshot of the origin now", self.create),
            Command(("snapshot", "list"), (), "list the snapshots", self.list),
            Command(("snapshot", "delete"), ("NAME",), "delete a snapshot", self.delete),
            Command(("snapshot", "merge"), ("NAME",), "write a snapshot back into the origin, then "
                    "delete it", self.merge),
            Command(("snapshot", "exceptions"), ("NAME",), "the chunks a snapshot holds",
                    self.exceptions),
        )

    def all_chunks(self) -> AbstractContextManager[None]:
        """Every chunk lock: no write to any export is half done while it is held."""
        return self.locks.hold(0, len(self.locks.stripes))

    def _get(self, name: str) -> Snapshot:
        snap = self.snapshots.get(name)
        if snap is None:
            raise ControlError(f"no snapshot named {name!r}")
        return snap

    def create(self, name: str) -> object:
        check_name("snapshot", name)
        with self.lock:
            if name in self.snapshots:
                raise ControlError(f"snapshot {name!r} already exists")
            if os.path.exists(self._store_path(name)):
                os.unlink(self._store_path(name))  # left by a create that crashed before the list
            try:
                store = self._open_store(name, create=True)
            except (StoreError, OSError) as exc:
                raise ControlError(f"cannot create snapshot {name!r}: {exc}") from None
            # Every chunk lock held: no write to the origin is half done.
            with self.all_chunks():
                snap = Snapshot(name, store, self.locks, time.time())
                self.snapshots[name] = snap
                self._refresh()
                try:
                    self._write_manifest()
                except OSError as exc:
                    del self.snapshots[name]
                    self._refresh()
                    store.close()
                    os.unlink(self._store_path(name))
                    raise ControlError(f"cannot create snapshot {name!r}: {exc.strerror}") from None
        log.info("snapshot: created %r", name)
        return snap.describe()

    def list(self) -> object:
        with self.lock:
            return [s.describe() for s in self.snapshots.values()]

    def delete(self, name: str) -> object:
        with self.lock:
            snap = self._get(name)
            with self.all_chunks():
                del self.snapshots[name]
                self._refresh()
                snap.deleted = True
            self._write_manifest()
            snap.store.close()
            os.unlink(self._store_path(name))
        log.info("snapshot: deleted %r", name)
        return {"deleted": name}

    def merge(self, name: str) -> object:
        with self.lock:
            snap = self._get(name)
            if not snap.valid:
                raise ControlError(f"snapshot {name!r} is invalid ({snap.reason}); it cannot be merged")
            origin = self.open_below()
            try:
                with self.all_chunks():
                    merged = self._merge_into(origin, snap)
                    origin.flush(0)
                    del self.snapshots[name]
                    self._refresh()
                    snap.deleted = True
                self._write_manifest()
            finally:
                origin.close()
            snap.store.close()
            os.unlink(self._store_path(name))
        log.info("snapshot: merged %r into the origin (%d chunks)", name, merged)
        return {"merged": name, "chunks": merged}

    def _merge_into(self, origin: Connection, snap: Snapshot) -> int:
        """Write the snapshot's chunks into the origin (every lock held), keeping the
        other snapshots' views by copying out first, as a client's write would."""
        count = 0
        bounce = memoryview(bytearray(self.chunk_size))
        for state, lo, hi in state_runs(snap.overlay.map):
            if state == ABSENT:
                continue
            self.copy_out(origin, lo, hi)
            for chunk in range(lo, hi):
                start = chunk * self.chunk_size
                length = min(self.chunk_size, self.origin_size - start)
                if state == DATA:
                    snap.overlay.read(bounce[:length], start)
                    origin.pwrite(bounce[:length], start, 0)
                else:
                    origin.zero(length, start, 0)
            count += hi - lo
        self.sync_stores()
        return count

    def exceptions(self, name: str) -> object:
        snap = self._get(name)
        size = self.chunk_size
        return [{"chunk": chunk, "offset": chunk * size, "length": min(size, self.origin_size - chunk * size),
                 "state": "zero" if slot < 0 else "data", "slot": slot if slot >= 0 else None}
                for chunk, slot in snap.store.table()]


FILTER = SnapshotFilter
