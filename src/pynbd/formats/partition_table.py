"""MBR and GPT partition tables, read through a callable.

    from pynbd.formats.partition_table import find_partition, list_partitions

    def read(offset: int, count: int) -> bytes: ...
    part = find_partition(read, disk_size, 1)     # Partition(number, start, length, type)
    for part in list_partitions(read, disk_size): ...

The module is pure: it asks ``read(offset, count)`` for the bytes it needs and
never opens anything itself, so the partition filter, the tools and the
tests share it.

What is understood
    MBR (DOS) tables: the four primary entries (numbers 1-4) and the chain of
    extended boot records inside an extended partition (types 0x05, 0x0f,
    0x85), whose logical partitions are numbered from 5 in chain order.
    GPT: a protective MBR (type 0xee) followed by the GPT header at LBA 1;
    partition N is entry N of the partition array, and an entry whose type
    GUID is all zero is unused.

Limits
    Sectors are 512 bytes (as nbdkit assumes). The GPT header's checksums are
    not verified and the backup header is not consulted. A partition that
    does not fit inside the disk is refused.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

SECTOR = 512
MBR_SIGNATURE = b"\x55\xaa"
GPT_SIGNATURE = b"EFI PART"
GPT_PROTECTIVE = 0xEE
EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
_MBR_ENTRY = struct.Struct("<B3sB3sII")  # status, chs, type, chs, first lba, sectors
_MBR_TABLE = 446
_GPT_HEADER = struct.Struct("<8s4sII4sQQQQ16sQIII")
_GPT_ENTRY = struct.Struct("<16s16sQQQ72s")
_MAX_LOGICAL = 1024  # a longer EBR chain is taken to be a loop

ReadFn = Callable[[int, int], bytes]


class PartitionError(ValueError):
    """The table is missing or damaged, or the partition does not exist."""


@dataclass(frozen=True)
class Partition:
    """One partition: its number (from 1), byte range and type."""

    number: int
    start: int
    length: int
    type: str  # "0x83" for MBR, a GUID string for GPT
    scheme: str  # "mbr" or "gpt"
    name: str = ""

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class _MbrEntry:
    type: int
    first: int  # sectors
    count: int


def _mbr_entries(sector: bytes) -> list[_MbrEntry]:
    entries = []
    for i in range(4):
        _, _, ptype, _, first, count = _MBR_ENTRY.unpack_from(sector, _MBR_TABLE + 16 * i)
        entries.append(_MbrEntry(ptype, first, count))
    return entries


def _read_sector(read: ReadFn, lba: int, size: int) -> bytes:
    if (lba + 1) * SECTOR > size:
        raise PartitionError(f"sector {lba} is beyond the end of the disk")
    data = read(lba * SECTOR, SECTOR)
    if len(data) != SECTOR:
        raise PartitionError(f"short read of sector {lba}")
    return data


def detect(read: ReadFn, size: int) -> str:
    """The scheme of the disk: ``"gpt"`` or ``"mbr"``; PartitionError if neither."""
    if size < 2 * SECTOR:
        raise PartitionError("disk is too small to hold a partition table")
    mbr = _read_sector(read, 0, size)
    if mbr[510:512] != MBR_SIGNATURE:
        raise PartitionError("disk does not contain MBR or GPT partition table signature")
    header = _read_sector(read, 1, size)
    if header[:8] == GPT_SIGNATURE and any(e.type == GPT_PROTECTIVE for e in _mbr_entries(mbr)):
        return "gpt"
    return "mbr"


def list_partitions(read: ReadFn, size: int) -> list[Partition]:
    """Every partition of the disk, in number order."""
    if detect(read, size) == "gpt":
        return list(_gpt_partitions(read, size))
    return list(_mbr_partitions(read, size))


def find_partition(read: ReadFn, size: int, number: int) -> Partition:
    """Partition ``number`` (from 1), checked to lie inside the disk."""
    if number < 1:
        raise PartitionError(f"partition number {number} is invalid (they count from 1)")
    scheme = detect(read, size)
    found = _gpt_partitions(read, size) if scheme == "gpt" else _mbr_partitions(read, size)
    for part in found:
        if part.number == number:
            return part
    raise PartitionError(f"{scheme.upper()} partition {number} not found")


def _checked(part: Partition, size: int) -> Partition:
    if part.length <= 0:
        raise PartitionError(f"partition {part.number} is empty")
    if part.end > size:
        raise PartitionError(f"partition {part.number} ({part.start}+{part.length}) is beyond "
                             f"the end of the disk ({size})")
    return part


def _mbr_partitions(read: ReadFn, size: int) -> Iterator[Partition]:
    primaries = _mbr_entries(_read_sector(read, 0, size))
    extended = None
    for index, entry in enumerate(primaries, start=1):
        if entry.type == 0 or entry.count == 0:
            continue
        if entry.type in EXTENDED_TYPES:
            extended = extended or entry
            continue
        yield _checked(Partition(index, entry.first * SECTOR, entry.count * SECTOR,
                                 f"0x{entry.type:02x}", "mbr"), size)
    if extended is not None:
        yield from _logical_partitions(read, size, extended)


def _logical_partitions(read: ReadFn, size: int, extended: _MbrEntry) -> Iterator[Partition]:
    """Walk the EBR chain: entry 1 is a logical partition, entry 2 links onward."""
    ebr_lba = extended.first
    seen: set[int] = set()
    number = 5
    while len(seen) < _MAX_LOGICAL:
        if ebr_lba in seen:
            raise PartitionError(f"extended partition chain loops at sector {ebr_lba}")
        seen.add(ebr_lba)
        sector = _read_sector(read, ebr_lba, size)
        if sector[510:512] != MBR_SIGNATURE:
            raise PartitionError(f"extended boot record at sector {ebr_lba} has no signature")
        logical, link = _mbr_entries(sector)[:2]
        if logical.type != 0 and logical.count != 0:
            yield _checked(Partition(number, (ebr_lba + logical.first) * SECTOR,
                                     logical.count * SECTOR, f"0x{logical.type:02x}", "mbr"), size)
            number += 1
        if link.type == 0 or link.count == 0:
            return
        ebr_lba = extended.first + link.first
    raise PartitionError("extended partition chain is too long")


def _gpt_partitions(read: ReadFn, size: int) -> Iterator[Partition]:
    header = _read_sector(read, 1, size)
    fields = _GPT_HEADER.unpack_from(header)
    entries_lba, entry_count, entry_size = fields[10], fields[11], fields[12]
    if entry_size < _GPT_ENTRY.size or entry_count > 65536:
        raise PartitionError(f"GPT header is damaged (entry size {entry_size}, "
                             f"{entry_count} entries)")
    table_bytes = entry_count * entry_size
    if entries_lba * SECTOR + table_bytes > size:
        raise PartitionError("GPT partition array is beyond the end of the disk")
    table = read(entries_lba * SECTOR, table_bytes)
    for index in range(entry_count):
        type_guid, _, first, last, _, raw_name = _GPT_ENTRY.unpack_from(table, index * entry_size)
        if type_guid == bytes(16):
            continue
        if last < first:
            raise PartitionError(f"GPT partition {index + 1} ends before it starts")
        name = raw_name.decode("utf-16-le", errors="replace").split("\0", 1)[0]
        yield _checked(Partition(index + 1, first * SECTOR, (last - first + 1) * SECTOR,
                                 str(uuid.UUID(bytes_le=type_guid)), "gpt", name), size)
