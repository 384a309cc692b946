"""Taking a backup: ask the server, plan the clusters, read them, write a qcow2 image.

``full`` reads every allocated cluster (``base:allocation``); ``inc`` reads
the clusters that changed since the previous backup's checkpoint (the
union of ``qemu:dirty-bitmap:NAME`` for that checkpoint and any taken after
it, so a checkpoint left by a failed backup loses nothing), whatever they
hold, and marks changed clusters that now read as zeroes (a hole included)
with qcow2's zero flag. It asks for the bitmaps alone, on a connection of
its own that negotiates no ``base:allocation``: the server's block status
costs half as much, and a changed hole is read as zeroes (cheap to serve)
rather than planned as one.
Unchanged clusters are left unallocated: they read from the backing file,
the previous backup.

Before anything is written: the directory must be new, empty or a backup of
this export (name and size); for ``inc`` the previous checkpoint must be on
the server and every bitmap to read consistent. Then the server takes the
new checkpoint (``--control``: ``checkpoint create``), so writes that
arrive while the backup runs belong to the next one.

Reading: the ranges are planned first (block status over the whole disk,
cut into 64 KiB clusters: a cluster is read if any of it is allocated
(full) or changed (inc)), then read in requests of up to 1 MiB over as
many connections as the server allows (multi-conn, ``-C``) but no more
than one per 256 MiB to read (a small incremental reads on one: each
connection costs both sides CPU), 16 requests in flight on each, sent in
batches (half a window in one ``sendmsg``: the server wakes once per batch)
by the one thread that also reads the replies and writes the image (the
copy's event loop, ``copying/loop.py``), and handed to the qcow2 writer in
order as they complete; a cluster that reads
as zeroes is stored as a zero cluster (inc) or not at all (full).
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ...backend.linux import start_writeback
from ...client.blocking import connect
from ...client.errors import NBDError
from ...control.protocol import ControlProtocolError
from ...formats.qcow2 import Qcow2Error, write_image
from ...proto.errors import ProtocolError
from ..copying.dirty import DATA, STATE_DIRTY, bitmap_context
from ..copying.endpoint import CopyError
from ..copying.local import pwrite_full
from ..copying.loop import Loop
from ..copying.nbd import NBDEndpoint
from ..copying.options import Spec
from ..copying.plan import SLICE, Plan, Slices
from ..copying.progress import Progress
from ..copying.zeroes import ZeroScanner
from ..ctl import call
from .manifest import Backup, BackupError, Directory, Manifest, now

CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS  # qemu-img's default cluster size
REQUEST = 1 << 20  # bytes per read
REQUESTS_PER_LANE = 16
LANE_BYTES = 256 << 20  # a connection per 256 MiB to read, up to -C: each costs both sides CPU
PLAN_SLICE = 8 * SLICE  # block status asked for 1 GiB at a time
CONTROL_TIMEOUT = 60.0
WRITEBACK = 8 << 20  # the kernel starts writing every 8 MiB written: the final fsync waits less

Cluster = tuple[int, "memoryview | None"]  # guest offset, data (None: reads as zeroes)


@dataclass
class TakeOptions:
    uri: str
    directory: str
    incremental: bool
    control: str | None = None
    checkpoint: str | None = None
    connections: int = 4
    progress: bool = False


# ------------------------------------------------------------------ the server's checkpoints

def control(path: str, *words: str) -> object:
    """One command on the server's control socket; its result or BackupError."""
    try:
        reply = call(path, words, timeout=CONTROL_TIMEOUT)
    except OSError as exc:
        raise BackupError(f"control socket {path}: {exc.strerror or exc}") from None
    except ControlProtocolError as exc:
        raise BackupError(f"control socket {path}: {exc}") from None
    if not reply.ok:
        raise BackupError(f"{' '.join(words)}: {reply.result}")
    return reply.result


def server_checkpoints(path: str) -> list[dict[str, object]]:
    listed = control(path, "checkpoint", "list")
    if not isinstance(listed, list) or not all(isinstance(c, dict) and "name" in c
                                               for c in listed):
        raise BackupError(f"control socket {path}: checkpoint list: unexpected answer {listed!r}")
    return listed


def bitmaps_since(opts: TakeOptions, manifest: Manifest | None,
                  listed: list[dict[str, object]] | None) -> list[str]:
    """The bitmaps an incremental backup reads (refusing what would miss a change);
    ``listed``: the server's checkpoints (None without a control socket)."""
    if manifest is None or not manifest.backups:
        raise BackupError(f"{opts.directory}: no backup to continue from; take a full backup")
    last = manifest.backups[-1]
    if last.checkpoint is None:
        raise BackupError(f"the last backup ({last.file}) has no checkpoint to continue from; "
                          "take a full backup with --control")
    if listed is None:
        if opts.checkpoint is None:
            raise BackupError("backup inc needs --control=SOCKET (the server takes the checkpoint) "
                              "or --checkpoint=NAME (a bitmap you started on the server)")
        return [last.checkpoint]
    names = [str(c["name"]) for c in listed]
    if last.checkpoint not in names:
        raise BackupError(f"checkpoint {last.checkpoint} of {opts.directory} is not on this server "
                          "(a backup of another export, or the checkpoint was deleted); "
                          "take a full backup")
    since = listed[names.index(last.checkpoint):]
    for checkpoint in since:
        if checkpoint.get("state") != "consistent":
            raise BackupError(f"checkpoint {checkpoint['name']} is inconsistent (the server "
                              "stopped uncleanly); take a full backup")
    return [str(c["name"]) for c in since]


# ------------------------------------------------------------------ planning

def cluster_runs(ops: Iterable[tuple[int, int, int]], size: int) -> Iterator[tuple[int, int, int]]:
    """``(offset, length, kind)`` rounded out to whole clusters (the last ends at ``size``).

    A cluster whose pieces are all of one kind is of that kind; a cluster
    that mixes kinds is DATA: read whole, since its unchanged part must
    be stored again with its changed part (a zero cluster would lose it).
    ``ops`` are contiguous and in order.
    """
    first = end = 0  # the pending run: clusters [first, end) of ``kind``
    kind = -1
    for offset, length, op_kind in ops:
        lo, hi = offset >> CLUSTER_BITS, ((offset + length - 1) >> CLUSTER_BITS) + 1
        if kind >= 0 and lo < end:  # the cluster both touch
            if op_kind != kind and kind != DATA:
                if end - 1 > first:
                    yield _run(first, end - 1, kind, size)
                first, kind = end - 1, DATA
            lo = end
        if lo >= hi:
            continue
        if op_kind == kind and lo == end:
            end = hi
            continue
        if kind >= 0:
            yield _run(first, end, kind, size)
        first, end, kind = lo, hi, op_kind
    if kind >= 0:
        yield _run(first, end, kind, size)


def _run(first: int, end: int, kind: int, size: int) -> tuple[int, int, int]:
    start = first << CLUSTER_BITS
    return start, min(size, end << CLUSTER_BITS) - start, kind


def plan_full(src: NBDEndpoint) -> list[tuple[int, int, int]]:
    """A full backup's runs: the allocated clusters (DATA)."""
    assert src.size is not None
    plan = Plan(src, Slices(src.size, PLAN_SLICE), PLAN_SLICE, PLAN_SLICE, use_extents=True)
    return [run for run in cluster_runs(iter(lambda: plan.next(), None), src.size)
            if run[2] == DATA]


def plan_changes(uri: str, bitmaps: list[str], size: int) -> list[tuple[int, int, int]]:
    """An incremental's runs: the changed clusters (DATA), whatever they hold.

    Asked on a connection that negotiates the bitmaps alone: the server
    answers no ``base:allocation`` (half the block-status work). A changed
    cluster that is now a hole is read anyway and, reading as zeroes, is
    stored as a zero cluster (as it must: the backing file's data is gone).
    A cluster is changed if any bitmap marks any of it: each dirty extent
    is rounded out to clusters, and the clusters of all are merged.
    """
    contexts = [bitmap_context(name) for name in bitmaps]
    changed: list[tuple[int, int]] = []  # clusters [first, end) marked dirty, in any order
    with connect(uri, meta_contexts=contexts) as h:
        offset = 0
        while offset < size:
            reply = h.block_status(min(PLAN_SLICE, size - offset), offset)
            reached = size  # how far every bitmap answered
            for context in contexts:
                at = offset
                entries = reply.get(context, [])
                for i in range(0, len(entries) - 1, 2):
                    end = min(at + entries[i], size)
                    if entries[i + 1] & STATE_DIRTY and end > at:
                        changed.append((at >> CLUSTER_BITS, ((end - 1) >> CLUSTER_BITS) + 1))
                    at = end
                reached = min(reached, at)
            if reached <= offset:
                raise BackupError(f"no changed-block map at offset {offset}")
            offset = reached
    changed.sort()
    runs: list[tuple[int, int, int]] = []
    first = end = -1
    for lo, hi in changed:
        if lo > end:
            if end > first:
                runs.append(_run(first, end, DATA, size))
            first = lo
        end = max(end, hi)
    if end > first:
        runs.append(_run(first, end, DATA, size))
    return runs


# ------------------------------------------------------------------ reading

def lanes_for(total: int, allowed: int) -> int:
    """Connections to read ``total`` bytes on: one per ``LANE_BYTES``, 1 to ``allowed``."""
    return max(1, min(allowed, -(-total // LANE_BYTES)))


class Job:
    """One read request on its way to the writer."""

    __slots__ = ("offset", "length", "buf", "done", "error")

    def __init__(self, offset: int, length: int, buf: bytearray) -> None:
        self.offset, self.length, self.buf = offset, length, buf
        self.done = False
        self.error: BaseException | None = None

    def finished(self, n: int, error: BaseException | None) -> None:
        self.error, self.done = error, True


class Reader:
    """Reads planned runs over ``lanes`` connections, yields clusters in order."""

    def __init__(self, src: NBDEndpoint, loop: Loop, lanes: int, incremental: bool,
                 progress: Progress) -> None:
        self.src, self.loop, self.lanes, self.incremental = src, loop, lanes, incremental
        self.progress = progress
        self.window = lanes * REQUESTS_PER_LANE
        self.free: list[bytearray] = []  # allocated as needed, as large as needed
        self.scanner = ZeroScanner(CLUSTER, REQUEST)
        self.data = self.zero = 0

    def clusters(self, runs: Iterable[tuple[int, int, int]]) -> Iterator[Cluster]:
        pending: deque[Job] = deque()
        lane = 0
        pieces = _pieces(runs)
        more = True
        while more or pending:
            if more and len(pending) <= self.window // 2:  # requests go out in batches
                while len(pending) < self.window:
                    piece = next(pieces, None)
                    if piece is None:
                        more = False
                        break
                    offset, length = piece
                    job = Job(offset, length, self._buffer(length))
                    pending.append(job)
                    self.src.read(lane, memoryview(job.buf)[:length], offset, job.finished)
                    lane = (lane + 1) % self.lanes
            if not pending:
                break  # nothing (more) to read
            job = pending.popleft()
            while not job.done:
                self.loop.poll()
            if job.error is not None:
                raise job.error
            yield from self._clusters_of(job)
            self.free.append(job.buf)
            self.progress.advance(job.length)

    def _buffer(self, length: int) -> bytearray:
        buf = self.free.pop() if self.free else None
        return buf if buf is not None and len(buf) >= length else bytearray(length)

    def _clusters_of(self, job: Job) -> Iterator[Cluster]:
        view = memoryview(job.buf)
        for start, length, zero in self.scanner.runs(job.buf, job.length):
            if zero:
                self.zero += length
            else:
                self.data += length
            if zero and not self.incremental:
                continue  # a full backup's unallocated cluster reads as zeroes already
            for at in range(start, start + length, CLUSTER):
                yield job.offset + at, None if zero else view[at:min(at + CLUSTER, start + length)]


def _pieces(runs: Iterable[tuple[int, int, int]]) -> Iterator[tuple[int, int]]:
    """Runs cut into requests."""
    for offset, length, _kind in runs:
        for at in range(offset, offset + length, REQUEST):
            yield at, min(REQUEST, offset + length - at)


# ------------------------------------------------------------------ the whole backup

def open_source(uri: str, bitmaps: list[str], loop: Loop) -> NBDEndpoint:
    src = NBDEndpoint(Spec("nbd", uri), writing=False, bitmaps=bitmaps, loop=loop)
    try:
        src.open()
    except BaseException:
        src.close()
        raise
    return src


def identity(src: NBDEndpoint) -> dict[str, object]:
    return {"name": src.handle.get_export_name(), "size": src.size}


def check_same_export(manifest: Manifest, export: dict[str, object], directory: str) -> None:
    if manifest.export != export:
        raise BackupError(f"{directory} holds backups of another export ({_describe(manifest.export)}),"
                          f" not of this one ({_describe(export)}); use another directory")


def _describe(export: dict[str, object]) -> str:
    return f"export {export.get('name')!r}, size {export.get('size')}"


def take_backup(opts: TakeOptions, err: TextIO) -> Backup:
    """Take one backup as ``opts`` says; the new manifest entry, or BackupError."""
    directory = Directory(opts.directory)
    directory.check_usable()
    manifest = directory.load() if directory.exists() else None
    listed = server_checkpoints(opts.control) if opts.control is not None else None
    if listed is not None and opts.checkpoint in [c["name"] for c in listed]:
        raise BackupError(f"checkpoint {opts.checkpoint} exists on the server; choose another name")
    since = bitmaps_since(opts, manifest, listed) if opts.incremental else []
    # Without a control socket, --checkpoint names a bitmap the user started: it must exist.
    verify = [opts.checkpoint] if opts.control is None and opts.checkpoint else []
    with contextlib.closing(Loop()) as loop:  # every connection is driven from this thread
        try:
            src = open_source(opts.uri, since + [b for b in verify if b not in since], loop)
        except CopyError as exc:
            raise BackupError(_hint(str(exc), opts.incremental)) from None
        try:
            return _into_directory(opts, directory, manifest, src, loop, since, err)
        finally:
            src.close()


def _into_directory(opts: TakeOptions, directory: Directory, manifest: Manifest | None,
                    src: NBDEndpoint, loop: Loop, since: list[str], err: TextIO) -> Backup:
    """Check the directory holds backups of this export, lock it, take the backup."""
    export = identity(src)
    if manifest is not None:
        check_same_export(manifest, export, opts.directory)
    new = not directory.path.exists()
    try:
        with directory.locked():
            current = directory.load() if directory.exists() else None
            if _count(current) != _count(manifest):
                raise BackupError(f"{opts.directory} changed while the backup started; "
                                  "try again")
            manifest = current or Manifest(os.urandom(16).hex(), export)
            directory.remove_leftovers()
            return _take(opts, directory, manifest, src, loop, since, err)
    except BaseException:
        if new:
            with contextlib.suppress(OSError):
                directory.path.rmdir()  # created for this backup, still empty
        raise


def _count(manifest: Manifest | None) -> int:
    return -1 if manifest is None else len(manifest.backups)


def _hint(message: str, incremental: bool) -> str:
    if incremental and "does not offer qemu:dirty-bitmap:" in message:
        return message + "; take a full backup"
    return message


def _take(opts: TakeOptions, directory: Directory, manifest: Manifest, src: NBDEndpoint,
          loop: Loop, since: list[str], err: TextIO) -> Backup:
    number, name = manifest.next_file()
    checkpoint = opts.checkpoint
    started = now()
    if opts.control is not None:
        checkpoint = checkpoint or f"backup-{manifest.id[:8]}-{number:04d}"
        control(opts.control, "checkpoint", "create", checkpoint)
    runs = (plan_changes(opts.uri, since, src.size or 0) if opts.incremental else plan_full(src))
    total = sum(n for _, n, _ in runs)
    lanes = lanes_for(total, min(opts.connections, src.max_connections()))
    progress = Progress(total, bar=opts.progress, stream=err)
    backing = manifest.backups[-1].file if opts.incremental else None
    part = directory.path / (name + ".part")
    reader = Reader(src, loop, lanes, opts.incremental, progress)
    opened: list[int] = []
    try:
        for lane in range(1, lanes):
            src.connect_lane(lane)
            opened.append(lane)
        progress.start()
        file_size = _write(part, src.size or 0, reader.clusters(runs), backing)
        progress.finish()
        os.replace(part, directory.path / name)
    except (CopyError, NBDError, ProtocolError, OSError, Qcow2Error) as exc:
        part.unlink(missing_ok=True)
        raise BackupError(str(exc)) from None
    finally:
        for lane in opened:
            src.close_lane(lane)
    backup = Backup(number, name, "inc" if opts.incremental else "full", checkpoint, since,
                    started, now(), reader.data, reader.zero, file_size)
    manifest.backups.append(backup)
    directory.save(manifest)
    return backup


def _write(path: Path, size: int, clusters: Iterable[Cluster], backing: str | None) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    started = end = 0  # the file's writeback started up to ``started``; written up to ``end``
    try:
        def write(offset: int, data: bytes | bytearray | memoryview) -> None:
            nonlocal started, end
            view = memoryview(data)
            pwrite_full(fd, view, offset)
            end = max(end, offset + len(view))
            if end - started >= WRITEBACK:
                start_writeback(fd, started, end - started)
                started = end

        length = write_image(write, size, clusters, cluster_size=CLUSTER, version=3,
                             backing_file=backing, backing_format="qcow2" if backing else None)
        os.fsync(fd)
        return length
    finally:
        os.close(fd)
