"""cbt: changed-block tracking, served as qemu's dirty bitmaps.

    pynbd serve --filter=cbt --control=/run/disk.ctl file disk.img bitmap-dir=/var/lib/cbt
    pynbd ctl /run/disk.ctl checkpoint create monday
    nbdinfo --map=qemu:dirty-bitmap:monday nbd://localhost    # what changed since monday
    pynbd backup inc nbd://localhost /backups --control=/run/disk.ctl

Parameters
    bitmap-dir=DIR     where the checkpoints' bitmaps live (required;
                       created if missing)
    granularity=SIZE   the size a bit covers, a power of 2 from 512
                       (default 64k); fixed once DIR holds checkpoints

Every write, zero and trim marks its range dirty. A checkpoint ends one
tracking period and starts the next: ``qemu:dirty-bitmap:NAME`` then reports
(bit 0 set, value 1) every granule written since checkpoint NAME was
created, in the meta context namespace backup tools already read from qemu
(virtnbdbackup, oVirt imageio, libvirt's pull-mode backup): ``nbdinfo
--map=qemu:dirty-bitmap:NAME``, libnbd's ``block_status``, ``qemu-img map``
with ``--image-opts driver=nbd,...,x-dirty-bitmap=qemu:dirty-bitmap:NAME``.
``NBD_OPT_LIST_META_CONTEXT`` with ``qemu:`` or ``qemu:dirty-bitmap:`` lists
them.

Control commands (``pynbd ctl SOCKET …``, ``--json`` for scripts)
    checkpoint create NAME   end the current period as checkpoint NAME. A
                             write in flight at that moment counts as
                             after it: it is dirty in NAME's bitmap (and in
                             the older ones), so it is never missed
    checkpoint list          name, state, granularity, dirty bytes, created
    checkpoint delete NAME   forget it (later checkpoints are unaffected)
    checkpoint merge A B     B also reports what A reports (qemu's
                             block-dirty-bitmap-merge of A into B)

Cost: a write marks one bitmap, the current period's, however many
checkpoints are kept; a checkpoint's answer is its own bitmap OR'ed with the
current period's, and creating a checkpoint folds the period that ends into
the older checkpoints' bitmaps.

Persistence: DIR holds ``checkpoints.json`` and one compressed bitmap per
checkpoint (``NAME.bitmap``), each replaced atomically; the list is written
when a checkpoint is created or deleted, the bitmaps when the server stops
cleanly (a merge's target also at once). While the server
runs, DIR holds ``in-use``; finding it at start means the last stop was
unclean (SIGKILL, power loss), so every bitmap may have missed writes: they
are marked inconsistent, shown so by ``checkpoint list``, and no longer
offered as meta contexts, because a backup tool must take a full backup
rather than miss a change (qemu's "in-use" flag). Checkpoints created after
the restart are consistent again.

The filter tracks the plugin's default export; names: letters, digits,
``.``, ``_``, ``-``, up to 64, not starting with ``.``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..backend import (
    Command,
    ConfigError,
    ContextExtent,
    ControlError,
    Filter,
    FilterConnection,
    OpenContext,
    Param,
)
from ..backend.manifest import check_facts, check_name, read_manifest, replace_file, write_manifest
from ..backend.overlay import state_runs

log = logging.getLogger("pynbd.filters.cbt")

PREFIX = "qemu:dirty-bitmap:"
MANIFEST = "checkpoints.json"
IN_USE = "in-use"
DIRTY = b"\x01"


def union(a: bytes | bytearray, b: bytes | bytearray) -> bytes:
    """Two runs of 0/1 bytes of one length OR'ed together (through integers: no byte loop)."""
    return (int.from_bytes(a, "little") | int.from_bytes(b, "little")).to_bytes(len(a), "little")


class Checkpoint:
    """A checkpoint's bitmap: one byte per granule, 1 where written since it was created
    and before the current period began (the filter's ``active`` holds the rest)."""

    def __init__(self, name: str, granules: int, created: float, consistent: bool = True,
                 bits: bytearray | None = None) -> None:
        self.name = name
        self.bits = bits if bits is not None else bytearray(granules)
        self.created = created
        self.consistent = consistent


class CbtConnection(FilterConnection["CbtFilter"]):
    """Marks before each change, and again after it if a checkpoint was created meanwhile,
    so a change in flight at a checkpoint is never missed by the new period."""

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        # The hot path (a write inside one granule) spelled out: mark, write, mark again
        # only if a checkpoint was created meanwhile.
        flt = self.filter
        epoch = flt.epoch
        shift = flt.shift
        count = len(buf)
        first = offset >> shift
        if count and (offset + count - 1) >> shift == first:
            bits = flt.active
            if bits is not None:
                bits[first] = 1
        else:
            flt.mark(offset, count)
        self.next.pwrite(buf, offset, flags)
        if flt.epoch != epoch:
            flt.mark(offset, count)

    def zero(self, count: int, offset: int, flags: int) -> None:
        epoch = self.filter.mark(offset, count)
        self.next.zero(count, offset, flags)
        self.filter.mark_again(epoch, offset, count)

    def trim(self, count: int, offset: int, flags: int) -> None:
        epoch = self.filter.mark(offset, count)
        self.next.trim(count, offset, flags)
        self.filter.mark_again(epoch, offset, count)

    def block_status(self, context: str, count: int, offset: int, flags: int) -> Iterator[ContextExtent]:
        checkpoint = self.filter.served(context)
        if checkpoint is None:
            yield from self.next.block_status(context, count, offset, flags)
            return
        g = self.filter.granularity
        size = self.filter.size
        first, end = offset // g, -(-(offset + count) // g)
        for state, lo, hi in state_runs(self.filter.dirty(checkpoint, first, end), first):
            yield ContextExtent(lo * g, min(hi * g, size) - lo * g, 1 if state else 0)


class CbtFilter(Filter):
    name = "cbt"
    short_requests = True
    params = (
        Param("bitmap-dir", "str", "directory of the checkpoints' bitmaps", required=True),
        Param("granularity", "size", "bytes per bit: a power of 2, at least 512", default=64 * 1024),
    )
    bitmap_dir: str
    granularity: int
    connection = CbtConnection

    def config_complete(self) -> None:
        g = self.granularity
        if g < 512 or g & (g - 1):
            raise ConfigError(f"cbt: granularity={g}: must be a power of 2, at least 512")
        self.checkpoints: dict[str, Checkpoint] = {}
        # The current period's marks (writes since the newest checkpoint was created or
        # the server started), part of every consistent checkpoint's answer; None while
        # no checkpoint is consistent (nothing to track).
        self.active: bytearray | None = None
        self.ending: bytearray | None = None  # the period a checkpoint creation is folding in
        self.epoch = 0  # checkpoints created since start: a write in flight compares it
        self.shift = g.bit_length() - 1  # offset >> shift is the granule
        self.lock = threading.Lock()  # commands and the files in bitmap-dir
        self.size = 0
        self.granules = 0
        self.ready = False  # get_ready ran: unload has bitmaps to save

    # -- start and stop ---------------------------------------------------------------------

    def get_ready(self) -> None:
        self.size = self.size_below()
        self.granules = -(-self.size // self.granularity)
        try:
            os.makedirs(self.bitmap_dir, exist_ok=True)
            manifest = self._read_manifest()
            unclean = os.path.exists(self._path(IN_USE))
            self._load(manifest, unclean)
            self._save_manifest()
            self._touch_in_use()
            self.ready = True
        except OSError as exc:
            raise ConfigError(f"cbt: bitmap-dir={self.bitmap_dir}: {exc.strerror or exc}") from None

    def unload(self) -> None:
        """A clean stop: every bitmap saved, then the in-use mark removed."""
        if not self.ready:
            return
        with self.lock:
            try:
                self._fold(self.active)
                for checkpoint in self.checkpoints.values():
                    self._save_bitmap(checkpoint)
                self._save_manifest()
                os.unlink(self._path(IN_USE))
            except OSError as exc:
                log.error("cbt: saving the bitmaps failed, they will be inconsistent: %s", exc)

    def _path(self, name: str) -> str:
        return os.path.join(self.bitmap_dir, name)

    def _facts(self) -> dict[str, object]:
        """What every checkpoint's bitmap depends on."""
        return {"granularity": self.granularity, "size": self.size}

    def _read_manifest(self) -> dict[str, Any]:
        return read_manifest(self._path(MANIFEST), "checkpoints", "consistent", "cbt")

    def _load(self, manifest: dict[str, Any], unclean: bool) -> None:
        entries = manifest.get("checkpoints", [])
        check_facts(manifest, self._facts(), "checkpoints", f"bitmap-dir={self.bitmap_dir}", "cbt")
        for entry in entries:
            name, consistent = entry["name"], entry["consistent"] and not unclean
            bits = self._load_bitmap(name) if consistent else None
            if consistent and bits is None:
                log.warning("cbt: the bitmap of checkpoint %r is missing or damaged; it is inconsistent",
                            name)
                consistent = False
            self.checkpoints[name] = Checkpoint(name, self.granules, entry["created"], consistent, bits)
        if unclean and entries:
            log.warning("cbt: the server stopped uncleanly; checkpoints %s may have missed writes and "
                        "are now inconsistent (take a full backup)", ", ".join(e["name"] for e in entries))
        self._track_if_consistent()

    def _track_if_consistent(self) -> None:
        """A current period while any checkpoint is consistent, none otherwise."""
        if not any(c.consistent for c in self.checkpoints.values()):
            self.active = None
        elif self.active is None:
            self.active = bytearray(self.granules)

    def _load_bitmap(self, name: str) -> bytearray | None:
        try:
            with open(self._path(f"{name}.bitmap"), "rb") as f:
                bits = bytearray(zlib.decompress(f.read()))
        except (OSError, zlib.error):
            return None
        return bits if len(bits) == self.granules else None

    def _save_bitmap(self, checkpoint: Checkpoint) -> None:
        """The file holds everything written since the checkpoint (current period included)."""
        if checkpoint.consistent:
            replace_file(self._path(f"{checkpoint.name}.bitmap"),
                         zlib.compress(self.dirty(checkpoint), 1))

    def _save_manifest(self) -> None:
        write_manifest(self._path(MANIFEST), self._facts(), "checkpoints",
                       [{"name": c.name, "created": c.created, "consistent": c.consistent}
                        for c in self.checkpoints.values()])

    def _touch_in_use(self) -> None:
        replace_file(self._path(IN_USE), f"{os.getpid()}\n".encode())

    # -- the data path ----------------------------------------------------------------------

    def mark(self, offset: int, count: int) -> int:
        """Mark [offset, offset+count) dirty in the current period; the epoch (how many
        checkpoints were created so far) for ``mark_again``. (The epoch is read before
        the period: ``create`` replaces the period before it moves the epoch on.)"""
        epoch = self.epoch
        bits = self.active
        if count and bits is not None:
            g = self.granularity
            first, end = offset // g, -(-(offset + count) // g)
            if end - first == 1:  # the common case, without building a slice
                bits[first] = 1
            else:
                bits[first:end] = DIRTY * (end - first)
        return epoch

    def mark_again(self, epoch: int, offset: int, count: int) -> None:
        """After the change: mark it in checkpoints created while it was in flight."""
        if self.epoch != epoch:
            self.mark(offset, count)

    def dirty(self, checkpoint: Checkpoint, first: int = 0, end: int | None = None) -> bytes:
        """Granules ``first`` to ``end`` written since ``checkpoint``: its bitmap and the
        current period's."""
        # (In this order: a period read as ending or active is in ``bits`` once it is neither.)
        periods = [p[first:end] for p in (self.active, self.ending) if p is not None]
        own = bytes(checkpoint.bits[first:end])
        for period in periods:
            own = union(own, period)
        return own

    def _fold(self, period: bytearray | None) -> None:
        """A period's marks join every consistent checkpoint's bitmap (under ``lock``)."""
        if period is None:
            return
        for c in self.checkpoints.values():
            if c.consistent:
                c.bits[:] = union(c.bits, period)

    def served(self, context: str) -> Checkpoint | None:
        """The checkpoint behind ``context``, if it is one of ours and consistent."""
        if not context.startswith(PREFIX):
            return None
        checkpoint = self.checkpoints.get(context[len(PREFIX):])
        return checkpoint if checkpoint is not None and checkpoint.consistent else None

    def list_meta_contexts(self, next_list: Callable[[OpenContext], list[str]],
                           ctx: OpenContext) -> list[str]:
        return [*next_list(ctx), *(PREFIX + c.name for c in self.checkpoints.values() if c.consistent)]

    # -- control commands -------------------------------------------------------------------

    def control_commands(self) -> Sequence[Command]:
        return (
            Command(("checkpoint", "create"), ("NAME",), "end the tracking period as checkpoint NAME",
                    self.create),
            Command(("checkpoint", "list"), (), "list the checkpoints", self.list),
            Command(("checkpoint", "delete"), ("NAME",), "delete a checkpoint", self.delete),
            Command(("checkpoint", "merge"), ("A", "B"), "make B also report what A reports",
                    self.merge),
        )

    def _get(self, name: str) -> Checkpoint:
        checkpoint = self.checkpoints.get(name)
        if checkpoint is None:
            raise ControlError(f"no checkpoint named {name!r}")
        return checkpoint

    def _describe(self, c: Checkpoint) -> dict[str, object]:
        return {"name": c.name, "state": "consistent" if c.consistent else "inconsistent",
                "granularity": self.granularity,
                "dirty_bytes": min(self.dirty(c).count(DIRTY) * self.granularity, self.size)
                if c.consistent else None,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(c.created))}

    def create(self, name: str) -> object:
        check_name("checkpoint", name)
        with self.lock:
            if name in self.checkpoints:
                raise ControlError(f"checkpoint {name!r} already exists")
            # A new period first, then the epoch: a write that sees the new epoch marks
            # the new period; one in flight marks it again when it finishes. The period
            # that ends stays part of every answer until it is folded in.
            self.ending = self.active
            self.active = bytearray(self.granules)
            self.epoch += 1
            self._fold(self.ending)
            self.ending = None
            checkpoint = Checkpoint(name, self.granules, time.time())
            self.checkpoints[name] = checkpoint
            try:
                # Only the list: the bitmaps are saved at a clean stop, and after an unclean
                # one every checkpoint is inconsistent whatever its file holds.
                self._save_manifest()
            except OSError as exc:
                log.error("cbt: saving checkpoint %r failed: %s", name, exc)
                raise ControlError(f"checkpoint {name!r} was created but could not be saved: "
                                   f"{exc.strerror or exc}") from None
        log.info("cbt: checkpoint %r created", name)
        return self._describe(checkpoint)

    def list(self) -> object:
        with self.lock:
            return [self._describe(c) for c in self.checkpoints.values()]

    def delete(self, name: str) -> object:
        with self.lock:
            checkpoint = self._get(name)
            del self.checkpoints[name]
            self._track_if_consistent()
            self._save_manifest()
            try:
                os.unlink(self._path(f"{name}.bitmap"))
            except FileNotFoundError:
                log.debug("cbt: checkpoint %r had no bitmap file", checkpoint.name)
        return {"deleted": name}

    def merge(self, source: str, target: str) -> object:
        with self.lock:
            a, b = self._get(source), self._get(target)
            if not (a.consistent and b.consistent):
                bad = source if not a.consistent else target
                raise ControlError(f"checkpoint {bad!r} is inconsistent; it cannot be merged")
            b.bits[:] = union(b.bits, a.bits)  # (the current period is part of both already)
            self._save_bitmap(b)
        return self._describe(b)


FILTER = CbtFilter
