"""partitioning: a partitioned disk assembled from files, one partition each.

    pynbd serve partitioning ext4fs.img
    pynbd serve partitioning boot.img mbr-id=0x82 swap.img mbr-id=default root.img
    pynbd serve partitioning partition-type=gpt alignment=4K efi.img type-guid=default root.img

Each file is one partition; a virtual partition table is put in front of them
(and, for GPT, the backup table after them), so clients see one partitioned
disk. The layout is nbdkit's, byte for byte, except GPT's random unique
partition GUIDs.

Parameters (nbdkit's names; alignment=, mbr-id= and type-guid= apply to every
file given after them, so their order matters)
    [file=]FILE           a file holding one partition (the magic parameter:
                          bare words are files). At least one; empty files
                          are refused.
    partition-type=mbr    an MBR (DOS) table. With more than 4 files the first
                          three are primary partitions, partition 4 is an
                          extended partition, and files 4, 5, ... are logical
                          partitions 5, 6, ... (``dos`` is a synonym)
    partition-type=gpt    a GPT: protective MBR, header and entries at the
                          start, backup entries and header at the end.
                          Default: GPT for more than 4 files or more than
                          about 2 TB in all, else MBR.
    alignment=N           partitions start at a multiple of N bytes (a
                          multiple of 512, at most 1M; default 1M)
    mbr-id=0xN|default    the MBR type byte (default 0x83, Linux)
    type-guid=GUID|default  the GPT partition type (default
                          0FC63DAF-8483-4772-8E79-3D69D8477DE4, Linux)

Behaviour
    - Partition sizes are rounded up to 512 bytes with zero padding; the
      first partition is marked bootable; GPT names are the file names as
      typed when they are short 7-bit ASCII.
    - Reads and writes of the partitions go to the files (as the ``file``
      plugin serves them: trim punches holes, extents show the files'
      holes). The table and the padding read as they are; writing the same
      bytes is accepted, changing them fails with EIO.
    - A file that cannot be opened for writing makes the disk read-only.
    - Files must not change size while served. Sectors are 512 bytes.
"""

from __future__ import annotations

import errno
import os
import re
import uuid
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..backend import (
    ConfigError,
    Connection,
    Extent,
    OpenContext,
    Param,
    Plugin,
    fill_zero,
    io_error,
    is_zero,
    parse_size,
)
from ..backend.params import UNKNOWN_PAIRS
from ..formats.partition_table import GPT_PROTECTIVE, GPT_SIGNATURE, MBR_SIGNATURE, SECTOR
from .ones import parse_byte
from .split import ConcatDisk, check_regular_files, open_files

MAX_ALIGNMENT = 2048 * SECTOR
MAX_MBR_DISK_SIZE = 0xFFFFFFFF * SECTOR - 5 * MAX_ALIGNMENT
DEFAULT_MBR_ID = 0x83
DEFAULT_TYPE_GUID = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
GPT_MIN_PARTITIONS = 128
GPT_ENTRY_SIZE = 128
GPT_HEADER_SIZE = 92
EXTENDED_ID = 0x0F
_CHS_TOO_LARGE = bytes((254, 0xFF, 0xFF))  # cylinder 1023, head 254, sector 63
_GUID_RE = re.compile(r"\{?([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                      r"[0-9a-fA-F]{12})\}?")


@dataclass
class PartFile:
    """One file= and the settings in force when it was given."""

    name: str  # as typed (the GPT partition name)
    path: str
    alignment: int
    mbr_id: int
    type_guid: bytes
    unique_guid: bytes
    size: int = 0
    start: int = 0  # where it lands on the virtual disk


class TablePiece(Connection):
    """Bytes of the virtual table (``data``) or zero padding (``data`` None)."""

    def __init__(self, size: int, data: bytearray | None = None) -> None:
        self.size = size
        self.data = data

    def get_size(self) -> int:
        return self.size

    def can_write(self) -> bool:
        return True

    def can_trim(self) -> bool:
        return True

    def can_multi_conn(self) -> bool:
        return True

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        if self.data is None:
            fill_zero(buf)
        else:
            buf[:] = self.data[offset:offset + len(buf)]

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        if self.data is None:
            if not is_zero(buf):
                raise io_error(errno.EIO, "partitioning: write of non-zeroes to padding")
        elif buf != self.data[offset:offset + len(buf)]:
            raise io_error(errno.EIO, "partitioning: attempt to change the partition table")

    def zero(self, count: int, offset: int, flags: int) -> None:
        if self.data is not None and not is_zero(memoryview(self.data)[offset:offset + count]):
            raise io_error(errno.EIO, "partitioning: attempt to change the partition table")

    def trim(self, count: int, offset: int, flags: int) -> None:
        """The table and the padding stay as they are (trim is only advice)."""

    def flush(self, flags: int) -> None:
        """Nothing to make durable."""

    def extents(self, count: int, offset: int, flags: int) -> Iterator[Extent]:
        yield Extent(offset, count, hole=self.data is None, zero=self.data is None)

    def close(self) -> None:
        """Nothing to release: the table is shared by every client."""


def mbr_entry(start: int, length: int, bootable: bool, type_id: int) -> bytes:
    """A 16-byte MBR partition entry for bytes [start, start+length), CHS as nbdkit's."""
    return (bytes((0x80 if bootable else 0,)) + _CHS_TOO_LARGE + bytes((type_id,)) + _CHS_TOO_LARGE
            + (start // SECTOR).to_bytes(4, "little")
            + (-(-length // SECTOR)).to_bytes(4, "little"))


def parse_guid(text: str) -> bytes:
    """A GUID as the 16 bytes GPT stores (the first three fields little-endian)."""
    match = _GUID_RE.fullmatch(text)
    if match is None or text.startswith("{") != text.endswith("}"):
        raise ConfigError(f"partitioning: type-guid: could not validate GUID: {text}")
    return uuid.UUID(match.group(1)).bytes_le


def parse_alignment(text: str) -> int:
    try:
        value = parse_size(text)
    except ValueError as exc:
        raise ConfigError(f"partitioning: alignment: {exc}") from None
    if not SECTOR <= value <= MAX_ALIGNMENT or value % SECTOR:
        raise ConfigError(f"partitioning: alignment: {value} should be a multiple of the sector "
                          f"size {SECTOR} between {SECTOR} and {MAX_ALIGNMENT}")
    return value


class Layout:
    """The virtual disk: pieces in order, each a file index or table bytes / padding."""

    def __init__(self, files: Sequence[PartFile], gpt: bool) -> None:
        self.files = files
        self.pieces: list[tuple[int, int | bytearray | None]] = []  # (size, file / data / None)
        self.size = 0
        self.gpt = gpt
        logical = not gpt and len(files) > 4
        self.pta_entries = -(-len(files) // GPT_MIN_PARTITIONS) * GPT_MIN_PARTITIONS
        pta_sectors = self.pta_entries * GPT_ENTRY_SIZE // SECTOR
        primary = bytearray((2 + pta_sectors if gpt else 1) * SECTOR)
        self._append(len(primary), primary)
        ebrs: list[tuple[int, bytearray]] = []  # (offset, sector)
        for index, part in enumerate(files):
            if logical and index >= 3:
                ebrs.append((self.size, bytearray(SECTOR)))
                self._append(SECTOR, ebrs[-1][1])
            padding = -self.size % part.alignment
            if padding:
                self._append(padding, None)
            part.start = self.size
            self._append(part.size, index)
            if part.size % SECTOR:
                self._append(SECTOR - part.size % SECTOR, None)
        if gpt:
            secondary = bytearray((pta_sectors + 1) * SECTOR)
            self._append(len(secondary), secondary)
            self._gpt(primary, secondary, pta_sectors)
        else:
            self._mbr(primary, ebrs)

    def _append(self, size: int, what: int | bytearray | None) -> None:
        self.pieces.append((size, what))
        self.size += size

    def _mbr(self, mbr: bytearray, ebrs: list[tuple[int, bytearray]]) -> None:
        mbr[510:512] = MBR_SIGNATURE
        primaries = self.files if len(self.files) <= 4 else self.files[:3]
        for index, part in enumerate(primaries):
            mbr[446 + 16 * index:462 + 16 * index] = mbr_entry(part.start, part.size, index == 0,
                                                               part.mbr_id)
        if not ebrs:
            return
        first = ebrs[0][0]
        mbr[494:510] = mbr_entry(first, self.size - first, False, EXTENDED_ID)
        logicals = self.files[3:]
        for number, ((where, ebr), part) in enumerate(zip(ebrs, logicals, strict=True)):
            ebr[510:512] = MBR_SIGNATURE
            ebr[446:462] = mbr_entry(part.start - where, part.size, False, part.mbr_id)
            if number + 1 < len(ebrs):
                next_where, following = ebrs[number + 1][0], logicals[number + 1]
                ebr[462:478] = mbr_entry(next_where - first,
                                         following.start + following.size - next_where,
                                         False, EXTENDED_ID)

    def _gpt(self, primary: bytearray, secondary: bytearray, pta_sectors: int) -> None:
        end = min(self.size, 0xFFFFFFFF * SECTOR + 1)
        primary[446:462] = mbr_entry(SECTOR, end - SECTOR, False, GPT_PROTECTIVE)
        primary[510:512] = MBR_SIGNATURE
        table = bytearray(self.pta_entries * GPT_ENTRY_SIZE)
        for index, part in enumerate(self.files):
            name = part.name.encode("utf-16-le") if len(part.name) < 36 and part.name.isascii() else b""
            table[index * GPT_ENTRY_SIZE:(index + 1) * GPT_ENTRY_SIZE] = (
                part.type_guid + part.unique_guid
                + (part.start // SECTOR).to_bytes(8, "little")
                + ((part.start + part.size - 1) // SECTOR).to_bytes(8, "little")
                + (4 if index == 0 else 0).to_bytes(8, "little")
                + name.ljust(72, b"\0"))
        primary[2 * SECTOR:] = table
        secondary[:len(table)] = table
        lbas = self.size // SECTOR
        crc_table = zlib.crc32(table)
        for out, current, backup, entries in ((primary, 1, lbas - 1, 2),
                                              (secondary, lbas - 1, 1, lbas - pta_sectors - 1)):
            header = bytearray(GPT_HEADER_SIZE)
            header[:8] = GPT_SIGNATURE
            header[8:12] = b"\0\0\1\0"
            fields = (GPT_HEADER_SIZE.to_bytes(4, "little") + bytes(8)
                      + current.to_bytes(8, "little") + backup.to_bytes(8, "little")
                      + (2 + pta_sectors).to_bytes(8, "little")
                      + (lbas - pta_sectors - 2).to_bytes(8, "little") + bytes(16)
                      + entries.to_bytes(8, "little") + self.pta_entries.to_bytes(4, "little")
                      + GPT_ENTRY_SIZE.to_bytes(4, "little") + crc_table.to_bytes(4, "little"))
            header[12:] = fields
            header[16:20] = zlib.crc32(header).to_bytes(4, "little")
            where = SECTOR if out is primary else pta_sectors * SECTOR
            out[where:where + GPT_HEADER_SIZE] = header


class PartitioningPlugin(Plugin):
    name = "partitioning"
    magic_param = "file"
    short_requests = True
    accept_unknown_params = True  # file=, alignment=, mbr-id=, type-guid=: their order matters
    params = (Param("partition-type", "str", "mbr or gpt (default: by count and size)"),)
    partition_type: str | None

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        super().__init__(values)
        self.files: list[PartFile] = []
        alignment, mbr_id, type_guid = MAX_ALIGNMENT, DEFAULT_MBR_ID, parse_guid(DEFAULT_TYPE_GUID)
        for key, text in (values or {}).get(UNKNOWN_PAIRS, []):
            if key in ("file", ""):
                self.files.append(PartFile(text, os.path.abspath(text), alignment, mbr_id,
                                           type_guid, os.urandom(16)))
            elif key == "alignment":
                alignment = parse_alignment(text)
            elif key == "mbr-id":
                mbr_id = (DEFAULT_MBR_ID if text.lower() == "default"
                          else parse_byte(text, key, "partitioning"))
            elif key == "type-guid":
                type_guid = parse_guid(DEFAULT_TYPE_GUID if text.lower() == "default" else text)
            else:
                raise ConfigError(f"partitioning: unknown parameter {key!r} (known: file, "
                                  "partition-type, alignment, mbr-id, type-guid)")

    def config_complete(self) -> None:
        if not self.files:
            raise ConfigError("partitioning: at least one file= parameter must be supplied")
        sizes = check_regular_files("partitioning", [f.path for f in self.files])
        for part, size in zip(self.files, sizes, strict=True):
            if size == 0:
                raise ConfigError(f"partitioning: {part.name}: zero length partitions are not "
                                  "allowed")
            part.size = size
        kind = (self.partition_type or "").lower()
        if kind not in ("", "mbr", "dos", "gpt"):
            raise ConfigError(f"partitioning: unknown partition-type: {self.partition_type}")
        needs_gpt = sum(sizes) > MAX_MBR_DISK_SIZE
        if kind in ("mbr", "dos") and needs_gpt:
            raise ConfigError("partitioning: an MBR table holds a disk of about 2 TB at most; "
                              "try partition-type=gpt")
        gpt = kind == "gpt" or (not kind and (needs_gpt or len(self.files) > 4))
        self.layout = Layout(self.files, gpt)

    def open(self, ctx: OpenContext) -> Connection:
        files = open_files([f.path for f in self.files], ctx.readonly)
        return ConcatDisk([files[what] if isinstance(what, int) else TablePiece(size, what)
                           for size, what in self.layout.pieces])
