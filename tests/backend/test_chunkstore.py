"""The persistent chunk store: reopening, refusals, torn journals, full disks, SIGKILL."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from pynbd.backend import chunkstore
from pynbd.backend.chunkstore import ChunkState, ChunkStore, StoreError

CHUNK = 4096
SIZE = 1 << 20


def chunk_bytes(chunk: int, version: int) -> bytes:
    """A chunk whose every 16 bytes say which chunk and version it is."""
    return (chunk.to_bytes(8, "little") + version.to_bytes(8, "little")) * (CHUNK // 16)


def make(path, **kw) -> ChunkStore:
    return ChunkStore.open(str(path), chunk_size=CHUNK, size=SIZE, identity="base-1", **kw)


def read(store: ChunkStore, chunk: int) -> bytes:
    buf = bytearray(CHUNK)
    store.read(chunk, memoryview(buf))
    return bytes(buf)


def crash(store: ChunkStore) -> None:
    """Stop using the store as a killed process would: no final sync."""
    os.close(store._fd)
    store._fd = -1


def test_reopen_serves_the_same_chunks(tmp_path):
    with make(tmp_path / "s") as store:
        store.put(3, chunk_bytes(3, 1))
        store.put(7, chunk_bytes(7, 1))
        store.put(3, chunk_bytes(3, 2))
        store.put_zero(9)
        store.put(11, chunk_bytes(11, 1))
        store.drop(11)
        store.sync()
    with make(tmp_path / "s") as store:
        assert store.chunks() == [(3, ChunkState.DATA), (7, ChunkState.DATA), (9, ChunkState.ZERO)]
        assert read(store, 3) == chunk_bytes(3, 2) and read(store, 7) == chunk_bytes(7, 1)
        assert read(store, 9) == bytes(CHUNK)
        assert store.state(11) is ChunkState.ABSENT


def test_a_different_base_is_refused_and_the_store_left_alone(tmp_path):
    with make(tmp_path / "s") as store:
        store.put(1, chunk_bytes(1, 1))
    before = (tmp_path / "s").read_bytes()
    for kw in ({"identity": "base-2", "size": SIZE}, {"identity": "base-1", "size": 2 * SIZE}):
        with pytest.raises(StoreError, match="made for another disk"):
            ChunkStore.open(str(tmp_path / "s"), chunk_size=CHUNK, **kw)
    assert (tmp_path / "s").read_bytes() == before


def test_garbage_and_a_missing_file_are_clear_errors(tmp_path):
    (tmp_path / "junk").write_bytes(b"x" * 100000)
    with pytest.raises(StoreError, match="not a pynbd chunk store"):
        make(tmp_path / "junk")
    with pytest.raises(StoreError, match="No such file"):
        ChunkStore.open_existing(str(tmp_path / "missing"))


def test_the_newer_superblock_copy_wins_and_both_bad_is_refused(tmp_path):
    with make(tmp_path / "s") as store:
        for i in range(3):
            store.put(i, chunk_bytes(i, 1))
        store.clear()  # compaction: the journal moves and copy B is written
        store.put(5, chunk_bytes(5, 1))

    def damage(copy: int) -> None:
        with open(tmp_path / "s", "r+b") as f:
            f.seek(copy * chunkstore.SUPERBLOCK_SIZE + 20)
            f.write(b"\xff\xff")

    damage(0)  # the older copy: nothing lost
    with make(tmp_path / "s") as store:
        assert store.chunks() == [(5, ChunkState.DATA)] and read(store, 5) == chunk_bytes(5, 1)
    damage(1)
    with pytest.raises(StoreError, match="both copies of its header are corrupt"):
        make(tmp_path / "s")


def test_torn_journal_tail_is_ignored(tmp_path):
    store = make(tmp_path / "s")
    store.put(1, chunk_bytes(1, 1))
    store.sync()
    store.put(2, chunk_bytes(2, 1))
    crash(store)
    # Tear the last record (the one for chunk 2): flip a byte in it.
    with open(tmp_path / "s", "r+b") as f:
        data = f.read()
        base = max(2 * chunkstore.SUPERBLOCK_SIZE, CHUNK)
        records = data[base:base + CHUNK]
        last = max(i for i in range(0, CHUNK, 32) if records[i:i + 32] != bytes(32))
        f.seek(base + last + 3)
        f.write(b"\x99")
    with make(tmp_path / "s") as store:
        assert [c for c, _ in store.chunks()] == [1]
        store.put(4, chunk_bytes(4, 1))  # appending after a torn tail works
        store.sync()
    with make(tmp_path / "s") as store:
        assert [c for c, _ in store.chunks()] == [1, 4]


def test_a_record_whose_data_never_arrived_is_dropped_with_what_follows(tmp_path):
    store = make(tmp_path / "s")
    store.put(1, chunk_bytes(1, 1))
    store.sync()
    store.put(2, chunk_bytes(2, 1))
    store.put(3, chunk_bytes(3, 1))
    crash(store)
    # Corrupt chunk 2's data: as if its record had reached the disk but not its data.
    raw = (tmp_path / "s").read_bytes()
    where = raw.find(chunk_bytes(2, 1))
    with open(tmp_path / "s", "r+b") as f:
        f.seek(where)
        f.write(b"\0" * 16)
    with make(tmp_path / "s") as store:
        assert [c for c, _ in store.chunks()] == [1]
        assert read(store, 1) == chunk_bytes(1, 1)


def test_overwrites_reuse_space_and_the_journal_is_compacted(tmp_path, monkeypatch):
    monkeypatch.setattr(chunkstore, "COMPACT_MIN_RECORDS", 200)
    monkeypatch.setattr(chunkstore, "MAX_PENDING_FREE", 8)
    with make(tmp_path / "s") as store:
        for version in range(300):
            store.put(version % 4, chunk_bytes(version % 4, version))
            if version % 10 == 9:
                store.sync()
        store.sync()
        assert store.used_bytes() < 40 * CHUNK
    with make(tmp_path / "s") as store:
        assert [read(store, c) for c in range(4)] == [chunk_bytes(c, 296 + c) for c in range(4)]


def test_limit_and_a_full_filesystem_give_enospc_and_lose_nothing(tmp_path, small_tmpfs):
    with make(tmp_path / "s", limit=16 * CHUNK) as store:
        with pytest.raises(OSError) as info:
            for i in range(100):
                store.put(i, chunk_bytes(i, 1))
        assert info.value.errno == errno.ENOSPC and "full" in str(info.value)
        kept = [c for c, _ in store.chunks()]
        store.sync()
    with make(tmp_path / "s") as store:
        assert [c for c, _ in store.chunks()] == kept
        assert all(read(store, c) == chunk_bytes(c, 1) for c in kept)
    path = small_tmpfs / "s"
    with ChunkStore.open(str(path), chunk_size=CHUNK, size=SIZE * 4, identity="x") as store:
        with pytest.raises(OSError) as info:
            for i in range(1000):
                store.put(i, chunk_bytes(i, 1))
        assert info.value.errno == errno.ENOSPC
        kept = [c for c, _ in store.chunks()]
        store.sync()
        assert all(read(store, c) == chunk_bytes(c, 1) for c in kept)


def test_concurrent_puts_to_different_chunks(tmp_path):
    with make(tmp_path / "s") as store:
        def writer(first: int) -> None:
            for version in range(20):
                for chunk in range(first, 256, 8):
                    store.put(chunk, chunk_bytes(chunk, version))
                store.sync()
        workers = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
    with make(tmp_path / "s") as store:
        assert all(read(store, c) == chunk_bytes(c, 19) for c in range(256))


STORM = """
import random, sys
from pynbd.backend.chunkstore import ChunkStore
sys.path.insert(0, {tests!r})
from test_chunkstore import CHUNK, SIZE, chunk_bytes
store = ChunkStore.open({path!r}, chunk_size=CHUNK, size=SIZE, identity="base-1")
rng = random.Random({seed})
version = {start}
while True:
    version += 1
    for _ in range(rng.randrange(1, 20)):
        chunk = rng.randrange(64)
        if rng.random() < 0.1:
            store.put_zero(chunk)
        else:
            store.put(chunk, chunk_bytes(chunk, version))
    store.sync()
    print(version, flush=True)
"""


def storm_batches(seed: int, start: int):
    """The writer's batches, as STORM makes them: (version, [(chunk, version or None for zero)])."""
    rng = random.Random(seed)
    version = start
    while True:
        version += 1
        batch = []
        for _ in range(rng.randrange(1, 20)):
            chunk = rng.randrange(64)
            batch.append((chunk, None if rng.random() < 0.1 else version))
        yield version, batch


@pytest.mark.parametrize("seed", range(4))
def test_sigkill_during_a_write_storm_keeps_every_synced_write(tmp_path, seed):
    """Kill -9 at a random moment, three times: every synced chunk is there, no chunk is torn."""
    path = str(tmp_path / "s")
    tests = os.path.dirname(__file__)
    rng = random.Random(seed)
    model: dict[int, int | None] = {}  # chunk → version at the last acknowledged sync (None: zero)
    start = 0
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", STORM.format(path=path, tests=tests, seed=seed,
                                                                    start=start)],
                                stdout=subprocess.PIPE)
        synced, wanted = start, rng.randrange(3, 30)
        for line in proc.stdout:
            synced = int(line)
            if synced - start >= wanted:
                break
        time.sleep(rng.random() * 0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        for line in proc.stdout.read().splitlines():  # what it acknowledged before it died
            synced = int(line)
        proc.stdout.close()
        inflight: dict[int, set[int | None]] = {}
        for version, batch in storm_batches(seed, start):
            for chunk, value in batch:
                if version <= synced:
                    model[chunk] = value
                else:
                    inflight.setdefault(chunk, set()).add(value)
            if version > synced:
                break
        with make(path) as store:
            for chunk in range(64):
                allowed = inflight.get(chunk, set()) | ({model[chunk]} if chunk in model else set())
                if store.state(chunk) is ChunkState.ABSENT:
                    assert chunk not in model, f"chunk {chunk} lost"
                    continue
                data = read(store, chunk)
                versions = {int.from_bytes(data[i + 8:i + 16], "little") for i in range(0, CHUNK, 16)}
                if data == bytes(CHUNK):
                    found = None
                else:
                    assert len(versions) == 1, f"chunk {chunk} mixes versions {versions}"
                    found = versions.pop()
                assert found in allowed, f"chunk {chunk} holds {found}, expected one of {allowed}"
                model[chunk] = found  # what the next run starts from (an unsynced write may have landed)
        start = synced + 1000  # the next run's versions are all newer


def test_a_damaged_record_in_the_middle_of_the_journal_is_corruption(tmp_path):
    with make(tmp_path / "s") as store:
        for i in range(5):
            store.put(i, chunk_bytes(i, 1))
            store.sync()
    base = max(2 * chunkstore.SUPERBLOCK_SIZE, CHUNK)
    with open(tmp_path / "s", "r+b") as f:
        f.seek(base + chunkstore.RECORD_SIZE + 8)  # inside the second record
        f.write(b"\xee" * 8)
    with pytest.raises(StoreError, match="journal record 2 is damaged but later ones are intact"):
        make(tmp_path / "s")
